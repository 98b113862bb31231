"""Views of a :class:`~tlprisms.Decomposition`: bars, layer x head heatmap, source tokens,
head x source maps, and the default view a result shows in Jupyter.

Every view shows one point of the result: a batch row, one of its explained positions and
one target (``batch=0, pos=-1, target=0`` by default: ``pos`` indexes the result's explained
positions, so -1 is the last one). Values are the result's own terms, never rescaled except
where a docstring says so; blue is positive (raises the explained logit), red negative.
"""

from collections.abc import Iterable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Optional, Union

import numpy as np
import torch

from tlprisms._core import arguments as check
from tlprisms._core.errors import ArgumentError, PositionError, PrismError, TargetError
from tlprisms._core.result import Decomposition
from tlprisms._core.table import KINDS
from tlprisms.prism import LogitPrism
from tlprisms.render import _args as arg
from tlprisms.render._escape import quote_token, token_label
from tlprisms.render._qk import qk_default_view
from tlprisms.render._svg import NEGATIVE, POSITIVE, bar_svg, fmt, heatmap_svg
from tlprisms.render._tokens import TOKEN_CSS, colored_token, tokens_of
from tlprisms.render._views_base import WRAP, Figure, Group, View, Widget, bundle_path

__all__ = ["bars", "layer_head_heatmap", "source_tokens", "head_source_map", "default_view"]

#: a selection of layers or heads: None or ``"all"`` (every one in the result), an index, or a
#: list of indices
Sel = Union[None, str, int, Iterable[int]]


@dataclass
class _Point:
    """One (batch, explained position, target) of a result."""

    values: np.ndarray  # [comp]
    batch: int
    p: int  # index into the result's pos axis
    target: int
    position: int  # the residual position explained
    logit: float
    label: str
    tokens: list  # token strings of the batch row (positions when unknown)
    known: bool  # tokens are real strings, not position labels

    def where(self) -> str:
        """``position 5 ' Paris' (batch 0)``: the token quoted, shortened and isolated."""
        if self.known and 0 <= self.position < len(self.tokens):
            return (
                f"position {self.position} {quote_token(self.tokens[self.position])} "
                f"(batch {self.batch})"
            )
        return f"position {self.position} (batch {self.batch})"


def _check_result(result: Any, caller: str) -> Decomposition:
    if not isinstance(result, Decomposition):
        hint = (
            f" Call a prism first, e.g. {caller}(prism.heads(target))."
            if isinstance(result, LogitPrism)
            else ""
        )
        raise ArgumentError(
            f"{caller}: expected a tlprisms Decomposition (what LogitPrism.residual/"
            f"heads/neurons return), got {type(result).__name__}.{hint}"
        )
    if result.index is not None:  # a sparse result (top_k=): its kept terms, laid out densely
        return result.to_dense()
    return result


#: per axis of a result: the error class, and what its entries are called
_AXES = {
    "batch": (ArgumentError, "batch row"),
    "pos": (PositionError, "explained position"),
    "target": (TargetError, "target"),
}


def _index(value: Any, n: int, what: str, caller: str) -> int:
    """An index into the result's ``what`` axis (``batch``, ``pos`` or ``target``)."""
    error, noun = _AXES[what]
    i = check.index(value, what, caller, error)
    if not -n <= i < n:
        also = " (pos indexes the result's explained positions, not the tokens)" * (what == "pos")
        raise error(
            f"{caller}: {what}={i} is out of range; the result has {n} {noun}"
            f"{'s' if n != 1 else ''}{also}: use 0..{n - 1}, or -{n}..-1 from the end."
        )
    return i % n


def _known(result: Decomposition, batch: int) -> bool:
    toks = result.str_tokens
    return toks is not None and batch < len(toks) and toks[batch] is not None


