"""The interactive view of an :class:`~tlprisms._core.graph.AttributionGraph`: one offline
HTML fragment (an inline SVG and a small inline script, nothing fetched).

Layout: one row per layer (the token embeddings at the bottom, then each layer's neurons,
features and error nodes, the logit on top) and one column per position, labelled with its
token; the constants (biases) in a side column on the right, in the row of their layer (the
final ones, ``b_U`` and ``ln_final.b``, beside the logit). Inside a cell the nodes are laid out
on a small grid, the largest ``|influence|`` first.

* a node's area grows with its ``|influence|`` on the logit; its colour says its kind;
* an edge is blue for a positive weight, red for a negative one; its width grows with its
  ``|flow|`` (its share of the logit); only the :data:`MAX_EDGES` strongest by ``|flow|`` are
  drawn (the caption says how many are hidden);
* hover a node: its label and values (activation, input, influence) in the line under the
  graph (and in the node's native tooltip, which works without JavaScript);
* click a node: its paths (the drawn edges into it and out of it, transitively) stay lit and
  everything else fades; a second click on it (or a click on the background) clears.

Every label is escaped, isolated and shortened (:mod:`tlprisms.render._escape`); the data
the script reads is script-safe JSON and is written into the page as text, never as markup.
Without JavaScript (a static export, an untrusted notebook) the SVG and its tooltips remain.

>>> import tlprisms as tp
>>> from tlprisms.demo import load_demo_model
>>> g = tp.LogitPrism.run(load_demo_model(), "The capital of France is").graph(" Paris")
>>> page = tp.render.to_html(g, max_edges=50)  # also g._repr_html_(), g.show(), a Report
>>> page.count('class="tlp-edge"'), page.count('class="tlp-node"') == len(g), "src=" in page
(50, True, False)
"""

import math
import textwrap
from typing import Any, Optional

import numpy as np

from tlprisms._core import arguments as check
from tlprisms._core.errors import ArgumentError
from tlprisms._core.graph import AttributionGraph
from tlprisms.render._escape import esc, new_id, script_json, token_label
from tlprisms.render._svg import (
    NEGATIVE,
    POSITIVE,
    Real,
    fmt,
    svg_document,
    text_width,
    title_lines,
)
from tlprisms.render._views_base import WRAP, Figure, View

__all__ = ["graph_view", "graph_svg", "graph_views", "GraphView", "MAX_EDGES", "LABELS"]

#: edges drawn by default: the strongest by ``|flow|`` (the rest are counted as hidden)
MAX_EDGES = 300
#: node labels written on the graph by default (largest ``|influence|``; the logit always)
LABELS = 12
#: fill of each node kind
KIND_COLOURS = {
    "embed": "#7f7f7f",
    "error": "#8c564b",
    "const": "#9467bd",
    "neuron": "#f0a030",
    "feature": "#2ca02c",
    "logit": "#222222",
}
#: what the legend calls each kind
KIND_NAMES = {
    "embed": "token embedding",
    "error": "error",
    "const": "constant",
    "neuron": "neuron",
    "feature": "feature",
    "logit": "logit",
}
#: nodes in one line of a cell, at most
PER_LINE = 12
#: node spacing inside a cell (px)
STEP = 13.0
#: node radius: smallest, largest in a crowded cell, largest alone in a cell (px)
R_MIN, R_CELL, R_ALONE = 2.0, 6.0, 9.0
#: the narrowest position column (px)
MIN_COL = 34.0
#: a position column widens up to this (px) to write its token unrotated
TOK_COL = 90.0
#: position columns widen to write their tokens unrotated while the graph fits this (px)
WIDTH_BUDGET = 1000.0
#: the least horizontal gap between two node labels (px)
LABEL_GAP = 6.0
#: label font size (px)
FONT_PX = 10
#: the line under the graph before any node is hovered
IDLE = (
    "Hover a node for its label and values; click it to highlight its paths "
    "(click it again, or the background, to clear)."
)


