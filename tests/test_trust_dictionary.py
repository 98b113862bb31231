"""Dictionary loaders that are never silently wrong (issue 21): each format round-trips a
file this test writes in that format (values, orientation, activation, an exact feature
split), and every damaged, coerced or mismatched file is refused with an error that names
the file, what came and what was expected."""

import json
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import tlprisms as tp
from tlprisms.demo import load_demo_model
from tlprisms.errors import ArgumentError

D, W = 128, 24  # the demo model's d_model, a small dictionary width
HOOK = "blocks.1.hook_resid_pre"
CT_CONFIG = (
    'model_name: "demo"\nfeature_input_hook: "ln2.hook_normalized"\n'
    'feature_output_hook: "hook_mlp_out"\n'
)


@pytest.fixture(scope="module")
def prism():
    return tp.LogitPrism.run(load_demo_model(), "The capital of France is")


def rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def ct_layer(width: int = W, seed: int = 0, **extra) -> dict:
    """One circuit-tracer layer file's tensors, as SingleLayerTranscoder.to_safetensors
    writes them: W_enc [d_sae, d_model] (F.linear), W_dec [d_sae, d_model]."""
    t = {
        "W_enc": rand(width, D, seed=seed),
        "W_dec": rand(width, D, seed=seed + 1) * 0.1,
        "b_enc": rand(width, seed=seed + 2),
        "b_dec": rand(D, seed=seed + 3) * 0.1,
    }
    t.update(extra)
    return t


def write_ct(folder, layers: dict, config: str = CT_CONFIG) -> None:
    (folder / "config.yaml").write_text(config)
    for layer, tensors in layers.items():
        save_file(tensors, str(folder / f"layer_{layer}.safetensors"))


def write_saelens(folder, cfg: dict, tensors: dict) -> None:
    save_file(tensors, str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps(cfg))


def sae_tensors(width: int = W, seed: int = 10) -> dict:
    return {
        "W_enc": rand(D, width, seed=seed),
        "b_enc": rand(width, seed=seed + 1),
        "W_dec": rand(width, D, seed=seed + 2),
        "b_dec": rand(D, seed=seed + 3),
    }


# --------------------------------------------------------------------------- circuit-tracer
def test_circuit_tracer_topk_k_tensor(tmp_path, prism):
    """A TopK transcoder saves torch.tensor(k): it loads as TopK with that k, the k largest
    pre-activations kept as they are (circuit-tracer's TopK is x * gate, not ReLU-ed)."""
    layers = {i: ct_layer(seed=5 * i, k=torch.tensor(4)) for i in range(2)}
    write_ct(tmp_path, layers)
    tcs = tp.Dictionary.from_circuit_tracer(tmp_path)
    x = rand(6, D, seed=99)
    for t, raw in zip(tcs, layers.values()):
        assert t.activation == "topk" and t.k == 4 and not t.topk_relu
        assert torch.equal(t.W_enc, raw["W_enc"].T) and torch.equal(t.W_dec, raw["W_dec"])
        pre = F.linear(x, raw["W_enc"], raw["b_enc"])
        gate = torch.zeros_like(pre).scatter_(-1, pre.topk(4, dim=-1).indices, 1.0)
        a = t.encode(x)
        assert torch.allclose(a, pre * gate, atol=1e-5)
        assert ((a != 0).sum(-1) == 4).all()
    assert "not ReLU-ed" in repr(tcs[0])
    prism.features(" Paris", tcs).check()


def test_circuit_tracer_width_equals_d_model(tmp_path, prism):
    """d_sae == d_model: W_enc is still [d_sae, d_model] (the format), not guessed."""
    raw = ct_layer(width=D, seed=3)
    write_ct(tmp_path, {0: raw})
    (t,) = tp.Dictionary.from_circuit_tracer(tmp_path)
    assert torch.equal(t.W_enc, raw["W_enc"].T)
    x = rand(5, D, seed=4)
    assert torch.allclose(t.pre_activations(x), F.linear(x, raw["W_enc"], raw["b_enc"]), atol=1e-5)
    prism.features(" Paris", [t]).check()


def test_circuit_tracer_jumprelu_scalar_threshold_and_config_topk(tmp_path, prism):
    write_ct(tmp_path, {0: ct_layer(**{"activation_function.threshold": torch.tensor(0.5)})})
    (t,) = tp.Dictionary.from_circuit_tracer(tmp_path)
    assert t.activation == "jumprelu" and torch.equal(t.threshold, torch.full((W,), 0.5))
    prism.features(" Paris", [t]).check()
    cfg = CT_CONFIG + "activation: topk\nk: 3\n"
    write_ct(tmp_path, {0: ct_layer()}, config=cfg)
    (t,) = tp.Dictionary.from_circuit_tracer(tmp_path)
    assert t.activation == "topk" and t.k == 3 and not t.topk_relu


