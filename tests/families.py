"""Tiny seeded models of every supported family, built from configs (no hub access).

Each builder returns a TransformerLens model with norm weights and biases perturbed away
from 1 and 0 and weights scaled so that logits are far from zero: folding mistakes and
missing constants then show up as completeness failures instead of hiding in rounding.

Families are keyed ``"<family>/<kind>"`` where kind is ``bridge`` (TransformerBridge in
compatibility mode) or ``hooked`` (HookedTransformer, TransformerLens <= 3 only).
"""

import tempfile
from collections.abc import Callable
from typing import Optional

import torch
import transformer_lens

D_VOCAB = 60
N_CTX = 16
SEED = 0
WORDS = ["Paris", "London", "Rome", "Berlin", "The", "capital", "of", "France", "is", "a"]

_TOKENIZER_DIR: Optional[str] = None
try:
    HAS_HOOKED = hasattr(transformer_lens, "HookedTransformer")
except ImportError:  # TransformerLens 4 raises instead of returning False
    HAS_HOOKED = False
try:
    from transformer_lens.model_bridge.sources import boot_native  # noqa: F401

    HAS_NATIVE = True
except ImportError:
    HAS_NATIVE = False


def make_tokenizer():
    """A word-level tokenizer over D_VOCAB tokens, built locally."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<bos>", "<pad>", "<eos>"]
    words = specials + WORDS + [f"w{i}" for i in range(D_VOCAB - len(specials) - len(WORDS))]
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<bos>",
        pad_token="<pad>",
        eos_token="<eos>",
    )
    # TransformerLens re-loads tokenizers by name_or_path: give it a local folder.
    global _TOKENIZER_DIR
    if _TOKENIZER_DIR is None:
        _TOKENIZER_DIR = tempfile.mkdtemp(prefix="tlprisms-test-tok-")
        fast.save_pretrained(_TOKENIZER_DIR)
    return PreTrainedTokenizerFast.from_pretrained(_TOKENIZER_DIR)


def _perturb(named_params, gen: torch.Generator, weight_scale: float = 2.5) -> None:
    with torch.no_grad():
        for name, p in named_params:
            low = name.lower()
            if p.ndim == 1:
                is_norm = any(k in low for k in ("norm", "ln", ".w", "layernorm"))
                if is_norm and not low.endswith("bias") and not low.endswith(".b"):
                    p.add_(0.3 * torch.randn(p.shape, generator=gen).to(p.device))
                else:
                    p.add_(0.2 * torch.randn(p.shape, generator=gen).to(p.device))
            else:
                unembed = any(
                    k in low
                    for k in (
                        "lm_head",
                        "wte",
                        "embed_tokens",
                        "embed_in",
                        "embed_out",
                        "unembed",
                        "w_u",
                        "w_e",
                    )
                )
                p.mul_(weight_scale * (4.0 if unembed else 1.0))


# --------------------------------------------------------------------- HF-backed bridges
def _hf(
    arch: str, fold: bool, dtype: torch.dtype = torch.float32, tokenizer=None, device: str = "cpu"
):
    import transformers as tf
    from transformer_lens.model_bridge.sources import build_bridge_from_module

    common = dict(vocab_size=D_VOCAB, max_position_embeddings=N_CTX)
    if arch == "gpt2":
        cls, name = tf.GPT2LMHeadModel, "GPT2LMHeadModel"
        cfg = tf.GPT2Config(vocab_size=D_VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=N_CTX)
    elif arch == "neox":
        cls, name = tf.GPTNeoXForCausalLM, "GPTNeoXForCausalLM"
        cfg = tf.GPTNeoXConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            rotary_pct=0.5,
            use_parallel_residual=True,
            **common,
        )
    elif arch == "llama":
        cls, name = tf.LlamaForCausalLM, "LlamaForCausalLM"
        cfg = tf.LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            **common,
        )
    elif arch == "qwen2":
        cls, name = tf.Qwen2ForCausalLM, "Qwen2ForCausalLM"
        cfg = tf.Qwen2Config(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            **common,
        )
    elif arch == "gemma":
        cls, name = tf.GemmaForCausalLM, "GemmaForCausalLM"
        cfg = tf.GemmaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=8,
            hidden_activation="gelu_pytorch_tanh",
            **common,
        )
    elif arch == "gemma2":
        cls, name = tf.Gemma2ForCausalLM, "Gemma2ForCausalLM"
        cfg = tf.Gemma2Config(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            final_logit_softcapping=8.0,
            attn_logit_softcapping=50.0,
            **common,
        )
    else:
        raise KeyError(arch)
    torch.manual_seed(SEED)
    hf = cls(cfg).eval()
    _perturb(hf.named_parameters(), torch.Generator().manual_seed(SEED), weight_scale=7.0)
    hf = hf.to(device=device, dtype=dtype)
    bridge = build_bridge_from_module(hf, name, hf_config=cfg, tokenizer=tokenizer)
    bridge.enable_compatibility_mode(disable_warnings=True, no_processing=not fold)
    return bridge


def _native_solu(
    fold: bool, dtype: torch.dtype = torch.float32, tokenizer=None, device: str = "cpu"
):
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge.sources import boot_native

    cfg = TransformerBridgeConfig(
        d_model=32,
        n_layers=2,
        n_heads=4,
        d_head=8,
        d_mlp=64,
        d_vocab=D_VOCAB,
        n_ctx=N_CTX,
        act_fn="solu_ln",
        normalization_type="LN",
        seed=SEED,
    )
    bridge = boot_native(cfg, tokenizer=tokenizer, dtype=dtype, device=device)
    _perturb(bridge.original_model.named_parameters(), torch.Generator().manual_seed(SEED))
    bridge.enable_compatibility_mode(disable_warnings=True, no_processing=not fold)
    return bridge


# --------------------------------------------------------------------- HookedTransformer
def _hooked(
    arch: str, fold: bool, dtype: torch.dtype = torch.float32, tokenizer=None, device: str = "cpu"
):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    base = dict(
        n_layers=2,
        d_model=32,
        n_ctx=N_CTX,
        d_head=8,
        n_heads=4,
        d_mlp=64,
        d_vocab=D_VOCAB,
        seed=SEED,
        dtype=dtype,
        device=device,
    )
    extra = {
        "gpt2": dict(act_fn="gelu_new", normalization_type="LN"),
        "neox": dict(
            act_fn="gelu",
            normalization_type="LN",
            positional_embedding_type="rotary",
            rotary_dim=4,
            parallel_attn_mlp=True,
        ),
        "llama": dict(
            act_fn="silu",
            normalization_type="RMS",
            positional_embedding_type="rotary",
            rotary_dim=8,
            gated_mlp=True,
            n_key_value_heads=2,
            final_rms=True,
        ),
        "gemma": dict(
            act_fn="gelu_pytorch_tanh",
            normalization_type="RMS",
            positional_embedding_type="rotary",
            rotary_dim=8,
            gated_mlp=True,
            n_key_value_heads=1,
            final_rms=True,
        ),
        "gemma2": dict(
            act_fn="gelu_pytorch_tanh",
            normalization_type="RMS",
            positional_embedding_type="rotary",
            rotary_dim=8,
            gated_mlp=True,
            n_key_value_heads=2,
            use_normalization_before_and_after=True,
            output_logits_soft_cap=8.0,
            attn_scores_soft_cap=50.0,
            final_rms=True,
        ),
        "solu": dict(act_fn="solu_ln", normalization_type="LN"),
    }[arch]
    cfg = HookedTransformerConfig(**base, **extra)
    model = HookedTransformer(cfg, tokenizer=tokenizer)
    model.eval()
    _perturb(model.named_parameters(), torch.Generator().manual_seed(SEED))
    if fold:
        ln = extra["normalization_type"] == "LN"
        model.process_weights_(fold_ln=True, center_writing_weights=ln, center_unembed=True)
    return model


def tiny_moe():
    """A one-layer Mixtral bridge (a mixture of experts), for refusal tests."""
    import transformers as tf
    from transformer_lens.model_bridge.sources import build_bridge_from_module

    cfg = tf.MixtralConfig(
        vocab_size=D_VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=N_CTX,
    )
    bridge = build_bridge_from_module(
        tf.MixtralForCausalLM(cfg), "MixtralForCausalLM", hf_config=cfg
    )
    try:
        bridge.enable_compatibility_mode(disable_warnings=True)
    except Exception:  # noqa: BLE001 - some TL versions refuse MoE here already
        bridge.compatibility_mode = True
    return bridge


def builders() -> dict[str, Callable[..., object]]:
    """name -> builder(fold, dtype=..., tokenizer=...) for the installed TransformerLens."""
    out: dict[str, Callable[..., object]] = {}
    for arch in ("gpt2", "neox", "llama", "qwen2", "gemma", "gemma2"):
        out[f"{arch}/bridge"] = (lambda a: lambda fold, **kw: _hf(a, fold, **kw))(arch)
    if HAS_NATIVE:
        out["solu/bridge"] = _native_solu
    if HAS_HOOKED:
        for arch in ("gpt2", "neox", "llama", "gemma", "gemma2", "solu"):
            out[f"{arch}/hooked"] = (lambda a: lambda fold, **kw: _hooked(a, fold, **kw))(arch)
    return out


FAMILIES = builders()
