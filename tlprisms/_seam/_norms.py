"""Normalisations frozen at their cached scale, read from either TransformerLens model class."""

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from tlprisms._core.errors import UnsupportedModelError
from tlprisms._seam._hooks import Site

__all__ = ["NormSpec", "read_norm", "param"]


def param(module: Any, *names: str) -> Optional[Tensor]:
    """The first of ``names`` that is a tensor attribute of ``module``, or None."""
    for name in names:
        try:
            value = getattr(module, name)
        except AttributeError:
            continue
        if isinstance(value, Tensor):
            return value
    return None


@dataclass(frozen=True)
class NormSpec:
    """One normalisation, frozen at its cached scale: ``w * P(x) / s + b``.

    Attributes:
        name: a readable name for messages, e.g. ``"ln1 of layer 3"``.
        site: the :class:`~tlprisms._seam._hooks.Site` of its cached scale.
        layer: its layer (None for the final norm).
        centred: LayerNorm-type (subtract the mean over ``d_model``) or RMS-type.
        weight: the effective per-dimension weight (``1 + w`` already applied for Gemma), or
            ``None`` when the norm has no weight (folded ``LNPre``/``RMSPre``).
        bias: the bias, or ``None``.
        has_scale: False only for models with no normalisation at all.
    """

    name: str
    site: Site
    layer: Optional[int]
    centred: bool
    weight: Optional[Tensor]
    bias: Optional[Tensor]
    has_scale: bool = True

    def pull_back(self, u: Tensor) -> Tensor:
        """The readout on the norm's input for a readout ``u`` on its output, times ``s``.

        Returns ``P(w * u)``; divide by the cached scale to finish the pull-back.
        """
        if self.weight is not None:
            u = u * self.weight.to(u.device, u.dtype)
        if self.centred:
            u = u - u.mean(-1, keepdim=True)
        return u

    def apply(
        self, x: Tensor, scale: Optional[Tensor] = None, eps: float = 1e-5, bias: bool = True
    ) -> Tensor:
        """The norm itself, ``w * P(x) / s + b``, with ``s`` the given (cached) scale, or
        computed from ``x`` when ``scale`` is None; ``bias=False`` leaves ``b`` out (the
        map of one write through a frozen norm)."""
        if self.centred:
            x = x - x.mean(-1, keepdim=True)
        if self.has_scale:
            s = (x.pow(2).mean(-1, keepdim=True) + eps).sqrt() if scale is None else scale
            x = x / s.to(x.device, x.dtype)
        if self.weight is not None:
            x = x * self.weight.to(x.device, x.dtype)
        if bias and self.bias is not None:
            x = x + self.bias.to(x.device, x.dtype)
        return x

    def constant(self, u: Tensor) -> Tensor:
        """``b . u``: what the norm's bias adds to a readout ``u`` on its output."""
        if self.bias is None:
            return torch.zeros(u.shape[:-1], dtype=u.dtype, device=u.device)
        return u @ self.bias.to(u.device, u.dtype)


def read_norm(module: Any, name: str, site: Site, layer: Optional[int]) -> NormSpec:
    """The effective affine map of one normalisation module of either TL model class."""
    cls = type(module).__name__
    if module is None or cls == "Identity":
        return NormSpec(
            name=name,
            site=site,
            layer=layer,
            centred=False,
            weight=None,
            bias=None,
            has_scale=False,
        )
    # HookedTransformer (TL <= 3): weights already in "effective" form (Gemma's +1 applied).
    if cls == "LayerNormPre":
        return NormSpec(name=name, site=site, layer=layer, centred=True, weight=None, bias=None)
    if cls == "RMSNormPre":
        return NormSpec(name=name, site=site, layer=layer, centred=False, weight=None, bias=None)
    if cls == "LayerNorm":
        return NormSpec(
            name=name,
            site=site,
            layer=layer,
            centred=True,
            weight=module.w.detach(),
            bias=module.b.detach(),
        )
    if cls == "RMSNorm":
        return NormSpec(
            name=name, site=site, layer=layer, centred=False, weight=module.w.detach(), bias=None
        )
    # TransformerBridge components.
    if cls in ("LayerNormPreBridge",):
        return NormSpec(name=name, site=site, layer=layer, centred=True, weight=None, bias=None)
    if cls in ("RMSNormPreBridge",):
        return NormSpec(name=name, site=site, layer=layer, centred=False, weight=None, bias=None)
    if "NormalizationBridge" in cls:
        rms = bool(getattr(module, "uses_rms_norm", "RMS" in cls))
        original = getattr(module, "original_component", None)
        weight = param(original, "weight") if original is not None else None
        if weight is None:
            weight = param(module, "weight")
        if hasattr(module, "uses_weight_offset"):
            offset = bool(module.uses_weight_offset)
        else:
            offset = rms and bool(getattr(module.config, "rmsnorm_uses_offset", False))
            # LayerNorm1P (Nemotron) multiplies by 1 + w; TransformerLens 3.x does not say so
            offset = offset or type(original).__name__.endswith("LayerNorm1P")
        if weight is not None:
            weight = weight.detach()
            if offset:
                weight = 1.0 + weight.float()
        bias = None
        if not rms and original is not None:
            b = param(original, "bias")
            bias = None if b is None else b.detach()
        return NormSpec(
            name=name, site=site, layer=layer, centred=not rms, weight=weight, bias=bias
        )
    raise UnsupportedModelError(
        f"tlprisms cannot freeze the normalisation '{name}' of type {cls}: only LayerNorm, "
        "LayerNormPre, RMSNorm and RMSNormPre (HookedTransformer) and their TransformerBridge "
        "counterparts are supported. Load the model with one of these normalisations."
    )
