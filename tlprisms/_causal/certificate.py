"""The result of :meth:`LogitPrism.verify`: checked terms next to their interventions.

A :class:`Verification` holds, for each checked term, the change of the explained value that
removing its write caused (``-term`` when the prism is exact), the error and the bound it
had to meet. ``str()`` is a one-line certificate; :meth:`Verification.check` raises
:class:`~tlprisms.errors.VerificationError` unless every term matched and the result adds up.
How the interventions are made is in :mod:`tlprisms._causal.verify`.
"""

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from beartype import beartype
from jaxtyping import Bool, Float, Int, jaxtyped
from torch import Tensor

from tlprisms._core import views
from tlprisms._core.errors import VerificationError
from tlprisms._core.table import ComponentTable

__all__ = ["Verification"]


@jaxtyped(typechecker=beartype)
@dataclass(frozen=True, eq=False)
class Verification:
    """The outcome of :meth:`LogitPrism.verify`: each checked term next to the change its
    removal caused. ``str()`` reads as a one-line certificate; :meth:`check` raises
    :class:`~tlprisms.errors.VerificationError` unless ``ok``.

    Attributes:
        ok: every checked term matched its intervention, and the result adds up.
        terms: the checked terms, ``[n]``.
        change: the change of the explained value when the term's write was removed, ``[n]``
            (``-terms`` when exact).
        error: ``|terms + change|``, ``[n]``.
        bound: the largest error accepted for each term, ``[n]``.
        explained: the explained value each term belongs to, ``[n]``.
        batch, pos, target: where each term is: batch row, explained position, target index.
        components: each term's component.
        sampled: False for the ``k`` largest terms, True for the random sample.
        target_labels: each term's target, as the result names it.
        skipped: why terms were not checked, and how many (constants, sums over layers).
        sum_gap: ``max |total - explained|`` of the result (NaN for a selection).
        sum_ok: the result's terms add up within its completeness tolerance.
        explains / prism: copied from the result.
        forward_passes: how many forward passes the interventions took.
        constants_checked: how many constant terms (``b_U``, ``ln_final.b``) were compared
            with their values from the weights.
        constants_error: their largest error, relative to ``max(1, |explained|, sum
            |terms|)``.
        constants_ok: they matched.
        sums_checked: how many of the checked terms (the last ones) are sums of a result's
            terms rather than terms of it: a QK result's row of one query-side writer
            (``q:a x k:whole``) or column of one key-side writer, each against the removal
            of that writer alone.
    """

    ok: bool
    terms: Float[Tensor, "n"]
    change: Float[Tensor, "n"]
    error: Float[Tensor, "n"]
    bound: Float[Tensor, "n"]
    explained: Float[Tensor, "n"]
    batch: Int[Tensor, "n"]
    pos: Int[Tensor, "n"]
    target: Int[Tensor, "n"]
    components: ComponentTable
    sampled: Bool[Tensor, "n"]
    target_labels: np.ndarray
    skipped: dict
    sum_gap: float
    sum_ok: bool
    explains: str
    prism: str
    forward_passes: int
    constants_checked: int = 0
    constants_error: float = 0.0
    constants_ok: bool = True
    sums_checked: int = 0

    @property
    def max_error(self) -> float:
        """The largest ``|term + change|`` (0 when nothing was checked)."""
        return float(self.error.max()) if self.error.numel() else 0.0

    @property
    def max_relative_error(self) -> float:
        """The largest error relative to its explained value, ``|error| / max(1, |explained|)``."""
        if not self.error.numel():
            return 0.0
        return float((self.error / self.explained.abs().clamp(min=1.0)).max())

    @property
    def failed(self) -> Bool[Tensor, "n"]:
        """Which checked terms missed their intervention."""
        return ~(self.error <= self.bound)

    def check(self) -> "Verification":
        """Raise :class:`~tlprisms.errors.VerificationError` unless ``ok``; return self."""
        if not self.ok:
            raise VerificationError(
                f"verify: {self}. The terms were changed after the prism "
                "made them, or the model was changed since the cache was "
                "recorded; see .to_frame() for every checked term."
            )
        return self

    # ------------------------------------------------------------------ text
    def checked_terms(self) -> str:
        """How many terms were checked: ``"3 largest + 2 sampled terms"``."""
        n_top = int((~self.sampled).sum()) - self.sums_checked
        n_sampled = int(self.sampled.sum())
        sums = self.sums_checked
        extra = f" + {sums} row/column sum{'' if sums == 1 else 's'}" if sums else ""
        return f"{n_top} largest + {n_sampled} sampled terms{extra}"

    def __str__(self) -> str:
        text = self._text()
        unchecked = {w: n for w, n in self.skipped.items()}
        if unchecked:
            text += f" (not checked: {self._skipped()})"
        return text

    def _text(self) -> str:
        if not self.constants_ok:
            return (
                f"FAILED: {self.constants_checked} constant terms (b_U, ln_final.b) differ from "
                "their values computed from the weights (relative error "
                f"{self.constants_error:.2g}): the terms were changed after the prism made them"
            )
        if not self.ok:
            bad = self.failed
            if bool(bad.any()):
                i = (
                    int(torch.nonzero(bad)[0])
                    if bad.sum() == 1
                    else int((self.error - self.bound).argmax())
                )
                return (
                    f"FAILED: {int(bad.sum())} of {self.terms.numel()} terms differ from "
                    f"their intervention; worst {self.components[i]} (batch "
                    f"{int(self.batch[i])}, pos {int(self.pos[i])}, target "
                    f"{self.target_labels[i]}): term {float(self.terms[i]):.4g}, removing it "
                    f"changed the {self.explains} by {float(self.change[i]):.4g} (error "
                    f"{float(self.error[i]):.2g} > bound {float(self.bound[i]):.2g})"
                )
            return (
                f"FAILED: the terms do not add up to the {self.explains} (gap "
                f"{self.sum_gap:.3g}), although {self.checked_terms()} matched their "
                "interventions"
            )
        if not self.terms.numel():
            return "no term could be checked by intervention"
        i = int(self.error.argmax())
        consts = (
            f" and {self.constants_checked} constant term"
            f"{'' if self.constants_checked == 1 else 's'} against the weights"
            if self.constants_checked
            else ""
        )
        return (
            f"{self.checked_terms()} verified by intervention{consts}, max error "
            f"{self.max_error:.1g} of {'an' if self.explains[:1] in 'aeiou' else 'a'} "
            f"{self.explains} of {float(self.explained[i]):.3g}"
        )

    def _skipped(self) -> str:
        return "; ".join(f"{n} {why}" for why, n in self.skipped.items()) or "none skipped"

    def __repr__(self) -> str:
        lines = [
            f"Verification({self.prism}: {self}",
            f"  {self.forward_passes} forward passes; not intervened on: {self._skipped()}",
        ]
        order = torch.argsort(self.error - self.bound, descending=True)[:5]
        for i in order.tolist():
            lines.append(
                f"    {str(self.components[i]):<24} term {float(self.terms[i]):+.4g}"
                f"  change {float(self.change[i]):+.4g}  error "
                f"{float(self.error[i]):.2g}"
            )
        return "\n".join(lines) + ")"

    def to_frame(self) -> Any:
        """One row per checked term: ``component``, its fields, ``batch``, ``pos``,
        ``target``, ``selected`` (``"top"``/``"sample"``, ``"sum"`` for a QK row or
        column sum), ``term``, ``change``, ``error``, ``bound``, ``ok``; a QK result's also
        has each side's fields (``q_kind`` ... ``k_src``)."""
        import pandas as pd

        c = self.components
        return pd.DataFrame(
            {
                "component": [str(x) for x in c],
                "kind": c.kinds(),
                "layer": c.layer,
                "head": c.head,
                "neuron": c.neuron,
                "src": c.src,
                "at": c.at,
                "batch": self.batch.numpy(),
                "pos": self.pos.numpy(),
                "target": self.target_labels,
                "selected": np.where(
                    np.arange(len(self.sampled)) >= len(self.sampled) - self.sums_checked,
                    "sum",
                    np.where(self.sampled.numpy(), "sample", "top"),
                ),
                "term": self.terms.numpy(),
                "change": self.change.numpy(),
                "error": self.error.numpy(),
                "bound": self.bound.numpy(),
                "ok": ~self.failed.numpy(),
                **(c.frame_columns(np.arange(len(c))) if c.is_pairs else {}),
            }
        )

    # ------------------------------------------------------------------ rendering
    # drawn by the views tlprisms.render registers for this type (tlprisms._core.views)
    def svg(self) -> str:
        """Each checked term against minus its measured change: on the diagonal when right."""
        return views.svg(self)

    def _repr_html_(self) -> str:
        return views.html(self)
