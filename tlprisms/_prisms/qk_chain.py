"""Chains through one side of an attention score: what fed the query at ``i`` (or the key at
``j``), pulled back through an earlier head or neuron.

With ln1's cached scale frozen and the key side kept whole, head ``(l, h)``'s score for key
``j`` is a linear readout of ``resid_pre l`` at the query position ``i``, one direction per key
(:func:`tlprisms._prisms.qk.one_side` splits the same readout):

    z_ij = x_i . P(w1 * (W_Q R_i^T k_j c)) / s_i  +  ln1's bias and b_Q terms

(``k_j = R_j (ln1(x_j) W_K + b_K)`` the whole rotated key, ``c`` the score factor). Likewise the
key side is a readout of ``resid_pre l`` at each key ``j``, one direction (the whole query). So
:func:`~tlprisms._prisms.chain.run_chain`'s hops apply unchanged: ``Hop("head", l2, h2,
src=k)`` splits head ``(l2, h2)``'s write at the read position, from its source ``k``, into
what wrote the residual stream at ``k`` (scales, pattern and gates frozen as for every chain).

**Total.** The chained terms add up exactly to the hop's term in that one-side readout: for a
first hop ``Hop("head", l2, h2, src=k)`` on the query side, the component ``L{l2}H{h2}[src k]``
of ``qk(layer, head, pos, keys, sides="query", q_heads=l2)`` (``L{l2}N{n}`` for a neuron hop),
times the frozen soft-cap ratio ``rho = cap * tanh(z / cap) / z`` of each score post-cap; a
contrast ``keys=[j, j2]`` gives that term for ``j`` minus that for ``j2``. Later hops split the
previous hop's term, as :meth:`~tlprisms.LogitPrism.chain` does. Components carry ``at``, the
position they wrote at; ``at=-1`` is the position read first: the query position on the query
side, and on the key side each target's own key position. A chain reads what the QK
prism and the chains read: record the cache with ``needed_hooks(model, ("qk", "chains"))``
(or the default, every part).

>>> import torch
>>> import tlprisms as tp
>>> from tlprisms.demo import load_demo_model
>>> prism = tp.LogitPrism.run(load_demo_model(), "The capital of France is")
>>> r = prism.qk(1, 0, sides="query", path=[tp.Hop("head", 0, 2, src=3)]).check()
>>> [str(c) for c in r.components], r.prism
(['@3 embed', '@3 L0.b_VH2'], 'qk L1H0 query side through L0H2[src 3]')
>>> one = prism.qk(1, 0, sides="query", q_heads=0).select(q_kind="head", q_head=2, q_src=3)
>>> bool(torch.allclose(r.total(), one.values[..., 0], atol=1e-9))
True
"""

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from tlprisms._core import arguments as check
from tlprisms._core.engine import Readout, Split, split_writes
from tlprisms._core.errors import ArgumentError, PositionError
from tlprisms._core.policy import refuse_broken
from tlprisms._core.readout import Explained, Recorded, softcap_ratio, weigh
from tlprisms._core.request import Request
from tlprisms._core.table import ComponentTable
from tlprisms._core.terms import Terms, keep_largest
from tlprisms._prisms import qk
from tlprisms._prisms.chain import ChainSplit, ChainState, Hop, check_hop, head_hop, run_chain
from tlprisms._prisms.qk import (
    centre,
    qk_norm_centred,
    qk_norm_factor,
    qk_terms,
    rotary_tables,
    rotate,
    whole_side,
)
from tlprisms._seam import CacheView

__all__ = [
    "qk_chain_terms",
    "check_path",
    "resolve_path",
    "side_readout",
    "key_readouts",
]


