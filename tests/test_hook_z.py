"""Per-head attention SAEs at ``blocks.L.attn.hook_z``: z (flattened over heads) = features +
b_dec + error, each written through W_O of the heads it decodes to; the split is exact on
every family (folded and unfolded, with a residual dictionary before it, heads split, every
position); subtracting a feature's decode from the recorded hook_z (everything after the
layer frozen) moves the readout by minus its term; a lossless dictionary has an error of
exactly 0; a hop through a z feature splits its input by head source and is exact; SAELens's
hook_z SAEs load with the same encoder; wrong sizes and readers that do not read per-head
dictionaries are refused."""

import pytest
import torch

import tlprisms as tp
from tlprisms._core.readout import Recorded, final_readout, read_logits
from tlprisms._seam._cache import CacheView
from tlprisms.demo import load_demo_model
from tlprisms.errors import ArgumentError

from conftest import SEQ, build_case

#: random z dictionaries: features and their scale
N_FEATURES = 40
WEIGHT_SCALE = 0.3
#: a feature's causal change matches minus its term to this fraction (float32 forward passes)
CAUSAL_RTOL = 1e-4
#: a term checked causally is at least this large (not a vacuous 0 = 0)
REAL_TERM = 1e-3
#: SAELens's encoder and ours agree to this (float32, the same weights)
ENCODE_ATOL = 1e-5


def z_width(model) -> int:
    return model.cfg.n_heads * model.cfg.d_head


def z_dictionary(model, layer: int, seed: int, width: int = 0, **kw) -> tp.Dictionary:
    g = torch.Generator().manual_seed(seed)
    n = width or z_width(model)
    return tp.Dictionary(
        torch.randn(n, N_FEATURES, generator=g) / n**0.5,
        torch.randn(N_FEATURES, generator=g) * 0.1,
        torch.randn(N_FEATURES, n, generator=g) * WEIGHT_SCALE,
        torch.randn(n, generator=g) * WEIGHT_SCALE,
        f"blocks.{layer}.attn.hook_z",
        **kw,
    )


def resid_dictionary(model, hook: str, seed: int) -> tp.Dictionary:
    g = torch.Generator().manual_seed(seed)
    d = model.cfg.d_model
    return tp.Dictionary(
        torch.randn(d, N_FEATURES, generator=g) / d**0.5,
        torch.randn(N_FEATURES, generator=g) * 0.1,
        torch.randn(N_FEATURES, d, generator=g) * WEIGHT_SCALE,
        torch.randn(d, generator=g) * WEIGHT_SCALE,
        hook,
        activation="topk",
        k=5,
    )


# --------------------------------------------------------------------------- completeness
def test_complete_on_every_family(case):
    prism, model = case.prism, case.model
    L = model.cfg.n_layers
    zs = [z_dictionary(model, layer, seed=layer) for layer in range(L)]
    r = prism.features(7, zs).check()
    kinds = r.components.kinds()
    assert (kinds == "feature").sum() == N_FEATURES * L
    assert torch.equal(r.logits, prism.residual(7).logits)
    # the heads are replaced; b_O (and a post-norm's bias) stay, once per layer
    assert not {"attn", "head"} & set(kinds)
    assert (kinds == "b_O").sum() == L and (kinds == "error").sum() == L
    # heads split elsewhere, every position, a residual dictionary before the last z one
    prism.features(7, zs[-1:], heads="all").check()
    sparse = z_dictionary(model, 0, seed=1, activation="topk", k=2)  # read sparsely
    prism.features(7, sparse).check()
    prism.features(tp.NextToken(), zs[-1:], pos="all").check()
    prism.features([7, tp.LogitDiff(3, 4)], zs[-1:], pos=[1, SEQ - 1, 3]).check()
    if L > 1:
        before = resid_dictionary(model, "blocks.0.hook_resid_post", 9)
        r2 = prism.features(7, [before, zs[-1]]).check()
        assert (r2.components.kinds() == "feature").sum() == 2 * N_FEATURES


