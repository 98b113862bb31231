"""Task-level analysis: explain a whole prompt set, batch by batch.

``explain_task(model, prompts, answers)`` runs the model on batches of prompts, decomposes
each prompt's answer logit at its own last token (prompts may differ in length), and keeps
only one term per component and prompt (heads summed over source positions), so memory is
bounded by the batch size, not by the task. The result aggregates across prompts: the mean
and spread of every component's term, and how often it is among the top components.

>>> import tlprisms as tp
>>> from tlprisms.demo import capital_task, load_demo_model
>>> prompts, answers = zip(*capital_task()[:4])
>>> res = tp.explain_task(load_demo_model(), prompts, answers, heads="all", progress=False)
>>> res.check().values.shape[0], res.summary(k=3)["component"][0]
(4, 'L1.mlp')

**Streams.** The task can also be any iterable of rows (a generator, a list, a Hugging Face
``datasets.Dataset``): ``(prompt, answer)`` pairs, or mappings with the keys ``columns``
(default ``("prompt", "answer")``). With ``keep="stats"`` only exact running statistics are
kept (:class:`TaskStats`: memory bounded by the batch, whatever the length of the task), and
``parquet="terms.parquet"`` writes each prompt's largest terms to a Parquet file as it goes:

>>> rows = ({"prompt": p, "answer": a} for p, a in capital_task()[:4])
>>> st = tp.explain_task(load_demo_model(), rows, heads="all", keep="stats", progress=False)
>>> st.check().n, st.summary(k=5)["component"][0]
(4, 'L1.mlp')
"""

import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import numpy as np
import torch
from beartype import beartype
from jaxtyping import Float, jaxtyped
from torch import Tensor

from tlprisms._core import arguments as check_arg
from tlprisms._core.errors import ArgumentError, CompletenessError, PrismError, TargetError
from tlprisms._core.policy import refuse_broken
from tlprisms._core.readout import Softcap
from tlprisms._core.result import Decomposition, tolerance
from tlprisms._core.table import ComponentTable
from tlprisms._core.targets import Direction, LogitDiff, PerRow, token_id
from tlprisms._prisms.writes import split_of
from tlprisms._seam import ModelView, needed_hooks
from tlprisms._tasks.kernel import TaskKernel
from tlprisms._tasks.stats import RunningStats, StatsStream
from tlprisms.distributed import all_gather, world
from tlprisms.prism import LogitPrism

__all__ = ["TaskResult", "TaskStats", "explain_task"]

Keep = Literal["values", "stats"]


