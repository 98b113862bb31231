"""The QK prism: a head's attention score split into (query-side writer, key-side writer) pairs.

For head ``h`` of layer ``l``, query position ``i`` and key position ``j`` the pre-softmax score
is ``z_ij = (R_i q_i) . (R_j k_j) * c`` with ``q_i = ln1(x_i) @ W_Q[h] + b_Q``,
``k_j = ln1(x_j) @ W_K[kv(h)] + b_K``, ``R`` the rotary map at that position (identity without
rotary) and ``c`` the score factor (``1/sqrt(d_head)``, Gemma's ``query_pre_attn_scalar``...).
With ln1's cached scale frozen, ``q_i`` is a readout of the residual stream at ``i`` with one
direction per ``d_head`` coordinate (``P(w1 * W_Q[:, d]) / s_i``), so the engine
(:func:`~tlprisms._engine.split_writes`) splits it by writer: each writer ``a`` contributes a
``d_head`` vector ``Q_a`` (ln1's bias and ``b_Q`` are constant writers). Likewise ``K_b`` at
``j``. Rotation is linear, so rotating each part at its own position keeps the sum, and

    z_ij = sum_ab (R_i Q_a) . (R_j K_b) * c

exactly: one matmul of the ``[writers, d_head]`` blocks of both sides. Grouped-query heads read
their key/value head's ``W_K`` (never expanded). A soft-cap ``cap * tanh(z / cap)`` (Gemma 2) is
explained post-cap with ``rho = cap * tanh(z / cap) / z`` frozen per score (every pair term
times ``rho``), or pre-cap.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
from beartype import beartype
from jaxtyping import Float, Int, jaxtyped
from torch import Tensor

from tlprisms._engine import Readout, Split, split_writes
from tlprisms._errors import ArgumentError, PositionError, UnsupportedModelError
from tlprisms._readout import Recorded, softcap_ratio
from tlprisms._result import Component, ComponentTable
from tlprisms._seam import CacheView, Site

__all__ = ["PairComponent", "PairTable", "QKTerms", "qk_terms", "side_terms", "SIDE_FIELDS"]

#: the label fields of each side of a pair, as ``to_frame()`` names them (``q_`` / ``k_``)
SIDE_FIELDS = ("kind", "layer", "head", "neuron", "src")
#: the recomputed scores must match the recorded ``hook_attn_scores`` to this fraction of
#: ``1 + |score| + sum |terms|`` (float32 and float64 caches: a float64 model may norm in
#: float32; low precision), or the architecture computes its scores in a way this prism
#: does not know and nothing is returned
_SCORES_RTOL = 1e-4
_SCORES_RTOL_LOWP = 3e-2


def _side_label(c: Component) -> str:
    if c.kind == "resid":  # a side kept whole (sides="query" / "key")
        return "whole"
    if c.kind in ("b_Q", "b_K"):
        return f"L{c.layer}.{c.kind}"
    return str(c)


class PairComponent(Component):
    """One QK term's label: a query-side writer ``q`` and a key-side writer ``k``.

    >>> str(PairComponent(Component("embed"), Component("head", layer=0, head=2, src=1)))
    'q:embed x k:L0H2[src 1]'
    """

    q: Component
    k: Component

    def __init__(self, q: Component, k: Component) -> None:
        super().__init__("pair")
        object.__setattr__(self, "q", q)
        object.__setattr__(self, "k", k)

    @property
    def is_constant(self) -> bool:
        return self.q.is_constant and self.k.is_constant

    def __str__(self) -> str:
        return f"q:{_side_label(self.q)} x k:{_side_label(self.k)}"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PairComponent) and (self.q, self.k) == (other.q, other.k)

    def __hash__(self) -> int:
        return hash((self.q, self.k))


class PairTable(ComponentTable):
    """Pair labels: the query side's and the key side's tables, and per pair the index of
    its writer on each side. The base columns say ``kind="pair"`` (other fields -1); select
    pairs by side with ``q_``/``k_`` prefixed fields: ``select(q_kind="head", k_layer=0)``."""

    q: ComponentTable
    k: ComponentTable
    qi: np.ndarray
    ki: np.ndarray

    @staticmethod
    def make(q: ComponentTable, k: ComponentTable, qi: np.ndarray, ki: np.ndarray) -> "PairTable":
        n = len(qi)
        code = np.int8(ComponentTable.block("pair", 1).kind[0])
        minus = np.broadcast_to(np.int32(-1), (n,))
        t = object.__new__(PairTable)
        ComponentTable.__init__(
            t,
            kind=np.broadcast_to(code, (n,)),
            layer=minus,
            head=minus,
            neuron=minus,
            src=minus,
            at=minus,
        )
        for name, value in (("q", q), ("k", k), ("qi", qi), ("ki", ki)):
            object.__setattr__(t, name, value)
        return t

    @staticmethod
    def product(q: ComponentTable, k: ComponentTable) -> "PairTable":
        """Every (query writer, key writer) pair, the key side varying fastest."""
        nq, nk = len(q), len(k)
        qi = np.repeat(np.arange(nq, dtype=np.int32), nk)
        ki = np.tile(np.arange(nk, dtype=np.int32), nq)
        return PairTable.make(q, k, qi, ki)

    def __getitem__(self, i: Any) -> PairComponent:
        return PairComponent(self.q[int(self.qi[i])], self.k[int(self.ki[i])])

    def take(self, idx: np.ndarray) -> "PairTable":
        return PairTable.make(self.q, self.k, self.qi[idx], self.ki[idx])

    def is_constant(self) -> np.ndarray:
        return self.q.is_constant()[self.qi] & self.k.is_constant()[self.ki]

    def side_columns(self, idx: np.ndarray) -> dict:
        """``q_kind, q_layer, q_head, q_neuron, q_src, k_kind, ...`` of the pairs ``idx``."""
        out: dict = {}
        for side, table, rows in (("q", self.q, self.qi), ("k", self.k, self.ki)):
            r = rows[idx]
            for f in SIDE_FIELDS:
                out[f"{side}_{f}"] = table.kinds()[r] if f == "kind" else getattr(table, f)[r]
        return out

    def mask(self, caller: str = "select", **criteria: Any) -> np.ndarray:
        keep = np.ones(len(self), dtype=bool)
        for name, want in criteria.items():
            side, _, field = name.partition("_")
            if side in ("q", "k") and field in SIDE_FIELDS:
                table, rows = (self.q, self.qi) if side == "q" else (self.k, self.ki)
                keep &= table.mask(caller, **{field: want})[rows]
            elif name == "kind":
                keep &= ComponentTable.mask(self, caller, kind=want)
            else:
                raise ArgumentError(
                    f"{caller}: {name!r} is not a field of a QK result, whose components are "
                    "(query-side, key-side) pairs; use q_kind, q_layer, q_head, q_neuron, q_src "
                    "or k_kind, ... (e.g. select(q_kind='head', k_layer=0))."
                )
        return keep


@jaxtyped(typechecker=beartype)
@dataclass(frozen=True)
class QKTerms:
    """The pair terms ``values [B, 1, K, C]`` (K: keys, or 1 for a contrast), what they add up
    to (``explained [B, 1, K]``), the query position per row and the labels."""

    values: Float[Tensor, "batch one k comp"]
    table: ComponentTable
    explained: Float[Tensor, "batch one k"]
    positions: Int[Tensor, "batch one"]
    labels: np.ndarray
    explains: str


def _rotate(
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


def _rotary(cv: CacheView, layer: int, positions: Tensor, dtype: torch.dtype) -> Optional[tuple]:
    """``(cos, sin)`` ``[B, P, rot]`` at ``positions``, or None without rotary."""
    view = cv.view
    if not view.rotary:
        return None
    tables = view.rotary_tables(layer, cv.n_ctx)
    if tables is not None:
        cos, sin = (t.to(positions.device, dtype)[positions] for t in tables)
        return cos, sin
    B = positions.shape[0]
    out = []
    for site in (Site.ROT_COS, Site.ROT_SIN):
        t = cv.get(site, layer)
        t = t.expand(B, *t.shape[1:]) if t.shape[0] != B else t
        rows = torch.arange(B, device=t.device)[:, None]
        out.append(t[rows, positions.to(t.device)].to(positions.device, dtype))
    return out[0], out[1]


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
    its position, with ln1's bias and the projection's bias as constant writers."""
    view, dtype = cv.view, W.dtype
    ln1 = view.ln1[layer]
    cols = W.T.contiguous()  # [d_head, d_model]
    readout = Readout(
        u=ln1.pull_back(cols)[None, None],
        inv_s=cv.inv_scale_or_one(ln1, positions),
        positions=positions,
        attn_layers=layer,
        mlp_layers=layer,
    )
    extra = []
    if ln1.bias is not None:
        extra.append((ln1.constant(cols)[None, None], ComponentTable.block("ln.b", layer=layer)))
    extra.append((b[None, None].to(dtype), ComponentTable.block(bias_kind, layer=layer, head=head)))
    terms = split_writes(cv, readout, split, extra=extra)
    values = terms.values
    rot = _rotary(cv, layer, positions, dtype)
    if rot is not None:
        values = _rotate(values, rot[0], rot[1], view.rotary_adjacent_pairs)
    return values, terms.table


