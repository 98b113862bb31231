"""The QK prism: attention scores split into (query-side writer, key-side writer) pairs."""

import numpy as np
import pytest
import torch

import tlprisms as tp
from tlprisms._core.result import ATOL_FLOAT32, ATOL_FLOAT64
from tlprisms._seam import Site
from tlprisms.errors import ArgumentError, PositionError, UnsupportedModelError

from conftest import BATCH, SEQ, build_case
from families import FAMILIES

#: the pair terms must reproduce the recorded scores to these (relative to max(1, |score|,
#: sum |terms|)), as every prism's check() does
TOL = {"float32": ATOL_FLOAT32, "float64": ATOL_FLOAT64}
#: an intervention with ln1's scale frozen moves a score by minus the removed writer's terms,
#: to float32 rounding of the forward pass (relative to 1 + the size of the terms involved)
CAUSAL_RTOL = 1e-4
#: a chunk of keys may block its matrix products differently from the whole block, so
#: the last bits of a term can differ (relative to the term)
CHUNK_RTOL = 1e-5


def recorded_scores(case, layer: int, head: int, pos: int) -> torch.Tensor:
    view = case.prism.view
    return case.cache[view.hook(Site.ATTN_SCORES, layer)][:, head, pos]


def assert_complete(r, case, layer, head, pos, n_keys) -> None:
    r.check()
    scale = torch.maximum(r.logits.abs(), r.values.abs().sum(-1)).clamp(min=1.0)
    assert bool((r.gap().abs() <= TOL[r.precision] * scale).all())
    view = case.prism.view
    if view.has_site(Site.ATTN_SCORES, layer):  # the model's own scores, bit for bit
        scores = recorded_scores(case, layer, head, pos)[:, :n_keys]
        assert torch.equal(r.logits[:, 0], scores.to(r.logits.dtype))
    else:  # a bridge recording no scores: their softmax is the recorded pattern
        pattern = case.cache[view.hook(Site.PATTERN, layer)][:, head, pos, :n_keys]
        assert torch.allclose(r.logits[:, 0].softmax(-1), pattern, atol=1e-5)


def test_complete_every_family(case):
    view = case.prism.view
    last = view.n_layers - 1
    for head in range(view.n_heads):
        r = case.prism.qk(last, head)
        assert r.values.shape[:3] == (BATCH, 1, SEQ)
        assert_complete(r, case, last, head, SEQ - 1, SEQ)
    # both sides split finely: heads x sources on the query side, neurons on the key side
    r = case.prism.qk(last, 1, pos=4, q_heads="all", k_neurons="all", k_heads=0)
    assert_complete(r, case, last, 1, 4, 5)
    assert r.select(q_kind="head").values.shape[-1] > 0
    if not view.attn_only:
        assert "neuron" in set(r.to_frame()["k_kind"])


@pytest.mark.parametrize("name", list(FAMILIES))
def test_complete_float64(name):
    case = build_case(name, False, torch.float64)
    prism = case.prism
    last = prism.view.n_layers - 1
    r = prism.qk(last, 2, q_heads="all", k_heads="all")
    assert r.values.dtype == torch.float64
    assert_complete(r, case, last, 2, SEQ - 1, SEQ)


def _has(prefix: str) -> list:
    return [n for n in FAMILIES if n.startswith(prefix)]


@pytest.mark.parametrize("name", _has("gemma2"))
def test_softcap_post_and_pre(name):
    case = build_case(name, True)
    prism = case.prism
    post = prism.qk(1, 0)
    pre = prism.qk(1, 0, softcap="pre")
    assert post.explains.startswith("post-softcap") and pre.explains.startswith("pre-softcap")
    post.check()
    pre.check()
    cap = prism.view.attn_softcap(1)
    assert cap is not None
    assert torch.allclose(cap * torch.tanh(pre.logits / cap), post.logits, atol=1e-5)
    # post-cap terms are the pre-cap terms times the frozen ratio
    rho = post.logits / pre.logits
    assert torch.allclose(post.values, pre.values * rho[..., None], atol=1e-5)


@pytest.mark.parametrize("name", _has("llama") + _has("gemma/"))
def test_grouped_query_heads_share_key_side(name):
    """GQA: heads of one group read the same key-side vectors (never expanded)."""
    case = build_case(name, True)
    prism = case.prism
    view = prism.view
    assert view.n_kv_heads < view.n_heads
    for head in range(view.n_heads):
        prism.qk(0, head).check()
    # heads 0 and 1 share a key head: their key-side b_K component is the same one
    a = prism.qk(0, 0).to_frame()
    b = prism.qk(0, 1).to_frame()
    assert set(a.loc[a.k_kind == "b_K", "k_head"]) == set(b.loc[b.k_kind == "b_K", "k_head"])


@pytest.mark.parametrize("name", _has("llama") + _has("neox"))
def test_rotary_depends_on_positions(name):
    """Rotary: the same writer pair is worth different amounts at different offsets, and
    the terms still add up (each part rotated at its own position)."""
    case = build_case(name, True)
    tokens = torch.full((1, SEQ), 9, device=case.tokens.device)
    model = case.model
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
    prism = tp.LogitPrism(model, cache, tokens=tokens, logits=logits)
    r = prism.qk(0, 0).check()
    ee = r.select(q_kind="embed", k_kind="embed").values[0, 0, :, 0]
    # same token everywhere: without rotary every key would score the same
    assert float(ee.max() - ee.min()) > 1e-3


def test_contrast_is_difference(case):
    prism = case.prism
    r = prism.qk(1, 0, pos=5, keys=[3, 1], contrast=True, q_heads=0)
    r.check()
    both = prism.qk(1, 0, pos=5, keys=[3, 1], q_heads=0)
    assert r.values.shape[2] == 1
    assert torch.allclose(r.values[:, :, 0], both.values[:, :, 0] - both.values[:, :, 1])
    assert " - " in str(r.target_labels[0, 0, 0])
    assert r.explains.endswith("difference")