# ---------------------------------------------------------------------------- the layout
def _tokens(g: AttributionGraph) -> list:
    """The token strings of the graph's batch row (meta ``tokens`` holds one list per row,
    or one list for a single row), or ``[]``."""
    toks = g.meta.get("tokens") or []
    if toks and isinstance(toks[0], (list, tuple)):
        row = int(g.meta.get("row", 0) or 0)
        toks = toks[row] if 0 <= row < len(toks) else toks[0]
    return [str(t) for t in toks]


def _finite(x: Any) -> Optional[float]:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


class _Layout:
    """Where every node, row and column of a graph is drawn."""

    def __init__(self, g: AttributionGraph) -> None:
        nodes = g.nodes
        kind = np.asarray(nodes.kind).astype(str)
        layer = np.asarray(nodes.layer).astype(np.int64)
        pos = np.asarray(nodes.pos).astype(np.int64)
        n_layers = int(g.meta.get("n_layers") or 0)
        mids = np.isin(kind, ("neuron", "feature", "error"))
        if mids.any():
            n_layers = max(n_layers, int(layer[mids].max()) + 1)
        self.n_layers = n_layers
        self.top_row = n_layers + 1  # the logit's row
        # row of each node: 0 embeddings, 1 + L layer L, top_row the logit (and final consts)
        row = np.where(kind == "embed", 0, 1 + layer)
        row = np.where(kind == "logit", self.top_row, row)
        const = kind == "const"
        row = np.where(const & (layer < 0), self.top_row, row)
        self.row = np.clip(row, 0, self.top_row)
        self.kind, self.pos = kind, pos
        self.tokens = _tokens(g)
        placed = ~const
        n_pos = max(
            len(self.tokens), int(pos[placed].max(initial=-1)) + 1, int(g.meta.get("pos", 0)) + 1
        )
        self.n_pos = max(n_pos, 1)
        self.col = np.clip(pos, 0, self.n_pos - 1)
        # node sizes: |influence| relative to the largest of a non-logit node
        infl = np.abs(np.nan_to_num(np.asarray(nodes.influence, dtype=np.float64)))
        scale = float(infl[kind != "logit"].max(initial=0.0)) or 1.0
        self.size = np.sqrt(np.clip(infl / scale, 0.0, 1.0))
        # cells: nodes of one (row, position), largest |influence| first
        cells: dict = {}
        for i in np.argsort(-infl, kind="stable"):
            if placed[i]:
                cells.setdefault((int(self.row[i]), int(self.col[i])), []).append(int(i))
        self.cells = cells
        per_col = np.ones(self.n_pos, dtype=np.int64)
        for (_, c), members in cells.items():
            per_col[c] = max(per_col[c], min(len(members), PER_LINE))
        lines = np.ones(self.top_row + 1, dtype=np.int64)
        for (r, c), members in cells.items():
            lines[r] = max(lines[r], math.ceil(len(members) / per_col[c]))
        self.per_col = per_col
        # the constants of each row, one under the other in the side column
        self.consts: dict = {}
        for i in np.nonzero(const)[0]:
            self.consts.setdefault(int(self.row[i]), []).append(int(i))
        self.labels = [token_label(x, 24) for x in np.asarray(nodes.label).astype(str)]
        self.row_h = [
            max(40.0, float(lines[r]) * STEP + 22, 14.0 * len(self.consts.get(r, [])) + 12)
            for r in range(self.top_row + 1)
        ]
        self.tok = [token_label(t) for t in self.tokens] + [
            token_label(f"[{j}]") for j in range(len(self.tokens), self.n_pos)
        ]
        # columns as wide as their nodes need; wider to write each token unrotated when the
        # whole graph still fits WIDTH_BUDGET
        natural = [max(MIN_COL, float(per_col[c]) * STEP + 12) for c in range(self.n_pos)]
        widened = [
            max(w, min(text_width(t.short, FONT_PX) + 8, TOK_COL))
            for w, t in zip(natural, self.tok)
        ]
        self.col_w = widened if sum(widened) + 300 <= WIDTH_BUDGET else natural
        names = ["logit"] + [f"layer {r - 1}" for r in range(self.top_row - 1, 0, -1)]
        self.row_names = {self.top_row: "logit", 0: "embed"}
        for r in range(1, self.top_row):
            self.row_names[r] = names[self.top_row - r]
        self.left = max(text_width(s, 11) for s in self.row_names.values()) + 14
        const_labels = [self.labels[i] for i in np.nonzero(const)[0]]
        self.const_w = (
            max(text_width(s.short, FONT_PX) for s in const_labels) + 2 * R_ALONE + 10
            if const_labels
            else 0.0
        )

    # geometry, once the top of the grid is known
    def place(self, top: Real) -> None:
        self.top = top
        self.col_x = np.concatenate([[self.left], self.left + np.cumsum(self.col_w)])
        self.grid_right = float(self.col_x[-1])
        self.const_x = self.grid_right + 24 + R_ALONE
        # rows from the top: the logit first
        self.row_y: dict = {}
        y = top
        for r in range(self.top_row, -1, -1):
            self.row_y[r] = (y, y + self.row_h[r])
            y += self.row_h[r]
        self.bottom = y
        n = len(self.kind)
        self.x, self.y, self.r = np.zeros(n), np.zeros(n), np.zeros(n)
        for (row, c), members in self.cells.items():
            per = int(self.per_col[c])
            lines = math.ceil(len(members) / per)
            cx = float(self.col_x[c] + self.col_w[c] / 2)
            y0, y1 = self.row_y[row]
            cy = (y0 + y1) / 2
            alone = len(members) == 1
            for k, i in enumerate(members):
                line, slot = divmod(k, per)
                in_line = min(per, len(members) - line * per)
                self.x[i] = cx + (slot - (in_line - 1) / 2) * STEP
                self.y[i] = cy + (line - (lines - 1) / 2) * STEP
                cap = R_ALONE if alone else R_CELL
                self.r[i] = R_MIN + (cap - R_MIN) * self.size[i]
        for row, members in self.consts.items():
            y0, y1 = self.row_y[row]
            cy = (y0 + y1) / 2
            for k, i in enumerate(members):
                self.x[i] = self.const_x
                self.y[i] = cy + (k - (len(members) - 1) / 2) * 14.0
                self.r[i] = R_MIN + (R_CELL - R_MIN) * self.size[i]


