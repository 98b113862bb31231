"""Sparse dictionaries (SAEs, transcoders) as the prisms read them.

A :class:`Dictionary` encodes what a model recorded at one hook into feature activations and
decodes them into the value recorded at its output hook:

    pre = (x_in * input_scale - [b_dec]) @ W_enc + b_enc      (``b_dec`` only when
                                                               ``subtract_b_dec``)
    a   = act(pre)                                           (ReLU, JumpReLU, TopK, BatchTopK)
    x_hat = (a @ W_dec + b_dec) / input_scale  +  x_in @ W_skip    (skip: transcoders only)

An SAE reads and writes the same hook; a transcoder reads the MLP's input and writes
``hook_mlp_out`` (recorded after a post-MLP norm where the model has one: what the stream
receives). Its input ``blocks.L.mlp.hook_in`` (or, the same site, ``ln2.hook_normalized``) is
ln2 applied in full (weight and bias) to the recorded ``hook_resid_mid``: what the MLP reads,
not the value TransformerLens records under ``ln2.hook_normalized`` (before the weight and
bias); ``hook_resid_mid`` reads the raw stream. Weights are kept as given (``W_enc
[d_in, d_sae]``, ``W_dec [d_sae, d_out]``); the prisms compute in the cache's dtype.

A per-head attention SAE at ``blocks.L.attn.hook_z`` reads and writes ``z`` flattened over
heads (``[..., n_heads * d_head]``, head-major: SAELens's ``hook_z`` reshaping, the input of
Hugging Face's ``o_proj``); its site is no residual stream or layer output (``site`` and
``input_site`` are None, ``per_head`` is True) and its features write through ``W_O`` of
the heads they decode to, replacing layer ``L``'s attention write except ``b_O``.

Conventions (stated, configurable):

* ``subtract_b_dec``: SAELens's ``apply_b_dec_to_input`` (subtract ``b_dec`` before
  encoding; SAEs only).
* ``input_scale``: a constant the input is multiplied by before encoding, the reconstruction
  divided by after decoding (SAELens's activation-norm scaling factor when it is not folded).
* JumpReLU: ``a = pre * (pre > threshold)``; TopK: the ``k`` largest ``pre`` per position,
  ReLU-ed; BatchTopK: with ``threshold`` given (inference), like JumpReLU with that threshold,
  else the ``k * rows`` largest over the rows encoded together.

>>> import torch, tlprisms as tp
>>> d = tp.Dictionary(W_enc=torch.eye(4), b_enc=torch.zeros(4), W_dec=torch.eye(4),
...                   b_dec=torch.zeros(4), hook="blocks.0.hook_resid_post")
>>> d
Dictionary(4 features, relu, blocks.0.hook_resid_post)
>>> d.encode(torch.tensor([1.0, -2.0, 3.0, 0.5]))
tensor([1.0000, 0.0000, 3.0000, 0.5000])
"""

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor

from tlprisms._core import arguments as check
from tlprisms._core.errors import ArgumentError
from tlprisms._seam import (
    DICTIONARY_HOOKS,
    HOOK_NAME_KEY,
    Site,
    block_hook_name,
    parse_block_hook,
    transcoder_hooks,
)
from tlprisms._seam import dictionary_names as N

__all__ = ["Dictionary", "CrossLayerTranscoder", "ACTIVATIONS"]

#: the activation functions a dictionary may use
ACTIVATIONS = ("relu", "jumprelu", "topk", "batchtopk")
#: the sites a dictionary's output may sit at, and which write of the stream it rewrites
_OUTPUT_SITES = (Site.RESID_PRE, Site.RESID_MID, Site.RESID_POST, Site.ATTN_OUT, Site.MLP_OUT)
_PathLike = Union[str, Path]


def _tensor(value: Any, what: str, caller: str, ndim: int) -> Tensor:
    if isinstance(value, Tensor):
        t = value.detach()
    else:
        try:  # numpy arrays and the like
            t = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError):
            raise ArgumentError(
                f"{caller}: {what} must be a float tensor with {ndim} dimension(s); got "
                f"{type(value).__name__}."
            ) from None
    if not t.dtype.is_floating_point or t.ndim != ndim:
        raise ArgumentError(
            f"{caller}: {what} must be a float tensor with {ndim} dimension(s); got shape "
            f"{tuple(t.shape)}, dtype {t.dtype}."
        )
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    return check.finite(t, what, caller)


