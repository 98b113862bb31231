"""Escaping for the three places a string can land: HTML text, SVG text, and a ``<script>``.

Every token and label tlprisms renders passes through here. A token is data, never markup:
``"</script>"``, ``"<b>"`` and ``"&amp;"`` must show as those characters.
"""

import html
import json
import math
import re
import uuid
from typing import Any

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")
_SPACES = re.compile(r"^ +| +$| {2,}")


def clean(text: Any) -> str:
    """``str(text)`` made printable: control characters shown as ``\\xNN``, lone surrogates
    (bytes a tokenizer split mid-character) as U+FFFD, tab and newline as ``\\t``/``\\n``."""
    s = str(text)
    s = _SURROGATE.sub("\ufffd", s)
    s = s.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", s)


def esc(text: Any) -> str:
    """HTML/SVG-escaped printable text (also safe inside double-quoted attributes)."""
    return html.escape(clean(text), quote=True)


def label(text: Any, max_chars: int = 40) -> str:
    """A printable label, shortened with an ellipsis past ``max_chars`` (not yet escaped).

    Leading, trailing and repeated spaces become no-break spaces, so that a token's leading
    space stays visible in SVG (which collapses ordinary ones).
    """
    s = clean(text)
    if len(s) > max_chars:
        s = s[: max_chars - 1] + "\u2026"
    return _SPACES.sub(lambda m: "\u00a0" * len(m.group()), s)


def script_json(value: Any) -> str:
    """JSON that is safe inside a ``<script>`` element and as a JavaScript expression.

    ``<``, ``>``, ``&`` and U+2028/U+2029 are written as ``\\uXXXX`` escapes, so neither
    ``</script>`` nor ``<!--`` can appear, and the text parses as JavaScript everywhere.
    """
    text = json.dumps(_plain(value), ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    return (text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def _plain(value: Any) -> Any:
    """Python builtins only: numpy/torch scalars and arrays become floats and lists, and
    non-finite numbers (which JSON cannot hold) become 0."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (bool, str)) or value is None:
        return value
    if hasattr(value, "tolist"):
        return _plain(value.tolist())
    if isinstance(value, int):
        return int(value)
    x = float(value)
    return x if math.isfinite(x) else 0.0


def new_id(prefix: str = "tlp") -> str:
    """A fresh element id, valid as a CSS selector, unique per call."""
    return f"{prefix}-{uuid.uuid4().hex[:16]}"