def side_readout(
    cv: CacheView,
    layer: int,
    W: Float[Tensor, "d_model d_head"],
    positions: Int[Tensor, "batch one"],
    other: Float[Tensor, "batch n d_head"],
    factor: float,
    head: int,
) -> Readout:
    """The score ``(R_p v_p) . other * c`` as a readout of ``resid_pre layer`` at the one
    position per row ``positions``: one direction per column of ``other`` (the other side's
    whole rotated vectors), ``P(w1 * W R_p^T other c)`` with ln1's cached ``1/s`` at ``p``.
    The same directions as :func:`tlprisms._prisms.qk.one_side` (query head ``head``'s
    query norm frozen at ``p`` where the model has one); its constants (ln1's bias, the
    projection's bias) belong to no hop, so a chain does not need them."""
    view = cv.view
    ln1 = view.ln1[layer]
    B, n = other.shape[0], other.shape[1]
    y = other * factor
    rot = rotary_tables(cv, layer, positions, W.dtype)
    if rot is not None:  # R_p^T: the rotation at p with the sine negated
        cos, sin = (t.expand(B, n, -1) for t in rot[:2])
        y = rotate(y[..., None], cos, -sin, rot[2])[..., 0]
    qn = qk_norm_factor(cv, layer, "q", head, positions, W.dtype)
    if qn is not None:  # the frozen query norm, elementwise (then its centring, if any)
        y = y * qn
        if qk_norm_centred(cv, layer, "q"):
            y = centre(y, -1)
    u = ln1.pull_back(cv.home(y.to(W.device) @ W.T))[:, None]  # [B, 1, n, d_model]
    return Readout(
        u=u,
        inv_s=cv.inv_scale_or_one(ln1, positions),
        positions=positions,
        attn_layers=layer,
        mlp_layers=layer,
    )


def key_readouts(
    cv: CacheView,
    layer: int,
    W: Float[Tensor, "d_model d_head"],
    positions: Int[Tensor, "batch k"],
    query: Float[Tensor, "batch one d_head"],
    factor: float,
    group: int,
) -> list:
    """:func:`side_readout` at each key position (one direction each, the whole query),
    computed for every key at once: one :class:`Readout` per key (key/value head ``group``'s
    key norm frozen at each key where the model has one)."""
    view = cv.view
    ln1 = view.ln1[layer]
    B, Kp = positions.shape
    y = (query * factor).expand(B, Kp, -1)
    rot = rotary_tables(cv, layer, positions, W.dtype)
    if rot is not None:  # R_j^T at each key
        y = rotate(y[..., None], rot[0], -rot[1], rot[2])[..., 0]
    qn = qk_norm_factor(cv, layer, "k", group, positions, W.dtype)
    if qn is not None:  # the frozen key norm at each key, elementwise (then its centring)
        y = y * qn
        if qk_norm_centred(cv, layer, "k"):
            y = centre(y, -1)
    u = ln1.pull_back(cv.home(y.to(W.device) @ W.T))  # [B, Kp, d_model]
    inv_s = cv.inv_scale_or_one(ln1, positions)  # [B, Kp]
    return [
        Readout(
            u=u[:, n, None, None],
            inv_s=inv_s[:, n : n + 1],
            positions=positions[:, n : n + 1],
            attn_layers=layer,
            mlp_layers=layer,
        )
        for n in range(Kp)
    ]


def resolve_path(path: object, sides: str, caller: str) -> list:
    """``path=`` of :meth:`~tlprisms.LogitPrism.qk` as a list of :class:`Hop`, refused
    clearly where a chain through one side cannot follow it."""
    if sides == "both":
        raise ArgumentError(
            f"{caller}: path= follows one side of the score back through earlier heads or "
            "neurons, with the other side kept whole; pass sides='query' (what fed the query) "
            "or sides='key' (what fed the key), not sides='both'."
        )
    if isinstance(path, (Hop, str)) or not isinstance(path, Sequence) or not path:
        raise ArgumentError(
            f"{caller}: path={path!r:.80}; pass a non-empty list of tlprisms.Hop, e.g. "
            "[tp.Hop('head', 0, 1, src=3)]."
        )
    return [h if isinstance(h, Hop) else Hop(*h) for h in path]


