"""The exceptions tlprisms raises.

Every error names the call, what was expected, what came, and how to fix it. All of them
derive from :class:`PrismError`, so ``except tlprisms.PrismError`` catches any refusal.
"""

__all__ = [
    "PrismError",
    "CacheError",
    "TargetError",
    "PositionError",
    "UnsupportedModelError",
    "CompletenessError",
]


class PrismError(Exception):
    """Base class of every error tlprisms raises on purpose."""


class CacheError(PrismError, KeyError):
    """The cache lacks a needed hook, or was recorded from another model or input."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""


class TargetError(PrismError, ValueError):
    """A target is unknown, not a single token, or does not fit the batch."""


class PositionError(PrismError, IndexError):
    """A position is out of range or does not fit the batch."""


class UnsupportedModelError(PrismError, TypeError):
    """The model's architecture cannot be decomposed exactly by these prisms."""


class CompletenessError(PrismError, AssertionError):
    """The terms of a decomposition do not add up to what it explains."""
