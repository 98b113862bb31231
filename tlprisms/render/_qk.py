"""Views of a QK result (:meth:`tlprisms.LogitPrism.qk`): the pair matrix, the query's
sources coloured by their score terms, and a head's pattern with CircuitsVis.

* :func:`pair_matrix`: query-side writers (rows) x key-side writers (columns) for one key,
  as an SVG heatmap; with fine splits only the rows and columns of largest total ``|term|``
  are drawn, the others summed into one ``(other)`` row / column, so the cells still add up
  to the score.
* :func:`query_sources`: when the query side is split into heads x sources, each input
  token coloured by the summed score terms of the heads reading it (CircuitsVis
  ``ColoredTokens``).
* :func:`attention_pattern`: a head's (or several heads') recorded pattern with CircuitsVis
  ``AttentionPattern`` / ``AttentionHeads``.
"""

from collections.abc import Sequence
from typing import Any, Optional

import numpy as np
import torch

from tlprisms._core import arguments as check
from tlprisms._core.errors import ArgumentError
from tlprisms._core.result import Decomposition
from tlprisms._core.sparse import component_row
from tlprisms._prisms.qk_table import PairTable, side_label
from tlprisms.render._escape import token_label
from tlprisms.render._svg import heatmap_svg
from tlprisms.render._tokens import TOKEN_CSS, colored_token, tokens_of
from tlprisms.render._views_base import Figure, Widget

__all__ = ["pair_matrix", "query_sources", "attention_pattern", "is_pairs", "qk_default_view"]

#: rows / columns a pair matrix draws before summing the rest into "(other)"
MAX_SIDE = 24


def is_pairs(result: Any) -> bool:
    """Whether ``result`` is a QK result (its components are pairs)."""
    return isinstance(result, Decomposition) and result.components.is_pairs


def _pairs(result: Decomposition) -> PairTable:
    """The result's pair table."""
    table = result.components
    assert isinstance(table, PairTable)
    return table


def _check(result: Any, caller: str) -> Decomposition:
    if not is_pairs(result):
        raise ArgumentError(
            f"{caller}: pass a QK result (what LogitPrism.qk returns), got {type(result).__name__}."
        )
    return result


def _values(result: Decomposition, batch: int, target: int, caller: str) -> np.ndarray:
    B, _, K, _ = result.values.shape
    b = check.in_range(batch, B, "batch", caller, of=f" ({B} rows)")
    t = check.in_range(target, K, "target", caller, of=f" ({K} keys)")
    if result.index is not None:  # sparse: the slots scattered onto every pair (0: dropped)
        n = len(result.components)
        row = component_row(result.values, result.index, n, t, b, 0)
        return row[0, 0].detach().float().cpu().numpy()
    return result.values[b, 0, t].detach().float().cpu().numpy()


def _side_labels(table: Any) -> list[str]:
    return [side_label(c) for c in table]


def _fold(m: np.ndarray, axis: int, labels: list[str], n: int) -> tuple[np.ndarray, list[str]]:
    """Keep the ``n`` rows (axis 0) or columns (axis 1) of largest total |value|."""
    size = m.shape[axis]
    if size <= n:
        return m, labels
    weight = np.abs(m).sum(1 - axis)
    keep = np.sort(np.argsort(-weight, kind="stable")[: n - 1])
    rest = np.setdiff1d(np.arange(size), keep)
    kept = np.take(m, keep, axis=axis)
    other = np.take(m, rest, axis=axis).sum(axis, keepdims=True)
    return np.concatenate([kept, other], axis=axis), [labels[i] for i in keep] + [
        f"(other {len(rest)})"
    ]


@check.entry
def pair_matrix(
    result: Decomposition, *, batch: int = 0, target: int = 0, top: int = MAX_SIDE
) -> Figure:
    """The score of key ``target`` as a matrix: query writers x key writers (SVG heatmap)."""
    caller = "pair_matrix"
    result = _check(result, caller)
    top = check.count(top, "top", caller, minimum=2)
    v = _values(result, batch, target, caller)
    c = _pairs(result)
    nq, nk = len(c.q), len(c.k)
    m = np.zeros((nq, nk))
    np.add.at(m, (c.qi, c.ki), v)
    rows, cols = _side_labels(c.q), _side_labels(c.k)
    m, rows = _fold(m, 0, rows, top)
    m, cols = _fold(m, 1, cols, top)
    label = result.target_labels.reshape(-1)[target] if result.target_labels.size > 1 else ""
    req = result.request
    keys = "between keys" if req is not None and req.contrast else "at key"
    title = (
        f"{result.prism}: {result.explains} {keys} {label}, the sum of the cells ({m.sum():+.4g})"
    )
    svg = heatmap_svg(m, [f"q: {r}" for r in rows], [f"k: {k}" for k in cols], title)
    return Figure(svg, title, data={"matrix": m, "rows": rows, "cols": cols})