def _point(result: Decomposition, batch: Any, pos: Any, target: Any, caller: str) -> _Point:
    B, P, K, _ = result.values.shape
    b = _index(batch, B, "batch", caller)
    p = _index(pos, P, "pos", caller)
    t = _index(target, K, "target", caller)
    labels = np.broadcast_to(result.target_labels, (B, P, K))
    return _Point(
        values=result.values[b, p, t].detach().double().cpu().numpy(),
        batch=b,
        p=p,
        target=t,
        position=int(result.positions[b, p]),
        logit=float(result.explained[b, p, t]),
        label=_target(labels[b, p, t]),
        tokens=tokens_of(result, b),
        known=_known(result, b),
    )


def _target(label: Any) -> str:
    """A target label (``"' Paris'"``, ``"LogitDiff(...)"``) for a caption: shortened, isolated."""
    return token_label(label, 40).text()


def _every(value: Any) -> bool:
    """A selection of every layer or head: None or ``"all"``."""
    return value is None or (isinstance(value, str) and value == check.ALL)


def _head_indices(value: Any, caller: str) -> Optional[set]:
    """``heads=``: None or ``"all"`` (every head), a head index or a list of them."""
    if _every(value):
        return None
    is_one = check.is_index(value)
    if is_one:
        items = [value]
    elif isinstance(value, torch.Tensor) and value.ndim == 1:
        items = list(value)
    elif isinstance(value, (list, tuple, range, set, frozenset, np.ndarray)):
        items = list(value)
    else:
        why = " (a string is not a list of heads)" if isinstance(value, str) else ""
        raise ArgumentError(
            f"{caller}: heads={arg.describe(value)}; pass 'all', a head index or a list of "
            f"head indices{why}."
        )
    out = {check.index(h, "heads" if is_one else "heads entry", caller) for h in items}
    return out


def _head_mask(result: Decomposition, layers: Any, heads: Any, caller: str) -> np.ndarray:
    """The head terms of ``layers`` x ``heads`` (checked first); a layer or head the result has
    no head terms of is refused, naming the ones it has."""
    c = result.components
    keep = c.kinds() == "head"
    chosen_layers = None
    if layers is not None:  # "all" is checked (and kept whole) by layer_set
        n_layers = max([int(result.n_layers)] + [1 + int(x) for x in c.layer[keep]])
        view = SimpleNamespace(n_layers=n_layers)
        chosen_layers = check.layer_set(view, layers, "layers", caller)
    chosen_heads = _head_indices(heads, caller)
    _need_heads(result, keep, caller, by_source=False)
    have_layers = sorted(set(c.layer[keep].tolist()))
    have_heads = sorted(set(c.head[keep].tolist()))
    if chosen_layers is not None:
        missing = sorted(chosen_layers - set(have_layers))
        if missing:
            raise ArgumentError(
                f"{caller}: layers={layers!r}: the result has no head terms in layer"
                f"{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))}; it split "
                f"layers {have_layers} into heads. Pick among those, or decompose with "
                f"prism.heads(target, layers={missing})."
            )
        keep &= np.isin(c.layer, sorted(chosen_layers))
    if chosen_heads is not None:
        missing = sorted(chosen_heads - set(have_heads))
        if missing:
            raise ArgumentError(
                f"{caller}: heads={heads!r}: the result has no head "
                f"{', '.join(map(str, missing))}; its head terms are of heads "
                f"{have_heads}."
            )
        keep &= np.isin(c.head, sorted(chosen_heads))
    if not keep.any():
        raise ArgumentError(
            f"{caller}: layers={layers!r} and heads={heads!r} select no head term of the "
            "result; choose heads that it holds (result.select(kind='head') lists them)."
        )
    return keep


def _need_heads(result: Decomposition, keep: np.ndarray, caller: str, by_source: bool) -> None:
    if not keep.any():
        raise ArgumentError(
            f"{caller}: the result has no head terms (prism {result.prism!r}); "
            "use prism.heads(target) or prism.decompose(target, heads=...)."
        )
    if by_source and not (result.components.src[keep] >= 0).any():
        raise ArgumentError(
            f"{caller}: the head terms are not split by source position; use "
            "prism.heads(target, by_source=True) (the default)."
        )


