"""Every architecture TransformerLens can bridge, as a tiny random model built offline.

The list of architectures is TransformerLens's own (``SUPPORTED_ARCHITECTURES`` of its
adapter factory), read at import time, so a new TransformerLens release adds rows without a
change here. Each name is classified (:func:`classify`) as a decoder-only causal LM or as
something else (encoder, encoder-decoder, multimodal, mixture of experts, hybrid/recurrent/
state-space, an alias of another name, or a class that ``transformers`` does not ship). Any
causal LM that ``transformers`` ships can be built (:func:`build`) from its config class with
tiny sizes (vocab 60, 2 layers, d_model 32, 16 positions), its weights perturbed as in
``families.py`` so that logits are far from zero and folding mistakes show.

Nothing is downloaded: configs are built from the installed ``transformers`` classes.
"""

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

try:  # families.py lives next to this file; import it both as a module and as a package member
    from families import D_VOCAB, N_CTX, SEED, _perturb
except ImportError:  # pragma: no cover - run from the repo root as tests.arch_zoo
    from tests.families import D_VOCAB, N_CTX, SEED, _perturb

__all__ = [
    "ZooSkip",
    "ArchInfo",
    "architectures",
    "classify",
    "tiny_config",
    "build",
    "supports_compatibility_mode",
    "KIND_OVERRIDES",
    "CONFIG_OVERRIDES",
    "SURVEYED_KINDS",
]


class ZooSkip(Exception):
    """The architecture cannot be built here (no ``transformers`` class, no tiny config...)."""


#: kinds of architecture, as :func:`classify` names them
DECODER = "decoder"  # a decoder-only causal LM with attention + dense MLP blocks
MOE = "moe"  # a causal LM with mixture-of-experts MLPs (in some layers)
HYBRID = "hybrid"  # attention mixed with recurrent / SSM / conv / linear-attention
SSM = "ssm"  # no attention at all (Mamba, RWKV)
ENCODER = "encoder"  # bidirectional (BERT, audio / vision encoders)
ENC_DEC = "encoder-decoder"  # T5, BART, ...
MULTIMODAL = "multimodal"  # a text decoder behind a vision / audio tower
ALIAS = "alias"  # another name for an adapter that a surveyed name covers
NO_CLASS = "no-hf-class"  # remote-code / TL-native: transformers has no such class

#: the kinds the survey builds and runs (the others are listed, not run)
SURVEYED_KINDS = (DECODER, MOE, HYBRID, SSM)

#: where the heuristics of :func:`classify` are wrong (reason given)
KIND_OVERRIDES: dict[str, tuple[str, str]] = {
    "BertLMHeadModel": (ENCODER, "BERT blocks (post-LN encoder used as a decoder)"),
    "Lfm2ForCausalLM": (HYBRID, "short-convolution layers between attention layers"),
    "RecurrentGemmaForCausalLM": (HYBRID, "RG-LRU recurrent blocks between attention blocks"),
    "HrmTextForCausalLM": (
        HYBRID,
        "hierarchical recurrent stacks (the same blocks applied in loops)",
    ),
    "BloomModel": (DECODER, "Bloom base model (no LM head)"),
}