@jaxtyped(typechecker=beartype)
@dataclass(frozen=True, eq=False)
class TaskResult:
    """Per-prompt terms of a task: ``values[prompt, comp]`` and ``logits[prompt]``."""

    values: Float[Tensor, "prompt comp"]
    logits: Float[Tensor, "prompt"]
    components: ComponentTable
    prompts: list
    answers: list
    explains: str = "logit"
    meta: dict = field(default_factory=dict)
    precision: str = "float32"
    n_layers: int = 1

    @check_arg.entry
    def check(
        self, atol: Optional[Union[int, float]] = None, rtol: Optional[Union[int, float]] = None
    ) -> "TaskResult":
        """Raise unless every prompt's terms add up to its logit (the bound of
        :meth:`Decomposition.check`)."""
        self.decomposition().check(atol, rtol)
        return self

    @check_arg.entry
    def mask(self, **criteria: Any) -> np.ndarray:
        """The boolean mask over components matching ``criteria`` (as ``Decomposition.select``)."""
        return self.components.mask("mask", **criteria)

    @check_arg.entry
    def summary(self, k: int = 10, constants: bool = False, *, top_k: Optional[int] = None) -> Any:
        """One row per component: mean, std, min, max of its term across prompts, its mean
        share of the logit, and the fraction of prompts where it is among the ``k`` largest
        by |term| (column ``frac_top{k}``). Sorted by mean |term|. ``top_k`` is the
        deprecated name of ``k``."""
        import pandas as pd

        k = check_arg.count(
            check_arg.renamed("summary", "top_k", "k", top_k, k, 10), "k", "summary"
        )
        top_k = k
        v = self.values.detach().double().cpu().numpy()
        keep = np.ones(v.shape[1], dtype=bool) if constants else ~self.components.is_constant()
        absv = np.where(keep[None], np.abs(v), -np.inf)
        k = min(top_k, int(keep.sum()))
        top = np.argpartition(-absv, k - 1, axis=1)[:, :k] if k > 0 else np.zeros((len(v), 0), int)
        counts = np.zeros(v.shape[1])
        np.add.at(counts, top.ravel(), 1)
        logits = self.logits.detach().double().cpu().numpy()[:, None]
        share = v / np.where(np.abs(logits) > 1e-12, logits, np.nan)
        c = self.components
        df = pd.DataFrame(
            {
                "component": [str(x) for x in c],
                "kind": c.kinds(),
                "layer": c.layer,
                "head": c.head,
                "neuron": c.neuron,
                "mean": v.mean(0),
                "std": v.std(0),
                "min": v.min(0),
                "max": v.max(0),
                "mean_share": np.nanmean(share, 0),
                f"frac_top{top_k}": counts / len(v),
                "mean_abs": np.abs(v).mean(0),
            }
        )[keep]
        return df.sort_values("mean_abs", ascending=False).reset_index(drop=True)

    def decomposition(self) -> Decomposition:
        """The per-prompt terms as a :class:`Decomposition` (prompts on the batch axis)."""
        n = len(self.prompts)
        return Decomposition(
            values=self.values[:, None, None, :],
            components=self.components,
            explained=self.logits[:, None, None],
            positions=torch.as_tensor(self.meta.get("positions", [0] * n))[:, None],
            target_labels=np.asarray(list(map(str, self.answers)), dtype=object).reshape(n, 1, 1),
            explains=self.explains,
            prism="task",
            precision=self.precision,
            n_layers=self.n_layers,
        )

    def to_frame(self) -> Any:
        """Long table: prompt, answer, component fields, value."""
        import pandas as pd

        P, C = self.values.shape
        c = self.components
        pp, cc = np.meshgrid(np.arange(P), np.arange(C), indexing="ij")
        return pd.DataFrame(
            {
                "prompt": np.asarray(self.prompts, dtype=object)[pp.ravel()],
                "answer": np.asarray(list(map(str, self.answers)), dtype=object)[pp.ravel()],
                "kind": c.kinds()[cc.ravel()],
                "layer": c.layer[cc.ravel()],
                "head": c.head[cc.ravel()],
                "neuron": c.neuron[cc.ravel()],
                "value": self.values.detach().float().cpu().numpy().ravel(),
            }
        )

    def __repr__(self) -> str:
        s = self.summary(k=5).head(5)
        lines = [
            f"TaskResult({len(self.prompts)} prompts, {self.values.shape[1]} components; "
            f"explains {self.explains}; max |gap| "
            f"{float((self.values.sum(-1) - self.logits).abs().max()):.2g})"
        ]
        for _, row in s.iterrows():
            lines.append(
                f"  {row['component']:<16} mean {row['mean']:+.3g} +- {row['std']:.2g}"
                f"  top-5 in {row['frac_top5']:.0%} of prompts"
            )
        return "\n".join(lines)

    def _tlprisms_views(self) -> list:
        from tlprisms import render

        return [_mean_bars(render, self.summary(), len(self.prompts))]

    def _repr_html_(self) -> str:
        from tlprisms import render

        return render.to_html(self)