def _drawn_edges(g: AttributionGraph, max_edges: int) -> np.ndarray:
    """The edges drawn: the ``max_edges`` largest ``|flow|`` (``|weight|`` where the flow is
    unknown, as in an imported circuit-tracer graph), weakest first (strongest on top)."""
    strength = _strength(g)
    order = np.argsort(-strength, kind="stable")[:max_edges]
    return order[np.argsort(strength[order], kind="stable")]


def _strength(g: AttributionGraph) -> np.ndarray:
    flow = np.asarray(g.flow, dtype=np.float64)
    weight = np.asarray(g.weight, dtype=np.float64)
    out = np.where(np.isfinite(flow), np.abs(flow), np.abs(weight))
    return np.nan_to_num(out)


def _node_values(g: AttributionGraph, i: int) -> str:
    """`` (neuron): activation 0.52, input 1.2, influence 0.35`` for the hover line."""
    parts = []
    for name in ("activation", "input", "influence"):
        v = _finite(getattr(g.nodes, name)[i])
        if v is not None:
            parts.append(f"{name} {fmt(v)}")
    kind = str(g.nodes.kind[i])
    return f" ({kind})" + (": " + ", ".join(parts) if parts else "")


def _edge_note(g: AttributionGraph, e: int, labels: list) -> str:
    s, d = int(g.src[e]), int(g.dst[e])
    text = (
        f"{labels[s].full_text()} \u2192 {labels[d].full_text()}: weight {fmt(float(g.weight[e]))}"
    )
    flow = _finite(g.flow[e])
    if flow is not None:
        text += f", flow {fmt(flow)}"
    if g.loadings is not None and g.head_names is not None:
        load = np.nan_to_num(np.asarray(g.loadings[e], dtype=np.float64))
        top = [j for j in np.argsort(-np.abs(load), kind="stable")[:3] if load[j] != 0]
        if top:
            text += "; carried by " + ", ".join(
                f"{g.head_names[j]} {fmt(float(load[j]))}" for j in top
            )
    return text


