"""The QK prism: a head's attention score split into (query-side writer, key-side writer) pairs.

For head ``h`` of layer ``l``, query position ``i`` and key position ``j`` the pre-softmax score
is ``z_ij = (R_i q_i) . (R_j k_j) * c`` with ``q_i = ln1(x_i) @ W_Q[h] + b_Q``,
``k_j = ln1(x_j) @ W_K[kv(h)] + b_K``, ``R`` the rotary map at that position (identity without
rotary) and ``c`` the score factor (``1/sqrt(d_head)``, Gemma's ``query_pre_attn_scalar``...).
With ln1's cached scale frozen, ``q_i`` is a readout of the residual stream at ``i`` with one
direction per ``d_head`` coordinate (``P(w1 * W_Q[:, d]) / s_i``), so the engine
(:func:`~tlprisms._core.engine.split_writes`) splits it by writer: each writer ``a`` contributes a
``d_head`` vector ``Q_a`` (ln1's bias and ``b_Q`` are constant writers). Likewise ``K_b`` at
``j``. Rotation is linear, so rotating each part at its own position keeps the sum, and

    z_ij = sum_ab (R_i Q_a) . (R_j K_b) * c

exactly: one matmul of the ``[writers, d_head]`` blocks of both sides. Without rotary, and
with at most ``d_head`` query-side writers (the layer-level default), the key side is read
instead with each query-side vector pulled back through ``W_K`` and ln1,
``u_a = P(w1 * W_K Q_a c)``, so that ``z_ij``'s pair ``(a, b)`` is ``x_b(j) . u_a / s_j``:
one direction per query writer in place of ``d_head`` per key writer, and no pair product
(:func:`_pulled_key_side`; the same terms to float rounding). Grouped-query heads read
their key/value head's ``W_K`` (never expanded). A soft-cap ``cap * tanh(z / cap)`` (Gemma 2) is
explained post-cap with ``rho = cap * tanh(z / cap) / z`` frozen per score (every pair term
times ``rho``), or pre-cap. An ALiBi model's positional bias (added after the scale) is one
constant pair per key, ``L{l}H{h} alibi``, computed as that model computes it
(:meth:`~tlprisms._seam.ModelView.alibi_bias`).

A shortformer model (HookedTransformer's ``positional_embedding_type="shortformer"``) adds
its position embedding to the query and key inputs after ln1, not to the residual stream:
``q_i`` gains ``pos_embed(i) @ W_Q[h]`` (``k_j`` likewise), one more writer of each side,
labelled ``pos_embed`` (:func:`shortformer_part`).

Keys masked by an ``attention_mask`` (padding recorded with ``run_with_cache(tokens,
attention_mask=mask)``) or by a sliding attention window have no score: the model replaced
it by ``-inf`` (or the dtype's lowest value) and gave the key no attention. With the default
keys (every key up to ``pos``) the keys masked in any row are left out, so every score
returned is one the model used; keys passed explicitly that are masked in some row are
refused, naming the row and the keys every row attends to (:func:`unmasked_keys`).

Sparse results (``top_k=`` / ``min_abs=``, :func:`qk_sparse_terms`) keep per key the largest
pairs, the constants and one remainder per (query kind, layer, key kind, layer), computed a
chunk of keys at a time; :meth:`PairTable.grouped` is what ``aggregate()`` sums by.
"""

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Optional

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from tlprisms._core.engine import (
    Readout,
    Split,
    head_block,
    neuron_block,
    post_bias,
    post_parts,
    split_writes,
    write_plan,
    writes_table,
)
from tlprisms._core.errors import ArgumentError, PositionError, UnsupportedModelError
from tlprisms._core.ops import gather_pos
from tlprisms._core.policy import refuse_broken
from tlprisms._core.readout import Recorded, softcap_ratio
from tlprisms._core.request import Request
from tlprisms._core.table import ComponentTable
from tlprisms._core.terms import Terms
from tlprisms._prisms.qk_table import PairTable
from tlprisms._seam import CacheView, Site

__all__ = [
    "qk_terms",
    "qk_sparse_terms",
    "side_terms",
    "masked_keys",
    "unmasked_keys",
]

#: the recomputed scores must match the recorded ``hook_attn_scores`` to this fraction of
#: ``1 + |score| + sum |terms|`` (float32 and float64 caches: a float64 model may norm in
#: float32; low precision), or the architecture computes its scores in a way this prism
#: does not know and nothing is returned
_SCORES_RTOL = 1e-4
_SCORES_RTOL_LOWP = 3e-2
#: the softmax of the scores over the keys the model attends must match the recorded
#: ``hook_pattern`` to this (absolute, on probabilities; float32 and float64 caches / low
#: precision), or the scores are not those the model used and nothing is returned
PATTERN_ATOL = 1e-4
PATTERN_ATOL_LOWP = 3e-2


def rotate(
    t: Float[Tensor, "batch pos d_head comp"],
    cos: Float[Tensor, "batch pos rot"],
    sin: Float[Tensor, "batch pos rot"],
    adjacent: bool,
) -> Float[Tensor, "batch pos d_head comp"]:
    """Rotary on the first ``rot`` coordinates of every part (halves, or adjacent pairs)."""
    rd = cos.shape[-1]
    x, rest = t[:, :, :rd], t[:, :, rd:]
    if adjacent:  # rot[2m] = -x[2m+1], rot[2m+1] = x[2m]
        flip = torch.stack((-x[:, :, 1::2], x[:, :, ::2]), dim=3).reshape(x.shape)
    else:
        half = rd // 2
        flip = torch.cat((-x[:, :, half:], x[:, :, :half]), dim=2)
    out = x * cos[..., None] + flip * sin[..., None]
    return torch.cat((out, rest), dim=2) if rest.shape[2] else out


def rotary_tables(
    cv: CacheView, layer: int, positions: Tensor, dtype: torch.dtype
) -> Optional[tuple[Tensor, Tensor, bool]]:
    """``(cos, sin, adjacent)`` at ``positions`` (``[B, P, rot]`` per coordinate, and whether
    they rotate adjacent pairs rather than halves), or None where ``layer`` does not rotate
    (no rotary, or a NoPE layer of a hybrid). A HookedTransformer's tables, a GPT-J bridge's
    computed from its rotary module (its attention records none), or the tables a bridge's
    attention recorded, in the layout it applies them
    (:meth:`~tlprisms._seam.ModelView.rotary_canonical`)."""
    view = cv.view
    if not view.rotary_at(layer):
        return None
    tables = view.rotary_tables(layer, cv.n_ctx)
    if tables is not None:  # gathered where the layer's tables live
        cos, sin = (t[positions.to(t.device)].to(positions.device, dtype) for t in tables)
        adjacent = view.rotary_adjacent_pairs or view.rotary_tables_computed(layer)
        return cos, sin, adjacent
    B = positions.shape[0]
    out = []
    for site in (Site.ROT_COS, Site.ROT_SIN):
        t = cv.get(site, layer, native=True)
        t = t.expand(B, *t.shape[1:]) if t.shape[0] != B else t
        rows = torch.arange(B, device=t.device)[:, None]
        out.append(t[rows, positions.to(t.device)].to(positions.device, dtype))
    return view.rotary_canonical(out[0], out[1])


