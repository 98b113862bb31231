"""Streamed task analysis: ``explain_task`` over iterables of rows, ``keep="stats"`` (exact
running statistics), Parquet sparse terms, length bucketing, and bad rows named by index.

Every streamed number is compared with the in-memory ``TaskResult`` of the same prompts:
statistics to :data:`STATS_ATOL`, per-prompt values to the completeness tolerance of the
model's precision (a prompt batched with others of another length is padded differently, so
its float32 terms may differ in the last bits).
"""

import importlib.util
import json

import numpy as np
import pandas as pd
import pytest
import torch

import tlprisms as tp
from tlprisms._core.errors import ArgumentError, CompletenessError, NonFiniteError, TargetError
from tlprisms._core.policy import refuse_broken
from tlprisms._core.result import tolerance
from tlprisms._prisms.writes import split_of
from tlprisms._seam import ModelView, Site, needed_hooks
from tlprisms._tasks.kernel import TaskKernel
from tlprisms._tasks.parquet import REST, RUN_KEY
from tlprisms._tasks.stats import RunningStats, StatsStream
from tlprisms._tasks.task import TaskStats, _batches, _Lengths
from tlprisms.demo import addition_task, capital_task, load_demo_model

from conftest import CASES, build_case

#: streamed statistics vs the two-pass statistics of the in-memory values (float64 merges)
STATS_ATOL = 1e-6
TASK = capital_task()[:23] + addition_task()[:30]  # 53 prompts of 2 token lengths
SPLIT = {"heads": "all", "neurons": "all"}
TL3 = importlib.util.find_spec("transformer_lens.HookedTransformer") is not None
KINDS = ["bridge", "hooked"] if TL3 else ["bridge"]
NUMERIC = ["mean", "std", "min", "max", "mean_share", "mean_abs"]


@pytest.fixture(scope="module", params=KINDS)
def model(request):
    return load_demo_model(kind=request.param)


@pytest.fixture(scope="module")
def reference(model):
    """The in-memory result of the two-list call (0.1's path, task order)."""
    prompts, answers = zip(*TASK)
    return tp.explain_task(model, list(prompts), list(answers), progress=False, **SPLIT)


def atol(res) -> float:
    """The completeness bound of the result's precision at its largest logit."""
    return tolerance(res.precision, res.n_layers) * max(1.0, float(res.logits.abs().max()))


def assert_same_summary(a: pd.DataFrame, b: pd.DataFrame, k: int, tol: float = STATS_ATOL) -> None:
    a, b = a.set_index("component"), b.set_index("component")
    assert sorted(a.index) == sorted(b.index)
    b = b.loc[a.index]
    for col in [*NUMERIC, f"frac_top{k}"]:
        np.testing.assert_allclose(b[col], a[col], rtol=0, atol=tol, err_msg=col)


def test_rows_in_task_order_equal_two_lists(model, reference):
    """Pairs, unbucketed: the same batches as the two-list call, bit for bit."""
    res = tp.explain_task(model, list(TASK), progress=False, bucket=False, **SPLIT)
    assert torch.equal(res.values, reference.values)
    assert torch.equal(res.logits, reference.logits)
    assert res.prompts == reference.prompts and res.answers == reference.answers


@pytest.mark.parametrize("k", [5, 10])
@pytest.mark.parametrize("constants", [False, True])
def test_streamed_stats_equal_in_memory(model, k, constants):
    """The same (bucketed) batches kept in memory or as running statistics."""
    rows = ((p, a) for p, a in TASK)  # a generator: no len()
    st = tp.explain_task(model, rows, keep="stats", batch_size=7, progress=False, **SPLIT)
    assert isinstance(st, TaskStats) and st.n == len(TASK)
    assert st.check() is st
    ref = tp.explain_task(model, iter(TASK), batch_size=7, progress=False, **SPLIT)
    assert_same_summary(
        ref.summary(k=k, constants=constants), st.summary(k=k, constants=constants), k
    )


def test_bucketing_changes_no_value(model, reference):
    """Bucketed batches (batch 4, window 3) give every prompt's terms in task order."""
    res = tp.explain_task(model, iter(TASK), batch_size=4, window=3, progress=False, **SPLIT)
    assert res.prompts == reference.prompts
    assert res.meta["positions"] == reference.meta["positions"]
    tol = atol(reference)
    assert float((res.values - reference.values).abs().max()) <= tol
    assert float((res.logits - reference.logits).abs().max()) <= tol
    res.check()
    st = tp.explain_task(model, iter(TASK), keep="stats", batch_size=4, window=3, progress=False)
    ref = tp.explain_task(model, *map(list, zip(*TASK)), progress=False)
    assert_same_summary(ref.summary(k=5), st.summary(k=5), 5, atol(ref))


