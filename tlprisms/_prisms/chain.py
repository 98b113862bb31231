"""Chained prisms: pull a frozen readout back through a head or a neuron, then split again.

**Through head (l, h).** Its value vectors are ``v[j] = ln1(x_j) @ W_V[kv(h)] + b_V`` with the
cached ``blocks.l.ln1.hook_scale[b, j]`` held fixed, so the head's term for a readout ``u/s``
(pulled through ``ln1_post`` where the model has one) is, per source ``j``,

    A[h,i,j]/s * ( x_j . P(w1 * (W_V W_O u)) / s1[j]  +  b1 . (W_V W_O u)  +  b_V . (W_O u) )

The first part is a readout of the residual stream ``resid_pre l`` at ``j``, which the same
engine splits by every write into it (embed, pos_embed, attention and MLP of layers ``< l``);
the other two are constants (``ln.b`` and ``b_V``, per source position).

**Through neuron (l, n).** The activation's gate is held fixed: ``g = act(pre)/pre`` for a plain
MLP (its limit ``act'(0)`` where ``pre = 0``), ``act(gate)`` for a gated MLP, and for SoLU the
softmax weights and the inner LayerNorm scale. Then ``post[n] = sum_m c[m] pre[m] + const``
is linear in ``ln2(x_i) @ W_in``, so the readout pulls back to ``resid_mid l`` (``resid_pre l``
for parallel attention/MLP blocks).

**Any residual readout.** ``readout()`` decomposes ``norm(x) . u + bias`` for a vector ``u`` read
at any layer and position, through ``ln1``/``ln2``/``ln_final`` or raw. The hops above are
built on the same :class:`~tlprisms._core.engine.Readout`, so chains compose: every hop's result
sums exactly to the term it splits.
"""

import math
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np
import torch
from beartype import beartype
from jaxtyping import Float, Int, jaxtyped
from torch import Tensor

from tlprisms._core import arguments as check
from tlprisms._core.engine import Readout, Split, Writes, freeze, split_writes, writes_table
from tlprisms._core.errors import ArgumentError, PositionError, UnsupportedModelError
from tlprisms._core.policy import refuse_broken
from tlprisms._core.readout import Explained, FinalReadout, Recorded, read_logits, weigh
from tlprisms._core.request import Request
from tlprisms._core.result import fresh_empty
from tlprisms._core.table import FIELDS, ComponentTable
from tlprisms._core.terms import Terms, keep_largest
from tlprisms._seam import CacheView, Site
from tlprisms.dictionary import Dictionary

__all__ = [
    "Hop",
    "ChainState",
    "ChainSplit",
    "HopKind",
    "register_hop",
    "run_chain",
    "run",
    "check_hop",
    "limit_at_zero",
    "activation",
    "frozen_ratio",
]