#: tiny values for config fields, set only where the config class has the field
TINY: dict[str, Any] = {
    # sizes (Llama-style names)
    "vocab_size": D_VOCAB,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "max_position_embeddings": N_CTX,
    # GPT-2 / GPT-J / CodeGen / Bloom / OPT / XGLM names
    "n_embd": 32,
    "n_layer": 2,
    "n_head": 4,
    "n_positions": N_CTX,
    "n_ctx": N_CTX,
    "n_inner": 64,
    "ffn_dim": 64,
    "num_layers": 2,
    "num_heads": 4,
    "word_embed_proj_dim": 32,
    "rotary_dim": 4,
    "max_seq_len": N_CTX,
    "d_model": 32,
    "expansion_ratio": 2,
    "multi_query_group_num": 2,
    "kv_channels": 8,
    "seq_length": N_CTX,
    # sliding-window attention: a window smaller than the survey's 7 tokens, so it matters
    "sliding_window": 4,
    "attention_chunk_size": 4,
    # mixture of experts
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "moe_num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_k": 2,
    "top_k_experts": 2,
    "moe_intermediate_size": 16,
    "shared_expert_intermediate_size": 16,
    "moe_shared_expert_intermediate_size": 16,
    "expert_intermediate_size": 16,
    "n_group": 1,
    "topk_group": 1,
    # multi-head latent attention (DeepSeek)
    "q_lora_rank": 16,
    "kv_lora_rank": 8,
    "qk_rope_head_dim": 4,
    "qk_nope_head_dim": 4,
    "v_head_dim": 8,
    "qk_head_dim": 8,
    # state-space / recurrent / conv parts of hybrids
    "state_size": 4,
    "ssm_state_size": 4,
    "mamba_d_state": 4,
    "mamba_n_heads": 4,
    "mamba_num_heads": 4,
    "mamba_d_head": 16,
    "mamba_head_dim": 16,
    "mamba_headdim": 16,
    "mamba_d_ssm": 64,
    "mamba_chunk_size": 8,
    "chunk_size": 8,
    "time_step_rank": 4,
    "mamba_dt_rank": 4,
    "n_mamba_heads": 4,
    "lru_width": 32,
    "attention_window_size": 4,
    "use_mamba_kernels": False,
    "use_mambapy": False,
    "linear_num_value_heads": 2,
    "linear_num_key_heads": 2,
    "linear_key_head_dim": 8,
    "linear_value_head_dim": 8,
    "num_layers_per_stack": 1,
    "hidden_size_per_layer_input": 8,
    "vocab_size_per_layer_input": D_VOCAB,
    "n_groups": 1,
    "mamba_n_groups": 1,
    "attention_head_dim": 8,
    "index_head_dim": 8,
    "index_n_heads": 2,
    "index_topk": 4,
}

#: TINY keys that switch a feature on: set only where the default config has it on already
_FEATURE_KEYS = (
    "num_experts",
    "num_local_experts",
    "n_routed_experts",
    "moe_num_experts",
    "num_experts_per_tok",
    "moe_k",
    "top_k_experts",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
    "moe_shared_expert_intermediate_size",
    "expert_intermediate_size",
    "q_lora_rank",
    "kv_lora_rank",
    "sliding_window",
    "attention_chunk_size",
    "hidden_size_per_layer_input",
)