def _kinds(kind: Any, caller: str) -> Optional[list]:
    """``kind=``: None (every kind), a kind or a list of kinds."""
    if kind is None:
        return None
    if isinstance(kind, str):
        kinds = [kind]
    elif isinstance(kind, (list, tuple, set, frozenset)):
        kinds = list(kind)
    else:
        raise ArgumentError(
            f"{caller}: kind={arg.describe(kind)}; pass a kind such as 'head' or a list of kinds."
        )
    for k in kinds:
        if not isinstance(k, str) or k not in KINDS:
            raise ArgumentError(
                f"{caller}: kind={k!r} is not a kind; use one of {', '.join(map(repr, KINDS))}."
            )
    return kinds


def _caption(result: Decomposition, pt: _Point) -> str:
    what = f"{result.explains} of {pt.label} at {pt.where()}"
    total = float(pt.values.sum())
    if result.complete:
        return (
            f"{result.prism} prism: {what} = {fmt(pt.logit)}; its {len(pt.values)} terms "
            f"sum to {fmt(total)} (gap {abs(total - pt.logit):.1e})."
        )
    return (
        f"{result.prism} prism, a selection: {len(pt.values)} terms of the {what} "
        f"({fmt(pt.logit)}); they sum to {fmt(total)}."
    )


# ---------------------------------------------------------------------------- bars
@check.entry
def bars(
    result: Decomposition,
    *,
    batch: int = 0,
    pos: int = -1,
    target: int = 0,
    k: int = 20,
    kind: Union[None, str, Iterable[str]] = None,
    order: str = "auto",
    waterfall: bool = True,
) -> Figure:
    """The terms as bars that add up to the logit: a waterfall ending in a total bar.

    Head terms are first summed over source positions (one bar per head). The bars shown
    are the non-constant components of ``kind`` (default: every kind); the biases are one
    bar, components of other kinds one more, and past ``k`` the smaller ones one "other"
    bar, so the bars always add up to the total (for a complete result: the logit).

    Args:
        result: a Decomposition.
        batch, pos, target: the point shown (``pos`` indexes the explained positions).
        k: at most this many individual bars.
        kind: only these component kinds get their own bars (e.g. ``"neuron"``).
        order: ``"stream"`` (the result's order: embeddings, then layer by layer),
            ``"abs"`` (largest ``|term|`` first), or ``"auto"`` (stream when all fit in k).
        waterfall: start each bar where the previous ended (else all start at zero).
    """
    caller = "bars"
    result = _check_result(result, caller)
    order = check.choice(order, "order", ("auto", "stream", "abs"), caller)
    k = check.count(k, "k", caller, minimum=0)
    waterfall = bool(arg.flag(waterfall, "waterfall", caller))
    kinds = _kinds(kind, caller)
    if (result.components.src >= 0).any():
        result = result.aggregate("kind", "layer", "head", "neuron", "pos")
    pt = _point(result, batch, pos, target, caller)
    c = result.components
    const = c.is_constant()
    if kinds is None:
        focus = ~const
    else:
        focus = np.isin(c.kinds(), kinds) & ~const
        if not focus.any():
            raise ArgumentError(
                f"{caller}: kind={kind!r}: the result has no (non-constant) components of "
                f"kind {kinds}; it has {sorted(set(c.kinds().tolist()))}."
            )
    idx = np.nonzero(focus)[0]
    v = pt.values
    if order == "auto":
        order = "stream" if len(idx) <= k else "abs"
    if order == "abs":
        idx = idx[np.argsort(-np.abs(v[idx]), kind="stable")]
    shown, rest = idx[:k], idx[k:]
    others = ~focus & ~const
    # never merge a term larger than the smallest one shown: it gets its own bar
    smallest = float(np.abs(v[shown]).min()) if len(shown) else np.inf
    big = np.nonzero(~const & (np.abs(v) > smallest))[0]
    promoted = np.setdiff1d(big, shown)
    if len(promoted):
        shown = np.concatenate([shown, promoted])
        if order == "abs":
            shown = shown[np.argsort(-np.abs(v[shown]), kind="stable")]
        else:
            shown = np.sort(shown)  # the stream's order
        rest = np.setdiff1d(rest, promoted)
        others[promoted] = False
    names = [str(c[int(i)]) for i in shown]
    vals = [float(v[i]) for i in shown]
    if len(rest):
        names.append(f"other {len(rest)} {_plural(c.kinds()[rest])}")
        vals.append(float(v[rest].sum()))
    if others.any():
        names.append(f"{int(others.sum())} {_plural(c.kinds()[others])}")
        vals.append(float(v[others].sum()))
    if const.any():
        names.append(f"biases ({int(const.sum())} terms)")
        vals.append(float(v[const].sum()))
    total = float(v.sum())
    total_label = f"= {result.explains}" if result.complete else "= sum of selection"
    title = f"{result.prism}: {result.explains} of {pt.label} at {pt.where()}"
    if result.complete:
        note = f"terms sum to {fmt(total)}; the model's {result.explains} is {fmt(pt.logit)}"
    else:
        note = f"a selection of terms: they sum to {fmt(total)} of {fmt(pt.logit)}"
    svg = bar_svg(
        vals, names, title, total, waterfall=waterfall, total_label=total_label, note=note
    )
    return Figure(svg, title, {"labels": names, "values": vals, "total": total, "logit": pt.logit})


