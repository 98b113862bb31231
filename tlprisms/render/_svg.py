"""Plain SVG figures: heatmap and bars (optionally as a waterfall), and their shared parts.

Lines and scatter plots are in :mod:`tlprisms.render._svg_plots`.

No plotting dependency and no element ids (several figures share a page), only inline
attributes. Every label is escaped; text widths are estimated generously so labels are not
clipped. Colours: blue for positive values, red for negative, white at zero (CircuitsVis's
convention), on a scale symmetric about zero.
"""

import math
import textwrap
from collections.abc import Sequence
from typing import Any, Optional, Union

import numpy as np

from tlprisms._core import arguments as check
from tlprisms._core.errors import ArgumentError
from tlprisms.render import _args as arg
from tlprisms.render._escape import Label, balance, esc, label, token_label

__all__ = [
    "heatmap_svg",
    "bar_svg",
    "POSITIVE",
    "NEGATIVE",
    "diverging",
    "fmt",
    "Real",
    "as_matrix",
    "check_len",
    "svg_document",
    "text_width",
    "title_lines",
]

#: any real number (beartype does not let an int pass as a float)
Real = Union[int, float, np.integer, np.floating]

POSITIVE = "#2166ac"
NEGATIVE = "#b2182b"
TOTAL = "#3b3b3b"
FONT = "system-ui, -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif"
PALETTE = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)
_CHAR_W = 7.0  # px per character at 12px, generous
_XMLNS = "http://www.w3.org/2000/svg"


def fmt(x: Real, sig: int = 3) -> str:
    """A short number: ``sig`` significant digits, no exponent between 1e-3 and 1e5."""
    if not math.isfinite(x):
        return "n/a"
    a = abs(x)
    if a == 0:
        return "0"
    if a >= 1e5 or a < 1e-3:
        return f"{x:.{sig - 1}e}"
    digits = max(0, sig - 1 - int(math.floor(math.log10(a))))
    return f"{x:.{digits}f}"


def fmt_tick(x: Real) -> str:
    """A tick label: up to 4 significant digits, no trailing zeros."""
    return "0" if x == 0 else f"{x:.4g}"


def _mix(hex_color: str, t: Real) -> str:
    """``hex_color`` mixed with white: ``t=1`` the colour, ``t=0`` white."""
    t = min(max(t, 0.0), 1.0)
    rgb = [int(hex_color[i : i + 2], 16) for i in (1, 3, 5)]
    out = [round(255 + (c - 255) * t) for c in rgb]
    return "#" + "".join(f"{c:02x}" for c in out)


def diverging(v: Real, vmax: Real) -> str:
    """The fill for ``v`` on a scale from ``-vmax`` (red) through white to ``vmax`` (blue)."""
    if not math.isfinite(v):
        return "#d9d9d9"
    t = abs(v) / vmax if vmax > 0 else 0.0
    return _mix(POSITIVE if v >= 0 else NEGATIVE, t)


def _ink(v: Real, vmax: Real) -> str:
    return "#ffffff" if math.isfinite(v) and vmax > 0 and abs(v) / vmax > 0.6 else "#111111"


def text_width(s: str, px: Real = 12) -> Real:
    """The width in px that ``s`` takes at font size ``px`` (generous)."""
    return len(s) * _CHAR_W * px / 12 + 4


def svg_document(width: Real, height: Real, body: list[str]) -> str:
    """A standalone ``<svg>`` of the given size: white background, the package font."""
    w, h = int(math.ceil(width)), int(math.ceil(height))
    return (
        f'<svg xmlns="{_XMLNS}" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
        f'font-family="{esc(FONT)}" font-size="12" style="max-width:100%;height:auto">'
        f'<rect width="{w}" height="{h}" fill="#ffffff"/>' + "".join(body) + "</svg>"
    )


def title_lines(title: str, width: Real) -> tuple[list[str], Real]:
    """The title as up to three wrapped lines of bold text, and the height it takes."""
    if not title:
        return [], 8.0
    per_line = max(24, int((width - 16) / 8.6))  # 14px bold, generous
    text = label(title, 3 * per_line).replace("\u00a0", " ")
    lines = [
        balance(line)
        for line in textwrap.wrap(
            text, per_line, max_lines=3, placeholder="\u2026", break_on_hyphens=False
        )
        or [text]
    ]
    out = [
        f'<text x="8" y="{20 + 17 * i}" font-size="14" font-weight="600" fill="#111111">'
        f"{esc(line)}</text>"
        for i, line in enumerate(lines)
    ]
    return out, 20 + 17 * (len(lines) - 1) + 14