class Dictionary:
    """A sparse dictionary at one site of a TransformerLens model.

    Args:
        W_enc: ``[d_in, d_sae]``.
        b_enc: ``[d_sae]``.
        W_dec: ``[d_sae, d_out]``.
        b_dec: ``[d_out]``.
        hook: the hook whose recorded value the dictionary reconstructs, e.g.
            ``"blocks.6.hook_resid_pre"``, ``"blocks.6.hook_attn_out"``,
            ``"blocks.6.hook_mlp_out"``, or per-head ``"blocks.6.attn.hook_z"`` (``d_in =
            d_out = n_heads * d_head``, ``z`` flattened head-major).
        input_hook: where it reads (transcoders), e.g. ``"blocks.6.ln2.hook_normalized"``;
            default ``hook``.
        activation: ``"relu"``, ``"jumprelu"``, ``"topk"`` or ``"batchtopk"``.
        threshold: JumpReLU's threshold (a number or ``[d_sae]``); BatchTopK's inference
            threshold.
        k: TopK/BatchTopK's ``k``.
        topk_relu: TopK/BatchTopK keep the ``k`` largest pre-activations ReLU-ed (True,
            SAELens) or as they are, negative ones included (False, circuit-tracer's TopK).
        subtract_b_dec: subtract ``b_dec`` from the input before encoding.
        input_scale: multiply the input by this before encoding; the reconstruction is
            divided by it.
        W_skip: a transcoder's skip connection ``[d_in, d_out]`` (``x_in @ W_skip``).
        name: a label for messages and renderings.
    """

    @check.entry
    def __init__(
        self,
        W_enc: Any,
        b_enc: Any,
        W_dec: Any,
        b_dec: Any,
        hook: str,
        *,
        input_hook: Optional[str] = None,
        activation: str = "relu",
        threshold: Any = None,
        k: Optional[int] = None,
        topk_relu: bool = True,
        subtract_b_dec: bool = False,
        input_scale: Any = 1.0,
        W_skip: Any = None,
        name: Optional[str] = None,
    ) -> None:
        caller = "Dictionary"
        self.W_enc = _tensor(W_enc, "W_enc", caller, 2)
        d_in, d_sae = self.W_enc.shape
        self.b_enc = _tensor(b_enc, "b_enc", caller, 1)
        self.W_dec = _tensor(W_dec, "W_dec", caller, 2)
        self.b_dec = _tensor(b_dec, "b_dec", caller, 1)
        d_out = self.W_dec.shape[1]
        if self.b_enc.shape[0] != d_sae or self.W_dec.shape[0] != d_sae:
            raise ArgumentError(
                f"{caller}: the shapes do not agree: W_enc {tuple(self.W_enc.shape)} is "
                f"[d_in, d_sae], so b_enc must be [{d_sae}] (got {tuple(self.b_enc.shape)}) and "
                f"W_dec [{d_sae}, d_out] (got {tuple(self.W_dec.shape)}). A W_enc stored as "
                "[d_sae, d_in] needs .T."
            )
        if self.b_dec.shape[0] != d_out:
            raise ArgumentError(
                f"{caller}: b_dec has shape {tuple(self.b_dec.shape)} but W_dec writes "
                f"d_out={d_out}; pass b_dec of shape [{d_out}]."
            )
        self.hook, site, self.layer = _site_or_z(hook, "hook", caller)
        #: a per-head attention dictionary at ``attn.hook_z``: it reads and writes ``z``
        #: flattened over heads; ``site``/``input_site`` are None (no residual site)
        self.per_head = site is None
        self.site: Optional[Site] = site
        self.input_hook, self.input_site = self.hook, site
        input_layer = self.layer
        if self.per_head:
            if input_hook is not None and _site_or_z(input_hook, "input_hook", caller)[1:] != (
                None,
                self.layer,
            ):
                raise ArgumentError(
                    f"{caller}: a dictionary at {self.hook!r} (per-head z) reads the same z; "
                    f"input_hook={input_hook!r} is another site. Leave input_hook out."
                )
            if d_in != d_out:
                raise ArgumentError(
                    f"{caller}: a dictionary at {self.hook!r} (per-head z) reads and writes z "
                    f"flattened over heads, so d_in == d_out == n_heads * d_head; got W_enc "
                    f"d_in={d_in} and W_dec d_out={d_out}."
                )
        elif site not in _OUTPUT_SITES:
            raise ArgumentError(
                f"{caller}: hook={hook!r} is a place to read, not a write to reconstruct; "
                "a dictionary reconstructs a residual stream, an attention output or an MLP "
                "output (pass the place it reads as input_hook)."
            )
        elif input_hook is not None:
            self.input_hook, self.input_site, input_layer = _site_or_z(
                input_hook, "input_hook", caller
            )
            if self.input_site is None:
                raise ArgumentError(
                    f"{caller}: input_hook={input_hook!r} is per-head z, which only a "
                    f"dictionary at that same hook reads (hook='blocks.L.{N.ATTN_Z}', no "
                    "input_hook); a transcoder reads the MLP's input."
                )
        self.transcoder = self.input_hook != self.hook
        out, normed, raw = transcoder_hooks(input_layer)
        if self.transcoder and (self.site is not Site.MLP_OUT or input_layer != self.layer):
            raise ArgumentError(
                f"{caller}: a transcoder (input_hook={self.input_hook!r} differs from "
                f"hook={self.hook!r}) must reconstruct its own layer's MLP output, replacing "
                f"that MLP; pass hook={out!r} and an input hook of layer {input_layer}."
            )
        if self.transcoder and self.input_site not in (Site.LN2_NORMALIZED, Site.RESID_MID):
            raise ArgumentError(
                f"{caller}: a transcoder reads the MLP's input: input_hook must be "
                f"{normed!r} or {raw!r}; got {self.input_hook!r}."
            )
        check.choice(activation, "activation", ACTIVATIONS, caller)
        self.activation = activation
        self.threshold: Optional[Tensor] = None
        if threshold is not None:
            if check.is_real(threshold) and not isinstance(threshold, Tensor):  # numpy too
                threshold = torch.full((d_sae,), float(threshold))
            self.threshold = _tensor(threshold, "threshold", caller, 1)
            if self.threshold.shape[0] != d_sae:
                raise ArgumentError(
                    f"{caller}: threshold has shape {tuple(self.threshold.shape)}; pass a "
                    f"number or one threshold per feature [{d_sae}]."
                )
        if activation == "jumprelu" and self.threshold is None:
            raise ArgumentError(f"{caller}: activation='jumprelu' needs threshold=.")
        if activation in ("relu", "topk") and self.threshold is not None:
            raise ArgumentError(
                f"{caller}: threshold= is for 'jumprelu' and 'batchtopk'; activation is "
                f"{activation!r}."
            )
        self.k: Optional[int] = None
        if activation in ("topk", "batchtopk"):
            if k is None and not (activation == "batchtopk" and self.threshold is not None):
                raise ArgumentError(f"{caller}: activation={activation!r} needs k=.")
            if k is not None:
                self.k = check.count(k, "k", caller)
        elif k is not None:
            raise ArgumentError(f"{caller}: k= is for 'topk' and 'batchtopk' dictionaries.")
        if not isinstance(topk_relu, bool):
            raise ArgumentError(f"{caller}: topk_relu={topk_relu!r}; pass True/False.")
        if not topk_relu and activation not in ("topk", "batchtopk"):
            raise ArgumentError(
                f"{caller}: topk_relu=False is for 'topk' and 'batchtopk'; activation is "
                f"{activation!r}."
            )
        self.topk_relu = topk_relu
        if not isinstance(subtract_b_dec, bool):
            raise ArgumentError(f"{caller}: subtract_b_dec={subtract_b_dec!r}; pass True/False.")
        if subtract_b_dec and d_in != d_out:
            raise ArgumentError(
                f"{caller}: subtract_b_dec=True needs d_in == d_out (an SAE); got {d_in} "
                f"and {d_out}."
            )
        self.subtract_b_dec = subtract_b_dec
        if (
            not check.is_real(input_scale)
            or not float(input_scale) > 0
            or float(input_scale) == float("inf")
        ):
            raise ArgumentError(f"{caller}: input_scale={input_scale!r}; pass a number > 0.")
        self.input_scale = float(input_scale)
        self.W_skip: Optional[Tensor] = None
        if W_skip is not None and self.per_head:
            raise ArgumentError(
                f"{caller}: W_skip is a transcoder's skip connection; a per-head z dictionary "
                f"({self.hook!r}) has none."
            )
        if W_skip is not None:
            self.W_skip = _tensor(W_skip, "W_skip", caller, 2)
            if tuple(self.W_skip.shape) != (d_in, d_out):
                raise ArgumentError(
                    f"{caller}: W_skip has shape {tuple(self.W_skip.shape)}; it maps the "
                    f"input to the output: [{d_in}, {d_out}] (x_in @ W_skip)."
                )
        self.name = name if isinstance(name, str) else f"L{self.layer}"
        #: the output is an MLP module's output before any post-MLP norm (sparsify's
        #: ``layers.L.mlp``): refused on a model with one (TransformerLens records
        #: ``hook_mlp_out`` after it)
        self._before_post_norm = self.hook.endswith(N.MLP_OUT_BEFORE_NORM)
        #: the file or folder a loader read it from (named in refusals), else None
        self.source: Optional[str] = None
        self.d_in, self.d_sae, self.d_out = int(d_in), int(d_sae), int(d_out)

    # ------------------------------------------------------------------ maths
    def pre_activations(self, x: Tensor) -> Tensor:
        """``[..., d_sae]``: the encoder's linear read of ``x [..., d_in]``."""
        W = self.W_enc.to(x.device, x.dtype)
        if self.input_scale != 1.0:
            x = x * self.input_scale
        if self.subtract_b_dec:
            x = x - self.b_dec.to(x.device, x.dtype)
        return x @ W + self.b_enc.to(x.device, x.dtype)

    def activate(self, pre: Tensor) -> Tensor:
        """The activation function applied to pre-activations ``[..., d_sae]``."""
        if self.activation == "relu":
            return torch.relu(pre)
        if self.threshold is not None:  # jumprelu, and batchtopk at inference
            th = self.threshold.to(pre.device, pre.dtype)
            return torch.where(pre > th, pre, torch.zeros_like(pre))
        assert self.k is not None
        if self.activation == "topk":
            k = min(self.k, pre.shape[-1])
            top = pre.topk(k, dim=-1)
            out = torch.zeros_like(pre)
            values = torch.relu(top.values) if self.topk_relu else top.values
            return out.scatter_(-1, top.indices, values)
        flat = pre.reshape(-1)  # batchtopk: the k * rows largest over all rows
        rows = max(1, flat.numel() // pre.shape[-1])
        k = min(self.k * rows, flat.numel())
        top = flat.topk(k)
        values = torch.relu(top.values) if self.topk_relu else top.values
        out = torch.zeros_like(flat).scatter_(0, top.indices, values)
        return out.reshape(pre.shape)

    def encode(self, x: Tensor) -> Tensor:
        """Feature activations ``[..., d_sae]`` of inputs ``x [..., d_in]``."""
        return self.activate(self.pre_activations(x))

    def decode(self, acts: Tensor, x_in: Optional[Tensor] = None) -> Tensor:
        """The reconstruction ``[..., d_out]`` (a transcoder's skip term needs ``x_in``)."""
        W = self.W_dec.to(acts.device, acts.dtype)
        out = (acts @ W + self.b_dec.to(acts.device, acts.dtype)) / self.input_scale
        if self.W_skip is not None:
            if x_in is None:
                raise ArgumentError("Dictionary.decode: this transcoder's skip term needs x_in.")
            out = out + x_in @ self.W_skip.to(acts.device, acts.dtype)
        return out

    def check_model(self, view: Any, caller: str, *, per_head_ok: bool = False) -> None:
        """Refuse a dictionary that does not fit this model (sizes, layer, site).
        ``per_head_ok``: the caller reads per-head z dictionaries (the feature prism and
        its hops); every other caller refuses them."""
        label = self.name if self.source is None else f"{self.name} (from {self.source})"
        if self.layer >= view.n_layers:
            raise ArgumentError(
                f"{caller}: dictionary {label} sits at {self.hook!r}, but the model has "
                f"{view.n_layers} layers; it was made for another model."
            )
        if self.per_head:
            if not per_head_ok:
                raise ArgumentError(
                    f"{caller}: dictionary {label} sits at {self.hook!r} (per-head z): its "
                    "features write through W_O of the heads they decode to, which only "
                    "prism.features and feature hops (prism.chain, path=) read; "
                    f"{caller} does not read per-head dictionaries yet."
                )
            width = view.n_heads * view.d_head
            if self.d_in != width:
                raise ArgumentError(
                    f"{caller}: dictionary {label} sits at {self.hook!r} with d_in=d_out="
                    f"{self.d_in}, but layer {self.layer}'s z flattened over heads has "
                    f"n_heads * d_head = {view.n_heads} * {view.d_head} = {width} (query "
                    "heads, also with grouped key/values); it was made for another model, "
                    "or for one head (build it on the flattened z of every head)."
                )
            return
        if self._before_post_norm and view.ln2_post[self.layer] is not None:
            raise ArgumentError(
                f"{caller}: dictionary {label} writes layer {self.layer}'s MLP output before "
                f"its post-MLP norm, but TransformerLens records blocks.L.{N.MLP_OUT} after "
                "that norm (what the stream receives), and tlprisms reads no site before it. "
                "Use a dictionary trained on the output after the norm (Gemma Scope 2's "
                "post_feedforward_layernorm.output)."
            )
        for what, d in (("input", self.d_in), ("output", self.d_out)):
            if d != view.d_model:
                raise ArgumentError(
                    f"{caller}: dictionary {label} has d_{'in' if what == 'input' else 'out'}"
                    f"={d} ({what} size) but the model has d_model={view.d_model}; it was "
                    f"made for another model (or for per-head z: name hook blocks.L.{N.ATTN_Z})."
                )
        for site in {self.site, self.input_site}:
            has = (
                view.has_site(Site.MLP_OUT, self.layer)
                if site is Site.LN2_NORMALIZED
                else view.has_site(site, self.layer)
            )
            if not has:
                raise ArgumentError(
                    f"{caller}: dictionary {label} sits at "
                    f"{self.input_hook if site is self.input_site else self.hook!r}, which "
                    f"this model does not have ({view.describe()}: attention-only or parallel "
                    "blocks have no MLP input stream)."
                )

    def __repr__(self) -> str:
        kind = "transcoder" if self.transcoder else "features"
        where = self.hook if not self.transcoder else f"{self.input_hook} -> {self.hook}"
        act = self.activation if self.topk_relu else f"{self.activation} (not ReLU-ed)"
        return f"Dictionary({self.d_sae} {kind}, {act}, {where})"

    # ------------------------------------------------------------------ loaders
    @classmethod
    @check.entry
    def from_saelens(cls, sae: Any, *, hook: Optional[str] = None) -> "Dictionary":
        """From a SAELens ``SAE`` object (duck-typed: ``W_enc``, ``b_enc``, ``W_dec``,
        ``b_dec``, ``cfg``; SAELens is not imported). Gated SAEs and transcoders are refused."""
        caller = "Dictionary.from_saelens"
        for attr in ("W_enc", "b_enc", "W_dec", "b_dec", "cfg"):
            if not hasattr(sae, attr):
                raise ArgumentError(
                    f"{caller}: {type(sae).__name__} has no {attr}; pass a SAELens SAE (or use "
                    "Dictionary(...) with the weights)."
                )
        cfg = sae.cfg
        cfg_dict = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(vars(cfg))
        arch = getattr(cfg, "architecture", None)
        if callable(arch):
            arch = arch()
        cfg_dict.setdefault("architecture", arch or "standard")
        tensors = {}
        for key in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold", "log_threshold", "W_skip"):
            value = getattr(sae, key, None)
            if value is not None:
                tensors[key] = _tensor(value, key, caller, 2 if key.startswith("W_") else 1)
        return _from_saelens_parts(
            cfg_dict, tensors, hook, "the SAE's cfg", "the SAE's weights", caller
        )

    @classmethod
    @check.entry
    def from_saelens_folder(cls, path: _PathLike, *, hook: Optional[str] = None) -> "Dictionary":
        """From a SAELens-format folder: ``cfg.json`` + ``sae_weights.safetensors``
        (``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``, ``b_enc [d_sae]``, ``b_dec
        [d_in]``, ``threshold`` or ``log_threshold [d_sae]`` for JumpReLU). Config values are
        checked, not coerced (``apply_b_dec_to_input`` a JSON bool, ``k`` a JSON integer)."""
        caller = "Dictionary.from_saelens_folder"
        folder = _folder(path, ("cfg.json", "sae_weights.safetensors"), caller)
        cfg = _read_json(folder / "cfg.json", caller)
        weights = _load_safetensors(folder / "sae_weights.safetensors", caller)
        d = _from_saelens_parts(
            cfg,
            weights,
            hook,
            str(folder / "cfg.json"),
            str(folder / "sae_weights.safetensors"),
            caller,
        )
        d.source = str(folder)
        return d

    @classmethod
    @check.entry
    def from_gemma_scope(
        cls, path: _PathLike, hook: Optional[str] = None, *, input_hook: Optional[str] = None
    ) -> "Dictionary":
        """From Gemma Scope (Gemma 2) or Gemma Scope 2 (Gemma 3), told apart by the files.

        * Gemma Scope: a ``params.npz`` (JumpReLU: ``W_enc [d_model, d_sae]``, ``W_dec
          [d_sae, d_model]``, ``b_enc [d_sae]``, ``b_dec [d_model]``, ``threshold [d_sae]``;
          an optional ``W_skip [d_model, d_model]`` is read as ``x @ W_skip``). The file does
          not say where it sits: pass ``hook`` (and ``input_hook`` for a transcoder). The
          archive is read with ``allow_pickle=False``: it must hold plain float arrays.
        * Gemma Scope 2: a folder with ``config.json`` and ``params.safetensors`` (or the
          ``params.safetensors`` file in it): ``w_enc [d_model, d_sae]``, ``w_dec [d_sae,
          d_model]``, ``b_enc [d_sae]``, ``b_dec [d_model]``, ``threshold [d_sae]``, and with
          ``"affine_connection": true`` an ``affine_skip_connection [d_model, d_model]`` read
          as ``x @ affine_skip_connection``. ``a = relu(pre) * (pre > threshold)``: a negative
          threshold is refused (there JumpReLU and that differ). Where it sits is read from
          the config's ``hf_hook_point_in``/``hf_hook_point_out`` (``hook``/``input_hook``,
          when given, must agree): ``model.layers.L.output`` is ``blocks.L.hook_resid_post``;
          a transcoder reads ``pre_feedforward_layernorm.output`` (``blocks.L.mlp.hook_in``,
          the MLP's input after the norm's weight) and writes
          ``post_feedforward_layernorm.output`` (``blocks.L.hook_mlp_out``, which
          TransformerLens records after the post-MLP norm: what the stream receives);
          ``post_attention_layernorm.output`` is ``blocks.L.hook_attn_out``;
          ``self_attn.o_proj.input`` (z flattened over heads) is ``blocks.L.attn.hook_z``.
        """
        caller = "Dictionary.from_gemma_scope"
        if not isinstance(path, (str, Path)):
            raise ArgumentError(
                f"{caller}: path={path!r}; pass the path of a params.npz file (Gemma Scope) or "
                "of a Gemma Scope 2 folder (config.json + params.safetensors)."
            )
        file = Path(path)
        if file.is_dir() or file.suffix == ".safetensors":
            return _from_gemma_scope_2(file, hook, input_hook, caller)
        if not file.is_file():
            raise ArgumentError(
                f"{caller}: no file at {str(path)!r}; pass a params.npz path or a Gemma Scope 2 "
                "folder."
            )
        if hook is None:
            raise ArgumentError(
                f"{caller}: {str(file)!r} is a Gemma Scope params.npz, which does not say where "
                "it sits; pass hook= (and input_hook= for a transcoder)."
            )
        p = _read_npz(file, caller)
        where = str(file)
        _check_keys(p, _GEMMA_SCOPE, where, "a Gemma Scope params.npz", caller)
        dims = _dims(p, where, caller)
        _check_layout(p, _GEMMA_SCOPE, dims, where, "Gemma Scope's params.npz", caller)
        d = _build(
            where,
            caller,
            W_enc=p["W_enc"],
            b_enc=p["b_enc"],
            W_dec=p["W_dec"],
            b_dec=p["b_dec"],
            hook=hook,
            input_hook=input_hook,
            activation="jumprelu" if "threshold" in p else "relu",
            threshold=p.get("threshold"),
            W_skip=p.get("W_skip"),
            name=f"GemmaScope {file.parent.name}",
        )
        d.source = where
        return d

    @classmethod
    @check.entry
    def from_sparsify(
        cls, path: _PathLike, *, hook: Optional[str] = None, input_hook: Optional[str] = None
    ) -> "Dictionary":
        """From an EleutherAI sparsify folder (one per hookpoint): ``cfg.json`` (``d_in``,
        ``k``, ``num_latents`` or ``expansion_factor``, ``activation`` ``"topk"``,
        ``transcode``, ``skip_connection``) and ``sae.safetensors`` as sparsify saves it:
        ``encoder.weight [d_sae, d_in]`` (read as ``x @ encoder.weight.T``), ``encoder.bias
        [d_sae]``, ``W_dec [d_sae, d_in]``, ``b_dec [d_in]``, optional ``W_skip [d_in, d_in]``
        (read as ``x @ W_skip.T``). An SAE subtracts ``b_dec`` before encoding, a transcoder
        does not; the ``k`` largest of ``relu(pre)`` are kept. Where it sits is read from the
        folder's name, the module sparsify hooked (``hook``/``input_hook``, when given, must
        agree): ``layers.L`` (a layer's output) is ``blocks.L.hook_resid_post``; a
        transcoder on ``layers.L.mlp`` reads the MLP's input (``blocks.L.mlp.hook_in``, after
        the norm's weight and bias) and writes the MLP module's output
        (``blocks.L.hook_mlp_out``); an SAE on ``layers.L.mlp`` reads that output. The MLP
        module's output is before a post-MLP norm, which TransformerLens's
        ``hook_mlp_out`` is after: on a model with one (Gemma 2/3, OLMo 2) such a
        dictionary is refused. Other folder names need ``hook=``."""
        caller = "Dictionary.from_sparsify"
        folder = _folder(path, ("cfg.json", "sae.safetensors"), caller)
        cfg_file = str(folder / "cfg.json")
        cfg = _read_json(folder / "cfg.json", caller)
        weights = str(folder / "sae.safetensors")
        activation = _cfg(cfg, "activation", str, cfg_file, caller, "topk")
        if activation != "topk":
            raise ArgumentError(
                f"{caller}: {cfg_file}: activation is {activation!r}; tlprisms reads sparsify's "
                "'topk' coders (GroupMax picks one latent per group, which it does not compute)."
            )
        for key in _SPARSIFY_REFUSED:
            if _cfg(cfg, key, bool, cfg_file, caller, False):
                raise ArgumentError(
                    f"{caller}: {cfg_file} has {key}: true, which changes what the coder "
                    "computes beyond sae.safetensors; tlprisms does not read such coders."
                )
        d_in = _cfg(cfg, "d_in", int, cfg_file, caller)
        k = _cfg(cfg, "k", int, cfg_file, caller)
        if d_in is None or k is None:
            raise ArgumentError(
                f"{caller}: {cfg_file} lacks {'d_in' if d_in is None else 'k'} (an integer); "
                "sparsify's cfg.json names d_in and k."
            )
        transcode = _cfg(cfg, "transcode", bool, cfg_file, caller, False)
        skip_cfg = _cfg(cfg, "skip_connection", bool, cfg_file, caller, False)
        n_latents = _cfg(cfg, "num_latents", int, cfg_file, caller, 0)
        if not n_latents:
            factor = _cfg(cfg, "expansion_factor", int, cfg_file, caller)
            n_latents = None if factor is None else d_in * factor
        p = _load_safetensors(folder / "sae.safetensors", caller)
        _check_keys(p, _SPARSIFY, weights, "a sparsify sae.safetensors", caller, _SPARSIFY_NEED)
        dims = _dims(p, weights, caller, "encoder.bias")
        _check_layout(p, _SPARSIFY, dims, weights, "sparsify", caller, "encoder.bias")
        for key, stated, have in (
            ("d_in", d_in, dims["d_model"]),
            ("num_latents", n_latents, dims["d_sae"]),
        ):
            if stated is not None and stated != have:
                raise ArgumentError(
                    f"{caller}: {cfg_file} says {key}={stated} but {weights} has {have} "
                    "(from encoder.bias and b_dec); the config and the weights belong to "
                    "different coders."
                )
        if skip_cfg != ("W_skip" in p):
            raise ArgumentError(
                f"{caller}: {cfg_file} says skip_connection: {str(skip_cfg).lower()} but "
                f"{weights} {'has no' if skip_cfg else 'holds a'} W_skip; make them agree."
            )
        found = _sparsify_hooks(folder.name, transcode)
        if found is None and hook is None:
            raise ArgumentError(
                f"{caller}: {str(folder)!r}: the folder name (the hookpoint sparsify hooked) "
                f"is not one tlprisms maps for {'a transcoder' if transcode else 'an SAE'} "
                "(layers.L" + (".mlp" if transcode else " or layers.L.mlp") + "); pass hook= "
                "(and input_hook= for a transcoder)."
            )
        if found is not None:
            _agree(found, hook, input_hook, f"the folder name {folder.name!r}", caller)
            hook, input_hook = found
        assert hook is not None
        if not transcode and input_hook is not None:
            raise ArgumentError(
                f"{caller}: input_hook={input_hook!r}, but {cfg_file} says transcode: false (an "
                "SAE reads what it writes); leave input_hook out."
            )
        if transcode and input_hook is None:
            raise ArgumentError(
                f"{caller}: {cfg_file} says transcode: true; pass input_hook= (the place the "
                f"transcoder reads, e.g. 'blocks.L.{N.MLP_IN}')."
            )
        skip = p.get("W_skip")
        d = _build(
            weights,
            caller,
            W_enc=p["encoder.weight"].T,
            b_enc=p["encoder.bias"],
            W_dec=p["W_dec"],
            b_dec=p["b_dec"],
            hook=hook,
            input_hook=input_hook if transcode else None,
            activation="topk",
            k=k,
            subtract_b_dec=not transcode,
            W_skip=None if skip is None else skip.T,
            name=f"sparsify {folder.name}",
        )
        d.source = str(folder)
        d._before_post_norm |= found is not None and folder.name.endswith(".mlp")
        return d

    @classmethod
    @check.entry
    def from_circuit_tracer(cls, path: _PathLike) -> list["Dictionary"]:
        """One transcoder per layer from circuit-tracer's layout: a folder with
        ``config.yaml`` (``feature_input_hook``, ``feature_output_hook``, e.g.
        ``hook_resid_mid`` / ``hook_mlp_out``, relative to each block; optionally
        ``activation`` and ``k``) and ``layer_{i}.safetensors`` as circuit-tracer saves them:
        ``W_enc [d_sae, d_model]`` (read as ``x @ W_enc.T``), ``W_dec [d_sae, d_model]``,
        ``b_enc [d_sae]``, ``b_dec [d_model]``, optional ``W_skip [d_model, d_model]`` (read
        as ``x @ W_skip.T``), optional ``activation_function.threshold`` (JumpReLU) or ``k``
        (TopK: the k largest pre-activations kept as they are, not ReLU-ed, as circuit-tracer
        computes them). The orientation is the format's, never guessed from the shapes."""
        caller = "Dictionary.from_circuit_tracer"
        folder = _folder(path, ("config.yaml",), caller)
        cfg_file = str(folder / "config.yaml")
        cfg = _read_yaml(folder / "config.yaml", caller)
        hooks = {}
        for key in ("feature_input_hook", "feature_output_hook"):
            value = cfg.get(key)
            if not isinstance(value, str):
                raise ArgumentError(
                    f"{caller}: {cfg_file} has no {key} (a string; got {value!r}); "
                    "circuit-tracer's config names feature_input_hook and feature_output_hook, "
                    f"e.g. {N.RESID_MID} and {N.MLP_OUT}."
                )
            hooks[key] = value
        cfg_act = _cfg(cfg, "activation", str, cfg_file, caller, null_ok=True)
        if cfg_act is not None and cfg_act.lower() not in ("relu", "jumprelu", "topk"):
            raise ArgumentError(
                f"{caller}: {cfg_file}: activation is {cfg_act!r}; tlprisms reads circuit-tracer "
                "transcoders with activation relu, jumprelu or topk."
            )
        cfg_act = None if cfg_act is None else cfg_act.lower()
        cfg_k = _cfg(cfg, "k", int, cfg_file, caller, null_ok=True)
        files = _layer_files(folder, caller)
        out = []
        for layer, f in files:
            where = str(f)
            p = _load_safetensors(f, caller)
            _check_keys(p, _CIRCUIT_TRACER, where, "a circuit-tracer layer file", caller)
            dims = _dims(p, where, caller)
            if "threshold" in p and "activation_function.threshold" in p:
                raise ArgumentError(
                    f"{caller}: {where} holds both threshold and activation_function.threshold; "
                    "keep one (circuit-tracer saves activation_function.threshold)."
                )
            th = p.pop("activation_function.threshold", p.pop("threshold", None))
            if th is not None and th.ndim == 0 and th.is_floating_point():
                th = th.expand(dims["d_sae"]).clone()  # one threshold for every feature
            if th is not None:
                p["threshold"] = th
            _check_layout(p, _CIRCUIT_TRACER, dims, where, "circuit-tracer", caller)
            k = _file_k(p.get("k"), where, caller)
            activation = _circuit_tracer_activation(
                th is not None, k, cfg_act, cfg_k, where, cfg_file, caller
            )
            if activation == "topk" and k is None:
                k = cfg_k
            skip = p.get("W_skip")
            d = _build(
                where,
                caller,
                W_enc=p["W_enc"].T,
                b_enc=p["b_enc"],
                W_dec=p["W_dec"],
                b_dec=p["b_dec"],
                hook=block_hook_name(layer, hooks["feature_output_hook"]),
                input_hook=block_hook_name(layer, hooks["feature_input_hook"]),
                activation=activation,
                threshold=th,
                k=k,
                topk_relu=False if activation == "topk" else True,
                W_skip=None if skip is None else skip.T,
                name=f"L{layer}",
            )
            d.source = where
            out.append(d)
        return out

    @classmethod
    @check.entry
    def from_circuit_tracer_clt(cls, path: _PathLike) -> "CrossLayerTranscoder":
        """A cross-layer transcoder in circuit-tracer's CLT layout: a folder with
        ``config.yaml`` (``feature_input_hook``, ``feature_output_hook``: e.g.
        ``hook_resid_mid`` / ``hook_mlp_out``, relative to each block) and, per layer ``i``,
        ``W_enc_{i}.safetensors`` (``W_enc_{i} [d_sae, d_model]``, read as ``x @ W.T``;
        ``b_enc_{i} [d_sae]``; ``b_dec_{i} [d_model]``, layer ``i``'s output bias; optional
        ``threshold_{i} [d_sae]``, JumpReLU ``pre * (pre > threshold)``, else ReLU) and
        ``W_dec_{i}.safetensors`` (``W_dec_{i} [d_sae, n_layers - i, d_model]``: layer
        ``i``'s features decoded to the MLP outputs of layers ``i .. n_layers-1``). The
        encoders are read now; a decoder is read when used, one layer at a time (its header
        is checked now)."""
        return CrossLayerTranscoder._load(path, "Dictionary.from_circuit_tracer_clt")


class CrossLayerTranscoder:
    """A cross-layer transcoder: one encoder per layer, reading that layer's MLP input; the
    features of layer ``l`` decode to the MLP outputs of every layer ``L >= l``:

        mlp_out[L] = sum_{l <= L} a_l @ W_dec_l[:, L - l] + b_dec[L] + e[L].

    In ``prism.features`` it replaces every MLP write: a feature's term is the sum of its
    writes to the MLP outputs the readout reads, ``b_dec`` and the error are per layer.
    Built by :meth:`Dictionary.from_circuit_tracer_clt`; decoders are read from the files
    one layer at a time, never all at once.
    """

    #: a CLT spans every layer (it has no one layer)
    layer = -1

    def __init__(
        self,
        *,
        folder: Path,
        input_hook: str,
        output_hook: str,
        W_enc: list,
        b_enc: list,
        b_dec: list,
        threshold: Optional[list],
        d_model: int,
        d_sae: int,
    ) -> None:
        self.source = str(folder)
        self._folder = folder
        self.n_layers = len(W_enc)
        self.d_model, self.d_sae = int(d_model), int(d_sae)
        self.input_suffix, self.output_suffix = input_hook, output_hook
        self.W_enc = W_enc  # per layer [d_sae, d_model], as stored
        self.b_enc = b_enc
        self.b_dec = b_dec  # per output layer [d_model]
        self.threshold = threshold
        self.activation = "jumprelu" if threshold is not None else "relu"
        self.name = f"CLT {folder.name}"
        _, self.input_site, _ = _site(block_hook_name(0, input_hook), "feature_input_hook", "")
        _, self.site, _ = _site(block_hook_name(0, output_hook), "feature_output_hook", "")

    def __repr__(self) -> str:
        return (
            f"CrossLayerTranscoder({self.n_layers} layers x {self.d_sae} features, "
            f"{self.activation}, {self.input_suffix} -> {self.output_suffix})"
        )

    def input_hook(self, layer: int) -> str:
        return block_hook_name(layer, self.input_suffix)

    def encode(self, layer: int, x: Tensor) -> Tensor:
        """Layer ``layer``'s feature activations ``[..., d_sae]`` of its inputs ``x``."""
        W = self.W_enc[layer].to(x.device, x.dtype)
        pre = x @ W.T + self.b_enc[layer].to(x.device, x.dtype)
        if self.threshold is None:
            return torch.relu(pre)
        th = self.threshold[layer].to(x.device, x.dtype)
        return torch.where(pre > th, pre, torch.zeros_like(pre))

    def decoder(
        self, layer: int, n_out: Optional[int] = None, rows: Optional[Tensor] = None
    ) -> Tensor:
        """``W_dec_{layer}[rows, :n_out]``: ``[len(rows) or d_sae, n_out, d_model]``, layer
        ``layer``'s decoders to the MLP outputs of layers ``layer .. layer + n_out - 1``,
        read from its file now (float32); ``rows`` (sorted feature indices) reads only those
        features' rows, one read per run of consecutive ones."""
        from safetensors import safe_open

        n_all = self.n_layers - layer
        n_out = n_all if n_out is None else n_out
        with safe_open(str(self._folder / f"W_dec_{layer}.safetensors"), framework="pt") as f:
            sl = f.get_slice(f"W_dec_{layer}")
            if rows is None:
                return sl[:, :n_out, :].float()
            idx = rows.tolist()
            if not idx:
                return torch.zeros(0, n_out, self.d_model)
            cuts = [0] + [i for i in range(1, len(idx)) if idx[i] != idx[i - 1] + 1] + [len(idx)]
            parts = [sl[idx[a] : idx[b - 1] + 1, :n_out, :] for a, b in zip(cuts, cuts[1:])]
            return torch.cat(parts, 0).float()

    def check_model(self, view: Any, caller: str) -> None:
        """Refuse a CLT that does not fit this model (layers, sizes, sites)."""
        label = f"{self.name} (from {self.source})"
        if self.n_layers != view.n_layers or self.d_model != view.d_model:
            raise ArgumentError(
                f"{caller}: cross-layer transcoder {label} has {self.n_layers} layers of "
                f"d_model={self.d_model}, but the model has {view.n_layers} layers of "
                f"d_model={view.d_model}; it was made for another model."
            )
        if view.attn_only or (self.input_site is Site.RESID_MID and view.parallel):
            raise ArgumentError(
                f"{caller}: cross-layer transcoder {label} reads {self.input_suffix} and writes "
                f"{self.output_suffix}, which this model does not have ({view.describe()})."
            )

    @staticmethod
    def _load(path: Any, caller: str) -> "CrossLayerTranscoder":
        from safetensors import SafetensorError, safe_open

        folder = _folder(path, ("config.yaml", "W_enc_0.safetensors"), caller)
        cfg_file = str(folder / "config.yaml")
        cfg = _read_yaml(folder / "config.yaml", caller)
        hooks = {}
        for key in ("feature_input_hook", "feature_output_hook"):
            value = _cfg(cfg, key, str, cfg_file, caller)
            if value is None:
                raise ArgumentError(
                    f"{caller}: {cfg_file} has no {key} (a string, e.g. {N.RESID_MID} and "
                    f"{N.MLP_OUT})."
                )
            hooks[key] = value
        _, in_site, _ = _site(block_hook_name(0, hooks["feature_input_hook"]), "input", caller)
        _, out_site, _ = _site(block_hook_name(0, hooks["feature_output_hook"]), "output", caller)
        if out_site is not Site.MLP_OUT or in_site not in (Site.LN2_NORMALIZED, Site.RESID_MID):
            raise ArgumentError(
                f"{caller}: {cfg_file}: a cross-layer transcoder reads the MLP's input "
                f"({N.RESID_MID}, {N.MLP_IN} or {N.LN2_NORMALIZED}) and writes {N.MLP_OUT}; "
                f"got {hooks['feature_input_hook']!r} -> {hooks['feature_output_hook']!r}."
            )
        n = 0
        while (folder / f"W_enc_{n}.safetensors").is_file():
            n += 1
        extra = sorted(
            f.name
            for f in folder.glob("W_*_*.safetensors")
            if not re.fullmatch(
                rf"W_(enc|dec)_({'|'.join(map(str, range(n)))})\.safetensors", f.name
            )
        )
        if extra:
            raise ArgumentError(
                f"{caller}: {str(folder)!r} holds {', '.join(extra)} beyond layers 0..{n - 1} "
                "(W_enc_i/W_dec_i must number the layers from 0 without a gap); remove them."
            )
        W_enc: list = []
        b_enc: list = []
        b_dec: list = []
        th: list = []
        dims: dict = {}
        for i in range(n):
            file = folder / f"W_enc_{i}.safetensors"
            p = _load_safetensors(file, caller)
            layout = {
                f"W_enc_{i}": ("d_sae", "d_model"),
                f"b_enc_{i}": ("d_sae",),
                f"b_dec_{i}": ("d_model",),
                f"threshold_{i}": ("d_sae",),
            }
            need = (f"W_enc_{i}", f"b_enc_{i}", f"b_dec_{i}")
            _check_keys(p, layout, str(file), "a circuit-tracer CLT encoder file", caller, need)
            p["b_enc"], p["b_dec"] = p[f"b_enc_{i}"], p[f"b_dec_{i}"]
            mine = _dims(p, str(file), caller)
            del p["b_enc"], p["b_dec"]
            if dims and mine != dims:
                raise ArgumentError(
                    f"{caller}: {str(file)}: d_sae={mine['d_sae']}, d_model={mine['d_model']}, "
                    f"but layer 0 has d_sae={dims['d_sae']}, d_model={dims['d_model']}; every "
                    "layer of a CLT has the same sizes."
                )
            dims = mine
            _check_layout(p, layout, dims, str(file), "circuit-tracer's CLT", caller, f"b_enc_{i}")
            has_th = f"threshold_{i}" in p
            if i and has_th != bool(th):
                raise ArgumentError(
                    f"{caller}: {str(file)}: some layers have a JumpReLU threshold and some do "
                    "not; a CLT has one activation."
                )
            W_enc.append(p[f"W_enc_{i}"])
            b_enc.append(p[f"b_enc_{i}"])
            b_dec.append(p[f"b_dec_{i}"])
            if f"threshold_{i}" in p:
                th.append(p[f"threshold_{i}"])
            dec = folder / f"W_dec_{i}.safetensors"
            want = [dims["d_sae"], n - i, dims["d_model"]]
            try:
                with safe_open(str(dec), framework="pt") as f:
                    keys = list(f.keys())
                    shape = f.get_slice(f"W_dec_{i}").get_shape() if f"W_dec_{i}" in keys else None
                    dtype = f.get_slice(f"W_dec_{i}").get_dtype() if shape is not None else None
            except (SafetensorError, OSError, ValueError, RuntimeError) as err:
                raise ArgumentError(
                    f"{caller}: {str(dec)!r} is missing or not a readable .safetensors file "
                    f"({err}); every layer i needs W_dec_i.safetensors."
                ) from err
            if keys != [f"W_dec_{i}"] or list(shape or []) != want or dtype not in _FLOAT_DTYPES:
                raise ArgumentError(
                    f"{caller}: {str(dec)!r} holds {keys} (W_dec_{i}: shape {shape}, dtype "
                    f"{dtype}); circuit-tracer's CLT stores only W_dec_{i} as a float [d_sae, "
                    f"n_layers - {i}, d_model] = {want}."
                )
        return CrossLayerTranscoder(
            folder=folder,
            input_hook=hooks["feature_input_hook"],
            output_hook=hooks["feature_output_hook"],
            W_enc=W_enc,
            b_enc=b_enc,
            b_dec=b_dec,
            threshold=th or None,
            d_model=dims["d_model"],
            d_sae=dims["d_sae"],
        )


_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


# ----------------------------------------------------------------------------- formats
#: each format's tensors and the shape it stores them in (d_sae from b_enc, d_model from b_dec)
_GEMMA_SCOPE = {
    "W_enc": ("d_model", "d_sae"),
    "W_dec": ("d_sae", "d_model"),
    "b_enc": ("d_sae",),
    "b_dec": ("d_model",),
    "threshold": ("d_sae",),
    "W_skip": ("d_model", "d_model"),
}
_CIRCUIT_TRACER = {
    "W_enc": ("d_sae", "d_model"),
    "W_dec": ("d_sae", "d_model"),
    "b_enc": ("d_sae",),
    "b_dec": ("d_model",),
    "W_skip": ("d_model", "d_model"),
    "threshold": ("d_sae",),
    "activation_function.threshold": ("d_sae",),
    "k": (),
}
_SAELENS = {
    "W_enc": ("d_model", "d_sae"),
    "W_dec": ("d_sae", "d_model"),
    "b_enc": ("d_sae",),
    "b_dec": ("d_model",),
    "threshold": ("d_sae",),
    "log_threshold": ("d_sae",),
}
_REQUIRED = ("W_enc", "b_enc", "W_dec", "b_dec")
#: Gemma Scope 2's params.safetensors (lower-case names; the skip is ``x @ affine``)
_GEMMA_SCOPE_2 = {
    "w_enc": ("d_model", "d_sae"),
    "w_dec": ("d_sae", "d_model"),
    "b_enc": ("d_sae",),
    "b_dec": ("d_model",),
    "threshold": ("d_sae",),
    "affine_skip_connection": ("d_model", "d_model"),
}
_GEMMA_SCOPE_2_NEED = ("w_enc", "w_dec", "b_enc", "b_dec", "threshold")
#: sparsify's sae.safetensors (``encoder`` is an ``nn.Linear``; the skip is ``x @ W_skip.T``)
_SPARSIFY = {
    "encoder.weight": ("d_sae", "d_model"),
    "encoder.bias": ("d_sae",),
    "W_dec": ("d_sae", "d_model"),
    "b_dec": ("d_model",),
    "W_skip": ("d_model", "d_model"),
}
_SPARSIFY_NEED = ("encoder.weight", "encoder.bias", "W_dec", "b_dec")
#: sparsify options that change the computation beyond the weights: refused when true
_SPARSIFY_REFUSED = ("embed_skip", "gram_lookup", "matching_pursuit", "signed")
#: Gemma Scope 2's HF hook points (after ``model.[language_model.]layers.L.``) -> TL hooks
_GS2_POINTS = N.GEMMA_SCOPE_2_POINTS


def _gs2_point(point: Any, key: str, where: str, caller: str) -> str:
    """The TransformerLens hook of a Gemma Scope 2 ``hf_hook_point_*``."""
    match = re.fullmatch(r"model\.(?:language_model\.)?layers\.(\d+)\.(.+)", point)
    name = None if match is None else _GS2_POINTS.get(match.group(2))
    if match is None or name is None:
        raise ArgumentError(
            f"{caller}: {where}: {key} is {point!r}, not a hook point tlprisms maps (it reads "
            "model.layers.L." + ", model.layers.L.".join(_GS2_POINTS) + "); pass a folder "
            "of one of those, or build Dictionary(...) with the weights."
        )
    return block_hook_name(int(match.group(1)), name)


def _agree(
    found: tuple, hook: Optional[str], input_hook: Optional[str], said: str, caller: str
) -> None:
    """``hook``/``input_hook`` given by the caller name the sites the file says (any
    spelling of them), or are refused."""
    for what, given, want in (("hook", hook, found[0]), ("input_hook", input_hook, found[1])):
        if given is None:
            continue
        want = found[0] if want is None else want
        mine = _site_or_z(given, what, caller)
        theirs = _site_or_z(want, what, caller)
        if mine[1:] != theirs[1:]:
            raise ArgumentError(
                f"{caller}: {what}={given!r}, but {said} says {want!r}; leave {what} out "
                "(it is read from the files) or pass the dictionary's own site."
            )


def _sparsify_hooks(name: str, transcode: bool) -> Optional[tuple]:
    """(hook, input_hook) of a sparsify hookpoint folder, or None for names not mapped."""
    match = re.fullmatch(r"(?:.*\.)?(?:layers|h)\.(\d+)(\.mlp)?", name)
    if match is None:
        return None
    layer, mlp = int(match.group(1)), match.group(2) is not None
    if not mlp:
        return None if transcode else (block_hook_name(layer, N.RESID_POST), None)
    out = block_hook_name(layer, N.MLP_OUT)
    return (out, block_hook_name(layer, N.MLP_IN)) if transcode else (out, None)


def _from_gemma_scope_2(
    path: Path, hook: Optional[str], input_hook: Optional[str], caller: str
) -> "Dictionary":
    folder = path if path.is_dir() else path.parent
    folder = _folder(folder, ("config.json", "params.safetensors"), caller)
    cfg_file = str(folder / "config.json")
    cfg = _read_json(folder / "config.json", caller)
    weights = str(folder / "params.safetensors")
    arch = _cfg(cfg, "architecture", str, cfg_file, caller, "jump_relu")
    if arch != "jump_relu":
        raise ArgumentError(
            f"{caller}: {cfg_file}: architecture is {arch!r}; Gemma Scope 2 dictionaries are "
            "'jump_relu', the one tlprisms reads in this format."
        )
    kind = _cfg(cfg, "type", str, cfg_file, caller, "sae")
    if kind not in ("sae", "transcoder"):
        raise ArgumentError(
            f"{caller}: {cfg_file}: type is {kind!r}; tlprisms reads Gemma Scope 2 'sae' and "
            "'transcoder' folders (a cross-layer transcoder is a different layout)."
        )
    point_in = _cfg(cfg, N.GEMMA_SCOPE_2_IN, str, cfg_file, caller)
    if point_in is None:
        raise ArgumentError(f"{caller}: {cfg_file} has no {N.GEMMA_SCOPE_2_IN} (a string).")
    point_out = _cfg(cfg, N.GEMMA_SCOPE_2_OUT, str, cfg_file, caller, point_in)
    hook_in = _gs2_point(point_in, N.GEMMA_SCOPE_2_IN, cfg_file, caller)
    hook_out = _gs2_point(point_out, N.GEMMA_SCOPE_2_OUT, cfg_file, caller)
    if (kind == "transcoder") != (hook_in != hook_out):
        raise ArgumentError(
            f"{caller}: {cfg_file}: type is {kind!r} but it reads {point_in!r} and writes "
            f"{point_out!r}; "
            + (
                "an SAE writes what it reads."
                if kind == "sae"
                else "a transcoder reads one place and writes another."
            )
        )
    found = (hook_out, hook_in if kind == "transcoder" else None)
    _agree(found, hook, input_hook, cfg_file, caller)
    p = _load_safetensors(folder / "params.safetensors", caller)
    _check_keys(
        p,
        _GEMMA_SCOPE_2,
        weights,
        "a Gemma Scope 2 params.safetensors",
        caller,
        _GEMMA_SCOPE_2_NEED,
    )
    dims = _dims(p, weights, caller)
    _check_layout(p, _GEMMA_SCOPE_2, dims, weights, "Gemma Scope 2", caller)
    affine = _cfg(cfg, "affine_connection", bool, cfg_file, caller, False)
    if affine != ("affine_skip_connection" in p):
        raise ArgumentError(
            f"{caller}: {cfg_file} says affine_connection: {str(affine).lower()} but {weights} "
            f"{'has no' if affine else 'holds an'} affine_skip_connection; make them agree."
        )
    width = _cfg(cfg, "width", int, cfg_file, caller)
    if width is not None and width != dims["d_sae"]:
        raise ArgumentError(
            f"{caller}: {cfg_file} says width={width} but {weights} has d_sae={dims['d_sae']} "
            "(b_enc); the config and the weights belong to different dictionaries."
        )
    th = p["threshold"]
    if bool((th < 0).any()):
        raise ArgumentError(
            f"{caller}: {weights}: threshold has {int((th < 0).sum())} negative value(s); "
            "Gemma Scope 2 computes relu(pre) * (pre > threshold), which only for thresholds "
            ">= 0 is the JumpReLU tlprisms computes. Build Dictionary(...) yourself if you "
            "mean pre * (pre > threshold)."
        )
    d = _build(
        weights,
        caller,
        W_enc=p["w_enc"],
        b_enc=p["b_enc"],
        W_dec=p["w_dec"],
        b_dec=p["b_dec"],
        hook=found[0],
        input_hook=found[1],
        activation="jumprelu",
        threshold=th,
        W_skip=p.get("affine_skip_connection"),
        name=f"GemmaScope2 {folder.name}",
    )
    d.source = str(folder)
    return d


def _check_keys(
    p: Mapping,
    layout: Mapping,
    where: str,
    fmt: str,
    caller: str,
    required: tuple = _REQUIRED,
) -> None:
    """The required tensors are there and nothing the format does not define (an unknown
    tensor may change the computation, so it is refused rather than ignored)."""
    _need(p, required, where, caller)
    unknown = sorted(k for k in p if k not in layout)
    if unknown:
        raise ArgumentError(
            f"{caller}: {where} holds {', '.join(unknown)}, which {fmt} does not have (it "
            f"has {', '.join(layout)}); tlprisms does not know what they do, so it does not "
            "ignore them. Build Dictionary(...) from the weights yourself if they are unused."
        )


def _dims(p: Mapping, where: str, caller: str, enc_bias: str = "b_enc") -> dict:
    """``d_sae`` and ``d_model``, read from the biases (one axis each, as every format has;
    ``enc_bias`` names the encoder's bias in the format)."""
    for key in (enc_bias, "b_dec"):
        t = p[key]
        if t.ndim != 1:
            raise ArgumentError(
                f"{caller}: {where}: {key} has shape {tuple(t.shape)}; it must be a vector "
                f"({'[d_sae]' if key == enc_bias else '[d_model]'}). The file is damaged or "
                "in another format."
            )
    return {"d_sae": int(p[enc_bias].shape[0]), "d_model": int(p["b_dec"].shape[0])}


def _check_layout(
    p: Mapping,
    layout: Mapping,
    dims: Mapping,
    where: str,
    fmt: str,
    caller: str,
    enc_bias: str = "b_enc",
) -> None:
    """Every tensor has the shape (and a float dtype, ``k`` an integer one) its format
    stores; nothing is transposed to fit."""
    for key, names in layout.items():
        if key not in p:
            continue
        t = p[key]
        want = tuple(dims[n] for n in names)
        if key == "k":
            continue  # checked by _file_k
        if not t.is_floating_point():
            raise ArgumentError(
                f"{caller}: {where}: {key} has dtype {t.dtype}; {fmt} stores float weights."
            )
        if tuple(t.shape) != want:
            layout_text = "[" + ", ".join(names) + "]"
            raise ArgumentError(
                f"{caller}: {where}: {key} has shape {list(t.shape)}, but {fmt} stores {key} as "
                f"{layout_text} = {list(want)} (d_sae={dims['d_sae']} from {enc_bias}, d_model="
                f"{dims['d_model']} from b_dec). The file is in another layout or damaged: "
                "save it in this format, or build Dictionary(W_enc [d_in, d_sae], ...) "
                "yourself."
            )


def _file_k(t: Optional[Tensor], where: str, caller: str) -> Optional[int]:
    """circuit-tracer's TopK ``k``: a 0-d integer tensor (``torch.tensor(k)``), at least 1."""
    if t is None:
        return None
    if t.ndim != 0 or t.is_floating_point() or t.dtype == torch.bool or t.is_complex():
        raise ArgumentError(
            f"{caller}: {where}: k is a tensor of shape {list(t.shape)} and dtype {t.dtype}; "
            "circuit-tracer saves TopK's k as one integer (torch.tensor(k)). Re-save it so."
        )
    k = int(t.item())
    if k < 1:
        raise ArgumentError(f"{caller}: {where}: k is {k}; TopK needs k >= 1.")
    return k


def _circuit_tracer_activation(
    has_threshold: bool,
    k: Optional[int],
    cfg_act: Optional[str],
    cfg_k: Optional[int],
    where: str,
    cfg_file: str,
    caller: str,
) -> str:
    """The activation a layer file (and the config, where it says) stands for; a
    contradiction is refused rather than settled by a guess."""
    if has_threshold and k is not None:
        raise ArgumentError(
            f"{caller}: {where} holds both a JumpReLU threshold and a TopK k; a transcoder has "
            "one activation. Remove the one it was not trained with."
        )
    from_file = "jumprelu" if has_threshold else "topk" if k is not None else None
    if cfg_act is not None and from_file is not None and cfg_act != from_file:
        raise ArgumentError(
            f"{caller}: {cfg_file} says activation {cfg_act!r} but {where} holds "
            f"{'a threshold' if has_threshold else 'k'} ({from_file}); make them agree."
        )
    if cfg_act in ("jumprelu",) and not has_threshold:
        raise ArgumentError(
            f"{caller}: {cfg_file} says activation 'jumprelu' but {where} has no "
            "activation_function.threshold."
        )
    if k is not None and cfg_k is not None and k != cfg_k:
        raise ArgumentError(
            f"{caller}: {cfg_file} says k: {cfg_k} but {where} holds k = {k}; make them agree."
        )
    activation = from_file or cfg_act or "relu"
    if activation == "topk" and k is None and cfg_k is None:
        raise ArgumentError(
            f"{caller}: {cfg_file} says activation 'topk' but neither it nor {where} gives k; "
            "add k: <int> to config.yaml."
        )
    if activation != "topk" and cfg_k is not None:
        raise ArgumentError(
            f"{caller}: {cfg_file} gives k: {cfg_k} but {where} is a {activation} transcoder; "
            "k is for TopK (add activation: topk, or remove k)."
        )
    return activation


def _layer_files(folder: Path, caller: str) -> list[tuple[int, Path]]:
    files = []
    for f in folder.glob("layer_*.safetensors"):
        match = re.fullmatch(r"layer_(\d+)", f.stem)
        if match is None:
            raise ArgumentError(
                f"{caller}: {str(f)!r} is not named layer_<i>.safetensors with <i> a layer "
                "number; rename or remove it."
            )
        files.append((int(match.group(1)), f))
    files.sort()
    if not files:
        clt = (folder / "W_enc_0.safetensors").is_file()
        raise ArgumentError(
            f"{caller}: no layer_{{i}}.safetensors in {str(folder)!r}"
            + (
                "; it holds W_enc_0.safetensors, circuit-tracer's cross-layer transcoder "
                "layout: use Dictionary.from_circuit_tracer_clt(path)."
                if clt
                else "."
            )
        )
    layers = [layer for layer, _ in files]
    dup = sorted({layer for layer in layers if layers.count(layer) > 1})
    if dup:
        names = [f.name for layer, f in files if layer in dup]
        raise ArgumentError(
            f"{caller}: {str(folder)!r} has more than one file for layer(s) {dup} "
            f"({', '.join(names)}); keep one per layer."
        )
    return files


def _build(where: str, caller: str, **kwargs: Any) -> "Dictionary":
    """``Dictionary(**kwargs)`` whose refusals name the file the values came from."""
    try:
        return Dictionary(**kwargs)
    except ArgumentError as err:
        text = str(err)
        text = text[len("Dictionary: ") :] if text.startswith("Dictionary: ") else text
        raise ArgumentError(f"{caller}: {where}: {text}") from err


# ----------------------------------------------------------------------------- helpers
def _site_or_z(hook: Any, what: str, caller: str) -> tuple[str, Optional[Site], int]:
    """``(hook, site, layer)``; the site is None for per-head z (``blocks.L.attn.hook_z``)."""
    if isinstance(hook, str):
        z = re.fullmatch(r"blocks\.(\d+)\." + re.escape(N.ATTN_Z), hook)
        if z is not None:
            return hook, None, int(z.group(1))
    return _site(hook, what, caller, f" or {N.ATTN_Z} (per-head z)")


def _site(hook: Any, what: str, caller: str, also: str = "") -> tuple[str, Site, int]:
    """``(hook, site, layer)`` of a residual stream, layer output or MLP input hook."""
    parsed = parse_block_hook(hook) if isinstance(hook, str) else None
    if parsed is None:
        raise ArgumentError(
            f"{caller}: {what}={hook!r} is not a hook a dictionary can sit at; pass a block "
            f"hook name 'blocks.L.<name>' with <name> one of {', '.join(DICTIONARY_HOOKS)}"
            f"{also}."
        )
    return hook, parsed[0], parsed[1]


def _folder(path: Any, files: tuple, caller: str) -> Path:
    if not isinstance(path, (str, Path)):
        raise ArgumentError(f"{caller}: path={path!r}; pass a folder path.")
    folder = Path(path)
    missing = [f for f in files if not (folder / f).is_file()]
    if not folder.is_dir() or missing:
        raise ArgumentError(
            f"{caller}: {str(folder)!r} is not a folder with {' and '.join(files)} "
            f"(missing: {', '.join(missing) if folder.is_dir() else 'the folder'})."
        )
    return folder


def _read_text(file: Path, caller: str) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ArgumentError(
            f"{caller}: {str(file)!r} is not UTF-8 text ({err.reason} at byte {err.start}); "
            "it is damaged or not the config file (re-download or re-save it)."
        ) from err
    except OSError as err:
        raise ArgumentError(f"{caller}: cannot read {str(file)!r}: {err.strerror}.") from err


def _read_json(file: Path, caller: str) -> dict:
    try:
        data = json.loads(_read_text(file, caller))
    except json.JSONDecodeError as err:
        raise ArgumentError(
            f"{caller}: {str(file)!r} is not valid JSON ({err.msg} at line {err.lineno}, "
            f"column {err.colno}); fix the file or re-save the config (SAELens: "
            "sae.save_model(path))."
        ) from err
    if not isinstance(data, dict):
        raise ArgumentError(
            f"{caller}: {str(file)!r} holds a JSON {type(data).__name__}, not an object of "
            "config keys; it is not a SAELens cfg.json."
        )
    return data


def _load_safetensors(file: Path, caller: str) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ArgumentError(
            f"{caller}: {str(file)!r} is not a readable .safetensors file ({err}); it is "
            "damaged or in another format: re-download it or save the weights with "
            "safetensors.torch.save_file."
        ) from err
    return {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}


def _read_npz(file: Path, caller: str) -> dict:
    """A ``.npz`` archive of float arrays, never unpickled."""
    import zipfile

    import numpy as np

    not_npz = (
        f"{caller}: {str(file)!r} is not an .npz archive of arrays (Gemma Scope's params.npz "
        "is a zip of .npy arrays: W_enc, W_dec, b_enc, b_dec, threshold). Pass that file "
        "(re-download it if it is damaged); tlprisms never loads pickled data."
    )
    if not zipfile.is_zipfile(file):
        raise ArgumentError(not_npz)
    out = {}
    try:
        with np.load(file, allow_pickle=False) as params:
            if not hasattr(params, "files"):
                raise ArgumentError(not_npz)
            for key in params.files:
                arr = params[key]
                if not np.issubdtype(arr.dtype, np.floating):
                    raise ArgumentError(
                        f"{caller}: {str(file)!r}: {key} has dtype {arr.dtype}; Gemma Scope "
                        "stores float arrays."
                    )
                out[key] = torch.from_numpy(np.asarray(arr, dtype=np.float32))
    except ArgumentError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError) as err:
        raise ArgumentError(not_npz) from err
    return out