def test_the_term_is_the_decode_through_W_O():
    """On a family without a post-norm: each feature's term is ``a_f (W_dec[f] viewed [H,
    dh]) . (W_O u) / s``, with a_f read off the recorded hook_z."""
    case = build_case("llama/bridge", True)  # grouped key/values: z has every query head
    model, prism = case.model, case.prism
    L = model.cfg.n_layers - 1
    H, dh = model.cfg.n_heads, model.cfg.d_head
    assert model.cfg.n_key_value_heads < H
    d = z_dictionary(model, L, seed=3)
    r = prism.features(7, d)
    cv = CacheView(prism.view, prism.cache, "test")
    fr = final_readout(Recorded(cv, prism.tokens), 7, -1)
    u, inv_s = fr.readout.u[0, 0, 0], fr.readout.inv_s[:, 0]
    z = case.cache[f"blocks.{L}.attn.hook_z"][:, -1].flatten(-2)  # [B, H * dh]
    acts = d.encode(z)
    W_O = model.blocks[L].attn.W_O.detach()  # [H, dh, d]
    read = torch.einsum("fhd,hdm,m->f", d.W_dec.view(-1, H, dh), W_O, u)  # [F]
    want = acts * read * inv_s[:, None]
    got = r.select(kind="feature").values[:, 0, 0]
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)


def test_error_is_exactly_zero_for_a_lossless_dictionary(case):
    """W_enc = [I, -I], W_dec = [I; -I]: relu(z) - relu(-z) = z, so the reconstruction is z
    bit for bit and the error term is exactly 0."""
    model = case.model
    n = z_width(model)
    eye = torch.eye(n)
    lossless = tp.Dictionary(
        torch.cat([eye, -eye], 1),
        torch.zeros(2 * n),
        torch.cat([eye, -eye], 0),
        torch.zeros(n),
        f"blocks.{model.cfg.n_layers - 1}.attn.hook_z",
    )
    r = case.prism.features(7, lossless).check()
    err = r.select(kind="error").values
    assert torch.equal(err, torch.zeros_like(err))


# --------------------------------------------------------------------------- causal
@pytest.mark.parametrize("name", ["gpt2/bridge", "llama/bridge", "gemma2/bridge"])
def test_removing_a_feature_moves_the_readout_by_minus_its_term(name):
    """Subtract ``a_f W_dec[f]`` from the recorded hook_z of the last layer at the explained
    position, holding that layer's post-attention norm scale and MLP output at their clean
    values; the final stream's change, read by the frozen readout (times the soft-cap's
    frozen slope where the model has one), is minus the term."""
    case = build_case(name, True)
    model, prism = case.model, case.prism
    L = model.cfg.n_layers - 1
    H, dh = model.cfg.n_heads, model.cfg.d_head
    d = z_dictionary(model, L, seed=11)
    r = prism.features(7, d)
    cv = CacheView(prism.view, prism.cache, "test")
    fr, ex = read_logits(Recorded(cv, prism.tokens), 7, -1, r.request.softcap)
    slope = float(ex.weights[0, 0, 0, 0])
    at = SEQ - 1
    z_hook = f"blocks.{L}.attn.hook_z"
    acts = d.encode(case.cache[z_hook][:, at].flatten(-2))  # [B, F]
    frozen = {
        name: case.cache[name]
        for name in (f"blocks.{L}.ln1_post.hook_scale", f"blocks.{L}.hook_mlp_out")
        if name in case.cache.keys()
    }
    top = r.top(3, batch=0, kind="feature")
    for f, term in zip(top["feature"], top["value"]):
        vec = (acts[0, int(f)] * d.W_dec[int(f)]).view(H, dh)
        got = {}

        def remove(x, hook, vec=vec):
            x = x.clone()
            x[0, at] -= vec
            return x

        def grab(x, hook, got=got):
            got["resid"] = x.detach()

        hooks = [(z_hook, remove), (f"blocks.{L}.hook_resid_post", grab)]
        hooks += [(n, lambda x, hook, v=v: v) for n, v in frozen.items()]
        with torch.no_grad():
            model.run_with_hooks(case.tokens, fwd_hooks=hooks)
        dx = got["resid"][0, at] - case.cache[f"blocks.{L}.hook_resid_post"][0, at]
        delta = float(dx @ fr.readout.u[0, 0, 0] * fr.readout.inv_s[0, 0]) * slope
        assert abs(delta + term) <= CAUSAL_RTOL * (1 + abs(term))
        assert abs(term) > REAL_TERM