@check.entry
def query_sources(result: Decomposition, *, batch: int = 0, target: int = 0) -> Widget:
    """The input tokens coloured by the score terms of the query-side heads reading them
    (needs a result made with ``q_heads=...`` and ``by_source=True``)."""
    caller = "query_sources"
    result = _check(result, caller)
    c = _pairs(result)
    src = c.q.src[c.qi]
    head = c.q.kinds()[c.qi] == "head"
    if not bool((head & (src >= 0)).any()):
        raise ArgumentError(
            f"{caller}: this QK result has no query-side heads split by source; make it "
            "with prism.qk(layer, head, q_heads='all') (by_source=True)."
        )
    v = _values(result, batch, target, caller)
    tokens = tokens_of(result, batch)
    values = np.zeros(len(tokens))
    idx = np.nonzero(head & (src >= 0))[0]
    np.add.at(values, src[idx], v[idx])
    vmax = float(np.abs(values).max()) or 1.0
    labels = [token_label(t) for t in tokens]
    return Widget(
        "ColoredTokens",
        {
            "tokens": [
                colored_token(lab, j, float(x)) for j, (lab, x) in enumerate(zip(labels, values))
            ],
            "values": [float(x) for x in values],
            "minValue": -vmax,
            "maxValue": vmax,
        },
        title=f"{result.prism}: query-side sources' terms for the {result.explains}",
        note=f"blue raises the score, red lowers it; scale \u00b1{vmax:.3g}",
        css=TOKEN_CSS,
    )


#: an attention pattern's square: this many pixels per token plus the axis labels' margin,
#: at most PATTERN_MAX_PX wide (CircuitsVis draws it as wide as its container otherwise)
PATTERN_PX_PER_TOKEN = 48
PATTERN_MARGIN_PX = 160
PATTERN_MAX_PX = 720


@check.entry
def attention_pattern(
    pattern: Any, tokens: Sequence[str], *, title: str = "", head_names: Optional[list] = None
) -> Widget:
    """A recorded pattern with CircuitsVis: ``[query, key]`` (``AttentionPattern``) or
    ``[heads, query, key]`` (``AttentionHeads``), e.g.
    ``cache["blocks.9.attn.hook_pattern"][0, 6]``."""
    caller = "attention_pattern"
    if not isinstance(pattern, torch.Tensor) or pattern.ndim not in (2, 3):
        raise ArgumentError(
            f"{caller}: pattern must be a tensor [query, key] or [heads, query, key]; got "
            f"{type(pattern).__name__}."
        )
    toks = [str(t) for t in tokens]
    if pattern.shape[-1] != len(toks) or pattern.shape[-2] != len(toks):
        raise ArgumentError(
            f"{caller}: the pattern is {tuple(pattern.shape)} but {len(toks)} tokens were "
            "given; pass one token per position."
        )
    p = pattern.detach().float().cpu().tolist()
    if pattern.ndim == 2:
        # the component draws a square as wide as its container: size it by the tokens
        side = min(PATTERN_MAX_PX, PATTERN_PX_PER_TOKEN * len(toks) + PATTERN_MARGIN_PX)
        css = f">div{{max-width:{side}px !important}}"
        return Widget("AttentionPattern", {"tokens": toks, "attention": p}, title=title, css=css)
    props: dict = {"tokens": toks, "attention": p}
    if head_names is not None:
        props["headLabels"] = [str(h) for h in head_names]
    return Widget("AttentionHeads", props, title=title)


def qk_default_view(result: Decomposition, batch: int, target: int) -> list:
    """The default views of a QK result: the pair matrix, and the query's sources when the
    query side is split by source."""
    views: list = [pair_matrix(result, batch=batch, target=target)]
    c = _pairs(result)
    if bool(((c.q.kinds() == "head") & (c.q.src >= 0)).any()) and result.str_tokens is not None:
        try:
            views.append(query_sources(result, batch=batch, target=target))
        except Exception:  # noqa: BLE001 - circuitsvis missing: the matrix still shows
            pass
    return views