def _caption(g: AttributionGraph, drawn: int) -> tuple[str, str]:
    """(title, note) of the figure."""
    target = token_label(g.meta.get("target_label", "?"), 30).text()
    explains = str(g.meta.get("explains", "logit"))
    value = _finite(g.meta.get("logit"))
    title = (
        f"Attribution graph of the {explains} of {target} at position "
        f"{g.meta.get('pos', '?')}" + (f" = {fmt(value)}" if value is not None else "")
    )
    kinds = [
        f"{int((g.nodes.kind == k).sum())} {KIND_NAMES[k]}" for k in KIND_NAMES
        if (g.nodes.kind == k).any()
    ]  # fmt: skip
    hidden = g.n_edges - drawn
    note = f"{len(g)} nodes ({', '.join(kinds)}); {g.n_edges} edges"
    note += f": the {drawn} strongest by |flow| drawn, {hidden} hidden" if hidden else ", all drawn"
    if g.meta.get("exact", True):
        try:
            note += f"; completeness {g.completeness_score:.3f}"
        except (ValueError, ZeroDivisionError, FloatingPointError):
            pass
    return title, note


def _legend(kinds: list, width: Real, y: Real) -> tuple[list, Real]:
    """Legend items (kinds, edge signs, what size and width mean) wrapped to ``width``;
    returns the elements and the height taken."""
    items = [(KIND_NAMES[k], ("node", KIND_COLOURS[k])) for k in KIND_NAMES if k in kinds]
    items += [
        ("positive weight", ("edge", POSITIVE)),
        ("negative weight", ("edge", NEGATIVE)),
        ("node area: |influence| on the logit; edge width: |flow|", ("text", "")),
    ]
    out, x, line = [], 8.0, 0
    for name, (what, colour) in items:
        w = text_width(name, FONT_PX) + (20 if what != "text" else 0) + 10
        if x + w > width - 8 and x > 8:
            x, line = 8.0, line + 1
        yy = y + 16 * line
        if what == "node":
            out.append(f'<circle cx="{x + 5:.1f}" cy="{yy - 3.5:.1f}" r="5" fill="{colour}"/>')
        elif what == "edge":
            out.append(
                f'<line x1="{x:.1f}" x2="{x + 14:.1f}" y1="{yy - 3.5:.1f}" y2="{yy - 3.5:.1f}" '
                f'stroke="{colour}" stroke-width="2.5"/>'
            )
        tx = x + (20 if what != "text" else 0)
        out.append(
            f'<text x="{tx:.1f}" y="{yy:.1f}" font-size="{FONT_PX}" fill="#444444">'
            f"{esc(name)}</text>"
        )
        x += w
    return out, 16.0 * (line + 1)


def _boxes_overlap(a: tuple, b: tuple) -> bool:
    return bool(a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3])