def _whole_side(
    cv: CacheView,
    layer: int,
    W: Float[Tensor, "d_model d_head"],
    b: Float[Tensor, " d_head"],
    positions: Int[Tensor, "batch pos"],
) -> Float[Tensor, "batch pos d_head"]:
    """The whole query (or key) vector at ``positions``, rotated there: ``R (ln1(x) W + b)``
    with ln1 at its cached scale."""
    ln1, dtype = cv.view.ln1[layer], W.dtype
    x = cv.at(Site.RESID_PRE, layer, positions, dtype)
    scale = cv.scale(ln1, positions)[..., None].to(dtype) if ln1.has_scale else None
    v = ln1.apply(x, scale) @ W + b
    rot = _rotary(cv, layer, positions, dtype)
    if rot is not None:
        v = _rotate(v[..., None], rot[0], rot[1], cv.view.rotary_adjacent_pairs)[..., 0]
    return v


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
    rot = _rotary(cv, layer, positions, dtype)
    y = other * factor  # [B, K, d_head]
    if rot is not None:  # R_p^T: the rotation at p with the sine negated
        cos, sin = rot  # [B, P, rot]
        if P == 1:
            cos, sin = cos.expand(B, y.shape[1], -1), sin.expand(B, y.shape[1], -1)
        y = _rotate(y[..., None], cos, -sin, view.rotary_adjacent_pairs)[..., 0]
    u_pre = y @ W.T  # [B, K, d_model]
    if P == 1:  # one query position, one direction per key
        u, const = ln1.pull_back(u_pre)[:, None], ln1.constant(u_pre)[:, None]
        bias = (y @ b)[:, None]
    else:  # one key per position, one direction each
        u, const = ln1.pull_back(u_pre)[:, :, None], ln1.constant(u_pre)[:, :, None]
        bias = (y @ b)[:, :, None]
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
    terms = split_writes(cv, readout, split, extra=extra)
    return terms.values, terms.table


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
) -> QKTerms:
    """The pair terms of head ``(layer, head)``'s scores at query ``pos`` for ``keys``."""
    cv = rec.cache
    view, dtype, device = cv.view, cv.dtype, cv.device
    problem = view.qk_problem(layer)
    if problem:
        raise UnsupportedModelError(
            f"{cv.caller}: the QK prism cannot split layer {layer}'s attention scores of this "
            f"model ({view.describe()}) exactly: {problem}. The logit prisms still work; "
            "docs/architectures.md says what each family supports."
        )
    B = cv.batch
    g = view.kv_group(head)
    W_Q = view.W_Q(layer, dtype)[head].to(device)
    W_K = view.W_K(layer, dtype)[g].to(device)
    b_Q = view.b_Q(layer, dtype, device)[head]
    b_K = view.b_K(layer, dtype, device)[g]
    qpos = torch.full((B, 1), pos, dtype=torch.long, device=device)
    kpos = torch.tensor(list(keys), dtype=torch.long, device=device)[None].expand(B, -1)
    factor = view.attn_score_factor(layer)
    Kp = kpos.shape[1]
    whole = ComponentTable.block("resid", layer=layer)
    if sides == "query":  # the key whole: a readout of the query's stream, one per key
        k = _whole_side(cv, layer, W_K, b_K, kpos)  # [B, Kp, d_head], rotated at j
        values, q_table = one_side(cv, layer, W_Q, b_Q, "b_Q", head, qpos, k, q_split, factor)
        values, k_table = values.reshape(B, 1, Kp, -1), whole
    elif sides == "key":  # the query whole: a readout of each key's stream
        q = _whole_side(cv, layer, W_Q, b_Q, qpos).expand(B, Kp, -1)
        values, k_table = one_side(cv, layer, W_K, b_K, "b_K", g, kpos, q, k_split, factor)
        values, q_table = values.reshape(B, 1, Kp, -1), whole
    else:
        Q, q_table = side_terms(cv, layer, W_Q, b_Q, "b_Q", head, qpos, q_split)
        K, k_table = side_terms(cv, layer, W_K, b_K, "b_K", g, kpos, k_split)
        # [B, 1, Ca, d] @ [B, Kp, d, Cb] -> [B, Kp, Ca, Cb]: one matmul for every pair
        pairs = torch.matmul(Q[:, 0].transpose(1, 2)[:, None], K) * factor
        values = pairs.reshape(B, 1, Kp, -1)
    z = values.sum(-1)
    cap = view.attn_softcap(layer)
    post = z if cap is None else cap * torch.tanh(z / cap)
    recorded = None
    if cv.has(Site.ATTN_SCORES, layer):
        # read past CacheView.get's finiteness check: the causal mask is -inf above the
        # diagonal; the scores read here (keys <= pos) are checked below
        scores = cv.cache[view.hook(Site.ATTN_SCORES, layer)]
        recorded = scores[:, head, pos].to(device, dtype)[:, kpos[0]][:, None]
        l1 = torch.linalg.vector_norm(values, 1, -1)
        rtol = _SCORES_RTOL_LOWP if cv.low_precision else _SCORES_RTOL
        if not bool(torch.isfinite(l1).all()) or not bool(torch.isfinite(recorded).all()):
            cv.refuse_nonfinite("the attention scores")
        gap = (post - recorded).abs()
        if bool((gap > rtol * (1.0 + recorded.abs() + l1)).any()):
            raise UnsupportedModelError(
                f"{cv.caller}: the QK terms of L{layer}H{head} do not reproduce the model's "
                f"recorded attention scores (gap up to {float(gap.max()):.3g}): this "
                f"architecture ({view.describe()}) computes its scores in a way tlprisms does "
                "not know (a rotary convention, a score scale or a positional bias), or the "
                "cache was edited by hooks. Nothing was returned; please report the model config."
            )
    if cap is None:
        explained, explains = (post if recorded is None else recorded), "attention score"
    elif softcap == "pre":
        explained, explains = z, "pre-softcap attention score"
    else:
        values = values * softcap_ratio(z, cap)[..., None]
        explained = post if recorded is None else recorded
        explains = "post-softcap attention score (rho frozen)"
    labels = _key_labels(rec, keys)
    if contrast:
        values = values[:, :, :1] - values[:, :, 1:2]
        explained = explained[:, :, :1] - explained[:, :, 1:2]
        labels = np.array([[[f"{labels[0, 0, 0]} - {labels[0, 0, 1]}"]]], dtype=object)
        explains = f"{explains} difference"
    return QKTerms(
        values=values,
        table=PairTable.product(q_table, k_table),
        explained=explained,
        positions=qpos,
        labels=labels,
        explains=explains,
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
    from tlprisms import _validate as check

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
