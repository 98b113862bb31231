"""The decomposition engine: split a frozen linear readout of the residual stream by writer.

A readout at residual position ``i`` is ``u / s`` with ``u`` a vector per target (already
pulled back through the norm that reads it) and ``s`` that norm's cached scale. Every write
``v`` into the residual stream at ``i`` contributes ``v . u / s``; the writes are
``hook_embed``, ``hook_pos_embed`` (learned positions) and each layer's attention and MLP
outputs. The prisms split those further, with everything non-linear read from the cache:

* **Attention prism.** Head ``h`` of layer ``l`` writes ``sum_j A[h,i,j] v[j,kv(h)] W_O[h]``
  (plus ``b_O`` once per layer), so its term for source ``j`` is
  ``A[h,i,j] * (v[j,kv(h)] . (W_O[h] @ u_l)) / s / s_post``. ``W_O`` is contracted with the
  readout first; K/V are never expanded to query heads. Gemma 2's ``ln1_post`` (RMS with its
  own weight) is held at its cached scale: ``u_l = w_post * u`` and ``s_post`` divides.
* **MLP prism.** ``mlp_out = post @ W_out + b_out``; neuron ``n``'s term is
  ``post[i, n] * (W_out[n] . u_l) / s / s_post``.

Completeness: the terms plus the bias terms equal ``x_i . u / s`` where ``x_i`` is the
residual stream the readout reads, exactly up to float rounding, because the writes sum to
``x_i`` and every step above is linear with the cached values fixed.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
from beartype import beartype
from jaxtyping import Float, Int, jaxtyped
from torch import Tensor

from tlprisms._core.errors import CacheError
from tlprisms._core.ops import dot
from tlprisms._core.table import ComponentTable
from tlprisms._seam import CacheView, NormSpec, Site

__all__ = ["Readout", "Split", "Writes", "split_writes", "writes_table", "post_parts"]


@jaxtyped(typechecker=beartype)
@dataclass(frozen=True)
class Readout:
    """A frozen linear read of the residual stream.

    Attributes:
        u: readout directions times the scale, ``[B', P', K, d_model]`` (``B'``/``P'`` are 1
            when shared by the batch / positions).
        inv_s: the frozen ``1 / scale`` at each read position, ``[B, P]``.
        positions: the residual positions read, ``[B, P]``.
        attn_layers: attention writes of layers ``< attn_layers`` are in the stream read.
        mlp_layers: MLP writes of layers ``< mlp_layers`` are in the stream read.
    """

    u: Float[Tensor, "rb rp k d_model"]
    inv_s: Float[Tensor, "batch pos"]
    positions: Int[Tensor, "batch pos"]
    attn_layers: int
    mlp_layers: int


@dataclass(frozen=True)
class Split:
    """How finely to split the writes: attention layers ``heads`` into heads (x source
    positions when ``by_source``), MLP layers ``neurons`` into neurons; others stay whole."""

    heads: frozenset = frozenset()
    neurons: frozenset = frozenset()
    by_source: bool = True


@jaxtyped(typechecker=beartype)
@dataclass(frozen=True)
class Writes:
    """The split of a readout: ``values [B, P, K, C]`` labelled by ``table``, and for split
    layers ``layer_gap [B, P, K]``: parts minus the layer's whole write (~0 when exact)."""

    values: Float[Tensor, "batch pos k comp"]
    table: ComponentTable
    layer_gap: Float[Tensor, "batch pos k"]


def post_parts(
    cv: CacheView, post: Optional[NormSpec], r: Readout, layer: int
) -> tuple[Float[Tensor, "rb rp k d_model"], Float[Tensor, "batch pos"]]:
    """A readout pulled through what lies between a layer's heads/neurons and the residual
    stream: a post-norm (Gemma 2's ``ln1_post``/``ln2_post``, frozen) and a residual
    multiplier (Granite): (``P(w_post * u)``, the full ``1/s`` factor ``[B, P]``)."""
    ul = r.u if post is None else post.pull_back(r.u)
    inv = cv.inv_scale(post, r.positions)
    inv = r.inv_s if inv is None else r.inv_s * inv
    scale = cv.view.residual_scale(layer)
    return ul, inv if scale is None else inv * scale


def post_bias(post: Optional[NormSpec], u: Tensor) -> Tensor:
    return (
        post.constant(u)
        if post is not None
        else torch.zeros(u.shape[:-1], dtype=u.dtype, device=u.device)
    )


def _expand(t: Tensor, B: int, P: int) -> Tensor:
    return t.expand(B, P, *t.shape[2:])