#: per-architecture config values (on top of TINY), where the generic ones do not fit
CONFIG_OVERRIDES: dict[str, dict[str, Any]] = {
    "GPTNeoXForCausalLM": dict(rotary_pct=0.5, use_parallel_residual=True),
    "GPTNeoForCausalLM": dict(attention_types=[[["global", "local"], 1]], window_size=4),
    "GPTJForCausalLM": dict(rotary_dim=4),
    "CodeGenForCausalLM": dict(rotary_dim=4),
    "PhiForCausalLM": dict(partial_rotary_factor=0.5, num_key_value_heads=4),  # phi-2: no GQA
    "StableLmForCausalLM": dict(partial_rotary_factor=0.5),
    "FalconForCausalLM": dict(
        new_decoder_architecture=False,
        multi_query=True,
        parallel_attn=True,
        alibi=False,
        num_kv_heads=1,
    ),
    "MptForCausalLM": dict(
        d_model=32, n_heads=4, n_layers=2, max_seq_len=N_CTX, attn_config={"alibi": True}
    ),
    "BloomForCausalLM": dict(hidden_size=32, n_head=4, n_layer=2),
    "BloomModel": dict(hidden_size=32, n_head=4, n_layer=2),
    "OPTForCausalLM": dict(word_embed_proj_dim=32, do_layer_norm_before=True),
    "XGLMForCausalLM": dict(d_model=32, attention_heads=4, ffn_dim=64),
    "Gemma2ForCausalLM": dict(final_logit_softcapping=8.0, attn_logit_softcapping=50.0),
    "Gemma3ForCausalLM": dict(final_logit_softcapping=None),
    "CohereForCausalLM": dict(logit_scale=0.5, use_qk_norm=True),
    "Cohere2ForCausalLM": dict(logit_scale=0.5),
    "GraniteForCausalLM": dict(
        embedding_multiplier=3.0,
        residual_multiplier=0.5,
        attention_multiplier=0.2,
        logits_scaling=4.0,
    ),
    "GraniteMoeForCausalLM": dict(
        embedding_multiplier=3.0,
        residual_multiplier=0.5,
        attention_multiplier=0.2,
        logits_scaling=4.0,
    ),
    "Qwen2MoeForCausalLM": dict(mlp_only_layers=[0]),
    "DeepseekV2ForCausalLM": dict(first_k_dense_replace=1, num_experts_per_tok=2),
    "DeepseekV3ForCausalLM": dict(first_k_dense_replace=1),
    "Ernie4_5_MoeForCausalLM": dict(moe_layer_start_index=1),
    "JambaForCausalLM": dict(
        attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1
    ),
    "BambaForCausalLM": dict(attn_layer_indices=[1]),
    "Zamba2ForCausalLM": dict(hybrid_layer_ids=[1], mamba_headdim=16),
    "RecurrentGemmaForCausalLM": dict(block_types=["recurrent", "attention"]),
    "NemotronHForCausalLM": dict(
        layers_block_type=["full_attention", "mlp", "linear_attention", "mlp"], num_hidden_layers=4
    ),
    "Mamba2ForCausalLM": dict(num_heads=4, head_dim=16),
    "GraniteMoeHybridForCausalLM": dict(layer_types=["linear_attention", "full_attention"]),
    # (Lfm2's default config has attention in every layer: give it a convolution layer)
    "Lfm2ForCausalLM": dict(layer_types=["conv", "full_attention"], full_attn_idxs=[1]),
    "Lfm2MoeForCausalLM": dict(num_dense_layers=1, layer_types=["conv", "full_attention"]),
    "GlmMoeDsaForCausalLM": dict(mlp_layer_types=["dense", "sparse"]),
    "Gemma4ForCausalLM": dict(per_layer_config={}, global_head_dim=8, num_kv_shared_layers=0),
}

_SUB_CONFIG_KEYS = ("vision_config", "audio_config", "vision_tower", "speech_config")
_EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
_ATTN_TYPES = {
    "full_attention",
    "sliding_attention",
    "chunked_attention",
    "attention",
    "global",
    "local",
    "compressed_sparse_attention",
    "heavily_compressed_attention",
    "indexed_attention",
}  # (the last three: sparse attention of DeepSeek-V4 / GLM-DSA)
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel", "LMHeadCustomModel", "ModelLM")


@dataclass(frozen=True)
class ArchInfo:
    """One name of TransformerLens's ``SUPPORTED_ARCHITECTURES``."""

    name: str
    adapter: str  # the adapter class name
    kind: str  # one of the kinds above
    reason: str  # why it is of that kind (short)
    hf_class: Optional[type]

    @property
    def buildable(self) -> bool:
        return self.hf_class is not None and self.kind in SURVEYED_KINDS


def _supported() -> dict[str, type]:
    from transformer_lens.factories.architecture_adapter_factory import SUPPORTED_ARCHITECTURES

    return dict(SUPPORTED_ARCHITECTURES)


def _default_config(cls: type) -> Any:
    return cls.config_class()