def _plural(kinds: np.ndarray) -> str:
    uniq = sorted(set(str(x) for x in kinds))
    if len(uniq) == 1:
        return uniq[0] + "s"
    return "/".join(uniq[:4]) + ("/..." if len(uniq) > 4 else "") + " terms"


# ---------------------------------------------------------------------------- heads
@check.entry
def layer_head_heatmap(
    result: Decomposition, *, batch: int = 0, pos: int = -1, target: int = 0
) -> Figure:
    """Layer x head: each head's term summed over source positions.

    Rows are the layers the result split into heads, columns the heads; the value is the
    head's whole contribution to the explained logit (its ``b_O`` share is not in it: that
    is a separate constant term).
    """
    caller = "layer_head_heatmap"
    result = _check_result(result, caller)
    keep = _head_mask(result, None, None, caller)
    pt = _point(result, batch, pos, target, caller)
    c = result.components
    layers = sorted(set(int(x) for x in c.layer[keep]))
    n_heads = int(c.head[keep].max()) + 1
    m = np.zeros((len(layers), n_heads))
    row = {layer: i for i, layer in enumerate(layers)}
    idx = np.nonzero(keep)[0]
    rows = np.asarray([row[int(x)] for x in c.layer[idx]], dtype=np.int64)
    np.add.at(m, (rows, c.head[idx]), pt.values[idx])
    title = f"Heads (summed over sources): {result.explains} of {pt.label} at {pt.where()}"
    svg = heatmap_svg(m, [f"L{x}" for x in layers], [f"H{h}" for h in range(n_heads)], title)
    return Figure(svg, title, {"matrix": m, "layers": layers})


def _src_matrix(result: Decomposition, pt: _Point, keep: np.ndarray, n: int) -> np.ndarray:
    """``[n_src]`` sum of the kept head terms per source position."""
    c = result.components
    idx = np.nonzero(keep & (c.src >= 0))[0]
    out = np.zeros(n)
    np.add.at(out, c.src[idx], pt.values[idx])
    return out


