"""Built-in verification by intervention, and direct terms vs total effects.

``LogitPrism.verify`` must pass every genuine result on every family (residual, heads,
neurons, chained results) and fail a result whose terms were altered although their total
still adds up. ``LogitPrism.effects`` must match hand-written ablations and show a designed
erasure mechanism: a later MLP that cancels part of an earlier head's write, so the head's
direct term exceeds its total effect.
"""

import dataclasses

import numpy as np
import pytest
import torch

import tlprisms as tp
from tlprisms._seam import Site
from tlprisms.errors import ArgumentError, TargetError, VerificationError

from conftest import SEQ, build_case
from families import FAMILIES

#: largest verification error on a genuine float32 result, relative to max(1, |explained|)
#: (measured: <= 6e-6; the bound verify() applies is 1e-4 * max(1, |explained|, sum |terms|))
GENUINE_RTOL = 2e-5
#: total effect from effects() vs a hand-written ablation with run_with_hooks (same forward)
ABLATION_ATOL = 1e-5
#: how much of head L0H0's direct term the designed erasure MLP must cancel
ERASED_AT_LEAST = 1.0

TAMPER_FAMILIES = [n for n in ("gpt2/bridge", "llama/bridge", "gemma2/hooked") if n in FAMILIES]


def _genuine(p: tp.LogitPrism) -> dict:
    out = {"residual": p.residual(7), "heads": p.heads([7, tp.LogitDiff(9, 11)])}
    if not p.view.attn_only:
        out["neurons"] = p.neurons(7)
        out["chain"] = p.chain(
            7,
            [tp.Hop("neuron", 1, 3), tp.Hop("head", 0, 1)]
            if p.view.parallel
            else [tp.Hop("neuron", 1, 3), tp.Hop("head", 1, 0)],
            neurons="all",
        )
    return out


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_verify_passes_genuine_results(case):
    p = case.prism
    for what, result in _genuine(p).items():
        v = p.verify(result, k=6, sample=4)
        assert v.ok, (what, repr(v))
        assert v.check() is v
        assert v.max_relative_error <= GENUINE_RTOL, (what, repr(v))
        assert v.forward_passes == 1 and v.terms.numel() >= 6
        assert str(v).startswith("6 largest + 4 sampled terms verified by intervention")


def _tampered(result: tp.Decomposition, how: str) -> tp.Decomposition:
    """The two largest non-constant terms of every (batch, pos, target) swapped, or the
    largest scaled by 1.5 and the second changed to keep the total."""
    values = result.values.clone()
    flat = values.reshape(-1, values.shape[-1])
    const = torch.as_tensor(result.components.is_constant())
    for row in flat:
        i, j = torch.where(const, torch.zeros_like(row), row.abs()).topk(2).indices.tolist()
        if how == "swap":
            row[i], row[j] = row[j].clone(), row[i].clone()
        else:
            d = 0.5 * row[i].clone()
            row[i] += d
            row[j] -= d
    return dataclasses.replace(result, values=values)


@pytest.mark.parametrize("name", TAMPER_FAMILIES)
@pytest.mark.parametrize("how", ["swap", "scale"])
def test_verify_fails_tampered_results(name, how):
    p = build_case(name, True).prism
    for result in (p.heads(7), p.through_head(1, 2, 7)):
        bad = _tampered(result, how)
        bad.check()  # the total still adds up: completeness cannot see it
        v = p.verify(bad, k=4, sample=0)
        assert not v.ok and bool(v.failed.any())
        assert str(v).startswith("FAILED:")
        with pytest.raises(VerificationError, match="FAILED: .* differ from their intervention"):
            v.check()


def test_verify_fails_a_result_that_does_not_add_up():
    p = build_case("gpt2/bridge", True).prism
    r = p.residual(7)
    bad = dataclasses.replace(r, logits=r.logits + 1.0)
    v = p.verify(bad)
    assert not v.ok and not v.sum_ok and str(v).startswith("FAILED: the terms do not add up")


