"""An embedded demo model for tlprisms: a tiny Gemma-architecture transformer.

The model is a miniature of gemma-2b's architecture (RMSNorm with the ``1 + w``
offset, gated GELU-tanh MLP, rotary positions, multi-query attention with a
single key/value head, tied embeddings scaled by ``sqrt(d_model)``), trained by
``scripts/train_demo_model.py`` on two tasks:

* :func:`capital_task`: ``"The capital of France is"`` -> ``" Paris"``
* :func:`addition_task`: ``"7+2="`` -> ``" 9"`` for ``a, b`` in ``1..9``

Its weights, HF config and word-level tokenizer ship in ``assets/`` (a few
hundred kB), so :func:`load_demo_model` works offline, under TransformerLens
4.x (``TransformerBridge``) and 3.x (``TransformerBridge`` or
``HookedTransformer``).

Only ``torch`` is imported at module import time; ``transformers`` and
``transformer_lens`` are imported inside the functions that need them.

>>> from tlprisms.demo import addition_task, load_demo_model
>>> model = load_demo_model()
>>> addition_task()[0], model.cfg.n_layers
(('1+1=', ' 2'), 2)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "ASSETS_DIR",
    "CAPITALS",
    "DEMO_CONFIG",
    "SPECIAL_TOKENS",
    "addition_task",
    "capital_task",
    "demo_hf_config",
    "demo_metadata",
    "load_demo_hf_model",
    "load_demo_model",
    "load_demo_tokenizer",
    "load_demo_sae",
]

#: Folder holding ``model.safetensors``, ``config.json``, ``tokenizer.json`` and
#: ``metadata.json``.
ASSETS_DIR = Path(__file__).resolve().parent / "assets"

#: (country, capital) pairs; every name is a single word (and a single token).
CAPITALS: tuple[tuple[str, str], ...] = (
    ("France", "Paris"),
    ("Germany", "Berlin"),
    ("Japan", "Tokyo"),
    ("Italy", "Rome"),
    ("Spain", "Madrid"),
    ("Russia", "Moscow"),
    ("China", "Beijing"),
    ("Egypt", "Cairo"),
    ("Greece", "Athens"),
    ("Portugal", "Lisbon"),
    ("Austria", "Vienna"),
    ("Poland", "Warsaw"),
    ("Hungary", "Budapest"),
    ("Sweden", "Stockholm"),
    ("Norway", "Oslo"),
    ("Denmark", "Copenhagen"),
    ("Finland", "Helsinki"),
    ("Ireland", "Dublin"),
    ("Belgium", "Brussels"),
    ("Netherlands", "Amsterdam"),
    ("Czechia", "Prague"),
    ("Romania", "Bucharest"),
    ("Bulgaria", "Sofia"),
    ("Ukraine", "Kyiv"),
    ("Turkey", "Ankara"),
    ("Iran", "Tehran"),
    ("Iraq", "Baghdad"),
    ("Syria", "Damascus"),
    ("Lebanon", "Beirut"),
    ("Jordan", "Amman"),
    ("Afghanistan", "Kabul"),
    ("Pakistan", "Islamabad"),
    ("Nepal", "Kathmandu"),
    ("Bangladesh", "Dhaka"),
    ("Thailand", "Bangkok"),
    ("Vietnam", "Hanoi"),
    ("Indonesia", "Jakarta"),
    ("Philippines", "Manila"),
    ("Australia", "Canberra"),
    ("Canada", "Ottawa"),
    ("Peru", "Lima"),
    ("Chile", "Santiago"),
    ("Colombia", "Bogota"),
    ("Venezuela", "Caracas"),
    ("Cuba", "Havana"),
    ("Kenya", "Nairobi"),
    ("Nigeria", "Abuja"),
    ("Ghana", "Accra"),
    ("Morocco", "Rabat"),
    ("Iceland", "Reykjavik"),
    ("Switzerland", "Bern"),
    ("Croatia", "Zagreb"),
    ("Serbia", "Belgrade"),
    ("Brazil", "Brasilia"),
    ("Armenia", "Yerevan"),
    ("Kazakhstan", "Astana"),
    ("Uzbekistan", "Tashkent"),
    ("Qatar", "Doha"),
    ("Tunisia", "Tunis"),
    ("Senegal", "Dakar"),
)

#: Special tokens of the word-level tokenizer, with Gemma's ids.
SPECIAL_TOKENS: dict[str, str] = {
    "pad_token": "<pad>",
    "eos_token": "<eos>",
    "bos_token": "<bos>",
    "unk_token": "<unk>",
}

#: The HF ``GemmaConfig`` keyword arguments of the demo model (vocab_size is
#: fixed by the tokenizer; ``demo_hf_config()`` reads the shipped config.json).
DEMO_CONFIG: dict[str, Any] = {
    "architectures": ["GemmaForCausalLM"],
    "hidden_size": 128,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 32,
    "hidden_act": "gelu_pytorch_tanh",
    "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-6,
    "initializer_range": 0.02,
    "tie_word_embeddings": True,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    "pad_token_id": 0,
    "eos_token_id": 1,
    "bos_token_id": 2,
}


def capital_task() -> list[tuple[str, str]]:
    """``[("The capital of France is", " Paris"), ...]``, one per country."""
    return [(f"The capital of {country} is", f" {capital}") for country, capital in CAPITALS]


def addition_task() -> list[tuple[str, str]]:
    """``[("1+1=", " 2"), ..., ("9+9=", " 18")]``: all 81 sums of a, b in 1..9."""
    return [(f"{a}+{b}=", f" {a + b}") for a in range(1, 10) for b in range(1, 10)]


def demo_metadata() -> dict[str, Any]:
    """The training record written next to the weights (seed, steps, accuracies...)."""
    with open(ASSETS_DIR / "metadata.json", encoding="utf-8") as f:
        return json.load(f)


def demo_hf_config():
    """The ``transformers.GemmaConfig`` of the demo model, read from assets/config.json."""
    from transformers import GemmaConfig

    with open(ASSETS_DIR / "config.json", encoding="utf-8") as f:
        cfg_dict = json.load(f)
    return GemmaConfig(**cfg_dict)


def load_demo_tokenizer():
    """The word-level tokenizer as a ``transformers.PreTrainedTokenizerFast``.

    Encoding adds ``<bos>`` in front (as Gemma's tokenizer does, and as
    TransformerLens' ``to_tokens`` expects); ``add_special_tokens=False`` leaves
    it out, so ``" Paris"`` encodes to the single token ``Paris``.
    """
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(ASSETS_DIR / "tokenizer.json"),
        model_max_length=DEMO_CONFIG["max_position_embeddings"],
        padding_side="right",
        add_bos_token=True,
        add_eos_token=False,
        name_or_path=str(ASSETS_DIR),
        **SPECIAL_TOKENS,
    )
    return tok


def load_demo_hf_model(device: Any = "cpu", dtype: torch.dtype = torch.float32):
    """The trained ``transformers.GemmaForCausalLM`` (eval mode), weights from assets/.

    Leaves torch's global RNG untouched (the random init that the constructor
    draws is done inside a forked RNG and then overwritten).
    """
    from safetensors.torch import load_file
    from transformers import GemmaForCausalLM

    cfg = demo_hf_config()
    cfg._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        model = GemmaForCausalLM(cfg)
    state = load_file(str(ASSETS_DIR / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # lm_head.weight is tied to the embedding and is not stored separately.
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(
            f"demo weights do not match the model: missing {missing}, unexpected {unexpected}"
        )
    model.tie_weights()
    model.to(device=device, dtype=dtype)  # type: ignore[call-arg]  # HF types it as wrapped
    model.eval()
    return model, cfg


def _load_bridge(fold: bool, device: Any, dtype: torch.dtype):
    from transformer_lens.model_bridge.sources import build_bridge_from_module

    hf_model, cfg = load_demo_hf_model(device=device, dtype=dtype)
    tok = load_demo_tokenizer()
    bridge = build_bridge_from_module(
        hf_model,
        "GemmaForCausalLM",
        hf_config=cfg,
        tokenizer=tok,
        dtype=dtype,
        device=device,
        model_name="tlprisms-demo-gemma",
    )
    bridge.enable_compatibility_mode(disable_warnings=True, no_processing=not fold)
    bridge.eval()
    return bridge


def _hooked_config(hf_cfg, fold: bool, device: Any, dtype: torch.dtype):
    """A ``HookedTransformerConfig`` that matches the Gemma architecture.

    Mirrors what TransformerLens 3.x builds for ``google/gemma-2b`` (see
    ``loading_from_pretrained.convert_hf_model_config``), with the demo sizes.
    """
    from transformer_lens import HookedTransformerConfig

    rope_theta = (hf_cfg.rope_parameters or {}).get("rope_theta", 10000.0)
    return HookedTransformerConfig(
        d_model=hf_cfg.hidden_size,
        d_head=hf_cfg.head_dim,
        n_heads=hf_cfg.num_attention_heads,
        d_mlp=hf_cfg.intermediate_size,
        n_layers=hf_cfg.num_hidden_layers,
        n_ctx=hf_cfg.max_position_embeddings,
        eps=hf_cfg.rms_norm_eps,
        d_vocab=hf_cfg.vocab_size,
        act_fn=hf_cfg.hidden_act,  # "gelu_pytorch_tanh", as HF runs it
        initializer_range=hf_cfg.initializer_range,
        normalization_type="RMS",
        rotary_base=rope_theta,
        rotary_dim=hf_cfg.head_dim,
        positional_embedding_type="rotary",
        use_attn_scale=True,
        n_key_value_heads=hf_cfg.num_key_value_heads,
        gated_mlp=True,
        final_rms=True,
        original_architecture="GemmaForCausalLM",
        tokenizer_prepends_bos=True,
        default_prepend_bos=True,
        model_name="tlprisms-demo-gemma",
        init_weights=False,
        device=str(device),
        dtype=dtype,
    )


def _load_hooked(fold: bool, device: Any, dtype: torch.dtype):
    try:
        from transformer_lens import HookedTransformer
    except ImportError as exc:  # TransformerLens >= 4 removed HookedTransformer
        import transformer_lens

        version = getattr(transformer_lens, "__version__", "unknown")
        raise RuntimeError(
            f"kind='hooked' needs transformer_lens.HookedTransformer, which TransformerLens "
            f"{version} does not have (it was removed in 4.0). Use kind='bridge' instead, "
            f"or install transformer-lens 3.x."
        ) from exc
    from transformer_lens.pretrained.weight_conversions.gemma import convert_gemma_weights

    # Convert and fold in float32; load_state_dict then casts into ``dtype``.
    hf_model, hf_cfg = load_demo_hf_model(device="cpu", dtype=torch.float32)
    cfg = _hooked_config(hf_cfg, fold, device, dtype)
    with torch.no_grad():
        state_dict = {
            k: v.detach().clone() for k, v in convert_gemma_weights(hf_model, cfg).items()
        }
    del hf_model
    tok = load_demo_tokenizer()
    with torch.random.fork_rng(devices=[]):
        model = HookedTransformer(cfg, tokenizer=tok, move_to_device=False)
    # Same processing as HookedTransformer.from_pretrained (RMS models: fold the
    # norm weights, no centring of writing weights, centre the unembedding).
    model.load_and_process_state_dict(
        state_dict,
        fold_ln=fold,
        center_writing_weights=fold,
        center_unembed=fold,
        fold_value_biases=fold,
    )
    model.move_model_modules_to_device()  # as from_pretrained does (no print)
    model.eval()
    return model


def load_demo_model(
    kind: str = "auto",
    fold: bool = True,
    device: Any = "cpu",
    dtype: torch.dtype = torch.float32,
):
    """Load the demo model as a TransformerLens model, offline.

    Args:
        kind: ``"bridge"`` (a ``TransformerBridge`` in compatibility mode,
            TransformerLens 3.9 and 4.x), ``"hooked"`` (a ``HookedTransformer``,
            TransformerLens 3.x only) or ``"auto"`` (= ``"bridge"``).
        fold: Process the weights like ``HookedTransformer.from_pretrained``
            (fold the RMSNorm weights into the next linear layers, centre the
            unembedding). ``False`` keeps the raw weights. Logits differ only
            by a per-position constant (the unembedding centring).
        device: Torch device for the model.
        dtype: Parameter dtype.
    """
    if kind == "auto":
        kind = "bridge"
    if kind == "bridge":
        return _load_bridge(fold, device, dtype)
    if kind == "hooked":
        return _load_hooked(fold, device, dtype)
    raise ValueError(f"kind must be 'auto', 'bridge' or 'hooked', not {kind!r}")


def load_demo_sae() -> Any:
    """The demo SAE: 256 ReLU features on the demo model's residual stream before layer 1
    (``b_dec`` subtracted before encoding), trained by ``scripts/train_demo_sae.py`` (seeded)
    and shipped in ``assets/demo_sae.safetensors``.

    >>> sae = load_demo_sae()
    >>> sae.d_sae, sae.layer
    (256, 1)
    """
    from safetensors import safe_open

    from tlprisms._seam import HOOK_NAME_KEY
    from tlprisms.dictionary import Dictionary

    path = ASSETS_DIR / "demo_sae.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        w = {k: f.get_tensor(k) for k in f.keys()}
    return Dictionary(
        w["W_enc"],
        w["b_enc"],
        w["W_dec"],
        w["b_dec"],
        meta[HOOK_NAME_KEY],
        subtract_b_dec=meta.get("apply_b_dec_to_input") == "true",
        name="demo SAE",
    )
