"""The QK prism: attention scores split into (query-side writer, key-side writer) pairs."""

import numpy as np
import pytest
import torch

import tlprisms as tp
from tlprisms._result import ATOL_FLOAT32, ATOL_FLOAT64
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


def test_qk_norm_is_refused():
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
    with pytest.raises(UnsupportedModelError, match="q_norm/k_norm"):
        prism.qk(0, 0)


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
    summed = both.values.reshape(*both.values.shape[:3], r.values.shape[-1], -1).sum(-1)
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