def check_path(
    cv: CacheView, layer: int, side: str, path: Sequence[Hop], read_at: Sequence[int]
) -> None:
    """Refuse what a chain through one side of layer ``layer``'s score cannot follow: a
    first hop not before that layer, a feature hop, or a head hop's ``src`` after the
    position it is read at (``read_at``: the query position, or every key position)."""
    caller, view = cv.caller, cv.view
    where = min(read_at)
    for n, hop in enumerate(path):
        if hop.kind == "feature":
            raise ArgumentError(
                f"{caller}: path= through one side of an attention score follows head and "
                f"neuron hops; {hop} is a feature hop. Split the side into features with "
                "LogitPrism.readout(...) on the query/key direction, or drop the feature hop."
            )
        hop_layer = check.layer(view, hop.layer, caller)
        if n == 0 and hop_layer >= layer:
            raise ArgumentError(
                f"{caller}: the first hop {hop} is in layer {hop_layer}, but the {side} of "
                f"L{layer}'s score reads resid_pre {layer}, which only layers before {layer} "
                f"write; chain through a head or neuron of layers 0..{layer - 1}."
            )
        if hop.kind != "head" or hop.src is None:
            continue
        if hop.src > where:
            at = (
                f"the query position {where}"
                if side == "query"
                else f"the key position {where}" + (" (the first key)" if len(read_at) > 1 else "")
            )
            fix = "" if side == "query" else f", or keys at positions >= {hop.src}"
            if n > 0:
                at, fix = f"position {where}, the previous hop's source", ""
            raise PositionError(
                f"{caller}: hop {hop} reads source position {hop.src}, after {at} where its "
                f"output is read; a head at position {where} attends only to positions "
                f"0..{where} (causal mask). Pass src <= {where}{fix}."
            )
        where = hop.src


def qk_chain_terms(
    rec: Recorded,
    layer: int,
    head: int,
    pos: int,
    keys: Sequence[int],
    side: str,
    path: Sequence[Hop],
    split: Split,
    softcap: str,
    contrast: bool,
) -> Terms:
    """Follow ``path`` back from one side (``"query"`` or ``"key"``) of head
    ``(layer, head)``'s scores at query ``pos`` for ``keys``; split the last hop by writer:
    ``values [B, 1, K, C]`` (K: keys, or 1 for a contrast) that add up to the first hop's
    term of that side."""
    cv = rec.cache
    check_path(cv, layer, side, path, [pos] if side == "query" else list(keys))
    view, dtype, device = cv.view, cv.dtype, cv.device
    # the scores, checked against the recorded ones (and refused where this prism cannot
    # split them) by the QK prism itself at layer level: pre-cap, one per key
    whole = qk_terms(rec, layer, head, pos, keys, Split(), Split(), "pre", False, side)
    z = whole.values.sum(-1)[:, 0]  # [B, Kp]: the pre-cap scores
    cap = view.attn_softcap(layer)
    if cap is None:
        rho, explains = torch.ones_like(z), "attention score"
    elif softcap == "pre":
        rho, explains = torch.ones_like(z), "pre-softcap attention score"
    else:
        rho, explains = softcap_ratio(z, cap), "post-softcap attention score (rho frozen)"
    B, Kp = z.shape
    g = view.kv_group(head)
    W_Q = view.W_Q(layer, dtype)[head]  # where the layer lives: the readouts cross
    W_K = view.W_K(layer, dtype)[g]
    b_Q = view.b_Q(layer, dtype, device)[head]
    b_K = view.b_K(layer, dtype, device)[g]
    factor = view.attn_score_factor(layer)
    qpos = torch.full((B, 1), pos, dtype=torch.long, device=device)
    kpos = torch.tensor(list(keys), dtype=torch.long, device=device)[None].expand(B, -1)
    if contrast:  # one target of two atoms: rho_j * (key j) - rho_j2 * (key j2)
        weights = (rho * torch.tensor([1.0, -1.0], dtype=dtype, device=device))[:, None, None]
    else:  # one target per key
        weights = rho[:, None, :, None]
    ex = Explained(weights=weights, values=weights.sum(-1), explains=explains)
    if side == "query":  # one readout at the query position, one direction per key
        k = whole_side(cv, layer, W_K, b_K, kpos, "k", g)  # [B, Kp, d_head], rotated at j
        readout = side_readout(cv, layer, W_Q, qpos, k, factor, head)
        ct = run_chain(rec, readout, ex, path, split)
    else:  # one readout per key position, each one direction (the whole query)
        q = whole_side(cv, layer, W_Q, b_Q, qpos, "q", head)  # [B, 1, d_head], rotated at i
        readouts = key_readouts(cv, layer, W_K, kpos, q, factor, g)
        if path[0].kind == "head" and path[0].src is not None:
            ct = _keys_through_head(rec, readouts, ex, path, split)
        else:  # the read position differs per key at every hop: one chain per key
            parts = []
            for n, readout in enumerate(readouts):
                w = weights[:, :, n : n + 1] if not contrast else weights[:, :, :, n : n + 1]
                one = Explained(weights=w, values=w[..., 0], explains=explains)
                parts.append(run_chain(rec, readout, one, path, split))
            ct = _stack_keys(parts, contrast)
    labels = whole.labels
    if contrast:
        labels = np.array([[[f"{labels[0, 0, 0]} - {labels[0, 0, 1]}"]]], dtype=object)
        explains = f"{explains} difference"
    name = " > ".join(str(h) for h in path)
    return Terms(
        values=ct.values,
        table=ct.table,
        explained=ct.explained,
        positions=qpos,
        labels=labels,
        explains=f"{explains}: {side}-side term of {name}",
        name=f"qk L{layer}H{head} {side} side through {name}",
    )