@dataclass(frozen=True, init=False)
class Hop:
    """One step of a chain: ``Hop("head", layer, head, src)``, ``Hop("neuron", layer, n)``
    or ``Hop.feature(dictionary, f)``.

    ``src`` (heads only) keeps one source position; it is required for every head hop but
    the last, because the next hop reads the residual stream at that position.

    >>> str(Hop("head", 5, 1, src=3)), str(Hop("neuron", 2, 40))
    ('L5H1[src 3]', 'L2N40')
    """

    kind: str  # "head", "neuron" or "feature"
    layer: int
    index: int
    src: Optional[int] = None
    #: a feature hop's :class:`~tlprisms.Dictionary` (``Hop.feature(dictionary, f)``)
    dictionary: Any = None

    @classmethod
    def feature(cls, dictionary: Any, feature: int) -> "Hop":
        """A hop through feature ``feature`` of ``dictionary`` (its gate frozen); its
        ``layer`` is the dictionary's."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return cls("feature", dictionary, feature)

    @check.entry
    def __init__(self, kind: str, layer: Any, index: int, src: Optional[int] = None) -> None:
        caller = "Hop"
        check.choice(kind, "kind", ("head", "neuron", "feature"), caller)
        dictionary = None
        if kind == "feature":
            if not isinstance(layer, Dictionary):
                raise ArgumentError(
                    f"Hop: a feature hop is Hop.feature(dictionary, f) with a "
                    f"tlprisms.Dictionary; got {type(layer).__name__}."
                )
            warnings.warn(
                "Hop('feature', dictionary, f) is deprecated (the dictionary is not a layer); "
                "use Hop.feature(dictionary, f). Removed in 0.4.",
                DeprecationWarning,
                stacklevel=3,
            )
            dictionary, layer = layer, layer.layer
        values = {
            "kind": kind,
            "layer": check.index(layer, "layer", caller),
            "index": check.index(index, "index", caller),
            "src": None,
        }
        if src is not None:
            if kind != "head":
                raise ArgumentError(
                    "Hop: src= is for head hops (the source position a head "
                    "reads); a neuron hop reads its own position."
                )
            values["src"] = check.index(src, "src", caller, PositionError)
        values["dictionary"] = dictionary
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def __str__(self) -> str:
        if self.kind == "feature":
            return f"L{self.layer}F{self.index}"
        if self.kind == "head":
            return f"L{self.layer}H{self.index}" + ("" if self.src is None else f"[src {self.src}]")
        return f"L{self.layer}N{self.index}"


@dataclass(frozen=True)
class ChainState:
    readout: Readout
    at: np.ndarray  # [P] residual position of each readout slot (-1: the explained position)
    consts: list  # (table, values [B, P, K]): the constants of the last hop


@jaxtyped(typechecker=beartype)
@dataclass(frozen=True)
class ChainSplit:
    """The chain runner's split of its last hop by writer (the chain prism and the QK chain
    make :class:`~tlprisms._core.terms.Terms` of it): ``values [B, 1, k, C]`` that add up to
    ``explained``, the chained component's term."""

    values: Float[Tensor, "batch one k comp"]
    table: ComponentTable
    explained: Float[Tensor, "batch one k"]
    positions: Int[Tensor, "batch one"]
    #: ``sum |values|`` and ``sum values`` over the components, where known (for the
    #: structural check: see :func:`tlprisms._core.policy.refuse_broken`)
    l1: Optional[Float[Tensor, "batch one k"]] = None
    total: Optional[Float[Tensor, "batch one k"]] = None


# ----------------------------------------------------------------------------- gates
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _act(name: str, x: Tensor) -> Tensor:
    if name == "gelu":
        return torch.nn.functional.gelu(x)
    if name in ("gelu_new", "gelu_fast", "gelu_pytorch_tanh"):
        return 0.5 * x * (1.0 + torch.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x.pow(3))))
    if name in ("silu", "swish"):
        return torch.nn.functional.silu(x)
    if name == "relu":
        return torch.relu(x)
    if name == "quick_gelu":
        return x * torch.sigmoid(1.702 * x)
    if name == "relu2":
        return torch.relu(x).pow(2)
    raise UnsupportedModelError(
        f"through_neuron: a gated neuron's linear input is exactly 0 here, so its gate cannot be "
        f"read off the cache (post / up), and tlprisms has no closed form for activation "
        f"{name!r} to compute it. Choose another neuron or position."
    )


def activation(name: str, x: Tensor) -> Tensor:
    """The activation function ``name`` applied to ``x`` (a gated MLP's gate)."""
    return _act(name, x)


_LIMITS = {
    "relu": 0.0,
    "relu2": 0.0,
    "gelu": 0.5,
    "gelu_new": 0.5,
    "gelu_fast": 0.5,
    "gelu_pytorch_tanh": 0.5,
    "silu": 0.5,
    "swish": 0.5,
    "quick_gelu": 0.5,
}


def limit_at_zero(name: str, pre: Tensor) -> Tensor:
    """``lim act(x)/x`` at ``x = 0``: 1/2 for the GELUs and SiLU, 0 for ReLU and ReLU^2."""
    if name not in _LIMITS:
        raise UnsupportedModelError(
            f"through_neuron: the neuron's pre-activation is exactly 0 here, so its gate "
            f"act(pre)/pre is the limit act'(0), which tlprisms does not know for activation "
            f"{name!r}. Choose another neuron or position."
        )
    return torch.full_like(pre, _LIMITS[name])


