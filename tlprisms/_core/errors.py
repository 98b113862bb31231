"""The exceptions tlprisms raises.

Every error names the call, what was expected, what came, and how to fix it. All of them
derive from :class:`PrismError`, so ``except tlprisms.PrismError`` catches any refusal. There
is one class per kind of mistake:

========================  ==========================================================
:class:`ArgumentError`    an argument of the wrong type or value (layers, heads, k, modes)
:class:`TargetError`      a target that is unknown, not one token, or does not fit the batch
:class:`PositionError`    a position that is out of range or does not fit the batch
:class:`CacheError`       a cache that lacks a hook, or comes from another model or input
:class:`NonFiniteError`   NaN or infinity in a cache, a logit or a readout vector
:class:`UnsupportedModelError`  a model these prisms cannot decompose exactly (or its state)
:class:`CompletenessError`      terms that do not add up to what they explain
:class:`VerificationError`      terms that an intervention on the forward pass does not reproduce
========================  ==========================================================
"""

__all__ = [
    "PrismError",
    "ArgumentError",
    "CacheError",
    "TargetError",
    "PositionError",
    "NonFiniteError",
    "UnsupportedModelError",
    "CompletenessError",
    "VerificationError",
]


class PrismError(Exception):
    """Base class of every error tlprisms raises on purpose."""


class ArgumentError(PrismError, ValueError, TypeError):
    """An argument has the wrong type or value (it is checked, never coerced)."""


class CacheError(PrismError, KeyError):
    """The cache lacks a needed hook, or was recorded from another model or input."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""


class TargetError(PrismError, ValueError):
    """A target is unknown, not a single token, or does not fit the batch."""


class PositionError(PrismError, IndexError):
    """A position is out of range, not an integer, or does not fit the batch."""


class NonFiniteError(PrismError, ValueError):
    """NaN or infinity where a finite number is needed (says where it was found)."""


class UnsupportedModelError(PrismError, TypeError):
    """The model's architecture (or its state, e.g. training mode) cannot be decomposed exactly."""


class CompletenessError(PrismError, AssertionError):
    """The terms of a decomposition do not add up to what they explain."""


class VerificationError(CompletenessError):
    """Removing a term's write from the forward pass did not move the explained value by the
    term (``LogitPrism.verify(...).check()``)."""
