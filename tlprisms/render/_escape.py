"""Escaping and labels for every place a string can land: HTML text, SVG text, a ``<script>``.

Every token and label tlprisms renders passes through here. A token is data, never markup:
``"</script>"``, ``"<b>"`` and ``"&amp;"`` must show as those characters. Two more rules
keep a hostile token from lying about its neighbours:

* **Bounded.** A token label is drawn at most :data:`TOKEN_CHARS` characters long (an
  ellipsis ends a shortened one); the full text is on hover (an SVG ``<title>``, an HTML
  ``title`` attribute). A 500-character token cannot make a page thousands of pixels wide.
* **Isolated.** Bidirectional control characters (U+202A-U+202E overrides and embeddings,
  U+2066-U+2069 isolates, U+200E/U+200F/U+061C marks) in a token are shown as ``\\u202e``
  escapes, never obeyed, and every label is wrapped in U+2068 FIRST STRONG ISOLATE ...
  U+2069 POP DIRECTIONAL ISOLATE (:func:`isolate`; ``<bdi>`` in HTML), so right-to-left
  text in one label cannot reorder the labels and numbers around it.

:func:`token_label` makes the one :class:`Label` record every renderer draws a token from.
The only bidi characters that survive :func:`clean` are matched FSI/PDI pairs, which
tlprisms itself puts around labels (a token's own are escaped before it is wrapped).
"""

import html
import json
import math
import re
import uuid
from dataclasses import dataclass
from typing import Any

__all__ = [
    "TOKEN_CHARS",
    "FSI",
    "PDI",
    "clean",
    "esc",
    "label",
    "isolate",
    "balance",
    "Label",
    "token_label",
    "quote_token",
    "script_json",
    "new_id",
]

#: the longest token label drawn (characters); longer ones are shortened, full text on hover
TOKEN_CHARS = 24
#: U+2068 FIRST STRONG ISOLATE and U+2069 POP DIRECTIONAL ISOLATE, wrapped around labels
FSI, PDI = "\u2068", "\u2069"

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")
_SPACES = re.compile(r"^ +| +$| {2,}")
_BIDI = re.compile("[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _show(ch: str) -> str:
    return f"\\u{ord(ch):04x}"


def _printable(s: str) -> str:
    s = _SURROGATE.sub("\ufffd", s)
    s = s.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", s)


def _neutralise_bidi(s: str, keep_isolates: bool) -> str:
    """Bidi controls shown as ``\\uXXXX``; with ``keep_isolates``, matched FSI...PDI pairs
    (which can only contain their own text's direction) are kept."""
    if not _BIDI.search(s):
        return s
    keep: set = set()
    if keep_isolates:
        opened: list = []
        for i, ch in enumerate(s):
            if ch == FSI:
                opened.append(i)
            elif ch == PDI and opened:
                keep.update((opened.pop(), i))
    return "".join(_show(ch) if _BIDI.match(ch) and i not in keep else ch for i, ch in enumerate(s))


def clean(text: Any) -> str:
    """``str(text)`` made printable and inert.

    Control characters are shown as ``\\xNN``, lone surrogates (bytes a tokenizer split
    mid-character) as U+FFFD, tab and newline as ``\\t``/``\\n``, bidirectional controls as
    ``\\uXXXX`` except matched FSI...PDI pairs (tlprisms's own label isolates).
    """
    return _neutralise_bidi(_printable(str(text)), keep_isolates=True)


def esc(text: Any) -> str:
    """HTML/SVG-escaped printable text (also safe inside double-quoted attributes)."""
    return html.escape(clean(text), quote=True)


def isolate(text: Any) -> str:
    """``text`` made printable, every bidi control in it escaped, wrapped in FSI ... PDI."""
    return FSI + _neutralise_bidi(_printable(str(text)), keep_isolates=False) + PDI


def balance(s: str) -> str:
    """Close FSIs left open and open PDIs left unmatched (after cutting a string)."""
    depth, missing = 0, 0
    for ch in s:
        if ch == FSI:
            depth += 1
        elif ch == PDI:
            if depth:
                depth -= 1
            else:
                missing += 1
    return FSI * missing + s + PDI * depth


def _shorten(s: str, max_chars: int) -> str:
    """At most ``max_chars`` characters, not counting isolates; an ellipsis marks a cut."""
    if len(s) - s.count(FSI) - s.count(PDI) <= max_chars:
        return s
    out, n = [], 0
    for ch in s:
        if ch not in (FSI, PDI):
            if n == max_chars - 1:
                break
            n += 1
        out.append(ch)
    return balance("".join(out)) + "\u2026"


def label(text: Any, max_chars: int = 40) -> str:
    """A printable label, shortened with an ellipsis past ``max_chars`` (not yet escaped).

    Leading, trailing and repeated spaces become no-break spaces, so that a token's leading
    space stays visible in SVG (which collapses ordinary ones). Isolates in ``text`` are
    kept balanced when it is cut.
    """
    s = _shorten(clean(text), max(int(max_chars), 2))
    return _SPACES.sub(lambda m: "\u00a0" * len(m.group()), s)


@dataclass(frozen=True)
class Label:
    """One token label as drawn: ``short`` on the page, ``full`` on hover.

    Both are printable with bidi controls escaped (see :func:`clean`), neither is escaped for
    HTML yet. ``short`` is at most ``max_chars`` characters (leading/trailing spaces as
    no-break spaces).
    """

    short: str
    full: str
    shortened: bool

    def text(self) -> str:
        """The short label isolated (FSI ... PDI): for SVG text, canvas labels, captions."""
        return FSI + self.short + PDI

    def full_text(self) -> str:
        """The full label isolated (FSI ... PDI): for hover text that joins several labels."""
        return FSI + self.full + PDI

    def html(self) -> str:
        """``<bdi title="full">short</bdi>``: isolated HTML with the full text on hover."""
        return f'<bdi title="{esc(self.full)}">{esc(self.short)}</bdi>'

    def svg(self) -> str:
        """Content for an SVG ``<text>``: a ``<title>`` (hover) and the isolated label."""
        return f"<title>{esc(self.full)}</title>{esc(self.text())}"


def token_label(text: Any, max_chars: int = TOKEN_CHARS) -> Label:
    """The :class:`Label` of a token (or any label that may hold one): the one helper every
    renderer draws token text through."""
    full = _neutralise_bidi(_printable(str(text)), keep_isolates=False)
    short = _shorten(full, max(int(max_chars), 2))
    return Label(
        short=_SPACES.sub(lambda m: "\u00a0" * len(m.group()), short),
        full=full,
        shortened=short != full,
    )


def quote_token(token: Any, max_chars: int = TOKEN_CHARS + 2) -> str:
    """A token for a caption: its ``repr`` (quotes show leading spaces), shortened and
    isolated, e.g. ``"\\u2068' Paris'\\u2069"``."""
    return isolate(_shorten(repr(str(token)), max(int(max_chars), 2)))


def script_json(value: Any) -> str:
    """JSON that is safe inside a ``<script>`` element and as a JavaScript expression.

    ``<``, ``>``, ``&`` and U+2028/U+2029 are written as ``\\uXXXX`` escapes, so neither
    ``</script>`` nor ``<!--`` can appear, and the text parses as JavaScript everywhere.
    """
    text = json.dumps(_plain(value), ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    return (
        text.replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("&", "\\u0026")
        .replace("\u2028", "\\u2028")
        .replace("\u2029", "\\u2029")
    )


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