@pytest.mark.parametrize(
    "tensors, config, fragment",
    [
        # a W_enc in SAELens's orientation is not circuit-tracer's: refused, not transposed
        ({"W_enc": rand(D, W, seed=1)}, None, r"stores W_enc as \[d_sae, d_model\]"),
        ({"W_dec": rand(D, W, seed=1)}, None, r"stores W_dec as \[d_sae, d_model\]"),
        ({"b_dec": rand(D + 1, seed=1)}, None, r"W_enc has shape \[24, 128\]"),
        ({"W_skip": rand(D, D + 1, seed=1)}, None, "W_skip has shape"),
        ({"k": torch.tensor(4.0)}, None, "k as one integer"),
        ({"k": torch.tensor([4, 4])}, None, "k as one integer"),
        ({"k": torch.tensor(0)}, None, "k >= 1"),
        (
            {"k": torch.tensor(4), "activation_function.threshold": torch.zeros(W)},
            None,
            "one activation",
        ),
        ({"k": torch.tensor(4)}, CT_CONFIG + "k: 5\n", "make them agree"),
        ({}, CT_CONFIG + "activation: topk\n", "gives k"),
        ({}, CT_CONFIG + "k: 3.7\n", r"k is 3.7 \(float\); expected an integer"),
        ({}, CT_CONFIG + "activation: gelu\n", "relu, jumprelu or topk"),
        ({"scale": torch.ones(1)}, None, "holds scale"),
        ({"W_enc": torch.ones(W, D, dtype=torch.int32)}, None, "dtype torch.int32"),
        ({"b_enc": torch.zeros(2, W)}, None, r"must be a vector \(\[d_sae\]\)"),
        ({}, 'feature_input_hook: "ln2.hook_normalized"\n', "no feature_output_hook"),
        ({}, CT_CONFIG.replace("hook_mlp_out", "hook_resid_post"), "its own layer's MLP"),
    ],
)
def test_circuit_tracer_refusals(tmp_path, tensors, config, fragment):
    raw = ct_layer()
    raw.update(tensors)
    write_ct(tmp_path, {0: raw}, config=config or CT_CONFIG)
    with pytest.raises(ArgumentError, match=fragment) as info:
        tp.Dictionary.from_circuit_tracer(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_circuit_tracer_damaged_files(tmp_path):
    write_ct(tmp_path, {0: ct_layer()})
    (tmp_path / "layer_1.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(ArgumentError, match="layer_1.safetensors.*not a readable") as info:
        tp.Dictionary.from_circuit_tracer(tmp_path)
    assert info.value.__cause__ is not None  # chained to safetensors' own error
    (tmp_path / "layer_1.safetensors").unlink()
    (tmp_path / "layer_x.safetensors").write_bytes(b"")
    with pytest.raises(ArgumentError, match="layer_<i>.safetensors"):
        tp.Dictionary.from_circuit_tracer(tmp_path)
    (tmp_path / "layer_x.safetensors").unlink()
    save_file(ct_layer(), str(tmp_path / "layer_00.safetensors"))
    with pytest.raises(ArgumentError, match=r"more than one file for layer\(s\) \[0\]"):
        tp.Dictionary.from_circuit_tracer(tmp_path)
    (tmp_path / "layer_00.safetensors").unlink()
    (tmp_path / "config.yaml").write_text("feature_input_hook: [unclosed\n")
    with pytest.raises(ArgumentError, match="not valid YAML") as info:
        tp.Dictionary.from_circuit_tracer(tmp_path)
    assert info.value.__cause__ is not None
    (tmp_path / "config.yaml").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ArgumentError, match="not UTF-8"):
        tp.Dictionary.from_circuit_tracer(tmp_path)


# --------------------------------------------------------------------------- SAELens cfg.json
def saelens_cfg(**kw) -> dict:
    cfg = {
        "d_in": D,
        "d_sae": W,
        "architecture": "standard",
        "hook_name": HOOK,
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
    }
    cfg.update(kw)
    return cfg


def test_saelens_round_trip(tmp_path, prism):
    w = sae_tensors()
    write_saelens(tmp_path, saelens_cfg(neuronpedia_id=None, metadata=None), w)
    d = tp.Dictionary.from_saelens_folder(tmp_path)
    assert all(torch.equal(getattr(d, k), v) for k, v in w.items())
    assert d.subtract_b_dec and d.activation == "relu" and d.source == str(tmp_path)
    x = rand(3, D, seed=7)
    assert torch.allclose(d.encode(x), torch.relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]))
    prism.features(" Paris", d).check()
    # TopK, k in activation_fn_kwargs; SAELens's TopK ReLUs the kept values
    write_saelens(tmp_path, saelens_cfg(architecture="topk", activation_fn_kwargs={"k": 3}), w)
    d = tp.Dictionary.from_saelens_folder(tmp_path)
    assert d.activation == "topk" and d.k == 3 and d.topk_relu
    prism.features(" Paris", d).check()