def _keys_through_head(
    rec: Recorded, readouts: list, ex: Explained, path: Sequence[Hop], split: Split
) -> ChainSplit:
    """The key side when the first hop is a head hop from one source ``k``: after that hop
    every key's readout reads the residual stream at ``k``, so the keys' directions, each
    times its own coefficient (the pattern weight at its key, post-norm scale, ln1's scale
    at ``k``), are one readout of ``Kp`` directions and the rest of the chain runs once
    (instead of once per key)."""
    cv = rec.cache
    states, terms = [], []
    for r in readouts:
        st = ChainState(r, np.asarray([-1]), [])
        st, term = head_hop(cv, st, check_hop(cv, st, path[0], last=len(path) == 1))
        states.append(st)
        terms.append(term)
    first = states[0].readout
    B = first.positions.shape[0]
    u = torch.cat(
        [s.readout.u.expand(B, -1, -1, -1) * s.readout.inv_s[:, :, None, None] for s in states],
        dim=2,
    )  # [B, 1, Kp, d_model]
    readout = Readout(
        u=u,
        inv_s=torch.ones_like(first.inv_s),
        positions=first.positions,
        attn_layers=first.attn_layers,
        mlp_layers=first.mlp_layers,
    )
    if len(path) > 1:
        return run_chain(rec, readout, ex, path[1:], split)
    weights = ex.weights  # [B, 1, k, a]: the keys as atoms of the targets
    k = weights.shape[2]
    split_terms = split_writes(cv, readout, split)
    values = [weigh(split_terms.values, weights)]  # [B, 1, k, C]
    tables = [split_terms.table.tile_over_positions(states[0].at)]
    for c, (table, _) in enumerate(states[0].consts):  # b_V, ln.b: the same labels per key
        v = torch.cat([s.consts[c][1] for s in states], dim=2)  # [B, 1, Kp]
        values.append(weigh(v[..., None], weights))
        tables.append(table)
    term = (torch.cat(terms, dim=2).reshape(B, 1, k, -1) * weights).sum(-1)
    return ChainSplit(
        values=torch.cat(values, -1),
        table=ComponentTable.concat(tables),
        explained=term,
        positions=first.positions,
    )


