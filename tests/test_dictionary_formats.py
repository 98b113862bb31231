"""Gemma Scope 2 and sparsify dictionaries, each read from files this test writes in that
format: the weights land where the format means them; features + b_dec + error + later writes
= the logit; removing one feature's write moves the logit by minus its term; a designed
lossless dictionary has an error of exactly 0; a file of the wrong shape, model or site is
refused naming the file; per-head z SAEs (Gemma Scope 2's o_proj input) are read as
blocks.L.attn.hook_z (their prism: tests/test_hook_z.py)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import tlprisms as tp
from tlprisms._core.readout import Recorded, final_readout
from tlprisms._prisms.features import dictionary_input
from tlprisms._seam import Copy, Removal, Site, run_frozen
from tlprisms._seam._cache import CacheView
from tlprisms.demo import load_demo_model
from tlprisms.errors import ArgumentError

from conftest import build_case
from families import FAMILIES

D, F = 128, 24  # the demo model's d_model, and a small dictionary


def rand(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.fixture(scope="module")
def demo():
    model = load_demo_model()
    return model, tp.LogitPrism.run(model, ["The capital of France is", "The capital of Japan is"])


# --------------------------------------------------------------------------- Gemma Scope 2
def gs2_tensors(d: int = D, f: int = F, seed: int = 0, affine: bool = False) -> dict:
    out = {
        "w_enc": rand(d, f, seed=seed, scale=d**-0.5),
        "w_dec": rand(f, d, seed=seed + 1, scale=0.3),
        "b_enc": rand(f, seed=seed + 2, scale=0.1),
        "b_dec": rand(d, seed=seed + 3, scale=0.3),
        "threshold": rand(f, seed=seed + 4).abs() * 0.05,
    }
    if affine:
        out["affine_skip_connection"] = rand(d, d, seed=seed + 5, scale=0.01)
    return out


def write_gs2(folder: Path, tensors: dict, layer: int, kind: str = "sae", **cfg) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    point = f"model.layers.{layer}.output"
    config = {
        "hf_hook_point_in": point
        if kind == "sae"
        else f"model.layers.{layer}.pre_feedforward_layernorm.output",
        "hf_hook_point_out": point
        if kind == "sae"
        else f"model.layers.{layer}.post_feedforward_layernorm.output",
        "width": int(tensors["b_enc"].shape[0]),
        "model_name": "google/gemma-3-1b-pt",
        "architecture": "jump_relu",
        "l0": 20,
        "affine_connection": "affine_skip_connection" in tensors,
        "type": kind,
    }
    config.update(cfg)
    (folder / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "params.safetensors"))
    return folder


def test_gemma_scope_2_sae_reads_the_format(tmp_path, demo):
    w = gs2_tensors()
    folder = write_gs2(tmp_path / "resid_post" / "layer_1_width_16k_l0_small", w, 1)
    d = tp.Dictionary.from_gemma_scope(folder)
    assert d.hook == "blocks.1.hook_resid_post" and not d.transcoder
    assert d.activation == "jumprelu" and d.W_skip is None and not d.subtract_b_dec
    assert torch.equal(d.W_enc, w["w_enc"]) and torch.equal(d.W_dec, w["w_dec"])
    assert torch.equal(d.threshold, w["threshold"])
    # the params.safetensors path reads the same; an agreeing hook= is accepted
    same = tp.Dictionary.from_gemma_scope(folder / "params.safetensors", "blocks.1.hook_resid_post")
    assert torch.equal(same.W_enc, d.W_enc)
    # Gemma Scope 2's encode: relu(pre) * (pre > threshold), thresholds >= 0
    x = rand(5, D, seed=9)
    pre = x @ w["w_enc"] + w["b_enc"]
    assert torch.equal(d.encode(x), torch.relu(pre) * (pre > w["threshold"]))
    _, prism = demo
    r = prism.features(" Paris", d).check()
    assert (r.components.kinds() == "feature").sum() == F


POST_NORM = [n for n in FAMILIES if n.startswith("gemma2/")]


@pytest.mark.parametrize("fold", [True, False])
@pytest.mark.parametrize("name", POST_NORM)
def test_gemma_scope_2_transcoder_after_the_post_norm(name, fold):
    """Gemma 2/3 blocks: the transcoder reads the MLP's input (after ln2's weight) and writes
    hook_mlp_out, which both TransformerLens versions record after the post-MLP norm."""
    case = build_case(name, fold)
    d_model, last = case.model.cfg.d_model, case.model.cfg.n_layers - 1
    w = gs2_tensors(d_model, F, seed=3, affine=True)
    tc = tp.Dictionary.from_gemma_scope(
        write_gs2(case_path(case) / f"layer_{last}", w, last, kind="transcoder")
    )
    assert tc.transcoder and tc.input_hook == f"blocks.{last}.mlp.hook_in"
    assert tc.hook == f"blocks.{last}.hook_mlp_out"
    assert torch.equal(tc.W_skip, w["affine_skip_connection"])  # x @ affine, as stored
    r = case.prism.features(" Paris", tc).check()
    assert {"skip", "error", "b_dec"} <= set(r.components.kinds())
    # the input is what the MLP reads: ln2 applied in full to the recorded stream
    cv = CacheView(case.prism.view, case.prism.cache, "test")
    B = case.tokens.shape[0]
    pos = torch.zeros(B, 1, dtype=torch.long)
    x = dictionary_input(cv, tc, pos, torch.float32)
    with torch.no_grad():  # the model's own ln2 module on the recorded stream
        mlp_in = case.model.blocks[last].ln2(case.cache[f"blocks.{last}.hook_resid_mid"])[:, :1]
    if f"blocks.{last}.mlp.hook_in" in case.cache:  # a bridge records it too
        assert torch.allclose(mlp_in, case.cache[f"blocks.{last}.mlp.hook_in"][:, :1], atol=1e-5)
    assert torch.allclose(x, mlp_in, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", POST_NORM)
def test_gemma_scope_2_post_norm_sites_complete(tmp_path, name):
    """attn_out (post_attention_layernorm.output) and mlp_out (post_feedforward_layernorm
    .output) SAEs, in a multimodal model's spelling (model.language_model.layers...)."""
    case = build_case(name, True)
    d_model = case.model.cfg.d_model
    dicts = []
    for i, point in enumerate(["post_attention_layernorm", "post_feedforward_layernorm"]):
        hp = f"model.language_model.layers.0.{point}.output"
        folder = write_gs2(
            tmp_path / point,
            gs2_tensors(d_model, seed=30 + i),
            0,
            hf_hook_point_in=hp,
            hf_hook_point_out=hp,
        )
        dicts.append(tp.Dictionary.from_gemma_scope(folder))
    assert [d.hook for d in dicts] == ["blocks.0.hook_attn_out", "blocks.0.hook_mlp_out"]
    r = case.prism.features(" Paris", dicts).check()
    assert (r.components.kinds() == "feature").sum() == 2 * F


