"""Rendering for tlprisms: offline, self-contained HTML and plain SVG.

* :func:`to_html` / :func:`show`: any result, view or list of them as an HTML fragment that
  is safe to paste anywhere (a :class:`~tlprisms.Decomposition` shows a default view chosen
  by its components; other result types the views registered for them below; objects with
  ``_tlprisms_views()`` are rendered through it).
* :class:`Report`: several views in ONE self-contained HTML file.
* :func:`init_notebook`: in a Jupyter notebook's first cell, one output carrying the
  CircuitsVis bundle for every view of the notebook (saved, re-run or exported, they render).
* Views of a decomposition: :func:`bars` (terms adding up to the logit),
  :func:`layer_head_heatmap`, :func:`source_tokens` and :func:`head_source_map`
  (CircuitsVis widgets), :func:`top_tokens` (what one component promotes and suppresses),
  :func:`feature_terms` (a feature prism's terms with each feature's top tokens).
* Views of a QK result (:meth:`~tlprisms.LogitPrism.qk`): :func:`pair_matrix` (query writers
  x key writers), :func:`query_sources`, and a head's pattern with :func:`attention_pattern`.
* Plain SVG helpers for any numbers: :func:`heatmap_svg`, :func:`bar_svg`, :func:`lines_svg`,
  :func:`scatter_svg`; export with :func:`save_svg` (or :func:`save_png`, via a local
  headless Chromium).

Nothing here touches the network. CircuitsVis is never imported: its wheel's JavaScript
bundle is read and inlined (once per page), each widget mounted in its own element with
props escaped for a ``<script>``; tokens are always shown as text, never as markup.

>>> from tlprisms.render import bar_svg
>>> svg = bar_svg([1.0, -0.5], ["a", "</script>"], "terms", total=0.5)
>>> "</script>" in svg, "&lt;/script&gt;" in svg  # a label is text, never markup
(False, True)
"""

from tlprisms._causal.certificate import Verification
from tlprisms._causal.effects import Effects
from tlprisms._core import views as _registry
from tlprisms._core.graph import AttributionGraph
from tlprisms._core.result import Decomposition
from tlprisms.render._features import feature_terms
from tlprisms.render._page import Report, save_png, save_svg, show, to_html
from tlprisms.render._qk import attention_pattern, pair_matrix, query_sources
from tlprisms.render._results import (
    effects_svg,
    effects_views,
    token_map_views,
    token_projection_views,
    verification_svg,
    verification_views,
)
from tlprisms.render._svg import bar_svg, heatmap_svg
from tlprisms.render._svg_plots import lines_svg, scatter_svg
from tlprisms.render._top_tokens import TopTokens, top_tokens
from tlprisms.render._views import bars, head_source_map, layer_head_heatmap, source_tokens
from tlprisms.render._views_base import Figure, View, Widget, init_notebook
from tlprisms.render.graph import graph_svg, graph_views
from tlprisms.weights import TokenMap, TokenProjection

__all__ = [
    "to_html",
    "show",
    "init_notebook",
    "Report",
    "save_svg",
    "save_png",
    "bars",
    "layer_head_heatmap",
    "source_tokens",
    "head_source_map",
    "top_tokens",
    "pair_matrix",
    "query_sources",
    "attention_pattern",
    "heatmap_svg",
    "bar_svg",
    "lines_svg",
    "scatter_svg",
    "View",
    "Figure",
    "Widget",
    "TopTokens",
    "feature_terms",
    "graph_svg",
]

# How results are shown: registered for their types here, so that results never import
# rendering (tlprisms._core.views looks these up; ``import tlprisms`` imports this package).
_registry.register(Decomposition, html=to_html, show=show)
_registry.register(TokenMap, html=to_html, show=show, views=token_map_views)
_registry.register(TokenProjection, html=to_html, show=show, views=token_projection_views)
_registry.register(
    Verification, html=to_html, show=show, svg=verification_svg, views=verification_views
)
_registry.register(Effects, html=to_html, show=show, svg=effects_svg, views=effects_views)
_registry.register(AttributionGraph, html=to_html, show=show, svg=graph_svg, views=graph_views)
