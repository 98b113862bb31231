"""Plain SVG line and scatter plots (same conventions as :mod:`tlprisms.render._svg`)."""

import math
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np

from tlprisms._core import arguments as check
from tlprisms._core.errors import ArgumentError
from tlprisms.render import _args as arg
from tlprisms.render._escape import esc, label, token_label
from tlprisms.render._svg import (
    PALETTE,
    POSITIVE,
    Real,
    as_matrix,
    check_len,
    fmt,
    fmt_tick,
    nice_ticks,
    svg_document,
    text_width,
    title_lines,
)

__all__ = ["lines_svg", "scatter_svg"]


# ---------------------------------------------------------------------------- lines
@check.entry
def lines_svg(
    series: dict,
    x_labels: Sequence[Any],
    title: str = "",
    *,
    highlight: Optional[str] = None,
    scale: str = "shared",
) -> str:
    """Line plots over a shared categorical x axis, e.g. neuron templates over a token set.

    Args:
        series: ``{name: values}``, every ``values`` of length ``len(x_labels)``.
        x_labels: the x categories (escaped, isolated, shortened past 20 characters with the
            full text on hover; rotated when long).
        title: drawn above the figure.
        highlight: the name of one series to draw thick and dark (e.g. the weighted sum).
        scale: ``"shared"`` (one y axis for every line) or ``"per_line"``: each line divided
            by its own largest ``|value|`` (its legend says by how much), so that one large
            line does not flatten the others to 0.

    Returns:
        An ``<svg>`` element as a string.
    """
    caller = "lines_svg"
    named = arg.mapping(series, "series", caller, "{'neuron 5': [0.1, 0.3, ...]}")
    xs = arg.labels(x_labels, None, "x_labels", "x category", caller)
    title = str(arg.text(title, "title", caller))
    data = {}
    for name, vals in named.items():
        what = f"series {label(name, 40)!r}"
        arr = arg.numbers_array(vals, what, caller, "(one value per x label)").reshape(-1)
        if arr.shape[0] != len(xs):
            raise ArgumentError(
                f"{caller}: {what} has {arr.shape[0]} values "
                f"for {len(xs)} x labels; give one value per x label."
            )
        data[name] = arr
    if highlight is not None:
        try:
            known = highlight in data
        except TypeError:  # unhashable: not a key
            known = False
        if not known:
            names = [label(n, 40) for n in list(data)[:8]]
            raise ArgumentError(
                f"{caller}: highlight={label(highlight, 40)!r} is not a series name; use one "
                f"of {names}{' ...' if len(data) > 8 else ''}, or None."
            )
    check.choice(scale, "scale", ("shared", "per_line"), caller)
    units: dict = {}
    if scale == "per_line":
        for name, arr in data.items():
            peak = float(np.abs(arr[np.isfinite(arr)]).max()) if np.isfinite(arr).any() else 0.0
            units[name] = peak if peak > 0 else 1.0
            data[name] = arr / units[name]
        title = f"{title} (each line scaled to its largest |value|)" if title else title
    allv = np.concatenate([a[np.isfinite(a)] for a in data.values()] + [np.zeros(1)])
    lo, hi = float(allv.min()), float(allv.max())
    if hi - lo < 1e-12:
        lo, hi = lo - 1, hi + 1
    span = hi - lo
    lo, hi = lo - 0.05 * span, hi + 0.05 * span
    xl = [token_label(x, 20) for x in xs]
    legend = [
        token_label(f"{n} (1 = {fmt(units[n])})" if units else n, 40 if units else 28) for n in data
    ]
    plot_w = float(np.clip(46 * max(len(xs), 1), 260, 720))
    plot_h = 260.0
    left = 64.0
    legend_w = max([text_width(s.short) for s in legend] + [40]) + 34
    width = left + plot_w + 20 + legend_w
    head, th = title_lines(title, width)
    top = th + 14
    rotate = any(text_width(s.short) > plot_w / max(len(xs), 1) for s in xl)
    xlab_h = (max([text_width(s.short) for s in xl] + [0]) * 0.72 + 16) if rotate else 22
    body = head

    def X(i: int) -> Real:
        return left + (i + 0.5) * plot_w / max(len(xs), 1)

    def Y(y: Real) -> Real:
        return top + (hi - y) / (hi - lo) * plot_h

    for t in nice_ticks(lo, hi, 5):
        body.append(
            f'<line x1="{left}" x2="{left + plot_w:.1f}" y1="{Y(t):.1f}" y2="{Y(t):.1f}" '
            f'stroke="{"#999999" if t == 0 else "#eeeeee"}"/>'
        )
        body.append(
            f'<text x="{left - 6}" y="{Y(t) + 4:.1f}" text-anchor="end" font-size="10" '
            f'fill="#555555">{esc(fmt_tick(t))}</text>'
        )
    body.append(
        f'<rect x="{left}" y="{top}" width="{plot_w:.1f}" height="{plot_h}" fill="none" '
        f'stroke="#cccccc"/>'
    )
    base = top + plot_h + 4
    for i, s in enumerate(xl):
        if rotate:
            body.append(
                f'<text x="{X(i):.1f}" y="{base + 10:.1f}" text-anchor="end" '
                f'transform="rotate(-45 {X(i):.1f} {base + 10:.1f})" font-size="11" '
                f'fill="#333333">{s.svg()}</text>'
            )
        else:
            body.append(
                f'<text x="{X(i):.1f}" y="{base + 14:.1f}" text-anchor="middle" '
                f'font-size="11" fill="#333333">{s.svg()}</text>'
            )
    for k, (name, arr) in enumerate(data.items()):
        color = "#111111" if name == highlight else PALETTE[k % len(PALETTE)]
        sw = 3.2 if name == highlight else 1.6
        pts = [(X(i), Y(float(y))) for i, y in enumerate(arr) if math.isfinite(y)]
        if len(pts) > 1:
            d = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
            body.append(
                f'<polyline points="{d}" fill="none" stroke="{color}" stroke-width="{sw}"/>'
            )
        for i, y in enumerate(arr):
            if math.isfinite(y):
                body.append(
                    f'<circle cx="{X(i):.1f}" cy="{Y(float(y)):.1f}" r="{sw + 1:.1f}" '
                    f'fill="{color}"><title>{esc(legend[k].full_text())} @ '
                    f"{esc(xl[i].full_text())}: {esc(fmt(float(y)))}</title></circle>"
                )
        ly = top + 8 + 18 * k
        lx = left + plot_w + 20
        body.append(
            f'<line x1="{lx}" x2="{lx + 22}" y1="{ly:.1f}" y2="{ly:.1f}" '
            f'stroke="{color}" stroke-width="{sw}"/>'
        )
        body.append(f'<text x="{lx + 28}" y="{ly + 4:.1f}" fill="#222222">{legend[k].svg()}</text>')
    height = max(base + xlab_h, top + 18 * len(data) + 10) + 8
    return svg_document(width, height, body)