def _node_labels(g: AttributionGraph, lay: _Layout, n_labels: int, width: Real, top: Real) -> list:
    """Text labels of the ``n_labels`` nodes of largest ``|influence|`` (and the logit),
    each right of its node, else left of it, else not drawn (labels never overlap)."""
    infl = np.abs(np.nan_to_num(np.asarray(g.nodes.influence, dtype=np.float64)))
    logit = [int(i) for i in np.nonzero(lay.kind == "logit")[0]]
    others = [
        int(i)
        for i in np.argsort(-infl, kind="stable")
        if lay.kind[i] not in ("logit", "const") and infl[i] > 0
    ][:n_labels]
    boxes: list = [  # the constants' labels are drawn already
        (
            float(lay.x[i]) + R_ALONE + 4,
            float(lay.y[i]) + 3.5 - FONT_PX - 1,
            float(lay.x[i]) + R_ALONE + 4 + text_width(lay.labels[i].short, FONT_PX),
            float(lay.y[i]) + 6.5,
        )
        for members in lay.consts.values()
        for i in members
    ]
    out = []
    for i in logit + others:
        lab = lay.labels[i]
        w = text_width(lab.short, FONT_PX)
        x, y, r = float(lay.x[i]), float(lay.y[i]), float(lay.r[i])
        spots = (  # (anchor, text x, baseline y, box left)
            ("start", x + r + 3, y + FONT_PX / 2 - 1, x + r + 3),
            ("end", x - r - 3, y + FONT_PX / 2 - 1, x - r - 3 - w),
            ("middle", x, y - r - 3, x - w / 2),
            ("middle", x, y + r + FONT_PX + 1, x - w / 2),
        )
        for anchor, tx, ty, x0 in spots:
            box = (x0, ty - FONT_PX - 1, x0 + w, ty + 3)
            if box[0] < 2 or box[2] > width - 2 or box[1] < top:
                continue
            padded = (box[0] - LABEL_GAP, box[1], box[2] + LABEL_GAP, box[3])
            if any(_boxes_overlap(padded, b) for b in boxes):
                continue
            boxes.append(box)
            out.append(
                f'<text class="tlp-label" x="{tx:.1f}" y="{ty:.1f}" '
                f'text-anchor="{anchor}" font-size="{FONT_PX}" fill="#111111" '
                f'stroke="#ffffff" stroke-width="3" paint-order="stroke" '
                f'pointer-events="none">{lab.svg()}</text>'
            )
            break
    return out


