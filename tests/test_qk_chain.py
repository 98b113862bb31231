"""Chains through one side of an attention score: ``qk(..., sides="query"|"key", path=[...])``.

Completeness on every family (the chained terms add up to the one-hop term they split, and
with the other terms to the recorded score), causal checks by intervention (ln1's scales and
the hop head's pattern frozen by hooks), soft-cap, contrasts, two-hop paths and refusals.
"""

import pytest
import torch

import tlprisms as tp
from tlprisms._core.result import ATOL_FLOAT32, ATOL_FLOAT64
from tlprisms._seam import Site
from tlprisms.errors import ArgumentError, CacheError, PositionError

from conftest import SEQ, build_case
from families import FAMILIES

#: chained totals vs the term they split, and totals vs the recorded scores, relative to
#: max(1, |value|, sum |terms|), as every prism's check() does
TOL = {"float32": ATOL_FLOAT32, "float64": ATOL_FLOAT64}
#: an intervention with scales and the pattern frozen moves a score by minus the chained term,
#: to float32 rounding of two forward passes (relative to 1 + the size of the terms involved)
CAUSAL_RTOL = 1e-4
#: the QK head (layer 1, the last of every family model) and the hop head of layer 0
LAYER, HEAD, HOP_HEAD = 1, 1, 2
#: the query position, the hop's source position and the keys read on the key side
POS, SRC, KEYS = SEQ - 1, 2, [3, 4, 6]


def _close(a: torch.Tensor, b: torch.Tensor, size: torch.Tensor, precision: str) -> bool:
    return bool(((a - b).abs() <= TOL[precision] * size.clamp(min=1.0)).all())


def _one_hop_term(prism, side: str, keys, **kw) -> tuple:
    """The hop head's term from ``SRC`` in ``qk(sides=side)`` split at layer 0, the whole
    one-side result, and its size (for tolerances)."""
    s = side[0]
    ref = prism.qk(LAYER, HEAD, pos=POS, keys=keys, sides=side, **{f"{s}_heads": 0}, **kw)
    comp = ref.select(
        **{f"{s}_kind": "head", f"{s}_layer": 0, f"{s}_head": HOP_HEAD, f"{s}_src": SRC}
    )
    assert comp.values.shape[-1] == 1
    size = ref.values.abs().sum(-1)
    return comp.values[..., 0], ref, size


@pytest.mark.parametrize("side", ["query", "key"])
def test_complete_every_family(case, side):
    """The chained terms add up to the hop head's one-side term, and that total with the
    other one-side terms to the model's own scores."""
    prism = case.prism
    keys = None if side == "query" else KEYS
    hop = tp.Hop("head", 0, HOP_HEAD, src=SRC)
    r = prism.qk(LAYER, HEAD, pos=POS, keys=keys, sides=side, path=[hop]).check()
    term, ref, size = _one_hop_term(prism, side, keys)
    assert r.values.shape[:3] == ref.values.shape[:3]
    assert _close(r.total(), term, size, r.precision)
    assert _close(r.logits, term, size, r.precision)  # what the result says it explains
    # summed with every other term of the side, the chain gives the recorded score
    others = ref.total() - term
    assert _close(others + r.total(), ref.logits, size, r.precision)
    # layer 0 reads only the embeddings (and constants) at the source position
    assert set(r.components.kinds()) <= {"embed", "pos_embed", "b_V", "ln.b"}
    assert set(r.components.at.tolist()) == {SRC}
    assert r.explains.endswith(f"{side}-side term of L0H{HOP_HEAD}[src {SRC}]")