@pytest.mark.parametrize(
    "cfg, fragment",
    [
        ({"apply_b_dec_to_input": "false"}, r"input is 'false' \(str\); expected a bool"),
        ({"apply_b_dec_to_input": 0}, r"apply_b_dec_to_input is 0 \(int\); expected a bool"),
        ({"apply_b_dec_to_input": None}, "expected a bool"),
        ({"architecture": "topk", "k": 3.7}, r"k is 3.7 \(float\); expected an integer"),
        ({"architecture": "topk", "k": 3.0}, r"k is 3.0 \(float\); expected an integer"),
        ({"architecture": "topk", "k": "3"}, r"k is '3' \(str\); expected an integer"),
        ({"architecture": "topk", "k": True}, r"k is True \(bool\)"),
        ({"architecture": "topk", "activation_fn_kwargs": {"k": 2.5}}, "activation_fn_kwargs"),
        ({"architecture": "topk", "k": 3, "activation_fn_kwargs": {"k": 4}}, "make them agree"),
        ({"architecture": "topk"}, "needs k="),
        ({"architecture": 7}, r"architecture is 7 \(int\); expected a string"),
        ({"hook_name": 5}, r"hook_name is 5 \(int\); expected a string"),
        ({"hook_name": None}, "names no hook"),
        ({"hook_name": "blocks.1.attn.hook_q"}, "not a hook a dictionary can sit at"),
        ({"hook_name": "blocks.1.ln2.hook_normalized"}, "place to read"),
        ({"d_sae": W + 1}, "d_sae=25 but .* has d_sae=24"),
        ({"d_in": 64}, "d_in=64 but .* has d_in=128"),
        ({"d_in": 128.0}, "expected an integer"),
        ({"rescale_acts_by_decoder_norm": True}, "fold_W_dec_norm"),
        ({"rescale_acts_by_decoder_norm": "no"}, "expected a bool"),
        ({"metadata": "x"}, "expected a mapping"),
        ({"normalize_activations": 1}, "expected a string"),
    ],
)
def test_saelens_cfg_checked_not_coerced(tmp_path, cfg, fragment):
    write_saelens(tmp_path, saelens_cfg(**cfg), sae_tensors())
    with pytest.raises(ArgumentError, match=fragment) as info:
        tp.Dictionary.from_saelens_folder(tmp_path)
    assert str(tmp_path) in str(info.value)


@pytest.mark.parametrize(
    "tensors, fragment",
    [
        ({"W_enc": rand(W, D, seed=1)}, r"SAELens stores W_enc as \[d_model, d_sae\]"),
        ({"W_dec": rand(D, W, seed=1)}, r"SAELens stores W_dec as \[d_sae, d_model\]"),
        ({"threshold": torch.zeros(W + 1)}, "threshold has shape"),
        ({"scaling_factor": torch.ones(W)}, "holds scaling_factor"),
    ],
)
def test_saelens_weights_layout(tmp_path, tensors, fragment):
    w = sae_tensors()
    w.update(tensors)
    write_saelens(tmp_path, saelens_cfg(d_in=None, d_sae=None), w)
    with pytest.raises(ArgumentError, match=fragment) as info:
        tp.Dictionary.from_saelens_folder(tmp_path)
    assert "sae_weights.safetensors" in str(info.value)