def _draw(g: AttributionGraph, max_edges: int, n_labels: int) -> tuple[str, dict]:
    """The SVG and the data its script reads (node labels and values, drawn edges)."""
    lay = _Layout(g)
    drawn = _drawn_edges(g, max_edges)
    title, note = _caption(g, len(drawn))
    # the width first (title lines, legend and token labels depend on it)
    tok_w = [text_width(t.short, FONT_PX) for t in lay.tok]
    lay.place(0.0)
    rotate = any(w > cw - 4 for w, cw in zip(tok_w, lay.col_w))
    const_right = lay.const_x + R_ALONE + 4 + lay.const_w if lay.consts else lay.grid_right
    tok_right = max(
        (float(lay.col_x[c] + lay.col_w[c] / 2) + (0.72 * w if rotate else w / 2))
        for c, w in enumerate(tok_w)
    )
    width = max(520.0, const_right + 8, tok_right + 12)
    head, th = title_lines(title, width)
    body = list(head)
    per_line = max(30, int((width - 16) * 10 / text_width("x" * 10, 11)))
    lines = textwrap.wrap(note, per_line, max_lines=3, placeholder="\u2026") or [note]
    for k, line in enumerate(lines):
        body.append(
            f'<text x="8" y="{th + 14 + 14 * k:.1f}" font-size="11" fill="#555555">'
            f"{esc(line)}</text>"
        )
    y = th + 14 * len(lines) + 20
    legend, lh = _legend(sorted(set(lay.kind.tolist())), width, y)
    body += legend
    top = y + lh + 6
    lay.place(top)
    # row bands and names, column guides
    for r in range(lay.top_row, -1, -1):
        y0, y1 = lay.row_y[r]
        if r % 2 == 0:
            body.append(
                f'<rect x="{lay.left - 4:.1f}" y="{y0:.1f}" width="{width - lay.left:.1f}" '
                f'height="{y1 - y0:.1f}" fill="#f6f6f6"/>'
            )
        body.append(
            f'<text x="8" y="{(y0 + y1) / 2 + 4:.1f}" font-size="11" fill="#333333">'
            f"{esc(lay.row_names[r])}</text>"
        )
    for c in range(1, lay.n_pos):
        x = float(lay.col_x[c])
        body.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top:.1f}" y2="{lay.bottom:.1f}" '
            f'stroke="#e4e4e4"/>'
        )
    if lay.consts:
        x = lay.grid_right + 12
        body.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top:.1f}" y2="{lay.bottom:.1f}" '
            f'stroke="#bbbbbb" stroke-dasharray="3,3"/>'
        )
        body.append(
            f'<text x="{x + 6:.1f}" y="{lay.bottom + 14:.1f}" font-size="{FONT_PX}" '
            f'fill="#555555">constants</text>'
        )
    # position numbers and tokens under the grid
    for c, t in enumerate(lay.tok):
        x = float(lay.col_x[c] + lay.col_w[c] / 2)
        body.append(
            f'<text x="{x:.1f}" y="{lay.bottom + 14:.1f}" text-anchor="middle" '
            f'font-size="{FONT_PX}" fill="#777777">{c}</text>'
        )
        y = lay.bottom + 28
        if rotate:
            body.append(
                f'<text x="{x:.1f}" y="{y:.1f}" font-size="{FONT_PX}" fill="#222222" '
                f'transform="rotate(45 {x:.1f} {y:.1f})">{t.svg()}</text>'
            )
        else:
            body.append(
                f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="middle" font-size="{FONT_PX}" '
                f'fill="#222222">{t.svg()}</text>'
            )
    tok_h = max(0.72 * w for w in tok_w) + 14 if rotate else 14.0
    height = lay.bottom + 28 + tok_h + 8
    # edges (weakest first), then nodes on top
    strength = _strength(g)
    smax = float(strength[drawn].max(initial=0.0)) or 1.0
    edges = []
    body.append('<g class="tlp-edges" fill="none">')
    for j, e in enumerate(drawn):
        s, d = int(g.src[e]), int(g.dst[e])
        x1, y1, x2, y2 = lay.x[s], lay.y[s], lay.x[d], lay.y[d]
        ym = (y1 + y2) / 2
        colour = POSITIVE if float(g.weight[e]) >= 0 else NEGATIVE
        w = 0.5 + 3.5 * float(strength[e]) / smax
        body.append(
            f'<path class="tlp-edge" data-e="{j}" d="M{x1:.1f},{y1:.1f} C{x1:.1f},{ym:.1f} '
            f'{x2:.1f},{ym:.1f} {x2:.1f},{y2:.1f}" stroke="{colour}" stroke-width="{w:.2f}" '
            f'stroke-opacity="0.55"><title>{esc(_edge_note(g, int(e), lay.labels))}</title>'
            "</path>"
        )
        edges.append([s, d])
    body.append("</g>")
    infos = []
    body.append('<g class="tlp-nodes">')
    for i in range(len(g)):
        lab = lay.labels[i]
        values = _node_values(g, i)
        infos.append([lab.full, values])
        kind = str(lay.kind[i])
        body.append(
            f'<g class="tlp-node" data-n="{i}" data-kind="{esc(kind)}" tabindex="0">'
            f'<circle cx="{lay.x[i]:.1f}" cy="{lay.y[i]:.1f}" r="{lay.r[i]:.2f}" '
            f'fill="{KIND_COLOURS.get(kind, "#999999")}" stroke="#ffffff" stroke-width="1">'
            f"<title>{esc(lab.full_text() + values)}</title></circle></g>"
        )
    body.append("</g>")
    for members in lay.consts.values():
        for i in members:
            lab = lay.labels[i]
            body.append(
                f'<text class="tlp-const" x="{lay.x[i] + R_ALONE + 4:.1f}" '
                f'y="{lay.y[i] + 3.5:.1f}" '
                f'font-size="{FONT_PX}" fill="#444444">{lab.svg()}</text>'
            )
    body += _node_labels(g, lay, n_labels, width, top)
    return svg_document(width, height, body), {"n": infos, "e": edges}