@pytest.mark.parametrize("name", list(FAMILIES))
def test_key_side_keys_at_once(name):
    """The key side reads each key's stream; through a head from one source every key's
    chain reads that source, and is computed at once: each key's terms are those of the
    key alone."""
    prism = build_case(name, True).prism
    path = [tp.Hop("head", 0, HOP_HEAD, src=SRC)]
    r = prism.qk(LAYER, HEAD, pos=POS, keys=KEYS, sides="key", path=path)
    for n, j in enumerate(KEYS):
        one = prism.qk(LAYER, HEAD, pos=POS, keys=[j], sides="key", path=path)
        assert [str(c) for c in one.components] == [str(c) for c in r.components]
        size = one.values.abs().sum(-1)
        assert _close(r.values[:, :, n], one.values[:, :, 0], size[..., None], r.precision)
        assert _close(r.logits[:, :, n], one.logits[:, :, 0], size, r.precision)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_complete_float64(name):
    case = build_case(name, False, torch.float64)
    prism = case.prism
    for side, keys in (("query", None), ("key", KEYS)):
        r = prism.qk(
            LAYER, HEAD, pos=POS, keys=keys, sides=side, path=[("head", 0, HOP_HEAD, SRC)]
        ).check()
        assert r.values.dtype == torch.float64
        term, _, size = _one_hop_term(prism, side, keys)
        # models that norm in float32 (HF RMSNorm upcasts) are held to float32's tolerance
        assert _close(r.total(), term, size, r.precision)
    assert r.precision == prism.precision


@pytest.mark.parametrize("side", ["query", "key"])
def test_neuron_hop_and_two_hops(case, side):
    """A neuron hop totals the neuron's one-side term; a two-hop path (neuron of layer 0,
    then head of layer 0 that it reads) totals the first hop's split of that head."""
    prism = case.prism
    view = prism.view
    if view.attn_only:
        pytest.skip("no MLPs")
    s, keys, n = side[0], [POS - 2, POS], 5
    neuron = tp.Hop("neuron", 0, n)
    r = prism.qk(LAYER, HEAD, pos=POS, keys=keys, sides=side, path=[neuron]).check()
    ref = prism.qk(LAYER, HEAD, pos=POS, keys=keys, sides=side, **{f"{s}_neurons": 0})
    term = ref.select(**{f"{s}_kind": "neuron", f"{s}_layer": 0, f"{s}_neuron": n})
    size = ref.values.abs().sum(-1)
    assert _close(r.total(), term.values.sum(-1), size, r.precision)
    if view.parallel:
        return  # a parallel block's MLP reads resid_pre 0: no head before it
    # the neuron's chain split into layer 0's heads x sources, and the two-hop path
    split = prism.qk(
        LAYER, HEAD, pos=POS, keys=keys, sides=side, path=[neuron], **{f"{s}_heads": 0}
    ).check()
    assert _close(split.total(), r.total(), size, r.precision)
    head_term = split.select(kind="head", layer=0, head=HOP_HEAD).values.sum(-1)
    two = prism.qk(
        LAYER,
        HEAD,
        pos=POS,
        keys=keys,
        sides=side,
        path=[neuron, tp.Hop("head", 0, HOP_HEAD)],
    ).check()
    assert _close(two.total(), head_term, size, two.precision)
    assert "L0N5 > L0H2" in two.explains
    # every source of the last head hop is a position of its own
    assert set(two.components.at.tolist()) <= set(range(SEQ))


@pytest.mark.parametrize("name", list(FAMILIES))
@pytest.mark.parametrize("side", ["query", "key"])
def test_contrast_is_difference(name, side):
    prism = build_case(name, True).prism
    keys = [5, 3] if side == "query" else [6, 4]
    paths = [[tp.Hop("head", 0, HOP_HEAD, src=SRC)]]
    if not prism.view.attn_only:  # the key side reads each key's own neuron: key by key
        paths.append([tp.Hop("neuron", 0, 5)])
    for path in paths:
        r = prism.qk(LAYER, HEAD, pos=POS, keys=keys, contrast=True, sides=side, path=path)
        r.check()
        both = prism.qk(LAYER, HEAD, pos=POS, keys=keys, sides=side, path=path)
        assert r.values.shape[2] == 1
        diff = both.values[:, :, :1] - both.values[:, :, 1:2]
        size = both.values.abs().sum(-1).amax(-1, keepdim=True)
        assert _close(r.values.sum(-1), diff.sum(-1), size, r.precision)
        assert _close(r.logits, both.logits[:, :, :1] - both.logits[:, :, 1:2], size, r.precision)
        assert torch.allclose(r.values, diff, atol=TOL[r.precision] * float(size.max()))
        assert " - " in str(r.target_labels[0, 0, 0])
        assert "difference" in r.explains


def _has(prefix: str) -> list:
    return [n for n in FAMILIES if n.startswith(prefix)]


