"""Chained prisms, residual readouts, weight-space prisms and task analysis.

Completeness at every hop on every family, causal checks of chained terms by intervention
(scales, patterns and gates frozen by hooks), a designed mechanism that the chain must
recover, and weight-space results against an independent computation.
"""

import numpy as np
import pytest
import torch

import tlprisms as tp
from tlprisms import weights
from tlprisms._core.table import FIELDS, KINDS
from tlprisms.errors import CompletenessError, NonFiniteError, PrismError, TargetError

from conftest import CASES, SEQ, build_case

#: a chained total vs the term it splits (two float32 contraction orders)
HOP_ATOL = 2e-5
#: intervention vs chained term, relative to max(1, |logit|)
CAUSAL_RTOL = 5e-5


def test_through_head_totals_the_head_term(case):
    p = case.prism
    per_head = p.heads(7).aggregate("layer", "head")
    for layer, head in [(1, 2), (0, 1)]:
        th = p.through_head(layer, head, 7, heads=None, neurons=None, by_source=True)
        th.check()
        ref = per_head.select(kind="head", layer=layer, head=head).values.sum(-1)
        assert torch.allclose(th.total(), ref, atol=HOP_ATOL)
        assert set(th.components.at.tolist()) <= set(range(SEQ))
        if layer == 0:  # nothing but embeddings (and constants) feed layer 0
            assert set(th.components.kinds()) <= {"embed", "pos_embed", "b_V", "ln.b"}


def test_through_head_single_source(case):
    p = case.prism
    full = p.through_head(1, 2, 7)
    one = p.through_head(1, 2, 7, src=3)
    assert torch.allclose(one.total(), full.select(pos=3).values.sum(-1), atol=HOP_ATOL)


def test_through_neuron_totals_the_neuron_term(case):
    p = case.prism
    if p.view.attn_only:
        pytest.skip("no MLPs")
    n = p.neurons(7)
    for layer, neuron in [(1, 5), (0, 17)]:
        tn = p.through_neuron(layer, neuron, 7, heads=None, neurons=None)
        tn.check()
        ref = n.select(kind="neuron", layer=layer, neuron=neuron).values.sum(-1)
        assert torch.allclose(tn.total(), ref, atol=HOP_ATOL)


def test_two_hop_chains_compose(case):
    p = case.prism
    hop1 = p.through_head(1, 2, 7, heads=None, by_source=True)
    chain = p.chain(7, [tp.Hop("head", 1, 2, src=4), tp.Hop("head", 0, 1)])
    chain.check()
    ref = hop1.select(pos=4, kind="head", layer=0, head=1).values.sum(-1)
    assert torch.allclose(chain.total(), ref, atol=HOP_ATOL)
    if not p.view.attn_only:
        hop_n = p.through_neuron(1, 3, 7, neurons=None)
        chain_n = p.chain(7, [tp.Hop("neuron", 1, 3), tp.Hop("neuron", 0, 9)])
        chain_n.check()
        ref_n = hop_n.select(kind="neuron", layer=0, neuron=9).values.sum(-1)
        assert torch.allclose(chain_n.total(), ref_n, atol=HOP_ATOL)


def test_readout_of_a_neuron_preactivation_matches_the_cache(case):
    p = case.prism
    view = p.view
    if view.attn_only or view.act_fn == "solu_ln":
        pytest.skip("no plain pre-activation to compare")
    layer, n = 1, 5
    mlp = case.model.blocks[layer].mlp
    W_in = mlp.W_in.detach()[:, n]
    hook = "hook_pre_linear" if view.gated else "hook_pre"
    bias = (
        None
        if (view.gated and not view.is_bridge)
        else view.b_in(layer, torch.float32, W_in.device)[n]
    )
    r = p.readout(W_in, layer, at="ln2", bias=bias, heads=None, neurons=[0])
    r.check()
    cached = case.cache[f"blocks.{layer}.mlp.{hook}"][:, -1, n]
    assert torch.allclose(r.logits[:, 0, 0], cached, atol=1e-4, rtol=1e-4)