def test_verify_other_targets_positions_and_readouts():
    case = build_case("llama/bridge", False)
    p = case.prism
    u = torch.randn(p.view.d_model, generator=torch.Generator().manual_seed(0))
    w = case.model.blocks[1].mlp.W_in.detach()[:, 5]
    checks = [
        (p.full(tp.NextToken(), pos="all"), None),
        (p.neurons(tp.PerRow([7, 8, tp.LogitDiff(9, 7)]), pos=[3, 4, 6]), None),
        (p.heads(tp.Direction(u, "u"), softcap="pre"), tp.Direction(u, "u")),
        (p.readout(w, 1, at="ln2", heads="all", neurons=[0]), w),
        (p.heads(7).aggregate("layer", "head"), None),
        (p.neurons(7).select(layer=1), None),
        (p.through_head(1, 2, 7, heads="all", neurons="all"), None),
        (p.through_neuron(1, 5, 7, heads="all"), None),
        (p.chain(7, [tp.Hop("head", 1, 2, src=4), tp.Hop("head", 0, 1)]), None),
    ]
    for result, target in checks:
        v = p.verify(result, target, k=6, sample=4)
        assert v.ok, repr(v)
    summed = p.through_head(1, 2, 7).aggregate("kind")  # summed over positions
    v = p.verify(summed)
    assert v.terms.numel() == 0 and "sums over layers or positions" in str(v)


def test_verify_refusals():
    case = build_case("gpt2/bridge", True)
    p = case.prism
    # a result knows its own target (its request): a Direction needs no target= any more
    assert p.verify(p.residual(tp.Direction(torch.ones(p.view.d_model)))).ok
    with pytest.raises(TargetError, match="target does not match the result"):
        p.verify(p.residual(7), 8)
    assert p.verify(p.readout(torch.ones(p.view.d_model), 0)).ok  # its vector: the request's
    with pytest.raises(ArgumentError, match="readout result is verified against its vector"):
        p.verify(p.readout(torch.ones(p.view.d_model), 0), target=7)
    with pytest.raises(ArgumentError, match="does not come from this prism"):
        p.verify(tp.LogitPrism.run(case.model, case.tokens[:2]).residual(7))
    other = build_case("llama/bridge", True).prism.residual(7)  # same shapes, another model
    assert not p.verify(other).ok
    with pytest.raises(ArgumentError, match="needs the input tokens"):
        tp.LogitPrism(
            case.model, {k: v for k, v in case.cache.items() if "hook_in" not in k}
        ).verify(p.residual(7))
    with pytest.raises(ArgumentError, match="k must be an integer"):
        p.verify(p.residual(7), k=2.0)


def test_verify_has_no_side_effects_and_renders(tmp_path):
    case = build_case("gemma2/bridge", False)
    state = {k: v.clone() for k, v in case.model.state_dict().items()}
    cache = {k: v.clone() for k, v in case.cache.items()}
    p = case.prism
    v = p.verify(p.full(7), k=5, sample=5)
    assert all(torch.equal(state[k], x) for k, x in case.model.state_dict().items())
    assert all(torch.equal(cache[k], x) for k, x in case.cache.items())
    assert sum(len(h.fwd_hooks) for h in case.model.hook_dict.values()) == 0
    frame = v.to_frame()
    assert len(frame) == 10 and {"component", "term", "change", "error", "ok"} <= set(frame)
    assert frame["selected"].tolist() == ["top"] * 5 + ["sample"] * 5
    assert np.allclose(frame["term"], -frame["change"], atol=1e-4)
    assert "of a post-softcap logit" in str(v) and "forward passes" in repr(v)
    assert v.svg().startswith("<svg")
    html = tp.render.Report("v").add(v, title="verified").save(tmp_path / "v.html").read_text()
    assert "verified by intervention" in html and "<svg" in html


