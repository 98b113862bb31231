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

from tlprisms._errors import PrismError
from tlprisms._result import Component
from tlprisms._seam import NormSpec, cache_get
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

    def __init__(self, svg: str, title: str, values: Tensor, promoted: list, suppressed: list,
                 component: Component, batch: int, position: int) -> None:
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
        return (f"TopTokens({self.component} @ batch {self.batch}, pos {self.position}: "
                f"promotes {up}; suppresses {down})")


def _post_map(post: Optional[NormSpec], x: Tensor, scale: Optional[Tensor]) -> Tensor:
    """A write through a frozen post-norm (without its bias): ``g * P(x) / s_post``."""
    return x if post is None else post.apply(x, scale, bias=False)


def component_write(prism: Any, component: Component, batch: int, pos: int
                    ) -> Float[Tensor, "d_model"]:
    """What ``component`` writes into the residual stream at ``(batch, pos)`` (see module)."""
    caller = "top_tokens"
    view, cache, dtype = prism.view, prism.cache, prism.dtype
    kind, layer = component.kind, component.layer
    b, i = batch, pos

    def get(name: str) -> Tensor:
        return cache_get(cache, name, caller)

    if kind in ("head", "neuron", "attn", "mlp") and not 0 <= layer < view.n_layers:
        raise PrismError(f"{caller}: {component} has layer {layer}; the model has layers "
                         f"0..{view.n_layers - 1}.")
    if kind == "embed":
        return get("hook_embed")[b, i].to(dtype)
    if kind == "pos_embed":
        pe = get("hook_pos_embed")
        return pe[b if pe.shape[0] > 1 else 0, i].to(dtype)
    is_attn = kind in ("head", "attn")
    post = (view.ln1_post if is_attn else view.ln2_post)[layer] if kind in (
        "head", "neuron", "attn", "mlp") else None
    scale = None
    if post is not None and post.has_scale:
        scale = get(post.scale_hook)[b, i].to(dtype)
    if kind == "head":
        if not 0 <= component.head < view.n_heads:
            raise PrismError(f"{caller}: {component} has head {component.head}; layer {layer} "
                             f"has heads 0..{view.n_heads - 1}.")
        A = get(f"blocks.{layer}.attn.hook_pattern")[b, component.head, i].to(dtype)  # [src]
        v = get(f"blocks.{layer}.attn.hook_v")[b].to(dtype)  # [src, kv_head, d_head]
        g = component.head // (view.n_heads // view.n_kv_heads)
        if component.src >= 0:
            z = A[component.src] * v[component.src, g]
        else:
            z = A @ v[:, g]
        raw = z @ view.W_O(layer, dtype).to(z.device)[component.head]
        return _post_map(post, raw, scale)
    if kind == "neuron":
        if view.attn_only or not 0 <= component.neuron < view.d_mlp:
            raise PrismError(f"{caller}: {component} is not a neuron of this model "
                             f"(d_mlp={view.d_mlp}).")
        act = get(f"blocks.{layer}.mlp.hook_post")[b, i, component.neuron].to(dtype)
        raw = act * view.W_out(layer, dtype).to(act.device)[component.neuron]
        return _post_map(post, raw, scale)
    if kind in ("attn", "mlp"):
        out = get(f"blocks.{layer}.hook_{kind}_out")[b, i].to(dtype)
        bias = (view.b_O if kind == "attn" else view.b_out)(layer, dtype, out.device)
        out = out - _post_map(post, bias, scale)
        if post is not None and post.bias is not None:
            out = out - post.bias.to(out.device, dtype)
        return out
    raise PrismError(f"{caller}: cannot read out a component of kind {kind!r}; use a head, "
                     "neuron, attn, mlp, embed or pos_embed component (e.g. "
                     "Component('head', layer=1, head=3)).")


def vocab_readout(prism: Any, write: Tensor, batch: int, pos: int
                  ) -> Float[Tensor, "d_vocab"]:
    """``write`` read out on every token through the frozen final norm (pre-softcap, no bias)."""
    view, dtype = prism.view, prism.dtype
    norm = view.final_norm
    inv_s = 1.0
    if norm.has_scale:
        inv_s = 1.0 / cache_get(prism.cache, norm.scale_hook, "top_tokens")[batch, pos, 0].to(dtype)
    out = torch.empty(view.d_vocab, dtype=dtype, device=write.device)
    for start in range(0, view.d_vocab, _CHUNK):
        ids = torch.arange(start, min(start + _CHUNK, view.d_vocab))
        cols, _ = view.unembed_columns(ids, dtype)  # [chunk, d_model]
        out[start:start + len(ids)] = (norm.pull_back(cols.to(write.device)) @ write) * inv_s
    return out


def _token_str(prism: Any, i: int) -> str:
    tok = prism.view.tokenizer()
    if tok is None:
        return f"#{i}"
    try:
        return str(tok.decode([i]))
    except Exception:  # a tokenizer that cannot decode one id alone: show the id
        return f"#{i}"


def top_tokens(prism: Any, component: Component, *, batch: int = 0, pos: int = -1,
               k: int = 10) -> TopTokens:
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
        raise PrismError(f"{caller}: component must be a tlprisms Component, e.g. "
                         f"Component('head', layer=1, head=3); got {type(component).__name__}.")
    if component.pos >= 0:
        raise PrismError(f"{caller}: {component} is a chained term (written at position "
                         f"{component.pos}); top_tokens reads direct writes only. Pass the "
                         "component without pos, and pos= the position to read at.")
    if not hasattr(prism, "view") or not hasattr(prism, "cache"):
        raise PrismError(f"{caller}: the first argument must be the LogitPrism "
                         f"(tlprisms.LogitPrism(model, cache)); got {type(prism).__name__}.")
    if not -prism.batch <= batch < prism.batch:
        raise PrismError(f"{caller}: batch={batch} is out of range for a batch of {prism.batch}.")
    if not -prism.n_ctx <= pos < prism.n_ctx:
        raise PrismError(f"{caller}: pos={pos} is out of range for {prism.n_ctx} positions.")
    b, i = batch % prism.batch, pos % prism.n_ctx
    with torch.no_grad():
        values = vocab_readout(prism, component_write(prism, component, b, i), b, i)
    k = max(1, min(int(k), values.shape[0]))
    up = torch.topk(values, k)
    down = torch.topk(-values, k)
    promoted = [(_token_str(prism, int(t)), int(t), float(v))
                for v, t in zip(up.values, up.indices)]
    suppressed = [(_token_str(prism, int(t)), int(t), -float(v))
                  for v, t in zip(down.values, down.indices)]
    rows = promoted + suppressed[::-1]
    quote = repr if prism.view.tokenizer() is not None else str  # quotes show leading spaces
    title = f"{component} at position {i} (batch {b}): tokens it promotes and suppresses"
    svg = bar_svg([r[2] for r in rows], [quote(r[0]) for r in rows], title,
                  note=f"its direct term in each token's logit (frozen final norm); top {k} "
                       f"and bottom {k} of {values.shape[0]}")
    return TopTokens(svg, title, values.cpu(), promoted, suppressed, component, b, i)
