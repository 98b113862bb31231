"""The public exception hierarchy (all derive from :class:`PrismError`)."""

from tlprisms._errors import (ArgumentError, CacheError, CompletenessError, NonFiniteError,
                              PositionError, PrismError, TargetError, UnsupportedModelError)

__all__ = ["PrismError", "ArgumentError", "CacheError", "TargetError", "PositionError",
           "NonFiniteError", "UnsupportedModelError", "CompletenessError"]
