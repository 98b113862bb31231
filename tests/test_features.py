"""The feature prism: features + b_dec + error + later writes = the logit on every family;
removing a feature's decoder write (everything else frozen) moves the logit by minus its
term; hops through features are exact; a lossless dictionary has no error; bad inputs."""

import numpy as np
import pytest
import torch

import tlprisms as tp
from tlprisms._core.readout import Recorded, final_readout
from tlprisms._core.result import ATOL_FLOAT32
from tlprisms._prisms.features import dictionary_input
from tlprisms._seam import Copy, Removal, Site, run_frozen
from tlprisms._seam._cache import CacheView
from tlprisms.demo import load_demo_model, load_demo_sae
from tlprisms.errors import ArgumentError, PositionError

from conftest import BATCH, SEQ, build_case
from families import FAMILIES

#: random dictionaries: features and their scale
N_FEATURES = 48
WEIGHT_SCALE = 0.3
#: the demo SAE reconstructs the demo prompts' stream to this relative error, with fewer
#: active features than this on average
DEMO_RECONSTRUCTION, DEMO_L0 = 0.3, 32


def random_dictionary(d_model: int, hook: str, seed: int, **kw) -> tp.Dictionary:
    g = torch.Generator().manual_seed(seed)
    skip = kw.pop("skip", False)
    return tp.Dictionary(
        torch.randn(d_model, N_FEATURES, generator=g) / d_model**0.5,
        torch.randn(N_FEATURES, generator=g) * 0.1,
        torch.randn(N_FEATURES, d_model, generator=g) * WEIGHT_SCALE,
        torch.randn(d_model, generator=g) * WEIGHT_SCALE,
        hook,
        W_skip=torch.randn(d_model, d_model, generator=g) * 0.01 if skip else None,
        **kw,
    )


def stack(model, variant: str) -> list:
    """A residual SAE before layer 1 plus, where the model has MLPs, a transcoder on the
    last layer's MLP (with a skip connection) or an mlp_out SAE."""
    d, L = model.cfg.d_model, model.cfg.n_layers
    out = [random_dictionary(d, "blocks.0.hook_resid_post", 1, activation="topk", k=5)]
    if not model.cfg.attn_only:
        last = L - 1
        if variant == "transcoder":
            out.append(
                random_dictionary(
                    d,
                    f"blocks.{last}.hook_mlp_out",
                    2,
                    input_hook=f"blocks.{last}.ln2.hook_normalized",
                    skip=True,
                )
            )
        else:
            out.append(random_dictionary(d, f"blocks.{last}.hook_attn_out", 3))
    return out


@pytest.mark.parametrize("variant", ["transcoder", "attn_out"])
def test_complete_on_every_family(case, variant):
    prism = case.prism
    dicts = stack(case.model, variant)
    r = prism.features(" Paris", dicts).check()
    assert r.values.shape[:3] == (BATCH, 1, 1)
    assert (r.components.kinds() == "feature").sum() == N_FEATURES * len(dicts)
    assert {"b_dec", "error"} <= set(r.components.kinds())
    # the same logit as the residual prism explains
    assert torch.equal(r.logits, prism.residual(" Paris").logits)
    # no embedding term left: the residual dictionary replaces it
    assert "embed" not in set(r.components.kinds())
    if variant == "transcoder":  # positions: one per row, and all (bounded as the prisms)
        prism.features([7, tp.LogitDiff(3, 4)], dicts, pos=[1, SEQ - 1, 3]).check()
        prism.features(tp.NextToken(), dicts, pos="all").check()


def test_error_is_zero_for_a_lossless_dictionary():
    """W_enc = [I, -I], W_dec = [I; -I]: relu(x) - relu(-x) = x, so x_hat = x exactly."""
    case = build_case("llama/bridge", True)
    d = case.model.cfg.d_model
    eye = torch.eye(d)
    lossless = tp.Dictionary(
        torch.cat([eye, -eye], 1),
        torch.zeros(2 * d),
        torch.cat([eye, -eye], 0),
        torch.zeros(d),
        "blocks.1.hook_resid_pre",
    )
    r = case.prism.features(" Paris", lossless).check()
    err = r.select(kind="error").values
    assert err.abs().max() <= ATOL_FLOAT32 * r.logits.abs().max()