def qk_norm_factor(
    cv: CacheView, layer: int, side: str, head: int, positions: Tensor, dtype: torch.dtype
) -> Optional[Float[Tensor, "batch pos d_head"]]:
    """The query (``side="q"``) or key (``"k"``) norm of ``layer``, frozen at its recorded
    scale, as the elementwise factor ``w / s`` of head ``head`` (a key/value head for
    ``"k"``) at ``positions``: ``[B, P, d_head]`` on the prism's device, or None where the
    attention has no such norm. Gemma 3, Qwen3 and Cohere normalise each head (``s`` per
    head and position), OLMo 2 all heads at once (``s`` per position, ``w`` the head's
    slice). A centred norm (Cohere's LayerNorm, :func:`qk_norm_centred`) subtracts the
    mean over ``d_head`` before the factor. The model applies it to ``ln1(x) W + b`` before
    rotary; so does every caller."""
    view = cv.view
    norm = view.qk_norm_frozen(layer, side)
    if norm is None:
        return None
    t = cv.get(norm.site, layer, native=True)
    s3 = view.qk_norm_scales(layer, side, t, cv.batch, cv.n_ctx)  # [B, n, H or 1]
    s = s3[..., head] if view.qk_norm_per_head(layer, side) else s3[..., 0]
    w = view.qk_norm_weight(layer, side, head)
    s = cv.home(gather_pos(s, positions, dtype))  # [B, P]
    return w.to(s.device, dtype)[None, None] / s[..., None]


def qk_norm_centred(cv: CacheView, layer: int, side: str) -> bool:
    """Whether that norm subtracts the mean over ``d_head`` first (Cohere's LayerNorm): then
    ``v -> (v - mean v) * w / s``, and its transpose ``y -> P(y * w / s)`` (``P`` the
    centring, symmetric)."""
    norm = cv.view.qk_norm_frozen(layer, side)
    return norm is not None and norm.centred


def centre(v: Tensor, dim: int) -> Tensor:
    """``v`` minus its mean over ``dim`` (a centred query/key norm's projection)."""
    return v - v.mean(dim, keepdim=True)


def qk_norm_sides(cv: CacheView, layer: int) -> bool:
    """Whether ``layer``'s attention normalises its queries or keys."""
    view = cv.view
    return any(view.qk_norm_frozen(layer, side) is not None for side in "qk")


def shortformer_part(
    cv: CacheView, W: Float[Tensor, "d_model d_head"], positions: Int[Tensor, "batch pos"]
) -> Optional[Float[Tensor, "batch pos d_head"]]:
    """A shortformer model's position embedding read by one side, ``pos_embed(p) @ W`` (added
    to the query and key inputs after ln1, never to the residual stream), or None for any
    other model. Computed where ``W`` (the layer) lives, returned on the prism's device."""
    if not cv.view.shortformer:
        return None
    pe = cv.at(Site.POS_EMBED, None, positions, W.dtype)
    return cv.home(pe.to(W.device) @ W)


def _pos_embed_side() -> ComponentTable:
    return ComponentTable.block("pos_embed")


def side_terms(
    cv: CacheView,
    layer: int,
    W: Float[Tensor, "d_model d_head"],
    b: Float[Tensor, " d_head"],
    bias_kind: str,
    head: int,
    positions: Int[Tensor, "batch pos"],
    split: Split,
) -> tuple[Float[Tensor, "batch pos d_head comp"], ComponentTable]:
    """One side (query or key) at ``positions``: each writer's ``d_head`` vector, rotated at
    its position, with ln1's bias and the projection's bias as constant writers. ``W`` where
    the layer lives: the readout (``W`` pulled back through ln1) is made there and crosses."""
    view, dtype = cv.view, W.dtype
    ln1 = view.ln1[layer]
    cols = W.T.contiguous()  # [d_head, d_model]
    readout = Readout(
        u=cv.home(ln1.pull_back(cols))[None, None],
        inv_s=cv.inv_scale_or_one(ln1, positions),
        positions=positions,
        attn_layers=layer,
        mlp_layers=layer,
    )
    extra = []
    if ln1.bias is not None:
        const = cv.home(ln1.constant(cols))[None, None]
        extra.append((const, ComponentTable.block("ln.b", layer=layer)))
    extra.append((b[None, None].to(dtype), ComponentTable.block(bias_kind, layer=layer, head=head)))
    pe = shortformer_part(cv, W, positions)
    if pe is not None:
        extra.append((pe, _pos_embed_side()))
    # the terms stored writer-major ([B, P, C, d_head], returned as a permuted view): each
    # writer's block is then one contiguous write, and the pair product reads it as is
    table = writes_table(cv, readout, split, [t for _, t in extra])
    B, P = positions.shape
    buf = torch.empty(B, P, len(table), cols.shape[0], dtype=dtype, device=cv.device)
    terms = split_writes(cv, readout, split, extra=extra, out=buf.permute(0, 1, 3, 2))
    values = terms.values
    side = "q" if bias_kind == "b_Q" else "k"
    qn = qk_norm_factor(cv, layer, side, head, positions, dtype)
    if qn is not None:  # the frozen query/key norm, before rotary as in the model
        if qk_norm_centred(cv, layer, side):
            values = centre(values, 2)
        values = values * qn[..., None]
    rot = rotary_tables(cv, layer, positions, dtype)
    if rot is not None:
        values = rotate(values, rot[0], rot[1], rot[2])
    return values, terms.table