def test_bucketing_groups_lengths_within_a_bounded_window():
    consumed = []

    def items():
        for i in range(40):
            consumed.append(i)
            yield i, f"p{i}", "a", 5 + (i % 2)  # alternate lengths

    seen = []
    zeros = lambda ps: [0] * len(ps)
    for batch in _batches(((i, p, a) for i, p, a, _ in items()), 4, 2, True, zeros):
        seen.append(batch)
        assert len(consumed) <= 4 * 2 * (len(seen) + 1)  # at most one window ahead
    assert sorted(b[0] for batch in seen for b in batch) == list(range(40))
    # with real lengths every batch of a window holds one length
    lengths = {f"p{i}": 5 + (i % 2) for i in range(40)}
    by_prompt = lambda ps: [lengths[p] for p in ps]
    batches = list(_batches(((i, f"p{i}", "a") for i in range(40)), 4, 2, True, by_prompt))
    assert all(len({b[3] for b in batch}) == 1 for batch in batches)
    batches = list(_batches(((i, f"p{i}", "a") for i in range(40)), 4, 2, False, by_prompt))
    assert [b[0] for batch in batches for b in batch] == list(range(40))
    assert all(len({b[3] for b in batch}) == 2 for batch in batches)


class FakeDataset:
    """A ``datasets.Dataset`` look-alike: ``len()`` and rows as dicts."""

    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __iter__(self):
        return iter(self.rows)


def test_dict_rows_and_columns(model, reference, capsys):
    rows = [{"question": p, "label": a, "id": i} for i, (p, a) in enumerate(TASK)]
    res = tp.explain_task(
        model, FakeDataset(rows), columns=("question", "label"), bucket=False, **SPLIT
    )
    assert torch.equal(res.values, reference.values)
    err = capsys.readouterr().err
    assert f"{len(TASK)}/{len(TASK)}" in err and "prompt/s" in err  # total known: rate + ETA


def test_parquet_round_trip(model, reference, tmp_path):
    path = tmp_path / "terms.parquet"
    K = 6
    st = tp.explain_task(
        model,
        iter(TASK),
        keep="stats",
        parquet=path,
        parquet_k=K,
        batch_size=5,
        progress=False,
        **SPLIT,
    )
    assert st.meta["parquet"] == str(path)
    df = pd.read_parquet(path)
    assert len(df) == len(TASK) * (K + 1)
    assert sorted(df["index"].unique()) == list(range(len(TASK)))
    names = np.asarray([str(c) for c in reference.components])
    constant = reference.components.is_constant()
    V = reference.values.double().numpy()
    tol = atol(reference)
    for i, rows in df.groupby("index"):
        rows = rows.sort_values("rank")
        assert rows["prompt"].iloc[0] == TASK[i][0] and rows["answer"].iloc[0] == TASK[i][1]
        assert abs(rows["logit"].iloc[0] - float(reference.logits[i])) <= tol
        kept = rows[rows["kind"] != "rest"]
        assert list(kept["rank"]) == list(range(K))
        assert not set(kept["component"]) & set(names[constant])
        ref = dict(zip(names, V[i]))
        got = kept["value"].to_numpy()
        want = np.array([ref[c] for c in kept["component"]])
        assert np.abs(got - want).max() <= tol  # the same terms (bucketed batches)
        assert np.all(np.diff(np.abs(got)) <= tol)  # by |value|, largest first
        # nothing outside the kept ones is larger than the smallest kept one
        others = np.abs(V[i][~constant & ~np.isin(names, kept["component"])])
        assert others.max() <= np.abs(got).min() + tol
        rest = rows[rows["kind"] == "rest"]
        assert list(rest["component"]) == [REST]
        assert abs(rows["value"].sum() - rows["logit"].iloc[0]) <= tol
    import pyarrow.parquet as pq

    run = json.loads(pq.read_metadata(path).metadata[RUN_KEY.encode()])
    assert run["complete"] is True and run["prompts"] == len(TASK) and run["k"] == K


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_interrupted_stream_leaves_readable_parquet(model, tmp_path, exc):
    path = tmp_path / "part.parquet"

    def rows():
        for i, row in enumerate(TASK):
            if i == 13:
                raise exc("stop")
            yield row

    with pytest.raises(exc):
        tp.explain_task(
            model,
            rows(),
            keep="stats",
            parquet=path,
            parquet_k=3,
            batch_size=4,
            window=1,
            progress=False,
        )
    df = pd.read_parquet(path)
    assert sorted(df["index"].unique()) == list(range(12))  # the 3 batches completed
    assert len(df) == 12 * 4
    import pyarrow.parquet as pq

    run = json.loads(pq.read_metadata(path).metadata[RUN_KEY.encode()])
    assert run["complete"] is False and run["prompts"] == 12