def _demo():
    model = load_demo_model()
    prism = tp.LogitPrism.run(model, ["The capital of France is", "The capital of Japan is"])
    return model, prism


def test_removing_a_feature_moves_the_logit_by_minus_its_term():
    """A feature of an SAE at resid_pre 0: its decoder write is subtracted from the stream
    in a real forward pass with every norm scale, pattern and layer output frozen."""
    model, prism = _demo()
    d = model.cfg.d_model
    sae = random_dictionary(d, "blocks.0.hook_resid_pre", 5)
    r = prism.features(" Paris", sae)
    top = r.top(3, batch=0, kind="feature")
    cv = CacheView(prism.view, prism.cache, "test")
    fr = final_readout(Recorded(cv, prism.tokens), " Paris", -1)
    at = prism.n_ctx - 1
    x = cv.at(Site.RESID_PRE, 0, torch.full((prism.batch, 1), at))
    acts = sae.encode(x)[0, 0]
    for f, term in zip(top["feature"], top["value"]):
        vec = acts[f] * sae.W_dec[f]
        copy = Copy(row=0, removal=Removal("embed", -1, at, vector=vec))
        mine, clean = run_frozen(
            prism.view, prism.tokens, [copy], Site.FINAL_RESID, None, lambda p: p * 0
        )
        delta = (mine - clean)[:, at] @ fr.readout.u[0, 0, 0] * fr.readout.inv_s[0, 0]
        assert abs(float(delta) + term) <= 1e-4 * (1 + abs(term))
        assert abs(term) > 1e-3  # a real term


def test_chained_hops_through_features_are_exact():
    _, prism = _demo()
    sae = load_demo_sae()
    r = prism.features(" Paris", sae).check()
    f = int(r.top(1, batch=0, kind="feature")["feature"][0])
    term = r.select(kind="feature", feature=f).values[..., 0]
    hop = tp.Hop("feature", sae, f)
    c = prism.chain(" Paris", [hop]).check()
    assert torch.allclose(c.logits[:, 0, 0], term[:, 0, 0], atol=1e-4)
    assert str(hop) == f"L1F{f}"
    # the feature's pre-activation split by the attention heads it reads, and by another
    # dictionary's features
    prism.chain(" Paris", [hop], heads="all").check()
    lower = random_dictionary(prism.view.d_model, "blocks.0.hook_resid_pre", 6)
    c2 = prism.features(" Paris", [lower], path=[hop])
    c2.check()
    assert "feature" in set(c2.components.kinds())
    # head -> feature -> heads
    c3 = prism.features(" Paris", [lower], path=[tp.Hop("head", 1, 0, src=3), hop])
    c3.check()


def test_transcoder_hop_through_ln2():
    case = build_case("gemma2/bridge", True)
    L = case.model.cfg.n_layers - 1
    tc = random_dictionary(
        case.model.cfg.d_model,
        f"blocks.{L}.hook_mlp_out",
        7,
        input_hook=f"blocks.{L}.ln2.hook_normalized",
    )
    r = case.prism.features(7, tc).check()
    f = int(r.top(1, batch=0, kind="feature")["feature"][0])
    c = case.prism.chain(7, [tp.Hop("feature", tc, f)]).check()
    want = r.select(kind="feature", feature=f).values[:, 0, 0, 0]
    assert torch.allclose(c.logits[:, 0, 0], want, atol=1e-4)


def test_demo_sae_reconstructs_and_frames():
    _, prism = _demo()
    sae = load_demo_sae()
    r = prism.features(" Paris", sae).check()
    # a trained SAE: it reconstructs the stream it reads, with few active features
    cv = CacheView(prism.view, prism.cache, "test")
    x = cv.at(Site.RESID_PRE, 1, torch.arange(1, prism.n_ctx).expand(prism.batch, -1))
    acts = sae.encode(x)
    rel = (sae.decode(acts) - x).norm(dim=-1) / x.norm(dim=-1)
    assert rel.max() < DEMO_RECONSTRUCTION and (acts > 0).sum(-1).float().mean() < DEMO_L0
    assert (r.select(kind="feature").values != 0).sum() == (acts[:, -1] > 0).sum()
    frame = r.to_frame()
    assert "feature" in frame.columns
    assert set(frame[frame.kind == "feature"].feature) == set(range(256))
    assert (frame[frame.kind != "feature"].feature == -1).all()