def _frozen_scores(case, layer, head, pos, remove_at, write):
    """Scores of (layer, head) at query ``pos`` with ``write`` removed from the residual
    stream at position ``remove_at`` before layer ``layer`` and ln1's scale frozen."""
    model, view = case.model, case.prism.view
    scale = case.cache[view.hook(Site.LN1_SCALE, layer)]
    got = {}

    def remove(x, hook):
        x = x.clone()
        x[:, remove_at] -= write.to(x.dtype)
        return x

    def freeze(x, hook):
        return scale.to(x.dtype).expand_as(x).clone()

    def grab(x, hook):
        got["s"] = x[:, head, pos].detach().clone()

    hooks = [(view.hook(Site.RESID_PRE, layer), remove)]
    if view.ln1[layer].has_scale:
        hooks.append((view.hook(Site.LN1_SCALE, layer), freeze))
    hooks.append((view.hook(Site.ATTN_SCORES, layer), grab))
    with torch.no_grad():
        model.run_with_hooks(case.tokens, fwd_hooks=hooks)
    return got["s"]


CAUSAL = [
    n
    for n in FAMILIES
    if "gemma2" not in n  # its soft-cap is not linear: checked pre-cap in test_softcap
]


@pytest.mark.parametrize("name", CAUSAL)
@pytest.mark.parametrize("side", ["q", "k"])
def test_causal_removing_a_writer(name, side):
    """With ln1's scale frozen, removing the embedding's write at the query position (or at
    a key position) moves the score by minus the sum of its query-side (key-side) terms."""
    case = build_case(name, True)
    prism, view = case.prism, case.prism.view
    layer, head, pos, key = 1, 1, SEQ - 1, 2
    if not view.has_site(Site.ATTN_SCORES, layer):
        pytest.skip("this bridge's hook_attn_scores records the pattern, not the scores")
    r = prism.qk(layer, head, pos=pos)
    at = pos if side == "q" else key
    write = case.cache[view.hook(Site.EMBED)][:, at]
    moved = _frozen_scores(case, layer, head, pos, at, write)
    base = recorded_scores(case, layer, head, pos)
    terms = r.select(**{f"{side}_kind": "embed"}).values[:, 0]  # [B, keys, pairs]
    want = base - terms.sum(-1) if side == "q" else base.clone()
    if side == "k":
        want[:, key] = base[:, key] - terms[:, key].sum(-1)
    # removing the write at the query position also changes the key there: keys j < i
    j = slice(0, pos if side == "q" else pos + 1)
    err = (moved[:, j] - want[:, j]).abs()
    size = 1 + base[:, j].abs() + r.values.abs().sum(-1)[:, 0, j]
    assert bool((err <= CAUSAL_RTOL * size).all())
    # and it really moved
    assert float((moved[:, j] - base[:, j]).abs().max()) > 1e-3


def test_pairs_frame_and_selection(case):
    r = case.prism.qk(1, 3, q_heads="all")
    frame = r.to_frame()
    for side in ("q", "k"):
        for f in ("kind", "layer", "head", "neuron", "src"):
            assert f"{side}_{f}" in frame.columns
    assert len(frame) == BATCH * SEQ * len(r.components)
    sel = r.select(q_kind="head", q_layer=0, k_kind="embed")
    frame_sel = sel.to_frame()
    assert set(frame_sel.q_kind) == {"head"} and set(frame_sel.k_kind) == {"embed"}
    top = r.top(3, batch=0, pos=0, target=SEQ - 1)
    assert list(top.columns[:2]) == ["component", "q_kind"]
    assert top["component"][0].startswith("q:")
    # constants: only pairs of two biases count as constant
    const = r.constants.to_frame()
    q_const = {"b_Q", "ln.b", "b_O", "b_out"}
    assert set(const.q_kind) <= q_const


def test_bad_inputs(case):
    prism = case.prism
    with pytest.raises(PositionError, match="comes after the query position"):
        prism.qk(1, 0, pos=2, keys=[3])
    with pytest.raises(PositionError, match="out of range"):
        prism.qk(1, 0, pos=SEQ)
    with pytest.raises(ArgumentError, match="contrast=True needs"):
        prism.qk(1, 0, keys=[1, 2, 3], contrast=True)
    with pytest.raises(ArgumentError, match="contrast=True needs two keys"):
        prism.qk(1, 0, contrast=True)
    with pytest.raises(ArgumentError, match="is not a field of a QK result"):
        prism.qk(1, 0).select(layer=0)
    with pytest.raises(ArgumentError, match="head"):
        prism.qk(1, 99)
    with pytest.raises(ArgumentError, match="keys="):
        prism.qk(1, 0, keys="3")


def test_qk_norm_is_split_exactly():
    """Issue 24: the q/k-normed families were refused ('TransformerLens records no scale of
    those norms'), which is not true: the scales are recorded and frozen, and the split is
    checked against the recorded scores (tests/test_qk_norms.py covers every family)."""
    import transformers as tf
    from transformer_lens.model_bridge.sources import build_bridge_from_module

    if not hasattr(tf, "Qwen3Config"):
        pytest.skip("transformers has no Qwen3")
    cfg = tf.Qwen3Config(
        vocab_size=60,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=16,
    )
    hf = tf.Qwen3ForCausalLM(cfg).eval()
    model = build_bridge_from_module(hf, "Qwen3ForCausalLM", hf_config=cfg)
    model.enable_compatibility_mode(disable_warnings=True)
    tokens = torch.arange(4, 10)[None]
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
    prism = tp.LogitPrism(model, cache, tokens=tokens, logits=logits)
    r = prism.qk(0, 0).check()
    assert r.explains == "attention score" and r.values.shape[2] == tokens.shape[1]