def _qk_lines(g: AttributionGraph, tokens: list) -> list:
    """One line per ``qk`` record: which head attended from where to where, and why (its
    largest score terms)."""

    def tok(p: Any) -> str:
        try:
            return tokens[int(p)].text()
        except (IndexError, TypeError, ValueError):
            return "?"

    out = []
    for rec in g.qk or []:
        line = (
            f"{rec.get('head', '?')} at query {rec.get('query', '?')} ({tok(rec.get('query'))}) "
            f"attended key {rec.get('key', '?')} ({tok(rec.get('key'))})"
        )
        att = _finite(rec.get("attention"))
        if att is not None:
            line += f" with weight {fmt(att)}"
        result = rec.get("result")
        if result is not None:
            try:
                top = result.top(3, batch=0, pos=0, constants=True)
                terms = ", ".join(
                    f"{c} {fmt(float(v))}" for c, v in zip(top.component, top.value) if v != 0
                )
                line += f"; score vs key {rec.get('contrast_key', '?')}: {terms}"
            except Exception:  # noqa: BLE001 - a line of a caption never breaks the view
                pass
        elif rec.get("refused"):
            line += f"; not explained: {rec['refused']}"
        out.append(line)
    return out


# ---------------------------------------------------------------------------- the view
class GraphView(View):
    """The interactive graph: :meth:`fragment` is the SVG, a hover line and the script;
    :meth:`figures` the plain SVG (for ``save_svg``)."""

    def __init__(self, graph: AttributionGraph, max_edges: int, labels: int) -> None:
        self.graph = graph
        self.svg, self.data = _draw(graph, max_edges, labels)
        self.title = "attribution graph"
        self.qk_lines = _qk_lines(graph, _Layout(graph).tok)

    def figures(self) -> list[Figure]:
        return [Figure(self.svg, title=self.title, data={"edges": self.data["e"]})]

    def fragment(self, *, bundle: bool) -> str:
        root = new_id("tlp-graph")
        svg = self.svg.replace("max-width:100%;height:auto", "max-width:none", 1)
        qk = "".join(f'<li style="{WRAP}">{esc(line)}</li>' for line in self.qk_lines)
        qk = (
            f'<div style="font-size:12px;margin:6px 0 0">Why the heads of the largest '
            f'loadings attended:<ul style="margin:2px 0 0 18px;padding:0">{qk}</ul></div>'
            if qk
            else ""
        )
        return (
            f'<div class="tlprisms-view tlprisms-graph" id="{root}" style="margin:8px 0;'
            f'font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif">'
            f'<div class="tlp-graph-canvas" style="overflow-x:auto">{svg}</div>'
            f'<div class="tlp-graph-info" style="font-size:12px;color:#333;margin:4px 0;'
            f'min-height:16px;{WRAP}">{esc(IDLE)}</div>{qk}</div>'
            f"<script>{_script(root, self.data)}</script>"
        )

    def __repr__(self) -> str:
        return f"GraphView({self.graph!r})"