_TMP: dict = {}


def case_path(case) -> Path:
    import tempfile

    return Path(_TMP.setdefault(case.name, tempfile.mkdtemp()))


def test_gemma_scope_2_transcoder_removal_on_demo(tmp_path, demo):
    """The last layer's transcoder: one feature's write taken out of hook_mlp_out, the final
    norm's scale frozen, moves the logit by minus its term (and the term is a_f W_dec[f] . u)."""
    model, prism = demo
    w = gs2_tensors(seed=11, affine=True)
    tc = tp.Dictionary.from_gemma_scope(write_gs2(tmp_path / "tc", w, 1, kind="transcoder"))
    r = prism.features(" Paris", tc).check()
    cv = CacheView(prism.view, prism.cache, "test")
    at = prism.n_ctx - 1
    acts = tc.encode(dictionary_input(cv, tc, torch.full((prism.batch, 1), at), torch.float32))
    fr = final_readout(Recorded(cv, prism.tokens), " Paris", -1)
    pid = model.to_single_token(" Paris")
    scale = prism.cache["ln_final.hook_scale"]
    top = r.top(2, batch=0, kind="feature")
    assert len(top)
    for f, term in zip(top["feature"], top["value"]):
        vec = acts[0, 0, int(f)] * w["w_dec"][int(f)]
        hand = float(vec @ fr.readout.u[0, 0, 0] * fr.readout.inv_s[0, 0])
        assert abs(hand - term) <= 1e-4 * (1 + abs(term))

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
        assert abs(delta + term) <= 1e-4 * (1 + abs(term)) and abs(term) > 1e-4