@dataclass(frozen=True, eq=False)
class TaskStats:
    """Exact running statistics of a task (``explain_task(..., keep="stats")``).

    Holds, per component, the count, mean, standard deviation, min, max, mean |term|, mean
    share of the logit and how often the component was among a prompt's ``k`` largest
    |terms| (for each ``k`` in ``frac_top``), merged exactly over batches (and processes);
    no per-prompt values. :meth:`summary` gives the same table as
    :meth:`TaskResult.summary` (to float64 rounding, ~1e-15 relative).
    """

    stats: RunningStats
    components: ComponentTable
    explains: str = "logit"
    meta: dict = field(default_factory=dict)
    precision: str = "float32"
    n_layers: int = 1

    @property
    def n(self) -> int:
        """The number of prompts."""
        return self.stats.n

    @property
    def frac_top(self) -> tuple:
        """The ``k`` values whose top-``k`` frequencies were counted."""
        return tuple(sorted({k for k, _ in self.stats.tops}))

    @check_arg.entry
    def check(self) -> "TaskStats":
        """Raise :class:`CompletenessError` unless every prompt's terms added up to its logit
        within the default bound of :meth:`Decomposition.check` (the largest gap relative
        to ``max(1, |logit|, sum of |terms|)`` is recorded as the stream goes)."""
        bound = tolerance(self.precision, self.n_layers)
        if not self.stats.max_gap_ratio <= bound:
            raise CompletenessError(
                f"check: a prompt's terms miss its {self.explains} by "
                f"{self.stats.max_gap:.3g} ({self.stats.max_gap_ratio:.3g} of its scale, bound "
                f"{bound:.3g}); the cache does not belong to the model's forward pass. Re-run "
                "explain_task with the model in eval() mode and unchanged weights."
            )
        return self

    @check_arg.entry
    def summary(self, k: int = 10, constants: bool = False) -> Any:
        """One row per component, as :meth:`TaskResult.summary`: mean, std, min, max, mean
        share of the logit, ``frac_top{k}`` and mean |term|, sorted by mean |term|. ``k``
        must be one of the counted :attr:`frac_top` (``explain_task(frac_top=...)``)."""
        import pandas as pd

        k = check_arg.count(k, "k", "summary")
        if not isinstance(constants, bool):
            raise ArgumentError(f"summary: constants={constants!r}; pass True or False.")
        if (k, constants) not in self.stats.tops:
            raise ArgumentError(
                f"summary: k={k} was not counted during the stream (counted: "
                f"{', '.join(map(str, self.frac_top))}); pass frac_top=({k},) to explain_task."
            )
        s = self.stats.cpu()
        c = self.components
        keep = np.ones(len(c), dtype=bool) if constants else ~c.is_constant()
        npy = lambda t: t.double().numpy()
        df = pd.DataFrame(
            {
                "component": [str(x) for x in c],
                "kind": c.kinds(),
                "layer": c.layer,
                "head": c.head,
                "neuron": c.neuron,
                "mean": npy(s.mean),
                "std": npy(s.std),
                "min": npy(s.min),
                "max": npy(s.max),
                "mean_share": npy(s.sum_share) / s.n_share if s.n_share else np.nan,
                f"frac_top{k}": npy(s.tops[(k, constants)]) / s.n,
                "mean_abs": npy(s.sum_abs) / s.n,
            }
        )[keep]
        return df.sort_values("mean_abs", ascending=False).reset_index(drop=True)

    def merge(self, other: "TaskStats") -> "TaskStats":
        """The statistics of both tasks' prompts (e.g. shards run separately)."""
        if not isinstance(other, TaskStats) or len(other.components) != len(self.components):
            raise ArgumentError(
                "TaskStats.merge: pass the TaskStats of the same model and heads/neurons split."
            )
        n = self.meta.get("prompts", self.n) + other.meta.get("prompts", other.n)
        return TaskStats(
            self.stats.merge(other.stats),
            self.components,
            self.explains,
            dict(self.meta, prompts=n),
            self.precision,
            self.n_layers,
        )

    def __repr__(self) -> str:
        k = 5 if 5 in self.frac_top else self.frac_top[0]
        s = self.summary(k=k).head(5)
        lines = [
            f"TaskStats({self.n} prompts, {len(self.components)} components; explains "
            f"{self.explains}; max |gap| {self.stats.max_gap:.2g})"
        ]
        for _, row in s.iterrows():
            lines.append(
                f"  {row['component']:<16} mean {row['mean']:+.3g} +- {row['std']:.2g}"
                f"  top-{k} in {row[f'frac_top{k}']:.0%} of prompts"
            )
        return "\n".join(lines)

    def _tlprisms_views(self) -> list:
        from tlprisms import render

        return [_mean_bars(render, self.summary(k=self.frac_top[-1]), self.n)]

    def _repr_html_(self) -> str:
        from tlprisms import render

        return render.to_html(self)