@pytest.mark.parametrize(
    "make, error, fragment",
    [
        (lambda d: random_dictionary(d + 1, "blocks.0.hook_resid_pre", 0), ArgumentError, "d_in"),
        (lambda d: random_dictionary(d, "blocks.9.hook_resid_pre", 0), ArgumentError, "layers"),
        (lambda d: "sae", ArgumentError, "tlprisms.Dictionary"),
        (lambda d: [], ArgumentError, "non-empty list"),
        (
            lambda d: [
                random_dictionary(d, "blocks.0.hook_resid_pre", 0),
                random_dictionary(d, "blocks.1.hook_resid_pre", 1),
            ],
            ArgumentError,
            "one residual stream",
        ),
        (
            lambda d: [
                random_dictionary(d, "blocks.1.hook_resid_pre", 0),
                random_dictionary(d, "blocks.0.hook_mlp_out", 1),
            ],
            ArgumentError,
            "already splits",
        ),
        (
            lambda d: [
                random_dictionary(d, "blocks.1.hook_mlp_out", 0),
                random_dictionary(d, "blocks.1.hook_mlp_out", 1),
            ],
            ArgumentError,
            "one per write",
        ),
    ],
)
def test_bad_dictionaries(make, error, fragment):
    _, prism = _demo()
    with pytest.raises(error, match=fragment):
        prism.features(" Paris", make(prism.view.d_model))


def test_bad_hops_and_positions():
    _, prism = _demo()
    sae = load_demo_sae()
    with pytest.raises(ArgumentError, match="feature"):
        prism.chain(" Paris", [tp.Hop("feature", sae, 10_000)])
    with pytest.raises(ArgumentError, match="Dictionary"):
        tp.Hop("feature", 1, 3)
    with pytest.raises(PositionError):
        prism.features(" Paris", sae, pos=99)
    with pytest.raises(PositionError, match="one position"):
        prism.features(" Paris", sae, pos="all", path=[tp.Hop("feature", sae, 1)])
    # a feature of the dictionary at resid_pre 1 cannot be reached through layer 0's head
    with pytest.raises(ArgumentError, match="does not write"):
        prism.chain(" Paris", [tp.Hop("head", 0, 0, src=2), tp.Hop("feature", sae, 1)])


def test_features_by_family_names_every_component():
    """Labels: features are L{layer}F{f}; b_dec/error named by their dictionary's layer."""
    case = build_case(sorted(FAMILIES)[0], True)
    dicts = stack(case.model, "transcoder")
    r = case.prism.features(7, dicts)
    names = {str(c) for c in r.components}
    assert {"L0F0", "L0.b_dec", "L0.error"} <= names
    assert np.all(r.components.feature[r.components.kinds() == "feature"] >= 0)


def test_feature_template_is_the_direct_term():
    """weights.feature_templates times the activation and the final norm's 1/s is the
    feature's term in the prism."""
    model, prism = _demo()
    sae = load_demo_sae()
    r = prism.features(" Paris", sae)
    f = int(r.top(1, batch=0, kind="feature")["feature"][0])
    tmpl = tp.weights.feature_templates(model, sae, [f], [" Paris"]).values[0, 0]
    cv = CacheView(prism.view, prism.cache, "test")
    last = torch.full((prism.batch, 1), prism.n_ctx - 1)
    act = sae.encode(cv.at(Site.RESID_PRE, 1, last))[0, 0, f]
    fr = final_readout(Recorded(cv, prism.tokens), " Paris", -1)
    want = act * tmpl * fr.readout.inv_s[0, 0]
    got = r.select(kind="feature", feature=f).values[0, 0, 0, 0]
    assert torch.allclose(got, want, rtol=1e-4)
    top = tp.weights.feature_top_tokens(model, sae, f, k=5)
    assert top["promoted"][0][1] >= top["suppressed"][0][1]
    ov = tp.weights.ov_feature_map(model, 0, 2, sae, [" France", " Japan"], [f, 0])
    assert ov.values.shape == (2, 2) and ov.cols == [f"L1F{f}", "L1F0"]
    with pytest.raises(ArgumentError, match="does not hold layer 1"):
        tp.weights.ov_feature_map(model, 1, 0, sae, [" France"], [f])