def test_gemma_scope_2_lossless_error_is_exactly_zero(tmp_path, demo):
    """w_enc = [I, -I], w_dec = [I; -I], thresholds 0: relu(x) - relu(-x) = x exactly."""
    eye = torch.eye(D)
    w = {
        "w_enc": torch.cat([eye, -eye], 1),
        "w_dec": torch.cat([eye, -eye], 0),
        "b_enc": torch.zeros(2 * D),
        "b_dec": torch.zeros(D),
        "threshold": torch.zeros(2 * D),
    }
    d = tp.Dictionary.from_gemma_scope(write_gs2(tmp_path / "ll", w, 0))
    _, prism = demo
    r = prism.features(" Paris", d).check()
    assert torch.equal(
        r.select(kind="error").values, torch.zeros_like(r.select(kind="error").values)
    )


@pytest.mark.parametrize(
    "change, cfg, fragment",
    [
        ({"w_enc": rand(F, D, seed=1)}, {}, r"stores w_enc as \[d_model, d_sae\]"),
        ({"w_dec": rand(D, F, seed=1)}, {}, r"stores w_dec as \[d_sae, d_model\]"),
        ({"threshold": -torch.ones(F)}, {}, "negative"),
        ({"W_skip": rand(D, D, seed=1)}, {}, "holds W_skip"),
        (
            {"affine_skip_connection": rand(D, D, seed=1)},
            {"affine_connection": False},
            "affine_connection: false",
        ),
        ({}, {"affine_connection": True}, "affine_connection: true"),
        ({}, {"affine_connection": "yes"}, "expected a bool"),
        ({}, {"width": F + 1}, f"width={F + 1}"),
        ({}, {"architecture": "topk"}, "architecture is 'topk'"),
        ({}, {"type": "clt"}, "type is 'clt'"),
        ({}, {"type": "transcoder"}, "an SAE|a transcoder reads one place"),
        (
            {},
            {"hf_hook_point_in": "model.layers.1.mlp.down_proj.output"},
            "not a hook point tlprisms maps",
        ),
    ],
)
def test_gemma_scope_2_refusals_name_the_file(tmp_path, change, cfg, fragment):
    w = gs2_tensors()
    w.update(change)
    folder = write_gs2(tmp_path / "bad", w, 1, **cfg)
    with pytest.raises(ArgumentError, match=fragment) as info:
        tp.Dictionary.from_gemma_scope(folder)
    assert str(folder) in str(info.value)


def test_gemma_scope_2_wrong_hook_model_or_files(tmp_path, demo):
    folder = write_gs2(tmp_path / "a", gs2_tensors(), 1)
    with pytest.raises(ArgumentError, match="config.json says 'blocks.1.hook_resid_post'"):
        tp.Dictionary.from_gemma_scope(folder, "blocks.0.hook_resid_post")
    with pytest.raises(ArgumentError, match="missing: params.safetensors"):
        (folder / "params.safetensors").unlink()
        tp.Dictionary.from_gemma_scope(folder)
    with pytest.raises(ArgumentError, match="params.npz, which does not say where"):
        import numpy as np

        np.savez(tmp_path / "params.npz", W_enc=np.zeros((2, 2), np.float32))
        tp.Dictionary.from_gemma_scope(tmp_path / "params.npz")
    _, prism = demo
    wide = tp.Dictionary.from_gemma_scope(write_gs2(tmp_path / "w", gs2_tensors(d=64), 1))
    with pytest.raises(ArgumentError, match="d_model=128.*another model") as info:
        prism.features(" Paris", wide)
    assert str(tmp_path / "w") in str(info.value)
    deep = tp.Dictionary.from_gemma_scope(write_gs2(tmp_path / "deep", gs2_tensors(), 7))
    with pytest.raises(ArgumentError, match="the model has 2 layers"):
        prism.features(" Paris", deep)