def as_matrix(
    matrix: Any, caller: str, what: str = "matrix", shape: str = "[rows, cols]"
) -> np.ndarray:
    """``matrix`` as a 2-D array of numbers, or an :class:`ArgumentError` naming ``caller``."""
    m = arg.numbers_array(matrix, what, caller, shape)
    if m.ndim != 2:
        raise ArgumentError(f"{caller}: {what} must be 2-D {shape}, got shape {m.shape}.")
    return m


def check_len(labels: Any, n: int, what: str, per: str, caller: str) -> list:
    """``labels`` checked to be ``n`` labels, one per ``per`` (see ``_args.labels``)."""
    return arg.labels(labels, n, what, per, caller)


def nice_ticks(lo: Real, hi: Real, n: int = 5) -> list[Real]:
    """Round tick values covering ``[lo, hi]``."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(s * mag for s in (1, 2, 2.5, 5, 10) if s * mag >= raw)
    start = math.ceil(lo / step - 1e-9) * step
    ticks, t = [], start
    while t <= hi + 1e-9 * step:
        ticks.append(0.0 if abs(t) < 1e-12 * step else t)
        t += step
    return ticks


# ---------------------------------------------------------------------------- heatmap
@check.entry
def heatmap_svg(
    matrix: Any,
    row_labels: Sequence[Any],
    col_labels: Sequence[Any],
    title: str = "",
    *,
    vmax: Optional[Real] = None,
    annotate: Optional[bool] = None,
) -> str:
    """A heatmap of ``matrix [rows, cols]`` on a diverging scale symmetric about zero.

    Args:
        matrix: a 2-D array (numpy, torch or nested lists); NaN cells are drawn grey.
        row_labels, col_labels: one label per row / column (escaped, isolated, shortened
            past 30 / 24 characters; the full text is in the label's and the cell's hover
            title).
        title: drawn above the figure.
        vmax: the value drawn at full colour (default: the largest ``|value|``).
        annotate: write the values in the cells (default: when the cells are large enough).

    Returns:
        An ``<svg>`` element as a string.
    """
    caller = "heatmap_svg"
    m = as_matrix(matrix, caller)
    rows = check_len(row_labels, m.shape[0], "row_labels", "row", caller)
    cols = check_len(col_labels, m.shape[1], "col_labels", "column", caller)
    title = str(arg.text(title, "title", caller))
    vmax = arg.real(vmax, "vmax", caller, optional=True)
    if vmax is not None and not (math.isfinite(vmax) and vmax > 0):
        raise ArgumentError(
            f"{caller}: vmax={vmax!r}; pass a finite number > 0 (the value drawn at full "
            "colour), or None for the largest |value|."
        )
    annotate = arg.flag(annotate, "annotate", caller, optional=True)
    finite = m[np.isfinite(m)]
    if vmax is None:
        vmax = float(np.abs(finite).max()) if finite.size else 1.0
    vmax = vmax if vmax > 0 else 1.0
    R, C = m.shape
    cs = float(np.clip(min(680 / max(C, 1), 440 / max(R, 1)), 12, 58))
    cell_text = [[fmt(float(x), 2) for x in r] for r in m]
    text_w = max((text_width(t, 10) for r in cell_text for t in r), default=0.0)
    annotate = (text_w + 2 <= cs) if annotate is None else annotate
    rl = [token_label(r, 30) for r in rows]
    cl = [token_label(c, 24) for c in cols]
    fs = float(min(12.0, max(8.0, cs - 2)))  # label font: rows must not overlap
    left = max([text_width(s.short, fs) for s in rl] + [20]) + 12
    rotate = any(text_width(s.short, fs) > cs for s in cl)
    vertical = rotate and cs < 22  # at 45 degrees, narrow columns' labels would overlap
    widest = max([text_width(s.short, fs) for s in cl] + [0])
    col_h = (widest + 10 if vertical else widest * 0.72 + 14) if rotate else 20
    width = max(left + C * cs + 110, 420)
    head, th = title_lines(title, width)
    top = th + 8 + col_h
    body = head
    for j, s in enumerate(cl):
        x = left + (j + 0.5) * cs
        if rotate:
            angle, x = (-90, x + fs / 3) if vertical else (-45, x)
            body.append(
                f'<text x="{x:.1f}" y="{top - 6:.1f}" text-anchor="start" '
                f'font-size="{fs:.0f}" transform="rotate({angle} {x:.1f} {top - 6:.1f})"'
                f' fill="#333333">{s.svg()}</text>'
            )
        else:
            body.append(
                f'<text x="{x:.1f}" y="{top - 6:.1f}" text-anchor="middle" '
                f'font-size="{fs:.0f}" fill="#333333">{s.svg()}</text>'
            )
    for i, s in enumerate(rl):
        y = top + (i + 0.5) * cs
        body.append(
            f'<text x="{left - 8:.1f}" y="{y + fs / 3:.1f}" text-anchor="end" '
            f'font-size="{fs:.0f}" fill="#333333">{s.svg()}</text>'
        )
        for j in range(C):
            v = float(m[i, j])
            x0, y0 = left + j * cs, top + i * cs
            tip = f"{s.full_text()}, {cl[j].full_text()}: {fmt(v)}"
            body.append(
                f'<rect x="{x0:.1f}" y="{y0:.1f}" width="{cs:.1f}" height="{cs:.1f}" '
                f'fill="{diverging(v, vmax)}" stroke="#ffffff" stroke-width="1">'
                f"<title>{esc(tip)}</title></rect>"
            )
            if annotate:
                body.append(
                    f'<text x="{x0 + cs / 2:.1f}" y="{y0 + cs / 2 + 4:.1f}" '
                    f'text-anchor="middle" font-size="10" fill="{_ink(v, vmax)}" '
                    f'pointer-events="none">{esc(cell_text[i][j])}</text>'
                )
    # colour bar, drawn with steps (no gradient ids that could clash on a page)
    bx, steps, bh = left + C * cs + 24, 24, max(R * cs, 120)
    for k in range(steps):
        v = vmax - 2 * vmax * (k + 0.5) / steps
        body.append(
            f'<rect x="{bx}" y="{top + k * bh / steps:.1f}" width="14" '
            f'height="{bh / steps + 0.5:.1f}" fill="{diverging(v, vmax)}"/>'
        )
    body.append(
        f'<rect x="{bx}" y="{top}" width="14" height="{bh:.1f}" fill="none" stroke="#999999"/>'
    )
    for v, y in ((vmax, top + 4), (0.0, top + bh / 2 + 4), (-vmax, top + bh)):
        body.append(f'<text x="{bx + 18}" y="{y:.1f}" fill="#333333">{esc(fmt(v))}</text>')
    height = top + max(R * cs, bh) + 12
    return svg_document(width, height, body)


# ---------------------------------------------------------------------------- bars
@check.entry
def bar_svg(
    values: Any,
    labels: Sequence[Any],
    title: str = "",
    total: Optional[Real] = None,
    *,
    waterfall: bool = False,
    total_label: str = "total",
    note: str = "",
) -> str:
    """Horizontal bars, one per label, positive to the right (blue), negative left (red).

    Args:
        values: one number per bar.
        labels: one label per bar (escaped, isolated, shortened past 36 characters; the
            full text is on hover).
        title: drawn above the figure.
        total: when given, a last dark bar from 0 to ``total`` (e.g. the logit the terms add
            up to), labelled ``total_label``.
        waterfall: start each bar where the previous one ended, so the bars visibly add up
            (the last one ends at their sum, which the ``total`` bar then matches).
        note: a line of small text under the title.

    Returns:
        An ``<svg>`` element as a string.
    """
    caller = "bar_svg"
    v = arg.numbers_array(values, "values", caller, "(one per bar)").reshape(-1)
    names = check_len(labels, v.shape[0], "labels", "value", caller)
    title = str(arg.text(title, "title", caller))
    total = arg.real(total, "total", caller, optional=True)
    waterfall = bool(arg.flag(waterfall, "waterfall", caller))
    total_label = str(arg.text(total_label, "total_label", caller))
    note = str(arg.text(note, "note", caller))
    starts = np.concatenate([[0.0], np.cumsum(v)[:-1]]) if waterfall else np.zeros_like(v)
    ends = starts + v
    pts = [0.0] + list(starts) + list(ends) + ([float(total)] if total is not None else [])
    pts = [p for p in pts if math.isfinite(p)]
    lo, hi = min(pts), max(pts)
    if hi - lo < 1e-12:
        lo, hi = lo - 1.0, hi + 1.0
    rows = [token_label(n, 36) for n in names]
    rows += [token_label(total_label, 36)] if total is not None else []
    left = max([text_width(s.short) for s in rows] + [40]) + 14
    plot_w, pad = 440.0, 64.0
    width = left + pad + plot_w + pad + 8
    head, th = title_lines(title, width)
    body = head
    top = th + 10
    if note:
        body.append(
            f'<text x="8" y="{top + 6:.1f}" font-size="11" fill="#555555">'
            f"{esc(label(note, 110).replace(chr(160), ' '))}</text>"
        )
        top += 18
    rh = 20.0

    def X(x: Real) -> Real:
        return left + pad + (x - lo) / (hi - lo) * plot_w

    n = len(v)
    bottom = top + rh * (n + (1.3 if total is not None else 0)) + 4
    ticks = nice_ticks(lo, hi, 5)
    for t in ticks:
        body.append(
            f'<line x1="{X(t):.1f}" x2="{X(t):.1f}" y1="{top - 2:.1f}" '
            f'y2="{bottom:.1f}" stroke="#eeeeee"/>'
        )
        body.append(
            f'<text x="{X(t):.1f}" y="{bottom + 14:.1f}" text-anchor="middle" '
            f'font-size="10" fill="#555555">{esc(fmt_tick(t))}</text>'
        )
    body.append(
        f'<line x1="{X(0):.1f}" x2="{X(0):.1f}" y1="{top - 2:.1f}" y2="{bottom:.1f}" '
        f'stroke="#888888"/>'
    )

    def bar(
        i_row: Real, a: Real, b: Real, color: str, name: Label, shown: Real, bold: bool = False
    ) -> None:
        y = top + i_row * rh
        x0, x1 = sorted((X(a), X(b)))
        w = max(x1 - x0, 1.0)
        weight = ' font-weight="600"' if bold else ""
        body.append(
            f'<text x="{left - 8:.1f}" y="{y + 14:.1f}" text-anchor="end" '
            f'fill="#222222"{weight}>{name.svg()}</text>'
        )
        body.append(
            f'<rect x="{x0:.1f}" y="{y + 3:.1f}" width="{w:.1f}" height="{rh - 6:.1f}" '
            f'fill="{color}"><title>{esc(name.full_text())}: {esc(fmt(shown))}</title>'
            f"</rect>"
        )
        if b >= a:
            body.append(
                f'<text x="{x0 + w + 4:.1f}" y="{y + 14:.1f}" font-size="11" '
                f'fill="#333333"{weight}>{esc(fmt(shown))}</text>'
            )
        else:
            body.append(
                f'<text x="{x0 - 4:.1f}" y="{y + 14:.1f}" text-anchor="end" '
                f'font-size="11" fill="#333333"{weight}>{esc(fmt(shown))}</text>'
            )

    for i in range(n):
        a, b = float(starts[i]), float(ends[i])
        bar(i, a, b, POSITIVE if v[i] >= 0 else NEGATIVE, rows[i], float(v[i]))
        if waterfall and i + 1 < n:
            body.append(
                f'<line x1="{X(b):.1f}" x2="{X(b):.1f}" y1="{top + i * rh + rh - 3:.1f}"'
                f' y2="{top + (i + 1) * rh + 3:.1f}" stroke="#777777" '
                f'stroke-dasharray="2,2"/>'
            )
    if total is not None:
        y = top + n * rh + 0.15 * rh
        body.append(
            f'<line x1="8" x2="{width - 8:.1f}" y1="{y:.1f}" y2="{y:.1f}" stroke="#bbbbbb"/>'
        )
        bar(n + 0.3, 0.0, float(total), TOTAL, rows[-1], float(total), bold=True)
    if n == 0 and total is None:
        body.append(f'<text x="{left:.1f}" y="{top + 14:.1f}" fill="#555555">(no values)</text>')
    return svg_document(width, bottom + 22, body)