def whole_side(
    cv: CacheView,
    layer: int,
    W: Float[Tensor, "d_model d_head"],
    b: Float[Tensor, " d_head"],
    positions: Int[Tensor, "batch pos"],
    side: str,
    head: int,
) -> Float[Tensor, "batch pos d_head"]:
    """The whole query (``side="q"``, head ``head``) or key (``"k"``, key/value head
    ``head``) vector at ``positions``, rotated there: ``R (ln1(x) W + b)`` with ln1 at its
    cached scale (and the query/key norm at its recorded one, :func:`qk_norm_factor`);
    computed where ``W`` (the layer) lives, returned on the prism's device."""
    ln1, dtype, dev = cv.view.ln1[layer], W.dtype, W.device
    x = cv.at(Site.RESID_PRE, layer, positions, dtype, native=True).to(dev)
    scale = cv.scale(ln1, positions)[..., None].to(dev, dtype) if ln1.has_scale else None
    v = ln1.apply(x, scale) @ W + b.to(dev)
    pe = shortformer_part(cv, W, positions)
    if pe is not None:
        v = v + pe.to(dev)
    qn = qk_norm_factor(cv, layer, side, head, positions, dtype)
    if qn is not None:
        if qk_norm_centred(cv, layer, side):
            v = centre(v, -1)
        v = v * qn.to(dev)
    rot = rotary_tables(cv, layer, positions, dtype)
    if rot is not None:
        cos, sin = rot[0].to(dev), rot[1].to(dev)
        v = rotate(v[..., None], cos, sin, rot[2])[..., 0]
    return cv.home(v)


def one_side(
    cv: CacheView,
    layer: int,
    W: Float[Tensor, "d_model d_head"],
    b: Float[Tensor, " d_head"],
    bias_kind: str,
    head: int,
    positions: Int[Tensor, "batch pos"],
    other: Float[Tensor, "batch n d_head"],
    split: Split,
    factor: float,
) -> tuple[Float[Tensor, "batch pos k comp"], ComponentTable]:
    """One side's writers' terms of the score against the other side kept whole: the score
    ``(R_p v_p) . other * c`` is the readout ``x_p . P(w1 * W R_p^T other c) / s_p`` plus
    ln1's bias and the projection's bias, so the engine splits it with one direction per
    key instead of ``d_head``. ``positions`` is ``[B, 1]`` (the query; ``other`` holds one
    key per column) or ``[B, Kp]`` (the keys; ``other`` the query, one per key). Returns
    ``[B, 1, Kp, C]`` or ``[B, Kp, 1, C]``."""
    view, dtype = cv.view, W.dtype
    ln1 = view.ln1[layer]
    B, P = positions.shape
    rot = rotary_tables(cv, layer, positions, dtype)
    y = other * factor  # [B, K, d_head]
    if rot is not None:  # R_p^T: the rotation at p with the sine negated
        cos, sin, adjacent = rot  # [B, P, rot]
        if P == 1:
            cos, sin = cos.expand(B, y.shape[1], -1), sin.expand(B, y.shape[1], -1)
        y = rotate(y[..., None], cos, -sin, adjacent)[..., 0]
    side = "q" if bias_kind == "b_Q" else "k"
    qn = qk_norm_factor(cv, layer, side, head, positions, dtype)
    if qn is not None:  # the frozen query/key norm, elementwise (P == 1: one per key)
        y = y * qn
        if qk_norm_centred(cv, layer, side):
            y = centre(y, -1)
    u_pre = cv.home(y.to(W.device) @ W.T)  # [B, K, d_model], made where W lives
    pe = shortformer_part(cv, W, positions)  # [B, P, d_head] or None
    pe_term = None
    if P == 1:  # one query position, one direction per key
        u, const = ln1.pull_back(u_pre)[:, None], ln1.constant(u_pre)[:, None]
        bias = (y @ b)[:, None]
        if pe is not None:
            pe_term = (y @ pe[:, 0, :, None])[..., 0][:, None]  # [B, 1, K]
    else:  # one key per position, one direction each
        u, const = ln1.pull_back(u_pre)[:, :, None], ln1.constant(u_pre)[:, :, None]
        bias = (y @ b)[:, :, None]
        if pe is not None:
            pe_term = (y * pe).sum(-1)[:, :, None]  # [B, P, 1]
    readout = Readout(
        u=u,
        inv_s=cv.inv_scale_or_one(ln1, positions),
        positions=positions,
        attn_layers=layer,
        mlp_layers=layer,
    )
    extra = []
    if ln1.bias is not None:
        extra.append((const, ComponentTable.block("ln.b", layer=layer)))
    extra.append((bias, ComponentTable.block(bias_kind, layer=layer, head=head)))
    if pe_term is not None:
        extra.append((pe_term, _pos_embed_side()))
    terms = split_writes(cv, readout, split, extra=extra)
    return terms.values, terms.table


#: the plan blocks :func:`_split_rows` computes (any other block: the d_head path is used)
_ROW_PARTS = ("split", "whole", "bias", "post_b")


