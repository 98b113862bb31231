"""The one tolerance and completeness policy every prism's result passes before it is returned.

Two checks, both on values the prism has already computed:

* **finite**: NaN or infinity in any term, or in what the terms explain, is refused
  (:class:`~tlprisms.errors.NonFiniteError`, naming the hook that holds it);
* **structural completeness**: the terms must add up to what they explain, and each split
  layer's parts to its whole write, within ``rtol * (sum |terms| + |explained| + 1)``: a
  structural bound (hooks edited the cache, or an architecture writes to the residual stream
  in a way tlprisms does not know), far looser than the rounding bound that
  :meth:`~tlprisms.Decomposition.check` applies (see :func:`tlprisms._core.result.tolerance`).

The model's logits, when given, must be the cache's: the top logit at the last position is
compared with the frozen readout of the cache within :data:`LOGITS_RTOL`.
"""

from typing import Optional

import torch
from torch import Tensor

from tlprisms._core.errors import CompletenessError
from tlprisms._seam import CacheView

__all__ = [
    "STRUCTURAL_RTOL",
    "STRUCTURAL_RTOL_LOWP",
    "LOGITS_RTOL",
    "FLOAT64_LOGITS_RTOL",
    "refuse_broken",
]

#: internal consistency tolerance (relative to the sum of |terms|) before a result is refused
STRUCTURAL_RTOL = {torch.float32: 1e-4, torch.float64: 1e-6}  # models may norm in float32
#: the same for bf16/fp16 caches
STRUCTURAL_RTOL_LOWP = 3e-2
#: the model's logits must match the cache's final readout to this (relative, at the last
#: position), keyed by whether the cache is in low precision
LOGITS_RTOL = {False: 1e-3, True: 5e-2}
#: a float64 model's logits match the float64 readout to this when it computed in float64
FLOAT64_LOGITS_RTOL = 1e-12


def refuse_broken(
    cv: CacheView,
    values: Tensor,
    explained: Tensor,
    layer_gap: Optional[Tensor] = None,
    sums: Optional[tuple[Optional[Tensor], Tensor]] = None,
) -> None:
    """Refuse a result that is not finite, or whose parts do not add up (a structural
    problem, not rounding). ``layer_gap``: each split layer's parts minus its whole write
    (None: nothing was split against a whole). ``sums``: ``(sum |values|, sum values)`` over
    the components when the caller has them, else they are computed here. ``sum |values|``
    may be None: the sum alone shows NaN/inf in any term, and a gap within
    ``rtol * (|explained| + 1)`` passes the full bound too (which adds ``sum |values|`` to the
    scale), so the second pass over the terms is made only when that smaller bound fails."""
    if layer_gap is None:
        layer_gap = torch.zeros_like(explained)
    if sums is None:
        sums = (torch.linalg.vector_norm(values, 1, -1), values.sum(-1))
    l1, total = sums  # NaN/inf in any term makes l1 (and the sum) non-finite
    finite = total if l1 is None else l1
    if not bool(torch.isfinite(finite).all()) or not bool(torch.isfinite(explained).all()):
        cv.refuse_nonfinite("the decomposition")
    rtol = STRUCTURAL_RTOL_LOWP if cv.low_precision else STRUCTURAL_RTOL[cv.dtype]
    if l1 is None:
        least = explained.abs() + 1.0
        if not bool(((total - explained).abs() > rtol * least).any()) and not bool(
            (layer_gap.abs().amax(-1) > rtol * least.amax(-1)).any()
        ):
            return
        l1 = torch.linalg.vector_norm(values, 1, -1)
        if not bool(torch.isfinite(l1).all()):
            cv.refuse_nonfinite("the decomposition")
    scale = l1 + explained.abs() + 1.0
    gap = (total - explained).abs()
    if bool((gap > rtol * scale).any()) or bool(
        (layer_gap.abs().amax(-1) > rtol * scale.amax(-1)).any()
    ):
        raise CompletenessError(
            f"{cv.caller}: the terms do not add up to what they explain (gap up to "
            f"{float(gap.max()):.3g}; split-layer gap up to "
            f"{float(layer_gap.abs().max()):.3g})."
            " The cache was probably edited by hooks, or this architecture "
            f"({cv.view.describe()}) writes to the residual stream in a way tlprisms does "
            "not know. Nothing was returned; please report the model config."
        )