def designed_model():
    """A 1-layer attention-only model whose head 0 attends from a token to earlier copies of
    the same token: W_Q W_K^T = big * W_E^T W_E on one-hot embeddings."""
    import transformers as tf
    from transformer_lens.model_bridge.sources import build_bridge_from_module

    d = 16
    cfg = tf.GPT2Config(vocab_size=d, n_embd=d, n_layer=1, n_head=2, n_positions=8)
    hf = tf.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.zero_()
        hf.transformer.wte.weight.copy_(torch.eye(d) * 4.0)
        for ln in (hf.transformer.h[0].ln_1, hf.transformer.h[0].ln_2, hf.transformer.ln_f):
            ln.weight.fill_(1.0)
        attn = hf.transformer.h[0].attn.c_attn  # Conv1D [d, 3d]: q | k | v
        dh = d // 2
        attn.weight[:dh, :dh] = torch.eye(dh) * 3.0  # head 0 query: first half of the dims
        attn.weight[:dh, d : d + dh] = torch.eye(dh) * 3.0  # head 0 key: the same dims
    model = build_bridge_from_module(hf, "GPT2LMHeadModel", hf_config=cfg)
    model.enable_compatibility_mode(disable_warnings=True, no_processing=True)
    return model


def test_designed_token_match():
    model = designed_model()
    tokens = torch.tensor([[5, 1, 3, 2, 3, 6, 3]])  # token 3 at 2, 4 and 6
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
    prism = tp.LogitPrism(model, cache, tokens=tokens, logits=logits)
    r = prism.qk(0, 0, pos=6).check()
    pattern = cache[prism.view.hook(Site.PATTERN, 0)][0, 0, 6]
    assert int(pattern.argmax()) in (2, 4, 6)
    top = r.top(1, batch=0, pos=0, target=2)  # key 2: the earlier copy of token 3
    assert top["component"][0] == "q:embed x k:embed"
    ee = r.select(q_kind="embed", k_kind="embed").values[0, 0, :, 0]
    # the matching keys get the large embedding x embedding score; the others one smaller
    # value (LayerNorm centring leaves every non-matching one-hot pair alike)
    match = torch.as_tensor(np.isin(np.arange(7), [2, 4, 6]))
    assert torch.allclose(ee[~match], ee[~match][0].expand(int((~match).sum())))
    assert float(ee[match].min()) > float(ee[~match].max()) + 1.0


def test_needed_hooks_part():
    case = build_case(next(iter(FAMILIES)), True)
    model, view = case.model, case.prism.view
    names = tp.needed_hooks(model, ("qk",))
    with torch.no_grad():
        logits, cache = model.run_with_cache(case.tokens, names_filter=names)
    prism = tp.LogitPrism(model, cache, tokens=case.tokens, logits=logits)
    r = prism.qk(1, 0, q_heads="all", k_neurons="all").check()
    assert torch.equal(r.logits[:, 0], recorded_scores(case, 1, 0, SEQ - 1))
    assert view.hook(Site.ATTN_SCORES, 1) in cache


def test_qk_map_is_the_embedding_pair_term():
    """On the designed model (no positions, every ln1 scale equal) the weight-space map at
    the recorded scale is the forward pass's embedding x embedding pair term."""
    model = designed_model()
    tokens = torch.tensor([[5, 1, 3, 2, 3, 6, 3]])
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
    prism = tp.LogitPrism(model, cache, tokens=tokens, logits=logits)
    scale = cache[prism.view.hook(Site.LN1_SCALE, 0)][0, :, 0]
    assert torch.allclose(scale, scale[0].expand_as(scale))
    r = prism.qk(0, 0, pos=6)
    m = tp.weights.qk_map(model, 0, 0, [3], tokens[0].tolist(), scale=float(scale[0]))
    ee = r.select(q_kind="embed", k_kind="embed").values[0, 0, :, 0]
    assert torch.allclose(m.values[0], ee, atol=1e-4)
    assert m.argmax_index() == [2]
    assert "learned position embeddings" in m.meta["positional"]
    with pytest.raises(ArgumentError, match="scale="):
        tp.weights.qk_map(model, 0, 0, [3], [3], scale=0)


def test_one_side_whole(case):
    """sides='query': the query writers' terms of the score against the whole key (one
    key-side component); they are the pair terms summed over the key side."""
    prism = case.prism
    both = prism.qk(1, 2, q_heads="all")
    r = prism.qk(1, 2, q_heads="all", sides="query").check()
    assert set(r.to_frame().k_kind) == {"resid"}
    assert r.values.shape[-1] == len(both.components.q)
    # the pairs: each key-side writer a row of query-side writers
    summed = both.values.reshape(*both.values.shape[:3], -1, r.values.shape[-1]).sum(-2)
    assert torch.allclose(r.values, summed, atol=1e-5, rtol=1e-5)
    k = prism.qk(1, 2, k_neurons="all", sides="key").check()
    assert set(k.to_frame().q_kind) == {"resid"}
    assert str(k.components[0]).startswith("q:whole x k:")
    with pytest.raises(ArgumentError, match="keeps the key side whole"):
        prism.qk(1, 2, sides="query", k_heads="all")
    with pytest.raises(ArgumentError, match="sides="):
        prism.qk(1, 2, sides="pairs")


