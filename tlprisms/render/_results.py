"""Views of the results that are not decompositions: :class:`~tlprisms.Verification`,
:class:`~tlprisms._causal.effects.Effects` and the ``tlprisms.weights`` maps.

Each function takes the result first; :mod:`tlprisms.render` registers them for their types
(:func:`tlprisms._core.views.register`), so the result types never import rendering.
"""

from typing import Any

import torch

from tlprisms._causal.certificate import Verification
from tlprisms._causal.effects import Effects
from tlprisms.render._escape import esc
from tlprisms.render._svg import heatmap_svg
from tlprisms.render._svg_plots import lines_svg, scatter_svg
from tlprisms.weights import TokenMap, TokenProjection

#: how many points a verification or effects scatter labels (the farthest from the origin)
EXTREME_LABELS = 8
#: template lines are scaled each to its own largest |value| when their ranges differ by more
PER_LINE_RATIO = 5.0

__all__ = [
    "verification_svg",
    "verification_views",
    "effects_svg",
    "effects_views",
    "token_map_views",
    "token_projection_views",
]


def verification_svg(v: Verification) -> str:
    """Each checked term against minus its measured change: on the diagonal when right."""
    points = torch.stack([v.terms, -v.change], 1).numpy()
    labels = [str(x) for x in v.components]
    return scatter_svg(
        points,
        labels,
        f"term (x) vs minus the change when removed (y): {v.checked_terms()}",
        label_extremes=EXTREME_LABELS,
    )


def verification_views(v: Verification) -> list:
    """The one-line certificate, then :func:`verification_svg`."""
    return [f'<div style="font-size:13px;margin:4px 0">{esc(str(v))}</div>', verification_svg(v)]


def effects_svg(e: Effects, target: int = 0) -> str:
    """Direct term (x) against total effect (y), one point per component (mean over rows)."""
    pts = torch.stack([e.direct[:, target].mean(0), e.total[:, target].mean(0)], 1)
    return scatter_svg(
        pts.numpy(),
        [str(c) for c in e.components],
        f"direct term (x) vs total effect, {e.ablation} ablation (y)",
        label_extremes=EXTREME_LABELS,
    )


def effects_views(e: Effects) -> list:
    """:func:`effects_svg` of the first target."""
    return [effects_svg(e)]


def token_map_views(m: TokenMap) -> list:
    """The map as a heatmap; with weights, the templates and their weighted sum as lines."""
    out: list[Any] = [
        heatmap_svg(
            m.values.detach().float().cpu().numpy(),
            list(map(str, m.rows)),
            list(map(str, m.cols)),
            m.title,
        )
    ]
    if m.weights is not None:
        series = {str(r): m.values[i].tolist() for i, r in enumerate(m.rows)}
        series["weighted sum"] = m.weighted_sum().tolist()
        peaks = [max(abs(x) for x in vals) for vals in series.values()]
        per_line = min(peaks) > 0 and max(peaks) / min(peaks) > PER_LINE_RATIO
        out.append(
            lines_svg(
                series,
                list(map(str, m.cols)),
                f"{m.title}: templates and weighted sum",
                highlight="weighted sum",
                scale="per_line" if per_line else "shared",
            )
        )
    return out


def token_projection_views(p: TokenProjection) -> list:
    """The projected tokens as a scatter plot."""
    return [scatter_svg(p.points.detach().float().cpu().numpy(), list(map(str, p.labels)), p.title)]
