"""Invariant 5: bad input is refused with an error that names the problem and the fix."""

import pytest
import torch

import tlprisms as tp
from tlprisms.errors import (
    CacheError,
    PositionError,
    PrismError,
    TargetError,
    UnsupportedModelError,
)

from conftest import BATCH, SEQ, build_case
from families import FAMILIES, tiny_moe


@pytest.fixture(scope="module")
def gpt2():
    return build_case("gpt2/bridge", True)


def test_names_filter_that_dropped_a_hook(gpt2):
    _, cache = gpt2.model.run_with_cache(gpt2.tokens, names_filter=lambda n: "pattern" not in n)
    prism = tp.LogitPrism(gpt2.model, cache)
    prism.residual(7).check()  # the residual prism does not need patterns
    with pytest.raises(CacheError, match=r"no 'blocks.0.attn.hook_pattern'.*needed_hooks"):
        prism.heads(7)


def test_needed_hooks_filter_is_enough(gpt2):
    f = tp.needed_hooks(gpt2.model)
    logits, cache = gpt2.model.run_with_cache(gpt2.tokens, names_filter=f)
    assert len(cache.keys()) < len(gpt2.cache.keys())
    tp.LogitPrism(gpt2.model, cache, logits=logits).full(7).check()
    assert "blocks.1.attn.hook_pattern" in f.names


def test_cache_from_a_model_of_another_shape(gpt2):
    other = build_case("llama/bridge", True)
    with pytest.raises(CacheError, match="another model"):
        tp.LogitPrism(gpt2.model, other.cache)


def test_cache_from_a_model_with_other_weights(gpt2):
    twin = FAMILIES["gpt2/bridge"](True)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(1.5)
    _, cache = twin.run_with_cache(gpt2.tokens)
    with pytest.raises(CacheError, match="does not come from this model"):
        tp.LogitPrism(gpt2.model, cache)


def test_tokens_of_another_input(gpt2):
    with pytest.raises(CacheError, match=r"tokens has shape \(3, 5\).*\(3, 7\)"):
        tp.LogitPrism(gpt2.model, gpt2.cache, tokens=gpt2.tokens[:, :5])
    with pytest.raises(CacheError, match="not recorded from these tokens"):
        tp.LogitPrism(gpt2.model, gpt2.cache, tokens=gpt2.tokens.flip(1))


def test_logits_of_another_shape(gpt2):
    with pytest.raises(CacheError, match="logits has shape"):
        tp.LogitPrism(gpt2.model, gpt2.cache, logits=gpt2.logits[:, :3])


@pytest.mark.parametrize("pos", [SEQ, -SEQ - 1, 100])
def test_position_out_of_range(gpt2, pos):
    with pytest.raises(PositionError, match=rf"position {pos} is out of range.*0..{SEQ - 1}"):
        gpt2.prism.residual(7, pos=pos)


def test_positions_do_not_fit_the_batch(gpt2):
    with pytest.raises(PositionError, match=f"2 positions for a batch of {BATCH}"):
        gpt2.prism.residual(7, pos=[1, 2])
    with pytest.raises(PositionError, match="pass an int"):
        gpt2.prism.residual(7, pos="last")


def test_targets_do_not_fit_the_batch(gpt2):
    with pytest.raises(TargetError, match=f"PerRow has 2 targets but the batch has {BATCH}"):
        gpt2.prism.residual(tp.PerRow([1, 2]))
    with pytest.raises(TargetError, match="must have shape"):
        gpt2.prism.residual(torch.tensor([1, 2]))


def test_multi_token_string_target(gpt2):
    with pytest.raises(TargetError, match=r"'Paris London' is 2 tokens.*\['Paris', 'London'\]"):
        gpt2.prism.residual("Paris London")


def test_unknown_token(gpt2):
    with pytest.raises(TargetError, match=r"outside the vocabulary \[0, 60\)"):
        gpt2.prism.residual(10**6)
    with pytest.raises(TargetError, match="is a float"):
        gpt2.prism.residual(3.5)
    with pytest.raises(TargetError, match=r"expected a float tensor of shape \(32,\)"):
        gpt2.prism.residual(tp.Direction(torch.ones(5)))


def test_next_token_needs_tokens(gpt2):
    with pytest.raises(TargetError, match="needs the input tokens"):
        tp.LogitPrism(gpt2.model, gpt2.cache).full(tp.NextToken(), pos="all")


def test_bad_layer_and_softcap(gpt2):
    with pytest.raises(PrismError, match="layer 5 is out of range.*2 layers"):
        gpt2.prism.heads(7, layers=[5])
    with pytest.raises(PrismError, match="softcap='both'"):
        gpt2.prism.residual(7, softcap="both")


def test_select_by_unknown_field(gpt2):
    with pytest.raises(PrismError, match="unknown field 'heads'"):
        gpt2.prism.heads(7).select(heads=1)


def test_check_on_a_selection(gpt2):
    with pytest.raises(PrismError, match="selection"):
        gpt2.prism.heads(7).select(layer=0).check()


def test_not_a_transformerlens_model(gpt2):
    with pytest.raises(UnsupportedModelError, match="needs a TransformerLens model, got Linear"):
        tp.LogitPrism(torch.nn.Linear(2, 2), gpt2.cache)


def test_bridge_without_compatibility_mode():
    import transformers as tf
    from transformer_lens.model_bridge.sources import build_bridge_from_module

    cfg = tf.GPT2Config(vocab_size=60, n_embd=32, n_layer=1, n_head=4, n_positions=16)
    bridge = build_bridge_from_module(tf.GPT2LMHeadModel(cfg), "GPT2LMHeadModel", hf_config=cfg)
    with pytest.raises(UnsupportedModelError, match="enable_compatibility_mode"):
        tp.LogitPrism(bridge, {})


def test_mixture_of_experts_is_refused():
    bridge = tiny_moe()
    with pytest.raises(UnsupportedModelError, match="(?i)mixture.of.experts|Mixtral"):
        tp.LogitPrism(bridge, {})


def test_all_errors_share_one_base():
    for cls in (CacheError, PositionError, TargetError, UnsupportedModelError):
        assert issubclass(cls, tp.PrismError)