def frozen_ratio(num: Tensor, den: Tensor, fallback: Callable[[], Tensor]) -> Tensor:
    """``num / den``, and ``fallback()`` (only computed where needed) where ``den`` is ~0."""
    tiny = den.abs() <= 1e-12 * (1.0 + num.abs())
    alt = fallback() if bool(tiny.any()) else torch.zeros_like(num)
    return torch.where(tiny, alt, num / torch.where(tiny, torch.ones_like(den), den))


# ----------------------------------------------------------------------------- hops
def _chain_post(cv: CacheView, post: Any, r: Readout, layer: int) -> tuple[Tensor, Tensor]:
    """(readout through a post-norm ``[B',1,K,d]``, its full scale factor ``[B, 1]``),
    times the block's residual multiplier where it has one."""
    ul = r.u if post is None else post.pull_back(r.u)
    inv = r.inv_s / cv.scale(post, r.positions) if post is not None and post.has_scale else r.inv_s
    scale = cv.view.residual_scale(layer)
    return ul, inv if scale is None else inv * scale


def head_hop(
    cv: CacheView, st: ChainState, hop: Hop
) -> tuple[ChainState, Float[Tensor, "batch 1 k"]]:
    view, r = cv.view, st.readout
    layer, head = hop.layer, hop.index
    dtype, B = r.u.dtype, r.positions.shape[0]
    ul, sl = _chain_post(cv, view.ln1_post[layer], r, layer)
    # computed where the layer lives (a model split across devices): the readout crosses
    # there, and the new readout and the per-source values come back
    A = cv.get(Site.PATTERN, layer, native=True)
    dev = A.device
    W_O = view.W_O(layer, dtype).to(dev)[head]  # [dh, d]
    g = view.kv_group(head)
    W_V = view.W_V(layer, dtype).to(dev)[g]  # [d, dh]
    WOu = ul.to(dev) @ W_O.T  # [B',1,K,dh]
    WVWOu = WOu @ W_V.T  # [B',1,K,d]
    rows = torch.arange(B, device=dev)
    A = A[rows, head, r.positions[:, 0].to(dev)].to(dtype)  # [B, src]
    v = cv.get(Site.V, layer, native=True)[:, :, g].to(dev, dtype)  # [B, src, dh]
    value = torch.einsum("bjd,bkd->bjk", v, WOu[:, 0].expand(B, *WOu.shape[2:]))
    WOu, WVWOu, A, value = cv.home(WOu), cv.home(WVWOu), cv.home(A), cv.home(value)
    n_src = A.shape[-1]
    coef = A * sl  # [B, src]
    term_src = coef[..., None] * value  # [B, src, K]
    srcs = np.arange(n_src) if hop.src is None else np.asarray([hop.src])
    if hop.src is not None:
        coef, term_src = coef[:, srcs], term_src[:, srcs]
    norm1 = view.ln1[layer]
    # The readout direction is the same at every source; A[h,i,j] and the scale per source are
    # one scalar per (batch, source), kept in inv_s so the engine contracts weights only once.
    u_new = norm1.pull_back(WVWOu)  # [B',1,K,d]
    positions = torch.as_tensor(srcs, device=r.positions.device).expand(B, len(srcs))
    inv_s = coef / cv.scale(norm1, positions) if norm1.has_scale else coef
    b_V = view.b_V(layer, dtype, ul.device)[g]
    consts = []  # an earlier hop's constants are not part of this hop's term
    bv = (WOu[:, 0] @ b_V)[:, None, :] * coef[:, :, None]  # [B, P', K]
    consts.append((ComponentTable.block("b_V", len(srcs), layer=layer, head=head, at=srcs), bv))
    if norm1.bias is not None:
        b1 = norm1.constant(WVWOu[:, 0])[:, None, :] * coef[:, :, None]
        consts.append(
            (ComponentTable.block("ln.b", len(srcs), layer=layer, head=head, at=srcs), b1)
        )
    new = Readout(u=u_new, inv_s=inv_s, positions=positions, attn_layers=layer, mlp_layers=layer)
    return ChainState(new, srcs.astype(np.int64), consts), term_src.sum(1, keepdim=True)