def classify(name: str, adapter: Optional[type] = None) -> ArchInfo:
    """The kind of one architecture name, from its ``transformers`` class and default config."""
    import transformers

    table = _supported()
    adapter = adapter or table[name]
    cls = getattr(transformers, name, None)
    if not isinstance(cls, type) or not hasattr(cls, "config_class"):
        twins = [
            n
            for n, a in table.items()
            if a is adapter and n != name and isinstance(getattr(transformers, n, None), type)
        ]
        if twins:
            return ArchInfo(name, adapter.__name__, ALIAS, f"same adapter as {twins[0]}", None)
        return ArchInfo(
            name,
            adapter.__name__,
            NO_CLASS,
            "transformers has no such class (remote code or TL-native)",
            None,
        )
    if name in KIND_OVERRIDES:
        kind, why = KIND_OVERRIDES[name]
        return ArchInfo(name, adapter.__name__, kind, why, cls)
    try:
        cfg = _default_config(cls)
    except Exception as exc:  # noqa: BLE001 - classification must not fail
        return ArchInfo(
            name, adapter.__name__, NO_CLASS, f"default config fails: {type(exc).__name__}", None
        )
    d = cfg.to_dict()
    if d.get("is_encoder_decoder"):
        return ArchInfo(name, adapter.__name__, ENC_DEC, "is_encoder_decoder", cls)
    subs = [k for k in _SUB_CONFIG_KEYS if d.get(k)]
    if subs:
        return ArchInfo(name, adapter.__name__, MULTIMODAL, f"has {', '.join(subs)}", cls)
    if not name.endswith(_CAUSAL_SUFFIXES) or not getattr(adapter, "supports_causal_loss", True):
        return ArchInfo(name, adapter.__name__, ENCODER, "not a causal-LM class", cls)
    mamba = [
        k
        for k in d
        if "mamba" in k
        or k in ("state_size", "ssm_state_size", "conv_kernel", "conv_L_cache", "block_types")
    ]
    types = d.get("layer_types") or d.get("layers_block_type") or []
    other = sorted({str(t) for t in types} - _ATTN_TYPES) if isinstance(types, list) else []
    experts = [k for k in _EXPERT_KEYS if d.get(k)]
    attn = any(k in d for k in ("num_attention_heads", "n_head", "num_heads", "n_heads"))
    if mamba and not attn or d.get("model_type") in ("rwkv", "mamba", "mamba2", "falcon_mamba"):
        return ArchInfo(name, adapter.__name__, SSM, "no attention (state-space / recurrent)", cls)
    if mamba or other:
        return ArchInfo(
            name,
            adapter.__name__,
            HYBRID,
            f"non-attention layers ({', '.join(other) or mamba[0]})",
            cls,
        )
    if experts:
        return ArchInfo(name, adapter.__name__, MOE, f"{experts[0]}={d[experts[0]]}", cls)
    return ArchInfo(name, adapter.__name__, DECODER, "causal LM", cls)


def architectures() -> list[ArchInfo]:
    """Every name of TransformerLens's ``SUPPORTED_ARCHITECTURES``, classified, in its order."""
    return [classify(name, adapter) for name, adapter in _supported().items()]


def _layer_types(types: list, n_layers: int) -> list:
    """A length-``n_layers`` layer_types list keeping the kinds of the default one."""
    distinct = list(dict.fromkeys(str(t) for t in types))
    if "sliding_attention" in distinct and "full_attention" in distinct:
        distinct = ["sliding_attention", "full_attention"]  # a windowed layer, then a global one
    elif len(distinct) > 1 and "full_attention" in distinct:
        distinct = [t for t in distinct if t != "full_attention"] + ["full_attention"]
    return [distinct[i % len(distinct)] for i in range(n_layers)]


def tiny_config(name: str) -> Any:
    """A tiny ``transformers`` config of architecture ``name`` (raises :class:`ZooSkip`)."""
    info = classify(name)
    if info.hf_class is None:
        raise ZooSkip(f"{name}: {info.reason}")
    cls = info.hf_class
    try:
        default = _default_config(cls)
    except Exception as exc:
        raise ZooSkip(f"{name}: default config fails: {type(exc).__name__}: {exc}") from exc
    d = default.to_dict()
    kw = {k: v for k, v in TINY.items() if k in d and (k not in _FEATURE_KEYS or d[k])}
    if "kv_lora_rank" in d:  # multi-head latent attention: head_dim is the rotary part
        kw["head_dim"] = kw["qk_rope_head_dim"]
        kw["num_key_value_heads"] = kw["num_attention_heads"]  # (no grouped queries)
    kw.update(CONFIG_OVERRIDES.get(name, {}))
    for key in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id"):
        value = d.get(key)
        if isinstance(value, int) and value >= D_VOCAB:
            kw[key] = {"pad_token_id": 2, "bos_token_id": 1}.get(key, 3)
        elif isinstance(value, list):
            kw[key] = [v if v < D_VOCAB else 3 for v in value]
    n_layers = kw.get("num_hidden_layers", kw.get("n_layer", kw.get("num_layers", 2)))
    for key in ("layer_types", "layers_block_type"):
        if isinstance(d.get(key), list) and d[key] and key not in kw:
            kw[key] = _layer_types(d[key], n_layers)
    try:
        return default.__class__(**kw)
    except Exception as exc:
        raise ZooSkip(f"{name}: tiny config rejected: {type(exc).__name__}: {exc}") from exc