# ---------------------------------------------------------------------------- scatter
@check.entry
def scatter_svg(
    points: Any,
    labels: Sequence[Any],
    title: str = "",
    *,
    show_labels: Optional[bool] = None,
    label_extremes: Optional[int] = None,
) -> str:
    """A 2-D scatter plot with a text label per point (e.g. a 2-D map of unembeddings).

    Args:
        points: ``[n, 2]`` coordinates.
        labels: one label per point (escaped, isolated, shortened past 24 characters; the
            full text is in each point's and label's hover title).
        title: drawn above the figure.
        show_labels: write the labels next to the points (default: for at most 80 points).
        label_extremes: write only the labels of this many points, those farthest from the
            origin (the rest keep their hover titles), so labels near the origin, where the
            small points crowd, do not pile up.

    Returns:
        An ``<svg>`` element as a string.
    """
    caller = "scatter_svg"
    p = as_matrix(points, caller, "points", "[n, 2]")
    if p.shape[1] != 2:
        raise ArgumentError(
            f"{caller}: points must be [n, 2], got shape {p.shape}; project "
            "to two dimensions first."
        )
    names = check_len(labels, p.shape[0], "labels", "point", caller)
    title = str(arg.text(title, "title", caller))
    shown = arg.flag(show_labels, "show_labels", caller, optional=True)
    show_labels = p.shape[0] <= 80 if shown is None else shown
    ok = np.isfinite(p).all(1)
    labelled = np.full(p.shape[0], show_labels)
    if label_extremes is not None:
        n = check.count(label_extremes, "label_extremes", caller, minimum=0)
        far = np.where(ok, np.hypot(p[:, 0], p[:, 1]), -np.inf)
        labelled[:] = False
        labelled[np.argsort(-far, kind="stable")[: min(n, int(ok.sum()))]] = True
        show_labels = bool(labelled.any())
    lab = [token_label(n, 24) for n in names]
    q = p[ok] if ok.any() else np.zeros((1, 2))
    (x0, y0), (x1, y1) = q.min(0), q.max(0)
    dx, dy = max(x1 - x0, 1e-9), max(y1 - y0, 1e-9)
    x0, x1, y0, y1 = x0 - 0.08 * dx, x1 + 0.08 * dx, y0 - 0.08 * dy, y1 + 0.08 * dy
    size, left = 440.0, 56.0
    right = (max([text_width(s.short, 10) for s in lab] + [0]) * 0.6 + 16) if show_labels else 16
    width = left + size + right
    head, th = title_lines(title, width)
    top = th + 12
    body = head

    def X(x: Real) -> Real:
        return left + (x - x0) / (x1 - x0) * size

    def Y(y: Real) -> Real:
        return top + (y1 - y) / (y1 - y0) * size

    body.append(
        f'<rect x="{left}" y="{top}" width="{size}" height="{size}" fill="none" stroke="#cccccc"/>'
    )
    for t in nice_ticks(x0, x1, 5):
        body.append(
            f'<line x1="{X(t):.1f}" x2="{X(t):.1f}" y1="{top}" y2="{top + size}" '
            f'stroke="{"#999999" if t == 0 else "#f0f0f0"}"/>'
        )
        body.append(
            f'<text x="{X(t):.1f}" y="{top + size + 14}" text-anchor="middle" '
            f'font-size="10" fill="#555555">{esc(fmt_tick(t))}</text>'
        )
    for t in nice_ticks(y0, y1, 5):
        body.append(
            f'<line x1="{left}" x2="{left + size}" y1="{Y(t):.1f}" y2="{Y(t):.1f}" '
            f'stroke="{"#999999" if t == 0 else "#f0f0f0"}"/>'
        )
        body.append(
            f'<text x="{left - 6}" y="{Y(t) + 4:.1f}" text-anchor="end" '
            f'font-size="10" fill="#555555">{esc(fmt_tick(t))}</text>'
        )
    # a label that would overlap one already placed is left out (its point keeps its hover
    # title): the points farthest from the origin are labelled first
    placed: list = []
    far_first = np.argsort(-np.where(ok, np.hypot(p[:, 0], p[:, 1]), -np.inf), kind="stable")
    for i in far_first:
        if not (ok[i] and labelled[i]):
            continue
        cx, cy = X(float(p[i, 0])), Y(float(p[i, 1]))
        box = (cx + 6, cy - 6, cx + 6 + text_width(lab[i].short, 10), cy + 6)
        if any(min(box[2], b[2]) > max(box[0], b[0]) and min(box[3], b[3]) > max(box[1], b[1])
               for b in placed):  # fmt: skip
            labelled[i] = False
        else:
            placed.append(box)
    for i in range(p.shape[0]):
        if not ok[i]:
            continue
        cx, cy = X(float(p[i, 0])), Y(float(p[i, 1]))
        tip = f"{lab[i].full_text()}: ({fmt(float(p[i, 0]))}, {fmt(float(p[i, 1]))})"
        body.append(
            f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="4" fill="{POSITIVE}" '
            f'fill-opacity="0.75"><title>{esc(tip)}</title></circle>'
        )
        if labelled[i]:
            body.append(
                f'<text x="{cx + 6:.1f}" y="{cy + 4:.1f}" font-size="10" '
                f'fill="#222222">{lab[i].svg()}</text>'
            )
    return svg_document(width, top + size + 24, body)
