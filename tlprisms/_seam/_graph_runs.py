"""Forward passes of the frozen model that check an attribution graph.

:func:`rerun_frozen` runs copies of one prompt with every norm scale held at the cache and
every layer's queries and keys held (so every attention pattern is the recorded one, also on
bridges that recompute ``hook_pattern``); the caller edits the MLP activations (hold them,
remove a node, pass the input on by a frozen ratio) and reads the MLP inputs and the final
residual stream. Queries and keys are probed first: a model that ignores edits to them is
refused with the reason.
"""

import warnings
from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch
from torch import Tensor

from tlprisms._core.errors import UnsupportedModelError
from tlprisms._seam._hooks import Site
from tlprisms._seam._interventions import ignored_edits
from tlprisms._seam._model import ModelView

__all__ = ["rerun_frozen", "SCALE_SITES", "mlp_input_site"]

#: the norm scales a graph holds (where the model records them)
SCALE_SITES = (Site.LN1_SCALE, Site.LN2_SCALE, Site.LN1_POST_SCALE, Site.LN2_POST_SCALE)
#: TransformerLens warns when a norm scale is edited; these edits are the point
_SCALE_WARNING = ".*hook_scale.*"


def mlp_input_site(view: ModelView) -> Site:
    """Where a neuron's input is recorded: ``hook_pre`` (``hook_pre_linear`` when gated)."""
    return Site.MLP_PRE_LINEAR if view.gated else Site.MLP_PRE


def _held(value: Tensor, copies: int) -> Callable[[Tensor, Any], Tensor]:
    """A hook that returns ``value`` (one row ``[1, pos, ...]``) for every copy; a hook
    recorded with batch and positions flattened (OPT's ``ln2.hook_scale``: ``[batch * pos,
    1]``) gets it flattened the same way."""

    def hook(x: Tensor, hook: Any) -> Tensor:
        v = value.to(x.dtype).expand(copies, *value.shape[1:])
        return v.reshape(x.shape).clone()

    return hook


def rerun_frozen(
    view: ModelView,
    cache: Any,
    tokens: Tensor,
    row: int,
    copies: int,
    mlp_edits: dict,
    grab: Sequence[tuple[Site, Optional[int]]],
    caller: str,
) -> dict:
    """Run ``copies`` copies of batch row ``row`` of ``tokens`` with the norm scales, queries
    and keys of the cache held, ``mlp_edits[(site, layer)](x, cache_value) -> x`` applied
    (``x`` ``[copies, pos, ...]``), and return the ``grab`` sites as recorded then."""
    bad = ignored_edits(view, tokens, [Site.Q, Site.K])
    if bad:
        raise UnsupportedModelError(
            f"{caller}: this model ignores edits to {', '.join(map(repr, bad))} (its forward "
            "pass recomputes them after the hook), so the attention patterns cannot be held "
            "and the graph cannot be checked by intervention on it. Its exactness is checked "
            "by graph.check()."
        )
    x = tokens[row : row + 1].expand(copies, -1)
    hooks: list = []

    batch, n_ctx = tokens.shape

    def cached(site: Site, layer: Optional[int]) -> Tensor:
        v = cache[view.hook(site, layer)]
        if n_ctx > 1 and v.shape[0] == batch * n_ctx:  # flattened batch and positions
            v = v.view(batch, n_ctx, *v.shape[1:])
        return v[row : row + 1]

    for layer in range(view.n_layers):
        for site in (*SCALE_SITES, Site.Q, Site.K):
            if view.has_site(site, layer) and view.hook(site, layer) in cache:
                hooks.append((view.hook(site, layer), _held(cached(site, layer), copies)))
    if view.has_site(Site.FINAL_SCALE) and view.hook(Site.FINAL_SCALE) in cache:
        hooks.append((view.hook(Site.FINAL_SCALE), _held(cached(Site.FINAL_SCALE, None), copies)))
    for (site, layer), edit in mlp_edits.items():
        value = cached(site, layer)

        def hook(t: Tensor, hook: Any, edit: Any = edit, value: Tensor = value) -> Tensor:
            return edit(t.clone(), value.to(t.dtype))

        hooks.append((view.hook(site, layer), hook))
    out: dict = {}
    for g_site, g_layer in grab:

        def keep(t: Tensor, hook: Any, key: tuple = (g_site, g_layer)) -> None:
            out[key] = t.detach().clone()

        hooks.append((view.hook(g_site, g_layer), keep))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_SCALE_WARNING)
        warnings.filterwarnings("ignore", category=UserWarning)
        try:
            view.model.run_with_hooks(x, fwd_hooks=hooks)
        except (AttributeError, RuntimeError, TypeError) as exc:
            raise UnsupportedModelError(
                f"{caller}: TransformerLens cannot run this model with its norm scales, "
                f"queries and keys held ({type(exc).__name__}: {exc}), so the graph cannot be "
                "checked by intervention on it. Its exactness is checked by graph.check()."
            ) from exc
    return out