def _gate_coefficients(
    cv: CacheView, layer: int, neuron: int, positions: Int[Tensor, "batch one"]
) -> tuple[Float[Tensor, "batch d_mlp"], Float[Tensor, "batch"]]:
    """``c [B, d_mlp]`` and ``const [B]`` with ``post[n] = sum_m c[m] * in[m] + const``,
    where ``in = ln2(x) @ W_in + b_in`` (the "up"/linear pre-activation)."""
    view, dtype = cv.view, cv.dtype
    name = str(view.act_fn)
    post = cv.at(Site.MLP_POST, layer, positions)[:, 0]
    B, d_mlp = post.shape
    c = torch.zeros(B, d_mlp, dtype=dtype, device=post.device)
    const = torch.zeros(B, dtype=dtype, device=post.device)
    pre = cv.at(Site.MLP_PRE, layer, positions)[:, 0]
    if view.gated:
        up = cv.at(Site.MLP_PRE_LINEAR, layer, positions)[:, 0]
        if view.gated_bias_after_product:  # act(g) * (x W_in) + b_in
            b_in = view.b_in(layer, dtype, post.device)[neuron]
            const = const + b_in
            gate = frozen_ratio(
                post[:, neuron] - b_in, up[:, neuron], lambda: _act(name, pre[:, neuron])
            )
        else:
            gate = frozen_ratio(post[:, neuron], up[:, neuron], lambda: _act(name, pre[:, neuron]))
        c[:, neuron] = gate
    elif name == "solu_ln":
        mid = cv.at(Site.SOLU_MID, layer, positions)[:, 0]
        g = frozen_ratio(mid, pre, lambda: torch.softmax(pre, -1))
        ln = view.solu_ln[layer]
        w = 1.0 if ln is None or ln.weight is None else ln.weight.to(post.device, dtype)[neuron]
        s: Any = 1.0
        if ln is not None and ln.has_scale:
            s = cv.at(ln.site, layer, positions)[:, 0]
        center = ln is None or ln.centred
        c = -g / d_mlp if center else torch.zeros_like(g)
        c[:, neuron] = c[:, neuron] + g[:, neuron]
        c = c * (w / s)
        if ln is not None and ln.bias is not None:
            const = const + ln.bias.to(post.device, dtype)[neuron]
    else:
        c[:, neuron] = frozen_ratio(
            post[:, neuron], pre[:, neuron], lambda: limit_at_zero(name, pre[:, neuron])
        )
    return c, const


def neuron_hop(
    cv: CacheView, st: ChainState, hop: Hop
) -> tuple[ChainState, Float[Tensor, "batch 1 k"]]:
    view, r = cv.view, st.readout
    layer, neuron = hop.layer, hop.index
    dtype, B = r.u.dtype, r.positions.shape[0]
    ul, sl = _chain_post(cv, view.ln2_post[layer], r, layer)
    W_out = view.W_out(layer, dtype)  # [n, d], where the layer lives: the readout goes there
    a = cv.home(ul.to(W_out.device) @ W_out[neuron])
    a = a.expand(B, 1, ul.shape[2]) * sl[:, :, None]  # [B,1,K]
    c, post_const = _gate_coefficients(cv, layer, neuron, r.positions)
    W_in = view.W_in(layer, dtype)  # [d, d_mlp], where the layer lives
    Wc = cv.home(c.to(W_in.device) @ W_in.T)  # [B, d]
    norm2 = view.ln2[layer]
    u_new = norm2.pull_back(Wc)[:, None, None, :] * a[..., None]  # [B,1,K,d]
    if norm2.has_scale:
        inv_s = 1.0 / cv.scale(norm2, r.positions)
    else:
        inv_s = torch.ones(B, 1, dtype=dtype, device=u_new.device)
    post = cv.at(Site.MLP_POST, layer, r.positions)[:, :, neuron]  # [B,1]
    term = post[:, :, None] * a
    consts = []
    at = st.at
    b_in = view.b_in(layer, dtype, ul.device)
    if view.gated_bias_after_product:
        b_in = torch.zeros_like(b_in)  # outside the gate: it is in post_const
    consts.append(
        (
            ComponentTable.block("b_in", 1, layer=layer, neuron=neuron, at=at),
            (c @ b_in + post_const)[:, None, None] * a,
        )
    )
    if norm2.bias is not None:
        consts.append(
            (
                ComponentTable.block("ln.b", 1, layer=layer, neuron=neuron, at=at),
                norm2.constant(Wc)[:, None, None] * a,
            )
        )
    attn_layers = layer if view.parallel else layer + 1
    new = Readout(
        u=u_new, inv_s=inv_s, positions=r.positions, attn_layers=attn_layers, mlp_layers=layer
    )
    return ChainState(new, at, consts), term