def _head_terms(
    cv: CacheView,
    layer: int,
    ul: Float[Tensor, "rb rp k d_model"],
    positions: Int[Tensor, "batch pos"],
    by_source: bool,
    W_O: Optional[Tensor] = None,
) -> Float[Tensor, "batch pos k head *src"]:
    """``[B, P, K, head, src]`` (``src`` summed away when not ``by_source``: ``[B,P,K,head]``).
    ``W_O``: the layer's ``[H, dh, d]`` in ``ul``'s dtype and device when already read.
    Computed where the layer's pattern lives (:func:`layer_device`): ``ul`` and
    ``positions`` must be there."""
    view, dtype = cv.view, ul.dtype
    A = cv.get(Site.PATTERN, layer, native=True)
    v = cv.get(Site.V, layer, native=True).to(A.device, dtype)
    B, P = positions.shape
    H, G = view.n_heads, view.n_kv_heads
    if v.shape[2] != G:
        raise CacheError(
            f"{cv.caller}: the value vectors of layer {layer} have {v.shape[2]} heads but this "
            f"model has {G} key/value heads; the cache comes from another model. Re-run "
            "model.run_with_cache(tokens) with this model."
        )
    rep = H // G
    if W_O is None:
        W_O = view.W_O(layer, dtype).to(ul.device)  # [H, dh, d]
    if P == A.shape[2] and bool((positions == torch.arange(P, device=positions.device)).all()):
        Ai = A.to(dtype)  # [B, H, P, src]
    else:
        rows = torch.arange(B, device=A.device)[:, None]
        Ai = A.permute(0, 2, 1, 3)[rows, positions.to(A.device)].permute(0, 2, 1, 3).to(dtype)
    dh = W_O.shape[1]
    if ul.shape[0] == 1 and ul.shape[1] == 1:
        WOu = torch.einsum("hdm,km->hdk", W_O, ul[0, 0]).reshape(G, rep, dh, -1)
        vW = torch.einsum("bjgd,grdk->bjgrk", v, WOu).reshape(B, v.shape[1], H, -1)
        if by_source:
            return torch.einsum("bhpj,bjhk->bpkhj", Ai, vW)
        return torch.einsum("bhpj,bjhk->bpkh", Ai, vW)
    if ul.shape[1] == 1:  # one readout per batch row, shared by its positions
        WOu = torch.einsum("hdm,bkm->bhdk", W_O, ul[:, 0].expand(B, *ul.shape[2:]))
        vW = torch.einsum("bjgd,bgrdk->bjgrk", v, WOu.reshape(B, G, rep, dh, -1))
        vW = vW.reshape(B, v.shape[1], H, -1)
        if by_source:
            return torch.einsum("bhpj,bjhk->bpkhj", Ai, vW)
        return torch.einsum("bhpj,bjhk->bpkh", Ai, vW)
    ue = _expand(ul, B, P)
    WOu = torch.einsum("hdm,bpkm->bphdk", W_O, ue).reshape(B, P, G, rep, dh, -1)
    vW = torch.einsum("bjgd,bpgrdk->bpjgrk", v, WOu).reshape(B, P, v.shape[1], H, -1)
    if by_source:
        return torch.einsum("bhpj,bpjhk->bpkhj", Ai, vW)
    return torch.einsum("bhpj,bpjhk->bpkh", Ai, vW)


def head_block(
    cv: CacheView,
    layer: int,
    ul: Float[Tensor, "rb rp k d_model"],
    positions: Int[Tensor, "batch pos"],
    by_source: bool,
    sl: Float[Tensor, "batch pos 1"],
    dst: Float[Tensor, "batch pos k head *src"],
    W_O: Optional[Tensor] = None,
) -> None:
    """``_head_terms(...) * sl`` written into ``dst`` (a view of the terms' shape). In a
    model split across devices the block is computed where the layer lives and copied into
    ``dst`` (``W_O``, when given, must be there)."""
    scale = sl[..., None, None] if by_source else sl[..., None]
    dev = layer_device(cv, "attn", layer)
    if dev == dst.device:
        torch.mul(_head_terms(cv, layer, ul, positions, by_source, W_O), scale, out=dst)
        return
    t = _head_terms(cv, layer, ul.to(dev), positions.to(dev), by_source, W_O)
    dst.copy_(t.mul_(scale.to(dev)))


def _neuron_terms(
    cv: CacheView,
    layer: int,
    ul: Float[Tensor, "rb rp k d_model"],
    positions: Int[Tensor, "batch pos"],
    out: Optional[Tensor] = None,
) -> Float[Tensor, "batch pos k d_mlp"]:
    """``[B, P, K, d_mlp]`` (written into ``out`` when given)."""
    post, Wu = _neuron_factors(cv, layer, ul, positions)
    return torch.mul(post, Wu, out=out)


