"""The public exception hierarchy (all derive from :class:`PrismError`)."""

from tlprisms._errors import (CacheError, CompletenessError, PositionError, PrismError,
                              TargetError, UnsupportedModelError)

__all__ = ["PrismError", "CacheError", "TargetError", "PositionError",
           "UnsupportedModelError", "CompletenessError"]
