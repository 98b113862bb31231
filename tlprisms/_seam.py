"""The one module that knows TransformerLens.

Everything tlprisms needs from a model and its ``ActivationCache`` passes through
:class:`ModelView`: the configuration facts, the effective weight and bias of every
normalisation (Gemma's ``1 + w`` convention included), the per-layer weights, the hook
names, and the checks that a cache fits the model. It supports ``HookedTransformer``
(TransformerLens 2.x/3.x) and ``TransformerBridge`` in compatibility mode (3.x/4.x). Weights
are read per layer and cast on demand, so a bf16 gemma-2b never has a float32 copy of all
its MLP weights alive at once.
"""

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from tlprisms._errors import CacheError, UnsupportedModelError

__all__ = ["ModelView", "NormSpec", "needed_hooks"]

_REFUSED_ARCH_WORDS = ("moe", "mixtral", "mamba", "rwkv", "jamba", "t5", "bart", "whisper",
                       "encoder", "recurrent", "falcon_h", "granitemoe", "zamba", "lfm2",
                       "bert")
_SUPPORTED_ACTS = ("gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "relu", "silu",
                   "swish", "solu_ln", "quick_gelu")


@dataclass(frozen=True)
class NormSpec:
    """One normalisation, frozen at its cached scale: ``w * P(x) / s + b``.

    Attributes:
        name: its hook prefix, e.g. ``"blocks.3.ln1"``.
        centred: LayerNorm-type (subtract the mean over ``d_model``) or RMS-type.
        weight: the effective per-dimension weight (``1 + w`` already applied for Gemma), or
            ``None`` when the norm has no weight (folded ``LNPre``/``RMSPre``).
        bias: the bias, or ``None``.
        has_scale: False only for models with no normalisation at all.
    """

    name: str
    centred: bool
    weight: Optional[Tensor]
    bias: Optional[Tensor]
    has_scale: bool = True

    @property
    def scale_hook(self) -> str:
        return f"{self.name}.hook_scale"

    def pull_back(self, u: Tensor) -> Tensor:
        """The readout on the norm's input for a readout ``u`` on its output, times ``s``.

        Returns ``P(w * u)``; divide by the cached scale to finish the pull-back.
        """
        if self.weight is not None:
            u = u * self.weight.to(u.dtype)
        if self.centred:
            u = u - u.mean(-1, keepdim=True)
        return u

    def apply(self, x: Tensor, scale: Optional[Tensor] = None, eps: float = 1e-5,
              bias: bool = True) -> Tensor:
        """The norm itself, ``w * P(x) / s + b``, with ``s`` the given (cached) scale, or
        computed from ``x`` when ``scale`` is None; ``bias=False`` leaves ``b`` out (the
        map of one write through a frozen norm)."""
        if self.centred:
            x = x - x.mean(-1, keepdim=True)
        if self.has_scale:
            s = (x.pow(2).mean(-1, keepdim=True) + eps).sqrt() if scale is None else scale
            x = x / s.to(x.dtype)
        if self.weight is not None:
            x = x * self.weight.to(x.device, x.dtype)
        if bias and self.bias is not None:
            x = x + self.bias.to(x.device, x.dtype)
        return x

    def constant(self, u: Tensor) -> Tensor:
        """``b . u``: what the norm's bias adds to a readout ``u`` on its output."""
        if self.bias is None:
            return torch.zeros(u.shape[:-1], dtype=u.dtype, device=u.device)
        return u @ self.bias.to(u.dtype)


def _class_names(obj: Any) -> list[str]:
    return [c.__name__ for c in type(obj).__mro__]


def _is_bridge(model: Any) -> bool:
    return any(n == "TransformerBridge" for n in _class_names(model))


def _param(module: Any, *names: str) -> Optional[Tensor]:
    for name in names:
        try:
            value = getattr(module, name)
        except AttributeError:
            continue
        if isinstance(value, Tensor):
            return value
    return None