#: how many components a task's bar chart shows
MEAN_BARS = 20


def _mean_bars(render: Any, summary: Any, n: int) -> str:
    """The :data:`MEAN_BARS` components of largest mean |term|, drawn sorted by the value
    shown (their mean term, largest first)."""
    s = summary.head(MEAN_BARS).sort_values("mean", ascending=False, kind="stable")
    return render.bar_svg(
        s["mean"].tolist(),
        s["component"].tolist(),
        f"mean term over {n} prompts (the {len(s)} largest by mean |term|)",
    )


# ------------------------------------------------------------------------------ reading rows
def _is_pair(row: Any) -> bool:
    return isinstance(row, (tuple, list)) and not isinstance(row, (str, bytes))


def _resolve_answer(view: Any, i: int, answer: Any, caller: str, memo: dict) -> Any:
    """The answer as a target with token ids (a single-token string or a token id becomes
    its id, a LogitDiff a LogitDiff of ids, a Direction stays), or an error naming item ``i``.
    ``memo`` keeps the ids of answers already resolved (labels repeat across a task)."""
    key = (type(answer), answer) if isinstance(answer, (str, int, LogitDiff)) else None
    if key is not None and key in memo:
        return memo[key]
    try:
        if isinstance(answer, str) or check_arg.is_index(answer):
            target: Any = token_id(view, answer, caller, "answer")
        elif isinstance(answer, LogitDiff):
            target = LogitDiff(
                token_id(view, answer.positive, caller, "answer"),
                token_id(view, answer.negative, caller, "answer"),
            )
        elif isinstance(answer, Direction):
            return answer
        else:
            raise TargetError(
                f"{caller}: the answer {answer!r:.60} (type {type(answer).__name__}) is not "
                "a target; give a single-token string, a token id, tlprisms.LogitDiff or "
                "tlprisms.Direction."
            )
    except TargetError as err:
        msg = str(err)
        msg = msg[len(caller) + 2 :] if msg.startswith(caller + ": ") else msg
        raise TargetError(f"{caller}: item {i}: {msg}") from None
    if key is not None:
        memo[key] = target
    return target


def _row(i: int, row: Any, columns: tuple, caller: str) -> tuple:
    if isinstance(row, Mapping):
        missing = [key for key in columns if key not in row]
        if missing:
            raise ArgumentError(
                f"{caller}: item {i} is a mapping without the key {missing[0]!r} (its keys: "
                f"{', '.join(map(repr, list(row)[:8]))}); name the prompt and answer keys "
                "with columns=('prompt_key', 'answer_key')."
            )
        prompt, answer = row[columns[0]], row[columns[1]]
    elif _is_pair(row) and len(row) == 2:
        prompt, answer = row
    else:
        what = (
            f"a {len(row)}-item {type(row).__name__}"
            if _is_pair(row)
            else (f"{row!r:.40} ({type(row).__name__})")
        )
        raise ArgumentError(
            f"{caller}: item {i} is {what}, not a (prompt, answer) pair; give pairs or "
            f"mappings with the keys {columns!r} (for a pandas DataFrame, "
            "df.to_dict('records')), or two lists: explain_task(model, prompts, answers)."
        )
    if not isinstance(prompt, str) or not prompt:
        raise ArgumentError(
            f"{caller}: the prompt of item {i} is {prompt!r:.60}; every prompt must be a "
            "non-empty string."
        )
    return prompt, answer