def _split_rows(
    cv: CacheView,
    readout: Readout,
    split: Split,
    extra: Sequence[tuple[Tensor, ComponentTable]],
) -> Optional[tuple[Float[Tensor, "batch pos comp k"], ComponentTable]]:
    """:func:`~tlprisms._core.engine.split_writes` for a readout with one set of directions per
    batch row, shared by its positions (``u [B, 1, K, d_model]``): the same blocks, labels
    and order, each whole write read with one GEMM per row (``[P, d] @ [d, K]``) instead of
    the shared ``dot``'s per-position einsum. Split layers go through the engine's own head
    and neuron blocks. No ``layer_gap``. None when the engine's plan holds a block this
    function does not know (the caller then uses the engine).

    The terms are returned writer-major, ``[B, P, C, K]`` (split_writes: ``[B, P, K, C]``):
    each GEMM's scaled rows and each bias block are then one contiguous write (a strided
    write per block costs several times more)."""
    plan = write_plan(cv, readout, split)
    for _, what in plan:
        if what[0] not in ("embed", "pos_embed") and (len(what) != 3 or what[2] not in _ROW_PARTS):
            return None
    view = cv.view
    u, positions = readout.u, readout.positions
    B, P = positions.shape
    K, dtype = u.shape[2], u.dtype
    table = writes_table(cv, readout, split, [t for _, t in extra])
    buf = torch.empty(B, P, len(table), K, dtype=dtype, device=u.device)
    s = readout.inv_s[:, :, None]
    uT = u[:, 0].expand(B, K, u.shape[-1]).transpose(1, 2)  # [B, d_model, K]
    start = 0
    layer: dict = {}
    for tab, what in plan:
        n = len(tab)
        dst = buf[:, :, start : start + n]  # [B, P, n, K]
        start += n
        if what[0] in ("embed", "pos_embed"):
            if what[0] == "embed":
                x = cv.embed_write(positions, dtype)
            else:
                x = cv.at(Site.POS_EMBED, None, positions, dtype)
            torch.mul(torch.bmm(x, uT), s, out=dst[:, :, 0])
            continue
        kind, lay, part = what
        if layer.get("key") != (kind, lay):  # the layer's readout and its bias term
            post = view.ln1_post[lay] if kind == "attn" else view.ln2_post[lay]
            ul, inv = post_parts(cv, post, readout, lay)
            bias = (view.b_O if kind == "attn" else view.b_out)(lay, dtype, u.device)
            layer = {
                "key": (kind, lay),
                "post": post,
                "ul": ul,
                "sl": inv[:, :, None],
                "bias_term": (ul[:, 0] @ bias)[:, None] * inv[:, :, None],  # [B, P, K]
                "post_b": post_bias(post, u)[:, 0][:, None],  # [B, 1, K], times s
            }
        if part == "whole":  # the write minus its bias (and post-norm bias) terms
            site = Site.ATTN_OUT if kind == "attn" else Site.MLP_OUT
            x = cv.at(site, lay, positions, dtype, native=True)
            if x.device == uT.device:
                xu = torch.bmm(x, uT)
            else:  # a split model: read where the layer's output lives, move the result
                xu = torch.bmm(x, uT.to(x.device)).to(uT.device)
            t = torch.mul(xu, s, out=dst[:, :, 0])
            t.sub_(layer["bias_term"])
            if layer["post"] is not None:
                t.sub_(layer["post_b"] * s)
        elif part == "bias":
            dst[:, :, 0] = layer["bias_term"]
        elif part == "post_b":
            torch.mul(layer["post_b"], s, out=dst[:, :, 0])
        elif kind == "attn":  # dst [B, P, n, K] seen as the terms' [B, P, K, head(, src)]
            H = view.n_heads
            dst_t = dst.view(B, P, H, n // H, K) if split.by_source else dst.view(B, P, H, K)
            dst_t = dst_t.movedim(-1, 2)
            head_block(cv, lay, layer["ul"], positions, split.by_source, layer["sl"], dst_t)
        else:
            neuron_block(cv, lay, layer["ul"], positions, layer["sl"], dst.transpose(2, 3))
    for values, tab in extra:
        buf[:, :, start : start + len(tab)] = values.expand(B, P, K)[:, :, None]
        start += len(tab)
    return buf, table


def _pulled_key_side(
    cv: CacheView,
    h: "_Head",
    kpos: Int[Tensor, "batch keys"],
    q: Float[Tensor, "batch ca d_head"],
    split: Split,
) -> Optional[tuple[Float[Tensor, "batch keys cb ca"], ComponentTable]]:
    """Every pair term ``(q_a . K_b(j))`` without rotary, read from the key positions'
    residual streams with the query-side vectors ``q`` (the score factor applied) pulled
    back through ``W_K`` and ln1: one direction per query-side writer (fewer than
    ``d_head`` when there are fewer writers than that), instead of each key-side writer's
    ``d_head`` vector. The key side's constants are ln1's bias (``b . P(W_K q_a)``) and
    ``b_K . q_a``, as :func:`side_terms` labels them. ``[B, Kp, Cb, Ca]`` (the pairs in
    :meth:`PairTable.product`'s order) and the key side's labels, or None where
    :func:`_split_rows` does not know the plan."""
    ln1 = cv.view.ln1[h.layer]
    u_pre = cv.home(q.to(h.W_K.device) @ h.W_K.T)  # [B, Ca, d_model], made where W_K lives
    readout = Readout(
        u=ln1.pull_back(u_pre)[:, None],
        inv_s=cv.inv_scale_or_one(ln1, kpos),
        positions=kpos,
        attn_layers=h.layer,
        mlp_layers=h.layer,
    )
    extra = []
    if ln1.bias is not None:
        extra.append((ln1.constant(u_pre)[:, None], ComponentTable.block("ln.b", layer=h.layer)))
    b_K = (q @ h.b_K.to(q.dtype))[:, None]
    extra.append((b_K, ComponentTable.block("b_K", layer=h.layer, head=h.group)))
    pe = shortformer_part(cv, h.W_K, kpos)  # [B, Kp, d_head] or None
    if pe is not None:
        extra.append((pe @ q.transpose(1, 2), _pos_embed_side()))  # [B, Kp, Ca]
    return _split_rows(cv, readout, split, extra)


def masked_keys(
    cv: CacheView, layer: int, head: int, pos: int, keys: Sequence[int]
) -> Optional[Tensor]:
    """``[B, K]``: which of ``keys`` the model masked at query ``pos`` (an attention mask's
    padding, or a key outside a sliding attention window): the recorded score is ``-inf`` or
    at most half the dtype's lowest value (Hugging Face masks with ``finfo.min``). None when
    the cache holds no scores (a zero of the pattern may be an underflow)."""
    view = cv.view
    idx = torch.tensor(list(keys), dtype=torch.long)
    if cv.has(Site.ATTN_SCORES, layer):
        # the raw cache entry: CacheView.get refuses the causal mask's -inf
        scores = cv.cache[view.hook(Site.ATTN_SCORES, layer)][:, head, pos]
        scores = scores[:, idx.to(scores.device)]
        low = torch.finfo(scores.dtype).min / 2 if scores.dtype.is_floating_point else None
        out = torch.isneginf(scores) if low is None else torch.isneginf(scores) | (scores <= low)
        return out.cpu()
    if cv.has(Site.PATTERN, layer):  # no scores recorded: the keys given no attention at all
        pattern = cv.get(Site.PATTERN, layer, native=True)[:, head, pos]  # where it lives
        return (pattern[:, idx.to(pattern.device)] == 0).cpu()
    return None


def unmasked_keys(
    cv: CacheView, layer: int, head: int, pos: int, keys: Sequence[int], contrast: bool
) -> list[int]:
    """``keys`` without those an attention mask left out. The default keys (every key up
    to ``pos``) drop the keys masked in any row; keys passed explicitly must be attended to
    in every row, or a :class:`PositionError` names the masked ones, the row and the fix."""
    keys = list(keys)
    masked = masked_keys(cv, layer, head, pos, keys)
    if masked is None or not bool(masked.any()):
        return keys
    in_any = masked.any(0).tolist()
    keep = [j for j, m in zip(keys, in_any) if not m]
    default = not contrast and keys == list(range(pos + 1))
    if default and keep:
        return keep
    bad = [j for j, m in zip(keys, in_any) if m]
    rows = sorted({int(b) for b in torch.nonzero(masked)[:, 0].tolist()})
    every = masked_keys(cv, layer, head, pos, range(pos + 1))
    assert every is not None  # the same cache entry as ``masked``
    attended = [j for j, m in enumerate(every.any(0).tolist()) if not m]
    fix = (
        f"pass keys= among those every row attends to ({attended})"
        if attended
        else "no key is attended to in every row: explain the rows separately"
    )
    raise PositionError(
        f"{cv.caller}: key{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad))} of "
        f"L{layer}H{head} at query {pos} {'are' if len(bad) > 1 else 'is'} masked in "
        f"row{'s' if len(rows) > 1 else ''} {', '.join(map(str, rows))}: the model gave "
        f"{'them' if len(bad) > 1 else 'it'} no attention (a -inf score, or without "
        "recorded scores a zero in the recorded pattern), because of the attention mask "
        "(padding recorded with run_with_cache(..., attention_mask=...)) or a sliding "
        f"attention window, so there is nothing to split. {fix[0].upper() + fix[1:]}, or "
        "run the padded row on its own."
    )


def _alibi_pair(layer: int, head: int) -> PairTable:
    """The ALiBi bias as one constant pair (``L{layer}H{head} alibi``)."""
    side = ComponentTable.block("alibi", layer=layer, head=head)
    zero = np.zeros(1, dtype=np.int32)
    return PairTable.make(side, side, zero, zero)


@dataclass(frozen=True)
class _Head:
    """What every key chunk of one head's scores needs: weights, positions, factors."""

    layer: int
    head: int
    group: int
    W_Q: Tensor
    W_K: Tensor
    b_Q: Tensor
    b_K: Tensor
    qpos: Tensor
    factor: float
    cap: Optional[float]
    #: the head's post-cap scores at ``qpos`` for keys ``0..pos`` recomputed from the cache
    #: (``[B, pos + 1]``), checked against the recorded pattern; None where the cache holds
    #: the model's own scores (the terms are checked against those)
    whole: Optional[Tensor] = None


def _prepare(cv: CacheView, layer: int, head: int, pos: int) -> _Head:
    view, dtype, device = cv.view, cv.dtype, cv.device
    problem = view.qk_problem(layer)
    if problem:
        raise UnsupportedModelError(
            f"{cv.caller}: the QK prism cannot split layer {layer}'s attention scores of this "
            f"model ({view.describe()}) exactly: {problem}. The logit prisms still work; "
            "docs/architectures.md says what each family supports."
        )
    if qk_norm_sides(cv, layer) and not cv.has(Site.ATTN_SCORES, layer):
        raise UnsupportedModelError(
            f"{cv.caller}: layer {layer}'s attention normalises queries and keys (q_norm/k_norm); "
            "tlprisms freezes them at their recorded scales "
            f"('{view.hook(Site.Q_NORM_SCALE, layer)}', '{view.hook(Site.K_NORM_SCALE, layer)}') "
            "only where it can check the result against the scores the "
            f"model used, and the cache has no '{view.hook(Site.ATTN_SCORES, layer)}' (Hugging "
            "Face's sdpa attention records none). Load the model with eager attention "
            "(TransformerBridge.boot_transformers does; or model.set_attn_implementation('eager') "
            "before wrapping) and record the cache again."
        )
    g = view.kv_group(head)
    h = _Head(
        layer=layer,
        head=head,
        group=g,
        # where the layer lives (a split model): the readouts made from them cross
        W_Q=view.W_Q(layer, dtype)[head],
        W_K=view.W_K(layer, dtype)[g],
        b_Q=view.b_Q(layer, dtype, device)[head],
        b_K=view.b_K(layer, dtype, device)[g],
        qpos=torch.full((cv.batch, 1), pos, dtype=torch.long, device=device),
        factor=view.attn_score_factor(layer),
        cap=view.attn_softcap(layer),
    )
    return check_attention(cv, h, pos)


def _whole_scores(cv: CacheView, h: _Head, pos: int) -> Float[Tensor, "batch keys"]:
    """Head ``h``'s post-cap scores at query ``pos`` for keys ``0..pos``, recomputed from
    the cache with the sides kept whole (:func:`whole_side`), the ALiBi bias added."""
    B, layer = cv.batch, h.layer
    kpos = torch.arange(pos + 1, device=cv.device)[None].expand(B, -1)
    q = whole_side(cv, layer, h.W_Q, h.b_Q, h.qpos, "q", h.head)  # [B, 1, d]
    k = whole_side(cv, layer, h.W_K, h.b_K, kpos, "k", h.group)  # [B, pos + 1, d]
    z = (k @ q.transpose(1, 2))[..., 0] * h.factor
    if cv.view.alibi_kind is not None:
        z = z + cv.view.alibi_bias(layer, h.head, pos, kpos[0], cv.n_ctx).to(z.device, z.dtype)
    return z if h.cap is None else h.cap * torch.tanh(z / h.cap)


def _check_projection(cv: CacheView, h: _Head, pos: int) -> None:
    """The queries at ``pos`` and keys at ``0..pos`` as this prism computes them before
    any query/key norm and rotary (``ln1(x) W + b`` with ln1 at its cached scale) against
    the recorded ``hook_q`` / ``hook_k``, where the cache has them."""
    view, layer = cv.view, h.layer
    ln1 = view.ln1[layer]
    kpos = torch.arange(pos + 1, device=cv.device)[None].expand(cv.batch, -1)
    for site, W, b, idx, positions in (
        (Site.Q, h.W_Q, h.b_Q, h.head, h.qpos),
        (Site.K, h.W_K, h.b_K, h.group, kpos),
    ):
        if not cv.has(site, layer):
            continue
        rec = cv.get(site, layer, native=True)  # where the layer lives: only a slice crosses
        if rec.ndim != 4 or rec.shape[2] <= idx or rec.shape[-1] != W.shape[-1]:
            continue  # a layout this check does not read; the pattern check still holds
        dev, dtype = W.device, W.dtype
        x = cv.at(Site.RESID_PRE, layer, positions, dtype, native=True).to(dev)
        scale = cv.scale(ln1, positions)[..., None].to(dev, dtype) if ln1.has_scale else None
        # compared where the layer's recorded values live: only the verdict crosses devices
        want = gather_pos(rec[:, :, idx], positions.to(rec.device), cv.dtype)
        v = (ln1.apply(x, scale) @ W + b.to(dev)).to(want.device, want.dtype)  # [B, P, d]
        rtol = _SCORES_RTOL_LOWP if cv.low_precision else _SCORES_RTOL
        gap = (v - want).abs()
        if bool((gap > rtol * (1.0 + want.abs().amax(-1, keepdim=True))).any()):
            raise UnsupportedModelError(
                f"{cv.caller}: the {'queries' if site is Site.Q else 'keys'} of "
                f"L{layer}H{h.head} recomputed from the cache (ln1 at its recorded scale, "
                f"then W and b) miss the recorded '{view.hook(site, layer)}' by up to "
                f"{float(gap.max()):.3g}: this architecture ({view.describe()}) projects them "
                "in a way tlprisms does not know, or the cache was edited by hooks. Nothing "
                "was returned; please report the model config."
            )


def check_attention(cv: CacheView, h: _Head, pos: int) -> _Head:
    """The scores the QK prism explains are the ones the model used: the softmax of the
    head's scores at ``pos`` over the keys the model attends (the recorded scores where
    the cache holds them, else recomputed, :func:`_whole_scores`) must equal its recorded
    ``hook_pattern`` there (:data:`PATTERN_ATOL`), and the masked keys get no attention.
    Without recorded scores the recomputed queries and keys are also checked against
    ``hook_q`` / ``hook_k`` (:func:`_check_projection`): the pattern fixes the scores only
    up to a constant per query. Returns ``h`` with the recomputed scores, or raises
    :class:`UnsupportedModelError` naming what differs."""
    view, layer = cv.view, h.layer
    has_scores = cv.has(Site.ATTN_SCORES, layer)
    if has_scores and not cv.has(Site.PATTERN, layer):
        return h  # the terms are checked against the recorded scores (nothing to add)
    pattern = cv.get(Site.PATTERN, layer, native=True)[:, h.head, pos, : pos + 1]
    pattern = pattern.to(cv.device, cv.dtype)  # only the row read crosses devices
    masked = masked_keys(cv, layer, h.head, pos, range(pos + 1))
    assert masked is not None  # the cache has the pattern
    masked = masked.to(cv.device)
    whole = None
    if has_scores:
        scores = cv.cache[view.hook(Site.ATTN_SCORES, layer)][:, h.head, pos, : pos + 1]
        z = scores.to(cv.device, cv.dtype)
        what = f"the recorded scores '{view.hook(Site.ATTN_SCORES, layer)}'"
    else:
        _check_projection(cv, h, pos)
        z = whole = _whole_scores(cv, h, pos)
        what = "the scores recomputed from the cache"
    p = torch.softmax(z.masked_fill(masked, float("-inf")), -1)
    gap = (p.nan_to_num(0.0) - pattern).abs()
    atol = PATTERN_ATOL_LOWP if cv.low_precision else PATTERN_ATOL
    if bool((gap > atol).any()):
        raise UnsupportedModelError(
            f"{cv.caller}: the softmax of {what} of L{layer}H{h.head} at query {pos} over the "
            f"keys the model attends misses the recorded pattern "
            f"'{view.hook(Site.PATTERN, layer)}' by up to {float(gap.max()):.3g} (tolerance "
            f"{atol:g}): these are not the scores the model used (this architecture, "
            f"{view.describe()}, computes or records its attention in a way tlprisms does not "
            "know: a rotary convention, a score scale, a positional bias or a mask), or the "
            "cache was edited by hooks. Nothing was returned; please report the model config."
        )
    return h if whole is None else replace(h, whole=whole)


#: the key side is read with the query-side writers pulled back through ``W_K`` when
#: there are at most this many query-side writers per ``d_head`` coordinate (and no rotary:
#: the rotation differs per key); ``0`` always takes the ``d_head`` path (tests compare them)
PULL_BACK_MAX_RATIO = 1.0


def _pull_back_keys(cv: CacheView, layer: int, n_writers: int, d_head: int) -> bool:
    """Whether the "both" path reads the key side with pulled-back query writers (not
    with rotary or a query/key norm: both differ per key)."""
    if cv.view.rotary or qk_norm_sides(cv, layer):
        return False
    return n_writers <= PULL_BACK_MAX_RATIO * d_head


def _chunk_terms(
    cv: CacheView,
    h: _Head,
    pos: int,
    keys: Sequence[int],
    q_split: Split,
    k_split: Split,
    softcap: str,
    sides: str,
) -> tuple[Tensor, PairTable, Tensor, str]:
    """The pair terms ``[B, 1, K, C]`` of head ``h``'s scores at query ``pos`` for ``keys``,
    their labels, what they add up to ``[B, 1, K]`` and its name (checked against the
    recorded scores where the cache has them)."""
    view, dtype, device = cv.view, cv.dtype, cv.device
    layer, head, g, factor, qpos = h.layer, h.head, h.group, h.factor, h.qpos
    B = cv.batch
    kpos = torch.tensor(list(keys), dtype=torch.long, device=device)[None].expand(B, -1)
    Kp = kpos.shape[1]
    whole = ComponentTable.block("resid", layer=layer)
    if sides == "query":  # the key whole: a readout of the query's stream, one per key
        k = whole_side(cv, layer, h.W_K, h.b_K, kpos, "k", g)  # [B, Kp, d_head], rotated at j
        values, q_table = one_side(cv, layer, h.W_Q, h.b_Q, "b_Q", head, qpos, k, q_split, factor)
        values, k_table = values.reshape(B, 1, Kp, -1), whole
    elif sides == "key":  # the query whole: a readout of each key's stream
        q = whole_side(cv, layer, h.W_Q, h.b_Q, qpos, "q", head).expand(B, Kp, -1)
        values, k_table = one_side(cv, layer, h.W_K, h.b_K, "b_K", g, kpos, q, k_split, factor)
        values, q_table = values.reshape(B, 1, Kp, -1), whole
    else:
        Q, q_table = side_terms(cv, layer, h.W_Q, h.b_Q, "b_Q", head, qpos, q_split)
        q = Q[:, 0].transpose(1, 2) * factor  # [B, Ca, d] (the factor on the query side)
        Ca = q.shape[1]
        pulled = None
        if _pull_back_keys(cv, layer, Ca, q.shape[2]):
            pulled = _pulled_key_side(cv, h, kpos, q, k_split)
        if pulled is not None:  # [B, Kp, Cb, Ca]: the pairs in their final order
            values, k_table = pulled[0].view(B, 1, Kp, -1), pulled[1]
        else:
            K, k_table = side_terms(cv, layer, h.W_K, h.b_K, "b_K", g, kpos, k_split)
            Cb = K.shape[-1]
            # one GEMM per row for every pair, [Kp * Cb, d] @ [d, Ca] -> [B, Kp, Cb, Ca]:
            # already key-major, each key-side writer a row of query-side writers
            k = K.transpose(2, 3).reshape(B, Kp * Cb, -1)  # writer-major: a view, no copy
            values = torch.bmm(k, q.transpose(1, 2)).view(B, 1, Kp, Cb * Ca)
    table = PairTable.product(q_table, k_table)
    if view.alibi_kind is not None:  # the positional bias: one constant pair per key
        bias = view.alibi_bias(layer, head, pos, kpos[0], cv.n_ctx).to(device, dtype)
        values = torch.cat((values, bias.expand(B, 1, Kp)[..., None]), -1)
        table = table.append(_alibi_pair(layer, head))
    z = values.sum(-1)
    cap = h.cap
    post = z if cap is None else cap * torch.tanh(z / cap)
    recorded = None
    if not bool(torch.isfinite(z).all()):  # a NaN or infinite term makes its score's sum so
        cv.refuse_nonfinite("the attention score terms")
    reference = None
    if cv.has(Site.ATTN_SCORES, layer):
        # read past CacheView.get's finiteness check: the causal mask is -inf above the
        # diagonal; the scores read here (keys <= pos) are checked below
        scores = cv.cache[view.hook(Site.ATTN_SCORES, layer)]
        recorded = scores[:, head, pos].to(device, dtype)[:, kpos[0]][:, None]
        if not bool(torch.isfinite(recorded).all()):
            unmasked_keys(cv, layer, head, pos, list(keys), True)  # names a mask's padding
            cv.refuse_nonfinite("the attention scores")
        reference = recorded
    elif h.whole is not None:  # the scores recomputed whole (checked against the pattern)
        reference = h.whole[:, kpos[0]][:, None]
    if reference is not None:
        rtol = _SCORES_RTOL_LOWP if cv.low_precision else _SCORES_RTOL
        gap = (post - reference).abs()
        # the bound grows with sum |terms|: read them only when the gap passes 1 + |score|
        if bool((gap > rtol * (1.0 + reference.abs())).any()) and bool(
            (gap > rtol * (1.0 + reference.abs() + torch.linalg.vector_norm(values, 1, -1))).any()
        ):
            what = (
                "the model's recorded attention scores"
                if recorded is not None
                else "the attention scores recomputed whole (whose softmax is the recorded pattern)"
            )
            raise UnsupportedModelError(
                f"{cv.caller}: the QK terms of L{layer}H{head} do not reproduce {what} "
                f"(gap up to {float(gap.max()):.3g}): this "
                f"architecture ({view.describe()}) computes its scores in a way tlprisms does "
                "not know (a rotary convention, a score scale or a positional bias), or the "
                "cache was edited by hooks. Nothing was returned; please report the model config."
                + (
                    " This model adds ALiBi, taken for rows without padding: run unpadded rows."
                    if view.alibi_kind is not None
                    else ""
                )
            )
    if cap is None:
        explained, explains = (post if recorded is None else recorded), "attention score"
    elif softcap == "pre":
        explained, explains = z, "pre-softcap attention score"
    else:
        values = values * softcap_ratio(z, cap)[..., None]
        explained = post if recorded is None else recorded
        explains = "post-softcap attention score (rho frozen)"
    return values, table, explained, explains


def qk_terms(
    rec: Recorded,
    layer: int,
    head: int,
    pos: int,
    keys: Sequence[int],
    q_split: Split,
    k_split: Split,
    softcap: str,
    contrast: bool,
    sides: str = "both",
) -> Terms:
    """The pair terms ``values [B, 1, K, C]`` (K: keys, or 1 for a contrast) of head
    ``(layer, head)``'s scores at query ``pos`` for ``keys``, and what they add up to."""
    cv = rec.cache
    h = _prepare(cv, layer, head, pos)
    values, table, explained, explains = _chunk_terms(
        cv, h, pos, keys, q_split, k_split, softcap, sides
    )
    labels = _key_labels(rec, keys)
    if contrast:
        values = values[:, :, :1] - values[:, :, 1:2]
        explained = explained[:, :, :1] - explained[:, :, 1:2]
        labels = np.array([[[f"{labels[0, 0, 0]} - {labels[0, 0, 1]}"]]], dtype=object)
        explains = f"{explains} difference"
    return Terms(
        values=values,
        table=table,
        explained=explained,
        positions=h.qpos,
        labels=labels,
        explains=explains,
        name=f"qk L{layer}H{head}",
    )


def _n_writers(cv: CacheView, h: _Head, split: Split) -> int:
    """How many writers one side of head ``h`` has with ``split`` (ln1's bias and the
    projection's bias included), without computing a term."""
    readout = Readout(
        u=torch.zeros(1, 1, 1, h.W_Q.shape[0], dtype=h.W_Q.dtype, device=cv.device),
        inv_s=torch.ones(h.qpos.shape, dtype=h.W_Q.dtype, device=cv.device),
        positions=h.qpos,
        attn_layers=h.layer,
        mlp_layers=h.layer,
    )
    n = len(writes_table(cv, readout, split))
    return n + 1 + int(cv.view.ln1[h.layer].bias is not None) + int(cv.view.shortformer)


def qk_sparse_terms(
    rec: Recorded,
    layer: int,
    head: int,
    pos: int,
    keys: Sequence[int],
    q_split: Split,
    k_split: Split,
    softcap: str,
    contrast: bool,
    sides: str,
    top_k: Optional[int],
    min_abs: Optional[float],
    chunk: Optional[int] = None,
) -> Terms:
    """:func:`qk_terms` kept sparse (``top_k`` / ``min_abs``, see :mod:`tlprisms._core.sparse`):
    the dense pair terms of a chunk of keys at a time (``chunk`` keys, default as many as
    keep the dense block under the sparse module's chunk budget), each chunk reduced to its
    kept terms, the constants and one remainder per (query kind, layer, key kind, layer)."""
    from tlprisms._core.sparse import (
        CHUNK_BYTES,
        CHUNK_BYTES_CUDA,
        Groups,
        extend,
        remainder_groups,
        sparsify,
    )

    if contrast:  # two keys: one dense block, then their difference made sparse
        t = qk_terms(rec, layer, head, pos, keys, q_split, k_split, softcap, True, sides)
        both = remainder_groups(t.table)
        st = sparsify(t.values, both, top_k, min_abs)
        return replace(t, values=st.values, index=st.index, table=extend(t.table, both))
    cv = rec.cache
    h = _prepare(cv, layer, head, pos)
    keys = list(keys)
    pieces: list = []
    explained: list = []
    groups: Optional[Groups] = None
    table: Optional[PairTable] = None
    explains = ""
    if chunk is None:  # as many keys as keep the dense pair block under the budget
        nq = _n_writers(cv, h, q_split) if sides != "key" else 1
        nk = _n_writers(cv, h, k_split) if sides != "query" else 1
        per_key = cv.batch * (nq * nk + 1) * h.W_Q.element_size()
        budget = CHUNK_BYTES_CUDA if cv.device.type == "cuda" else CHUNK_BYTES
        chunk = max(1, budget // per_key)
    s = 0
    while s < len(keys):
        e = min(len(keys), s + chunk)
        values, table, ex, explains = _chunk_terms(
            cv, h, pos, keys[s:e], q_split, k_split, softcap, sides
        )
        if groups is None:
            groups = remainder_groups(table)
        pieces.append(sparsify(values, groups, top_k, min_abs, inplace=True))
        explained.append(ex)
        del values
        s = e
    assert groups is not None and table is not None
    n_tail = len(groups.const) + len(groups)
    S = max(p.values.shape[-1] for p in pieces)
    B, K = cv.batch, len(keys)
    v0 = pieces[0].values
    out_v = torch.zeros(B, 1, K, S, dtype=v0.dtype, device=v0.device)
    out_i = torch.full((B, 1, K, S), -1, dtype=torch.long, device=v0.device)
    s = 0
    for p in pieces:  # widths differ only with min_abs: the padding is empty slots
        e, w = s + p.values.shape[2], p.values.shape[-1]
        out_v[:, :, s:e, : w - n_tail] = p.values[..., : w - n_tail]
        out_i[:, :, s:e, : w - n_tail] = p.index[..., : w - n_tail]
        out_v[:, :, s:e, S - n_tail :] = p.values[..., w - n_tail :]
        out_i[:, :, s:e, S - n_tail :] = p.index[..., w - n_tail :]
        s = e
    return Terms(
        values=out_v,
        table=extend(table, groups),
        explained=torch.cat(explained, 2),
        positions=h.qpos,
        labels=_key_labels(rec, keys),
        explains=explains,
        name=f"qk L{layer}H{head}",
        index=out_i,
    )


def _key_labels(rec: Recorded, keys: Sequence[int]) -> np.ndarray:
    """``"'France'@4"`` per key (``"key 4"`` without tokens), ``[1, 1, K]``."""
    view, tokens = rec.cache.view, rec.tokens
    out = []
    for j in keys:
        if tokens is None:
            out.append(f"key {j}")
        else:
            out.append(f"{view.token_label(int(tokens[0, j]))}@{j}")
    return np.array([[out]], dtype=object)


def resolve_keys(
    pos: Any, keys: Any, contrast: Any, n_ctx: int, caller: str
) -> tuple[int, list[int]]:
    """The query position and the key positions (each at most the query: causal)."""
    from tlprisms._core import arguments as check

    i = check.in_range(pos, n_ctx, "pos", caller, error=PositionError, of=f" ({n_ctx} positions)")
    if not isinstance(contrast, bool):
        raise ArgumentError(f"{caller}: contrast={contrast!r}; pass True or False.")
    if keys is None:
        if contrast:
            raise ArgumentError(
                f"{caller}: contrast=True needs two keys, keys=[j, j2] (the score of j minus "
                "that of j2)."
            )
        return i, list(range(i + 1))
    if check.is_index(keys):
        keys = [keys]
    if isinstance(keys, (str, bytes)) or not isinstance(keys, (Sequence, np.ndarray, Tensor)):
        raise ArgumentError(
            f"{caller}: keys={keys!r:.60}; pass None (every key up to pos), a key position, "
            "or a list of key positions."
        )
    out = [
        check.in_range(j, n_ctx, "key", caller, error=PositionError, of=f" ({n_ctx} positions)")
        for j in keys
    ]
    if not out:
        raise ArgumentError(f"{caller}: keys is empty; pass at least one key position.")
    late = [j for j in out if j > i]
    if late:
        raise PositionError(
            f"{caller}: key position {late[0]} comes after the query position {i}; the head "
            f"cannot attend there (causal mask). Use keys at positions 0..{i}."
        )
    if contrast and len(out) != 2:
        raise ArgumentError(
            f"{caller}: contrast=True needs exactly two keys, keys=[j, j2]; got {len(out)}."
        )
    return i, out


# ----------------------------------------------------------------------------- the prism
def run(rec: Recorded, request: Request, q_split: Split, k_split: Split) -> Terms:
    """The QK prism's terms for ``request`` (``layer``, ``head``, the query position ``pos``,
    ``keys``, ``contrast``, ``sides``, ``softcap``, ``top_k``/``min_abs``).

    Phases: (1) the head's frozen query and key sides (``ln1`` scale, rotary at each
    position); (2) every (query writer, key writer) pair term, a chunk of keys at a time when
    kept sparse; (3) the check against the recorded scores (dense) or the structural check
    (sparse)."""
    layer, head, keys = request.layer, request.head, list(request.keys or ())
    assert layer is not None and head is not None
    keys = unmasked_keys(rec.cache, layer, head, request.pos, keys, request.contrast)
    args = (rec, layer, head, request.pos, keys, q_split, k_split, request.softcap)
    if not request.is_sparse:  # finite and checked against the recorded scores here
        return qk_terms(*args, request.contrast, request.sides)
    t = qk_sparse_terms(*args, request.contrast, request.sides, request.top_k, request.min_abs)
    refuse_broken(rec.cache, t.values, t.explained)
    return t


def check_sides(
    sides: Any, q_heads: Any, q_neurons: Any, k_heads: Any, k_neurons: Any, caller: str
) -> None:
    """``sides`` is one of ``"both"``, ``"query"``, ``"key"``, and a side kept whole is not
    split."""
    from tlprisms._core import arguments as check

    check.choice(sides, "sides", ("both", "query", "key"), caller)
    whole = {"query": (k_heads, k_neurons, "k"), "key": (q_heads, q_neurons, "q")}
    if sides in whole and any(sel not in ((), None) for sel in whole[sides][:2]):
        side = whole[sides][2]
        raise ArgumentError(
            f"{caller}: sides={sides!r} keeps the {'key' if side == 'k' else 'query'} "
            f"side whole, so {side}_heads/{side}_neurons cannot split it; drop them or "
            "use sides='both'."
        )