def _stack_keys(parts: list, contrast: bool) -> ChainSplit:
    """One chain per key (the key side) as one result: keys along the target axis, or
    their sum for a contrast (the second key's weights carry the minus sign)."""
    table = parts[0].table
    for p in parts[1:]:  # the same path and split at every key: the same labels
        same = len(p.table) == len(table) and all(
            np.array_equal(getattr(p.table, f), getattr(table, f))
            for f in ("kind", "layer", "head", "neuron", "src", "at", "feature")
        )
        if not same:  # pragma: no cover - run_chain labels do not depend on the read position
            raise AssertionError("key-side chains labelled differently per key")
    if contrast:
        values = parts[0].values + parts[1].values
        term = parts[0].explained + parts[1].explained
    else:
        values = torch.cat([p.values for p in parts], dim=2)
        term = torch.cat([p.explained for p in parts], dim=2)
    return ChainSplit(values=values, table=table, explained=term, positions=parts[0].positions)


# ----------------------------------------------------------------------------- the prism
def run(rec: Recorded, request: Request, hops: Sequence[Hop], split: Split) -> Terms:
    """The QK prism through one side of the score: ``request.sides`` (``"query"`` or
    ``"key"``) followed back along ``hops``, the last hop's readout split by writer; the
    terms add up to the first hop's term of that side."""
    layer, head = request.layer, request.head
    assert layer is not None and head is not None
    # keys an attention mask left out (padding, a local window) are left out or refused, as
    # by the QK prism itself
    keys = qk.unmasked_keys(
        rec.cache, layer, head, request.pos, list(request.keys or ()), request.contrast
    )
    args = (request.pos, keys, request.sides, hops, split, request.softcap, request.contrast)
    t = qk_chain_terms(rec, layer, head, *args)
    refuse_broken(rec.cache, t.values, t.explained)
    return keep_largest(t, request.top_k, request.min_abs)


def request_of(
    view: Any,
    n_ctx: int,
    layer: Any,
    head: Any,
    pos: Any,
    keys: Any,
    contrast: Any,
    sides: Any,
    path: Any,
    q_heads: Any,
    q_neurons: Any,
    k_heads: Any,
    k_neurons: Any,
    by_source: Any,
    softcap: Any,
    top_k: Any,
    min_abs: Any,
) -> tuple[Request, Split, Split]:
    """``LogitPrism.qk``'s arguments checked, as a request and the two sides' splits (a
    ``path`` is resolved into the request's hops)."""
    from tlprisms._core import arguments as check
    from tlprisms._core.sparse import check_sparse_args
    from tlprisms._prisms.writes import split_of

    caller = "LogitPrism.qk"
    layer, head = check.layer(view, layer, caller), check.head(view, head, caller)
    check.choice(softcap, "softcap", ("post", "pre"), caller)
    qk.check_sides(sides, q_heads, q_neurons, k_heads, k_neurons, caller)
    i, key_list = qk.resolve_keys(pos, keys, contrast, n_ctx, caller)
    q_split = split_of(view, q_heads, q_neurons, by_source, caller)
    k_split = split_of(view, k_heads, k_neurons, by_source, caller)
    hops = () if path is None else tuple(resolve_path(path, sides, caller))
    top_k, min_abs = check_sparse_args(top_k, min_abs, caller)
    request = Request(
        "qk",
        None,
        i,
        softcap,
        heads=q_heads,
        neurons=q_neurons,
        by_source=by_source,
        k_heads=k_heads,
        k_neurons=k_neurons,
        path=hops,
        layer=layer,
        head=head,
        keys=tuple(key_list),
        contrast=contrast,
        sides=sides,
        top_k=top_k,
        min_abs=min_abs,
    )
    return request, q_split, k_split
