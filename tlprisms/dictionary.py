"""Sparse dictionaries (SAEs, transcoders) as the prisms read them.

A :class:`Dictionary` encodes what a model recorded at one hook into feature activations and
decodes them into the value recorded at its output hook:

    pre = (x_in * input_scale - [b_dec]) @ W_enc + b_enc      (``b_dec`` only when
                                                               ``subtract_b_dec``)
    a   = act(pre)                                           (ReLU, JumpReLU, TopK, BatchTopK)
    x_hat = (a @ W_dec + b_dec) / input_scale  +  x_in @ W_skip    (skip: transcoders only)

An SAE reads and writes the same hook; a transcoder reads the MLP's input
(``blocks.L.ln2.hook_normalized``, circuit-tracer's ``mlp.hook_in``, or the raw
``hook_resid_mid``) and writes ``hook_mlp_out``. Weights are kept as given (``W_enc
[d_in, d_sae]``, ``W_dec [d_sae, d_out]``); the prisms compute in the cache's dtype.

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

__all__ = ["Dictionary", "ACTIVATIONS"]

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
            ``"blocks.6.hook_mlp_out"``.
        input_hook: where it reads (transcoders), e.g. ``"blocks.6.ln2.hook_normalized"``;
            default ``hook``.
        activation: ``"relu"``, ``"jumprelu"``, ``"topk"`` or ``"batchtopk"``.
        threshold: JumpReLU's threshold (a number or ``[d_sae]``); BatchTopK's inference
            threshold.
        k: TopK/BatchTopK's ``k``.
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
        subtract_b_dec: bool = False,
        input_scale: float = 1.0,
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
        self.hook, self.site, self.layer = _site(hook, "hook", caller)
        if self.site not in _OUTPUT_SITES:
            raise ArgumentError(
                f"{caller}: hook={hook!r} is a place to read, not a write to reconstruct; "
                "a dictionary reconstructs a residual stream, an attention output or an MLP "
                "output (pass the place it reads as input_hook)."
            )
        if input_hook is None:
            self.input_hook, self.input_site, input_layer = self.hook, self.site, self.layer
        else:
            self.input_hook, self.input_site, input_layer = _site(input_hook, "input_hook", caller)
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
            if isinstance(threshold, (int, float)) and not isinstance(threshold, bool):
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
        if not isinstance(subtract_b_dec, bool):
            raise ArgumentError(f"{caller}: subtract_b_dec={subtract_b_dec!r}; pass True/False.")
        if subtract_b_dec and d_in != d_out:
            raise ArgumentError(
                f"{caller}: subtract_b_dec=True needs d_in == d_out (an SAE); got {d_in} "
                f"and {d_out}."
            )
        self.subtract_b_dec = subtract_b_dec
        if (
            isinstance(input_scale, bool)
            or not isinstance(input_scale, (int, float))
            or not input_scale > 0
            or input_scale == float("inf")
        ):
            raise ArgumentError(f"{caller}: input_scale={input_scale!r}; pass a number > 0.")
        self.input_scale = float(input_scale)
        self.W_skip: Optional[Tensor] = None
        if W_skip is not None:
            self.W_skip = _tensor(W_skip, "W_skip", caller, 2)
            if tuple(self.W_skip.shape) != (d_in, d_out):
                raise ArgumentError(
                    f"{caller}: W_skip has shape {tuple(self.W_skip.shape)}; it maps the "
                    f"input to the output: [{d_in}, {d_out}] (x_in @ W_skip)."
                )
        self.name = name if isinstance(name, str) else f"L{self.layer}"
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
            return out.scatter_(-1, top.indices, torch.relu(top.values))
        flat = pre.reshape(-1)  # batchtopk: the k * rows largest over all rows
        rows = max(1, flat.numel() // pre.shape[-1])
        k = min(self.k * rows, flat.numel())
        top = flat.topk(k)
        out = torch.zeros_like(flat).scatter_(0, top.indices, torch.relu(top.values))
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

    def check_model(self, view: Any, caller: str) -> None:
        """Refuse a dictionary that does not fit this model (sizes, layer, site)."""
        if self.layer >= view.n_layers:
            raise ArgumentError(
                f"{caller}: dictionary {self.name} sits at {self.hook!r}, but the model has "
                f"{view.n_layers} layers; it was made for another model."
            )
        for what, d in (("input", self.d_in), ("output", self.d_out)):
            if d != view.d_model:
                raise ArgumentError(
                    f"{caller}: dictionary {self.name} has d_{'in' if what == 'input' else 'out'}"
                    f"={d} ({what} size) but the model has d_model={view.d_model}; it was "
                    "made for another model (or a per-head z site, which tlprisms does not "
                    "read)."
                )
        for site in {self.site, self.input_site}:
            has = (
                view.has_site(Site.MLP_OUT, self.layer)
                if site is Site.LN2_NORMALIZED
                else view.has_site(site, self.layer)
            )
            if not has:
                raise ArgumentError(
                    f"{caller}: dictionary {self.name} sits at "
                    f"{self.input_hook if site is self.input_site else self.hook!r}, which "
                    f"this model does not have ({view.describe()}: attention-only or parallel "
                    "blocks have no MLP input stream)."
                )

    def __repr__(self) -> str:
        kind = "transcoder" if self.transcoder else "features"
        where = self.hook if not self.transcoder else f"{self.input_hook} -> {self.hook}"
        return f"Dictionary({self.d_sae} {kind}, {self.activation}, {where})"

    # ------------------------------------------------------------------ loaders
    @classmethod
    @check.entry
    def from_saelens(cls, sae: Any, *, hook: Optional[str] = None) -> "Dictionary":
        """From a SAELens ``SAE`` object (duck-typed: ``W_enc``, ``b_enc``, ``W_dec``,
        ``b_dec``, ``cfg``; SAELens is not imported). Gated SAEs are refused."""
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
        threshold = getattr(sae, "threshold", None)
        tensors = {
            "W_enc": sae.W_enc,
            "b_enc": sae.b_enc,
            "W_dec": sae.W_dec,
            "b_dec": sae.b_dec,
        }
        if threshold is not None:
            tensors["threshold"] = threshold
        return _from_saelens_parts(cfg_dict, tensors, hook, caller)

    @classmethod
    @check.entry
    def from_saelens_folder(cls, path: _PathLike, *, hook: Optional[str] = None) -> "Dictionary":
        """From a SAELens-format folder: ``cfg.json`` + ``sae_weights.safetensors``."""
        caller = "Dictionary.from_saelens_folder"
        folder = _folder(path, ("cfg.json", "sae_weights.safetensors"), caller)
        cfg = json.loads((folder / "cfg.json").read_text())
        return _from_saelens_parts(
            cfg, _load_safetensors(folder / "sae_weights.safetensors"), hook, caller
        )

    @classmethod
    @check.entry
    def from_gemma_scope(
        cls, path: _PathLike, hook: str, *, input_hook: Optional[str] = None
    ) -> "Dictionary":
        """From a Gemma Scope ``params.npz`` (JumpReLU: ``W_enc [d_model, d_sae]``,
        ``W_dec``, ``b_enc``, ``b_dec``, ``threshold``). The file does not say where it
        sits: pass ``hook`` (and ``input_hook`` for a transcoder)."""
        import numpy as np

        caller = "Dictionary.from_gemma_scope"
        file = Path(path)
        if not file.is_file():
            raise ArgumentError(f"{caller}: no file at {str(path)!r}; pass a params.npz path.")
        with np.load(file) as params:
            p = {k: torch.from_numpy(np.asarray(params[k], dtype=np.float32)) for k in params}
        _need(p, ("W_enc", "b_enc", "W_dec", "b_dec"), str(file), caller)
        return cls(
            p["W_enc"],
            p["b_enc"],
            p["W_dec"],
            p["b_dec"],
            hook,
            input_hook=input_hook,
            activation="jumprelu" if "threshold" in p else "relu",
            threshold=p.get("threshold"),
            W_skip=p.get("W_skip"),
            name=f"GemmaScope {file.parent.name}",
        )

    @classmethod
    @check.entry
    def from_circuit_tracer(cls, path: _PathLike) -> list["Dictionary"]:
        """One transcoder per layer from circuit-tracer's layout: a folder with
        ``config.yaml`` (``feature_input_hook``, ``feature_output_hook``, e.g.
        ``hook_resid_mid`` / ``hook_mlp_out``, relative to each block) and
        ``layer_{i}.safetensors`` (``W_enc``, ``b_enc``, ``W_dec``, ``b_dec``, optional
        ``W_skip`` as ``x @ W_skip.T``, optional ``threshold``). ``W_enc`` may be stored as
        ``[d_sae, d_model]`` and ``W_dec`` as ``[d_model, d_sae]``; both are read by shape."""
        caller = "Dictionary.from_circuit_tracer"
        folder = _folder(path, ("config.yaml",), caller)
        cfg = _read_yaml(folder / "config.yaml", caller)
        hooks = {}
        for key in ("feature_input_hook", "feature_output_hook"):
            value = cfg.get(key)
            if not isinstance(value, str):
                raise ArgumentError(
                    f"{caller}: {folder / 'config.yaml'} has no {key}; circuit-tracer's "
                    "config names feature_input_hook and feature_output_hook."
                )
            hooks[key] = value
        files = sorted(folder.glob("layer_*.safetensors"), key=lambda f: int(f.stem.split("_")[1]))
        if not files:
            raise ArgumentError(f"{caller}: no layer_{{i}}.safetensors in {str(folder)!r}.")
        out = []
        for f in files:
            layer = int(f.stem.split("_")[1])
            p = _load_safetensors(f)
            _need(p, ("W_enc", "b_enc", "W_dec", "b_dec"), str(f), caller)
            d_sae = p["b_enc"].shape[0]
            W_enc = p["W_enc"] if p["W_enc"].shape[1] == d_sae else p["W_enc"].T
            W_dec = p["W_dec"] if p["W_dec"].shape[0] == d_sae else p["W_dec"].T
            th = p.get("threshold", p.get("activation_function.threshold"))
            skip = p.get("W_skip")
            out.append(
                cls(
                    W_enc,
                    p["b_enc"],
                    W_dec,
                    p["b_dec"],
                    block_hook_name(layer, hooks["feature_output_hook"]),
                    input_hook=block_hook_name(layer, hooks["feature_input_hook"]),
                    activation="jumprelu" if th is not None else "relu",
                    threshold=th,
                    W_skip=None if skip is None else skip.T,
                    name=f"L{layer}",
                )
            )
        return out


# ----------------------------------------------------------------------------- helpers
def _site(hook: Any, what: str, caller: str) -> tuple[str, Site, int]:
    parsed = parse_block_hook(hook) if isinstance(hook, str) else None
    if parsed is None:
        raise ArgumentError(
            f"{caller}: {what}={hook!r} is not a hook a dictionary can sit at; pass a block "
            f"hook name 'blocks.L.<name>' with <name> one of {', '.join(DICTIONARY_HOOKS)}."
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


def _load_safetensors(file: Path) -> dict:
    from safetensors.torch import load_file

    return {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(file)).items()}


def _need(p: Mapping, keys: tuple, where: str, caller: str) -> None:
    missing = [k for k in keys if k not in p]
    if missing:
        raise ArgumentError(
            f"{caller}: {where} lacks {', '.join(missing)} (has {', '.join(sorted(p))})."
        )


def _read_yaml(file: Path, caller: str) -> dict:
    text = file.read_text()
    try:
        import yaml

        data = yaml.safe_load(text)
    except ImportError:  # flat "key: value" lines are all this loader reads
        data = {}
        for line in text.splitlines():
            key, sep, value = line.partition(":")
            if sep and not line.startswith((" ", "-", "#")):
                data[key.strip()] = value.strip().strip("\"'") or None
    if not isinstance(data, dict):
        raise ArgumentError(f"{caller}: {str(file)!r} is not a YAML mapping.")
    return data


def _from_saelens_parts(cfg: dict, p: dict, hook: Optional[str], caller: str) -> "Dictionary":
    meta = cfg.get("metadata") or {}
    hook = hook or cfg.get(HOOK_NAME_KEY) or meta.get(HOOK_NAME_KEY)
    if not isinstance(hook, str):
        raise ArgumentError(f"{caller}: the config names no hook; pass hook=.")
    arch = str(cfg.get("architecture") or "standard").lower()
    act_name = str(cfg.get("activation_fn") or cfg.get("activation_fn_str") or "relu").lower()
    kwargs = cfg.get("activation_fn_kwargs") or {}
    k = cfg.get("k") or kwargs.get("k")
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
    if (cfg.get("reshape_activations") or "none") != "none":
        raise ArgumentError(
            f"{caller}: an SAE on {cfg.get('reshape_activations')!r} (per-head z) is not "
            "supported; tlprisms reads dictionaries on d_model-sized sites."
        )
    norm = cfg.get("normalize_activations") or "none"
    if norm not in ("none", None):
        raise ArgumentError(
            f"{caller}: normalize_activations={norm!r}: the scaling is not in the weights. "
            "Fold it into the SAE first (SAELens: sae.fold_activation_norm_scaling_factor), "
            "or build Dictionary(..., input_scale=factor)."
        )
    threshold = p.get("threshold")
    if threshold is None and "log_threshold" in p:
        threshold = torch.exp(p["log_threshold"])
    if activation == "jumprelu" and threshold is None:
        raise ArgumentError(f"{caller}: a JumpReLU SAE without a threshold tensor.")
    _need(p, ("W_enc", "b_enc", "W_dec", "b_dec"), "the weights", caller)
    return Dictionary(
        p["W_enc"],
        p["b_enc"],
        p["W_dec"],
        p["b_dec"],
        hook,
        activation=activation,
        threshold=threshold if activation in ("jumprelu", "batchtopk") else None,
        k=int(k) if activation in ("topk", "batchtopk") and k is not None else None,
        subtract_b_dec=bool(cfg.get("apply_b_dec_to_input", False)),
        name=str(cfg.get("neuronpedia_id") or meta.get("neuronpedia_id") or hook),
    )