# --------------------------------------------------------------------------- hops
@pytest.mark.parametrize("name", ["gpt2/bridge", "llama/bridge", "gemma2/bridge", "neox/bridge"])
def test_hop_through_a_z_feature_is_exact(name):
    case = build_case(name, False)
    model, prism = case.model, case.prism
    L = model.cfg.n_layers - 1
    d = z_dictionary(model, L, seed=5)
    r = prism.features(7, d).check()
    f = int(r.top(1, batch=0, kind="feature")["feature"][0])
    want = r.select(kind="feature", feature=f).values[:, 0, 0, 0]
    hop = tp.Hop.feature(d, f)
    c = prism.chain(7, [hop]).check()
    assert torch.allclose(c.logits[:, 0, 0], want, atol=1e-5, rtol=1e-5)
    kinds = set(c.components.kinds())
    assert {"b_enc", "b_V"} <= kinds
    # its sources split by heads and by an earlier dictionary's features
    prism.chain(7, [hop], heads="all").check()
    if L > 0:
        lower = resid_dictionary(model, "blocks.0.hook_resid_pre", 6)
        c2 = prism.features(7, [lower], path=[hop]).check()
        assert "feature" in set(c2.components.kinds())
        # a z dictionary split after a head hop, and a hop into the z feature after a neuron
        prism.features(7, [z_dictionary(model, 0, seed=7)], path=[tp.Hop("head", L, 0)]).check()
    with pytest.raises(ArgumentError, match="make it the last hop"):
        prism.chain(7, [hop, tp.Hop("head", 0, 0)])