def architecture_name(model: Any) -> str:
    """The HF architecture name (``"Gemma2ForCausalLM"``...), from either TL model class."""
    cfg = model.cfg
    for name in ("original_architecture", "architecture"):
        value = getattr(cfg, name, None)
        if value:
            return str(value)
    original = getattr(model, "original_model", None)
    return type(original).__name__ if original is not None else ""


def _read_norm(module: Any, name: str, cfg: Any) -> NormSpec:
    """The effective affine map of one normalisation module of either TL model class."""
    cls = type(module).__name__
    if module is None or cls == "Identity":
        return NormSpec(name=name, centred=False, weight=None, bias=None, has_scale=False)
    # HookedTransformer (TL <= 3): weights already in "effective" form (Gemma's +1 applied).
    if cls == "LayerNormPre":
        return NormSpec(name=name, centred=True, weight=None, bias=None)
    if cls == "RMSNormPre":
        return NormSpec(name=name, centred=False, weight=None, bias=None)
    if cls == "LayerNorm":
        return NormSpec(name=name, centred=True, weight=module.w.detach(), bias=module.b.detach())
    if cls == "RMSNorm":
        return NormSpec(name=name, centred=False, weight=module.w.detach(), bias=None)
    # TransformerBridge components.
    if cls in ("LayerNormPreBridge",):
        return NormSpec(name=name, centred=True, weight=None, bias=None)
    if cls in ("RMSNormPreBridge",):
        return NormSpec(name=name, centred=False, weight=None, bias=None)
    if "NormalizationBridge" in cls:
        rms = bool(getattr(module, "uses_rms_norm", "RMS" in cls))
        original = getattr(module, "original_component", None)
        weight = _param(original, "weight") if original is not None else None
        if weight is None:
            weight = _param(module, "weight")
        if hasattr(module, "uses_weight_offset"):
            offset = bool(module.uses_weight_offset)
        else:
            offset = rms and bool(getattr(module.config, "rmsnorm_uses_offset", False))
        if weight is not None:
            weight = weight.detach()
            if offset:
                weight = 1.0 + weight.float()
        bias = None
        if not rms and original is not None:
            b = _param(original, "bias")
            bias = None if b is None else b.detach()
        return NormSpec(name=name, centred=not rms, weight=weight, bias=bias)
    raise UnsupportedModelError(
        f"tlprisms cannot freeze the normalisation '{name}' of type {cls}: only LayerNorm, "
        "LayerNormPre, RMSNorm and RMSNormPre (HookedTransformer) and their TransformerBridge "
        "counterparts are supported. Load the model with one of these normalisations."
    )


