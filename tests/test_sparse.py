"""Sparse results (``top_k=`` / ``min_abs=``): the kept terms are the dense terms bit for
bit, each remainder is the dense sum of what its (kind, layer) dropped, totals stay exact."""

import numpy as np
import pytest
import torch

import tlprisms as tp
from tlprisms._core import sparse as _sparse
from tlprisms._core.result import Decomposition
from tlprisms._core.table import KINDS
from tlprisms.errors import ArgumentError

from conftest import BATCH, SEQ, build_case

TOP_K = 3
#: chunked vs one-block terms: the same products, possibly blocked differently (float32)
CHUNK_RTOL = 1e-6
TARGET = [7, tp.LogitDiff(" Paris", " Rome")]  # a token and a logit difference (two atoms)


def assert_sparse_of(s: Decomposition, d: Decomposition, top_k=None, min_abs=None) -> None:
    """``s`` is ``d`` made sparse: kept terms equal, remainders sum what was dropped."""
    assert s.is_sparse and not d.is_sparse
    s.check()
    n = len(d.components)
    c = s.components
    for f in ("kind", "layer", "head", "neuron", "src", "at"):
        assert np.array_equal(getattr(c, f)[:n], getattr(d.components, f))
    assert set(c.kinds()[n:]) <= {"rest"}
    idx, v = s.index, s.values
    kept = (idx >= 0) & (idx < n)
    gathered = d.values.gather(-1, idx.clamp(0, n - 1))
    assert torch.equal(torch.where(kept, v, 0.0), torch.where(kept, gathered, 0.0))
    assert bool((v[idx < 0] == 0).all())
    # every constant is kept at every (batch, pos, target)
    const = np.nonzero(d.components.is_constant())[0]
    for j in const:
        assert bool(((idx == int(j)).sum(-1) == 1).all())
    # which dense terms were dropped
    hits = torch.zeros(d.values.shape, dtype=torch.long, device=d.values.device)
    keep_dense = hits.scatter_add_(-1, torch.where(kept, idx, 0), kept.long()) > 0
    free = torch.as_tensor(~d.components.is_constant(), device=d.values.device)
    dropped = free & ~keep_dense
    tol = d.tolerance()
    # the remainders: the dense sum of the dropped terms of their (kind, layer)
    for g in range(n, len(c)):
        members = torch.as_tensor(
            (d.components.kind == KINDS.index(c[g].of)) & (d.components.layer == c.layer[g]),
            device=d.values.device,
        )
        want = torch.where(dropped & members, d.values, 0.0).sum(-1)
        slot = idx == g
        assert bool((slot.sum(-1) == 1).all())
        got = (v * slot).sum(-1)
        assert bool(((got - want).abs() <= tol).all())
    # the kept terms are the largest (and at least min_abs)
    counts = (
        kept
        & torch.as_tensor(np.isin(np.arange(n), const, invert=True), device=idx.device)[
            idx.clamp(0, n - 1)
        ]
    ).sum(-1)
    n_free = int(free.sum())
    if top_k is not None and min_abs is None:
        assert bool((counts == min(top_k, n_free)).all())
    absd = d.values.abs()
    smallest_kept = torch.where(keep_dense & free, absd, float("inf")).amin(-1)
    largest_dropped = torch.where(dropped, absd, -1.0).amax(-1)
    assert bool((smallest_kept >= largest_dropped).all())
    if min_abs is not None:
        assert bool((largest_dropped[counts < (top_k or n_free)] < min_abs).all())
        assert bool((smallest_kept >= min_abs).all())
    # totals: the dense totals, to the dense tolerance
    assert bool(((s.total() - d.total()).abs() <= tol).all())
    assert torch.equal(s.logits, d.logits)


@pytest.mark.parametrize("prism", ["residual", "heads", "neurons", "full"])
def test_sparse_equals_dense_last_position(case, prism):
    fn = getattr(case.prism, prism)
    assert_sparse_of(fn(TARGET, top_k=TOP_K), fn(TARGET), top_k=TOP_K)


#: the families the fast pos="all" test runs on (every family: the slow one)
ALL_POS_FAST = [("gpt2/bridge", True), ("gemma2/bridge", False)]