def test_render_pair_matrix_and_sources(case):
    from tlprisms import render
    from tlprisms.render._qk import attention_pattern, pair_matrix, query_sources

    r = case.prism.qk(1, 0, q_heads="all")
    fig = pair_matrix(r, batch=1, target=3, top=6)
    m = fig.data["matrix"]
    assert m.shape[0] <= 6 and m.shape[1] <= 6
    # folding keeps every term: the cells add up to the score
    assert abs(m.sum() - float(r.logits[1, 0, 3])) <= 1e-4 * (
        1 + float(r.values[1, 0, 3].abs().sum())
    )
    assert "<svg" in fig.svg
    html = render.to_html(r)
    assert "<svg" in html and "q: " in html
    w = query_sources(r, batch=0, target=2)
    assert w.component == "ColoredTokens" and len(w.props["values"]) == SEQ
    pattern = case.cache[case.prism.view.hook(Site.PATTERN, 1)][0]
    assert attention_pattern(pattern[0], [str(t) for t in range(SEQ)]).component == (
        "AttentionPattern"
    )
    assert attention_pattern(pattern, [str(t) for t in range(SEQ)]).component == "AttentionHeads"
    with pytest.raises(ArgumentError, match="no query-side heads"):
        query_sources(case.prism.qk(1, 0))


def test_bundle_once_per_notebook(monkeypatch):
    """In a Jupyter kernel the first displayed view carries the CircuitsVis bundle and the
    later ones reuse it; to_html() called directly stays self-contained."""
    from tlprisms import render
    from tlprisms.render import _views_base as vb

    monkeypatch.setattr(vb, "_in_kernel", lambda: True)
    monkeypatch.setattr(vb, "_NOTEBOOK", {"sent": False})
    w = render.Widget("ColoredTokens", {"tokens": ["a"], "values": [1.0]})
    marker = vb.bundle_script()

    class Shown:
        def _repr_html_(self):
            return render.to_html(w)

    first, second = Shown()._repr_html_(), w._repr_html_()
    assert first.count(marker) == 1 and second.count(marker) == 0
    assert render.to_html(w).count(marker) == 1  # a fragment to paste: self-contained


# ------------------------------------------------------------------ ALiBi (Bloom, MPT, hooked)
def _alibi_case(name: str, fold: bool = True):
    """A tiny ALiBi model (arch_zoo's Bloom / MPT bridge), its tokens and prism."""
    import arch_zoo as zoo

    model = zoo.build(name, fold)
    tokens = torch.randint(4, 60, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
    return model, cache, tp.LogitPrism(model, cache, tokens=tokens, logits=logits)


def _slopes(n_heads: int, base_exponent: float) -> torch.Tensor:
    """Geometric ALiBi slopes ``2**(-base_exponent * (h + 1) / n_heads)`` (power-of-2 heads)."""
    return torch.tensor([2.0 ** (-base_exponent * (h + 1) / n_heads) for h in range(n_heads)])


#: what each convention adds to score (i, j): slope * distance(i, j, n)
ALIBI_DISTANCE = {
    "BloomForCausalLM": lambda i, j, n: j,  # Hugging Face Bloom: slope * j
    "MptForCausalLM": lambda i, j, n: j - (n - 1),  # MPT: slope * (j - (n - 1))
}


@pytest.mark.parametrize("name", list(ALIBI_DISTANCE))
@pytest.mark.parametrize("fold", [True, False])
def test_alibi_term_is_slope_times_distance(name, fold):
    """ALiBi models: the scores split exactly with the positional bias as one constant pair
    ``L1Hh alibi`` whose value per key is the head's slope times that model's distance."""
    model, cache, prism = _alibi_case(name, fold)
    view = prism.view
    assert view.alibi_kind == {"BloomForCausalLM": "bloom", "MptForCausalLM": "mpt"}[name]
    slopes = _slopes(view.n_heads, 8.0)
    pos = SEQ - 2
    for head in range(view.n_heads):
        r = prism.qk(1, head, pos=pos, q_heads="all", k_neurons="all")
        assert_complete(r, type("C", (), {"prism": prism, "cache": cache})(), 1, head, pos, pos + 1)
        a = r.select(q_kind="alibi")
        assert len(a.components) == 1 and str(a.components[0]) == f"L1H{head} alibi"
        assert a.components.is_constant().all()
        want = torch.tensor(
            [slopes[head] * ALIBI_DISTANCE[name](pos, j, SEQ) for j in range(pos + 1)]
        )
        assert torch.allclose(a.values[:, 0, :, 0], want.expand(BATCH, -1), rtol=1e-6, atol=0)
        frame = r.to_frame()
        assert set(frame.loc[frame.q_kind == "alibi", "k_kind"]) == {"alibi"}
    # a contrast of two keys includes the difference of their positional biases
    c = prism.qk(1, 0, pos=pos, keys=[pos, 1], contrast=True).check()
    d = float(c.select(q_kind="alibi").values[0, 0, 0, 0])
    assert d == pytest.approx(float(slopes[0]) * (pos - 1), rel=1e-6)
    both = prism.qk(1, 0, pos=pos, keys=[pos, 1])
    assert torch.allclose(c.values[:, :, 0], both.values[:, :, 0] - both.values[:, :, 1])
    # the sparse result keeps the bias (a constant) at every key
    s = prism.qk(1, 0, pos=pos, q_heads="all", top_k=2)
    s.check()
    assert bool(
        ((s.index == int(np.nonzero(s.components.mask(q_kind="alibi"))[0][0])).sum(-1) == 1).all()
    )


@pytest.mark.parametrize("name", list(ALIBI_DISTANCE))
def test_alibi_causal_key_side(name):
    """With ln1's scale frozen, removing the embedding's write at a key moves that key's
    score by minus its key-side terms; the ALiBi term does not move."""
    model, cache, prism = _alibi_case(name)
    view = prism.view
    layer, head, pos, key = 1, 2, SEQ - 1, 3
    r = prism.qk(layer, head, pos=pos)
    write = cache[view.hook(Site.EMBED)][:, key]
    case = type("C", (), {"model": model, "prism": prism, "cache": cache, "tokens": None})()
    case.tokens = prism.tokens
    moved = _frozen_scores(case, layer, head, pos, key, write)
    base = cache[view.hook(Site.ATTN_SCORES, layer)][:, head, pos]
    terms = r.select(k_kind="embed").values[:, 0, key].sum(-1)
    size = 1 + base[:, key].abs() + r.values.abs().sum(-1)[:, 0, key]
    assert bool(((moved[:, key] - (base[:, key] - terms)).abs() <= CAUSAL_RTOL * size).all())
    assert float((moved[:, key] - base[:, key]).abs().max()) > 1e-3


def _tiny_hooked(**extra):
    """A two-layer TransformerLens 3 HookedTransformer (LN, GELU) with ``extra`` config and
    its weights perturbed, and the generator that perturbed them (skips on TransformerLens 4)."""
    from families import HAS_HOOKED

    if not HAS_HOOKED:
        pytest.skip("this TransformerLens has no HookedTransformer")
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=2,
        d_model=32,
        n_ctx=16,
        d_head=8,
        n_heads=4,
        d_mlp=64,
        d_vocab=60,
        act_fn="gelu",
        normalization_type="LN",
        seed=0,
        **extra,
    )
    model = HookedTransformer(cfg).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.5)
    return model, gen