def supports_compatibility_mode(name: str) -> bool:
    """False when TransformerLens's adapter for ``name`` refuses compatibility mode."""
    adapter = _supported().get(name)
    return getattr(adapter, "supports_compatibility_mode", True) is not False


def _force_eager_attention(model: Any) -> None:
    """TransformerLens's ``force_eager_attention`` (4.x), or the same by hand (3.x)."""
    try:
        from transformer_lens.utilities.attn_implementation import force_eager_attention
    except ImportError:  # TransformerLens 3.x has no helper
        try:
            model.set_attn_implementation("eager")
        except Exception:  # noqa: BLE001 - as TransformerLens does: write the config instead
            model.config._attn_implementation = "eager"
        return
    force_eager_attention(model)


def build(
    name: str,
    fold: bool,
    dtype: torch.dtype = torch.float32,
    tokenizer: Any = None,
    perturb: bool = True,
    compat: Optional[bool] = None,
    attn_implementation: str = "eager",
    prepare: Optional[Callable[[Any], None]] = None,
) -> Any:
    """A tiny random ``name`` model as a TransformerBridge in compatibility mode.

    ``fold=True`` folds the norms (``enable_compatibility_mode()``), ``fold=False`` keeps the
    weights unfolded (``no_processing=True``). ``compat=None`` enables compatibility mode
    unless TransformerLens's adapter says it does not support it (VaultGemma): then the bridge
    is returned as TransformerLens leaves it, which is what a user would hand tlprisms.
    Attention runs eagerly, as in ``TransformerBridge.boot_transformers`` (with sdpa, bridges
    that call HF's attention never fire ``hook_pattern``); ``attn_implementation="sdpa"`` keeps
    transformers' default instead. ``prepare(hf)``, where given, edits the Hugging Face model
    in place after the perturbation (e.g. larger q/k norm weights). Raises :class:`ZooSkip`
    when ``transformers`` lacks the class or a tiny model of it cannot be built; bridge errors
    propagate.
    """
    from transformer_lens.model_bridge.sources import build_bridge_from_module

    cfg = tiny_config(name)
    cls = classify(name).hf_class
    torch.manual_seed(SEED)
    try:
        hf = cls(cfg).eval()
    except Exception as exc:
        raise ZooSkip(
            f"{name}: transformers cannot build the tiny model: {type(exc).__name__}: {exc}"
        ) from exc
    # As TransformerBridge.boot_transformers does: transformers' default sdpa attention returns
    # no weights, so hook_pattern would never fire on bridges that call HF's attention.
    if attn_implementation == "eager":
        _force_eager_attention(hf)
    elif attn_implementation != "sdpa":
        raise ValueError(f"attn_implementation={attn_implementation!r}: 'eager' or 'sdpa'")
    if perturb:
        _perturb(hf.named_parameters(), torch.Generator().manual_seed(SEED), weight_scale=7.0)
    if prepare is not None:
        with torch.no_grad():
            prepare(hf)
    hf = hf.to(dtype)
    bridge = build_bridge_from_module(hf, name, hf_config=cfg, tokenizer=tokenizer)
    if compat is None:
        compat = supports_compatibility_mode(name)
    if compat:
        bridge.enable_compatibility_mode(disable_warnings=True, no_processing=not fold)
    return bridge


if __name__ == "__main__":  # a quick listing
    for info in architectures():
        print(f"{info.name:45s} {info.kind:16s} {info.reason}")
