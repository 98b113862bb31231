"""Dictionary: activations, conventions, and every loader on files this test writes in
that format (SAELens folder, Gemma Scope params.npz, circuit-tracer layout, a duck-typed
SAELens object, and a real SAELens SAE where sae_lens is importable)."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import tlprisms as tp
from tlprisms.demo import load_demo_model
from tlprisms.errors import ArgumentError

D, F = 128, 32  # the demo model's d_model, and a small dictionary
HOOK = "blocks.1.hook_resid_pre"


def weights(seed: int = 0, d_out: int = D) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "W_enc": torch.randn(D, F, generator=g),
        "b_enc": torch.randn(F, generator=g),
        "W_dec": torch.randn(F, d_out, generator=g),
        "b_dec": torch.randn(d_out, generator=g),
    }


def same(d: tp.Dictionary, w: dict) -> bool:
    return all(torch.equal(getattr(d, k), w[k]) for k in ("W_enc", "b_enc", "W_dec", "b_dec"))


@pytest.fixture(scope="module")
def prism():
    return tp.LogitPrism.run(load_demo_model(), "The capital of France is")


def test_activations():
    w = weights()
    x = torch.randn(3, D, generator=torch.Generator().manual_seed(1))
    pre = x @ w["W_enc"] + w["b_enc"]
    relu = tp.Dictionary(**w, hook=HOOK)
    assert torch.equal(relu.encode(x), torch.relu(pre))
    th = torch.full((F,), 0.5)
    jump = tp.Dictionary(**w, hook=HOOK, activation="jumprelu", threshold=th)
    assert torch.equal(jump.encode(x), torch.where(pre > 0.5, pre, torch.zeros_like(pre)))
    topk = tp.Dictionary(**w, hook=HOOK, activation="topk", k=4)
    a = topk.encode(x)
    assert ((a > 0).sum(-1) <= 4).all() and torch.equal(
        a.max(-1).values, torch.relu(pre).max(-1).values
    )
    batch = tp.Dictionary(**w, hook=HOOK, activation="batchtopk", k=4)
    assert int((batch.encode(x) > 0).sum()) <= 12
    sub = tp.Dictionary(**w, hook=HOOK, subtract_b_dec=True, input_scale=2.0)
    want = torch.relu((2 * x - w["b_dec"]) @ w["W_enc"] + w["b_enc"])
    assert torch.allclose(sub.encode(x), want)
    assert torch.allclose(sub.decode(want), (want @ w["W_dec"] + w["b_dec"]) / 2)


def test_saelens_folder(tmp_path, prism):
    w = weights()
    w["threshold"] = torch.full((F,), 0.1)
    save_file(w, str(tmp_path / "sae_weights.safetensors"))
    cfg = {
        "d_in": D,
        "d_sae": F,
        "architecture": "jumprelu",
        "hook_name": HOOK,
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
    }
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    d = tp.Dictionary.from_saelens_folder(tmp_path)
    assert same(d, w) and d.activation == "jumprelu" and d.subtract_b_dec and d.hook == HOOK
    assert torch.equal(d.threshold, w["threshold"])
    prism.features(" Paris", d).check()
    # SAELens 6 keeps the hook in metadata, and TopK in the architecture
    cfg = {"architecture": "topk", "k": 3, "metadata": {"hook_name": HOOK}}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    d = tp.Dictionary.from_saelens_folder(tmp_path)
    assert d.activation == "topk" and d.k == 3
    cfg["normalize_activations"] = "expected_average_only_in"
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ArgumentError, match="fold_activation_norm_scaling_factor"):
        tp.Dictionary.from_saelens_folder(tmp_path)
    with pytest.raises(ArgumentError, match="cfg.json"):
        tp.Dictionary.from_saelens_folder(tmp_path / "nowhere")


def test_gemma_scope(tmp_path, prism):
    w = weights(2)
    params = {k: v.numpy() for k, v in w.items()}
    params["threshold"] = np.full(F, 0.2, dtype=np.float32)
    np.savez(tmp_path / "params.npz", **params)
    d = tp.Dictionary.from_gemma_scope(tmp_path / "params.npz", HOOK)
    assert same(d, w) and d.activation == "jumprelu"
    assert torch.allclose(d.threshold, torch.full((F,), 0.2))
    prism.features(" Paris", d).check()


def test_circuit_tracer(tmp_path, prism):
    (tmp_path / "config.yaml").write_text(
        'model_name: "demo"\nfeature_input_hook: "ln2.hook_normalized"\n'
        'feature_output_hook: "hook_mlp_out"\n'
    )
    written = []
    for layer in range(2):
        w = weights(3 + layer)
        skip = torch.randn(D, D, generator=torch.Generator().manual_seed(9)) * 0.01
        # circuit-tracer stores W_enc as [d_sae, d_model] and the skip as x @ W_skip.T
        save_file(
            {
                "W_enc": w["W_enc"].T.contiguous(),
                "b_enc": w["b_enc"],
                "W_dec": w["W_dec"],
                "b_dec": w["b_dec"],
                "W_skip": skip,
            },
            str(tmp_path / f"layer_{layer}.safetensors"),
        )
        written.append((w, skip))
    tcs = tp.Dictionary.from_circuit_tracer(tmp_path)
    assert [t.layer for t in tcs] == [0, 1] and all(t.transcoder for t in tcs)
    for t, (w, skip) in zip(tcs, written):
        assert same(t, w) and torch.equal(t.W_skip, skip.T)
    r = prism.features(" Paris", tcs).check()
    assert "neuron" not in set(r.components.kinds()) and "mlp" not in set(r.components.kinds())
    assert (r.components.kinds() == "skip").sum() == 2


def test_duck_typed_saelens_object(prism):
    w = weights(5)
    cfg = SimpleNamespace(
        hook_name=HOOK,
        architecture="standard",
        apply_b_dec_to_input=False,
        normalize_activations="none",
    )
    sae = SimpleNamespace(cfg=cfg, **w)
    d = tp.Dictionary.from_saelens(sae)
    assert same(d, w) and d.activation == "relu"
    prism.features(" Paris", d).check()
    with pytest.raises(ArgumentError, match="has no W_enc"):
        tp.Dictionary.from_saelens(SimpleNamespace(cfg=cfg))


def test_real_saelens_sae(prism):
    """On the TransformerLens 3.x leg sae_lens is installed: a SAE it builds loads exactly."""
    sae_lens = pytest.importorskip("sae_lens")
    cfg_cls = getattr(sae_lens, "StandardSAEConfig", None)
    if cfg_cls is not None:  # SAELens >= 6
        sae = sae_lens.StandardSAE(cfg_cls(d_in=D, d_sae=F))
        sae.cfg.metadata.hook_name = HOOK
    else:
        cfg = sae_lens.SAEConfig.from_dict(
            {
                "architecture": "standard",
                "d_in": D,
                "d_sae": F,
                "dtype": "float32",
                "device": "cpu",
                "model_name": "demo",
                "hook_name": HOOK,
                "hook_layer": 1,
                "hook_head_index": None,
                "activation_fn_str": "relu",
                "apply_b_dec_to_input": True,
                "finetuning_scaling_factor": False,
                "sae_lens_training_version": None,
                "prepend_bos": True,
                "dataset_path": "",
                "dataset_trust_remote_code": False,
                "context_size": 8,
                "normalize_activations": "none",
            }
        )
        sae = sae_lens.SAE(cfg)
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(generator=torch.Generator().manual_seed(0))
    d = tp.Dictionary.from_saelens(sae)
    x = torch.randn(4, D, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(d.encode(x), sae.encode(x), atol=1e-5)
    prism.features(" Paris", d).check()


@pytest.mark.parametrize(
    "kw, fragment",
    [
        ({"W_enc": torch.zeros(D, F + 1)}, "shapes do not agree"),
        ({"b_dec": torch.zeros(D + 1)}, "b_dec has shape"),
        ({"hook": "blocks.1.attn.hook_pattern"}, "not a hook a dictionary can sit at"),
        ({"hook": "blocks.1.ln2.hook_normalized"}, "place to read"),
        ({"activation": "gelu"}, "activation"),
        ({"activation": "jumprelu"}, "needs threshold"),
        ({"activation": "topk"}, "needs k"),
        ({"input_scale": 0.0}, "input_scale"),
        ({"W_enc": torch.zeros(3)}, "2 dimension"),
        ({"input_hook": "blocks.0.hook_resid_mid", "hook": "blocks.1.hook_mlp_out"}, "of layer 0"),
    ],
)
def test_bad_construction(kw, fragment):
    w = dict(weights(), hook=HOOK)
    w.update(kw)
    with pytest.raises(ArgumentError, match=fragment):
        tp.Dictionary(**w)


def test_model_mismatch(prism):
    w = weights(d_out=D)
    w["W_enc"] = torch.zeros(D + 2, F)
    d = tp.Dictionary(**w, hook=HOOK)
    with pytest.raises(ArgumentError, match="d_in=130.*d_model=128"):
        prism.features(" Paris", d)


def test_numpy_numbers_are_numbers():
    """np.float32 input_scale and threshold are accepted as the same Python floats (issue
    21: they were refused); bools and arrays are not numbers."""

    w = weights()
    a = tp.Dictionary(**w, hook=HOOK, input_scale=np.float32(2.0))
    b = tp.Dictionary(**w, hook=HOOK, input_scale=2.0)
    assert a.input_scale == b.input_scale == 2.0
    j = tp.Dictionary(**w, hook=HOOK, activation="jumprelu", threshold=np.float32(0.5))
    assert torch.equal(j.threshold, torch.full((F,), 0.5))
    for bad in (True, np.array([1.0, 2.0]), "2"):
        with pytest.raises(ArgumentError, match="input_scale"):
            tp.Dictionary(**w, hook=HOOK, input_scale=bad)