def test_alibi_hooked_transformer():
    """TransformerLens 3's HookedTransformer: the bias is read from the attention's recorded
    ``alibi`` buffer, ``slope * min(j - i, 0)`` (sliced as its forward slices it, also after
    a longer input grew the buffer)."""
    model, gen = _tiny_hooked(positional_embedding_type="alibi")
    tokens = torch.randint(4, 60, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    slopes = _slopes(4, 8.0)
    pos = 5
    for longer in (False, True):
        with torch.no_grad():
            if longer:  # a longer input first: TransformerLens keeps the grown buffer
                model(torch.randint(4, 60, (1, 12), generator=gen))
            logits, cache = model.run_with_cache(tokens)
        prism = tp.LogitPrism(model, cache, tokens=tokens, logits=logits)
        r = prism.qk(1, 1, pos=pos, q_heads="all").check()
        assert torch.equal(
            r.logits[:, 0], cache[prism.view.hook(Site.ATTN_SCORES, 1)][:, 1, pos, : pos + 1]
        )
        a = r.select(q_kind="alibi").values[0, 0, :, 0]
        offset = 12 - SEQ if longer else 0  # rows -SEQ: of a 12-token buffer
        want = torch.tensor([float(slopes[1]) * min(j - pos - offset, 0) for j in range(pos + 1)])
        assert torch.allclose(a, want, rtol=1e-6, atol=0)


def test_alibi_refusals_say_why():
    """An ALiBi model whose scores are also soft-capped is refused with that reason."""
    model, cache, prism = _alibi_case("BloomForCausalLM")
    view = prism.view
    view.attn_softcap = lambda layer: 30.0  # type: ignore[method-assign]
    try:
        with pytest.raises(UnsupportedModelError, match="ALiBi bias and a soft-cap"):
            prism.qk(1, 0)
    finally:
        del view.attn_softcap


# ------------------------------------------------------------------ top_k / min_abs
SPARSE_FAMILIES = [n for n in FAMILIES if n.split("/")[0] in ("gpt2", "llama", "gemma2")]


def assert_sparse_pairs(s, d, top_k=None, min_abs=None) -> None:
    """``s`` is the QK result ``d`` made sparse: kept terms bit for bit, one remainder per
    (query kind, layer, key kind, layer) group that sums the dropped terms, constants kept,
    totals equal to the dense totals."""
    assert s.is_sparse and not d.is_sparse
    s.check()
    n = len(d.components)
    c = s.components
    assert [str(c[i]) for i in range(n)] == [str(x) for x in d.components]
    assert set(c.kinds()[n:]) == {"rest"} and all(
        str(c[i]).endswith("(rest)") for i in range(n, len(c))
    )
    idx, v = s.index, s.values
    kept = (idx >= 0) & (idx < n)
    gathered = d.values.gather(-1, idx.clamp(0, n - 1))
    assert torch.equal(torch.where(kept, v, 0.0), torch.where(kept, gathered, 0.0))
    const = np.nonzero(d.components.is_constant())[0]
    for j in const:
        assert bool(((idx == int(j)).sum(-1) == 1).all())
    hits = torch.zeros(d.values.shape, dtype=torch.long)
    keep_dense = hits.scatter_add_(-1, torch.where(kept, idx, 0), kept.long()) > 0
    free = torch.as_tensor(~d.components.is_constant())
    dropped = free & ~keep_dense
    tol = d.tolerance()
    # each remainder: the dense sum of the dropped pairs of its (q kind, layer, k kind, layer)
    rest_keys = c.group_keys(np.arange(n, len(c)))
    assert len(set(rest_keys.tolist())) == len(rest_keys)
    dense_keys = d.components.group_keys(np.arange(n))
    gid = np.searchsorted(np.sort(rest_keys), dense_keys)
    gid = np.argsort(rest_keys)[np.clip(gid, 0, len(rest_keys) - 1)]
    member = rest_keys[gid] == dense_keys  # False for the constants (never grouped)
    assert bool(member[~d.components.is_constant()].all())
    G = len(rest_keys)
    g_idx = torch.as_tensor(np.where(member, gid, G))
    want = torch.zeros(*d.values.shape[:-1], G + 1, dtype=d.values.dtype)
    want.index_add_(-1, g_idx, torch.where(dropped, d.values, 0.0))
    slot_g = torch.where(idx >= n, idx - n, G)
    assert bool(((slot_g < G).sum(-1) == G).all())  # one slot per remainder
    got = torch.zeros_like(want).scatter_add_(-1, slot_g, v)
    assert bool(((got[..., :G] - want[..., :G]).abs() <= tol[..., None]).all())
    counts = (kept & ~torch.as_tensor(d.components.is_constant())[idx.clamp(0, n - 1)]).sum(-1)
    if top_k is not None and min_abs is None:
        assert bool((counts == min(top_k, int(free.sum()))).all())
    absd = d.values.abs()
    smallest_kept = torch.where(keep_dense & free, absd, float("inf")).amin(-1)
    largest_dropped = torch.where(dropped, absd, -1.0).amax(-1)
    assert bool((smallest_kept >= largest_dropped).all())
    if min_abs is not None:
        assert bool((smallest_kept >= min_abs).all())
    assert bool(((s.total() - d.total()).abs() <= tol).all())
    assert torch.equal(s.logits, d.logits)


@pytest.mark.parametrize("name", SPARSE_FAMILIES)
def test_top_k_equals_dense(name):
    case = build_case(name, True)
    p = case.prism
    for kw in (dict(q_heads="all", k_heads="all"), dict(q_neurons=0, sides="query"), {}):
        d = p.qk(1, 2, **kw)
        assert_sparse_pairs(p.qk(1, 2, top_k=4, **kw), d, top_k=4)
    d = p.qk(1, 2, pos=5, q_heads="all", k_neurons="all")
    cut = float(d.values.abs().median())
    assert_sparse_pairs(
        p.qk(1, 2, pos=5, q_heads="all", k_neurons="all", min_abs=cut), d, min_abs=cut
    )
    both = p.qk(1, 2, pos=5, q_heads="all", k_neurons="all", top_k=3, min_abs=cut)
    assert_sparse_pairs(both, d, top_k=3, min_abs=cut)
    # a contrast: the difference of two keys made sparse
    dc = p.qk(1, 2, keys=[4, 0], contrast=True, q_heads="all")
    assert_sparse_pairs(p.qk(1, 2, keys=[4, 0], contrast=True, q_heads="all", top_k=5), dc, top_k=5)


def test_top_k_chunks_of_keys(monkeypatch):
    """One key per chunk (the smallest chunks) keeps the same terms as one block."""
    from tlprisms._core import sparse as _sparse

    case = build_case("gpt2/bridge", True)
    p = case.prism
    whole = p.qk(1, 0, q_heads="all", k_heads="all", top_k=6)
    monkeypatch.setattr(_sparse, "CHUNK_BYTES", 1)
    monkeypatch.setattr(_sparse, "CHUNK_BYTES_CUDA", 1)
    chunked = p.qk(1, 0, q_heads="all", k_heads="all", top_k=6)
    assert torch.equal(chunked.index, whole.index)
    err = (chunked.values - whole.values).abs()
    assert bool((err <= CHUNK_RTOL * whole.values.abs() + whole.tolerance()[..., None]).all())
    assert_sparse_pairs(chunked, p.qk(1, 0, q_heads="all", k_heads="all"), top_k=6)


@pytest.mark.parametrize("name", SPARSE_FAMILIES)
def test_sparse_pairs_views(name):
    """select / top / to_frame / aggregate / to_dense / render on a sparse QK result."""
    from tlprisms import render
    from tlprisms.render._qk import pair_matrix

    p = build_case(name, False).prism
    d = p.qk(1, 0, q_heads="all")
    s = p.qk(1, 0, q_heads="all", top_k=3)
    frame = s.to_frame()
    assert {"q_kind", "k_kind", "value", "rest"} <= set(frame.columns)
    assert frame.rest.any() and (~frame.rest).any()
    rest = s.select(kind="rest").to_frame()
    assert bool(rest.rest.all()) and set(rest.q_head) == {-1}
    heads = s.select(q_kind="head")
    assert set(heads.to_frame().q_kind) == {"head"}
    top = s.top(3, batch=0, pos=0, target=SEQ - 1)
    assert top["component"][0].startswith("q:") and len(top) == 3
    dense = s.to_dense()
    assert torch.allclose(dense.total(), d.total(), atol=float(d.tolerance().max()))
    # layer-level aggregation of the sparse result: the dense result's, remainders included
    agg, dagg = s.aggregate(), d.aggregate()
    assert [str(x) for x in agg.components] == [str(x) for x in dagg.components]
    got = agg.to_dense() if agg.is_sparse else agg
    assert torch.allclose(got.values, dagg.values, atol=float(d.tolerance().max()))
    fig = pair_matrix(s, batch=0, target=2)
    assert abs(fig.data["matrix"].sum() - float(s.logits[0, 0, 2])) <= float(s.tolerance()[0, 0, 2])
    assert "<svg" in render.to_html(s)


# ------------------------------------------------------------------ aggregate per side
@pytest.mark.parametrize("name", list(FAMILIES))
def test_aggregate_per_side(name):
    p = build_case(name, True).prism
    r = p.qk(1, 1, q_heads="all", k_neurons="all")
    tol = r.tolerance()
    # default: one term per (query-side kind, layer) x (key-side kind, layer)
    a = r.aggregate()
    assert a.complete and len(a.components) < len(r.components)
    assert bool(((a.total() - r.total()).abs() <= tol).all())
    layer_level = p.qk(1, 1)
    lv = {str(c): layer_level.values[..., i] for i, c in enumerate(layer_level.components)}
    for i, comp in enumerate(a.components):
        assert " x " in str(comp) or "alibi" in str(comp)  # both sides still labelled
        if str(comp) in lv:  # the same pair at layer level, to rounding
            assert torch.allclose(a.values[..., i], lv[str(comp)], atol=float(tol.max()))
    # one side kept, the other summed: the sides="query" result
    q = r.aggregate("query")
    one = p.qk(1, 1, q_heads="all", sides="query")
    assert [str(x) for x in q.components] == [str(x) for x in one.components]
    assert torch.allclose(q.values, one.values, atol=float(tol.max()))
    k = r.aggregate("k_kind", "k_layer")
    assert set(k.to_frame().q_kind) == {"resid"} and str(k.components[0]).startswith("q:whole x k:")
    assert bool(((k.total() - r.total()).abs() <= tol).all())
    h = r.aggregate("q_kind", "q_layer", "q_head")
    frame = h.to_frame()
    assert set(frame.k_kind) == {"resid"} and (frame.q_head >= 0).any()
    assert set(frame.q_src) == {-1}
    with pytest.raises(ArgumentError, match="not a field of a QK result"):
        r.aggregate("layer")


def test_bad_sparse_inputs():
    prism = build_case(next(iter(FAMILIES)), True).prism
    with pytest.raises(ArgumentError, match="top_k=0"):
        prism.qk(1, 0, top_k=0)
    with pytest.raises(ArgumentError, match="min_abs="):
        prism.qk(1, 0, min_abs=-1.0)


def test_qk_map_states_alibi():
    """The weight-space map of an ALiBi model says that the positional bias is left out."""
    model, cache, prism = _alibi_case("MptForCausalLM")
    m = tp.weights.qk_map(model, 1, 0, [5], [5, 6])
    assert "ALiBi" in m.meta["positional"]


def test_alibi_padded_rows_are_refused():
    """Bloom with a padded row: its ALiBi counts positions from the first real token, which
    the cache does not record; the scores do not match and the refusal says why."""
    import arch_zoo as zoo

    model = zoo.build("BloomForCausalLM", True)
    tokens = torch.randint(4, 60, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[0, :2] = 0  # row 0 left-padded by two tokens
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, attention_mask=mask)
    prism = tp.LogitPrism(model, cache, tokens=tokens, logits=logits)
    with pytest.raises(UnsupportedModelError, match="rows without padding"):
        prism.qk(1, 0, keys=[2, 3, SEQ - 1])


# ------------------------------------------------------------------ the pulled-back key side
#: non-rotary architectures of every kind the pulled-back key side meets: learned positions
#: (GPT-2, OPT, GPT-Neo), sinusoidal positions (XGLM), multi-query attention (GPTBigCode),
#: ALiBi (Bloom, MPT); biases on q/k/v and LayerNorm biases in all of them
PULLED_ZOO = [
    "GPT2LMHeadModel",
    "GPTBigCodeForCausalLM",
    "OPTForCausalLM",
    "XGLMForCausalLM",
    "GPTNeoForCausalLM",
    "BloomForCausalLM",
    "MptForCausalLM",
]


def _zoo_prism(name: str, fold: bool):
    import arch_zoo as zoo

    model = zoo.build(name, fold)
    tokens = torch.randint(4, 60, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
    return tp.LogitPrism(model, cache, tokens=tokens, logits=logits)


class _Paths:
    """Run ``prism.qk`` through the pulled-back key side (the default where it applies) and
    through each key writer's ``d_head`` vector, recording which path each call took."""

    def __init__(self, monkeypatch):
        from tlprisms._prisms import qk as _qk

        self.mp, self.qk, self.taken = monkeypatch, _qk, []
        self.default = _qk.PULL_BACK_MAX_RATIO
        pulled = _qk._pulled_key_side

        def spy(*args, **kw):
            out = pulled(*args, **kw)
            self.taken.append(out is not None)
            return out

        monkeypatch.setattr(_qk, "_pulled_key_side", spy)

    def run(self, prism, *args, **kw):
        """(default result, d_head-path result, [path taken per chunk by the default])."""
        self.mp.setattr(self.qk, "PULL_BACK_MAX_RATIO", 0.0)
        self.taken.clear()
        old = prism.qk(*args, **kw)
        assert self.taken == []  # ratio 0: never tried
        self.mp.setattr(self.qk, "PULL_BACK_MAX_RATIO", self.default)
        new = prism.qk(*args, **kw)
        return new, old, list(self.taken)


def assert_same_terms(new, old) -> None:
    """Two dense QK results with the same labels and terms equal to the precision's
    tolerance (relative to max(1, |score|, sum |terms|), as check() bounds a gap)."""
    assert [str(c) for c in new.components] == [str(c) for c in old.components]
    assert new.explains == old.explains and new.values.shape == old.values.shape
    scale = torch.maximum(old.logits.abs(), old.values.abs().sum(-1)).clamp(min=1.0)
    assert bool(((new.values - old.values).abs() <= TOL[old.precision] * scale[..., None]).all())
    assert bool(((new.logits - old.logits).abs() <= TOL[old.precision] * scale).all())
    new.check()


def test_pulled_key_side_every_family(case, monkeypatch):
    """Without rotary (and with at most d_head query-side writers) the key side is read with
    the query-side writers pulled back through W_K; it gives the d_head path's terms. Rotary
    families always take the d_head path (the rotation differs per key): bit for bit."""
    paths = _Paths(monkeypatch)
    prism = case.prism
    last = prism.view.n_layers - 1
    rotary = prism.view.rotary
    splits = (
        dict(k_heads="all"),
        dict(k_heads="all", by_source=False),
        dict(k_neurons="all", k_heads=0),
        dict(keys=[SEQ - 1, 2], contrast=True),
    )
    pairs = prism.qk(last, 1).components  # the query side varies fastest on every path
    nq = len(pairs.q)
    assert (pairs.qi[: 2 * nq] == np.tile(np.arange(nq), 2)).all()
    assert (pairs.ki[: 2 * nq] == np.repeat([0, 1], nq)).all()
    for kw in ({},) + (() if rotary else splits):
        new, old, taken = paths.run(prism, last, 1, **kw)
        assert taken == ([] if rotary else [True]), kw
        if rotary:
            assert torch.equal(new.values, old.values)
        else:
            assert_same_terms(new, old)
    # many query-side writers (more than d_head): the d_head path, bit for bit
    new, old, taken = paths.run(prism, last, 1, q_heads="all")
    assert taken == [] and torch.equal(new.values, old.values)


@pytest.mark.parametrize(
    "name, fold",
    [(n, True) for n in PULLED_ZOO]
    + [pytest.param(n, False, marks=pytest.mark.slow) for n in PULLED_ZOO],
)
def test_pulled_key_side_zoo(name, fold, monkeypatch):
    """The pulled-back key side on every non-rotary architecture (MQA, learned, sinusoidal
    and ALiBi positions, q/k/v biases), folded (unfolded: slow): the d_head path's terms, the
    model's recorded scores; contrasts, key sides split by head (x source) and neuron, and
    sparse results (their kept terms and remainders from the same path's dense terms)."""
    paths = _Paths(monkeypatch)
    prism = _zoo_prism(name, fold)
    view = prism.view
    assert not view.rotary
    pos = SEQ - 2
    for head in (0, view.n_heads - 1):
        new, old, taken = paths.run(prism, 1, head, pos=pos)
        assert taken == [True]
        assert_same_terms(new, old)
    for kw in (
        dict(k_heads="all"),
        dict(k_neurons="all", by_source=False, k_heads=0),
        dict(keys=[pos, pos - 2], contrast=True),  # inside GPT-Neo's local window (4)
    ):
        new, old, taken = paths.run(prism, 1, 0, pos=pos, **kw)
        assert taken == [True], kw
        assert_same_terms(new, old)
    new, old, taken = paths.run(prism, 1, 0, pos=pos, k_heads="all", top_k=3)
    assert taken and all(taken)
    dense_new, dense_old, _ = paths.run(prism, 1, 0, pos=pos, k_heads="all")
    assert_sparse_pairs(new, dense_new, top_k=3)  # the same path's dense terms
    assert_same_terms(dense_new, dense_old)
    assert bool(((new.total() - old.total()).abs() <= dense_old.tolerance()).all())


def test_pulled_key_side_float64_and_fallback(monkeypatch):
    """float64: the two paths agree to float64 rounding. A plan block the pulled-back side
    does not know sends the call to the d_head path (the same bits)."""
    from tlprisms._prisms import qk as _qk

    paths = _Paths(monkeypatch)
    prism = build_case("gpt2/bridge", False, torch.float64).prism
    new, old, taken = paths.run(prism, 1, 2, k_heads="all", k_neurons="all")
    assert taken == [True] and new.values.dtype == torch.float64
    assert_same_terms(new, old)
    monkeypatch.setattr(_qk, "_ROW_PARTS", ("split", "whole", "post_b"))  # no "bias"
    new, old, taken = paths.run(prism, 1, 2)
    assert taken == [False] and torch.equal(new.values, old.values)


def test_pulled_key_side_gqa_softcap_hooked(monkeypatch):
    """TransformerLens 3's HookedTransformer with grouped-query attention, learned positions
    and a soft-capped score (no rotary): the pulled-back key side gives the d_head path's
    terms post-cap (rho frozen) and pre-cap."""
    model, gen = _tiny_hooked(n_key_value_heads=2, attn_scores_soft_cap=2.0)
    tokens = torch.randint(4, 60, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
    prism = tp.LogitPrism(model, cache, tokens=tokens, logits=logits)
    assert prism.view.n_kv_heads == 2 and prism.view.attn_softcap(1) == 2.0
    paths = _Paths(monkeypatch)
    for head in range(4):
        for softcap in ("post", "pre"):
            new, old, taken = paths.run(prism, 1, head, softcap=softcap)
            assert taken == [True]
            assert_same_terms(new, old)
    new, old, taken = paths.run(prism, 1, 3, keys=[SEQ - 1, 0], contrast=True)
    assert taken == [True]
    assert_same_terms(new, old)


@pytest.mark.parametrize("name", _has("gpt2") + _has("solu"))  # the non-rotary families
def test_pulled_key_side_split_model(name, monkeypatch):
    """A model split across (simulated) devices, every layer on the far one: the pulled-back
    key side gives the one-device terms bit for bit, its result on the embedding's device,
    and moves no more far tensors whole than the d_head path does (the whole writes and
    head terms are read where they live)."""
    from fake_devices import TwoDevices, home, split_cache, split_model, to_far

    from conftest import DEVICE

    if DEVICE != "cpu":
        pytest.skip("simulated on the CPU")
    case = build_case(name, False)
    model, cache = split_model(case.model, 0), split_cache(case.cache, 0)
    paths = _Paths(monkeypatch)
    for kw in ({}, dict(k_heads="all"), dict(k_neurons="all")):
        want = case.prism.qk(1, 0, **kw)
        moved = []
        for ratio in (0.0, paths.default):
            monkeypatch.setattr(paths.qk, "PULL_BACK_MAX_RATIO", ratio)
            paths.taken.clear()
            with TwoDevices() as devices:
                prism = tp.LogitPrism(model, cache, tokens=case.tokens, logits=to_far(case.logits))
                got = prism.qk(1, 0, **kw)
            moved.append(sorted(m.numel for m in devices.whole_inputs_moved()))
        assert paths.taken == [True], kw
        assert got.values.device == want.values.device
        assert torch.equal(home(got.values), want.values), kw
        assert moved[1] == moved[0], kw
