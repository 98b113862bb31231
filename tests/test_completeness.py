"""Invariant 1: every prism's terms add up to the model's own logit, on every family."""

import pytest
import torch

import tlprisms as tp
from tlprisms._core.result import ATOL_FLOAT32, ATOL_FLOAT64

from conftest import BATCH, SEQ, build_case
from families import FAMILIES

#: the tiny test models are scaled so their logits are far from zero (SPEC 7.1)
MIN_MAX_LOGIT = 5.0
#: bf16 weights and cache: terms are computed in float32 from bf16-rounded activations
RTOL_BF16 = 2e-2

TARGETS = {
    "token": 7,
    "string": " Paris",
    "list": [7, " London", tp.LogitDiff(" Paris", " Rome")],
    "per_row_tensor": torch.tensor([5, 6, 7]),
    "per_row": tp.PerRow([" Paris", 9, tp.LogitDiff(10, 11)]),
}


def test_logits_far_from_zero(case):
    assert case.logits.abs().max() > MIN_MAX_LOGIT


@pytest.mark.parametrize("prism", ["residual", "heads", "neurons", "full"])
@pytest.mark.parametrize("target", list(TARGETS))
def test_complete_last_position(case, prism, target):
    r = getattr(case.prism, prism)(TARGETS[target])
    r.check()
    assert r.values.shape[:2] == (BATCH, 1)
    # explained values are the model's own logits
    if target == "token":
        assert torch.allclose(r.logits[:, 0, 0], case.logits[:, -1, 7])


@pytest.mark.parametrize("prism", ["residual", "heads", "neurons"])
def test_complete_per_row_positions(case, prism):
    r = getattr(case.prism, prism)(torch.tensor([3, 4, 5]), pos=[2, SEQ - 1, 4])
    r.check()
    assert r.positions[:, 0].tolist() == [2, SEQ - 1, 4]


def test_complete_all_positions(case):
    r = case.prism.full(tp.NextToken(), pos="all")
    r.check()
    assert r.values.shape[:3] == (BATCH, SEQ, 1)
    # each position explains the next input token, the last the top prediction
    assert torch.equal(
        r.logits[:, :-1, 0], case.logits[:, :-1].gather(-1, case.tokens[:, 1:, None])[..., 0]
    )


def test_all_positions_with_tensor_targets(case):
    targets = torch.randint(0, 60, (BATCH, SEQ), generator=torch.Generator().manual_seed(2))
    case.prism.heads(targets, pos="all").check()


def test_components_structure(case):
    view = case.prism.view
    r = case.prism.full(7)
    kinds = set(r.components.kinds())
    assert {"embed", "head", "b_O", "b_U" if "b_U" in kinds else "embed"} <= kinds
    heads = r.select(kind="head")
    assert heads.values.shape[-1] == view.n_layers * view.n_heads * SEQ
    if not view.attn_only:
        assert r.select(kind="neuron").values.shape[-1] == view.n_layers * view.d_mlp
    # heads prism keeps MLPs whole, neurons prism keeps attention whole
    assert "mlp" in set(case.prism.heads(7).components.kinds())
    assert "attn" in set(case.prism.neurons(7).components.kinds())


def test_prisms_agree_on_layer_totals(case):
    p = case.prism
    res = p.residual(7).aggregate("kind", "layer")
    full = p.full(7)
    per_layer = full.aggregate("layer").values
    base = res.aggregate("layer").values
    assert torch.allclose(per_layer, base, atol=ATOL_FLOAT32 * 10, rtol=1e-5)


def test_source_positions_after_destination_are_zero(case):
    r = case.prism.heads(7, pos=3)
    future = r.select(kind="head", src=range(4, SEQ))
    assert future.values.abs().max() == 0


# HF's RMSNorm implementations compute in float32 even for float64 inputs, so the float64
# check runs on LayerNorm families (and every HookedTransformer family where available).
F64_FAMILIES = [n for n in FAMILIES if n in ("gpt2/bridge", "neox/bridge") or n.endswith("/hooked")]


@pytest.mark.parametrize("name", F64_FAMILIES)
def test_float64_is_tighter(name):
    case = build_case(name, True, torch.float64)
    r = case.prism.full([7, tp.LogitDiff(3, 4)])
    assert r.values.dtype == torch.float64
    r.check(atol=ATOL_FLOAT64, rtol=ATOL_FLOAT64)


@pytest.mark.parametrize("name", ["llama/bridge", "gemma/bridge"])
def test_bfloat16_model_computes_in_float32(name):
    case = build_case(name, True, torch.bfloat16)
    r = case.prism.full(7)
    assert r.values.dtype == torch.float32
    r.check(atol=RTOL_BF16, rtol=RTOL_BF16)


def test_softcap_pre_and_post():
    case = build_case("gemma2/bridge", True)
    p = case.prism
    post = p.full(7)
    pre = p.full(7, softcap="pre")
    assert post.explains.startswith("post-softcap") and pre.explains == "pre-softcap logit"
    cap = p.view.softcap
    assert torch.allclose(cap * torch.tanh(pre.logits / cap), post.logits, atol=1e-5)
    post.check()
    pre.check()
    # post-cap terms are pre-cap terms times a frozen ratio rho per (batch, pos, target)
    rho = post.logits / pre.logits
    assert torch.allclose(post.values, pre.values * rho[..., None], atol=1e-6)


def test_logit_diff_is_difference_of_decompositions(case):
    p = case.prism
    a, b = p.full(" Paris", softcap="pre"), p.full(" Rome", softcap="pre")
    d = p.full(tp.LogitDiff(" Paris", " Rome"), softcap="pre")
    assert torch.allclose(d.values, a.values - b.values, atol=1e-5)


def test_direction_target_matches_unembedding_column(case):
    p = case.prism
    col = case.model.W_U[:, 7].detach()
    r_dir = p.full(tp.Direction(col, "W_U[:,7]"))
    r_tok = p.full(7, softcap="pre")
    assert r_dir.labels == r_tok.labels
    keep = [i for i, c in enumerate(r_tok.components) if c.kind != "b_U"]
    assert torch.allclose(r_dir.values[..., keep], r_tok.values[..., keep], atol=1e-5)
    assert r_dir.explains == "readout"
    r_dir.check()
