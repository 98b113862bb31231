"""verify on the feature prism (issue 21): every feature, b_dec, skip and error term is removed
as the vector it writes at its site, in a frozen forward pass; genuine results pass on every
family (residual SAEs, mlp_out SAEs, transcoders with a skip), tampered ones fail, and terms
that cannot be removed alone are named in the certificate."""

import dataclasses

import pytest
from test_features import stack

from conftest import build_case
from families import FAMILIES

FAMILY_CASES = [(n, f) for n in FAMILIES for f in (True, False)]


@pytest.mark.parametrize("variant", ["transcoder", "sae"])
@pytest.mark.parametrize(
    "spec", FAMILY_CASES, ids=[f"{n}-{'folded' if f else 'unfolded'}" for n, f in FAMILY_CASES]
)
def test_verify_passes_genuine_feature_results(spec, variant):
    case = build_case(*spec)
    p = case.prism
    r = p.features(7, stack(case.model, variant))
    v = p.verify(r, k=12, sample=8)
    assert v.ok, str(v)
    kinds = {c.kind for c in v.components}
    checked = bool(kinds & {"feature", "error", "b_dec", "skip"})
    # behind a post-norm (Gemma 2) a dictionary term is no one vector of the stream: named
    assert checked or "dictionary terms" in str(v), str(v)


def test_verify_fails_a_tampered_feature_term():
    case = build_case("gpt2/bridge", True)
    p = case.prism
    r = p.features(7, stack(case.model, "transcoder"))
    kinds = r.components.kinds()
    j = int(((kinds == "feature") * r.values[0, 0, 0].abs().numpy()).argmax())
    vals = r.values.clone()
    vals[0, 0, 0, j] += 1.0
    vals[0, 0, 0, (kinds == "error").nonzero()[0][0]] -= 1.0  # the total is unchanged
    assert not p.verify(dataclasses.replace(r, values=vals), k=40, sample=0).ok


@pytest.mark.parametrize(
    "spec", FAMILY_CASES, ids=[f"{n}-{'folded' if f else 'unfolded'}" for n, f in FAMILY_CASES]
)
def test_verify_cross_layer_transcoder_terms(spec, tmp_path):
    """A CLT feature's writes removed from every later layer's MLP output at once (b_dec and
    the error from their one layer's): genuine terms pass on every family (post-normed
    Gemma 2 too: hook_mlp_out is what the stream adds), a tampered feature term fails."""
    from test_dictionary_formats import write_clt

    import tlprisms as tp

    case = build_case(*spec)
    p = case.prism
    n, d = case.model.cfg.n_layers, case.model.cfg.d_model
    folder, _, _ = write_clt(tmp_path / "clt", n=n, d=d, feature_input_hook="mlp.hook_in", seed=3)
    clt = tp.Dictionary.from_circuit_tracer_clt(folder)
    r = p.features(7, clt)
    v = p.verify(r, k=r.values.numel(), sample=0)  # every term
    assert v.ok, repr(v)
    assert {"feature", "error", "b_dec"} <= {c.kind for c in v.components}, repr(v)
    assert "dictionary terms" not in str(v)
    kinds = r.components.kinds()
    early = (kinds == "feature") & (r.components.layer < n - 1)  # it writes to later layers
    j = int((early * r.values[0, 0, 0].abs().numpy()).argmax())
    vals = r.values.clone()
    vals[0, 0, 0, j] += 0.5
    vals[0, 0, 0, (kinds == "error").nonzero()[0][0]] -= 0.5  # the total is unchanged
    bad = p.verify(dataclasses.replace(r, values=vals), k=r.values.numel(), sample=0)
    assert not bad.ok and str(bad).startswith("FAILED:")
