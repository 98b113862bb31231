"""verify and effects never silently wrong: batches, sparse slots, padding, constants, hooks
whose edits are ignored, a model changed after the prism (issue 21)."""

import dataclasses
import sys
import warnings

import pytest
import torch

import tlprisms as tp
from tlprisms.demo import load_demo_model

sys.path.insert(0, __file__.rsplit("/", 1)[0])


@pytest.fixture(scope="module")
def demo():
    return load_demo_model()


def test_verify_sparse_results_of_a_batch(demo):
    P2 = tp.LogitPrism.run(demo, ["The capital of France is", "The capital of Japan is"])
    assert P2.verify(P2.full(" Paris", top_k=3)).ok
    assert P2.verify(P2.heads(" Paris", min_abs=0.5)).ok


def test_padded_batch_reruns_with_its_mask(demo):
    toks = demo.to_tokens(["The capital of France is", "Hi"], padding_side="left")
    mask = (toks != demo.tokenizer.pad_token_id).long()
    with torch.no_grad():
        logits, cache = demo.run_with_cache(toks, attention_mask=mask)
    P = tp.LogitPrism(demo, cache, tokens=toks, logits=logits)
    assert P.verify(P.full(" Paris")).ok
    head = [tp.Component("head", layer=0, head=2)]
    alone = tp.LogitPrism.run(demo, "Hi").effects(" Paris", head)
    padded = P.effects(" Paris", head)
    assert torch.allclose(padded.total[1], alone.total[0], atol=1e-4)


def test_train_mode_and_changed_model_are_refused():
    m = load_demo_model()
    P = tp.LogitPrism.run(m, "The capital of France is")
    r = P.full(" Paris")
    head = [tp.Component("head", layer=0, head=2)]
    m.train()
    if any(isinstance(x, torch.nn.Dropout) and x.p > 0 for x in m.modules()):
        with pytest.raises(tp.errors.PrismError, match="eval"):
            P.verify(r)
    m.eval()
    with torch.no_grad():
        p = [p for n, p in m.named_parameters() if "1" in n and "mlp" in n and p.ndim == 2]
        p[-1].mul_(1.5)
    with pytest.raises(tp.errors.PrismError, match="reproduce|changed"):
        P.verify(r)
    with pytest.raises(tp.errors.PrismError, match="reproduce|changed"):
        P.effects(" Paris", head)


def test_tampered_constants_fail():
    from families import FAMILIES, make_tokenizer

    m = FAMILIES["gpt2/bridge"](True, dtype=torch.float32, tokenizer=make_tokenizer())
    toks = torch.randint(4, 60, (1, 7), generator=torch.Generator().manual_seed(1))
    P = tp.LogitPrism.run(m, toks)
    r = P.heads(5)
    assert P.verify(r).ok
    kinds = r.components.kinds()
    for kind in ("b_U", "b_O"):
        c = int(list(kinds).index(kind))
        v = r.values.clone()
        other = int(v[0, 0, 0].abs().argmax())
        other = other if other != c else int(v[0, 0, 0].abs().argsort()[-2])
        d = 0.5 * float(v[0, 0, 0, c].abs()) + 0.5
        v[0, 0, 0, c] += d
        v[0, 0, 0, other] -= d
        bad = dataclasses.replace(r, values=v)
        out = P.verify(bad, k=len(kinds))
        assert not out.ok, (kind, str(out))
        assert "FAILED" in str(out)


def _zoo_prism(arch: str, batch: int = 1) -> tp.LogitPrism:
    import arch_zoo as zoo
    from families import make_tokenizer

    m = zoo.build(arch, True, tokenizer=make_tokenizer())
    toks = torch.randint(4, 60, (batch, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, cache = m.run_with_cache(toks)
    return tp.LogitPrism(m, cache, tokens=toks, logits=logits)


@pytest.mark.parametrize("arch", ["GPTJForCausalLM", "OPTForCausalLM"])
def test_hook_pattern_ignored_bridges_verify(arch):
    """GPT-J and OPT bridges ignore edits of hook_pattern, and OPT records ln2's scale with
    batch and position flattened ([batch * pos, 1]): verify passes their genuine results,
    fails tampered ones, and refuses their QK results naming why (no hook holds scores)."""
    from test_verify import _tampered

    P = _zoo_prism(arch, batch=2)
    for result in (P.heads(5), P.full(5), P.through_head(1, 2, 5)):
        assert P.verify(result).ok, repr(P.verify(result))
    for how in ("swap", "scale"):
        bad = _tampered(P.heads(5), how)
        assert not P.verify(bad, k=4, sample=0).ok
    with pytest.raises(tp.errors.UnsupportedModelError, match="records no pre-softmax"):
        P.verify(P.qk(1, 0))


@pytest.mark.parametrize(
    "arch", ["Qwen3ForCausalLM", "Gemma3ForCausalLM", "Olmo2ForCausalLM", "BloomForCausalLM"]
)
def test_verify_qk_with_query_key_norms_and_alibi(arch):
    """The query/key norms' scales frozen as the prism freezes them (Qwen3, Gemma 3, OLMo 2);
    ALiBi's positional bias a constant pair (Bloom)."""
    from test_verify import _tampered

    P = _zoo_prism(arch, batch=2)
    pairs = P.qk(1, 1, q_heads="all", k_neurons="all")
    for result in (pairs, P.qk(1, 0, keys=[1, 3], contrast=True), P.qk(1, 1, sides="query")):
        v = P.verify(result, k=8, sample=4)
        assert v.ok and v.terms.numel() > 0, repr(v)
    assert not P.verify(_tampered(pairs, "scale"), k=4, sample=0).ok


def test_no_hook_scale_warning(demo):
    P = tp.LogitPrism.run(demo, "The capital of France is")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        P.verify(P.full(" Paris"))
        P.effects(" Paris", [tp.Component("head", layer=0, head=2)])


def test_effects_source_equals_hand_ablation_and_refusals(demo):
    P = tp.LogitPrism.run(demo, "The capital of France is")
    src = tp.Component("head", layer=0, head=2, src=4)
    if P.view.n_kv_heads != P.view.n_heads:
        with pytest.raises(tp.errors.PrismError):
            P.effects(" Paris", [src])
    with pytest.raises(tp.errors.ArgumentError, match="one distinct row"):
        P.effects(" Paris", [tp.Component("head", layer=0, head=2)], ablation="mean")
    with pytest.raises(tp.errors.ArgumentError, match="chained"):
        P.effects(" Paris", [tp.Component("head", layer=0, head=2, at=3)])
    toks = P.tokens
    tid = demo.to_single_token(" Paris")

    def zero(x, hook):
        x[:, :, 2] = 0.0
        return x

    with torch.no_grad():
        clean = demo(toks)[0, -1, tid]
        hand = demo.run_with_hooks(toks, fwd_hooks=[("blocks.0.attn.hook_z", zero)])[0, -1, tid]
    e = P.effects(" Paris", [tp.Component("head", layer=0, head=2)])
    assert abs(float(e.total[0, 0, 0]) - float(clean - hand)) < 1e-3
