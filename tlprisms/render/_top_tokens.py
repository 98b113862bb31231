"""The tokens one component promotes and suppresses: its write read out on the whole vocab.

For a component writing ``w`` into the final residual stream at position ``i`` of row ``b``,
the direct term it adds to token ``t``'s (pre-softcap) logit is, with the final norm frozen
at its cached scale ``s``,

    term_t = w . P(g * W_U[:, t]) / s

(``P`` centres for LayerNorm-type norms, ``g`` is the final norm's weight when not folded
into ``W_U``): exactly the term the residual/heads/neurons prisms give that component for
target ``t``. The writes, read from the cache:

* head ``h`` of layer ``l``: ``sum_j A[h,i,j] v[j, kv(h)] @ W_O[h]`` (one source ``j`` if
  the component has ``src``);
* neuron ``n``: ``post[i, n] * W_out[n]``;
* ``attn``/``mlp`` of a layer: ``hook_attn_out``/``hook_mlp_out`` minus the bias share (the
  bias is its own constant term); ``embed``/``pos_embed``: the embedding rows.

A Gemma 2 post-norm (``ln1_post``/``ln2_post``) on the way is frozen at its cached scale too.
"""

from typing import Any, Optional

import torch
from jaxtyping import Float
from torch import Tensor

from tlprisms._core import arguments as check
from tlprisms._core.errors import ArgumentError, PositionError
from tlprisms._core.table import Component
from tlprisms._seam import CacheView, NormSpec, Site
from tlprisms.prism import LogitPrism
from tlprisms.render._svg import bar_svg
from tlprisms.render._views_base import Figure

__all__ = ["top_tokens", "TopTokens", "component_write", "vocab_readout"]

_CHUNK = 8192


class TopTokens(Figure):
    """The ``k`` tokens a component promotes most and suppresses most, as bars.

    Attributes:
        values: the component's term for every token, ``[d_vocab]``.
        promoted: ``[(token, id, term)]``, largest first.
        suppressed: ``[(token, id, term)]``, most negative first.
        component, batch, position: what was read out, and where.
    """

    def __init__(
        self,
        svg: str,
        title: str,
        values: Tensor,
        promoted: list,
        suppressed: list,
        component: Component,
        batch: int,
        position: int,
    ) -> None:
        super().__init__(svg, title)
        self.values = values
        self.promoted = promoted
        self.suppressed = suppressed
        self.component = component
        self.batch = batch
        self.position = position

    def __repr__(self) -> str:
        up = ", ".join(f"{t!r} {v:+.3g}" for t, _, v in self.promoted[:5])
        down = ", ".join(f"{t!r} {v:+.3g}" for t, _, v in self.suppressed[:5])
        return (
            f"TopTokens({self.component} @ batch {self.batch}, pos {self.position}: "
            f"promotes {up}; suppresses {down})"
        )


def _post_map(post: Optional[NormSpec], x: Tensor, scale: Optional[Tensor]) -> Tensor:
    """A write through a frozen post-norm (without its bias): ``g * P(x) / s_post``."""
    return x if post is None else post.apply(x, scale, bias=False)


def component_write(
    prism: Any, component: Component, batch: int, pos: int
) -> Float[Tensor, "d_model"]:
    """What ``component`` writes into the residual stream at ``(batch, pos)`` (see module)."""
    caller = "top_tokens"
    cv = CacheView(prism.view, prism.cache, caller)
    view, dtype = cv.view, cv.dtype
    kind, layer = component.kind, component.layer
    b, i = batch, pos
    here = torch.tensor([[i]], device=cv.device).expand(cv.batch, 1)

    if kind in ("head", "neuron", "attn", "mlp"):
        layer = check.layer(view, layer, caller)
    if kind == "embed":
        return cv.get(Site.EMBED)[b, i].to(dtype)
    if kind == "pos_embed":
        pe = cv.get(Site.POS_EMBED)
        return pe[b if pe.shape[0] > 1 else 0, i].to(dtype)
    is_attn = kind in ("head", "attn")
    post = (
        (view.ln1_post if is_attn else view.ln2_post)[layer]
        if kind in ("head", "neuron", "attn", "mlp")
        else None
    )
    scale = None
    if post is not None and post.has_scale:
        scale = cv.scale(post, here)[b, 0]
    if kind == "head":
        head = check.head(view, component.head, caller)
        A = cv.get(Site.PATTERN, layer)[b, head, i].to(dtype)  # [src]
        v = cv.get(Site.V, layer)[b].to(dtype)  # [src, kv_head, d_head]
        g = view.kv_group(head)
        if component.src >= 0:
            z = A[component.src] * v[component.src, g]
        else:
            z = A @ v[:, g]
        raw = z @ view.W_O(layer, dtype).to(z.device)[component.head]
        return _post_map(post, raw, scale)
    if kind == "neuron":
        check.neuron(view, component.neuron, caller)
        act = cv.get(Site.MLP_POST, layer)[b, i, component.neuron].to(dtype)
        raw = act * view.W_out(layer, dtype).to(act.device)[component.neuron]
        return _post_map(post, raw, scale)
    if kind in ("attn", "mlp"):
        out = cv.get(Site.ATTN_OUT if kind == "attn" else Site.MLP_OUT, layer)[b, i].to(dtype)
        bias = (view.b_O if kind == "attn" else view.b_out)(layer, dtype, out.device)
        out = out - _post_map(post, bias, scale)
        if post is not None and post.bias is not None:
            out = out - post.bias.to(out.device, dtype)
        return out
    raise ArgumentError(
        f"{caller}: cannot read out a component of kind {kind!r}; use a head, "
        "neuron, attn, mlp, embed or pos_embed component (e.g. "
        "Component('head', layer=1, head=3))."
    )