def _script(root: str, data: dict) -> str:
    """The inline script: hover fills the info line, click highlights a node's paths."""
    return (
        "(function(){"
        f"var root=document.getElementById({script_json(root)});if(!root){{return;}}"
        f"var D={script_json(data)},N=[],E=[],sel=-1;"
        "root.querySelectorAll('[data-n]').forEach(function(el){N[+el.getAttribute('data-n')]=el;});"
        "root.querySelectorAll('[data-e]').forEach(function(el){E[+el.getAttribute('data-e')]=el;});"
        "var info=root.querySelector('.tlp-graph-info'),idle=info.textContent;"
        "var out=D.n.map(function(){return [];}),inc=D.n.map(function(){return [];});"
        "D.e.forEach(function(e,j){out[e[0]].push(j);inc[e[1]].push(j);});"
        "function walk(start,adj,end,nodes,edges){var stack=[start],seen={};seen[start]=1;"
        "while(stack.length){var v=stack.pop();adj[v].forEach(function(j){edges[j]=1;"
        "var w=D.e[j][end];nodes[w]=1;if(!seen[w]){seen[w]=1;stack.push(w);}});}}"
        "function say(i){info.textContent='';if(i<0){info.textContent=idle;return;}"
        "var b=document.createElement('bdi');b.textContent=D.n[i][0];info.appendChild(b);"
        "info.appendChild(document.createTextNode(D.n[i][1]));}"
        "function paint(){var nodes={},edges={};if(sel>=0){nodes[sel]=1;"
        "walk(sel,inc,0,nodes,edges);walk(sel,out,1,nodes,edges);}"
        "N.forEach(function(el,i){if(!el){return;}var on=sel>=0&&nodes[i];"
        "el.classList.toggle('tlp-on',!!on);el.classList.toggle('tlp-sel',i===sel);"
        "el.setAttribute('opacity',sel<0||on?'1':'0.2');"
        "var c=el.firstElementChild;if(c){c.setAttribute('stroke',i===sel?'#000000':'#ffffff');"
        "c.setAttribute('stroke-width',i===sel?'2.5':'1');}});"
        "E.forEach(function(el,j){if(!el){return;}var on=sel>=0&&edges[j];"
        "el.classList.toggle('tlp-on',!!on);"
        "el.setAttribute('stroke-opacity',sel<0?'0.55':on?'0.95':'0.05');});}"
        "N.forEach(function(el,i){if(!el){return;}"
        "el.addEventListener('mouseenter',function(){say(i);});"
        "el.addEventListener('mouseleave',function(){say(sel);});"
        "function pick(ev){ev.stopPropagation();sel=sel===i?-1:i;paint();say(sel);}"
        "el.addEventListener('click',pick);"
        "el.addEventListener('keydown',function(ev){if(ev.key==='Enter'||ev.key===' '){"
        "ev.preventDefault();pick(ev);}});});"
        "var svg=root.querySelector('svg');if(svg){svg.addEventListener('click',function(){"
        "if(sel>=0){sel=-1;paint();say(-1);}});}"
        # a graph wider than its view scrolls: show the logit (usually the last position)
        "var box=root.querySelector('.tlp-graph-canvas'),lg=root.querySelector("
        "'.tlp-node[data-kind=\"logit\"] circle');if(box&&lg&&box.scrollWidth>box.clientWidth)"
        "{var r=lg.getBoundingClientRect(),b=box.getBoundingClientRect();"
        "box.scrollLeft=Math.max(0,r.left-b.left-0.7*box.clientWidth);}"
        "})();"
    )


# ---------------------------------------------------------------------------- entry points
def _options(max_edges: Any, labels: Any, caller: str) -> tuple[int, int]:
    return (
        check.count(max_edges, "max_edges", caller, minimum=0),
        check.count(labels, "labels", caller, minimum=0),
    )


def _graph(g: Any, caller: str) -> AttributionGraph:
    if not isinstance(g, AttributionGraph):
        raise ArgumentError(
            f"{caller}: pass an AttributionGraph (what LogitPrism.graph returns), got "
            f"{type(g).__name__}."
        )
    if len(g) == 0:
        raise ArgumentError(f"{caller}: the graph has no nodes; there is nothing to draw.")
    return g


@check.entry
def graph_view(g: AttributionGraph, *, max_edges: int = MAX_EDGES, labels: int = LABELS) -> View:
    """The interactive view of ``g``: the ``max_edges`` strongest edges by ``|flow|`` drawn
    (the caption counts the rest), the ``labels`` nodes of largest ``|influence|`` labelled
    on the graph (every node's label is on hover)."""
    caller = "graph_view"
    max_edges, labels = _options(max_edges, labels, caller)
    return GraphView(_graph(g, caller), max_edges, labels)


@check.entry
def graph_svg(g: AttributionGraph, *, max_edges: int = MAX_EDGES, labels: int = LABELS) -> str:
    """The graph as one plain SVG figure (no script: hover tooltips only)."""
    caller = "graph_svg"
    max_edges, labels = _options(max_edges, labels, caller)
    return _draw(_graph(g, caller), max_edges, labels)[0]


@check.entry
def graph_views(g: AttributionGraph, *, max_edges: int = MAX_EDGES, labels: int = LABELS) -> list:
    """What a page shows for ``g`` (``to_html(g)``, ``g.show()``, a report section): the
    interactive :func:`graph_view`."""
    return [graph_view(g, max_edges=max_edges, labels=labels)]