@pytest.mark.parametrize("name", _has("gemma2"))
@pytest.mark.parametrize("side", ["query", "key"])
def test_softcap_post_is_pre_times_ratio(name, side):
    """Post-cap, every chained term is the pre-cap term times the score's frozen ratio."""
    prism = build_case(name, True).prism
    keys = None if side == "query" else KEYS
    path = [tp.Hop("head", 0, HOP_HEAD, src=SRC)]
    post = prism.qk(LAYER, HEAD, pos=POS, keys=keys, sides=side, path=path).check()
    pre = prism.qk(LAYER, HEAD, pos=POS, keys=keys, sides=side, path=path, softcap="pre")
    pre.check()
    assert post.explains.startswith("post-softcap") and pre.explains.startswith("pre-softcap")
    rho = (
        prism.qk(LAYER, HEAD, pos=POS, keys=keys).logits
        / prism.qk(LAYER, HEAD, pos=POS, keys=keys, softcap="pre").logits
    )
    assert bool((rho != 1).any())
    assert torch.allclose(post.values, pre.values * rho[..., None], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ["gpt2/bridge", "llama/bridge"])
def test_top_k_keeps_totals(name):
    """top_k= keeps the largest chained terms per key and one remainder per (kind, layer):
    the totals stay those of the dense chain, and the kept terms are its terms."""
    prism = build_case(name, True).prism
    path = [tp.Hop("neuron", 0, 5)]
    dense = prism.qk(LAYER, HEAD, pos=POS, sides="query", path=path, q_heads=0).check()
    sparse = prism.qk(LAYER, HEAD, pos=POS, sides="query", path=path, q_heads=0, top_k=2)
    sparse.check()
    assert sparse.values.shape[-1] < dense.values.shape[-1]
    assert torch.allclose(sparse.total(), dense.total(), atol=ATOL_FLOAT32)
    top = sparse.top(1, batch=0, pos=0, target=POS)
    want = dense.top(1, batch=0, pos=0, target=POS)
    assert top["component"][0] == want["component"][0]
    assert float(top["value"][0]) == float(want["value"][0])