class ModelView:
    """Read-only facts and weights of a TransformerLens model, for the prisms.

    Args:
        model: a ``HookedTransformer`` or a ``TransformerBridge`` on which
            ``enable_compatibility_mode()`` has been called.

    Raises:
        UnsupportedModelError: the model is of another kind, a bridge not in compatibility
            mode, or an architecture these prisms cannot decompose exactly.
    """

    def __init__(self, model: Any) -> None:
        names = _class_names(model)
        if "HookedTransformer" not in names and "TransformerBridge" not in names:
            raise UnsupportedModelError(
                f"tlprisms needs a TransformerLens model, got {type(model).__name__}. Load it "
                "with transformer_lens (HookedTransformer.from_pretrained, or "
                "TransformerBridge.boot_transformers(...) then enable_compatibility_mode())."
            )
        self.model = model
        self.is_bridge = _is_bridge(model)
        cfg = model.cfg
        self.cfg = cfg
        if self.is_bridge and not getattr(model, "compatibility_mode", False):
            raise UnsupportedModelError(
                "this TransformerBridge is not in compatibility mode, so it has no "
                "HookedTransformer-style hooks (hook_pattern, hook_v, ln_final.hook_scale). "
                "Call model.enable_compatibility_mode() (or enable_compatibility_mode("
                "no_processing=True) to keep the weights unfolded) before run_with_cache."
            )
        self._refuse_unsupported(model, cfg)
        self.n_layers = int(cfg.n_layers)
        self.n_heads = int(cfg.n_heads)
        self.n_kv_heads = int(getattr(cfg, "n_key_value_heads", None) or self.n_heads)
        self.d_model = int(cfg.d_model)
        self.d_head = int(cfg.d_head)
        self.d_vocab = int(cfg.d_vocab_out if getattr(cfg, "d_vocab_out", -1) not in (None, -1)
                           else cfg.d_vocab)
        self.attn_only = bool(getattr(cfg, "attn_only", False))
        self.d_mlp = 0 if self.attn_only else int(cfg.d_mlp)
        if self.n_heads % self.n_kv_heads:
            raise UnsupportedModelError(
                f"n_heads={self.n_heads} is not a multiple of n_key_value_heads="
                f"{self.n_kv_heads}; grouped-query attention needs whole groups."
            )
        cap = getattr(cfg, "output_logits_soft_cap", None)
        self.softcap: Optional[float] = float(cap) if cap is not None and cap > 0 else None
        pos_type = getattr(cfg, "positional_embedding_type", "standard")
        self.pos_embed_in_resid = pos_type == "standard"
        self.act_fn = getattr(cfg, "act_fn", None)
        self.architecture = architecture_name(model)
        self.gated = bool(getattr(cfg, "gated_mlp", False))
        self.parallel = bool(getattr(cfg, "parallel_attn_mlp", False))
        self.solu_ln: list[Optional[NormSpec]] = []
        self.final_norm = _read_norm(getattr(model, "ln_final", None), "ln_final", cfg)
        self.ln1: list[NormSpec] = []
        self.ln2: list[NormSpec] = []
        self.ln1_post: list[Optional[NormSpec]] = []
        self.ln2_post: list[Optional[NormSpec]] = []
        for layer, block in enumerate(model.blocks):
            self.ln1.append(_read_norm(getattr(block, "ln1", None), f"blocks.{layer}.ln1", cfg))
            self.ln2.append(_read_norm(getattr(block, "ln2", None), f"blocks.{layer}.ln2", cfg))
            post1 = getattr(block, "ln1_post", None)
            post2 = getattr(block, "ln2_post", None)
            self.ln1_post.append(None if post1 is None else
                                 _read_norm(post1, f"blocks.{layer}.ln1_post", cfg))
            self.ln2_post.append(None if post2 is None else
                                 _read_norm(post2, f"blocks.{layer}.ln2_post", cfg))
            inner = getattr(getattr(block, "mlp", None), "ln", None)
            self.solu_ln.append(None if self.act_fn != "solu_ln" or inner is None else
                                _read_norm(inner, f"blocks.{layer}.mlp.ln", cfg))

    # ------------------------------------------------------------------ refusals
    @staticmethod
    def _refuse_unsupported(model: Any, cfg: Any) -> None:
        arch = architecture_name(model)
        reasons = []
        if getattr(cfg, "num_experts", None):
            reasons.append(f"a mixture of experts (num_experts={cfg.num_experts})")
        if getattr(cfg, "is_encoder_decoder", False):
            reasons.append("an encoder-decoder model")
        low = arch.lower()
        if any(word in low for word in _REFUSED_ARCH_WORDS):
            reasons.append(f"architecture {arch}")
        blocks = getattr(model, "blocks", None)
        if blocks is None:
            reasons.append("a model without TransformerLens 'blocks'")
        else:
            attn_only = bool(getattr(cfg, "attn_only", False))
            for layer, block in enumerate(blocks):
                if not hasattr(block, "attn"):
                    reasons.append(f"block {layer} without an attention layer (hybrid blocks)")
                    break
                if not attn_only and not hasattr(block, "mlp"):
                    reasons.append(f"block {layer} without an MLP")
                    break
                mlp = getattr(block, "mlp", None)
                if mlp is not None and any("MoE" in n or "Moe" in n for n in _class_names(mlp)):
                    reasons.append(f"block {layer} has a mixture-of-experts MLP")
                    break
        act = getattr(cfg, "act_fn", None)
        if act is not None and act not in _SUPPORTED_ACTS:
            reasons.append(f"activation function {act!r}")
        if reasons:
            raise UnsupportedModelError(
                "tlprisms cannot decompose this model exactly: it is "
                + "; ".join(reasons)
                + ". Supported: decoder-only transformers with attention and dense (optionally "
                "gated) MLP blocks, as listed in the README. Nothing was decomposed."
            )

    # ------------------------------------------------------------------ weights
    def _attn(self, layer: int) -> Any:
        return self.model.blocks[layer].attn

    def _mlp(self, layer: int) -> Any:
        return self.model.blocks[layer].mlp

    def W_O(self, layer: int, dtype: torch.dtype) -> Tensor:
        """``[head, d_head, d_model]``"""
        return self._attn(layer).W_O.detach().to(dtype)

    @staticmethod
    def _bias(module: Any, names: tuple, shape: tuple, dtype: torch.dtype,
              device: torch.device) -> Tensor:
        """The first bias of ``names`` on ``module``, or zeros (bias-free models)."""
        b = _param(module, *names)
        if b is None:
            return torch.zeros(shape, dtype=dtype, device=device)
        return b.detach().to(device=device, dtype=dtype)

    def b_O(self, layer: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        return self._bias(self._attn(layer), ("b_O",), (self.d_model,), dtype, device)

    def W_V(self, layer: int, dtype: torch.dtype) -> Tensor:
        """``[kv_head, d_model, d_head]`` (never expanded to query heads)."""
        attn = self._attn(layer)
        w = _param(attn, "_W_V", "W_V") if not self.is_bridge else attn.W_V
        w = w.detach()
        if w.shape[0] != self.n_kv_heads:  # some loaders expand K/V; undo by taking groups
            w = w[:: self.n_heads // self.n_kv_heads]
        return w.to(dtype)

    def b_V(self, layer: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """``[kv_head, d_head]`` (never expanded to query heads)."""
        b = self._bias(self._attn(layer), ("_b_V", "b_V"), (self.n_kv_heads, self.d_head),
                       dtype, device)
        if b.shape[0] != self.n_kv_heads:
            b = b[:: self.n_heads // self.n_kv_heads]
        return b

    def W_out(self, layer: int, dtype: torch.dtype) -> Tensor:
        """``[d_mlp, d_model]``"""
        return self._mlp(layer).W_out.detach().to(dtype)

    def b_out(self, layer: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        return self._bias(self._mlp(layer), ("b_out",), (self.d_model,), dtype, device)

    def W_in(self, layer: int, dtype: torch.dtype) -> Tensor:
        """``[d_model, d_mlp]`` (the "up" projection of a gated MLP)."""
        return self._mlp(layer).W_in.detach().to(dtype)

    def b_in(self, layer: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        return self._bias(self._mlp(layer), ("b_in",), (self.d_mlp,), dtype, device)

    def unembed_columns(self, ids: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``W_U[:, ids]`` moved to the last axis (``[*ids.shape, d_model]``) and ``b_U[ids]``."""
        W_U = self.model.W_U.detach()
        flat = ids.reshape(-1).to(W_U.device)
        cols = W_U[:, flat].T.to(dtype)
        b = _param(self.model, "b_U")
        bias = (torch.zeros(flat.shape[0], dtype=dtype, device=cols.device) if b is None
                else b.detach()[flat].to(dtype))
        return cols.reshape(*ids.shape, self.d_model), bias.reshape(ids.shape)

    def embed_matrix(self) -> Tensor:
        return self.model.W_E.detach()

    def embedding_scale(self) -> float:
        """The factor ``hook_embed`` applies to ``W_E`` rows (sqrt(d_model) for Gemma)."""
        if not self.is_bridge:
            return 1.0  # HookedTransformer folds Gemma's sqrt(d_model) into W_E at load time
        original = getattr(getattr(self.model, "embed", None), "original_component", None)
        scale = getattr(original, "embed_scale", None)
        if scale is not None:
            return float(scale)
        if "Gemma" in self.architecture:
            return float(self.d_model) ** 0.5
        return 1.0

    def tokenizer(self) -> Any:
        return getattr(self.model, "tokenizer", None)

    # ------------------------------------------------------------------ hooks
    def solu_mid_hook(self, layer: int) -> str:
        """SoLU's ``act(pre)`` before its inner LayerNorm (named differently by the bridge)."""
        if self.is_bridge:
            return f"blocks.{layer}.mlp.ln.hook_in"
        return f"blocks.{layer}.mlp.hook_mid"

    def final_resid_hook(self) -> str:
        return f"blocks.{self.n_layers - 1}.hook_resid_post"

    def hooks_for(self, parts: tuple[str, ...] = ("residual", "heads", "neurons", "chains")) -> list[str]:
        names = ["hook_embed", self.final_resid_hook()]
        if self.pos_embed_in_resid:
            names.append("hook_pos_embed")
        if self.final_norm.has_scale:
            names.append(self.final_norm.scale_hook)
        for layer in range(self.n_layers):
            names.append(f"blocks.{layer}.hook_attn_out")
            if not self.attn_only:
                names.append(f"blocks.{layer}.hook_mlp_out")
            for post in (self.ln1_post[layer], self.ln2_post[layer]):
                if post is not None and post.has_scale:
                    names.append(post.scale_hook)
            if "heads" in parts or "chains" in parts:
                names += [f"blocks.{layer}.attn.hook_pattern", f"blocks.{layer}.attn.hook_v"]
            if ("neurons" in parts or "chains" in parts) and not self.attn_only:
                names.append(f"blocks.{layer}.mlp.hook_post")
            if "chains" in parts:
                names.append(f"blocks.{layer}.hook_resid_pre")
                for norm in (self.ln1[layer], self.ln2[layer]):
                    if norm.has_scale:
                        names.append(norm.scale_hook)
                if not self.attn_only:
                    names.append(f"blocks.{layer}.mlp.hook_pre")
                    if self.gated:
                        names.append(f"blocks.{layer}.mlp.hook_pre_linear")
                    if self.act_fn == "solu_ln":
                        names += [self.solu_mid_hook(layer), f"blocks.{layer}.mlp.ln.hook_scale"]
        return list(dict.fromkeys(names))


def needed_hooks(model: Any, parts: tuple[str, ...] = ("residual", "heads", "neurons", "chains")
                 ) -> Callable[[str], bool]:
    """A ``names_filter`` for ``model.run_with_cache`` that keeps what the prisms need.

    >>> # logits, cache = model.run_with_cache(tokens, names_filter=tlprisms.needed_hooks(model))

    Args:
        model: the TransformerLens model.
        parts: which prisms the cache must serve: any of ``"residual"``, ``"heads"``,
            ``"neurons"``, ``"chains"``.
    """
    names = frozenset(ModelView(model).hooks_for(tuple(parts)))

    def names_filter(name: str) -> bool:
        return name in names

    names_filter.names = sorted(names)  # type: ignore[attr-defined]
    return names_filter


def cache_get(cache: Any, name: str, caller: str) -> Tensor:
    """``cache[name]``, or a CacheError that says how to record the hook."""
    try:
        present = name in cache
    except TypeError:
        present = False
    if not present:
        raise CacheError(
            f"{caller}: the cache has no '{name}'. It was probably recorded with a "
            "names_filter that dropped it; run model.run_with_cache(tokens) without a "
            "names_filter, or with names_filter=tlprisms.needed_hooks(model)."
        )
    return cache[name]