def _neuron_factors(
    cv: CacheView,
    layer: int,
    ul: Float[Tensor, "rb rp k d_model"],
    positions: Int[Tensor, "batch pos"],
    W_out: Optional[Tensor] = None,
) -> tuple[Float[Tensor, "batch pos 1 d_mlp"], Float[Tensor, "wb wp k d_mlp"]]:
    """The two factors of :func:`_neuron_terms`: ``post [B, P, 1, n]`` and ``W_out . u``
    ``[B', P', K, n]`` (``B'``/``P'`` 1 where the readout is shared). ``W_out``: the
    layer's ``[n, d]`` in ``ul``'s dtype and device when already read. Computed where the
    layer's activations live (:func:`layer_device`): ``ul`` and ``positions`` must be there."""
    post = cv.at(Site.MLP_POST, layer, positions, ul.dtype, native=True)[:, :, None, :]
    if W_out is None:
        W_out = cv.view.W_out(layer, ul.dtype).to(ul.device)  # [n, d]
    B, P = positions.shape
    if ul.shape[0] == 1 and ul.shape[1] == 1:
        return post, (ul[0, 0] @ W_out.T)[None, None]  # [K, n] (this layout is the fast one)
    if ul.shape[1] == 1:  # one readout per batch row
        Wu = torch.einsum("nm,bkm->bkn", W_out, ul[:, 0].expand(B, *ul.shape[2:]))
        return post, Wu[:, None]
    return post, torch.einsum("nm,bpkm->bpkn", W_out, _expand(ul, B, P))


#: elements of a neuron block written per slice on the CPU at one thread (256 KiB of
#: float32: the slice is still in the core's cache when it is scaled); with more threads
#: each slice is :data:`_NEURON_SLICE_THREADS` times larger (it stays in the shared cache),
#: so that there are few parallel regions (each waits for every thread: slow when other
#: jobs share the cores)
_NEURON_SLICE = 2**16
_NEURON_SLICE_THREADS = 8


def neuron_block(
    cv: CacheView,
    layer: int,
    ul: Float[Tensor, "rb rp k d_model"],
    positions: Int[Tensor, "batch pos"],
    sl: Float[Tensor, "batch pos 1"],
    dst: Float[Tensor, "batch pos k d_mlp"],
    W_out: Optional[Tensor] = None,
) -> None:
    """``_neuron_terms(...) * sl`` written into ``dst``: the same two products per term
    (so the same bits), on the CPU slice by slice, so that the scaling reads the terms from
    the cache instead of from memory (a second pass over a block of up to GBs). In a model
    split across devices the block is computed where the layer lives and copied into
    ``dst`` (``W_out``, when given, must be there)."""
    dev = layer_device(cv, "mlp", layer)
    if dev != dst.device:
        post, Wu = _neuron_factors(cv, layer, ul.to(dev), positions.to(dev), W_out)
        dst.copy_(torch.mul(post, Wu).mul_(sl.to(dev)[..., None]))
        return
    post, Wu = _neuron_factors(cv, layer, ul, positions, W_out)
    B, P, K, n = dst.shape
    per = _NEURON_SLICE * (1 if torch.get_num_threads() == 1 else _NEURON_SLICE_THREADS)
    rows = per // (K * n)
    scale = sl[..., None]  # [B, P, 1, 1]
    if dst.device.type != "cpu" or rows == 0 or rows >= P:
        torch.mul(post, Wu, out=dst).mul_(scale)
        return
    Wu = Wu.expand(B, P, K, n)
    for b in range(B):
        for p in range(0, P, rows):
            d = dst[b, p : p + rows]
            torch.mul(post[b, p : p + rows], Wu[b, p : p + rows], out=d).mul_(
                scale[b, p : p + rows]
            )


def _table(
    view: Any, kind: str, layer: int, split: Split, n_src: int, d_mlp: int
) -> ComponentTable:
    """The labels of one split layer: heads (x sources) or neurons."""
    H = view.n_heads
    if kind == "attn":
        if split.by_source:
            hh, jj = np.meshgrid(np.arange(H), np.arange(n_src), indexing="ij")
            return ComponentTable.block(
                "head", H * n_src, layer=layer, head=hh.ravel(), src=jj.ravel()
            )
        return ComponentTable.block("head", H, layer=layer, head=np.arange(H))
    return ComponentTable.block("neuron", d_mlp, layer=layer, neuron=np.arange(d_mlp))