def _need(p: Mapping, keys: tuple, where: str, caller: str) -> None:
    missing = [k for k in keys if k not in p]
    if missing:
        raise ArgumentError(
            f"{caller}: {where} lacks {', '.join(missing)} (has {', '.join(sorted(p))})."
        )


def _yaml_scalar(value: str) -> Any:
    """A scalar of the flat fallback parser: quoted text, true/false, an integer, or text."""
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        return value[1:-1]
    if value in ("true", "True", "false", "False"):
        return value.lower() == "true"
    if value in ("", "null", "~"):
        return None
    if re.fullmatch(r"[+-]?\d+", value):
        return int(value)
    return value


def _read_yaml(file: Path, caller: str) -> dict:
    text = _read_text(file, caller)
    try:
        import yaml
    except ImportError:  # flat "key: value" lines are all this loader reads
        data: Any = {}
        for line in text.splitlines():
            key, sep, value = line.partition(":")
            if sep and not line.startswith((" ", "-", "#")):
                data[key.strip()] = _yaml_scalar(value.split(" #")[0].strip())
    else:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ArgumentError(
                f"{caller}: {str(file)!r} is not valid YAML ({err}); fix the file (circuit-"
                "tracer's config.yaml is a mapping with feature_input_hook and "
                "feature_output_hook)."
            ) from err
    if not isinstance(data, dict):
        raise ArgumentError(f"{caller}: {str(file)!r} is not a YAML mapping.")
    return data


