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