def test_stats_merge_and_check(model, reference):
    # the reference's batches of 16, in task order
    a = tp.explain_task(model, TASK[:16], keep="stats", bucket=False, progress=False, **SPLIT)
    b = tp.explain_task(model, TASK[16:], keep="stats", bucket=False, progress=False, **SPLIT)
    both = a.merge(b)
    assert both.n == len(TASK) and both.meta["prompts"] == len(TASK)
    assert_same_summary(reference.summary(k=10), both.summary(k=10), 10)
    assert "TaskStats(53 prompts" in repr(both) and "<svg" in both._repr_html_()
    with pytest.raises(ArgumentError, match=r"k=3 was not counted.*frac_top=\(3,\)"):
        both.summary(k=3)
    three = tp.explain_task(model, TASK[:5], keep="stats", frac_top=3, progress=False)
    assert three.frac_top == (3,) and "frac_top3" in three.summary(k=3)
    from dataclasses import replace

    broken = replace(both, stats=replace(both.stats, max_gap_ratio=1.0, max_gap=2.0))
    with pytest.raises(CompletenessError, match="miss its logit"):
        broken.check()


BAD_ROWS = [
    ("3-tuple", (TASK[0][0], TASK[0][1], "x"), ArgumentError, r"item 3 is a 3-item tuple"),
    ("a bare string", "The capital of", ArgumentError, r"item 3 is 'The capital of'"),
    ("dict without answer", {"prompt": "1+1="}, ArgumentError, r"item 3 .*key 'answer'"),
    ("empty prompt", ("", " 2"), ArgumentError, r"prompt of item 3 is ''"),
    ("int prompt", (7, " 2"), ArgumentError, r"prompt of item 3 is 7"),
    ("None answer", ("1+1=", None), TargetError, r"item 3: the answer None"),
    ("float answer", ("1+1=", 2.0), TargetError, r"item 3: the answer 2.0 \(type float\)"),
    ("unknown word", ("1+1=", " Zebra"), TargetError, r"item 3: .*Zebra"),
    ("multi-token", ("1+1=", " 9 9"), TargetError, r"item 3: .*2 tokens"),
    ("id out of vocab", ("1+1=", 10**6), TargetError, r"item 3: .*outside the vocabulary"),
]


@pytest.mark.parametrize("row,error,match", [b[1:] for b in BAD_ROWS], ids=[b[0] for b in BAD_ROWS])
def test_bad_row_names_its_index(model, row, error, match):
    def rows():
        yield from TASK[:3]
        yield row
        yield from TASK[3:]

    with pytest.raises(error, match=match):
        tp.explain_task(model, rows(), keep="stats", progress=False)


BAD_ARGS = [
    ("keep", {"keep": "all"}, ArgumentError, r"keep='all'"),
    ("frac_top 0", {"frac_top": 0}, ArgumentError, r"frac_top=0"),
    ("frac_top ()", {"frac_top": ()}, ArgumentError, r"frac_top=\(\)"),
    ("parquet 5", {"parquet": 5}, ArgumentError, r"parquet=5"),
    ("parquet_k 0", {"parquet_k": 0}, ArgumentError, r"parquet_k=0"),
    ("window 0", {"window": 0}, ArgumentError, r"window=0"),
    ("bucket 1", {"bucket": 1}, ArgumentError, r"bucket=1"),
    ("columns", {"columns": ["p", "a"]}, ArgumentError, r"columns=\['p', 'a'\]"),
    ("distributed 'yes'", {"distributed": "yes"}, ArgumentError, r"distributed='yes'"),
    ("distributed w/o group", {"distributed": True}, ArgumentError, r"init_process_group"),
]


@pytest.mark.parametrize("kw,error,match", [b[1:] for b in BAD_ARGS], ids=[b[0] for b in BAD_ARGS])
def test_bad_arguments(model, kw, error, match):
    with pytest.raises(error, match=match):
        tp.explain_task(model, iter(TASK[:2]), progress=False, **kw)