# ----------------------------------------------------------------------------- runners
def check_hop(cv: CacheView, st: ChainState, hop: Hop, last: bool) -> Hop:
    """The hop with its indices checked against the model and the stream read so far."""
    view, caller, r = cv.view, cv.caller, st.readout
    if r.positions.shape[1] != 1:
        raise ArgumentError(
            f"{caller}: the previous head hop kept every source position; give "
            "it src=... to chain further from one source."
        )
    if hop.kind not in ("head", "neuron"):
        return hop_kind(hop.kind, caller).check(cv, st, hop, last)
    layer = check.layer(view, hop.layer, caller)
    if hop.kind == "head":
        index = check.head(view, hop.index, caller)
        if layer >= r.attn_layers:
            raise ArgumentError(
                f"{caller}: head L{layer}H{index} does not write into the "
                "residual stream read at this hop; chain toward earlier layers."
            )
        src = None
        if hop.src is not None:
            src = check.in_range(
                hop.src,
                cv.n_ctx,
                "src",
                caller,
                PositionError,
                negative=False,
                of=f" for inputs of {cv.n_ctx} tokens",
            )
        elif not last:
            raise ArgumentError(
                f"{caller}: hop {hop} is not the last, so it needs src=... (the "
                "source position the next hop reads)."
            )
        return Hop("head", layer, index, src)
    index = check.neuron(view, hop.index, caller)
    if layer >= r.mlp_layers:
        raise ArgumentError(
            f"{caller}: neuron L{layer}N{index} does not write into the "
            "residual stream read at this hop; chain toward earlier layers."
        )
    return Hop("neuron", layer, index)


def _split_into(
    cv: CacheView, st: ChainState, ex: Explained, split: Split
) -> tuple[Writes, Optional[Tensor]]:
    """The last hop's readout split by writer. With one atom per target (weights 1) the
    terms are written straight into the chain's result layout ``[B, k, P * C + consts]``
    (returned second; ``values`` is a permuted view of it), so nothing is copied afterwards."""
    if not ex.trivial:
        return split_writes(cv, st.readout, split), None
    B, P = st.readout.positions.shape
    k = ex.weights.shape[2]
    C = len(writes_table(cv, st.readout, split))  # kept by the prism: no labels built here
    n_const = sum(t.kind.shape[0] for t, _ in st.consts)
    u = st.readout.u
    out = fresh_empty((B, k, P * C + n_const), u.dtype, u.device)
    dest = out[:, :, : P * C].view(B, k, P, C).permute(0, 2, 1, 3)
    # the chain's total is checked by the caller: no per-layer gap needed
    return split_writes(cv, st.readout, split, out=dest, gap=False), out