def _items(
    view: Any, prompts: Any, answers: Any, columns: Any, caller: str
) -> tuple[Iterator[tuple], Optional[int]]:
    """``(index, prompt, answer, target)`` for every item, checked as read (``target``: the
    answer with token ids), and the task's length when it is known."""
    if isinstance(prompts, (str, bytes)) or isinstance(answers, (str, bytes)):
        raise ArgumentError(
            f"{caller}: prompts and answers must be lists (one answer per "
            "prompt), not a single string; wrap them in lists."
        )
    if answers is not None:
        prompts, answers = list(prompts), list(answers)
        if len(prompts) != len(answers):
            raise ArgumentError(
                f"{caller}: {len(prompts)} prompts but {len(answers)} answers; give "
                "one answer per prompt."
            )
        if not prompts:
            raise ArgumentError(f"{caller}: no prompts; give at least one.")
        for i, p in enumerate(prompts):
            if not isinstance(p, str) or not p:
                raise ArgumentError(
                    f"{caller}: prompt {i} is {p!r}; every prompt must be a non-empty string."
                )

        def listed() -> Iterator[tuple]:
            memo: dict = {}
            for i, (p, a) in enumerate(zip(prompts, answers)):
                yield i, p, a, _resolve_answer(view, i, a, caller, memo)

        return listed(), len(prompts)
    if (
        not isinstance(columns, tuple)
        or len(columns) != 2
        or not all(isinstance(c, str) for c in columns)
    ):
        raise ArgumentError(
            f"{caller}: columns={columns!r}; pass a tuple of two key names "
            "(prompt key, answer key), e.g. ('question', 'label')."
        )
    try:
        it = iter(prompts)
    except TypeError:
        raise ArgumentError(
            f"{caller}: {type(prompts).__name__} is not iterable; give an iterable of "
            "(prompt, answer) pairs or of mappings, or two lists (prompts, answers)."
        ) from None
    total = len(prompts) if hasattr(prompts, "__len__") else None

    def rows() -> Iterator[tuple]:
        memo: dict = {}
        for i, row in enumerate(it):
            p, a = _row(i, row, columns, caller)
            yield i, p, a, _resolve_answer(view, i, a, caller, memo)

    return rows(), total


def _batches(
    items: Iterator[tuple], size: int, window: int, bucket: bool, lengths: Any
) -> Iterator[list]:
    """Batches of ``(*item, n_tokens)`` (``item[1]`` is the prompt): consecutive items, or,
    with ``bucket``, each look-ahead window of ``window`` batches sorted by token length.
    ``lengths(prompts)`` gives the token lengths of a window's prompts."""
    while True:
        chunk = []
        failure: Optional[BaseException] = None
        try:
            for item in items:
                chunk.append(item)
                if len(chunk) == size * window:
                    break
        except PrismError as err:  # a bad row: re-raised once the rows before it are done
            failure = err
        if not chunk:
            if failure is not None:
                raise failure
            return
        n_tokens = lengths([item[1] for item in chunk])
        chunk = [(*item, n) for item, n in zip(chunk, n_tokens)]
        if bucket:
            chunk.sort(key=lambda x: x[-1])  # stable: equal lengths keep their order
        for s in range(0, len(chunk), size):
            yield chunk[s : s + size]
        if failure is not None:
            raise failure
        if len(chunk) < size * window:
            return


#: prompts of a task's first window whose batched lengths are compared with one-by-one ones
LENGTHS_CHECKED = 16


class _Lengths:
    """Token lengths of prompts as ``model.to_tokens(prompt)`` gives them, a window at a
    time: one batched ``to_tokens`` call (right-padded), each row's length up to its
    trailing padding. A row whose text holds the pad token itself (so that its own tokens
    may end in it) or that is all padding is tokenized alone, and so is every prompt when
    the tokenizer has no pad token. The first window's lengths are compared with one-by-one
    tokenization (of :data:`LENGTHS_CHECKED` prompts); a tokenizer that adds something at
    the end (an EOS that is also the pad token, say) differs there, and the task then
    tokenizes every prompt alone."""

    def __init__(self, source: Any, tok: Any, kw: dict) -> None:
        # source: the seam's ModelView (anything with the model's ``to_tokens``)
        self.source, self.kw = source, kw
        self.pad = getattr(tok, "pad_token_id", None)
        self.pad_text = getattr(tok, "pad_token", None)
        self.batched = isinstance(self.pad, int) and isinstance(self.pad_text, str)
        self.checked = False

    def one(self, prompt: str) -> int:
        return int(self.source.tokenize(prompt, **self.kw).shape[-1])

    def __call__(self, prompts: list) -> list:
        if not self.batched or len(prompts) == 1:
            return [self.one(p) for p in prompts]
        tokens = self.source.tokenize(prompts, padding_side="right", **self.kw)
        L = tokens.shape[-1]
        real = tokens != self.pad
        last = L - real.flip(-1).to(torch.int8).argmax(-1)  # after the last real token
        out = torch.where(real.any(-1), last, 0).tolist()
        for i, p in enumerate(prompts):
            if out[i] == 0 or (out[i] < L and self.pad_text in p):
                out[i] = self.one(p)
        if not self.checked:
            self.checked = True
            if [self.one(p) for p in prompts[:LENGTHS_CHECKED]] != out[:LENGTHS_CHECKED]:
                self.batched = False
                return [self.one(p) for p in prompts]
        return out