@pytest.mark.parametrize("which", ALL_POS_FAST, ids=lambda w: f"{w[0]}-{w[1]}")
def test_sparse_all_positions_chunked_fast(which, monkeypatch):
    test_sparse_all_positions_chunked(build_case(*which), monkeypatch)


@pytest.mark.slow
def test_sparse_all_positions_chunked(case, monkeypatch):
    """pos="all": one position per chunk (the smallest chunks) gives the same result."""
    dense = case.prism.full(tp.NextToken(), pos="all")
    whole = case.prism.full(tp.NextToken(), pos="all", top_k=TOP_K)
    assert_sparse_of(whole, dense, top_k=TOP_K)
    monkeypatch.setattr(_sparse, "CHUNK_BYTES", 1)
    monkeypatch.setattr(_sparse, "CHUNK_BYTES_CUDA", 1)
    chunked = case.prism.full(tp.NextToken(), pos="all", top_k=TOP_K)
    assert chunked.values.shape == (BATCH, SEQ, 1, whole.values.shape[-1])
    # the same terms kept; values to float rounding (a chunk's matrix products may block
    # differently from the whole block's, so the last bit can differ)
    assert torch.equal(chunked.index, whole.index)
    err = (chunked.values - whole.values).abs()
    assert bool((err <= CHUNK_RTOL * whole.values.abs() + whole.tolerance()[..., None]).all())
    chunked.check()


def test_sparse_decompose_min_abs(case):
    p = case.prism
    dense = p.decompose(TARGET, heads=[0], neurons="all")
    cut = float(dense.values.abs().median())
    assert_sparse_of(p.decompose(TARGET, heads=[0], neurons="all", min_abs=cut), dense, min_abs=cut)
    both = p.decompose(TARGET, heads=[0], neurons="all", top_k=2, min_abs=cut)
    assert_sparse_of(both, dense, top_k=2, min_abs=cut)


def test_top_k_beyond_the_components_is_the_dense_result(case):
    dense = case.prism.heads(TARGET)
    s = case.prism.heads(TARGET, top_k=10**6)
    assert_sparse_of(s, dense, top_k=10**6)
    rest = s.select(kind="rest")
    assert bool((rest.values == 0).all())
    back = s.to_dense().select(kind=[k for k in KINDS if k != "rest"])
    assert torch.equal(back.values, dense.values)


def test_chains_with_top_k(case):
    p = case.prism
    dense = p.through_head(1, 0, 7, heads="all", neurons="all")
    assert_sparse_of(p.through_head(1, 0, 7, heads="all", neurons="all", top_k=4), dense, 4)
    if not p.view.attn_only:
        dense = p.through_neuron(1, 3, TARGET)
        assert_sparse_of(p.through_neuron(1, 3, TARGET, top_k=2), dense, top_k=2)
    path = [tp.Hop("head", 1, 0, src=3), tp.Hop("head", 0, 1)]
    assert_sparse_of(p.chain(7, path, heads="all", top_k=2), p.chain(7, path, heads="all"), 2)


def test_readout_with_top_k(case):
    p = case.prism
    u = torch.ones(2, p.view.d_model)
    dense = p.readout(u, 1, pos="all", heads="all")
    assert_sparse_of(p.readout(u, 1, pos="all", heads="all", top_k=3), dense, top_k=3)


# ----------------------------------------------------------------------------- the API
@pytest.fixture(scope="module")
def demo():
    from tlprisms.demo import load_demo_model

    return tp.LogitPrism.run(load_demo_model(), "The capital of France is a city")


