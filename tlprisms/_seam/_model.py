"""The one module that knows TransformerLens.

Everything tlprisms needs from a model and its ``ActivationCache`` passes through
:class:`ModelView`: the configuration facts, the effective weight and bias of every
normalisation (Gemma's ``1 + w`` convention included), the per-layer weights, the hook
names, and the checks that a cache fits the model. It supports ``HookedTransformer``
(TransformerLens 2.x/3.x) and ``TransformerBridge`` in compatibility mode (3.x/4.x). Weights
are read per layer and cast on demand, so a bf16 gemma-2b never has a float32 copy of all
its MLP weights alive at once.
"""

from typing import Any, Optional

import torch
from torch import Tensor

from tlprisms._core.errors import UnsupportedModelError
from tlprisms._seam._hooks import Site, hook_name
from tlprisms._seam._norms import NormSpec, param, read_norm

__all__ = ["ModelView", "architecture_name"]

#: architectures whose blocks are not attention + dense MLP, by what they are instead
_KNOWN_REFUSALS = {
    "OpenAIGPTLMHeadModel": "post-LN blocks (a LayerNorm after every residual addition rescales "
    "everything written before it, and there is no final norm), so the "
    "writes do not add up to the final residual stream",
    "ModernBertDecoderForCausalLM": "a prediction head (dense + GELU + LayerNorm) between the "
    "final norm and the unembedding, which makes the logit "
    "non-linear in the residual stream",
    "Gemma4ForCausalLM": "per-layer input writes, a per-layer scalar that rescales the whole "
    "residual stream, and normalisations TransformerLens does not bridge",
    "BitNetForCausalLM": "a norm over all heads (attn_sub_norm) between the heads' outputs and "
    "o_proj, so a head's write depends on every other head",
}
#: architectures with a norm between W_E and the residual stream
_EMBEDDING_NORMED = frozenset(
    {"BloomForCausalLM", "NanoChatForCausalLM", "ModernBertDecoderForCausalLM"}
)
#: words in a block's module class names that mark a non-attention token mixer
_MIXER_WORDS = (
    "mamba",
    "ssm",
    "mixer",
    "conv",
    "linearattention",
    "linear_attn",
    "recurrent",
    "rglru",
    "shortconv",
    "deltanet",
)
#: words in an architecture name that mark a model that is not a decoder-only causal LM
_NOT_DECODER_WORDS = ("t5", "bart", "whisper", "encoder", "bert", "roberta", "vision", "clip")


def _transformerlens_major() -> int:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return int(version("transformer-lens").split(".")[0])
    except (PackageNotFoundError, ValueError):
        return 0


def _class_names(obj: Any) -> list[str]:
    return [c.__name__ for c in type(obj).__mro__]


def _is_bridge(model: Any) -> bool:
    return any(n == "TransformerBridge" for n in _class_names(model))