# --------------------------------------------------------------------------- sparsify
def sparsify_tensors(d: int = D, f: int = F, seed: int = 0, skip: bool = False) -> dict:
    out = {
        "encoder.weight": rand(f, d, seed=seed, scale=d**-0.5),
        "encoder.bias": rand(f, seed=seed + 1, scale=0.1),
        "W_dec": rand(f, d, seed=seed + 2, scale=0.3),
        "b_dec": rand(d, seed=seed + 3, scale=0.3),
    }
    if skip:
        out["W_skip"] = rand(d, d, seed=seed + 4, scale=0.01)
    return out


def write_sparsify(folder: Path, tensors: dict, k: int = 5, **cfg) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    d_in = int(tensors["b_dec"].shape[0])
    config = {
        "activation": "topk",
        "expansion_factor": 32,
        "normalize_decoder": True,
        "num_latents": int(tensors["encoder.bias"].shape[0]),
        "k": k,
        "multi_topk": False,
        "skip_connection": "W_skip" in tensors,
        "transcode": False,
        "d_in": d_in,
    }
    config.update(cfg)
    (folder / "cfg.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "sae.safetensors"))
    return folder


def test_sparsify_sae_reads_the_format(tmp_path, demo):
    w = sparsify_tensors()
    d = tp.Dictionary.from_sparsify(write_sparsify(tmp_path / "layers.0", w))
    assert d.hook == "blocks.0.hook_resid_post" and not d.transcoder
    assert d.activation == "topk" and d.k == 5 and d.subtract_b_dec and d.topk_relu
    assert torch.equal(d.W_enc, w["encoder.weight"].T) and torch.equal(d.W_dec, w["W_dec"])
    # sparsify's encode: the k largest of relu((x - b_dec) @ encoder.weight.T + bias)
    x = rand(6, D, seed=4)
    pre = torch.relu((x - w["b_dec"]) @ w["encoder.weight"].T + w["encoder.bias"])
    top = pre.topk(5, dim=-1)
    want = torch.zeros_like(pre).scatter_(-1, top.indices, top.values)
    assert torch.allclose(d.encode(x), want)
    _, prism = demo
    prism.features(" Paris", d).check()


def test_sparsify_transcoder_removal_on_demo(tmp_path, demo):
    model, prism = demo
    w = sparsify_tensors(seed=21, skip=True)
    folder = write_sparsify(tmp_path / "layers.1.mlp", w, k=6, transcode=True)
    tc = tp.Dictionary.from_sparsify(folder)
    assert tc.transcoder and tc.input_hook == "blocks.1.mlp.hook_in" and not tc.subtract_b_dec
    assert torch.equal(tc.W_skip, w["W_skip"].T)  # x @ W_skip.T, as sparsify computes
    r = prism.features(" Paris", tc).check()
    assert "skip" in set(r.components.kinds())
    cv = CacheView(prism.view, prism.cache, "test")
    at = prism.n_ctx - 1
    acts = tc.encode(dictionary_input(cv, tc, torch.full((prism.batch, 1), at), torch.float32))
    pid = model.to_single_token(" Paris")
    scale = prism.cache["ln_final.hook_scale"]
    top = r.top(2, batch=0, kind="feature")
    assert len(top)
    for f, term in zip(top["feature"], top["value"]):
        vec = acts[0, 0, int(f)] * w["W_dec"][int(f)]

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
        assert abs(delta + term) <= 1e-4 * (1 + abs(term)) and abs(term) > 1e-4


def test_sparsify_lossless_error_is_exactly_zero(tmp_path, demo):
    """encoder = [I; -I], W_dec = [I; -I], b_dec = 0, k = d: the d non-negative
    pre-activations are kept and relu(x) - relu(-x) = x exactly."""
    eye = torch.eye(D)
    w = {
        "encoder.weight": torch.cat([eye, -eye], 0),
        "encoder.bias": torch.zeros(2 * D),
        "W_dec": torch.cat([eye, -eye], 0),
        "b_dec": torch.zeros(D),
    }
    d = tp.Dictionary.from_sparsify(write_sparsify(tmp_path / "layers.1", w, k=D))
    _, prism = demo
    r = prism.features(" Paris", d).check()
    err = r.select(kind="error").values
    assert torch.equal(err, torch.zeros_like(err))


def test_sparsify_complete_on_gemma2_refuses_the_pre_post_norm_output(tmp_path):
    case = build_case("gemma2/bridge", True)
    d_model = case.model.cfg.d_model
    sae = tp.Dictionary.from_sparsify(
        write_sparsify(tmp_path / "layers.0", sparsify_tensors(d_model))
    )
    case.prism.features(" Paris", sae).check()
    tc = tp.Dictionary.from_sparsify(
        write_sparsify(
            tmp_path / "layers.1.mlp", sparsify_tensors(d_model, skip=True), transcode=True
        )
    )
    with pytest.raises(ArgumentError, match="before its post-MLP norm"):
        case.prism.features(" Paris", tc)


@pytest.mark.parametrize(
    "change, cfg, fragment",
    [
        (
            {"encoder.weight": rand(D, F, seed=1)},
            {},
            r"stores encoder.weight as \[d_sae, d_model\]",
        ),
        ({"W_dec": rand(D, F, seed=1)}, {}, r"stores W_dec as \[d_sae, d_model\]"),
        ({"W_enc": rand(D, F, seed=1)}, {}, "holds W_enc"),
        ({}, {"k": 5.0}, r"k is 5.0 \(float\); expected an integer"),
        ({}, {"d_in": 64}, "d_in=64"),
        ({}, {"num_latents": F + 1}, f"num_latents={F + 1}"),
        ({}, {"activation": "groupmax"}, "GroupMax"),
        ({}, {"signed": True}, "signed: true"),
        ({}, {"transcode": "false"}, "expected a bool"),
        ({}, {"skip_connection": True}, "skip_connection: true"),
        ({}, {"transcode": True}, "pass hook="),
    ],
)
def test_sparsify_refusals_name_the_file(tmp_path, change, cfg, fragment):
    w = sparsify_tensors()
    w.update(change)
    folder = write_sparsify(tmp_path / "layers.1", w, **cfg)
    with pytest.raises(ArgumentError, match=fragment) as info:
        tp.Dictionary.from_sparsify(folder)
    assert str(folder) in str(info.value)


def test_sparsify_sites(tmp_path):
    w = sparsify_tensors()
    odd = write_sparsify(tmp_path / "embed_tokens", w)
    with pytest.raises(ArgumentError, match="pass hook="):
        tp.Dictionary.from_sparsify(odd)
    assert tp.Dictionary.from_sparsify(odd, hook="blocks.1.hook_resid_pre").hook == (
        "blocks.1.hook_resid_pre"
    )
    # a bridge's mlp.hook_out is the MLP's output before a post-norm: refused where there is one
    out = tp.Dictionary.from_sparsify(odd, hook="blocks.0.mlp.hook_out")
    case = build_case("gemma2/bridge", True)
    big = write_sparsify(tmp_path / "x" / "embed_tokens", sparsify_tensors(case.model.cfg.d_model))
    with pytest.raises(ArgumentError, match="before its post-MLP norm"):
        case.prism.features(" Paris", tp.Dictionary.from_sparsify(big, hook=out.hook))
    named = write_sparsify(tmp_path / "layers.1", w)
    with pytest.raises(ArgumentError, match="the folder name .layers.1. says"):
        tp.Dictionary.from_sparsify(named, hook="blocks.0.hook_resid_post")
    with pytest.raises(ArgumentError, match="leave input_hook out"):
        tp.Dictionary.from_sparsify(named, input_hook="blocks.1.mlp.hook_in")
    with pytest.raises(ArgumentError, match="not a folder with cfg.json and sae.safetensors"):
        tp.Dictionary.from_sparsify(tmp_path / "nowhere")


# --------------------------------------------------------------------------- per-head z
def test_hook_z_dictionaries_are_read_and_wrong_sizes_refused(demo):
    """A per-head z dictionary is accepted at blocks.L.attn.hook_z (d_in = d_out = n_heads *
    d_head = 4 * 32 on the demo model); another size is refused by the model check."""
    _, prism = demo
    d = tp.Dictionary(
        rand(D, F, seed=1, scale=D**-0.5),
        rand(F, seed=2, scale=0.1),
        rand(F, D, seed=3, scale=0.3),
        rand(D, seed=4, scale=0.3),
        "blocks.1.attn.hook_z",
    )
    assert d.per_head and d.site is None and d.input_site is None and not d.transcoder
    prism.features(" Paris", d).check()
    wrong = tp.Dictionary(
        torch.zeros(64, 4), torch.zeros(4), torch.zeros(4, 64), torch.zeros(64), d.hook
    )
    with pytest.raises(ArgumentError, match=r"n_heads \* d_head = 4 \* 32 = 128"):
        prism.features(" Paris", wrong)


def test_gemma_scope_2_o_proj_input_is_hook_z(tmp_path, demo):
    """Gemma Scope 2's attention SAEs read o_proj's input: z flattened over heads."""
    point = "model.layers.1.self_attn.o_proj.input"
    w = gs2_tensors()
    folder = write_gs2(tmp_path / "z", w, 1, hf_hook_point_in=point, hf_hook_point_out=point)
    d = tp.Dictionary.from_gemma_scope(folder)
    assert d.hook == "blocks.1.attn.hook_z" and d.per_head and not d.transcoder
    assert torch.equal(d.W_dec, w["w_dec"])
    _, prism = demo
    r = prism.features(" Paris", d).check()
    assert (r.components.kinds() == "feature").sum() == F


# --------------------------------------------------------------------------- cross-layer
def write_clt(
    folder: Path, n: int = 2, d: int = D, f: int = F, seed: int = 0, jump: bool = True, **cfg
) -> tuple:
    """circuit-tracer's CLT layout; every decoder to a later layer is non-zero."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"feature_input_hook": "hook_resid_mid", "feature_output_hook": "hook_mlp_out"}
    config.update(cfg)
    (folder / "config.yaml").write_text("".join(f"{k}: {v}\n" for k, v in config.items()))
    enc, dec = [], []
    for i in range(n):
        e = {
            f"W_enc_{i}": rand(f, d, seed=seed + 10 * i, scale=d**-0.5),
            f"b_enc_{i}": rand(f, seed=seed + 10 * i + 1, scale=0.1),
            f"b_dec_{i}": rand(d, seed=seed + 10 * i + 2, scale=0.3),
        }
        if jump:
            e[f"threshold_{i}"] = rand(f, seed=seed + 10 * i + 3).abs() * 0.05
        W = rand(f, n - i, d, seed=seed + 10 * i + 4, scale=0.3)
        save_file(e, str(folder / f"W_enc_{i}.safetensors"))
        save_file({f"W_dec_{i}": W}, str(folder / f"W_dec_{i}.safetensors"))
        enc.append(e)
        dec.append(W)
    return folder, enc, dec


def test_clt_reads_the_layout_lazily(tmp_path):
    folder, enc, dec = write_clt(tmp_path / "clt")
    clt = tp.Dictionary.from_circuit_tracer_clt(folder)
    assert clt.n_layers == 2 and clt.d_sae == F and clt.activation == "jumprelu"
    assert torch.equal(clt.W_enc[1], enc[1]["W_enc_1"])
    assert torch.equal(clt.decoder(0), dec[0]) and torch.equal(clt.decoder(0, 1), dec[0][:, :1])
    assert not hasattr(clt, "W_dec")  # decoders stay in their files until read
    x = rand(3, D, seed=5)
    pre = x @ enc[0]["W_enc_0"].T + enc[0]["b_enc_0"]
    assert torch.equal(clt.encode(0, x), pre * (pre > enc[0]["threshold_0"]))


def test_clt_terms_are_the_hand_summed_decoders(tmp_path, demo):
    """A feature of layer 0 writes to both MLP outputs: its term is a (W_dec[f,0] +
    W_dec[f,1]) . u / s; each layer's error is its MLP output less every decode into it."""
    model, prism = demo
    folder, enc, dec = write_clt(tmp_path / "clt", seed=40)
    clt = tp.Dictionary.from_circuit_tracer_clt(folder)
    r = prism.features(" Paris", clt).check()
    cv = CacheView(prism.view, prism.cache, "test")
    fr = final_readout(Recorded(cv, prism.tokens), " Paris", -1)
    u, s = fr.readout.u[0, 0, 0], fr.readout.inv_s
    at = prism.n_ctx - 1
    acts = []
    for layer in range(2):
        x = prism.cache[f"blocks.{layer}.hook_resid_mid"][:, at]
        acts.append(clt.encode(layer, x))  # [B, F]
    feats = r.select(kind="feature")
    for layer in range(2):
        want = acts[layer] * (dec[layer].sum(1) @ u) * s[:, :1]  # [B, F]
        got = feats.select(layer=layer).values[:, 0, 0]
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)
        recon = enc[layer][f"b_dec_{layer}"] + sum(
            acts[src] @ dec[src][:, layer - src] for src in range(layer + 1)
        )
        err = (prism.cache[f"blocks.{layer}.hook_mlp_out"][:, at] - recon) @ u * s[:, 0]
        got_err = r.select(kind="error", layer=layer).values[:, 0, 0, 0]
        assert torch.allclose(got_err, err, atol=1e-5, rtol=1e-4)
    assert float((dec[0][:, 1] @ u).abs().max()) > 1e-3  # the later-layer decoders count