def vocab_readout(prism: Any, write: Tensor, batch: int, pos: int) -> Float[Tensor, "d_vocab"]:
    """``write`` read out on every token through the frozen final norm (pre-softcap, no bias)."""
    cv = CacheView(prism.view, prism.cache, "top_tokens")
    view, dtype = cv.view, cv.dtype
    norm = view.final_norm
    inv_s: Any = 1.0
    if norm.has_scale:
        here = torch.tensor([[pos]], device=cv.device).expand(cv.batch, 1)
        inv_s = cv.inv_scale_or_one(norm, here)[batch, 0]
    out = torch.empty(view.d_vocab, dtype=dtype, device=write.device)
    for start in range(0, view.d_vocab, _CHUNK):
        ids = torch.arange(start, min(start + _CHUNK, view.d_vocab))
        cols, _ = view.unembed_columns(ids, dtype)  # [chunk, d_model]
        out[start : start + len(ids)] = (norm.pull_back(cols.to(write.device)) @ write) * inv_s
    return out


@check.entry
def top_tokens(
    prism: Any, component: Component, *, batch: int = 0, pos: int = -1, k: int = 10
) -> TopTokens:
    """The tokens ``component`` promotes and suppresses most at ``(batch, pos)``.

    Its write at that position is read out on the whole vocabulary through the frozen final
    norm (see the module docstring): the bars are the component's direct term in each
    token's logit (before a soft-cap), the same number the prisms give it for that target.

    Args:
        prism: the :class:`~tlprisms.LogitPrism` over the cache the component lives in.
        component: e.g. ``Component("head", layer=1, head=3)`` (optionally with ``src``),
            ``Component("neuron", layer=1, neuron=96)``, ``Component("mlp", layer=0)``, or
            one taken from a result (``result.components[i]``).
        batch: the batch row.
        pos: the residual position in the sequence (default -1, the last token).
        k: how many tokens to show each way.

    Returns:
        A :class:`TopTokens` figure (bars), with the full ``values`` over the vocabulary.
    """
    caller = "top_tokens"
    if not isinstance(component, Component):
        raise ArgumentError(
            f"{caller}: component must be a tlprisms Component, e.g. "
            f"Component('head', layer=1, head=3); got {type(component).__name__}."
        )
    if component.at >= 0:
        raise ArgumentError(
            f"{caller}: {component} is a chained term (written at position "
            f"{component.at}); top_tokens reads direct writes only. Pass the "
            "component without at, and pos= the position to read at."
        )
    if not isinstance(prism, LogitPrism):
        raise ArgumentError(
            f"{caller}: the first argument must be the LogitPrism "
            f"(tlprisms.LogitPrism(model, cache)); got {type(prism).__name__}."
        )
    b = check.in_range(batch, prism.batch, "batch", caller, of=f" (a batch of {prism.batch})")
    i = check.in_range(
        pos,
        prism.n_ctx,
        "position",
        caller,
        PositionError,
        of=f" for inputs of {prism.n_ctx} tokens",
    )
    k = check.count(k, "k", caller)
    if component.kind == "head" and component.src != -1:
        check.in_range(
            component.src,
            prism.n_ctx,
            f"{component}'s source position",
            caller,
            PositionError,
            negative=False,
            of=f" for inputs of {prism.n_ctx} tokens",
        )
    with torch.no_grad():
        values = vocab_readout(prism, component_write(prism, component, b, i), b, i)
    k = min(k, values.shape[0])
    up = torch.topk(values, k)
    down = torch.topk(-values, k)
    label = prism.view.token_label
    promoted = [
        (label(int(t), quote=False), int(t), float(v)) for v, t in zip(up.values, up.indices)
    ]
    suppressed = [
        (label(int(t), quote=False), int(t), -float(v)) for v, t in zip(down.values, down.indices)
    ]
    rows = promoted + suppressed[::-1]
    quote = repr if prism.view.tokenizer() is not None else str  # quotes show leading spaces
    title = f"{component} at position {i} (batch {b}): tokens it promotes and suppresses"
    svg = bar_svg(
        [r[2] for r in rows],
        [quote(r[0]) for r in rows],
        title,
        note=f"its direct term in each token's logit (frozen final norm); top {k} "
        f"and bottom {k} of {values.shape[0]}",
    )
    return TopTokens(svg, title, values.cpu(), promoted, suppressed, component, b, i)