_EXPECTED = {
    bool: "a bool (true or false; not a string or a number)",
    int: "an integer (not a float or a string)",
    str: "a string",
    dict: "a mapping of keys to values",
}


def _cfg(
    cfg: Mapping,
    key: str,
    kind: type,
    where: str,
    caller: str,
    default: Any = None,
    *,
    null_ok: bool = False,
) -> Any:
    """``cfg[key]`` checked, not coerced: a bool must be a bool, an int an int (a float, even
    3.0, is refused: no format tlprisms reads writes one), a string a string."""
    if key not in cfg or (null_ok and cfg[key] is None):
        return default
    value = cfg[key]
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise ArgumentError(
            f"{caller}: {where}: {key} is {value!r} ({type(value).__name__}); expected "
            f"{_EXPECTED[kind]}. Fix that value in the config (it is not converted, since "
            'e.g. the string "false" would read as true).'
        )
    return value


def _from_saelens_parts(
    cfg: Mapping, p: dict, hook: Optional[str], where: str, weights: str, caller: str
) -> "Dictionary":
    """``where`` names the config (messages), ``weights`` the weights."""
    meta = _cfg(cfg, "metadata", dict, where, caller, {}, null_ok=True)
    if hook is None:
        hook = _cfg(cfg, HOOK_NAME_KEY, str, where, caller, null_ok=True)
        if hook is None:
            hook = _cfg(meta, HOOK_NAME_KEY, str, f"{where} (metadata)", caller, null_ok=True)
    if hook is None:
        raise ArgumentError(f"{caller}: {where} names no hook ({N.SAELENS_HOOK}); pass hook=.")
    arch = _cfg(cfg, "architecture", str, where, caller, null_ok=True) or "standard"
    arch = arch.lower()
    act_name = (
        _cfg(cfg, "activation_fn", str, where, caller, null_ok=True)
        or _cfg(cfg, "activation_fn_str", str, where, caller, null_ok=True)
        or "relu"
    ).lower()
    kwargs = _cfg(cfg, "activation_fn_kwargs", dict, where, caller, {}, null_ok=True)
    k = _cfg(cfg, "k", int, where, caller, null_ok=True)
    kw_k = _cfg(kwargs, "k", int, f"{where} (activation_fn_kwargs)", caller, null_ok=True)
    if k is not None and kw_k is not None and k != kw_k:
        raise ArgumentError(
            f"{caller}: {where} gives k={k} and activation_fn_kwargs k={kw_k}; make them agree."
        )
    k = k if k is not None else kw_k
    if arch == "gated":
        raise ArgumentError(
            f"{caller}: gated SAEs are not supported (their gate and magnitude paths are two "
            "encoders); convert it to a JumpReLU SAE or pass Dictionary(...)."
        )
    if arch in ("jumprelu",):
        activation = "jumprelu"
    elif arch in ("topk", "batchtopk") or act_name in ("topk", "batchtopk"):
        activation = "batchtopk" if "batch" in (arch + act_name) else "topk"
    elif arch == "standard" and act_name == "relu":
        activation = "relu"
    else:
        raise ArgumentError(
            f"{caller}: architecture {arch!r} with activation {act_name!r} is not one tlprisms "
            f"reads; supported: {', '.join(ACTIVATIONS)}."
        )
    # SAELens's hook_z reshaping flattens z [.., n_heads, d_head] head-major before encoding
    # and unflattens after decoding: the weights are on z flattened, as tlprisms reads them
    reshape = _cfg(cfg, "reshape_activations", str, where, caller, "none", null_ok=True)
    per_head = isinstance(hook, str) and hook.endswith(N.ATTN_Z)
    z_reshape = N.SAELENS_Z_RESHAPE
    if reshape not in ("none", z_reshape) or (reshape == z_reshape and not per_head):
        raise ArgumentError(
            f"{caller}: {where} has reshape_activations={reshape!r} with hook {hook!r}; "
            f"tlprisms reads {z_reshape!r} reshaping at blocks.L.{N.ATTN_Z} only, and "
            "'none' elsewhere."
        )
    head = _cfg(cfg, N.SAELENS_HEAD, int, where, caller, null_ok=True)
    if head is None:
        head = _cfg(meta, N.SAELENS_HEAD, int, f"{where} (metadata)", caller, null_ok=True)
    if head is not None:
        raise ArgumentError(
            f"{caller}: {where} has {N.SAELENS_HEAD}={head}: an SAE on one head's z, which "
            "tlprisms does not read (it reads z of every head, flattened); build "
            "Dictionary(...) on the flattened z with the other heads' rows of W_enc and "
            "columns of W_dec zero."
        )
    norm = _cfg(cfg, "normalize_activations", str, where, caller, "none", null_ok=True)
    if norm != "none":
        raise ArgumentError(
            f"{caller}: normalize_activations={norm!r}: the scaling is not in the weights. "
            "Fold it into the SAE first (SAELens: sae.fold_activation_norm_scaling_factor), "
            "or build Dictionary(..., input_scale=factor)."
        )
    if _cfg(cfg, "rescale_acts_by_decoder_norm", bool, where, caller, False):
        raise ArgumentError(
            f"{caller}: {where} has rescale_acts_by_decoder_norm: true (activations scaled "
            "by each decoder row's norm), which these weights do not hold. Fold it first "
            "(SAELens: sae.fold_W_dec_norm()) and save again."
        )
    subtract = _cfg(cfg, "apply_b_dec_to_input", bool, where, caller, False)
    name = _cfg(cfg, "neuronpedia_id", str, where, caller, null_ok=True)
    name = name or _cfg(meta, "neuronpedia_id", str, f"{where} (metadata)", caller, null_ok=True)
    if p.get("W_skip") is not None:
        raise ArgumentError(
            f"{caller}: the SAE has a skip connection (W_skip): it is a transcoder, which "
            "from_saelens does not read; build Dictionary(..., input_hook=..., W_skip=...)."
        )
    p = {key: value for key, value in p.items() if key != "W_skip"}
    _check_keys(p, _SAELENS, weights, "a SAELens SAE", caller)
    dims = _dims(p, weights, caller)
    _check_layout(p, _SAELENS, dims, weights, "SAELens", caller)
    for key, dim in (("d_in", "d_model"), ("d_sae", "d_sae")):
        stated = _cfg(cfg, key, int, where, caller, null_ok=True)
        if stated is not None and stated != dims[dim]:
            raise ArgumentError(
                f"{caller}: {where} says {key}={stated} but {weights} has {key}="
                f"{dims[dim]} (b_enc {list(p['b_enc'].shape)}, b_dec {list(p['b_dec'].shape)}); "
                "the config and the weights belong to different SAEs."
            )
    threshold = p.get("threshold")
    if threshold is None and "log_threshold" in p:
        threshold = torch.exp(p["log_threshold"])
    if activation == "jumprelu" and threshold is None:
        raise ArgumentError(f"{caller}: a JumpReLU SAE without a threshold tensor.")
    return _build(
        where,
        caller,
        W_enc=p["W_enc"],
        b_enc=p["b_enc"],
        W_dec=p["W_dec"],
        b_dec=p["b_dec"],
        hook=hook,
        activation=activation,
        threshold=threshold if activation in ("jumprelu", "batchtopk") else None,
        k=k if activation in ("topk", "batchtopk") else None,
        subtract_b_dec=subtract,
        name=name or hook,
    )