def test_clt_removal_moves_the_logit_by_minus_its_term(tmp_path, demo):
    """Feature (0, f)'s writes taken out of both MLP outputs, everything else frozen."""
    model, prism = demo
    folder, _, dec = write_clt(tmp_path / "clt", seed=60, jump=False)
    clt = tp.Dictionary.from_circuit_tracer_clt(folder)
    r = prism.features(" Paris", clt)
    cv = CacheView(prism.view, prism.cache, "test")
    fr = final_readout(Recorded(cv, prism.tokens), " Paris", -1)
    at = prism.n_ctx - 1
    acts = clt.encode(0, prism.cache["blocks.0.hook_resid_mid"][:, at])
    top = r.select(layer=0).top(2, batch=0, kind="feature")
    assert len(top)
    for f, term in zip(top["feature"], top["value"]):
        copies = [
            Copy(row=0, removal=Removal("b_out", L, at, vector=acts[0, int(f)] * dec[0][int(f), L]))
            for L in range(2)
        ]
        mine, clean = run_frozen(
            prism.view, prism.tokens, copies, Site.FINAL_RESID, None, lambda p: p * 0
        )
        delta = ((mine - clean)[:, at] @ fr.readout.u[0, 0, 0] * fr.readout.inv_s[0, 0]).sum()
        assert abs(float(delta) + term) <= 1e-4 * (1 + abs(term)) and abs(term) > 1e-4