def test_not_iterable_and_no_prompts(model):
    with pytest.raises(ArgumentError, match="int is not iterable"):
        tp.explain_task(model, 5)
    with pytest.raises(ArgumentError, match="no prompts"):
        tp.explain_task(model, iter([]), keep="stats", progress=False)
    with pytest.raises(ArgumentError, match="no prompts"):
        tp.explain_task(model, [], progress=False)


# ------------------------------------------------------------------ the per-batch kernel

KERNEL_SPLITS = {
    "all": {"heads": "all", "neurons": "all"},
    "heads1": {"heads": [1], "neurons": ()},
    "whole": {"heads": (), "neurons": ()},
}


def kernel_vs_decompose(model, tokens, targets, pos, split, softcap="post"):
    """The kernel's terms (on a trusted prism) and ``decompose``'s (on a checked one)."""
    names = needed_hooks(model, ("residual", "heads", "neurons"))
    with torch.no_grad():
        out, cache = model.run_with_cache(tokens, names_filter=names)
    prism = tp.LogitPrism(model, cache, logits=out)
    kw = dict(by_source=False, softcap=softcap, **split)
    r = prism.decompose(tp.PerRow(targets), pos, **kw)
    view = ModelView(model)
    plan = split_of(prism.view, split["heads"], split["neurons"], False, "test")
    kernel = TaskKernel(view, prism.recorded.cache, plan, softcap, r.components)
    trusted = tp.LogitPrism.trusted(view, cache, out, "test")
    values, explained, gap, explains = kernel(trusted.recorded, targets, pos)
    refuse_broken(trusted.recorded.cache, values, explained, gap)
    return r, values, explained, explains


@pytest.mark.parametrize("split", list(KERNEL_SPLITS))
@pytest.mark.parametrize("case_key", [c.values[0] for c in CASES], ids=[c.id for c in CASES])
def test_kernel_equals_decompose_bit_for_bit(case_key, split):
    """explain_task's kernel gives decompose's values and logits exactly, on every family
    (folded and not), for batches of 3 rows and of 1 row (the other einsum branch)."""
    case = build_case(*case_key)
    targets, pos = [5, 6, 7], [2, 6, 4]
    softcaps = ["post", "pre"] if ModelView(case.model).softcap is not None else ["post"]
    for softcap in softcaps:
        for rows in (slice(None), slice(1, 2)):
            r, values, explained, explains = kernel_vs_decompose(
                case.model,
                case.tokens[rows],
                targets[rows],
                pos[rows],
                KERNEL_SPLITS[split],
                softcap,
            )
            assert explains == r.explains
            assert torch.equal(values, r.values) and torch.equal(explained, r.logits)


