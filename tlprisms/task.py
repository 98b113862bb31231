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
"""

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import numpy as np
import torch
from beartype import beartype
from jaxtyping import Float, jaxtyped
from torch import Tensor

from tlprisms import _validate as check_arg
from tlprisms._errors import ArgumentError
from tlprisms._readout import Softcap
from tlprisms._result import ComponentTable, Decomposition
from tlprisms._seam import needed_hooks
from tlprisms._targets import PerRow
from tlprisms.prism import LogitPrism

__all__ = ["TaskResult", "explain_task"]


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
            logits=self.logits[:, None, None],
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

        s = self.summary().head(20)
        return [
            render.bar_svg(
                s["mean"].tolist(),
                s["component"].tolist(),
                f"mean term over {len(self.prompts)} prompts",
            )
        ]

    def _repr_html_(self) -> str:
        from tlprisms import render

        return render.to_html(self)


@check_arg.entry
def explain_task(
    model: Any,
    prompts: Sequence[str],
    answers: Sequence[Any],
    *,
    heads: Any = (),
    neurons: Any = (),
    batch_size: int = 16,
    progress: bool = True,
    softcap: Softcap = "post",
    prepend_bos: Optional[bool] = None,
) -> TaskResult:
    """Decompose each prompt's answer logit at its last token, in batches.

    Args:
        prompts: the task's prompts (any lengths).
        answers: one target per prompt: a single-token string, a token id, or a
            :class:`~tlprisms.LogitDiff` (e.g. the right answer minus a distractor).
        heads / neurons: layers to split into heads (summed over sources) / neurons:
            ``"all"``, a layer, a list of layers, or ``()`` (default) for none.
        batch_size: prompts per forward pass; memory is bounded by this.
        progress: show a progress bar (tqdm).
    """
    caller = "explain_task"
    if isinstance(prompts, str) or isinstance(answers, str):
        raise ArgumentError(
            f"{caller}: prompts and answers must be lists (one answer per "
            "prompt), not a single string; wrap them in lists."
        )
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
    batch_size = check_arg.count(batch_size, "batch_size", caller)
    kw = {} if prepend_bos is None else {"prepend_bos": prepend_bos}
    names = needed_hooks(model, ("residual", "heads", "neurons"))
    starts = range(0, len(prompts), batch_size)
    if progress:
        from tqdm import tqdm  # plain bar: tqdm.auto warns in Jupyter without ipywidgets

        starts = tqdm(starts, desc=caller, unit="batch")
    values, logits, positions = [], [], []
    table = None
    explains, precision = "logit", "float32"
    for start in starts:
        batch = prompts[start : start + batch_size]
        lengths = [model.to_tokens(p, **kw).shape[-1] for p in batch]
        tokens = model.to_tokens(batch, **kw)
        with torch.no_grad():
            out, cache = model.run_with_cache(tokens, names_filter=names)
        prism = LogitPrism(model, cache, tokens=tokens, logits=out)
        pos = [n - 1 for n in lengths]
        r = prism.decompose(
            PerRow(answers[start : start + batch_size]),
            pos,
            heads=heads,
            neurons=neurons,
            by_source=False,
            softcap=softcap,
        )
        if table is None:
            table = r.components
        values.append(r.values[:, 0, 0, :].detach())
        logits.append(r.logits[:, 0, 0].detach())
        positions += pos
        explains, precision = r.explains, r.precision
        del cache, out, prism, r
    assert table is not None  # there is at least one prompt
    return TaskResult(
        values=torch.cat(values),
        logits=torch.cat(logits),
        components=table,
        prompts=prompts,
        answers=answers,
        explains=explains,
        meta={"positions": positions},
        precision=precision,
        n_layers=int(model.cfg.n_layers),
    )