def test_readout_at_ln_final_is_the_pre_cap_logit(case):
    p = case.prism
    col = case.model.W_U[:, 7].detach()
    r = p.readout(col, p.view.n_layers - 1, at="ln_final")
    ref = p.residual(7, softcap="pre")
    b_U = ref.select(kind="b_U").values.sum(-1)
    assert torch.allclose(r.total() + b_U, ref.total(), atol=HOP_ATOL)


def test_chain_errors(case):
    p = case.prism
    with pytest.raises(PrismError, match="head 9 is out of range"):
        p.through_head(0, 9, 7)
    with pytest.raises(PrismError, match="layer 7 is out of range"):
        p.through_head(7, 0, 7)
    with pytest.raises(PrismError, match="needs src"):
        p.chain(7, [tp.Hop("head", 1, 2), tp.Hop("head", 0, 1)])
    with pytest.raises(PrismError, match="chain toward earlier layers"):
        p.chain(7, [tp.Hop("head", 0, 2, src=1), tp.Hop("head", 1, 1)])
    with pytest.raises(PrismError, match="pos='all'"):
        p.through_head(1, 0, tp.NextToken(), pos="all")
    if not p.view.attn_only:
        with pytest.raises(PrismError, match="neuron 99999 is out of range"):
            p.through_neuron(0, 99999, 7)


# ----------------------------------------------------------------------------- causal
def _z(view, logits):
    return logits if view.softcap is None else view.softcap * torch.atanh(logits / view.softcap)


def _remover(w: torch.Tensor, b: int, pos: int):
    """A hook that subtracts ``w`` from the residual stream at (b, pos)."""

    def remove(x, hook):
        x = x.clone()
        x[b, pos] -= w.to(x.dtype)
        return x

    return remove


def _direct_logit_change(case, delta: torch.Tensor, b: int, i: int, t: int) -> float:
    """Remove ``delta`` from the final residual at (b, i), final scale frozen: the logit change."""
    view = case.prism.view
    scale = case.cache["ln_final.hook_scale"]

    with torch.no_grad():
        new = case.model.run_with_hooks(
            case.tokens,
            fwd_hooks=[
                (f"blocks.{view.n_layers - 1}.hook_resid_post", _remover(delta, b, i)),
                ("ln_final.hook_scale", lambda x, hook: scale.to(x.dtype)),
            ],
        )
    return float(_z(view, case.logits[b, i, t]) - _z(view, new[b, i, t]))