def _kernel(
    view: ModelView,
    prism: LogitPrism,
    heads: Any,
    neurons: Any,
    softcap: Any,
    first: Decomposition,
    targets: list,
    pos: list,
) -> Optional[TaskKernel]:
    """The task's :class:`TaskKernel`, set up on its first batch, or None unless it gives
    that batch's ``decompose`` result (``first``) bit for bit."""
    split = split_of(view, heads, neurons, False, "explain_task")
    try:
        kernel = TaskKernel(view, prism.recorded.cache, split, softcap, first.components)
        values, explained, _, explains = kernel(prism.recorded, targets, pos)
    except ValueError:
        return None
    same = (
        explains == first.explains
        and values.shape == first.values.shape
        and torch.equal(values, first.values)
        and torch.equal(explained, first.explained)
    )
    return kernel if same else None


def _own(items: Iterator[tuple], rank: int, world_size: int) -> Iterator[tuple]:
    for item in items:
        if item[0] % world_size == rank:
            yield item


# ------------------------------------------------------------------------------ the call
@check_arg.entry
def explain_task(
    model: Any,
    prompts: Union[Sequence[str], Iterable[Any]],
    answers: Optional[Sequence[Any]] = None,
    *,
    heads: Any = (),
    neurons: Any = (),
    batch_size: int = 16,
    progress: bool = True,
    softcap: Softcap = "post",
    prepend_bos: Optional[bool] = None,
    keep: Keep = "values",
    frac_top: Any = (5, 10),
    parquet: Any = None,
    parquet_k: int = 20,
    columns: tuple = ("prompt", "answer"),
    bucket: Optional[bool] = None,
    window: int = 32,
    distributed: Optional[bool] = None,
) -> Any:  # TaskResult, or TaskStats with keep="stats"
    """Decompose each prompt's answer logit at its last token, in batches.

    Args:
        prompts: the task's prompts (any lengths), with ``answers``; or, with ``answers``
            left out, any iterable of rows (a list, a generator, a Hugging Face
            ``datasets.Dataset``): ``(prompt, answer)`` tuples or lists, or mappings with
            the keys ``columns``. A malformed row raises an error naming its index, once
            the rows before it are done (and written to ``parquet``); an exception raised
            by the iterable itself stops at once (``parquet`` then holds every completed
            batch).
        answers: one target per prompt: a single-token string, a token id, or a
            :class:`~tlprisms.LogitDiff` (e.g. the right answer minus a distractor).
        heads / neurons: layers to split into heads (summed over sources) / neurons:
            ``"all"``, a layer, a list of layers, or ``()`` (default) for none.
        batch_size: prompts per forward pass; memory is bounded by this.
        progress: show a progress bar (tqdm: prompts, rate, and ETA when the length is known).
        keep: ``"values"`` (a :class:`TaskResult` with every prompt's terms) or ``"stats"``
            (a :class:`TaskStats`: exact running statistics only; memory bounded by the batch).
        frac_top: the ``k`` values for which ``keep="stats"`` counts how often each
            component is among a prompt's ``k`` largest |terms| (``summary(k=...)``).
        parquet: a path: write each prompt's ``parquet_k`` largest terms, plus one
            ``"(rest)"`` row holding the others, to this Parquet file in row groups (needs
            pyarrow; see :mod:`tlprisms._tasks.parquet` for the columns). The file is closed even
            when the task is interrupted, and then holds every completed batch.
        columns: the prompt and answer keys of mapping rows.
        bucket: group prompts of equal token length into batches (less padding), within a
            look-ahead of ``window`` batches; results are in task order either way. Default:
            off for two lists (0.1's numbers, bit for bit), on for rows.
        distributed: shard the task over the ``torch.distributed`` ranks (item ``i`` on rank
            ``i % world_size``) and merge the results exactly on every rank; ``None``
            (default) does so when a process group is initialised. See
            :mod:`tlprisms.distributed`.
    """
    caller = "explain_task"
    view = ModelView(model)
    check_arg.choice(keep, "keep", ("values", "stats"), caller)
    batch_size = check_arg.count(batch_size, "batch_size", caller)
    window = check_arg.count(window, "window", caller)
    ks = (frac_top,) if check_arg.is_index(frac_top) else frac_top
    if not isinstance(ks, (tuple, list)) or not ks:
        raise ArgumentError(f"{caller}: frac_top={frac_top!r}; pass an int or a tuple of ints.")
    ks = tuple(sorted({check_arg.count(k, "frac_top", caller) for k in ks}))
    parquet_k = check_arg.count(parquet_k, "parquet_k", caller)
    for flag, what in ((progress, "progress"), (bucket, "bucket")):
        if flag is not None and not isinstance(flag, bool):
            raise ArgumentError(f"{caller}: {what}={flag!r}; pass True or False.")
    check_arg.choice(softcap, "softcap", ("post", "pre"), caller)
    if prepend_bos is not None and not isinstance(prepend_bos, bool):
        raise ArgumentError(
            f"{caller}: prepend_bos={prepend_bos!r}; pass True, False or None (the model's "
            "default)."
        )
    with warnings.catch_warnings():  # heads=None's deprecation is told once, by decompose
        warnings.simplefilter("ignore", DeprecationWarning)
        split_of(view, heads, neurons, False, caller)  # before any work
    rank, world_size = world(distributed, caller)
    if parquet is not None:  # before any work: a bad path fails now, not after a batch
        from tlprisms._tasks.parquet import check_path

        check_path(parquet, rank, world_size, caller)
    items, total = _items(view, prompts, answers, columns, caller)
    if bucket is None:
        bucket = answers is None
    kw = {} if prepend_bos is None else {"prepend_bos": prepend_bos}
    lengths = _Lengths(view, view.tokenizer(), kw)
    names = needed_hooks(model, ("residual", "heads", "neurons"))

    writer = None
    if parquet is not None:
        from tlprisms._tasks.parquet import SparseWriter, rank_path

        file_meta = {"rank": rank, "world_size": world_size}
        file_meta.update(heads=repr(heads), neurons=repr(neurons))
        writer = SparseWriter(rank_path(parquet, rank, world_size), parquet_k, file_meta)
    bar = None
    if progress and rank == 0:
        try:  # a widget bar in notebooks when ipywidgets is there (the notebook extra)
            import ipywidgets  # noqa: F401
            from tqdm.auto import tqdm
        except ImportError:  # a text bar (tqdm.auto would warn in Jupyter without it)
            from tqdm import tqdm

        own = None if total is None else len(range(rank, total, world_size))
        bar = tqdm(total=own, desc=caller, unit="prompt", dynamic_ncols=True)

    index: list = []
    values: list = []
    logits: list = []
    positions: list = []
    kept_prompts: list = []
    kept_answers: list = []
    stream: Optional[StatsStream] = None
    table: Optional[ComponentTable] = None
    constant = None
    explains, precision = "logit", "float32"
    kernel: Optional[TaskKernel] = None
    tried = trusted = False
    complete = False
    try:
        own_items = _own(items, rank, world_size) if world_size > 1 else items
        for batch in _batches(own_items, batch_size, window, bucket, lengths):
            idx = [b[0] for b in batch]
            ps = [b[1] for b in batch]
            ans = [b[2] for b in batch]
            # right-padded whatever the model's default: each prompt is read at its own
            # last token (its length - 1), and causal attention keeps later padding out
            tokens = view.tokenize(ps, padding_side="right", **kw)
            out, cache = view.record_cache(tokens, names)
            pos = [b[-1] - 1 for b in batch]
            targets = [b[3] for b in batch]
            ints = all(type(t) is int for t in targets)
            # no tokens=: this cache was just recorded from them (the values do not depend
            # on it, and the prism then skips labelling every input token). The first batch
            # is checked like any user's cache; later ones were recorded here just the same
            # (float64 caches are always checked: their precision is read off the logits)
            if trusted:
                prism = LogitPrism.trusted(view, cache, out, caller)
            else:
                prism = LogitPrism(model, cache, logits=out)
            rec = prism.recorded
            if kernel is not None and ints and kernel.fits(rec.cache):
                vals, explained, gap, explains = kernel(rec, targets, pos)
                refuse_broken(rec.cache, vals, explained, gap)
                precision = prism.precision
            else:
                r = prism.decompose(
                    PerRow(targets),
                    pos,
                    heads=heads,
                    neurons=neurons,
                    by_source=False,
                    softcap=softcap,
                )
                vals, explained = r.values, r.explained
                explains, precision = r.explains, r.precision
                if table is None:
                    table = r.components
                    constant = torch.as_tensor(table.is_constant(), device=r.values.device)
                if not tried and ints and prism.dtype != torch.float64:
                    tried = True
                    kernel = _kernel(view, prism, heads, neurons, softcap, r, targets, pos)
                del r
                trusted = prism.dtype != torch.float64
            del cache, out, prism, rec
            v = vals[:, 0, 0, :].detach()
            lg = explained[:, 0, 0].detach()
            del vals, explained
            if keep == "values":
                values.append(v)
                logits.append(lg)
                kept_prompts += ps
                kept_answers += ans
                positions += pos
            else:
                if stream is None:
                    assert constant is not None
                    stream = StatsStream(constant, ks)
                stream.add(v, lg)
            index += idx
            if writer is not None:
                assert table is not None  # set by the first batch (always decompose)
                writer.add(idx, ps, ans, pos, v, lg, table)
            if bar is not None:
                bar.update(len(batch))
        complete = True
    finally:
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close(complete, explains=explains, precision=precision)
    n_layers = view.n_layers
    meta: dict = {"kernel": kernel is not None}
    if writer is not None:
        meta["parquet"] = str(writer.path)
    if world_size > 1:
        meta.update(world_size=world_size)
    if keep == "values":
        if world_size > 1:
            local = (index, [t.cpu() for t in values], [t.cpu() for t in logits])
            parts = all_gather(
                (local, kept_prompts, kept_answers, positions, table, explains, precision),
                world_size,
            )
            index, values, logits, kept_prompts, kept_answers, positions = [], [], [], [], [], []
            for (i, v, lg), ps, ans, pos, tab, ex, pr in parts:
                index += i
                values += v
                logits += lg
                kept_prompts += ps
                kept_answers += ans
                positions += pos
                if tab is not None and table is None:
                    table, explains, precision = tab, ex, pr
        if table is None:
            raise ArgumentError(f"{caller}: no prompts; give at least one.")
        V, L = torch.cat(values), torch.cat(logits)
        if index != sorted(index):
            order = np.argsort(np.asarray(index), kind="stable")
            V, L = V[torch.as_tensor(order, device=V.device)], L[torch.as_tensor(order)]
            kept_prompts = [kept_prompts[j] for j in order]
            kept_answers = [kept_answers[j] for j in order]
            positions = [positions[j] for j in order]
        return TaskResult(
            values=V,
            logits=L,
            components=table,
            prompts=kept_prompts,
            answers=kept_answers,
            explains=explains,
            meta={"positions": positions, **meta},
            precision=precision,
            n_layers=n_layers,
        )
    stats = None if stream is None else stream.result()
    if world_size > 1:
        parts = all_gather(
            (None if stats is None else stats.cpu(), table, explains, precision), world_size
        )
        stats = None
        for st, tab, ex, pr in parts:
            if st is not None:
                stats = st if stats is None else stats.merge(st)
                table, explains, precision = tab, ex, pr
    if stats is None or table is None:
        raise ArgumentError(f"{caller}: no prompts; give at least one.")
    return TaskStats(stats, table, explains, dict(meta, prompts=stats.n), precision, n_layers)