def _d_mlp(cv: CacheView, layer: int) -> int:
    return int(cv.get(Site.MLP_POST, layer, native=True).shape[-1])


def layer_device(cv: CacheView, kind: str, layer: int, whole: bool = False) -> torch.device:
    """Where layer ``layer``'s attention (``kind="attn"``) or MLP activations live: its
    pattern / neuron activations, or its output (``whole``). In a model split across devices
    that layer's terms are computed there and only they cross to the prism's device."""
    if whole:
        return cv.device_of(Site.ATTN_OUT if kind == "attn" else Site.MLP_OUT, layer)
    return cv.device_of(Site.PATTERN if kind == "attn" else Site.MLP_POST, layer)


def whole_write(
    cv: CacheView,
    kind: str,
    layer: int,
    positions: Int[Tensor, "batch pos"],
    u: Float[Tensor, "rb rp k d_model"],
    s: Float[Tensor, "batch pos 1"],
) -> Float[Tensor, "batch pos k"]:
    """``dot(x, u) * s`` for layer ``layer``'s whole attention or MLP output ``x`` at
    ``positions``, computed where that output lives and returned on ``u``'s device."""
    site = Site.ATTN_OUT if kind == "attn" else Site.MLP_OUT
    x = cv.at(site, layer, positions, u.dtype, native=True)
    if x.device == u.device:
        return dot(x, u) * s
    return (dot(x, u.to(x.device)) * s.to(x.device)).to(u.device)


def writes_table(
    cv: CacheView,
    readout: Readout,
    split: Split,
    extra: Sequence[ComponentTable] = (),
) -> ComponentTable:
    """The component labels :func:`split_writes` gives for ``readout`` and ``split``, without
    computing a term (to size chunks and preallocate results)."""
    if not extra:
        return _plan_table(cv, readout, split)
    return ComponentTable.concat([t for t, _ in write_plan(cv, readout, split)] + list(extra))


def _memo(cv: CacheView, key: tuple, make: Any) -> Any:
    """``make()``, kept in the cache view's memo (shared by a prism's calls) under ``key``:
    labels depend only on the cache's shape, the readout's layers and the split."""
    memo = getattr(cv, "memo", None)
    if memo is None:
        return make()
    if key not in memo:
        memo[key] = make()
    return memo[key]


def _plan_table(cv: CacheView, readout: Readout, split: Split) -> ComponentTable:
    """The labels of :func:`write_plan`'s blocks in one table (read-only: it is shared)."""
    key = ("writes table", readout.attn_layers, readout.mlp_layers, split)

    def make() -> ComponentTable:
        table = ComponentTable.concat([t for t, _ in write_plan(cv, readout, split)])
        return freeze(table)

    return _memo(cv, key, make)


def freeze(table: ComponentTable) -> ComponentTable:
    """``table`` with its columns made read-only (so that results can share them)."""
    for name in ("kind", "layer", "head", "neuron", "src", "at", "feature", "of"):
        col = getattr(table, name)
        if col is not None:
            col.flags.writeable = False
    return table


def write_plan(cv: CacheView, readout: Readout, split: Split) -> list[tuple[ComponentTable, tuple]]:
    """Every block of terms in result order: ``(labels, what)`` with ``what`` one of
    ``("embed",)``, ``("pos_embed",)``, ``(kind, layer, "split"|"whole"|"bias"|"post_b")``.
    Kept in the cache view's memo (the list and its tables are shared: do not modify)."""
    key = ("plan", readout.attn_layers, readout.mlp_layers, split)
    return _memo(cv, key, lambda: _make_plan(cv, readout, split))


def _make_plan(cv: CacheView, readout: Readout, split: Split) -> list[tuple[ComponentTable, tuple]]:
    view = cv.view
    plan: list[tuple[ComponentTable, tuple]] = [(ComponentTable.block("embed"), ("embed",))]
    if view.pos_embed_in_resid:
        plan.append((ComponentTable.block("pos_embed"), ("pos_embed",)))
    for layer in range(max(readout.attn_layers, readout.mlp_layers)):
        for kind in ("attn", "mlp"):
            if kind == "attn" and layer >= readout.attn_layers:
                continue
            if kind == "mlp" and (layer >= readout.mlp_layers or view.attn_only):
                continue
            post = view.ln1_post[layer] if kind == "attn" else view.ln2_post[layer]
            if layer in (split.heads if kind == "attn" else split.neurons):
                d_mlp = _d_mlp(cv, layer) if kind == "mlp" else 0
                table = _table(view, kind, layer, split, cv.n_ctx, d_mlp)
                plan.append((table, (kind, layer, "split")))
            else:
                plan.append((ComponentTable.block(kind, layer=layer), (kind, layer, "whole")))
            bias_kind = "b_O" if kind == "attn" else "b_out"
            plan.append((ComponentTable.block(bias_kind, layer=layer), (kind, layer, "bias")))
            if post is not None and post.bias is not None:
                plan.append((ComponentTable.block("ln.b", layer=layer), (kind, layer, "post_b")))
    return plan