def _through_post(view, post, v, b, i, cache):
    if post is None:
        return v
    return post.weight * v / cache[view.hook(post.site, post.layer)][b, i]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_chained_head_term_by_intervention(case):
    """Remove the embedding at source j from what head (1, 2) reads (its ln1 scale and
    pattern frozen), then carry the change of its output to the logit (final scale frozen)."""
    view, cache, model = case.prism.view, case.cache, case.model
    b, i, layer, head = 0, SEQ - 1, 1, 2
    t = 4 + int(case.logits[b, i, 4:].abs().argmin())
    th = case.prism.through_head(layer, head, t, softcap="pre")
    embeds = th.select(kind="embed")
    j = int(embeds.components.at[int(embeds.values[b, 0, 0].abs().argmax())])
    term = float(embeds.select(pos=j).values[b, 0, 0].sum())
    remove = _remover(cache["hook_embed"][b, j], b, j)
    captured = {}

    def grab(x, hook):
        captured["z"] = x.detach().clone()

    with torch.no_grad():
        model.run_with_hooks(
            case.tokens,
            fwd_hooks=[
                (f"blocks.{layer}.hook_resid_pre", remove),
                (f"blocks.{layer}.ln1.hook_scale", lambda x, hook: cache[hook.name].to(x.dtype)),
                (f"blocks.{layer}.attn.hook_pattern", lambda x, hook: cache[hook.name].to(x.dtype)),
                (f"blocks.{layer}.attn.hook_z", grab),
            ],
        )
    dz = cache[f"blocks.{layer}.attn.hook_z"][b, i, head] - captured["z"][b, i, head]
    delta = _through_post(
        view, view.ln1_post[layer], dz @ model.blocks[layer].attn.W_O.detach()[head], b, i, cache
    )
    moved = _direct_logit_change(case, delta, b, i, t)
    tol = CAUSAL_RTOL * max(1.0, abs(float(_z(view, case.logits[b, i, t]))))
    assert abs(moved - term) <= tol, (moved, term)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_chained_neuron_term_by_intervention(case):
    """Remove the embedding from what neuron (1, 5) reads (ln2 scale and gate frozen)."""
    view, cache, model = case.prism.view, case.cache, case.model
    if view.attn_only or view.act_fn == "solu_ln":
        pytest.skip("SoLU couples neurons through its inner LayerNorm; covered by completeness")
    b, i, layer, n = 0, SEQ - 1, 1, 5
    t = 4 + int(case.logits[b, i, 4:].abs().argmin())
    tn = case.prism.through_neuron(layer, n, t, softcap="pre")
    term = float(tn.select(kind="embed").values[b, 0, 0].sum())
    w = cache["hook_embed"][b, i]
    lin = "hook_pre_linear" if view.gated else "hook_pre"
    post_c = cache[f"blocks.{layer}.mlp.hook_post"]
    lin_c = cache[f"blocks.{layer}.mlp.{lin}"]
    if view.gated:
        g = (
            post_c - (0 if view.is_bridge else view.b_in(layer, post_c.dtype, post_c.device))
        ) / lin_c
    else:
        g = post_c / lin_c
    captured = {}
    remove = _remover(w, b, i)

    def grab_linear(x, hook):
        captured["lin"] = x.detach().clone()

    def frozen_gate(x, hook):
        return post_c + g * (captured["lin"] - lin_c)

    where = "hook_resid_pre" if view.parallel else "hook_resid_mid"
    with torch.no_grad():
        model.run_with_hooks(
            case.tokens,
            fwd_hooks=[
                (f"blocks.{layer}.{where}", remove),
                (f"blocks.{layer}.ln2.hook_scale", lambda x, hook: cache[hook.name].to(x.dtype)),
                (f"blocks.{layer}.mlp.{lin}", grab_linear),
                (f"blocks.{layer}.mlp.hook_post", frozen_gate),
            ],
        )
    d_post = (post_c - frozen_gate(None, None))[b, i, n]
    delta = _through_post(
        view, view.ln2_post[layer], d_post * model.blocks[layer].mlp.W_out.detach()[n], b, i, cache
    )
    moved = _direct_logit_change(case, delta, b, i, t)
    tol = CAUSAL_RTOL * max(1.0, abs(float(_z(view, case.logits[b, i, t]))))
    assert abs(moved - term) <= tol, (moved, term)


# ----------------------------------------------------------------------------- designed mechanism
V, D, N_POS = 20, 64, 8
PERM = [(3 * a + 5) % V for a in range(V)]


def _designed_copy_model():
    """One layer, head 0 attends from every position to position 1 and its OV circuit maps
    token a to token PERM[a]; everything else is zero (GPT-2 architecture, tied unembedding)."""
    import transformers as tf
    from transformer_lens.model_bridge.sources import build_bridge_from_module

    cfg = tf.GPT2Config(vocab_size=V, n_embd=D, n_layer=1, n_head=2, n_positions=N_POS)
    hf = tf.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.zero_()
        tr = hf.transformer
        tr.wte.weight[torch.arange(V), torch.arange(V)] = 1.0
        tr.wpe.weight[torch.arange(N_POS), V + torch.arange(N_POS)] = 1.0
        for ln in (tr.h[0].ln_1, tr.h[0].ln_2, tr.ln_f):
            ln.weight.fill_(1.0)
        W, bias = tr.h[0].attn.c_attn.weight, tr.h[0].attn.c_attn.bias  # [D, 3D]: q | k | v
        bias[0] = 10.0  # head 0 query: constant
        W[V + 1, D + 0] = 10.0  # head 0 key: large only at position 1
        W[torch.arange(V), 2 * D + torch.arange(V)] = 1.0  # head 0 value: token identity
        O = tr.h[0].attn.c_proj.weight  # [D, D]
        O[torch.arange(V), torch.tensor(PERM)] = 5.0  # head 0 output: token a -> PERM[a]
    bridge = build_bridge_from_module(hf, "GPT2LMHeadModel", hf_config=cfg)
    bridge.enable_compatibility_mode(disable_warnings=True)
    return bridge