def _full_tokens(labels: list) -> str:
    """A collapsed list of the full text of shortened token labels ('' if none was)."""
    cut = [(j, lab) for j, lab in enumerate(labels) if lab.shortened]
    if not cut:
        return ""
    items = "".join(f"<li>position {j}: {lab.html()}</li>" for j, lab in cut)
    return (
        f'<details style="font-size:11px;color:#555;margin:4px 0;{WRAP}"><summary>'
        f"{len(cut)} token label{'s' if len(cut) > 1 else ''} shortened; full text"
        f'</summary><ul style="margin:4px 0;padding-left:18px">{items}</ul></details>'
    )


@check.entry
def source_tokens(
    result: Decomposition,
    *,
    batch: int = 0,
    pos: int = -1,
    target: int = 0,
    layers: Sel = None,
    heads: Sel = None,
) -> Widget:
    """The input tokens coloured by the summed head terms that read each source position.

    A CircuitsVis ``ColoredTokens`` view: the value of token ``j`` is the sum over the chosen
    heads (default: all heads in the result) of their term for source ``j``; the colour
    scale is symmetric, ``+-max|value|``. Hover a token to see its full text and value
    (labels past 24 characters are shortened).
    """
    caller = "source_tokens"
    result = _check_result(result, caller)
    keep = _head_mask(result, layers, heads, caller)
    _need_heads(result, keep, caller, by_source=True)
    pt = _point(result, batch, pos, target, caller)
    values = _src_matrix(result, pt, keep, len(pt.tokens))
    vmax = float(np.abs(values).max()) or 1.0
    which = "all heads" if _every(layers) and _every(heads) else "the chosen heads"
    title = f"Source tokens: {which}' terms for the {result.explains} of {pt.label} at {pt.where()}"
    labels = [token_label(t) for t in pt.tokens]
    return Widget(
        "ColoredTokens",
        {
            # ColoredTokens inserts tokens as HTML
            "tokens": [
                colored_token(lab, j, float(x)) for j, (lab, x) in enumerate(zip(labels, values))
            ],
            "values": [float(x) for x in values],
            "minValue": -vmax,
            "maxValue": vmax,
            "negativeColor": NEGATIVE,
            "positiveColor": POSITIVE,
        },
        title=title,
        note=f"blue raises the {result.explains}, red lowers it; scale "
        f"\u00b1{fmt(vmax)}; the sum over sources is {fmt(float(values.sum()))}",
        css=TOKEN_CSS,
        footer=_full_tokens(labels),
    )