@pytest.mark.parametrize("name", ["llama/bridge", *POST_NORM])
def test_clt_complete_on_families(tmp_path, name):
    case = build_case(name, False)
    n, d = case.model.cfg.n_layers, case.model.cfg.d_model
    folder, _, _ = write_clt(tmp_path / "clt", n=n, d=d, feature_input_hook="mlp.hook_in")
    clt = tp.Dictionary.from_circuit_tracer_clt(folder)
    r = case.prism.features(" Paris", clt, pos="all").check()
    assert (r.components.kinds() == "error").sum() == n
    case.prism.features(" Paris", clt, path=[tp.Hop("head", n - 1, 0)]).check()


def test_clt_refusals(tmp_path, demo):
    _, prism = demo
    folder, _, _ = write_clt(tmp_path / "three", n=3)
    clt = tp.Dictionary.from_circuit_tracer_clt(folder)
    with pytest.raises(ArgumentError, match="3 layers .* model has 2 layers") as info:
        prism.features(" Paris", clt)
    assert str(folder) in str(info.value)
    two, _, _ = write_clt(tmp_path / "two")
    ok = tp.Dictionary.from_circuit_tracer_clt(two)
    sae = tp.Dictionary(
        rand(D, 4, seed=1),
        rand(4, seed=2),
        rand(4, D, seed=3),
        rand(D, seed=4),
        "blocks.1.hook_resid_post",
    )
    with pytest.raises(ArgumentError, match="pass it alone"):
        prism.features(" Paris", [ok, sae])
    bad, _, _ = write_clt(tmp_path / "bad")
    save_file({"W_dec_1": rand(F, 2, D, seed=1)}, str(bad / "W_dec_1.safetensors"))
    with pytest.raises(ArgumentError, match=r"W_dec_1.safetensors.*\[d_sae, n_layers - 1"):
        tp.Dictionary.from_circuit_tracer_clt(bad)
    (bad / "W_dec_1.safetensors").unlink()
    with pytest.raises(ArgumentError, match="W_dec_1.safetensors' is missing"):
        tp.Dictionary.from_circuit_tracer_clt(bad)
    flip, _, _ = write_clt(tmp_path / "flip")
    e = {"W_enc_0": rand(D, F, seed=1), "b_enc_0": rand(F, seed=2), "b_dec_0": rand(D, seed=3)}
    save_file(e, str(flip / "W_enc_0.safetensors"))
    with pytest.raises(ArgumentError, match=r"stores W_enc_0 as \[d_sae, d_model\]"):
        tp.Dictionary.from_circuit_tracer_clt(flip)
    site, _, _ = write_clt(tmp_path / "site", feature_output_hook="hook_attn_out")
    with pytest.raises(ArgumentError, match="writes hook_mlp_out"):
        tp.Dictionary.from_circuit_tracer_clt(site)
    (folder / "W_enc_0.safetensors").unlink()
    with pytest.raises(ArgumentError, match="missing: W_enc_0.safetensors"):
        tp.Dictionary.from_circuit_tracer_clt(folder)


def test_clt_sparse_reads_agree(tmp_path, demo, monkeypatch):
    """Only the active features' decoder rows are read when few are active; same terms."""
    from tlprisms._prisms import features

    _, prism = demo
    folder, _, dec = write_clt(tmp_path / "clt", seed=80)
    clt = tp.Dictionary.from_circuit_tracer_clt(folder)
    rows = torch.tensor([0, 1, 2, 5, 7, 8, F - 1])
    assert torch.equal(clt.decoder(0, 2, rows), dec[0][rows])
    assert torch.equal(clt.decoder(1, 1, rows[:2]), dec[1][rows[:2]])
    dense = prism.features(" Paris", clt).values
    monkeypatch.setattr(features, "_SPARSE_FRACTION", 1.0)
    sparse = prism.features(" Paris", clt).values
    assert torch.allclose(dense, sparse, atol=1e-6, rtol=1e-5)