def test_chain_recovers_a_designed_mechanism():
    model = _designed_copy_model()
    tokens = torch.randint(0, V, (4, 6), generator=torch.Generator().manual_seed(3))
    logits, cache = model.run_with_cache(tokens)
    answers = torch.tensor([PERM[a] for a in tokens[:, 1].tolist()])
    assert (logits[:, -1].argmax(-1) == answers).all()
    prism = tp.LogitPrism(model, cache, tokens=tokens, logits=logits)
    per_head = prism.heads(answers).aggregate("layer", "head")
    assert str(per_head.top(1)["component"][0]) == "L0H0"
    th = prism.through_head(0, 0, answers).check()
    for b in range(4):
        assert th.top(1, batch=b)["component"][0] == "@1 embed"
    ov = weights.ov_map(model, 0, 0, list(range(V)), list(range(V)))
    assert [int(c[1:]) for c in ov.argmax_cols()] == PERM


# ----------------------------------------------------------------------------- weight space
@pytest.mark.parametrize("spec", [p for p in CASES if p.values[0][1]][:6])
def test_ov_map_matches_an_independent_computation(spec):
    case = build_case(*spec)
    model, view = case.model, case.prism.view
    layer, head, src, dst = 1, 3, [5, 6, 7], [8, 9, 10, 11]
    m = weights.ov_map(model, layer, head, src, dst)
    assert m.values.shape == (3, 4)
    with torch.no_grad():
        # the model's own ln1 module on the embeddings as hook_embed sees them
        e = (
            model.blocks[layer]
            .ln1(model.W_E[src].detach()[None] * view.embedding_scale())[0]
            .float()
        )
        g = head // (view.n_heads // view.n_kv_heads)
        W_V = model.blocks[layer].attn.W_V.detach()
        W_V = W_V[g] if W_V.shape[0] == view.n_kv_heads else W_V[head]
        ov = e @ W_V @ model.blocks[layer].attn.W_O.detach()[head]
        U = model.W_U.detach()[:, dst].T
        if view.final_norm.weight is not None:
            U = U * view.final_norm.weight
        if view.final_norm.centred:
            U = U - U.mean(-1, keepdim=True)
        if view.ln1_post[layer] is not None:
            U = U * view.ln1_post[layer].weight
        ref = ov @ U.T
    assert torch.allclose(m.values, ref, atol=1e-4, rtol=1e-4)


def test_neuron_templates_and_weighted_sum():
    case = build_case("gpt2/bridge", True)
    model = case.model
    acts = case.cache["blocks.1.mlp.hook_post"][0, -1, [3, 4]]
    m = weights.neuron_templates(model, 1, [3, 4], [" Paris", " Rome", 7], activations=acts)
    U = model.W_U.detach()[:, [4, 6, 7]]
    ref = model.blocks[1].mlp.W_out.detach()[[3, 4]] @ (U - U.mean(0, keepdim=True))
    assert torch.allclose(m.values, ref, atol=1e-5)
    assert torch.allclose(m.weighted_sum(), acts @ ref, atol=1e-5)
    assert m.cols == ["Paris", "Rome", "#7"] or m.cols[:2] == ["Paris", "Rome"]


def test_unembed_map_is_a_pca():
    case = build_case("llama/bridge", True)
    toks = list(range(10, 20))
    proj = weights.unembed_map(case.model, toks)
    U = case.model.W_U.detach()[:, toks].T.double()
    X = U - U.mean(0)
    gram = X @ X.T
    approx = proj.points.double() @ proj.points.double().T
    top2 = torch.linalg.eigvalsh(gram)[-2:].sum()
    assert abs(float(torch.trace(approx)) - float(top2)) < 1e-3 * float(top2)
    assert 0 < float(proj.explained_variance.sum()) <= 1


def test_weight_space_errors():
    model = build_case("gpt2/bridge", True).model
    with pytest.raises(PrismError, match="head 4 is out of range"):
        weights.ov_map(model, 0, 4, [1], [2])
    with pytest.raises(PrismError, match="layer 3 is out of range"):
        weights.neuron_templates(model, 3, [1], [2])
    with pytest.raises(PrismError, match=r"neuron 500 is out of range"):
        weights.neuron_templates(model, 1, [500], [2])
    with pytest.raises(TargetError, match="is empty"):
        weights.ov_map(model, 0, 0, [], [2])
    with pytest.raises(TargetError, match="2 tokens"):
        weights.ov_map(model, 0, 0, ["Paris London"], [2])
    with pytest.raises(TargetError, match="at least 3 tokens"):
        weights.unembed_map(model, [1, 2])


