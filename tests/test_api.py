"""The public API, the result type, and invariant 4 (no side effects)."""

import subprocess
import sys

import numpy as np
import pytest
import torch

import tlprisms as tp

from conftest import SEQ, build_case

PUBLIC = {
    "LogitPrism",
    "Decomposition",
    "Component",
    "LogitDiff",
    "Direction",
    "PerRow",
    "NextToken",
    "needed_hooks",
    "PrismError",
    "Hop",
    "explain_task",
    "Verification",
    "Dictionary",
    "CrossLayerTranscoder",
    "AttributionGraph",
    "GraphVerification",
}


def test_public_names():
    assert set(tp.__all__) == PUBLIC


def test_import_is_lazy():
    code = (
        "import sys, tlprisms; bad = [m for m in ('circuitsvis', 'pandas', 'IPython') "
        "if m in sys.modules]; print(bad); sys.exit(bool(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_quickstart_from_the_issue():
    case = build_case("gpt2/bridge", True)
    model, tokens = case.model, case.tokens
    logits, cache = model.run_with_cache(tokens)
    prism = tp.LogitPrism(model, cache)
    r = prism.residual(" Paris")
    h = prism.heads(" Paris")
    n = prism.neurons(" Paris", layers=[0, 1])
    r.check()
    top = h.top(10)
    assert len(top) == 10 and list(top.columns)[:2] == ["component", "kind"]
    assert h.select(layer=1, head=2).values.shape[-1] == SEQ
    frame = h.to_frame()
    assert {"batch", "target", "kind", "layer", "head", "neuron", "src", "value"} <= set(frame)
    assert len(frame) == h.values.numel()
    assert "L1H2" in repr(h.aggregate("layer", "head")) or "Decomposition" in repr(h)
    n.check()


def test_component_labels():
    assert str(tp.Component("head", layer=3, head=7)) == "L3H7"
    assert str(tp.Component("head", layer=3, head=7, src=2)) == "L3H7[src 2]"
    assert str(tp.Component("neuron", layer=16, neuron=10029)) == "L16N10029"
    assert str(tp.Component("mlp", layer=2)) == "L2.mlp"
    assert str(tp.Component("embed", at=4)) == "@4 embed"
    with pytest.deprecated_call():
        assert tp.Component("embed", pos=4) == tp.Component("embed", at=4)
    assert tp.Component("b_U").is_constant and not tp.Component("embed").is_constant


def test_aggregate_keeps_completeness_and_order():
    case = build_case("llama/bridge", True)
    h = case.prism.heads([3, 4])
    per_head = h.aggregate("layer", "head")
    per_head.check()
    assert [str(c) for c in per_head.select(kind="head").components][:3] == ["L0H0", "L0H1", "L0H2"]
    assert torch.allclose(per_head.total(), h.total(), atol=1e-5)


def test_select_by_collection_and_predicate():
    h = build_case("gpt2/bridge", True).prism.heads(5)
    a = h.select(kind="head", layer=[0, 1], src=lambda s: s < 2)
    assert set(a.components.src.tolist()) == {0, 1}
    assert not a.complete
    assert h.constants.components.is_constant().all()


def test_target_labels_and_per_row():
    case = build_case("gpt2/bridge", True)
    r = case.prism.residual(tp.PerRow([" Paris", " Rome", tp.LogitDiff(" Paris", " Rome")]))
    labels = np.asarray(r.target_labels)
    assert labels.shape == (3, 1, 1)
    assert labels[2, 0, 0] == "'Paris' - 'Rome'"


def _snapshot(case):
    state = {k: v.detach().clone() for k, v in case.model.state_dict().items()}
    cache = {k: v.clone() for k, v in case.cache.items()}
    hooks = sum(len(h.fwd_hooks) + len(h.bwd_hooks) for h in case.model.hook_dict.values())
    return state, cache, hooks, case.model.training


@pytest.mark.parametrize("name", ["gpt2/bridge", "gemma2/bridge"])
def test_no_side_effects(name):
    case = build_case(name, False)
    before = _snapshot(case)
    p = case.prism
    p.full([7, tp.LogitDiff(3, 4)])
    p.full(tp.NextToken(), pos="all")
    p.heads(torch.tensor([1, 2, 3]), pos=[1, 2, 3]).to_frame()
    tp.needed_hooks(case.model)
    after = _snapshot(case)
    assert before[0].keys() == after[0].keys()
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    assert before[1].keys() == after[1].keys()
    assert all(torch.equal(before[1][k], after[1][k]) for k in before[1])
    assert before[2:] == after[2:]


def test_run_keeps_tokens_and_logits():
    case = build_case("gpt2/bridge", True)
    p = tp.LogitPrism.run(case.model, case.tokens)
    assert torch.equal(p.tokens, case.tokens)
    r = p.full(7).check()
    assert torch.equal(r.logits[:, 0, 0], p.logits[:, -1, 7])
    assert r.str_tokens is not None and len(r.str_tokens[0]) == SEQ


def test_top_heads_is_the_one_call_for_which_heads_push_a_logit_up():
    """heads(t).top_heads(k): per head (summed over sources), heads only, most positive
    first (issue 22: aggregate('layer', 'head').top(3) gave MLP layers and the embedding,
    ranked by |value|)."""
    from tlprisms.demo import load_demo_model

    p = tp.LogitPrism.run(load_demo_model(), "The capital of Germany is")
    h = p.heads(" Berlin")
    up = h.top_heads(3)
    assert list(up["kind"]) == ["head"] * 3 and list(up["value"]) == sorted(up["value"])[::-1]
    per_head = h.aggregate("kind", "layer", "head", "at").select(kind="head")
    best = per_head.values[0, 0, 0].max()
    assert abs(float(up["value"][0]) - float(best)) < 1e-6
    down = h.top_heads(2, order="negative")
    assert (down["value"] < 0).all()
    with pytest.raises(tp.PrismError, match="no head terms"):
        p.residual(" Berlin").top_heads()