def split_writes(
    cv: CacheView,
    readout: Readout,
    split: Split,
    extra: Sequence[tuple[Tensor, ComponentTable]] = (),
    out: Optional[Tensor] = None,
    gap: bool = True,
) -> Writes:
    """Split a readout by every write into the residual stream it reads.

    The labels are planned first and every block of terms is written straight into one
    preallocated ``[B, P, K, C]`` result (no list of pieces to concatenate: the peak is the
    result plus one layer's block).

    Args:
        split: which layers to split into heads (x sources) / neurons.
        extra: more ``([B', P', K] values, labels)`` to append (the readout's constants).
        out: where to write the terms, ``[B, P, K, C]`` (any strides, e.g. a permuted view
            of the caller's own result); a new tensor when None.
        gap: compute ``layer_gap`` (split layers' parts minus their whole write); zeros
            when False (a caller that checks its totals otherwise).
    """
    view = cv.view
    u, inv_s, positions = readout.u, readout.inv_s, readout.positions
    B, P = positions.shape
    K = u.shape[2]
    plan = write_plan(cv, readout, split)
    table = writes_table(cv, readout, split, [t for _, t in extra])
    if out is None:
        out = torch.empty(B, P, K, len(table), dtype=u.dtype, device=u.device)
    elif tuple(out.shape) != (B, P, K, len(table)):
        raise ValueError(
            f"split_writes: out has shape {tuple(out.shape)}, not {(B, P, K, len(table))}"
        )
    check = torch.zeros(B, P, K, dtype=u.dtype, device=u.device)
    s = inv_s[:, :, None]
    start = 0
    cached: dict = {}

    def layer_parts(kind: str, layer: int) -> tuple:
        """(ul, sl, bias_term, post_b, whole) of one layer's attention or MLP write;
        ``whole`` is None for a split layer when no gap is asked for (nothing reads it)."""
        if (kind, layer) not in cached:
            cached.clear()
            post = view.ln1_post[layer] if kind == "attn" else view.ln2_post[layer]
            ul, inv = post_parts(cv, post, readout, layer)
            sl = inv[:, :, None]
            bias = (view.b_O if kind == "attn" else view.b_out)(layer, u.dtype, u.device)
            bias_term = (ul @ bias).expand(B, P, K) * sl  # [B,P,K]
            post_b = post_bias(post, u)
            whole = None
            if gap or layer not in (split.heads if kind == "attn" else split.neurons):
                whole = whole_write(cv, kind, layer, positions, u, s)
                whole = whole - bias_term - (post_b.expand(B, P, K) * s if post is not None else 0)
            cached[(kind, layer)] = (ul, sl, bias_term, post_b, whole)
        return cached[(kind, layer)]

    for tab, what in plan:
        n = len(tab)
        dst = out[..., start : start + n]
        start += n
        if what[0] == "embed":
            dst[..., 0] = dot(cv.embed_write(positions, u.dtype), u) * s
            continue
        if what[0] == "pos_embed":
            dst[..., 0] = dot(cv.at(Site.POS_EMBED, None, positions, u.dtype), u) * s
            continue
        kind, layer, part = what
        ul, sl, bias_term, post_b, whole = layer_parts(kind, layer)
        if part == "whole":
            dst[..., 0] = whole
        elif part == "bias":
            dst[..., 0] = bias_term
        elif part == "post_b":
            dst[..., 0] = post_b.expand(B, P, K) * s
        elif kind == "attn":
            H = view.n_heads
            shape = (B, P, K, H, n // H) if split.by_source else (B, P, K, H)
            head_block(cv, layer, ul, positions, split.by_source, sl, dst.view(shape))
            if gap:
                check = check + (dst.sum(-1) - whole)
        else:
            neuron_block(cv, layer, ul, positions, sl, dst)
            if gap:
                check = check + (dst.sum(-1) - whole)
    for values, tab in extra:
        out[..., start : start + len(tab)] = values.expand(B, P, K)[..., None]
        start += len(tab)
    return Writes(values=out, table=table, layer_gap=check)