def test_render_feature_terms():
    model, prism = _demo()
    sae = load_demo_sae()
    r = prism.features(" Paris", sae)
    fig = tp.render.feature_terms(r, model, sae, k=4, tokens=2)
    rows = fig.data["features"]
    top = r.top(4, batch=0, kind="feature")
    assert [x["feature"] for x in rows] == list(top["feature"])
    assert all(len(x["promoted"]) == 2 for x in rows)
    assert "L1.error" in fig.svg and "L1.b_dec" in fig.svg
    with pytest.raises(ArgumentError, match="no feature terms"):
        tp.render.feature_terms(prism.residual(" Paris"), model, sae)


def test_removing_a_transcoder_feature_moves_the_logit_by_minus_its_term():
    """A transcoder on the last MLP: its feature's write is subtracted from hook_mlp_out in a
    forward pass with the final norm's scale frozen (no later block)."""
    model, prism = _demo()
    d = model.cfg.d_model
    tc = random_dictionary(
        d, "blocks.1.hook_mlp_out", 8, input_hook="blocks.1.ln2.hook_normalized", skip=True
    )
    r = prism.features(" Paris", tc)
    cv = CacheView(prism.view, prism.cache, "test")
    at = prism.n_ctx - 1
    acts = tc.encode(dictionary_input(cv, tc, torch.full((prism.batch, 1), at), torch.float32))
    pid = model.to_single_token(" Paris")
    scale = prism.cache["ln_final.hook_scale"]
    for f, term in zip(*r.top(3, batch=0, kind="feature")[["feature", "value"]].T.values):
        vec = acts[0, 0, int(f)] * tc.W_dec[int(f)]

        def remove(x, hook, vec=vec):
            x[:1, at] -= vec
            return x

        with torch.no_grad():
            logits = model.run_with_hooks(
                prism.tokens,
                fwd_hooks=[
                    ("blocks.1.hook_mlp_out", remove),
                    ("ln_final.hook_scale", lambda x, hook: scale),
                ],
            )
        delta = float(logits[0, at, pid] - prism.logits[0, at, pid])
        assert abs(delta + term) <= 1e-4 * (1 + abs(term)) and abs(term) > 1e-3


def test_sparse_and_dense_reads_agree(monkeypatch):
    """A sparse code is read through its active features only; the terms are the same."""
    import tlprisms._prisms.features as engine

    _, prism = _demo()
    sae = load_demo_sae()
    monkeypatch.setattr(engine, "_SPARSE_FRACTION", 1.0)
    sparse = prism.features(" Paris", sae).check()
    monkeypatch.setattr(engine, "_SPARSE_FRACTION", 0.0)
    dense = prism.features(" Paris", sae).check()
    assert torch.allclose(sparse.values, dense.values, atol=1e-5)


@pytest.mark.parametrize("name", ["gpt2/bridge", "llama/bridge", "gemma2/bridge"])
def test_top_k_keeps_the_dense_terms_and_the_totals(name):
    """``top_k``/``min_abs`` on the feature prism: the kept terms are the dense terms bit for
    bit, every remainder is the sum of what it replaces, and the totals stay exact."""
    prism = build_case(name, True).prism
    dicts = stack(build_case(name, True).model, "transcoder")
    dense = prism.features([7, tp.LogitDiff(3, 4)], dicts, pos="all")
    for kw in ({"top_k": 4}, {"min_abs": 0.1}, {"top_k": 3, "min_abs": 0.05}):
        sparse = prism.features([7, tp.LogitDiff(3, 4)], dicts, pos="all", **kw).check()
        back = sparse.to_dense()
        assert torch.allclose(back.total(), dense.total(), rtol=1e-5, atol=1e-5)
        index = sparse.index
        kept = index >= 0
        n_dense = len(dense.components)
        real = kept & (index < n_dense)
        got = sparse.values[real]
        want = dense.values.gather(-1, index.clamp(min=0).clamp(max=n_dense - 1))[real]
        assert torch.equal(got, want)
        if "top_k" in kw:
            free = ~sparse.components.is_constant()[index.clamp(min=0).cpu().numpy()]
            is_rest = np.asarray(sparse.components.kinds())[index.clamp(min=0).cpu().numpy()]
            n_terms = (real.cpu().numpy() & free & (is_rest != "rest")).sum(-1)
            assert n_terms.max() <= kw["top_k"]