def architecture_name(model: Any) -> str:
    """The HF architecture name (``"Gemma2ForCausalLM"``...), from either TL model class."""
    cfg = model.cfg
    for name in ("original_architecture", "architecture"):
        value = getattr(cfg, name, None)
        if value:
            return str(value)
    original = getattr(model, "original_model", None)
    return type(original).__name__ if original is not None else ""


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
        if (
            self.is_bridge
            and not getattr(model, "compatibility_mode", False)
            and getattr(getattr(model, "adapter", None), "supports_compatibility_mode", True)
            is False
        ):
            raise UnsupportedModelError(
                f"TransformerLens does not support compatibility mode for "
                f"{architecture_name(model)} (its adapter says so), so this bridge has no "
                "HookedTransformer-style hooks and tlprisms cannot read it."
            )
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
        self.d_vocab = int(
            cfg.d_vocab_out if getattr(cfg, "d_vocab_out", -1) not in (None, -1) else cfg.d_vocab
        )
        self.d_vocab_in = int(cfg.d_vocab)
        self.attn_only = bool(getattr(cfg, "attn_only", False))
        self.d_mlp = 0 if self.attn_only else self._d_mlp(model, cfg)
        if self.n_heads % self.n_kv_heads:
            raise UnsupportedModelError(
                f"n_heads={self.n_heads} is not a multiple of n_key_value_heads="
                f"{self.n_kv_heads}; grouped-query attention needs whole groups."
            )
        cap = getattr(cfg, "output_logits_soft_cap", None)
        self.softcap: Optional[float] = float(cap) if cap is not None and cap > 0 else None
        self.logit_scale = self._logit_scale(model)
        pos_type = getattr(cfg, "positional_embedding_type", "standard")
        self._hook_points = frozenset(getattr(model, "hook_dict", None) or ())
        # XGLM adds sinusoidal positions inside Hugging Face's code, with no hook: they are
        # then part of the embedding's write (see CacheView.embed_write)
        self.pos_embed_in_resid = pos_type == "standard" and self.records("hook_pos_embed")
        # shortformer (HookedTransformer): the position embedding is added to the query and
        # key inputs after ln1, never to the residual stream (the QK prism adds its term)
        self.shortformer = pos_type == "shortformer" and self.records("hook_pos_embed")
        self.act_fn = getattr(cfg, "act_fn", None)
        self.architecture = architecture_name(model)
        self.gated = bool(getattr(cfg, "gated_mlp", False))
        self.parallel = bool(getattr(cfg, "parallel_attn_mlp", False))
        self.solu_ln: list[Optional[NormSpec]] = []
        self.final_norm = read_norm(
            getattr(model, "ln_final", None), "ln_final", Site.FINAL_SCALE, None
        )
        self.ln1: list[NormSpec] = []
        self.ln2: list[NormSpec] = []
        self.ln1_post: list[Optional[NormSpec]] = []
        self.ln2_post: list[Optional[NormSpec]] = []
        for layer, block in enumerate(model.blocks):
            if self._post_norms_named_pre(block):
                # TransformerLens 3.x bridges OLMo2/Exaone4's post-norms (the only norms of
                # their blocks) as ln1/ln2; they act after the sublayer, like ln1_post/ln2_post
                none = read_norm(None, "no pre-norm", Site.LN1_SCALE, layer)
                self.ln1.append(none)
                self.ln2.append(none)
                self.ln1_post.append(
                    read_norm(
                        block.ln1, f"post-attention norm of layer {layer}", Site.LN1_SCALE, layer
                    )
                )
                self.ln2_post.append(
                    read_norm(block.ln2, f"post-MLP norm of layer {layer}", Site.LN2_SCALE, layer)
                )
                self.solu_ln.append(None)
                continue
            self.ln1.append(
                read_norm(
                    getattr(block, "ln1", None), f"ln1 of layer {layer}", Site.LN1_SCALE, layer
                )
            )
            if getattr(block, "ln2", None) is None and self.parallel and not self.attn_only:
                # parallel blocks with one shared norm (Falcon, Phi, GPT-J, Cohere): the MLP
                # reads ln1(resid_pre), recorded at ln1's scale
                self.ln2.append(self.ln1[-1])
            else:
                self.ln2.append(
                    read_norm(
                        getattr(block, "ln2", None), f"ln2 of layer {layer}", Site.LN2_SCALE, layer
                    )
                )
            post1 = getattr(block, "ln1_post", None)
            post2 = getattr(block, "ln2_post", None)
            self.ln1_post.append(
                None
                if post1 is None
                else read_norm(post1, f"ln1_post of layer {layer}", Site.LN1_POST_SCALE, layer)
            )
            self.ln2_post.append(
                None
                if post2 is None
                else read_norm(post2, f"ln2_post of layer {layer}", Site.LN2_POST_SCALE, layer)
            )
            inner = getattr(getattr(block, "mlp", None), "ln", None)
            self.solu_ln.append(
                None
                if self.act_fn != "solu_ln" or inner is None
                else read_norm(inner, f"SoLU LayerNorm of layer {layer}", Site.SOLU_SCALE, layer)
            )

    # ------------------------------------------------------------------ refusals
    @staticmethod
    def _refuse_unsupported(model: Any, cfg: Any) -> None:
        """Refuse, with the true reason, what these prisms cannot decompose exactly."""
        arch = architecture_name(model)
        reasons = []
        if arch in _KNOWN_REFUSALS:
            reasons.append(f"{arch} has {_KNOWN_REFUSALS[arch]}")
        if getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", None):
            n = getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", None)
            reasons.append(
                f"it routes tokens to a mixture of experts (num_experts={n}): which "
                "experts write depends on a routing decision the prisms do not freeze"
            )
        for flag, setter in (
            ("use_split_qkv_input", "set_use_split_qkv_input"),
            ("use_attn_in", "set_use_attn_in"),
        ):
            if getattr(cfg, flag, False) is True:
                raise UnsupportedModelError(
                    f"this HookedTransformer has cfg.{flag}=True: each head reads its own "
                    "copy of the attention input (hook_q_input/hook_k_input/hook_v_input or "
                    "hook_attn_in, and ln1's scale per head), a layout tlprisms does not read. "
                    f"Call model.{setter}(False) (it only removes those hooks; the outputs "
                    "do not change) and record the cache again."
                )
        if getattr(cfg, "is_encoder_decoder", False):
            reasons.append("it is an encoder-decoder model")
        elif (
            not reasons
            and any(w in arch.lower() for w in _NOT_DECODER_WORDS)
            and "decoder" not in arch.lower()
            and "causallm" not in arch.lower()
        ):
            reasons.append(f"{arch} is not a decoder-only causal language model")
        hf_cfg = getattr(getattr(model, "original_model", None), "config", None)
        kinds = set(getattr(hf_cfg, "layer_types", None) or ())
        others = sorted(k for k in kinds if isinstance(k, str) and "attention" not in k)
        if others:
            reasons.append(
                f"its layers include {', '.join(others)} layers besides attention (a "
                "hybrid model: their token mixing is not split by these prisms)"
            )
        blocks = getattr(model, "blocks", None)
        if blocks is None:
            reasons.append(
                "it has no TransformerLens 'blocks' (its layers are not a stack of "
                "transformer blocks TransformerLens can hook)"
            )
        else:
            attn_only = bool(getattr(cfg, "attn_only", False))
            for layer, block in enumerate(blocks):
                problem = ModelView._block_problem(block, layer, attn_only, int(cfg.d_head))
                if problem:
                    reasons.append(problem)
                    break
        if reasons:
            raise UnsupportedModelError(
                "tlprisms cannot decompose this model exactly: "
                + "; ".join(reasons)
                + ". Its logits are not a sum of embedding, attention-head and MLP-neuron writes "
                "with only norm scales, patterns and gates frozen, so nothing was decomposed. "
                "docs/architectures.md lists every architecture TransformerLens bridges and "
                "what tlprisms does with it."
            )

    def _logit_scale(self, model: Any) -> Optional[float]:
        """The factor a bridge applies to ``ln_final(x) @ W_U + b_U`` before the soft-cap
        (Cohere's ``logit_scale`` when not folded, Granite's ``1 / logits_scaling``), or None.

        Read from TransformerLens's own ``adapter.apply_output_logits_transform``, which must
        be that scale followed by the soft-cap; any other output transform is refused.
        """
        adapter = getattr(model, "adapter", None)
        transform = getattr(adapter, "apply_output_logits_transform", None)
        if transform is None:
            return None
        hf_cfg = getattr(getattr(model, "original_model", None), "config", None)
        hf_scale = getattr(hf_cfg, "logit_scale", None)
        if (
            getattr(adapter, "_logit_scale_already_folded", False)
            and hf_scale not in (None, 1)
            and _transformerlens_major() < 4
        ):
            raise UnsupportedModelError(
                f"this {architecture_name(model)} bridge reports its logit_scale ({hf_scale}) as "
                "folded into W_U, but TransformerLens 3.x still applies it to the logits after "
                "W_U, so the logits cannot be read from W_U. Load it with "
                "enable_compatibility_mode(no_processing=True), or use TransformerLens 4."
            )
        with torch.no_grad():
            tiny = torch.tensor([1e-4], dtype=torch.float64)
            c = float(transform(tiny)[0]) / 1e-4
            if self.softcap is None:
                c = float(transform(torch.ones(1, dtype=torch.float64))[0])
            z = torch.tensor([-40.0, -3.0, -0.5, 0.7, 5.0, 40.0], dtype=torch.float64)
            want = (
                c * z if self.softcap is None else self.softcap * torch.tanh(c * z / self.softcap)
            )
            if not torch.allclose(transform(z.clone()), want, rtol=1e-7, atol=0.0):
                raise UnsupportedModelError(
                    f"{architecture_name(model)} maps the unembedding's output to its logits with "
                    "a transform that is not a scale followed by a soft-cap, so its logits are "
                    "not linear in the residual stream even with the soft-cap frozen."
                )
        return None if abs(c - 1.0) < 1e-12 else c

    @staticmethod
    def _post_norms_named_pre(block: Any) -> bool:
        """A bridge block whose ln1/ln2 wrap Hugging Face's post-sublayer norms."""
        names = [str(getattr(getattr(block, ln, None), "name", "") or "") for ln in ("ln1", "ln2")]
        return getattr(block, "ln1_post", None) is None and all(
            n.startswith("post_") for n in names
        )

    @staticmethod
    def _d_mlp(model: Any, cfg: Any) -> int:
        """The MLP width from the weights (TransformerLens's cfg.d_mlp is wrong for OPT)."""
        W_out = param(getattr(model.blocks[0], "mlp", None), "W_out")
        return int(W_out.shape[0]) if W_out is not None and W_out.ndim == 2 else int(cfg.d_mlp)

    @staticmethod
    def _block_problem(block: Any, layer: int, attn_only: bool, d_head: int) -> Optional[str]:
        if not hasattr(block, "attn"):
            return (
                f"block {layer} has no attention layer (a recurrent, state-space or "
                "convolution block: a hybrid model)"
            )
        if not attn_only and not hasattr(block, "mlp"):
            return f"block {layer} has no MLP"
        try:
            W_O = block.attn.W_O
        except Exception:  # noqa: BLE001 - a bridge that cannot assemble W_O at all
            W_O = None
        if not isinstance(W_O, Tensor) or W_O.ndim != 3:
            return (
                f"block {layer}'s attention has no per-head output weights W_O [head, "
                "d_head, d_model], so its heads cannot be separated"
            )
        if W_O.shape[1] != d_head:
            return (
                f"block {layer} uses multi-head latent attention (value heads of size "
                f"{W_O.shape[1]}, query/key heads of size {d_head}, values decoded from a "
                "shared normalised latent), which these prisms do not split"
            )
        mlp = getattr(block, "mlp", None)
        if mlp is not None and any("moe" in n.lower() for n in _class_names(mlp)):
            return f"block {layer} has a mixture-of-experts MLP"
        original = getattr(block, "original_component", None)
        if original is not None:
            for name, child in original.named_children():
                cls = type(child).__name__.lower()
                if any(w in cls or w in name.lower() for w in _MIXER_WORDS):
                    return (
                        f"block {layer} runs a {type(child).__name__} ('{name}') beside "
                        "attention: a recurrent/state-space token mixer whose write the "
                        "prisms cannot split (a hybrid model)"
                    )
        return None

    # ------------------------------------------------------------------ weights
    def _attn(self, layer: int) -> Any:
        return self.model.blocks[layer].attn

    def _mlp(self, layer: int) -> Any:
        return self.model.blocks[layer].mlp

    def W_O(self, layer: int, dtype: torch.dtype) -> Tensor:
        """``[head, d_head, d_model]``"""
        return self._attn(layer).W_O.detach().to(dtype)

    @staticmethod
    def _bias(
        module: Any, names: tuple, shape: tuple, dtype: torch.dtype, device: torch.device
    ) -> Tensor:
        """The first bias of ``names`` on ``module``, or zeros (bias-free models)."""
        b = param(module, *names)
        if b is None:
            return torch.zeros(shape, dtype=dtype, device=device)
        return b.detach().to(device=device, dtype=dtype)

    def b_O(self, layer: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        return self._bias(self._attn(layer), ("b_O",), (self.d_model,), dtype, device)

    def W_V(self, layer: int, dtype: torch.dtype) -> Tensor:
        """``[kv_head, d_model, d_head]`` (never expanded to query heads)."""
        attn = self._attn(layer)
        w = attn.W_V if self.is_bridge else param(attn, "_W_V", "W_V")
        if w is None:
            raise UnsupportedModelError(
                f"layer {layer}'s attention has no W_V; tlprisms reads "
                "value weights from W_V (or _W_V under GQA)."
            )
        w = w.detach()
        if w.shape[0] != self.n_kv_heads:  # some loaders expand K/V; undo by taking groups
            w = w[:: self.n_heads // self.n_kv_heads]
        return w.to(dtype)

    def b_V(self, layer: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """``[kv_head, d_head]`` (never expanded to query heads)."""
        b = self._bias(
            self._attn(layer), ("_b_V", "b_V"), (self.n_kv_heads, self.d_head), dtype, device
        )
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
        b = param(self.model, "b_U")
        bias = (
            torch.zeros(flat.shape[0], dtype=dtype, device=cols.device)
            if b is None
            else b.detach()[flat].to(dtype)
        )
        if self.logit_scale is not None:  # logits = c * (norm(x) @ W_U + b_U), then soft-cap
            cols, bias = cols * self.logit_scale, bias * self.logit_scale
        return cols.reshape(*ids.shape, self.d_model), bias.reshape(ids.shape)

    def embed_matrix(self) -> Tensor:
        return self.model.W_E.detach()

    def embed_rows(self, ids: Tensor, dtype: torch.dtype) -> Tensor:
        """The embeddings of ``ids`` as ``hook_embed`` records them: ``[*ids.shape, d_model]``."""
        W_E = self.embed_matrix()
        return W_E[ids.to(W_E.device)].to(dtype) * self.embedding_scale()

    def describe(self) -> str:
        """``"GPT2LMHeadModel, TransformerBridge"``: for messages."""
        kind = "TransformerBridge" if self.is_bridge else type(self.model).__name__
        return f"{self.architecture or 'unknown architecture'}, {kind}"

    def embedding_scale(self) -> float:
        """The factor ``hook_embed`` applies to ``W_E`` rows (sqrt(d_model) for Gemma)."""
        if not self.is_bridge:
            return 1.0  # HookedTransformer folds Gemma's sqrt(d_model) into W_E at load time
        embed = getattr(self.model, "embed", None)
        extra = float(getattr(embed, "_output_contribution_scale", 1.0) or 1.0)  # Granite
        original = getattr(embed, "original_component", None)
        scale = getattr(original, "embed_scale", None)
        if scale is not None:
            return float(scale) * extra
        if "Gemma" in self.architecture:
            return float(self.d_model) ** 0.5 * extra
        return extra

    @property
    def embedding_normalised(self) -> bool:
        """A norm sits between ``W_E`` and the residual stream (Bloom's embedding LayerNorm,
        NanoChat's RMSNorm): weight-space maps from ``W_E`` alone would be wrong."""
        return self.architecture in _EMBEDDING_NORMED

    def tokenizer(self) -> Any:
        return getattr(self.model, "tokenizer", None)

    def residual_scale(self, layer: int) -> Optional[float]:
        """The factor a block applies to its attention and MLP outputs before adding them
        (Granite's ``residual_multiplier``; already inside ``hook_attn_out``/``hook_mlp_out``,
        not inside ``W_O``/``W_out``), or None."""
        r = getattr(self.model.blocks[layer], "residual_contribution_scale", None)
        return None if r is None or float(r) == 1.0 else float(r)

    def kv_group(self, head: int) -> int:
        """The key/value head that query head ``head`` reads (grouped-/multi-query attention)."""
        return head // (self.n_heads // self.n_kv_heads)

    # ------------------------------------------------------------------ QK weights
    def _expand_undone(self, w: Tensor) -> Tensor:
        """K weights of ``n_kv_heads`` heads (some loaders expand them to query heads)."""
        if w.shape[0] != self.n_kv_heads:
            w = w[:: self.n_heads // self.n_kv_heads]
        return w

    def W_Q(self, layer: int, dtype: torch.dtype) -> Tensor:
        """``[head, d_model, d_head]``"""
        return self._attn(layer).W_Q.detach().to(dtype)

    def W_K(self, layer: int, dtype: torch.dtype) -> Tensor:
        """``[kv_head, d_model, d_head]`` (never expanded to query heads)."""
        attn = self._attn(layer)
        w = attn.W_K if self.is_bridge else param(attn, "_W_K", "W_K")
        if w is None:
            raise UnsupportedModelError(f"layer {layer}'s attention has no W_K.")
        return self._expand_undone(w.detach()).to(dtype)

    def b_Q(self, layer: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """``[head, d_head]`` (zeros without a query bias)."""
        return self._bias(self._attn(layer), ("b_Q",), (self.n_heads, self.d_head), dtype, device)

    def b_K(self, layer: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """``[kv_head, d_head]`` (zeros without a key bias; never expanded)."""
        b = self._bias(
            self._attn(layer), ("_b_K", "b_K"), (self.n_kv_heads, self.d_head), dtype, device
        )
        return self._expand_undone(b)

    def _hf_attn(self, layer: int) -> Any:
        return getattr(self._attn(layer), "original_component", None)

    def attn_score_factor(self, layer: int) -> float:
        """The factor ``q . k`` is multiplied by (``1/sqrt(d_head)``, Gemma's
        ``query_pre_attn_scalar**-0.5``, GPT-2's inverse layer index where enabled ...)."""
        if not self.is_bridge:
            return 1.0 / float(self._attn(layer).attn_scale)
        hf = self._hf_attn(layer)
        if type(hf).__name__ == "NativeAttention":  # TransformerLens's own: divides by scale
            return 1.0 / float(hf.scale)
        if type(hf).__name__ == "GPTNeoSelfAttention":  # GPT-Neo does not scale q . k at all
            return 1.0
        scaling = getattr(hf, "scaling", None)
        if scaling is None:  # MPT names it softmax_scale
            scaling = getattr(hf, "softmax_scale", None)
        if scaling is None:
            scaling = float(self.d_head) ** -0.5
        factor = float(scaling)
        if getattr(hf, "scale_attn_by_inverse_layer_idx", False):
            factor /= float(getattr(hf, "layer_idx", layer) + 1)
        return factor

    def attn_softcap(self, layer: int) -> Optional[float]:
        """The attention scores' soft-cap ``c`` (``c * tanh(s / c)``, Gemma 2), or None."""
        cap = getattr(self._hf_attn(layer), "attn_logit_softcapping", None)
        if cap is None:
            cap = getattr(self.cfg, "attn_scores_soft_cap", None)
        return float(cap) if cap is not None and float(cap) > 0 else None

    @property
    def rotary(self) -> bool:
        return getattr(self.cfg, "positional_embedding_type", "standard") == "rotary"

    @property
    def rotary_adjacent_pairs(self) -> bool:
        """GPT-J-style rotary (pairs of adjacent dimensions) rather than halves."""
        return bool(getattr(self.cfg, "rotary_adjacent_pairs", False))

    def rotary_at(self, layer: int) -> bool:
        """Whether ``layer``'s attention rotates its queries and keys: a rotary model's
        layers do, except the global (NoPE) layers of Cohere2 / EXAONE 4 / SmolLM3 hybrids,
        whose bridge drops the rotary tables there (asked of the bridge's own attention)."""
        if not self.rotary:
            return False
        if self.is_bridge:
            nope = getattr(self._attn(layer), "_is_nope_layer", None)
            if callable(nope) and bool(nope()):
                return False
            hf = self._hf_attn(layer)
            if getattr(hf, "use_rope", True) is False:  # SmolLM3's NoPE layers
                return False
        return True

    def rotary_canonical(self, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, bool]:
        """A bridge's recorded rotary tables (``[..., w]``, as its attention received them)
        as the per-coordinate ``(cos, sin)`` over the rotated dimensions and whether they
        rotate adjacent pairs (``True``) or halves, the way the bridge's attention applies
        them: Cohere's tables repeat each frequency (``cfg.rotary_interleaved_cos_sin``,
        adjacent pairs as given), GLM / ERNIE's hold halves and rotate adjacent pairs
        (``cfg.rotary_adjacent_pairs``: the first half, each entry twice), GPT-OSS's cover
        half of ``d_head`` with the full head rotated (the halves repeated), every other's
        rotate halves as given (partial rotary: the first ``w`` dimensions)."""
        cfg, w = self.cfg, cos.shape[-1]
        if getattr(cfg, "rotary_interleaved_cos_sin", False):
            return cos, sin, True
        if getattr(cfg, "rotary_adjacent_pairs", False):
            h = w // 2
            cos, sin = (t[..., :h].repeat_interleave(2, -1) for t in (cos, sin))
            return cos, sin, True
        from transformer_lens.utilities.hf_utils import get_rotary_pct_from_config

        if 2 * w == self.d_head and get_rotary_pct_from_config(cfg) == 1.0:
            return torch.cat([cos, cos], -1), torch.cat([sin, sin], -1), False
        return cos, sin, False

    def rotary_tables(self, layer: int, n: int) -> Optional[tuple[Tensor, Tensor]]:
        """The rotary ``(cos, sin)`` ``[n, rotary_dim]`` per coordinate for positions
        ``0..n-1`` (in the convention of :attr:`rotary_adjacent_pairs`, or adjacent pairs
        for a bridge's GPT-J), read from the model: a HookedTransformer's own buffers; a
        GPT-J bridge's rotary module (its attention records no tables: Hugging Face's
        ``GPTJAttention`` rotates ``rotary_dim`` dimensions, adjacent pairs, with the
        ``(sin, cos)`` its model's ``rotary_emb`` returns). None for other bridges (their
        attention records the tables) or without rotary."""
        if not self.rotary:
            return None
        if not self.is_bridge:
            attn = self._attn(layer)
            return attn.rotary_cos[:n].detach(), attn.rotary_sin[:n].detach()
        return self._gptj_tables(layer, n)

    def rotary_tables_computed(self, layer: int) -> bool:
        """Whether :meth:`rotary_tables` computes this bridge layer's tables (GPT-J) rather
        than the cache recording them; such tables rotate adjacent pairs."""
        return self.is_bridge and self.rotary and self._gptj_rotary(layer) is not None

    def _gptj_rotary(self, layer: int) -> Any:
        """GPT-J's rotary module where ``layer``'s attention is Hugging Face's
        ``GPTJAttention`` (which rotates q and k itself), else None."""
        if type(self._hf_attn(layer)).__name__ != "GPTJAttention":
            return None
        original = getattr(self.model, "original_model", None)
        base = getattr(original, "transformer", None)
        return getattr(base, "rotary_emb", None)

    def _gptj_tables(self, layer: int, n: int) -> Optional[tuple[Tensor, Tensor]]:
        rotary = self._gptj_rotary(layer)
        if rotary is None:
            return None
        hf = self._hf_attn(layer)
        rd = int(getattr(hf, "rotary_dim", None) or self.d_head)
        ref = next(iter(rotary.buffers()), None)
        dev = ref.device if ref is not None else torch.device("cpu")
        dtype = ref.dtype if ref is not None and ref.dtype.is_floating_point else torch.float32
        with torch.no_grad():
            pos = torch.arange(n, device=dev)[None]
            sin, cos = rotary(torch.zeros(1, dtype=dtype, device=dev), position_ids=pos)
        cos, sin = cos[0].repeat_interleave(2, -1), sin[0].repeat_interleave(2, -1)
        if cos.shape[-1] != rd:
            raise UnsupportedModelError(
                f"GPT-J's rotary tables of layer {layer} cover {cos.shape[-1]} dimensions but "
                f"its attention rotates rotary_dim={rd}; tlprisms cannot tell which it uses."
            )
        return cos.detach(), sin.detach()

    def _qk_norm_modules(self, layer: int) -> tuple[Any, Any]:
        """The attention's query and key norm modules (either may be None)."""
        attn, hf = self._attn(layer), self._hf_attn(layer)
        found = []
        for n in ("q_norm", "k_norm"):
            m = getattr(attn, n, None)
            if not isinstance(m, torch.nn.Module):
                m = getattr(hf, n, None)
            found.append(m if isinstance(m, torch.nn.Module) else None)
        return found[0], found[1]

    def qk_norm_frozen(self, layer: int, side: str) -> Optional[NormSpec]:
        """The norm layer ``layer``'s attention applies to its queries (``side="q"``) or
        keys (``"k"``) after the projection, as a :class:`NormSpec` whose scale is recorded
        at ``attn.q_norm.hook_scale`` / ``attn.k_norm.hook_scale`` (effective weight: Gemma's
        ``1 + w`` applied): an RMSNorm per head (Gemma 3, Qwen3; HookedTransformer's
        ``use_qk_norm``) or over all heads at once (OLMo 2), or Cohere's LayerNorm per head
        (centred, one weight row per head). None without one, or for a norm tlprisms does not
        read (then :meth:`qk_problem` says so)."""
        m = self._qk_norm_modules(layer)[0 if side == "q" else 1]
        if m is None:
            return None
        cls = type(m).__name__
        if self.is_bridge and "NormalizationBridge" not in cls:
            return None
        if not self.is_bridge and cls != "RMSNorm":
            return None
        site = Site.Q_NORM_SCALE if side == "q" else Site.K_NORM_SCALE
        name = f"{'query' if side == 'q' else 'key'} norm of layer {layer}"
        spec = read_norm(m, name, site, layer)
        if spec.bias is not None or spec.weight is None or not spec.has_scale:
            return None
        heads = self.n_heads if side == "q" else self.n_kv_heads
        w = spec.weight
        if w.ndim == 2 and tuple(w.shape) != (heads, self.d_head):
            return None
        if w.ndim == 1 and w.numel() not in (self.d_head, heads * self.d_head):
            return None
        return spec

    def qk_norm(self, layer: int, side: str) -> Optional[NormSpec]:
        """:meth:`qk_norm_frozen` where it is an RMSNorm with one weight vector (``d_head``
        shared by every head, or ``heads * d_head`` over all heads): what a weight-space
        view multiplies by; None otherwise."""
        spec = self.qk_norm_frozen(layer, side)
        if spec is None or spec.centred or spec.weight is None or spec.weight.ndim != 1:
            return None
        return spec

    def qk_norm_per_head(self, layer: int, side: str) -> bool:
        """Whether that norm acts on each head's ``d_head`` vector (Gemma 3, Qwen3, Cohere)
        rather than on all heads' queries (keys) at once (OLMo 2)."""
        spec = self.qk_norm_frozen(layer, side)
        if spec is None or spec.weight is None:
            return False
        return spec.weight.ndim == 2 or spec.weight.numel() == self.d_head

    def qk_norm_weight(self, layer: int, side: str, head: int) -> Tensor:
        """The effective weight ``[d_head]`` that query head (key/value head) ``head``'s
        norm multiplies by (its own row, its slice of an all-heads norm, or the shared one)."""
        spec = self.qk_norm_frozen(layer, side)
        assert spec is not None and spec.weight is not None
        w, d = spec.weight, self.d_head
        if w.ndim == 2:
            return w[head]
        return w if w.numel() == d else w[head * d : (head + 1) * d]

    def qk_norm_scales(self, layer: int, side: str, t: Tensor, batch: int, n_ctx: int) -> Tensor:
        """The recorded scale ``t`` of that norm as ``[batch, n_ctx, H]`` (``H`` heads for a
        per-head norm, 1 for one over all heads), whatever layout the model records:
        ``[B, H, n, 1]`` (bridges of Gemma 3 / Qwen3), ``[B, n, H, 1]`` (a bridge's Cohere,
        normed before the heads axis moves), ``[B * n * H, 1]`` (HookedTransformer's
        ``use_qk_norm``), ``[B, n, 1]`` (over all heads)."""
        heads = self.n_heads if side == "q" else self.n_kv_heads
        per_head = self.qk_norm_per_head(layer, side)
        spec = self.qk_norm_frozen(layer, side)
        assert spec is not None and spec.weight is not None
        want = heads if per_head else 1
        out: Optional[Tensor] = None
        if t.ndim == 2 and t.shape[0] == batch * n_ctx * want:
            out = t.reshape(batch, n_ctx, want)
        elif t.ndim == 3 and tuple(t.shape) == (batch, n_ctx, 1) and want == 1:
            out = t
        elif t.ndim == 4 and per_head:
            if spec.weight.ndim == 2 and tuple(t.shape[1:3]) == (n_ctx, heads):
                out = t[..., 0]
            elif spec.weight.ndim == 1 and tuple(t.shape[1:3]) == (heads, n_ctx):
                out = t[..., 0].transpose(1, 2)
        if out is None:
            raise UnsupportedModelError(
                f"the recorded scale of the {spec.name} has shape {tuple(t.shape)}, not one "
                f"of the layouts tlprisms reads for {want} scale(s) per position (batch "
                f"{batch}, {n_ctx} positions); please report the model config."
            )
        return out

    def qk_problem(self, layer: int) -> Optional[str]:
        """Why the QK prism cannot split this layer's scores exactly, or None."""
        hf, cfg = self._hf_attn(layer), self.cfg
        norms = self._qk_norm_modules(layer)
        if any(m is not None for m in norms) or getattr(cfg, "use_qk_norm", False):
            specs = (self.qk_norm_frozen(layer, "q"), self.qk_norm_frozen(layer, "k"))
            for m, spec, side in zip(norms, specs, "qk"):
                if m is not None and spec is None:
                    site = Site.Q_NORM_SCALE if side == "q" else Site.K_NORM_SCALE
                    return (
                        f"its attention normalises {'queries' if side == 'q' else 'keys'} with "
                        f"{type(m).__name__}, which tlprisms freezes only as an RMSNorm or a "
                        "bias-free LayerNorm with a weight, recorded at "
                        f"'{self.hook(site, layer)}'"
                    )
            if getattr(cfg, "qk_norm_after_rope", False):
                return (
                    "its attention normalises queries and keys after rotary (HunYuan), an "
                    "order tlprisms does not split"
                )
            if all(m is None for m in norms):
                return (
                    "its attention normalises queries and keys (use_qk_norm) in a module "
                    "tlprisms does not find (it reads attn.q_norm / attn.k_norm of a "
                    "TransformerBridge)"
                )
        pos_type = getattr(cfg, "positional_embedding_type", "standard")
        alibi = self.alibi_kind
        if alibi is None and pos_type not in ("standard", "rotary", "shortformer"):
            return f"its scores carry a positional bias ('{pos_type}') not split by this prism"
        hf_cfg = getattr(getattr(self.model, "original_model", None), "config", None)
        if alibi is None and (getattr(hf_cfg, "alibi", False) or pos_type == "alibi"):
            return (
                "its scores carry an ALiBi positional bias in a convention this prism does not "
                "know (it knows HookedTransformer's, Bloom's and MPT's)"
            )
        if alibi is not None and self.attn_softcap(layer) is not None:
            return "its scores carry both an ALiBi bias and a soft-cap"
        if getattr(hf, "clip_qkv", None):
            return "its queries and keys are clipped (clip_qkv) before the scores"
        if getattr(cfg, "use_logn_attn", False) or getattr(cfg, "clip_qkv", None):
            return "its queries are rescaled (log-n attention) or clipped before the scores"
        if getattr(cfg, "use_dynamic_ntk_rope", False):
            return "its rotary tables are rescaled per input length (dynamic NTK)"
        return None

    @property
    def alibi_kind(self) -> Optional[str]:
        """How this model adds ALiBi to its attention scores (after the ``q . k`` scale),
        or None: ``"hooked"`` (HookedTransformer: ``slope_h * min(j - i, 0)``, read from its
        attention's ``alibi`` buffer), ``"bloom"`` (Hugging Face Bloom: ``slope_h * j``),
        ``"mpt"`` (Hugging Face MPT: ``slope_h * (j - (n - 1))`` for ``n`` tokens)."""
        if not self.is_bridge:
            pos_type = getattr(self.cfg, "positional_embedding_type", "standard")
            return "hooked" if pos_type == "alibi" else None
        hf = self._alibi_owner()
        if hf is None:
            return None
        return "mpt" if hasattr(hf, "build_mpt_alibi_tensor") else "bloom"

    def _alibi_owner(self) -> Any:
        """The Hugging Face module that builds a bridge's ALiBi tensor (Bloom's or MPT's
        base model), or None."""
        original = getattr(self.model, "original_model", None)
        if original is None:
            return None
        for module in (original, getattr(original, "transformer", None)):
            if module is None:
                continue
            if hasattr(module, "build_mpt_alibi_tensor"):
                attn_cfg = getattr(getattr(module, "config", None), "attn_config", None)
                return module if getattr(attn_cfg, "alibi", True) else None
            if hasattr(module, "build_alibi_tensor") and "Bloom" in type(module).__name__:
                return module
        return None

    def alibi_bias(self, layer: int, head: int, query: int, keys: Tensor, n_ctx: int) -> Tensor:
        """The ALiBi bias ``[K]`` (float32, on ``keys``' device) that head ``head`` of layer
        ``layer`` adds to its score at query position ``query`` for key positions ``keys``,
        in an input of ``n_ctx`` tokens without padding, computed as the model computes it:
        a HookedTransformer's recorded ``alibi`` buffer (rows ``-n_ctx:``, as its forward
        slices it), or Hugging Face's own ``build_alibi_tensor`` (Bloom) /
        ``build_mpt_alibi_tensor`` (MPT)."""
        kind, dev = self.alibi_kind, keys.device
        if kind == "hooked":
            buf = getattr(self._attn(layer), "alibi", None)
            if isinstance(buf, Tensor) and buf.shape[-1] >= n_ctx:
                row = buf.shape[-2] - n_ctx + query
                return buf[head, row].detach().to(dev, torch.float32)[keys]
            attn_cls = type(self._attn(layer))
            mult = attn_cls.create_alibi_multipliers(self.n_heads, dev)[head]
            slope = (keys - query).clamp(max=0).to(torch.float32)
            return mult * slope
        hf = self._alibi_owner()
        if kind == "mpt":
            size = int(hf.config.max_seq_len)
            bias_max = getattr(hf.config.attn_config, "alibi_bias_max", 8)
            table = hf.build_mpt_alibi_tensor(self.n_heads, size, bias_max, device=dev)
            return table[head, 0, size - n_ctx :][keys].to(torch.float32)
        mask = torch.ones(1, n_ctx, dtype=torch.long, device=dev)
        table = hf.build_alibi_tensor(mask, self.n_heads, torch.float32)  # [H, 1, n]
        return table.reshape(self.n_heads, n_ctx)[head][keys]

    @property
    def gated_bias_after_product(self) -> bool:
        """HookedTransformer's GatedMLP adds ``b_in`` after the product:
        ``act(x W_gate) * (x W_in) + b_in``; bridges (and HF) add it inside ``x W_in + b_in``."""
        return self.gated and not self.is_bridge

    @property
    def has_b_U(self) -> bool:
        return param(self.model, "b_U") is not None

    def unembed_matrix(self) -> Tensor:
        """``W_U [d_model, d_vocab]`` (folded with the final norm's weight where TL folds),
        times the bridge's logit scale where it has one."""
        W_U = self.model.W_U.detach()
        return W_U if self.logit_scale is None else W_U * self.logit_scale

    def unembed_bias(self) -> Optional[Tensor]:
        b = param(self.model, "b_U")
        if b is None:
            return None
        return b.detach() if self.logit_scale is None else b.detach() * self.logit_scale

    @property
    def training(self) -> bool:
        return bool(getattr(self.model, "training", False))

    # ------------------------------------------------------------------ tokens
    def token_label(self, tid: int, quote: bool = True) -> str:
        """A readable label of token ``tid``: ``repr`` of its text (quotes show leading
        spaces), its bare text with ``quote=False``, or ``#tid`` without a tokenizer."""
        tok = self.tokenizer()
        if tok is None:
            return f"#{tid}"
        try:
            text = tok.decode([int(tid)])
        except Exception:  # noqa: BLE001 - a label must never fail
            return f"#{tid}"
        return repr(text) if quote else text

    def encode(self, text: str) -> list[int]:
        """The token ids of ``text`` without special tokens (needs a tokenizer)."""
        return list(self.tokenizer().encode(text, add_special_tokens=False))

    def unknown_token_id(self) -> Optional[int]:
        tok = self.tokenizer()
        uid = getattr(tok, "unk_token_id", None)
        return None if uid is None else int(uid)

    # ------------------------------------------------------------------ hooks
    def hook(self, site: Site, layer: Optional[int] = None) -> str:
        """The hook name of ``site`` on this model."""
        return hook_name(site, layer, n_layers=self.n_layers, is_bridge=self.is_bridge)

    def has_site(self, site: Site, layer: Optional[int] = None) -> bool:
        """Whether this model writes ``site`` at all (e.g. no pos_embed with rotary)."""
        if site is Site.POS_EMBED:
            return self.pos_embed_in_resid or self.shortformer
        if site is Site.TOKENS:
            return self.is_bridge and self.records(self.hook(site))
        if site in (Site.Q_NORM_SCALE, Site.K_NORM_SCALE):
            assert layer is not None
            side = "q" if site is Site.Q_NORM_SCALE else "k"
            return self.qk_norm_frozen(layer, side) is not None
        if site.value.endswith("scale"):  # a norm is recorded at its own site (shared, renamed)
            if site is Site.FINAL_SCALE:
                norms: list = [self.final_norm]
            else:
                assert layer is not None
                norms = [
                    self.ln1[layer],
                    self.ln2[layer],
                    self.ln1_post[layer],
                    self.ln2_post[layer],
                    self.solu_ln[layer],
                ]
            return any(n is not None and n.has_scale and n.site is site for n in norms)
        if site in (Site.MLP_OUT, Site.MLP_POST, Site.MLP_PRE):
            return not self.attn_only
        if site is Site.RESID_MID:  # parallel blocks read resid_pre for both halves
            return not self.attn_only and not self.parallel
        if site is Site.MLP_PRE_LINEAR:
            return self.gated and not self.attn_only
        if site is Site.SOLU_MID:
            return self.act_fn == "solu_ln"
        if site is Site.ATTN_SCORES and self.is_bridge and layer is not None:
            # a plain AttentionBridge fires hook_attn_scores with the softmaxed weights its
            # attention function returns, not with the scores
            return type(self._attn(layer)).__name__ != "AttentionBridge"
        if site in (Site.ROT_COS, Site.ROT_SIN):  # a bridge's rotary tables
            return self.is_bridge and self.rotary and self.records(self.hook(site, layer))
        return True

    def missing_reason(self, site: Site, layer: Optional[int]) -> Optional[str]:
        """Why a cache of this model lacks ``site`` although nothing filtered it, or None.

        A bridge whose attention is TransformerLens's plain ``AttentionBridge`` calls Hugging
        Face's attention function, which under sdpa/flash returns no weights.
        """
        name = self.hook(site, layer)
        if (
            site is Site.PATTERN
            and self.is_bridge
            and layer is not None
            and type(self.model.blocks[layer].attn).__name__ == "AttentionBridge"
        ):
            hf_cfg = getattr(getattr(self.model, "original_model", None), "config", None)
            impl = getattr(hf_cfg, "_attn_implementation", None)
            if impl not in (None, "eager"):
                return (
                    f"this bridge runs Hugging Face attention with '{impl}', which returns no "
                    f"attention weights, so '{name}' never fires. Call transformer_lens."
                    "utilities.attn_implementation.force_eager_attention(model.original_model)"
                    " (TransformerBridge.boot_transformers does this) and re-run "
                    "run_with_cache"
                )
        return None

    def records(self, name: str) -> bool:
        """Whether the model has a hook point called ``name`` (so a cache can record it)."""
        return not self._hook_points or name in self._hook_points

    # ------------------------------------------------------------------ recording
    def tokenize(self, text: Any, **kw: Any) -> Tensor:
        """``model.to_tokens(text, **kw)``: the model's own tokenisation (its BOS and
        padding rules), the one place tlprisms tokenises text."""
        return self.model.to_tokens(text, **kw)

    def record_cache(self, tokens: Tensor, names_filter: Any) -> tuple[Tensor, Any]:
        """``model.run_with_cache(tokens, names_filter=...)`` without gradients: the logits
        and the cache of one forward pass, the one place tlprisms records one."""
        with torch.no_grad():
            return self.model.run_with_cache(tokens, names_filter=names_filter)

    @property
    def norm_eps(self) -> float:
        """The normalisation epsilon of the configuration (1e-5 where it names none)."""
        return float(getattr(self.cfg, "eps", 1e-5) or 1e-5)
