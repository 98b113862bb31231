"""Argument validation shared by every public entry point: checked, never coerced.

``bool`` is not an int, a float is not an index, a string is not a list of layers. Each
function raises the one error class of its kind of mistake (:class:`ArgumentError`,
:class:`PositionError`) with the call, what came, what is expected and the fix.
"""

import numbers
import typing
import warnings
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np
import torch

from tlprisms._core.errors import ArgumentError, NonFiniteError

__all__ = [
    "entry",
    "is_index",
    "is_real",
    "index",
    "real",
    "in_range",
    "layer",
    "head",
    "neuron",
    "layer_set",
    "choice",
    "count",
    "renamed",
    "finite",
    "ALL",
]

#: the value of ``heads=``/``neurons=``/``layers=`` that selects every layer
ALL = "all"

F = TypeVar("F", bound=Callable[..., Any])


def entry(fn: F) -> F:
    """Mark a public entry point: it validates its own arguments with tlprisms' errors.

    Its annotations (``Literal`` modes, unions) document what it accepts; they are excluded
    from the test run's annotation checking (``--jaxtyping-packages``) so that the tests see
    the errors users see. Shapes are still checked on every typed value it builds.
    """
    return typing.no_type_check(fn)


def is_index(value: Any) -> bool:
    """An integer that is not a bool: int, numpy integer, or a 0-d integer tensor."""
    if isinstance(value, (bool, np.bool_)):
        return False
    if isinstance(value, torch.Tensor):
        return (
            value.ndim == 0
            and not value.dtype.is_floating_point
            and value.dtype != torch.bool
            and not value.dtype.is_complex
        )
    if isinstance(value, np.ndarray):
        return value.ndim == 0 and value.dtype.kind in "iu"
    return isinstance(value, numbers.Integral)


def is_real(value: Any) -> bool:
    """A real number that is not a bool: int, float, a numpy real scalar (``np.float32``,
    ``np.int64``...) or a 0-d real tensor or array. Arrays with a shape are not numbers."""
    if isinstance(value, (bool, np.bool_)):
        return False
    if isinstance(value, torch.Tensor):
        return value.ndim == 0 and value.dtype != torch.bool and not value.dtype.is_complex
    if isinstance(value, np.ndarray):
        return value.ndim == 0 and value.dtype.kind in "iuf"
    return isinstance(value, numbers.Real)


def _show(value: Any) -> str:
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def index(value: Any, what: str, caller: str, error: type = ArgumentError) -> int:
    """``value`` as a Python int, or ``error`` naming what came."""
    if not is_index(value):
        raise error(
            f"{caller}: {what} must be an integer, got {_show(value)}; pass an int "
            "(bools, floats and strings are not read as indices)."
        )
    return int(value)


def real(value: Any, what: str, caller: str, error: type = ArgumentError) -> float:
    """``value`` as a Python float, or ``error`` naming what came (see :func:`is_real`)."""
    if not is_real(value):
        raise error(
            f"{caller}: {what} must be a number, got {_show(value)}; pass an int or a float "
            "(numpy scalars are fine; bools, strings and arrays are not numbers)."
        )
    return float(value)


def in_range(
    value: Any,
    n: int,
    what: str,
    caller: str,
    error: type = ArgumentError,
    negative: bool = True,
    of: str = "",
) -> int:
    """An index into ``n`` items (negative from the end when ``negative``), normalised."""
    i = index(value, what, caller, error)
    low = -n if negative else 0
    if not low <= i < n:
        span = f"0..{n - 1}" + (f" or -{n}..-1" if negative else "")
        raise error(
            f"{caller}: {what} {i} is out of range{of}; use {span}."
            if n > 0
            else f"{caller}: {what} {i} is out of range{of}: there are none."
        )
    return i % n


def layer(view: Any, value: Any, caller: str, what: str = "layer") -> int:
    return in_range(
        value, view.n_layers, what, caller, of=f" (the model has {view.n_layers} layers)"
    )


def head(view: Any, value: Any, caller: str) -> int:
    return in_range(
        value,
        view.n_heads,
        "head",
        caller,
        negative=False,
        of=f" (each layer has {view.n_heads} heads)",
    )


def neuron(view: Any, value: Any, caller: str) -> int:
    if view.attn_only:
        raise ArgumentError(f"{caller}: this model is attention-only; it has no neurons.")
    return in_range(
        value,
        view.d_mlp,
        "neuron",
        caller,
        negative=False,
        of=f" (each MLP layer has d_mlp={view.d_mlp} neurons)",
    )


def layer_set(
    view: Any, value: Any, what: str, caller: str, none_means_all: bool = True
) -> frozenset:
    """``"all"``, one layer, or a sequence of layers (``()`` for none) -> a set of layers.

    ``None`` meant "all layers" in tlprisms 0.1; it still does, with a DeprecationWarning.
    """
    if value is None:
        if none_means_all:
            warnings.warn(
                f"{caller}: {what}=None is deprecated; pass {what}='all' for every "
                f"layer or {what}=() for none.",
                DeprecationWarning,
                stacklevel=4,
            )
            return frozenset(range(view.n_layers))
        return frozenset()
    if isinstance(value, str):
        if value == ALL:
            return frozenset(range(view.n_layers))
        raise ArgumentError(
            f"{caller}: {what}={value!r}; pass 'all', a layer index, a list of "
            f"layer indices, or () for none (a string is not a list of layers)."
        )
    if is_index(value):
        return frozenset({layer(view, value, caller, what=f"{what} layer")})
    if isinstance(value, torch.Tensor):
        value = list(value.reshape(-1)) if value.ndim == 1 else value
    if isinstance(value, (Sequence, range, set, frozenset, np.ndarray)) and not isinstance(
        value, (bytes, str)
    ):
        return frozenset(layer(view, v, caller, what=f"{what} layer") for v in value)
    raise ArgumentError(
        f"{caller}: {what}={_show(value)}; pass 'all', a layer index, a list of "
        "layer indices, or () for none."
    )


def choice(value: Any, what: str, options: Sequence[str], caller: str) -> str:
    if not isinstance(value, str) or value not in options:
        raise ArgumentError(
            f"{caller}: {what}={value!r}; use one of {', '.join(map(repr, options))}."
        )
    return value


def count(value: Any, what: str, caller: str, minimum: int = 1) -> int:
    n = index(value, what, caller)
    if n < minimum:
        raise ArgumentError(f"{caller}: {what}={n}; use {minimum} or more.")
    return n


def renamed(caller: str, old: str, new: str, value: Any, current: Any, default: Any) -> Any:
    """Accept a 0.1 argument name for one release, with a DeprecationWarning."""
    if value is None:
        return current
    if current is not default and current != default:
        raise ArgumentError(f"{caller}: pass {new}= only ({old}= is its old name).")
    warnings.warn(f"{caller}: {old}= is deprecated; use {new}=.", DeprecationWarning, stacklevel=3)
    return value


def finite(t: torch.Tensor, what: str, caller: str) -> torch.Tensor:
    """``t`` unless it holds NaN or infinity."""
    if t.dtype.is_floating_point and not bool(torch.isfinite(t).all()):
        raise NonFiniteError(f"{caller}: {what} contains NaN or infinity; pass finite values.")
    return t