def test_task_kernel_equals_decompose_path(model, monkeypatch):
    """The whole task with the kernel and with decompose on every batch (the kernel turned
    off): the same values, and the same running statistics, bit for bit."""
    import tlprisms._tasks.task as task_module

    rows = TASK[:20] + [(TASK[20][0], tp.LogitDiff(" 5", " 6"))] + TASK[21:]
    run = lambda keep: tp.explain_task(
        model, iter(rows), keep=keep, batch_size=6, progress=False, **SPLIT
    )
    fast_values, fast_stats = run("values"), run("stats")
    assert fast_values.meta["kernel"] and fast_stats.meta["kernel"]
    monkeypatch.setattr(task_module, "_kernel", lambda *a: None)
    slow_values, slow_stats = run("values"), run("stats")
    assert not slow_values.meta["kernel"]
    assert torch.equal(fast_values.values, slow_values.values)
    assert torch.equal(fast_values.logits, slow_values.logits)
    a, b = fast_stats.stats, slow_stats.stats
    for name in ("mean", "m2", "min", "max", "sum_abs", "sum_share"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.tops.keys() == b.tops.keys()
    assert all(torch.equal(a.tops[key], b.tops[key]) for key in a.tops)
    assert (a.n, a.n_share, a.max_gap, a.max_gap_ratio, a.max_abs_logit) == (
        b.n,
        b.n_share,
        b.max_gap,
        b.max_gap_ratio,
        b.max_abs_logit,
    )


def test_stats_stream_equals_batch_merges():
    """StatsStream.add gives RunningStats.of_batch(...) merged batch after batch, bit for
    bit (float64 Chan updates in the same order, integer top-k counts)."""
    gen = torch.Generator().manual_seed(3)
    constant = torch.zeros(40, dtype=torch.bool)
    constant[[0, 7, 39]] = True
    ks = (3, 5)
    stream, total = StatsStream(constant, ks), None
    for n in (6, 1, 9, 4):
        v = torch.randn(n, 40, generator=gen) * 3
        lg = v.sum(1) + 1e-7 * torch.randn(n, generator=gen)
        if n == 9:
            lg[0] = 0.0  # a logit without a share (other batches: all have one)
        stream.add(v, lg)
        part = RunningStats.of_batch(v, lg, constant, ks)
        total = part if total is None else total.merge(part)
    got = stream.result()
    assert got is not None and total is not None
    for name in ("mean", "m2", "min", "max", "sum_abs", "sum_share"):
        assert torch.equal(getattr(got, name), getattr(total, name)), name
    assert got.tops.keys() == total.tops.keys()
    assert all(torch.equal(got.tops[key], total.tops[key]) for key in got.tops)
    for name in ("n", "n_share", "max_gap", "max_gap_ratio", "max_abs_logit"):
        assert getattr(got, name) == getattr(total, name), name
    assert StatsStream(constant, ks).result() is None


def test_window_lengths_equal_one_by_one(model):
    """Token lengths read off one right-padded window equal one-by-one tokenization,
    prompts holding the pad token's own text included."""
    view = ModelView(model)
    pad = view.tokenizer().pad_token
    prompts = [p for p, _ in TASK[:9]] + [f"1+1={pad}", f"{pad} 2+2=", "7"]
    lengths = _Lengths(view, view.tokenizer(), {})
    assert lengths.batched
    want = [int(model.to_tokens(p).shape[-1]) for p in prompts]
    assert lengths(prompts) == want and lengths.batched
    assert lengths(prompts[::-1]) == want[::-1]


class PadEndingTokens:
    """A model whose one-prompt tokenization ends in the pad token (a tokenizer that
    appends an EOS that is also its pad token): batched lengths would drop it. Seen through
    the seam's ``ModelView.tokenize``."""

    def tokenize(self, prompts, padding_side=None):
        words = [prompts] if isinstance(prompts, str) else prompts
        L = max(len(w.split()) for w in words) + 1
        rows = [[5] * len(w.split()) + [0] * (L - len(w.split())) for w in words]
        return torch.tensor(rows)


class PadTokenizer:
    pad_token_id, pad_token = 0, "<pad>"


def test_window_lengths_fall_back_when_the_first_window_differs():
    lengths = _Lengths(PadEndingTokens(), PadTokenizer(), {})
    prompts = ["a b", "a b c d", "a"]
    assert lengths(prompts) == [3, 5, 2]  # what one-by-one to_tokens gives
    assert not lengths.batched  # and every later window is tokenized one by one
    assert lengths(["a b c"]) == [4]


def test_non_finite_later_batch_names_its_hook(model):
    """A later batch (kernel, trusted prism) whose forward pass wrote NaN is refused with
    the hook that first held it."""
    name = ModelView(model).hook(Site.MLP_OUT, 0)
    seen = []

    def poison(x, hook):
        seen.append(1)
        if len(seen) == 3:  # the third batch
            x = x.clone()
            x[1, 0, 0] = torch.nan
        return x

    with model.hooks(fwd_hooks=[(name, poison)]):
        with pytest.raises(NonFiniteError, match=rf"{name}.*batch 1, position 0"):
            tp.explain_task(model, iter(TASK), keep="stats", batch_size=4, progress=False)
    assert len(seen) == 3


def test_left_padding_model_reads_each_prompt_at_its_own_last_token():
    """A model whose default padding side is left: the task still right-pads its batches,
    so each prompt of a mixed-length batch is read at its own last token and equals the
    prompt explained alone."""
    import copy

    model = copy.deepcopy(load_demo_model())
    model.cfg.default_padding_side = "left"
    if getattr(model, "tokenizer", None) is not None:
        model.tokenizer.padding_side = "left"
    prompts, answers = zip(*TASK)
    lens = {int(model.to_tokens(p).shape[-1]) for p in prompts}
    assert len(lens) > 1, "the task must mix prompt lengths"
    batched = tp.explain_task(model, list(prompts), list(answers), progress=False, batch_size=8)
    alone = tp.explain_task(model, list(prompts), list(answers), progress=False, batch_size=1)
    torch.testing.assert_close(batched.values, alone.values, rtol=0, atol=atol(alone))
    torch.testing.assert_close(batched.logits, alone.logits, rtol=0, atol=atol(alone))