# ----------------------------------------------------------------------------- tasks
def test_explain_task_batches_and_aggregates():
    case = build_case("gpt2/bridge", True)
    model = case.model
    prompts = [
        "The capital of France is",
        "The capital is",
        "a Rome is",
        "The a",
        "Paris is the capital of France",
    ]
    answers = [" Paris", " Rome", tp.LogitDiff(" Paris", " London"), 7, " Berlin"]
    split = dict(heads="all", neurons="all")
    small = tp.explain_task(model, prompts, answers, batch_size=2, progress=False, **split).check()
    big = tp.explain_task(model, prompts, answers, batch_size=5, progress=False, **split).check()
    assert torch.allclose(small.values, big.values, atol=1e-5)
    single = tp.LogitPrism.run(model, prompts[1]).full(" Rome")
    per = single.aggregate("kind", "layer", "head", "neuron")
    assert torch.allclose(small.values[1], per.values[0, 0, 0], atol=1e-5)
    summary = small.summary(k=3)
    assert {"component", "mean", "std", "frac_top3", "mean_share"} <= set(summary.columns)
    assert len(small.to_frame()) == small.values.numel()
    small.decomposition().check()
    with pytest.raises(PrismError, match="5 prompts but 4 answers"):
        tp.explain_task(model, prompts, answers[:4], progress=False)


# ----------------------------------------------------------------------------- speed paths
# (what makes the two-hop chain benchmark fast must leave every value as it was)
@pytest.mark.parametrize("spec", [p for p in CASES if p.values[0][1]][:4])
def test_kept_chain_tables_equal_fresh_ones(spec):
    """A prism keeps its chained label tables: later calls (other heads, other targets)
    get the labels a fresh prism builds, and the kept columns are read-only."""
    case = build_case(*spec)
    kept = case.prism
    L = kept.view.n_layers
    kw = dict(heads="all", neurons="all", by_source=False)
    for head, target in [(0, 7), (1, 7), (1, 9), (0, 7)]:
        a = kept.through_head(L - 1, head, target, **kw)
        b = build_case(*spec).prism.through_head(L - 1, head, target, **kw)
        assert torch.equal(a.values, b.values) and torch.equal(a.logits, b.logits)
        for name in ("kind", *FIELDS):
            col = getattr(a.components, name)
            assert np.array_equal(col, getattr(b.components, name)), name
            assert not col.flags.writeable, name
        assert set(a.components.head[a.components.kinds() == "b_V"].tolist()) == {head}
    with pytest.raises(ValueError, match="read-only"):
        a.components.layer[0] = 5


@pytest.mark.parametrize("spec", [p for p in CASES if p.values[0][1]][:4])
def test_neuron_blocks_in_slices_are_bit_for_bit(spec, monkeypatch):
    """Writing a neuron block slice by slice gives exactly the one-pass products."""
    from tlprisms._core import engine as _engine

    case = build_case(*spec)
    if case.prism.view.attn_only:
        pytest.skip("no MLPs")
    L = case.prism.view.n_layers
    results = []
    monkeypatch.setattr(_engine, "_NEURON_SLICE_THREADS", 1)  # the same slices at any threads
    n = case.prism.view.d_mlp
    for size in (2**30, 2 * n + 1, 4 * n + 1):  # one pass; slices of 1-2 and 2-4 rows
        monkeypatch.setattr(_engine, "_NEURON_SLICE", size)
        p = build_case(*spec).prism
        results.append(
            (
                p.through_head(L - 1, 1, [7, 9], heads="all", neurons="all").values,
                p.decompose(7, pos="all", neurons="all").values,
            )
        )
    for other in results[1:]:
        assert all(torch.equal(x, y) for x, y in zip(results[0], other))