def test_saelens_damaged_files(tmp_path):
    write_saelens(tmp_path, saelens_cfg(), sae_tensors())
    (tmp_path / "cfg.json").write_text('{"hook_name": "blocks.1.hook_resid_pre",')
    with pytest.raises(ArgumentError, match=r"cfg.json.*not valid JSON.*line 1") as info:
        tp.Dictionary.from_saelens_folder(tmp_path)
    assert isinstance(info.value.__cause__, json.JSONDecodeError)
    (tmp_path / "cfg.json").write_text("[1, 2]")
    with pytest.raises(ArgumentError, match="JSON list, not an object"):
        tp.Dictionary.from_saelens_folder(tmp_path)
    (tmp_path / "cfg.json").write_text(json.dumps(saelens_cfg()))
    (tmp_path / "sae_weights.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(ArgumentError, match="sae_weights.safetensors.*not a readable") as info:
        tp.Dictionary.from_saelens_folder(tmp_path)
    assert info.value.__cause__ is not None


# --------------------------------------------------------------------------- Gemma Scope
def test_gemma_scope_round_trip_width_equals_d_model(tmp_path, prism):
    """params.npz stores W_enc [d_model, d_sae]; a width of d_model is read the same way."""
    g = {
        "W_enc": rand(D, D, seed=1).numpy(),
        "W_dec": rand(D, D, seed=2).numpy() * 0.1,
        "b_enc": rand(D, seed=3).numpy(),
        "b_dec": rand(D, seed=4).numpy(),
        "threshold": np.full(D, 0.3, dtype=np.float32),
    }
    np.savez(tmp_path / "params.npz", **g)
    d = tp.Dictionary.from_gemma_scope(tmp_path / "params.npz", HOOK)
    assert torch.equal(d.W_enc, torch.from_numpy(g["W_enc"])) and d.activation == "jumprelu"
    x = rand(3, D, seed=5)
    pre = x @ torch.from_numpy(g["W_enc"]) + torch.from_numpy(g["b_enc"])
    assert torch.allclose(d.encode(x), pre * (pre > 0.3))
    prism.features(" Paris", d).check()


def test_gemma_scope_not_an_npz_never_unpickled(tmp_path):
    file = tmp_path / "params.npz"
    file.write_bytes(pickle.dumps({"W_enc": np.zeros((2, 2))}))
    for content in (None, b"just some text"):
        if content is not None:
            file.write_bytes(content)
        with pytest.raises(ArgumentError, match=r"not an \.npz archive of arrays") as info:
            tp.Dictionary.from_gemma_scope(file, HOOK)
        assert "allow_pickle=True" not in str(info.value)
    np.save(tmp_path / "one.npy", np.zeros(3, dtype=np.float32))
    with pytest.raises(ArgumentError, match=r"not an \.npz archive"):
        tp.Dictionary.from_gemma_scope(tmp_path / "one.npy", HOOK)
    # an archive whose array is pickled objects: refused, not unpickled
    np.savez(file, W_enc=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ArgumentError, match=r"not an \.npz archive") as info:
        tp.Dictionary.from_gemma_scope(file, HOOK)
    assert "allow_pickle=True" not in str(info.value)


@pytest.mark.parametrize(
    "change, fragment",
    [
        ({"W_enc": np.zeros((W, D), np.float32)}, r"stores W_enc as \[d_model, d_sae\]"),
        ({"W_dec": np.zeros((D, W), np.float32)}, r"stores W_dec as \[d_sae, d_model\]"),
        ({"threshold": np.zeros(3, np.float32)}, "threshold has shape"),
        ({"W_enc": np.zeros((D, W), np.int64)}, "dtype int64"),
        ({"log_threshold": np.zeros(W, np.float32)}, "holds log_threshold"),
    ],
)
def test_gemma_scope_refusals(tmp_path, change, fragment):
    g = {k: v.numpy() for k, v in sae_tensors().items()}
    g.update(change)
    np.savez(tmp_path / "params.npz", **g)
    with pytest.raises(ArgumentError, match=fragment) as info:
        tp.Dictionary.from_gemma_scope(tmp_path / "params.npz", HOOK)
    assert "params.npz" in str(info.value)


# --------------------------------------------------------------------------- wrong model or site
def test_wrong_model_names_the_file(tmp_path, prism):
    small = {
        "W_enc": rand(64, W, seed=1),
        "b_enc": rand(W, seed=2),
        "W_dec": rand(W, 64, seed=3),
        "b_dec": rand(64, seed=4),
    }
    write_saelens(tmp_path, saelens_cfg(d_in=64), small)
    d = tp.Dictionary.from_saelens_folder(tmp_path)
    with pytest.raises(ArgumentError, match="d_in=64.*d_model=128") as info:
        prism.features(" Paris", d)
    assert str(tmp_path) in str(info.value)
    write_saelens(tmp_path, saelens_cfg(hook_name="blocks.7.hook_resid_pre"), sae_tensors())
    d = tp.Dictionary.from_saelens_folder(tmp_path)
    with pytest.raises(ArgumentError, match="model has 2 layers") as info:
        prism.features(" Paris", d)
    assert str(tmp_path) in str(info.value)


def test_topk_relu_is_checked():
    w = sae_tensors()
    with pytest.raises(ArgumentError, match="topk_relu=False is for"):
        tp.Dictionary(**w, hook=HOOK, topk_relu=False)
    with pytest.raises(ArgumentError, match="topk_relu="):
        tp.Dictionary(**w, hook=HOOK, activation="topk", k=2, topk_relu="no")