def test_hop_splits_the_pre_activation_by_source():
    """What the hop names source j (every writer read there, b_V and ln1's bias at j) is
    ``c * sum_h A[h,i,j] w[h] . v_j[kv(h)]`` from the recorded pattern and values, with ``c``
    the feature's term over its activation (a ReLU feature: gate 1)."""
    case = build_case("llama/bridge", False)
    model, prism = case.model, case.prism
    L, at = model.cfg.n_layers - 1, SEQ - 1
    H, G, dh = model.cfg.n_heads, model.cfg.n_key_value_heads, model.cfg.d_head
    d = z_dictionary(model, L, seed=5)
    r = prism.features(7, d)
    f = int(r.top(1, batch=0, kind="feature")["feature"][0])
    c = prism.chain(7, [tp.Hop.feature(d, f)])
    z = case.cache[f"blocks.{L}.attn.hook_z"][:, at].flatten(-2)
    acts = d.encode(z)[:, f]  # [B]
    assert bool((acts > 0).all())
    coef = r.select(kind="feature", feature=f).values[:, 0, 0, 0] / acts
    A = case.cache[f"blocks.{L}.attn.hook_pattern"][:, :, at]  # [B, H, src]
    v = case.cache[f"blocks.{L}.attn.hook_v"].repeat_interleave(H // G, 2)  # [B, src, H, dh]
    w = d.W_enc[:, f].view(H, dh)
    want = torch.einsum("bhj,bjhd,hd->bj", A, v, w) * coef[:, None]  # [B, src]
    at_src = c.components.at
    for j in range(SEQ):
        got = c.values[:, 0, 0][:, torch.as_tensor(at_src == j)].sum(-1)
        assert torch.allclose(got, want[:, j], atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------- loading
def test_saelens_hook_z_sae_encodes_as_saelens_does():
    """A SAELens hook_z SAE reshapes z [.., H, dh] to [.., H * dh] before encoding: the
    weights load unchanged and encode the flattened z to the same activations."""
    sae_lens = pytest.importorskip("sae_lens")
    from sae_lens.saes.sae import SAEMetadata

    model = load_demo_model()
    n = z_width(model)
    cfg = sae_lens.StandardSAEConfig(
        d_in=n,
        d_sae=N_FEATURES,
        reshape_activations="hook_z",
        apply_b_dec_to_input=True,
        metadata=SAEMetadata(hook_name="blocks.1.attn.hook_z"),
    )
    sae = sae_lens.StandardSAE(cfg)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    d = tp.Dictionary.from_saelens(sae)
    assert d.per_head and d.hook == "blocks.1.attn.hook_z" and d.subtract_b_dec
    z = torch.randn(3, model.cfg.n_heads, model.cfg.d_head, generator=g)
    with torch.no_grad():
        want = sae.encode(z)
    assert torch.allclose(d.encode(z.flatten(-2)), want, atol=ENCODE_ATOL)
    prism = tp.LogitPrism.run(model, "The capital of France is")
    prism.features(" Paris", d).check()


def write_saelens_z(folder, n: int, **cfg) -> dict:
    """A SAELens folder (cfg.json + sae_weights.safetensors) of a hook_z SAE."""
    import json

    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(4)
    w = {
        "W_enc": torch.randn(n, N_FEATURES, generator=g) / n**0.5,
        "b_enc": torch.randn(N_FEATURES, generator=g) * 0.1,
        "W_dec": torch.randn(N_FEATURES, n, generator=g) * WEIGHT_SCALE,
        "b_dec": torch.randn(n, generator=g) * WEIGHT_SCALE,
    }
    config = {
        "architecture": "standard",
        "d_in": n,
        "d_sae": N_FEATURES,
        "hook_name": "blocks.1.attn.hook_z",
        "hook_head_index": None,
        "reshape_activations": "hook_z",
        "apply_b_dec_to_input": True,
    }
    config.update(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(config))
    save_file(w, str(folder / "sae_weights.safetensors"))
    return w


def test_saelens_folder_hook_z(tmp_path):
    case = build_case("gpt2/bridge", True)
    n = z_width(case.model)
    w = write_saelens_z(tmp_path / "z", n)
    d = tp.Dictionary.from_saelens_folder(tmp_path / "z")
    assert d.per_head and torch.equal(d.W_enc, w["W_enc"]) and d.subtract_b_dec
    case.prism.features(7, d).check()
    for cfg, fragment in (
        ({"hook_name": "blocks.1.hook_resid_pre"}, "reshape_activations='hook_z'"),
        ({"hook_head_index": 2}, "hook_head_index=2: an SAE on one head"),
        ({"reshape_activations": "other"}, "reshape_activations='other'"),
    ):
        write_saelens_z(tmp_path / "bad", n, **cfg)
        with pytest.raises(ArgumentError, match=fragment):
            tp.Dictionary.from_saelens_folder(tmp_path / "bad")


# --------------------------------------------------------------------------- refusals
def test_refusals():
    case = build_case("llama/bridge", True)
    model, prism = case.model, case.prism
    n = z_width(model)
    with pytest.raises(ArgumentError, match=r"n_heads \* d_head = 4 \* 8 = 32"):
        prism.features(7, z_dictionary(model, 1, 0, width=n - 8))
    with pytest.raises(ArgumentError, match="d_in == d_out"):
        tp.Dictionary(torch.zeros(n, 4), torch.zeros(4), torch.zeros(4, 8), torch.zeros(8),
                      "blocks.0.attn.hook_z")  # fmt: skip
    with pytest.raises(ArgumentError, match="Leave input_hook out"):
        z_dictionary(model, 1, 0, input_hook="blocks.1.hook_resid_pre")
    with pytest.raises(ArgumentError, match="only a dictionary at that same hook"):
        tp.Dictionary(torch.zeros(n, 4), torch.zeros(4), torch.zeros(4, 32), torch.zeros(32),
                      "blocks.1.hook_mlp_out", input_hook="blocks.1.attn.hook_z")  # fmt: skip
    with pytest.raises(ArgumentError, match="has none"):
        z_dictionary(model, 1, 0, W_skip=torch.zeros(n, n))
    with pytest.raises(ArgumentError, match="had|layers; it was made for another model"):
        prism.features(7, z_dictionary(model, 7, 0))
    # one dictionary per attention write
    attn_out = resid_dictionary(model, "blocks.1.hook_attn_out", 1)
    with pytest.raises(ArgumentError, match="two dictionaries rewrite layer 1's attention"):
        prism.features(7, [attn_out, z_dictionary(model, 1, 0)])
    # readers that do not read per-head dictionaries say so
    d = z_dictionary(model, 1, 0)
    with pytest.raises(ArgumentError, match="does not read per-head dictionaries"):
        tp.weights.feature_top_tokens(model, d, 0)
    with pytest.raises(ArgumentError, match="is an SAE"):
        prism.graph(7, -1, nodes=[d])


def test_verify_leaves_z_terms_unchecked():
    """verify has no removal of a z feature's write: it checks the other terms and counts the
    dictionary's as skipped (never as verified)."""
    case = build_case("gpt2/bridge", True)
    r = case.prism.features(7, z_dictionary(case.model, 1, 0))
    v = case.prism.verify(r, k=3, sample=3)
    checked = {str(c.kind) for c in v.components}
    assert not {"feature", "b_dec", "error"} & checked
    assert v.skipped and v.ok