def test_top_of_millions_equals_the_full_selection():
    """top()'s block-maximum selection picks what a full partition picks (ties by index),
    and its mean over one row is the mean, bit for bit (-0.0 included)."""
    from tlprisms._core.result import largest as _largest
    from tlprisms._core.result import mean0 as _mean0
    from tlprisms._core.table import ComponentTable

    gen = np.random.default_rng(0)
    codes = [KINDS.index(k) for k in ("head", "neuron", "b_V")]
    for trial in range(40):
        n = int(gen.integers(2**16, 2**18))
        kind = gen.choice(codes, n, p=[0.5, 0.49, 0.01]).astype(np.int8)
        zero = np.zeros(n, dtype=np.int32)
        table = ComponentTable(kind, zero, zero, zero, zero, zero)
        w = gen.standard_normal(n).astype(np.float32)
        if trial % 3 == 0:
            w = np.round(w, 1)  # many ties
        if trial % 5 == 0:
            w[kind == codes[2]] *= 100  # the largest are constants
        k = int(gen.integers(1, 50))
        for constants in (False, True):
            score = np.abs(w)
            keep = np.ones(n, dtype=bool) if constants else ~table.is_constant()
            full = np.where(keep, score, -np.inf)
            want = np.sort(full[np.argpartition(-full, k - 1)[:k]])[::-1]
            got = _largest(score, table, k, constants)
            if got is not None:
                assert np.array_equal(full[got], want) and keep[got].all()
                ties = full[got][1:] == full[got][:-1]
                assert (np.diff(got)[ties] > 0).all()
    for dtype in (torch.float32, torch.float64):
        v = torch.tensor([[-0.0, 0.0, 1e-40, float("inf"), -float("inf"), 3.5]], dtype=dtype)
        for x in (v, torch.randn(1, 5000, dtype=dtype), torch.randn(6, 5000, dtype=dtype)):
            mean, got = x.mean(0), _mean0(x)
            assert torch.equal(mean, got) and torch.equal(mean.signbit(), got.signbit())


def test_structural_check_reads_abs_sums_only_when_needed(case):
    """With only the sum given, the structural check passes a gap within
    rtol * (|explained| + 1), computes sum |terms| for a larger one, and still refuses
    terms that do not add up or are not finite."""
    from tlprisms._core.policy import refuse_broken

    p = case.prism
    cv = p.recorded.cache.for_call("test")
    values = torch.randn(3, 1, 1, 50, dtype=p.dtype, device=p.device)
    explained = values.sum(-1)
    zero = torch.zeros_like(explained)

    def refuse(v: torch.Tensor, e: torch.Tensor) -> None:
        refuse_broken(cv, v, e, zero, (None, v.sum(-1)))

    refuse(values, explained)
    big = values.clone()
    big[..., 0], big[..., 1] = 1e6, -1e6  # cancelling terms: gap up to ~1e6 * eps
    refuse(big, explained + 10 * torch.finfo(p.dtype).eps * 1e6)
    with pytest.raises(CompletenessError, match="do not add up"):
        refuse(values, explained + 1.0)
    bad = values.clone()
    bad[1, 0, 0, 3] = float("nan")
    with pytest.raises(NonFiniteError, match="not finite"):
        refuse(bad, explained)


def test_fresh_empty_is_numpy_backed_when_large():
    from tlprisms._core.result import fresh_empty

    big = fresh_empty((3, 2**20), torch.float32, torch.device("cpu"))
    assert big.shape == (3, 2**20) and big.dtype == torch.float32 and big.is_contiguous()
    big.fill_(2.0)
    assert float(big.sum()) == 2.0 * 3 * 2**20
    small = fresh_empty((3, 5), torch.float64, torch.device("cpu"))
    assert small.shape == (3, 5) and small.dtype == torch.float64


def test_negative_hop_indices_are_resolved_in_labels_and_verification():
    """through_head(-1, ...) is head L{n_layers-1}: its label reads the real layer, its
    values equal the positive call's, and verify accepts it (it used to read 'L-1H0')."""
    from tlprisms.demo import load_demo_model

    p = tp.LogitPrism.run(load_demo_model(), "The capital of France is")
    neg, pos = p.through_head(-1, 0, " Paris"), p.through_head(1, 0, " Paris")
    assert neg.prism == pos.prism == "through L1H0"
    assert torch.equal(neg.values, pos.values)
    assert p.verify(neg).ok
    assert p.through_neuron(-1, 7, " Paris").prism == "through L1N7"
