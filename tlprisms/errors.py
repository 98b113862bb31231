"""The public exception hierarchy (all derive from :class:`PrismError`).

>>> from tlprisms.errors import PositionError, PrismError
>>> issubclass(PositionError, PrismError) and issubclass(PositionError, IndexError)
True
"""

from tlprisms._core.errors import (
    ArgumentError,
    CacheError,
    CompletenessError,
    NonFiniteError,
    PositionError,
    PrismError,
    TargetError,
    UnsupportedModelError,
    VerificationError,
)

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