def test_sparse_result_api(demo):
    dense = demo.full(tp.NextToken(), pos="all")
    s = demo.full(tp.NextToken(), pos="all", top_k=5)
    # labels of the remainders
    rest = s.select(kind="rest")
    names = {str(x) for x in rest.components}
    assert {"L0.heads (rest)", "L1.neurons (rest)", "embed (rest)"} <= names
    assert not rest.complete and rest.values.shape[-1] == s.values.shape[-1]
    assert set(rest.to_frame()["kind"]) == {"rest"}
    assert set(s.select(of="neuron").to_frame()["of"]) == {"neuron"}
    # aggregate stays complete and exact; per layer it is dense
    agg = s.aggregate("kind", "layer")
    assert not agg.is_sparse and agg.complete
    agg.check()
    assert torch.allclose(agg.total(), dense.total(), atol=1e-5)
    per_head = s.aggregate("kind", "layer", "head")
    per_head.check()
    # a wide regrouping (heads x sources kept) stays slots
    same = s.aggregate("kind", "layer", "head", "neuron", "src", "at")
    assert same.is_sparse
    same.check()
    assert torch.allclose(same.total(), s.total())
    # to_frame lists the kept slots only, and they add up
    f = s.to_frame()
    assert len(f) == int((s.index >= 0).sum())
    sums = f.groupby(["batch", "pos"])["value"].sum().to_numpy()
    assert np.allclose(sums, s.total()[0, :, 0].numpy(), atol=1e-4)
    # top: one position matches the dense top-5 exactly
    t_s = s.top(5, batch=0, pos=3, kind="neuron")
    t_d = dense.top(5, batch=0, pos=3, kind="neuron")
    assert list(t_s["component"]) == list(t_d["component"])
    assert np.array_equal(t_s["value"].to_numpy(), t_d["value"].to_numpy())
    assert "(sparse: up to" in repr(s) and "(rest)" in repr(s)
    # after select, the components counted are those kept, and no more slots than them
    sel = s.select(kind="neuron")
    n_kept = int((sel.index >= 0).sum(-1).max())
    assert f"{len(sel.components)} components (sparse: up to {n_kept} kept" in repr(sel)
    assert n_kept <= len(sel.components)
    # the dense view keeps the sparse totals
    d = s.to_dense()
    d.check()
    assert torch.allclose(d.total(), s.total())
    # rendering goes through the dense view
    from tlprisms import render

    assert "<" in render.to_html(s)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"top_k": 0}, "top_k=0; keep at least 1"),
        ({"top_k": -3}, "top_k=-3; keep at least 1"),
        ({"top_k": True}, "top_k=True (type bool)"),
        ({"top_k": 2.5}, "top_k=2.5 (type float)"),
        ({"top_k": "8"}, "top_k='8' (type str)"),
        ({"min_abs": -0.1}, "min_abs=-0.1; pass a finite number >= 0"),
        ({"min_abs": float("nan")}, "min_abs=nan"),
        ({"min_abs": True}, "min_abs=True"),
        ({"min_abs": "1"}, "min_abs='1'"),
    ],
)
@pytest.mark.parametrize(
    "call",
    [
        lambda p, kw: p.residual(" Paris", **kw),
        lambda p, kw: p.heads(" Paris", **kw),
        lambda p, kw: p.neurons(" Paris", **kw),
        lambda p, kw: p.full(" Paris", pos="all", **kw),
        lambda p, kw: p.decompose(" Paris", heads=[1], **kw),
        lambda p, kw: p.chain(" Paris", [tp.Hop("head", 1, 0)], **kw),
        lambda p, kw: p.through_head(1, 0, " Paris", **kw),
        lambda p, kw: p.through_neuron(1, 3, " Paris", **kw),
        lambda p, kw: p.readout(torch.ones(p.view.d_model), 1, **kw),
    ],
    ids=[
        "residual",
        "heads",
        "neurons",
        "full",
        "decompose",
        "chain",
        "through_head",
        "through_neuron",
        "readout",
    ],
)
def test_bad_sparse_arguments(demo, call, kwargs, fragment):
    with pytest.raises(ArgumentError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        call(demo, kwargs)


def test_sparsify_helper_on_a_dense_block(demo):
    """The helper a new prism uses: dense chunk + table -> slots with remainders."""
    d = demo.heads(" Paris", pos="all")
    st, table = _sparse.sparse_result(d.values, d.components, 2, None)
    s = Decomposition(
        values=st.values,
        components=table,
        logits=d.logits,
        positions=d.positions,
        target_labels=d.target_labels,
        index=st.index,
    )
    assert_sparse_of(s, d, top_k=2)