def run_chain(
    rec: Recorded,
    fr: Union[FinalReadout, Readout],
    ex: Explained,
    path: Sequence[Hop],
    split: Split,
    split_last: Optional[Callable[[CacheView, Readout], Writes]] = None,
) -> ChainSplit:
    """Follow ``path`` back from the final readout; split the last hop's readout by writer.

    The result's values are weighted into target terms and laid out as one explained
    position with ``P * C`` components (every read position times every writer) plus the
    last hop's constants; they add up to ``term``, the chained component's term. ``fr`` may
    be a bare :class:`Readout` of one position per row (one side of an attention score,
    :mod:`tlprisms._prisms.qk_chain`). ``split_last``: split the last hop's readout with
    this instead of the engine (:func:`tlprisms._prisms.features.feature_split` does).
    """
    cv = rec.cache
    r0 = fr.readout if isinstance(fr, FinalReadout) else fr
    if not path:
        raise ArgumentError(f"{cv.caller}: the chain is empty; give at least one Hop.")
    if r0.positions.shape[1] != 1:
        raise PositionError(
            f"{cv.caller}: chains explain one position per row; pos='all' is "
            "not supported here (loop over positions instead)."
        )
    st = ChainState(r0, np.asarray([-1]), [])
    term = torch.zeros(0)
    for i, hop in enumerate(path):
        hop = check_hop(cv, st, hop, last=i == len(path) - 1)
        if hop.kind == "head":
            st, term = head_hop(cv, st, hop)
        elif hop.kind == "neuron":
            st, term = neuron_hop(cv, st, hop)
        else:
            st, term = hop_kind(hop.kind, cv.caller).step(cv, st, hop)
    if split_last is not None:  # the last hop split by another prism (dictionary features)
        terms = split_last(cv, st.readout)
        out: Optional[Tensor] = None
    else:
        terms, out = _split_into(cv, st, ex, split)
    values, weights = terms.values, ex.weights
    B, P, K, C = values.shape
    k = weights.shape[2]
    n_const = sum(t.kind.shape[0] for t, _ in st.consts)
    if out is None:  # weigh the atoms into targets, then lay out [B, k, P * C + consts]
        out = fresh_empty((B, k, P * C + n_const), values.dtype, values.device)
        combined = values if ex.trivial else weigh(values, weights)
        out[:, :, : P * C].view(B, k, P, C).copy_(combined.permute(0, 2, 1, 3))
        del combined
    table = terms.table
    del values, terms
    start = P * C
    for _, v in st.consts:
        v = v.expand(B, -1, K).reshape(B, -1, k, weights.shape[3])  # [B, n, k, a]
        v = (v * weights[:, 0, None]).sum(-1).permute(0, 2, 1)  # [B, k, n]
        out[:, :, start : start + v.shape[-1]] = v
        start += v.shape[-1]
    if split_last is not None:
        full = ComponentTable.concat([table.tile_over_positions(st.at)] + [t for t, _ in st.consts])
    else:  # the labels depend on the shapes only: the prism keeps them for the next call
        full = _chain_table(cv, st, split, table)
    explained = (term.reshape(B, 1, k, -1) * weights).sum(-1)
    return ChainSplit(
        values=out[:, None],
        table=full,
        explained=explained,
        positions=r0.positions,
        total=out.sum(-1)[:, None],  # the structural check's sum |x| only where it is needed
    )


#: chained label tables a prism keeps (each can hold millions of labels: ~25 bytes each)
_KEPT_TABLES = 2


def _chain_table(
    cv: CacheView, st: ChainState, split: Split, table: ComponentTable
) -> ComponentTable:
    """``table`` tiled over the read positions ``st.at``, then the last hop's constants:
    the same labels as ``concat([table.tile_over_positions(st.at), *consts])``.

    The tiled part depends only on the readout's layers, the split and the positions, so a
    prism keeps the last few full tables (read-only) and a later call reuses every column
    whose constants' labels are the same (through each head of a layer, only ``head``
    differs: one column is copied and its tail rewritten)."""
    consts = ComponentTable.concat([t for t, _ in st.consts])
    memo = getattr(cv, "memo", None)
    if memo is None or consts.of is not None or table.of is not None:
        return ComponentTable.concat([table.tile_over_positions(st.at), consts])
    r = st.readout
    key = (r.attn_layers, r.mlp_layers, split, st.at.tobytes(), consts.kind.tobytes())
    kept = memo.setdefault("chain tables", OrderedDict())
    if key not in kept:
        full = freeze(ComponentTable.concat([table.tile_over_positions(st.at), consts]))
        kept[key] = full
        while len(kept) > _KEPT_TABLES:
            kept.popitem(last=False)
        return full
    kept.move_to_end(key)
    full = kept[key]
    n = len(full) - len(consts)
    cols = {}
    for name in ("kind",) + FIELDS:
        col, tail = getattr(full, name), getattr(consts, name)
        if not np.array_equal(col[n:], tail):
            col = col.copy()
            col[n:] = tail
            col.flags.writeable = False
        cols[name] = col
    return ComponentTable(**cols)