@check.entry
def head_source_map(
    result: Decomposition,
    *,
    batch: int = 0,
    target: int = 0,
    layers: Sel = None,
    heads: Sel = None,
    top: Optional[int] = 16,
) -> Widget:
    """One attention-pattern-style map per head whose cells are logit terms, not attention.

    A CircuitsVis ``AttentionHeads`` view. For head ``h``, cell ``(i, j)`` is the term of
    ``h`` reading source ``j`` in the decomposition of the logit at destination ``i``.
    Rows are filled only at the result's explained positions (one row for ``pos=-1``; use
    ``pos="all"`` in the prism for full maps); other rows are 0 (white). Values are NOT
    normalised per head: one symmetric scale ``+-max|term|`` over all heads shown, so
    colour intensity is comparable across heads; blue raises the logit, red lowers it.
    The upper triangle (future sources) is greyed out.

    Args:
        top: show the ``top`` heads with the largest summed ``|term|`` (None: all), in
            decreasing order; names carry the head's total, e.g. ``"L1H3 +0.52"``.
    """
    caller = "head_source_map"
    result = _check_result(result, caller)
    if top is not None:
        top = check.count(top, "top", caller)
    keep = _head_mask(result, layers, heads, caller)
    _need_heads(result, keep, caller, by_source=True)
    B, P, K, _ = result.values.shape
    b = _index(batch, B, "batch", caller)
    t = _index(target, K, "target", caller)
    toks = tokens_of(result, b) if _known(result, b) else [""] * len(tokens_of(result, b))
    n = len(toks)  # CircuitsVis labels the axes "token (position)"
    labels = [token_label(x) for x in toks]
    c = result.components
    idx = np.nonzero(keep & (c.src >= 0))[0]
    vals = result.values[b, :, t].detach().double().cpu().numpy()[:, idx]  # [P, comps]
    keys = sorted(set(zip(c.layer[idx].tolist(), c.head[idx].tolist())))
    slot = {key: i for i, key in enumerate(keys)}
    maps = np.zeros((len(keys), n, n))
    dest = result.positions[b].cpu().numpy()
    for p in range(P):
        np.add.at(
            maps,
            (
                np.asarray([slot[(int(la), int(h))] for la, h in zip(c.layer[idx], c.head[idx])]),
                dest[p],
                c.src[idx],
            ),
            vals[p],
        )
    score = np.abs(maps).sum((1, 2))
    order = np.argsort(-score, kind="stable")[: top if top is not None else len(keys)]
    vmax = float(np.abs(maps[order]).max()) if len(order) else 0.0
    vmax = vmax or 1.0
    label = _target(np.broadcast_to(result.target_labels, (B, P, K))[b, -1, t])
    names = [f"L{keys[i][0]}H{keys[i][1]} {fmt(float(maps[i].sum()))}" for i in order]
    title = (
        f"Heads x sources: terms of the {result.explains} of {label} (batch {b}), "
        f"{len(order)} of {len(keys)} heads by |terms|"
    )
    return Widget(
        "AttentionHeads",
        {
            "attention": [maps[i].tolist() for i in order],
            # drawn on a canvas as text: not HTML-escaped; shortened and isolated (FSI ... PDI),
            # the full text listed under the widget
            "tokens": [lab.text() if lab.full else "" for lab in labels],
            "attentionHeadNames": names,
            "minValue": -vmax,
            "maxValue": vmax,
            "negativeColor": NEGATIVE,
            "positiveColor": POSITIVE,
            "maskUpperTri": True,
        },
        title=title,
        note=f"rows: destination (explained) positions; columns: source positions; "
        f"one scale \u00b1{fmt(vmax)} for all heads; blue raises the logit",
        footer=_full_tokens(labels),
    )


# ---------------------------------------------------------------------------- default
@check.entry
def default_view(
    result: Decomposition,
    *,
    batch: int = 0,
    pos: int = -1,
    target: int = 0,
    caller: str = "to_html",
) -> Group:
    """What a result shows in Jupyter: chosen by its component kinds.

    Heads present: the layer x head heatmap, and the source tokens when split by source.
    Neurons present: bars of the largest neurons. Neither (residual prism): waterfall bars
    of every term. ``caller`` names the call in error messages.
    """
    result = _check_result(result, caller)
    pt = _point(result, batch, pos, target, caller)
    kinds = set(result.components.kinds().tolist())
    views: list[View] = []
    at: dict[str, Any] = dict(batch=pt.batch, pos=pt.p, target=pt.target)
    caption = _caption(result, pt)
    if "pair" in kinds:  # a QK result: the pair matrix (and the query's sources)
        views = qk_default_view(result, pt.batch, pt.target)
        return Group(views, caption=caption, title=f"{result.prism} prism")
    if "head" in kinds:
        views.append(layer_head_heatmap(result, **at))
        if (result.components.src[result.components.kinds() == "head"] >= 0).any():
            try:
                bundle_path()
            except PrismError:  # plain views still work without circuitsvis
                caption += " (pip install circuitsvis for the source-token view)"
            else:
                views.append(source_tokens(result, **at))
    if "neuron" in kinds:
        views.append(bars(result, kind="neuron", k=12, order="abs", **at))
    if not views:
        views.append(bars(result, **at))
    return Group(views, caption=caption, title=f"{result.prism} prism")