@pytest.mark.parametrize("name", ["BloomForCausalLM", "MptForCausalLM"])
def test_alibi_models(name):
    """ALiBi: the positional bias is a constant of the score, in no hop; a chain through
    the query side still totals the hop's one-side term."""
    import arch_zoo as zoo

    model = zoo.build(name, True)
    tokens = torch.randint(4, 60, (1, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
    prism = tp.LogitPrism(model, cache, tokens=tokens, logits=logits)
    for side, keys in (("query", None), ("key", KEYS)):
        r = prism.qk(
            LAYER, HEAD, pos=POS, keys=keys, sides=side, path=[tp.Hop("head", 0, 0, src=SRC)]
        ).check()
        s = side[0]
        ref = prism.qk(LAYER, HEAD, pos=POS, keys=keys, sides=side, **{f"{s}_heads": 0})
        term = ref.select(**{f"{s}_kind": "head", f"{s}_layer": 0, f"{s}_head": 0, f"{s}_src": SRC})
        size = ref.values.abs().sum(-1)
        assert _close(r.total(), term.values.sum(-1), size, r.precision)


@pytest.mark.parametrize("name", ["gpt2/bridge", "gemma2/bridge"])
def test_needed_hooks_parts(name):
    """A QK chain reads the "qk" and "chains" parts: a cache recorded with both serves
    every hop; with "qk" alone head hops work and a neuron hop names the missing hook."""
    case = build_case(name, True)
    model, tokens = case.model, case.tokens
    path = [tp.Hop("neuron", 0, 5), tp.Hop("head", 0, HOP_HEAD)]
    for parts in (("qk", "chains"), ("qk",)):
        with torch.no_grad():
            logits, cache = model.run_with_cache(tokens, names_filter=tp.needed_hooks(model, parts))
        prism = tp.LogitPrism(model, cache, tokens=tokens, logits=logits)
        for side, keys in (("query", None), ("key", KEYS)):
            head = prism.qk(
                LAYER, HEAD, keys=keys, sides=side, path=[tp.Hop("head", 0, HOP_HEAD, src=SRC)]
            )
            ref = case.prism.qk(
                LAYER, HEAD, keys=keys, sides=side, path=[tp.Hop("head", 0, HOP_HEAD, src=SRC)]
            )
            assert torch.equal(head.check().values, ref.values)
            if parts == ("qk",):
                with pytest.raises(CacheError, match="names_filter"):
                    prism.qk(LAYER, HEAD, keys=keys, sides=side, path=path)
            else:
                prism.qk(LAYER, HEAD, keys=keys, sides=side, path=path).check()


# ----------------------------------------------------------------------------- causal
def _hop_output_change(case, at: int) -> torch.Tensor:
    """Remove the embedding's write at ``SRC`` from what layer 0 reads (its ln1 scale and
    pattern frozen): the change of head ``HOP_HEAD``'s write at position ``at`` ``[B, d]``,
    through its post-norm (scale frozen) where the model has one."""
    model, cache, view = case.model, case.cache, case.prism.view
    embed = cache[view.hook(Site.EMBED)][:, SRC]
    got = {}

    def remove(x, hook):
        x = x.clone()
        x[:, SRC] -= embed.to(x.dtype)
        return x

    def frozen(x, hook):
        return cache[hook.name].to(x.dtype).expand_as(x).clone()

    def grab(x, hook):
        got["v"] = x.detach().clone()

    hooks = [(view.hook(Site.RESID_PRE, 0), remove), (view.hook(Site.PATTERN, 0), frozen)]
    if view.ln1[0].has_scale:
        hooks.append((view.hook(Site.LN1_SCALE, 0), frozen))
    hooks.append((view.hook(Site.V, 0), grab))
    with torch.no_grad():
        model.run_with_hooks(case.tokens, fwd_hooks=hooks)
    g = view.kv_group(HOP_HEAD)
    dv = (cache[view.hook(Site.V, 0)][:, SRC, g] - got["v"][:, SRC, g]).to(torch.float32)
    A = cache[view.hook(Site.PATTERN, 0)][:, HOP_HEAD, at, SRC]
    out = (A[:, None] * dv) @ view.W_O(0, torch.float32)[HOP_HEAD].to(dv.device)
    post = view.ln1_post[0]
    if post is not None:  # Gemma 2: the head's write goes through ln1_post, scale frozen
        out = post.pull_back(out) / cache[view.hook(post.site, 0)][:, at]
    scale = view.residual_scale(0)
    return out if scale is None else out * scale


def _scores_without(case, at: int, delta: torch.Tensor) -> torch.Tensor:
    """Head (LAYER, HEAD)'s pre-cap scores at query POS with ``delta`` removed from the
    residual stream layer LAYER reads at ``at``, ln1's scale frozen."""
    model, cache, view = case.model, case.cache, case.prism.view
    got = {}

    def remove(x, hook):
        x = x.clone()
        x[:, at] -= delta.to(x.dtype)
        return x

    def frozen(x, hook):
        return cache[hook.name].to(x.dtype).expand_as(x).clone()

    def grab(x, hook):
        got["s"] = x[:, HEAD, POS].detach().clone()

    hooks = [(view.hook(Site.RESID_PRE, LAYER), remove)]
    if view.ln1[LAYER].has_scale:
        hooks.append((view.hook(Site.LN1_SCALE, LAYER), frozen))
    hooks.append((view.hook(Site.ATTN_SCORES, LAYER), grab))
    with torch.no_grad():
        model.run_with_hooks(case.tokens, fwd_hooks=hooks)
    return _pre_cap(view, got["s"])


def _pre_cap(view, scores: torch.Tensor) -> torch.Tensor:
    cap = view.attn_softcap(LAYER)
    return scores if cap is None else cap * torch.atanh(scores / cap)


@pytest.mark.parametrize("name", list(FAMILIES))
@pytest.mark.parametrize("side", ["query", "key"])
def test_causal_removing_a_source_write(name, side):
    """Removing the embedding's write at the hop head's source moves the head's output at
    the query (key) position, which moves the score of every key before the query by
    exactly minus the chained ``@SRC embed`` term."""
    case = build_case(name, True)
    prism, view = case.prism, case.prism.view
    if not view.has_site(Site.ATTN_SCORES, LAYER):
        pytest.skip("this bridge's hook_attn_scores records the pattern, not the scores")
    keys = list(range(POS)) if side == "query" else [4]
    r = prism.qk(
        LAYER,
        HEAD,
        pos=POS,
        keys=keys,
        sides=side,
        path=[tp.Hop("head", 0, HOP_HEAD, src=SRC)],
        softcap="pre",
    )
    term = r.select(kind="embed", at=SRC).values[:, 0, :, 0]  # [B, keys]
    at = POS if side == "query" else keys[0]
    moved = _scores_without(case, at, _hop_output_change(case, at))[:, keys]
    base = _pre_cap(view, case.cache[view.hook(Site.ATTN_SCORES, LAYER)][:, HEAD, POS])[:, keys]
    whole = prism.qk(LAYER, HEAD, pos=POS, keys=keys, sides=side, softcap="pre")
    size = 1.0 + base.abs() + whole.values.abs().sum(-1)[:, 0]
    assert bool(((moved - (base - term)).abs() <= CAUSAL_RTOL * size).all())
    assert float((moved - base).abs().max()) > 1e-4  # and it really moved


# ----------------------------------------------------------------------------- labels, errors
@pytest.mark.parametrize("name", list(FAMILIES))
def test_labels_frame_and_selection(name):
    prism = build_case(name, True).prism
    path = [tp.Hop("head", 0, HOP_HEAD, src=SRC)]
    r = prism.qk(LAYER, HEAD, pos=POS, sides="query", path=path)
    assert str(r.components[0]) == f"@{SRC} embed"
    assert r.prism == f"qk L{LAYER}H{HEAD} query side through L0H{HOP_HEAD}[src {SRC}]"
    frame = r.to_frame()
    assert {"kind", "layer", "head", "at", "value"} <= set(frame.columns)
    assert len(frame) == r.values.numel()
    top = r.top(1, batch=0, pos=0, target=POS)
    assert top["component"][0] in {str(c) for c in r.components}
    assert r.target_labels.shape[-1] == POS + 1
    assert r.constants.values.shape[-1] == int(r.components.is_constant().sum())


def test_bad_inputs():
    prism = build_case(next(iter(FAMILIES)), True).prism
    hop = tp.Hop("head", 0, HOP_HEAD, src=SRC)
    with pytest.raises(ArgumentError, match="not sides='both'"):
        prism.qk(LAYER, HEAD, path=[hop])
    with pytest.raises(ArgumentError, match="only layers before 1 write"):
        prism.qk(LAYER, HEAD, sides="query", path=[tp.Hop("head", 1, 0, src=SRC)])
    with pytest.raises(ArgumentError, match="only layers before 0 write"):
        prism.qk(0, HEAD, sides="key", path=[tp.Hop("neuron", 0, 3)])
    with pytest.raises(PositionError, match="after the query position 2"):
        prism.qk(LAYER, HEAD, pos=2, sides="query", path=[tp.Hop("head", 0, 1, src=4)])
    with pytest.raises(PositionError, match="keys at positions >= 4"):
        prism.qk(LAYER, HEAD, keys=[2, 5], sides="key", path=[tp.Hop("head", 0, 1, src=4)])
    with pytest.raises(PositionError, match="previous hop's source"):
        prism.qk(
            LAYER,
            HEAD,
            sides="query",
            path=[tp.Hop("neuron", 0, 1), tp.Hop("head", 0, 1, src=3), tp.Hop("head", 0, 0, 5)],
        )
    with pytest.raises(PositionError, match="src"):
        prism.qk(LAYER, HEAD, sides="query", path=[tp.Hop("head", 0, 1, src=SEQ)])
    with pytest.raises(ArgumentError, match="non-empty list of tlprisms.Hop"):
        prism.qk(LAYER, HEAD, sides="query", path=[])
    with pytest.raises(ArgumentError, match="non-empty list of tlprisms.Hop"):
        prism.qk(LAYER, HEAD, sides="query", path=hop)
    with pytest.raises(ArgumentError, match="needs src"):
        prism.qk(
            LAYER,
            HEAD,
            sides="query",
            path=[tp.Hop("neuron", 0, 1), tp.Hop("head", 0, 1), tp.Hop("head", 0, 0)],
        )
    with pytest.raises(ArgumentError, match="keeps the key side whole"):
        prism.qk(LAYER, HEAD, sides="query", path=[hop], k_heads=0)
