"""The QK prism on families that normalise queries and keys (Qwen3, Gemma 3: per head; OLMo 2:
over all heads): the norms frozen at their recorded scales (``attn.q_norm.hook_scale``,
``attn.k_norm.hook_scale``), applied before rotary as the model applies them."""

import functools

import pytest
import torch

import tlprisms as tp
from tlprisms._seam import Site
from tlprisms.errors import CacheError

import arch_zoo

FAMILIES = ("Qwen3ForCausalLM", "Gemma3ForCausalLM", "Olmo2ForCausalLM")
BATCH, SEQ = 2, 7
#: terms + constants == recorded score, relative to max(1, |score|, sum |terms|) (float32)
TOL = 1e-5
#: a forward pass with the scales frozen moves a score by minus the removed writer's terms
CAUSAL_RTOL = 1e-4


def _big_norms(hf) -> None:
    """q/k norm weights away from 1 and large, so scores are far from 0 (Gemma's ``1 + w``
    convention included: the weight is multiplied in either case)."""
    g = torch.Generator().manual_seed(3)
    for name, p in hf.named_parameters():
        if name.endswith(("q_norm.weight", "k_norm.weight")):
            p.copy_(4.0 + 2.0 * torch.rand(p.shape, generator=g))


@functools.cache
def _case(name: str, fold: bool):
    try:
        model = arch_zoo.build(name, fold, prepare=_big_norms)
    except arch_zoo.ZooSkip as exc:
        pytest.skip(str(exc))
    tokens = torch.randint(4, 60, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
    return model, tokens, cache, tp.LogitPrism(model, cache, tokens=tokens, logits=logits)


CASES = [
    pytest.param(n, f, id=f"{n}-{'folded' if f else 'unfolded'}")
    for n in FAMILIES
    for f in (True, False)
]


def _complete(r) -> None:
    r.check()
    size = torch.maximum(r.logits.abs(), r.values.abs().sum(-1)).clamp(min=1.0)
    assert bool((r.gap().abs() <= TOL * size).all())


@pytest.mark.parametrize("name,fold", CASES)
def test_complete(name, fold):
    model, _, cache, prism = _case(name, fold)
    view = prism.view
    assert view.qk_norm(0, "q") is not None and view.qk_norm(0, "k") is not None
    for layer in range(view.n_layers):
        scores = cache[view.hook(Site.ATTN_SCORES, layer)]
        pattern = cache[view.hook(Site.PATTERN, layer)]
        for head in range(view.n_heads):
            r = prism.qk(layer, head, q_heads="all", k_heads="all")
            _complete(r)
            keys = [int(k.split("@")[-1]) for k in r.target_labels[0, 0]]
            # the model's own scores, and their softmax over the keys it attends is its pattern
            assert torch.equal(r.logits[:, 0], scores[:, head, SEQ - 1, keys])
            p = torch.zeros(BATCH, SEQ)
            p[:, keys] = r.logits[:, 0].softmax(-1)
            assert torch.allclose(p, pattern[:, head, SEQ - 1], atol=1e-6)
            assert float(r.logits.abs().max()) > 1.0  # far from 0: a wrong norm would show
    # Gemma 3's sliding layer (0) leaves out the keys outside its window (the pattern check
    # above holds over all SEQ keys: the model gives those none)
    if name.startswith("Gemma3"):
        assert prism.qk(0, 0).values.shape[2] < SEQ == prism.qk(1, 0).values.shape[2]
    # sparse, contrast, one side kept whole
    sparse = prism.qk(1, 1, q_heads="all", top_k=3)
    _complete(sparse)
    c = prism.qk(1, 1, pos=5, keys=[4, 2], contrast=True)
    both = prism.qk(1, 1, pos=5, keys=[4, 2])
    _complete(c)
    assert torch.allclose(c.logits[:, 0, 0], both.logits[:, 0, 0] - both.logits[:, 0, 1])
    for sides in ("query", "key"):
        one = prism.qk(1, 2, sides=sides, q_heads="all" if sides == "query" else None)
        _complete(one)


def _frozen_scores(model, view, cache, tokens, layer, head, pos, remove_at, write):
    """Scores of (layer, head) at ``pos`` with ``write`` removed from ``resid_pre layer``
    at ``remove_at``, ln1's and the query/key norms' scales frozen at their recorded values."""
    got = {}

    def remove(x, hook):
        x = x.clone()
        x[:, remove_at] -= write.to(x.dtype)
        return x

    def freeze(x, hook):
        return cache[hook.name].to(x.dtype).expand_as(x).clone()

    def grab(x, hook):
        got["s"] = x[:, head, pos].detach().clone()

    hooks = [(view.hook(Site.RESID_PRE, layer), remove)]
    if view.ln1[layer].has_scale:
        hooks.append((view.hook(Site.LN1_SCALE, layer), freeze))
    hooks.append((view.hook(Site.Q_NORM_SCALE, layer), freeze))
    hooks.append((view.hook(Site.K_NORM_SCALE, layer), freeze))
    hooks.append((view.hook(Site.ATTN_SCORES, layer), grab))
    with torch.no_grad():
        model.run_with_hooks(tokens, fwd_hooks=hooks)
    return got["s"]


@pytest.mark.parametrize("name,fold", CASES)
@pytest.mark.parametrize("side", ["q", "k"])
def test_causal_removing_a_writer(name, fold, side):
    """With ln1 and the q/k norm scales frozen, removing the embedding's write at the query
    (a key) position moves the score by minus the sum of its query-side (key-side) terms."""
    model, tokens, cache, prism = _case(name, fold)
    view = prism.view
    layer, head, pos, key = 1, 1, SEQ - 1, 5
    r = prism.qk(layer, head, pos=pos)
    keys = [int(k.split("@")[-1]) for k in r.target_labels[0, 0]]
    at = pos if side == "q" else key
    write = cache[view.hook(Site.EMBED)][:, at]
    moved = _frozen_scores(model, view, cache, tokens, layer, head, pos, at, write)[:, keys]
    base = cache[view.hook(Site.ATTN_SCORES, layer)][:, head, pos, keys]
    terms = r.select(**{f"{side}_kind": "embed"}).values[:, 0]  # [B, keys, pairs]
    n = keys.index(key)
    if side == "q":  # the key at pos itself also changes: keys j < pos
        want, j = base - terms.sum(-1), slice(0, len(keys) - 1)
    else:
        want, j = base.clone(), slice(0, len(keys))
        want[:, n] = base[:, n] - terms[:, n].sum(-1)
    err = (moved[:, j] - want[:, j]).abs()
    size = 1 + base[:, j].abs() + r.values.abs().sum(-1)[:, 0, j]
    assert bool((err <= CAUSAL_RTOL * size).all()), float(err.max())
    assert float((moved[:, j] - base[:, j]).abs().max()) > 1e-3  # it really moved


@pytest.mark.parametrize("name", ["Qwen3ForCausalLM", "Olmo2ForCausalLM"])
def test_chain_through_one_side(name):
    """A chain through the query side adds up to its hop's term in the one-side split."""
    _, _, _, prism = _case(name, True)
    r = prism.qk(1, 0, sides="query", path=[tp.Hop("head", 0, 2, src=3)])
    r.check()
    one = prism.qk(1, 0, sides="query", q_heads=0).select(q_kind="head", q_head=2, q_src=3)
    assert torch.allclose(r.total(), one.values[..., 0], atol=1e-5, rtol=1e-5)
    keys = [3, 5, 6]
    k = prism.qk(1, 0, keys=keys, sides="key", path=[tp.Hop("head", 0, 1, src=2)])
    k.check()
    one = prism.qk(1, 0, keys=keys, sides="key", k_heads=0)
    one = one.select(k_kind="head", k_head=1, k_src=2)
    assert torch.allclose(k.total(), one.values[..., 0], atol=1e-5, rtol=1e-5)


def test_unrecorded_scale_is_named():
    model, tokens, cache, _ = _case("Qwen3ForCausalLM", True)
    view = tp.LogitPrism(model, cache, tokens=tokens).view
    name = view.hook(Site.Q_NORM_SCALE, 1)
    assert name == "blocks.1.attn.q_norm.hook_scale"
    assert tp.needed_hooks(model, ("qk",))(name)
    kept = {k: v for k, v in cache.items() if k != name}
    prism = tp.LogitPrism(model, kept, tokens=tokens)
    with pytest.raises(CacheError, match="q_norm.hook_scale"):
        prism.qk(1, 0)
    prism.qk(0, 0).check()  # layer 0's scales are there


@pytest.mark.parametrize("name", ["Qwen3ForCausalLM", "Olmo2ForCausalLM"])
def test_qk_map_applies_the_norm_weights(name):
    """``weights.qk_map`` applies the q/k norms' weights with their scale held at
    ``qk_norm_scale`` (1 by default), and says so."""
    model, _, _, prism = _case(name, False)
    view, layer, head = prism.view, 1, 2
    m1 = tp.weights.qk_map(model, layer, head, [5, 6], [7, 8, 9])
    m2 = tp.weights.qk_map(model, layer, head, [5, 6], [7, 8, 9], qk_norm_scale=2.0)
    assert torch.allclose(m2.values, m1.values / 4, rtol=1e-5, atol=1e-6)
    assert "q/k norms at scale 2" in m2.title and "held at 2" in m2.meta["qk_norm"]
    ln1, g, d = view.ln1[layer], view.kv_group(head), view.d_head
    E = [
        ln1.apply(view.embed_rows(torch.tensor(t), torch.float32), torch.tensor(1.0), bias=False)
        for t in ([5, 6], [7, 8, 9])
    ]
    wq, wk = view.qk_norm(layer, "q").weight.float(), view.qk_norm(layer, "k").weight.float()
    if wq.numel() != d:
        wq, wk = wq[head * d : (head + 1) * d], wk[g * d : (g + 1) * d]
    q = E[0] @ view.W_Q(layer, torch.float32)[head] * wq
    k = E[1] @ view.W_K(layer, torch.float32)[g] * wk
    want = q @ k.T * view.attn_score_factor(layer)
    assert torch.allclose(m1.values, want, rtol=1e-5, atol=1e-5)


def test_hooked_transformer_use_qk_norm():
    """HookedTransformer's ``use_qk_norm`` (Qwen3-style, TransformerLens <= 3) records its
    q/k norm scales flattened (``[batch * pos * heads, 1]``): the QK prism freezes them and
    splits exactly; without them the refusal names the hook to record."""
    from families import HAS_HOOKED

    if not HAS_HOOKED:  # TransformerLens 4 raises on the attribute instead of lacking it
        pytest.skip("this TransformerLens has no HookedTransformer")
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=2,
        d_model=32,
        n_ctx=16,
        d_head=8,
        n_heads=4,
        n_key_value_heads=2,
        d_mlp=64,
        d_vocab=60,
        act_fn="silu",
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_dim=8,
        gated_mlp=True,
        final_rms=True,
        use_qk_norm=True,
        seed=0,
    )
    model = HookedTransformer(cfg).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_norm.w", "k_norm.w")):
                p.copy_(4.0 + 2.0 * torch.rand(p.shape, generator=g))
            elif p.ndim > 1:
                p.mul_(3.0)
    tokens = torch.randint(4, 60, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
    prism = tp.LogitPrism(model, cache, tokens=tokens, logits=logits)
    assert prism.view.qk_norm(1, "q") is not None and prism.view.qk_norm_per_head(1, "k")
    for layer in range(2):
        scores = cache[prism.view.hook(Site.ATTN_SCORES, layer)]
        for head in range(4):
            r = prism.qk(layer, head, q_heads="all", k_heads="all")
            _complete(r)
            assert torch.equal(r.logits[:, 0], scores[:, head, SEQ - 1])
            assert float(r.logits.abs().max()) > 1.0
    one = prism.qk(1, 2, sides="key", k_neurons="all")
    _complete(one)
    name = "blocks.1.attn.k_norm.hook_scale"
    assert tp.needed_hooks(model, ("qk",))(name)
    kept = {k: v for k, v in cache.items() if k != name}
    with pytest.raises(CacheError, match="k_norm.hook_scale"):
        tp.LogitPrism(model, kept, tokens=tokens).qk(1, 0)
