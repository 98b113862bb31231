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
from tlprisms._errors import ArgumentError, CompletenessError, TargetError
from tlprisms._parquet import REST, RUN_KEY
from tlprisms._result import tolerance
from tlprisms.demo import addition_task, capital_task, load_demo_model
from tlprisms.task import TaskStats, _batches

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