# ----------------------------------------------------------------------------- effects
def _erasure_model():
    """GPT-2 with hand-set weights: L0H0 attends uniformly and writes 4 e0 (from b_V), L0H1
    writes 2 e1; one ReLU neuron of layer 1 reads e0 and writes -0.5 relu(ln2(x)_0) e0 back
    (it erases part of L0H0's write); the target's unembedding is 2 e0."""
    import transformers as tf
    from transformer_lens.model_bridge.sources import build_bridge_from_module

    cfg = tf.GPT2Config(
        vocab_size=20,
        n_embd=16,
        n_layer=2,
        n_head=2,
        n_positions=SEQ,
        activation_function="relu",
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    hf = tf.GPT2LMHeadModel(cfg).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, w in hf.named_parameters():
            if "ln" not in name:
                w.zero_()
        hf.transformer.wte.weight.copy_(0.3 * torch.randn(20, 16, generator=gen))
        a0, m1 = hf.transformer.h[0].attn, hf.transformer.h[1].mlp
        a0.c_attn.bias[32] = 1.0  # head 0's value, d_head dim 0
        a0.c_attn.bias[40] = 1.0  # head 1's value, d_head dim 0
        a0.c_proj.weight[0, 0] = 4.0  # head 0 -> 4 e0
        a0.c_proj.weight[8, 1] = 2.0  # head 1 -> 2 e1
        m1.c_fc.weight[0, 0] = 1.0  # neuron 0 reads ln2(x)_0
        m1.c_proj.weight[0, 0] = -0.5  # and erases along e0
        hf.lm_head.weight.copy_(0.1 * torch.randn(20, 16, generator=gen))
        hf.lm_head.weight[3] = 0.0
        hf.lm_head.weight[3, 0] = 2.0
    bridge = build_bridge_from_module(hf, "GPT2LMHeadModel", hf_config=cfg)
    bridge.enable_compatibility_mode(disable_warnings=True, no_processing=True)
    return bridge


def test_effects_show_erasure_and_match_hand_ablations():
    model = _erasure_model()
    tokens = torch.randint(4, 20, (3, SEQ), generator=torch.Generator().manual_seed(1))
    p = tp.LogitPrism.run(model, tokens)
    comps = [
        tp.Component("head", layer=0, head=0),
        tp.Component("head", layer=0, head=1),
        tp.Component("neuron", layer=1, neuron=0),
        tp.Component("attn", layer=0),
    ]
    e = p.effects(3, comps)
    direct = p.heads(3).aggregate("layer", "head").select(kind="head", layer=0, head=0)
    assert torch.allclose(e.direct[:, 0, 0], direct.values[:, 0, 0].sum(-1), atol=1e-6)
    assert bool((e.direct[:, 0, 0] - e.total[:, 0, 0] >= ERASED_AT_LEAST).all()), repr(e)
    assert bool((e.total[:, 0, 0] > 0).all()) and bool((e.direct[:, 0, 2] < 0).all())
    assert torch.allclose(e.difference, e.total - e.direct)
    clean = model(tokens)[:, -1, 3]

    def zero_head(x, hook):
        x = x.clone()
        x[:, :, 0] = 0.0
        return x

    def zero_neuron(x, hook):
        x = x.clone()
        x[:, :, 0] = 0.0
        return x

    for c, (name, fn) in (
        (0, ("blocks.0.attn.hook_z", zero_head)),
        (2, ("blocks.1.mlp.hook_post", zero_neuron)),
    ):
        ablated = model.run_with_hooks(tokens, fwd_hooks=[(name, fn)])[:, -1, 3]
        assert torch.allclose(e.total[:, 0, c], clean - ablated, atol=ABLATION_ATOL)
    # mean ablation of L0H1 over a reference batch, by hand
    ref = torch.randint(4, 20, (5, SEQ), generator=torch.Generator().manual_seed(2))
    em = p.effects(3, comps[1:2], ablation="mean", reference=ref)
    _, rc = model.run_with_cache(ref)
    mean = rc["blocks.0.attn.hook_z"][:, :, 1].mean(0)

    def mean_head(x, hook):
        x = x.clone()
        x[:, :, 1] = mean
        return x

    ablated = model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_z", mean_head)])
    assert torch.allclose(em.total[:, 0, 0], clean - ablated[:, -1, 3], atol=ABLATION_ATOL)
    frame = e.to_frame()
    assert list(frame.columns[-3:]) == ["direct", "total", "difference"] and len(frame) == 12
    assert e.svg().startswith("<svg") and "difference" in repr(e)
    er = p.effects(3, comps[:1], ablation="resample", seed=1)
    assert er.total.shape == (3, 1, 1)


def test_effects_refusals():
    p = build_case("gpt2/bridge", True).prism
    with pytest.raises(ArgumentError, match="ablation='half'"):
        p.effects(7, [tp.Component("head", layer=0, head=1)], ablation="half")
    with pytest.raises(ArgumentError, match="not a component effects"):
        p.effects(7, [tp.Component("embed")])
    with pytest.raises(ArgumentError, match="head 9 is out of range"):
        p.effects(7, [tp.Component("head", layer=0, head=9)])
    with pytest.raises(ArgumentError, match="reference must be token ids"):
        p.effects(7, [tp.Component("mlp", layer=0)], ablation="mean", reference=torch.ones(2, 3))
    with pytest.raises(tp.errors.PositionError, match="one position per row"):
        p.effects(tp.NextToken(), [tp.Component("mlp", layer=0)], pos="all")


def test_cli_explain_verify_prints_the_certificate(capsys, tmp_path):
    from tlprisms import cli

    argv = [
        "explain",
        "--model",
        "demo",
        "--prompt",
        "The capital of France is",
        "--target",
        " Paris",
        "--verify",
        "--out",
        str(tmp_path / "r.html"),
    ]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "verification: 20 largest + 20 sampled terms verified by intervention" in text
    assert "Verification by intervention" in (tmp_path / "r.html").read_text()


# ----------------------------------------------------------------------------- QK results
def _qk_results(p: tp.LogitPrism) -> dict:
    L = p.view.n_layers - 1
    return {
        "pairs": p.qk(L, 1, q_heads="all", k_neurons="all"),
        "contrast": p.qk(L, 0, keys=[1, 3], contrast=True, softcap="pre"),
        "query side": p.qk(L, 1, sides="query", q_neurons=0),
        "sparse": p.qk(L, 1, q_heads="all", k_heads="all", top_k=4),
        "aggregate": p.qk(L, 1, q_heads="all").aggregate("q_kind", "q_layer"),
        "query chain": p.qk(L, 1, sides="query", path=[tp.Hop("head", 0, 1, src=2)]),
        "key chain": p.qk(L, 1, keys=[3, 4, 5], sides="key", path=[tp.Hop("neuron", 0, 3)]),
    }


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name", list(FAMILIES))
def test_verify_passes_genuine_qk_results(name):
    """Pairs by second differences, one-sided terms and row/column sums by one removal, on
    every family (soft-capped Gemma 2 included); a bridge whose hook_attn_scores holds
    probabilities is refused, naming why."""
    p = build_case(name, True).prism
    for what, result in _qk_results(p).items():
        layer = result.request.layer
        if not p.view.has_site(Site.ATTN_SCORES, layer):
            with pytest.raises(tp.errors.UnsupportedModelError, match="no pre-softmax attention"):
                p.verify(result)
            continue
        v = p.verify(result, k=6, sample=4)
        assert v.ok, (what, repr(v))
        assert v.max_relative_error <= GENUINE_RTOL, (what, repr(v))
        assert v.terms.numel() >= 3, (what, repr(v))
        if what == "pairs":  # every checked writer's row and column, constants included
            assert v.sums_checked > 0 and "row/column sums" in str(v)
            assert {"q_kind", "k_kind"} <= set(v.to_frame())


def _tampered_qk_constant(result: tp.Decomposition) -> tp.Decomposition:
    """In every target the two largest pairs with key side b_K (two query writers' rows)
    changed by +d and -d: the total adds up, every both-writer pair is untouched."""
    t = result.components
    cols = np.nonzero(t.k.kinds()[t.ki] == "b_K")[0]
    values = result.values.clone()
    for row in values.reshape(-1, values.shape[-1]):
        i, j = cols[np.argsort(-row[cols].abs().numpy())[:2]]
        d = 0.5 * float(row[i].abs()) + 0.5
        row[i] += d
        row[j] -= d
    return dataclasses.replace(result, values=values)


@pytest.mark.parametrize("name", TAMPER_FAMILIES)
def test_verify_fails_tampered_qk_results(name):
    p = build_case(name, True).prism
    L = p.view.n_layers - 1
    pairs = p.qk(L, 1, q_heads="all", k_neurons="all")
    for result in (pairs, p.qk(L, 0, keys=[1, 3], contrast=True), p.qk(L, 1, sides="key")):
        for how in ("swap", "scale"):
            bad = _tampered(result, how)
            bad.check()
            v = p.verify(bad, k=4, sample=0)
            assert not v.ok and str(v).startswith("FAILED:"), (how, repr(v))
    bad = _tampered_qk_constant(pairs)
    bad.check()
    v = p.verify(bad, k=20, sample=10)
    assert not v.ok and bool(v.failed[-v.sums_checked :].any()), repr(v)  # a row sum caught it