# ----------------------------------------------------------------------------- hop kinds
@dataclass(frozen=True)
class HopKind:
    """A kind of hop another prism module adds to chains (the feature prism adds
    ``"feature"``): ``check(cv, state, hop, last) -> Hop`` checks it against the stream read
    so far, ``step(cv, state, hop) -> (state, term)`` pulls the readout back through it."""

    check: Callable[[CacheView, ChainState, Hop, bool], Hop]
    step: Callable[[CacheView, ChainState, Hop], tuple[ChainState, Tensor]]


#: hop kinds registered by other prism modules (``head`` and ``neuron`` are this module's)
HOP_KINDS: dict[str, HopKind] = {}


def register_hop(kind: str, hop: HopKind) -> None:
    """Teach chains a kind of hop (called once, when the module that owns it is imported)."""
    HOP_KINDS[kind] = hop


def hop_kind(kind: str, caller: str) -> HopKind:
    if kind not in HOP_KINDS:
        raise ArgumentError(f"{caller}: no prism handles hops of kind {kind!r}.")
    return HOP_KINDS[kind]


# ----------------------------------------------------------------------------- the prism
def run(
    rec: Recorded,
    request: Request,
    hops: Sequence[Hop],
    split: Split,
    split_last: Optional[Callable[[CacheView, Readout], Writes]] = None,
) -> Terms:
    """The chain prism: follow ``request.path`` (checked ``hops``) back from the logit and
    split the last hop's readout by writer (or by ``split_last``).

    Phases: (1) the frozen final readout of the target; (2) each hop pulls it back through
    a head (pattern, values and ``ln1`` frozen), a neuron (gate frozen) or a registered hop;
    (3) the last readout split by every writer of the stream it reads; (4) the structural
    check. The terms add up to the first hop's term in the unchained prism."""
    fr, ex = read_logits(rec, request.target, request.pos, request.softcap)
    ct = run_chain(rec, fr, ex, hops, split, split_last)
    sums = None if ct.total is None else (ct.l1, ct.total)
    refuse_broken(rec.cache, ct.values, ct.explained, None, sums)
    name = " > ".join(str(h) for h in hops)
    B, k = ct.values.shape[0], ct.values.shape[2]
    terms = Terms(
        values=ct.values,
        table=ct.table,
        explained=ct.explained,
        positions=ct.positions,
        labels=np.array(np.broadcast_to(fr.atoms.labels, (B, 1, k))),
        explains=f"{ex.explains} term of {name}",
        name=f"through {name}",
    )
    return keep_largest(terms, request.top_k, request.min_abs)


def check_path(path: Any, caller: str, view: Any = None) -> list[Hop]:
    """A chain's path as a list of :class:`Hop` (tuples are read as ``Hop(*t)``); with the
    model's ``view``, negative layers, heads and neurons resolved (``Hop("head", -1, 0)`` of
    a 2-layer model is ``L1H0``: labels and verification use the real layer)."""
    if isinstance(path, (Hop, str)) or not isinstance(path, Sequence):
        raise ArgumentError(
            f"{caller}: path={path!r:.80}; pass a list of tlprisms.Hop, e.g. "
            "[tp.Hop('head', 5, 1, src=3), tp.Hop('neuron', 2, 40)]."
        )
    hops = [h if isinstance(h, Hop) else Hop(*h) for h in path]
    return hops if view is None else [resolve_hop(view, h, caller) for h in hops]


def resolve_hop(view: Any, hop: Hop, caller: str) -> Hop:
    """``hop`` with a negative layer, head or neuron counted from the end."""
    if hop.kind == "feature":
        return hop
    layer = check.layer(view, hop.layer, caller)
    index = (check.head if hop.kind == "head" else check.neuron)(view, hop.index, caller)
    if (layer, index) == (hop.layer, hop.index):
        return hop
    return Hop(hop.kind, layer, index, hop.src)


def one_hop(kind: str, layer: Any, index: Any, src: Any, caller: str) -> Hop:
    """A one-hop path, its indices checked with the words of ``caller``'s signature."""
    check.index(layer, "layer", caller)
    check.index(index, kind, caller)
    return Hop(kind, layer, index, src)
