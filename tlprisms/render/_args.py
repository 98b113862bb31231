"""Argument checks of the rendering layer, on top of :mod:`tlprisms._core.arguments`.

Types are checked, never coerced: a bool is not a number, a string is not a list of labels,
a float is not an index. Every refusal is an :class:`~tlprisms.errors.ArgumentError` that
names the call, what came, what is expected and the fix.
"""

import numbers
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from tlprisms._core.errors import ArgumentError

__all__ = [
    "describe",
    "flag",
    "text",
    "real",
    "labels",
    "numbers_array",
    "mapping",
    "out_path",
    "write",
]


def describe(value: Any) -> str:
    """``value`` for a message: its repr (shortened) and its type."""
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def flag(value: Any, what: str, caller: str, optional: bool = False) -> Optional[bool]:
    """A bool (``None`` too when ``optional``); 0/1 and strings are not read as flags."""
    if value is None and optional:
        return None
    if not isinstance(value, (bool, np.bool_)):
        also = " or None" if optional else ""
        raise ArgumentError(f"{caller}: {what} must be True or False{also}, got {describe(value)}.")
    return bool(value)


def text(value: Any, what: str, caller: str, optional: bool = False) -> Optional[str]:
    """A string (``None`` too when ``optional``)."""
    if value is None and optional:
        return None
    if not isinstance(value, str):
        also = " or None" if optional else ""
        raise ArgumentError(
            f"{caller}: {what} must be a string{also}, got {describe(value)}; pass text, "
            f"e.g. {what}='...'."
        )
    return value


def real(value: Any, what: str, caller: str, optional: bool = False) -> Optional[float]:
    """A real number (int, float, numpy scalar or 0-d tensor; not a bool) as a float."""
    if value is None and optional:
        return None
    ok = not isinstance(value, (bool, np.bool_)) and (
        isinstance(value, numbers.Real)
        or (
            isinstance(value, torch.Tensor)
            and value.ndim == 0
            and value.dtype != torch.bool
            and not value.dtype.is_complex
        )
    )
    if not ok:
        also = " or None" if optional else ""
        raise ArgumentError(f"{caller}: {what} must be a number{also}, got {describe(value)}.")
    return float(value)


def labels(value: Any, n: Optional[int], what: str, per: str, caller: str) -> list:
    """A list of labels, one per ``per`` when ``n`` is given; a string is not a list."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ArgumentError(
            f"{caller}: {what} must be a list of labels, one per {per}, got {describe(value)}"
            + ("; wrap a single label in a list." if isinstance(value, (str, bytes)) else ".")
        )
    out = list(value)
    if n is not None and len(out) != n:
        raise ArgumentError(
            f"{caller}: got {len(out)} {what} for {n} {per}s; pass one label per {per}."
        )
    return out


def numbers_array(value: Any, what: str, caller: str, shape: str) -> np.ndarray:
    """``value`` (numpy, torch, nested lists of numbers) as a float64 array."""
    if isinstance(value, (str, bytes)):
        raise ArgumentError(f"{caller}: {what} must be numbers {shape}, got {describe(value)}.")
    try:
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu()
            value = value.float() if value.dtype == torch.bfloat16 else value
            value = value.numpy()
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ArgumentError(
            f"{caller}: {what} must be numbers {shape} (a numpy array, a tensor or nested "
            f"lists), got {describe(value)}: {e}"
        ) from e


def mapping(value: Any, what: str, caller: str, example: str) -> Mapping:
    if not isinstance(value, Mapping):
        raise ArgumentError(
            f"{caller}: {what} must be a dict, e.g. {example}; got {describe(value)}."
        )
    return value


def out_path(path: Any, caller: str) -> Path:
    """The file ``path`` names, refused when it is a directory or lies under a file."""
    if isinstance(path, bytes) or not isinstance(path, (str, os.PathLike)):
        raise ArgumentError(
            f"{caller}: path must be a str or pathlib.Path, got {describe(path)}; pass e.g. "
            "'report.html'."
        )
    p = Path(path)
    if p.is_dir():
        raise ArgumentError(
            f"{caller}: cannot write {str(p)!r}: it is a directory; pass a file path, e.g. "
            f"{str(p / ('view' + (p.suffix or '.html')))!r}."
        )
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ArgumentError(
                    f"{caller}: cannot write {str(p)!r}: {str(parent)!r} is a file, not a "
                    "directory; pass a path in a directory."
                )
            break
    return p


def write(path: Any, content: str, caller: str) -> Path:
    """Write ``content`` (UTF-8) to ``path``, creating its directories; OS errors name it."""
    p = out_path(path, caller)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(content, encoding="utf-8")
    except OSError as e:
        raise ArgumentError(
            f"{caller}: cannot write {str(p)!r}: {e.strerror or e}; pass a path in a "
            "writable directory."
        ) from e
    return p
