"""The feature prism: split a frozen readout into dictionary features (SAEs, transcoders).

A dictionary at a site rewrites what the cache recorded there as

    x = sum_f a_f W_dec[f] + b_dec (+ x_in @ W_skip) + e,     e = x - x_hat,

with ``a_f`` the encoder applied to the recorded input and ``e`` taken from the cache, so the
sum is exact. A readout ``u/s`` of a later residual stream then splits into

* a **residual** dictionary's terms ``a_f (W_dec[f] . u)/s``, ``b_dec . u/s`` and
  ``e . u/s`` (``x_site . u/s`` in all), plus every write after the site, split by the
  engine (:func:`tlprisms._core.engine.split_writes`) as the other prisms split it;
* an ``hook_attn_out``/``hook_mlp_out`` dictionary's (a transcoder's) terms in place of that
  layer's attention/MLP write (the write, its bias and its post-norm bias), since the
  recorded hook value is exactly what the layer adds to the stream;
* a per-head ``attn.hook_z`` dictionary's terms in place of layer ``L``'s heads (``b_O`` and
  the post-norm bias stay): ``z = sum_j A[h,i,j] v_j[kv(h)]`` (recorded pattern and values,
  as the head prism computes it) flattened over heads is ``sum_f a_f W_dec[f] + b_dec + e``,
  and the heads write ``sum_h z[h] W_O[h]``, so each term is ``a_f (W_dec[f] . u_z) / s``
  with ``u_z[h] = W_O[h] P(w_post * u)`` (through a frozen ``ln1_post`` and the residual
  multiplier where the model has them, as :func:`tlprisms._core.engine.post_parts`).

**Through a feature.** ``a_f = g * pre_f`` with the gate ``g`` (1 or 0 for ReLU, JumpReLU and
TopK) frozen, and ``pre_f = x_in . (c W_enc[:, f]) + b_enc[f] - c b_dec . W_enc[:, f]`` (``c``
the input scale; ``b_dec`` only when subtracted) is a linear read of the residual stream at
the dictionary's input (through the frozen ``ln2``, weight and bias included, for a
transcoder reading the MLP's input ``mlp.hook_in`` / ``ln2.hook_normalized``), which the
engine splits by upstream writer, including other dictionaries' features. A per-head z
feature reads ``sum_h w[h] . z[h] = sum_j sum_h A[h,i,j] w[h] . v_j[kv(h)]`` with ``v_j =
ln1(x_j) W_V + b_V``: per source ``j`` a read of ``resid_pre`` through the frozen ``ln1``
(as through a head), plus ``b_V`` and ``ln1``'s bias per source.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from tlprisms._core import arguments as check
from tlprisms._core.engine import Readout, Split, Writes, post_parts, split_writes, whole_write
from tlprisms._core.errors import ArgumentError, CacheError
from tlprisms._core.ops import dot
from tlprisms._core.policy import refuse_broken
from tlprisms._core.readout import (
    Recorded,
    logit_constants,
    read_logits,
    target_labels,
    weigh,
)
from tlprisms._core.request import Request
from tlprisms._core.table import KINDS, ComponentTable, register_kinds
from tlprisms._core.terms import Terms, keep_largest
from tlprisms._prisms import chain
from tlprisms._prisms.chain import ChainState, Hop, HopKind, register_hop
from tlprisms._seam import CacheView, Site
from tlprisms.dictionary import CrossLayerTranscoder, Dictionary

__all__ = [
    "feature_split",
    "check_dictionaries",
    "dictionary_input",
    "site_input",
    "RESIDUAL_SITES",
    "run",
]

#: residual stream sites, and the writes each holds: (attention layers < a, MLP layers < m)
#: as a function of the layer
RESIDUAL_SITES = {
    Site.RESID_PRE: lambda L: (L, L),
    Site.RESID_MID: lambda L: (L + 1, L),
    Site.RESID_POST: lambda L: (L + 1, L + 1),
}
_ATTN = frozenset(KINDS.index(k) for k in ("attn", "head", "b_O"))
#: the heads' part of an attention write (what a per-head z dictionary replaces)
_HEADS = frozenset(KINDS.index(k) for k in ("attn", "head"))
_MLP = frozenset(KINDS.index(k) for k in ("mlp", "neuron", "b_out"))
_START = frozenset(KINDS.index(k) for k in ("embed", "pos_embed"))
_INHERIT = KINDS.index("ln.b")  # a post-norm's bias follows its layer's write
#: below this fraction of active features, only the active ones are read and decoded
_SPARSE_FRACTION = 0.25


def _writes_to(d: Dictionary) -> Site:
    """The site of the layer write a dictionary replaces (per-head z: the attention's)."""
    if d.site is None:  # per-head z
        return Site.ATTN_OUT
    return d.site


def check_dictionaries(view: Any, dictionaries: Any, caller: str) -> list[Any]:
    """The dictionaries as a list, each checked against the model; at most one residual
    stream dictionary, at most one per attention/MLP write, none inside the residual one."""
    if isinstance(dictionaries, (Dictionary, CrossLayerTranscoder)):
        dictionaries = [dictionaries]
    if isinstance(dictionaries, Sequence) and any(
        isinstance(d, CrossLayerTranscoder) for d in dictionaries
    ):
        if len(dictionaries) != 1:
            raise ArgumentError(
                f"{caller}: a cross-layer transcoder replaces every MLP write, and its terms "
                "name their layer only: pass it alone (not with other dictionaries)."
            )
        dictionaries[0].check_model(view, caller)
        return list(dictionaries)
    if (
        isinstance(dictionaries, (str, bytes))
        or not isinstance(dictionaries, Sequence)
        or not dictionaries
        or not all(isinstance(d, Dictionary) for d in dictionaries)
    ):
        raise ArgumentError(
            f"{caller}: dictionaries={dictionaries!r:.80}; pass a tlprisms.Dictionary or a "
            "non-empty list of them (e.g. one transcoder per layer), or one "
            "CrossLayerTranscoder."
        )
    out = list(dictionaries)
    for d in out:
        d.check_model(view, caller, per_head_ok=True)
    resid = [d for d in out if d.site in RESIDUAL_SITES]
    if len(resid) > 1:
        raise ArgumentError(
            f"{caller}: {len(resid)} residual-stream dictionaries "
            f"({', '.join(d.hook for d in resid)}); a readout splits at one residual "
            "stream. Pass one (a hop "
            "Hop.feature(sae, f) goes through an earlier one)."
        )
    writes: dict = {}
    for d in out:
        if d.site in RESIDUAL_SITES:
            continue
        key = (_writes_to(d), d.layer)
        if key in writes:
            raise ArgumentError(
                f"{caller}: two dictionaries rewrite layer {d.layer}'s "
                f"{'attention' if key[0] is Site.ATTN_OUT else 'MLP'} write ({writes[key].hook!r}"
                f" and {d.hook!r}); pass one per write."
            )
        writes[key] = d
        if resid:
            r = resid[0]
            a, m = RESIDUAL_SITES[r.site](r.layer)
            inside = d.layer < (a if key[0] is Site.ATTN_OUT else m)
            if inside or d.layer == r.layer:
                raise ArgumentError(
                    f"{caller}: dictionary at {d.hook!r} "
                    + (
                        f"writes into the residual stream {r.hook!r}, which the residual "
                        "dictionary already splits"
                        if inside
                        else f"shares layer {d.layer} with the residual dictionary at "
                        f"{r.hook!r}, so their labels would collide"
                    )
                    + "; pass dictionaries at later layers, or split separately."
                )
    return out


def dictionary_input(
    cv: CacheView, d: Dictionary, positions: Tensor, dtype: Any, device: Any = None
) -> Tensor:
    """What the dictionary reads at ``positions [B, P]``: ``[B, P, d_in]``, gathered where
    it lives and returned on ``device`` (the prism's when None). A per-head dictionary reads
    ``z`` flattened over heads, computed from the recorded pattern and values."""
    if d.input_site is None:
        return _z_at(cv, d.layer, positions, dtype, device)
    return _input_at(cv, d.input_site, d.layer, positions, dtype, device)


def _z_at(cv: CacheView, layer: int, positions: Tensor, dtype: Any, device: Any = None) -> Tensor:
    """Layer ``layer``'s ``z[h] = sum_j A[h,i,j] v_j[kv(h)]`` at ``positions [B, P]``,
    flattened head-major: ``[B, P, n_heads * d_head]`` (computed where the layer lives)."""
    view = cv.view
    A = cv.get(Site.PATTERN, layer, native=True)  # [B, H, Q, src]
    v = cv.get(Site.V, layer, native=True).to(A.device, dtype)  # [B, src, G, dh]
    if v.shape[2] != view.n_kv_heads or A.shape[1] != view.n_heads:
        raise CacheError(
            f"{cv.caller}: the pattern and values of layer {layer} have {A.shape[1]} and "
            f"{v.shape[2]} heads but this model has {view.n_heads} query and "
            f"{view.n_kv_heads} key/value heads; the cache comes from another model. "
            "Re-run model.run_with_cache(tokens) with this model."
        )
    rows = torch.arange(positions.shape[0], device=A.device)[:, None]
    Ai = A.permute(0, 2, 1, 3)[rows, positions.to(A.device)].to(dtype)  # [B, P, H, src]
    v = v.repeat_interleave(view.n_heads // view.n_kv_heads, dim=2)  # [B, src, H, dh]
    z = torch.einsum("bphj,bjhd->bphd", Ai, v).flatten(-2)
    return cv.home(z) if device is None else z.to(device)


def _z_readout(cv: CacheView, layer: int, r: Readout) -> tuple[Tensor, Tensor]:
    """The readout ``r`` as a read of layer ``layer``'s ``z`` flattened over heads:
    ``u_z[h] = W_O[h] P(w_post * u)`` ``[B', P', K, n_heads * d_head]`` and its full ``1/s``
    factor ``[B, P]`` (the post-norm's frozen scale and the residual multiplier included)."""
    view = cv.view
    ul, inv = post_parts(cv, view.ln1_post[layer], r, layer)
    W_O = view.W_O(layer, ul.dtype).to(ul.device)  # [H, dh, d]
    return torch.einsum("hdm,bpkm->bpkhd", W_O, ul).flatten(-2), inv


def _input_at(
    cv: CacheView, site: Site, layer: int, positions: Tensor, dtype: Any, device: Any = None
) -> Tensor:
    """``site`` of ``layer`` at ``positions``; the MLP's input (``LN2_NORMALIZED``) is ln2
    applied in full (weight and bias) to the recorded stream with its recorded scale."""
    native = device is not None
    if site is not Site.LN2_NORMALIZED:
        x = cv.at(site, layer, positions, dtype, native=native)
        return x if device is None else x.to(device)
    view = cv.view
    norm = view.ln2[layer]
    stream = Site.RESID_PRE if view.parallel else Site.RESID_MID
    x = cv.at(stream, layer, positions, dtype, native=native)
    x = x if device is None else x.to(device)
    scale = cv.scale(norm, positions)[..., None].to(x.device, dtype) if norm.has_scale else None
    return norm.apply(x, scale)


def site_input(
    cv: CacheView, site: Site, layer: int, positions: Tensor, dtype: Any, device: Any = None
) -> Tensor:
    """What a dictionary reading ``site`` of ``layer`` reads at ``positions [B, P]``."""
    return _input_at(cv, site, layer, positions, dtype, device)


def _contract(W: Tensor, u: Tensor) -> Tensor:
    """``W [F, d]`` against readouts ``u [B', P', K, d]`` -> ``[B', P', K, F]``."""
    if u.shape[0] == 1 and u.shape[1] == 1:
        return (u[0, 0] @ W.T)[None, None]
    return torch.einsum("fd,bpkd->bpkf", W, u)


@dataclass(frozen=True)
class _Parts:
    values: list
    tables: list


def _dictionary_terms(cv: CacheView, d: Dictionary, r: Readout, u: Tensor, inv_s: Tensor) -> _Parts:
    """Features, b_dec, skip and error terms of one dictionary, ``[B, P, K, *]`` each.
    Computed where the dictionary's weights live (its inputs and the readout go there, the
    terms come back: nothing of the dictionary's size crosses devices)."""
    if d.per_head:  # the heads' write read as a read of z
        u, inv_s = _z_readout(cv, d.layer, r)
    positions = r.positions
    B, P = positions.shape
    K = u.shape[2]
    dtype = u.dtype
    dev = d.W_dec.device
    x_in = dictionary_input(cv, d, positions, dtype, dev)
    x_out = x_in
    if d.transcoder:
        x_out = cv.at(_writes_to(d), d.layer, positions, dtype, native=True).to(dev)
    acts = d.encode(x_in)  # [B, P, F]
    W_dec = d.W_dec.to(dev, dtype)
    if d.input_scale != 1.0:
        W_dec = W_dec / d.input_scale
    u = u.to(dev)
    s = inv_s[:, :, None].to(dev)
    active = (acts != 0).flatten(0, -2).any(0).nonzero()[:, 0]  # features active anywhere
    if active.numel() <= acts.shape[-1] * _SPARSE_FRACTION:
        # a sparse code (a trained dictionary): read and decode the active features only;
        # the others' terms are exactly 0
        W_act, a_act = W_dec.index_select(0, active), acts.index_select(-1, active)
        feats = torch.zeros(B, P, K, acts.shape[-1], dtype=dtype, device=u.device)
        feats.index_copy_(-1, active, a_act[:, :, None, :] * _contract(W_act, u) * s[..., None])
        x_hat = a_act @ W_act
    else:
        feats = acts[:, :, None, :] * _contract(W_dec, u) * s[..., None]
        x_hat = acts @ W_dec
    b_dec = d.b_dec.to(u.device, dtype) / d.input_scale
    x_hat = x_hat + b_dec
    values = [feats.reshape(B, P, K, -1), ((u @ b_dec).expand(B, P, K) * s)[..., None]]
    L = d.layer
    tables = [
        ComponentTable.block("feature", d.d_sae, layer=L, feature=np.arange(d.d_sae)),
        ComponentTable.block("b_dec", layer=L),
    ]
    if d.W_skip is not None:
        skip = x_in @ d.W_skip.to(u.device, dtype)
        x_hat = x_hat + skip
        values.append((dot(skip, u) * s)[..., None])
        tables.append(ComponentTable.block("skip", layer=L))
    values.append((dot(x_out - x_hat, u) * s)[..., None])
    tables.append(ComponentTable.block("error", layer=L))
    return _Parts([cv.home(v) for v in values], tables)


def _clt_terms(
    cv: CacheView, clt: CrossLayerTranscoder, r: Readout, u: Tensor, inv_s: Tensor
) -> dict:
    """Per MLP layer ``l`` the readout reads: ``_Parts`` of the features of layer ``l``
    (each the sum of its writes to the MLP outputs of layers ``l .. n-1`` read), ``b_dec[l]``
    and the error of layer ``l``'s MLP output. One layer's decoders are read at a time."""
    n = r.mlp_layers
    positions = r.positions
    B, P = positions.shape
    K = u.shape[2]
    dtype, dev = u.dtype, u.device
    s = inv_s[:, :, None]
    # what each MLP output's reconstruction leaves: the recorded write, less every decode
    rest = [cv.at(Site.MLP_OUT, L, positions, dtype).to(dev) for L in range(n)]
    feats_by_layer = []
    for l in range(n):
        x_in = _input_at(cv, clt.input_site, l, positions, dtype, dev)
        acts = clt.encode(l, x_in)  # [B, P, F]
        active = (acts != 0).flatten(0, -2).any(0).nonzero()[:, 0]
        if active.numel() <= clt.d_sae * _SPARSE_FRACTION:  # read the active rows only
            W_act = clt.decoder(l, n - l, active.cpu()).to(dev, dtype)  # [F_act, n - l, d]
        else:
            W_act = clt.decoder(l, n - l).to(dev, dtype).index_select(0, active)
        a_act = acts.index_select(-1, active)
        feats = torch.zeros(B, P, K, clt.d_sae, dtype=dtype, device=dev)
        feats.index_copy_(
            -1, active, a_act[:, :, None, :] * _contract(W_act.sum(1), u) * s[..., None]
        )
        for j in range(n - l):
            rest[l + j] = rest[l + j] - a_act @ W_act[:, j]
        feats_by_layer.append(feats)
        del W_act
    out = {}
    for L in range(n):
        b_dec = clt.b_dec[L].to(dev, dtype)
        values = [
            feats_by_layer[L],
            ((u @ b_dec).expand(B, P, K) * s)[..., None],
            (dot(rest[L] - b_dec, u) * s)[..., None],
        ]
        tables = [
            ComponentTable.block("feature", clt.d_sae, layer=L, feature=np.arange(clt.d_sae)),
            ComponentTable.block("b_dec", layer=L),
            ComponentTable.block("error", layer=L),
        ]
        out[L] = _Parts([cv.home(v) for v in values], tables)
    return out


def _groups(table: ComponentTable) -> tuple[np.ndarray, np.ndarray]:
    """Per component of a split: its write (0 stream start, 1 attention, 2 MLP, 3 the
    readout's constants) and the layer of that write."""
    kind = table.kind.astype(np.int64)
    cat = np.full(len(kind), 3, dtype=np.int64)
    cat[np.isin(kind, list(_START))] = 0
    cat[np.isin(kind, list(_ATTN))] = 1
    cat[np.isin(kind, list(_MLP))] = 2
    inherit = kind == _INHERIT
    idx = np.where(inherit, 0, np.arange(len(kind)))
    idx = np.maximum.accumulate(idx) if len(idx) else idx
    return cat[idx], table.layer


def feature_split(
    cv: CacheView,
    r: Readout,
    dictionaries: Sequence[Any],
    split: Split,
    extra: Sequence[tuple[Tensor, ComponentTable]] = (),
) -> Writes:
    """Split the readout ``r`` into the dictionaries' terms and the writes they do not cover.

    The residual dictionary (at most one, at or before the stream ``r`` reads) replaces every
    write before its site; each attention/MLP-write dictionary replaces its layer's write; a
    per-head z dictionary replaces its layer's heads (``b_O`` and the post-norm bias stay),
    and its layer's gap (the heads' parts from the recorded pattern and values, against the
    recorded attention output) joins ``layer_gap``.
    Dictionaries that write nowhere into the stream read are left out.
    """
    terms = split_writes(cv, r, split, extra=extra)
    u, inv_s = r.u, r.inv_s
    layer_gap = terms.layer_gap
    cat, layer = _groups(terms.table)
    heads = np.isin(terms.table.kind.astype(np.int64), list(_HEADS))
    keep = np.ones(len(cat), dtype=bool)
    head: list = []
    resid = [
        d
        for d in dictionaries
        if isinstance(d, Dictionary)
        and d.site in RESIDUAL_SITES
        and all(
            x <= y
            for x, y in zip(RESIDUAL_SITES[_writes_to(d)](d.layer), (r.attn_layers, r.mlp_layers))
        )
    ]
    if resid:
        d = max(resid, key=lambda d: RESIDUAL_SITES[_writes_to(d)](d.layer))
        a, m = RESIDUAL_SITES[_writes_to(d)](d.layer)
        keep &= ~((cat == 0) | ((cat == 1) & (layer < a)) | ((cat == 2) & (layer < m)))
        head.append(_dictionary_terms(cv, d, r, u, inv_s))
    inserts: dict = {}
    clts = [d for d in dictionaries if isinstance(d, CrossLayerTranscoder)]
    for L, part in (_clt_terms(cv, clts[0], r, u, inv_s) if clts else {}).items():
        group = keep & (cat == 2) & (layer == L)
        if not group.any():  # cannot happen for a model check_model accepted
            raise AssertionError(f"no MLP write of layer {L} to replace")
        inserts[int(np.nonzero(group)[0][0])] = part
        keep &= ~group
    for d in dictionaries:
        if isinstance(d, CrossLayerTranscoder) or d.site in RESIDUAL_SITES:
            continue
        c = 1 if _writes_to(d) is Site.ATTN_OUT else 2
        group = keep & (cat == c) & (layer == d.layer)
        if d.per_head:
            rest = np.nonzero(group & ~heads)[0]  # b_O and the post-norm bias: kept
            group &= heads
        if not group.any():
            continue  # not in the stream read, or inside the residual dictionary
        part = _dictionary_terms(cv, d, r, u, inv_s)
        inserts[int(np.nonzero(group)[0][0])] = part
        keep &= ~group
        if d.per_head:
            kept = terms.values[..., torch.as_tensor(rest, device=terms.values.device)]
            whole = whole_write(cv, "attn", d.layer, r.positions, u, inv_s[:, :, None])
            total = sum(v.sum(-1) for v in part.values) + kept.sum(-1)
            layer_gap = layer_gap + (total - whole)
    values: list = []
    tables: list = []
    for part in head:
        values += part.values
        tables += part.tables
    # the kept components in order, each dictionary where its write was
    cuts = sorted(inserts)
    bounds = [0] + cuts + [len(cat)]
    for i in range(len(bounds) - 1):
        lo, hi = bounds[i], bounds[i + 1]
        if lo in inserts:
            values += inserts[lo].values
            tables += inserts[lo].tables
        idx = np.nonzero(keep[lo:hi])[0] + lo
        if len(idx) == hi - lo:
            values.append(terms.values[..., lo:hi])
        elif len(idx):
            values.append(
                terms.values.index_select(-1, torch.as_tensor(idx, device=terms.values.device))
            )
        if len(idx):
            tables.append(terms.table.take(idx))
    return Writes(
        values=torch.cat(values, dim=-1),
        table=ComponentTable.concat(tables),
        layer_gap=layer_gap,
    )


# ----------------------------------------------------------------------------- hops
def check_feature_hop(cv: CacheView, st: ChainState, hop: Hop, last: bool) -> Hop:
    """A feature hop checked against the model and the stream read so far."""
    r = st.readout
    d, caller = hop.dictionary, cv.caller
    d.check_model(cv.view, caller, per_head_ok=True)
    check.in_range(hop.index, d.d_sae, "feature", caller, of=f" ({d.d_sae} features)")
    if d.per_head:
        inside = d.layer < r.attn_layers
    elif d.site in RESIDUAL_SITES:
        a, m = RESIDUAL_SITES[d.site](d.layer)
        inside = a <= r.attn_layers and m <= r.mlp_layers
    else:
        inside = d.layer < (r.attn_layers if d.site is Site.ATTN_OUT else r.mlp_layers)
    if not inside:
        raise ArgumentError(
            f"{caller}: feature {hop} of the dictionary at {d.hook!r} does not write into the "
            "residual stream read at this hop; chain toward earlier layers."
        )
    if d.input_site in (Site.ATTN_OUT, Site.MLP_OUT):
        raise ArgumentError(
            f"{caller}: feature {hop} reads {d.input_hook!r}, one layer's output rather than "
            "the residual stream, so its input cannot be split by writer; hop through the "
            "layer's heads or neurons instead."
        )
    if d.per_head and not last:
        raise ArgumentError(
            f"{caller}: feature {hop} reads per-head z, which sums what its heads read from "
            "every source position, so the next hop has no one position to read; make it "
            "the last hop (its split names each source), or hop through one head with src=."
        )
    return hop


def feature_hop(cv: CacheView, st: ChainState, hop: Hop) -> tuple[ChainState, Tensor]:
    """Pull the readout back through feature ``hop.index`` (its gate frozen): the new readout
    is the feature's pre-activation times its gate and its decoder's read."""
    r, d, f = st.readout, hop.dictionary, hop.index
    if d.per_head:
        return _z_feature_hop(cv, st, hop)
    view, dtype = cv.view, r.u.dtype
    B = r.positions.shape[0]
    K = r.u.shape[2]
    # encoded where the dictionary lives; its one feature's values come back
    x_in = dictionary_input(cv, d, r.positions, dtype, d.W_enc.device)  # [B, 1, d_in]
    pre = d.pre_activations(x_in)  # [B, 1, F]
    acts = cv.home(d.activate(pre)[..., f])  # [B, 1]
    pre = cv.home(pre[..., f])
    nonzero = pre != 0
    gate = torch.where(nonzero, acts / torch.where(nonzero, pre, torch.ones_like(pre)), acts * 0)
    w_dec = d.W_dec[f].to(r.u.device, dtype) / d.input_scale
    c = (r.u @ w_dec).expand(B, 1, K) * r.inv_s[:, :, None]  # [B, 1, K]
    term = acts[:, :, None] * c
    coef = gate[:, :, None] * c  # [B, 1, K]
    w = d.W_enc[:, f].to(r.u.device, dtype) * d.input_scale  # the linear read of x_in
    const = d.b_enc[f].to(r.u.device, dtype)
    if d.subtract_b_dec:
        const = const - d.b_dec.to(r.u.device, dtype) @ d.W_enc[:, f].to(r.u.device, dtype)
    L, at = d.layer, st.at
    consts = [
        (
            ComponentTable.block("b_enc", 1, layer=L, feature=f, at=at),
            const * coef,
        )
    ]
    if d.input_site is Site.LN2_NORMALIZED:
        norm = view.ln2[L]
        u_new = norm.pull_back(w)[None, None, None, :] * coef[..., None]  # [B, 1, K, d]
        inv_s = (
            1.0 / cv.scale(norm, r.positions)
            if norm.has_scale
            else torch.ones(B, 1, dtype=dtype, device=u_new.device)
        )
        if norm.bias is not None:
            consts.append(
                (
                    ComponentTable.block("ln.b", 1, layer=L, feature=f, at=at),
                    norm.constant(w) * coef,
                )
            )
        site = Site.RESID_PRE if view.parallel else Site.RESID_MID
    else:
        u_new = w[None, None, None, :] * coef[..., None]
        inv_s = torch.ones(B, 1, dtype=dtype, device=u_new.device)
        site = d.input_site
    a, m = RESIDUAL_SITES[site](L)
    if view.parallel and site is Site.RESID_PRE:
        a, m = L, L
    new = Readout(u=u_new, inv_s=inv_s, positions=r.positions, attn_layers=a, mlp_layers=m)
    return ChainState(new, at, consts), term


def _gate(pre: Tensor, acts: Tensor) -> Tensor:
    """The frozen gate ``act(pre) / pre`` (0 where ``pre`` is 0)."""
    nonzero = pre != 0
    return torch.where(nonzero, acts / torch.where(nonzero, pre, torch.ones_like(pre)), acts * 0)


def _z_feature_hop(cv: CacheView, st: ChainState, hop: Hop) -> tuple[ChainState, Tensor]:
    """Pull the readout back through per-head z feature ``hop.index`` (its gate, the layer's
    pattern and ``ln1``'s scale frozen): its pre-activation is ``sum_j sum_h A[h,i,j]
    w[h] . v_j[kv(h)] + const`` with ``w = c W_enc[:, f]`` viewed ``[H, d_head]``, so the new
    readout is one read of ``resid_pre L`` per source ``j`` through ``ln1``, plus ``b_V``
    and ``ln1``'s bias per source and ``b_enc``."""
    r, d, f = st.readout, hop.dictionary, hop.index
    view, dtype = cv.view, r.u.dtype
    L, at = d.layer, st.at
    B, K = r.positions.shape[0], r.u.shape[2]
    H, G, dh = view.n_heads, view.n_kv_heads, view.d_head
    z = dictionary_input(cv, d, r.positions, dtype, d.W_enc.device)  # [B, 1, H * dh]
    pre = d.pre_activations(z)  # [B, 1, F]
    acts = cv.home(d.activate(pre)[..., f])  # [B, 1]
    pre = cv.home(pre[..., f])
    gate = _gate(pre, acts)
    uz, inv = _z_readout(cv, L, r)  # the decoder's read of the readout
    w_dec = d.W_dec[f].to(uz.device, dtype) / d.input_scale
    c = (uz @ w_dec).expand(B, 1, K) * inv[:, :, None]  # [B, 1, K]
    term = acts[:, :, None] * c
    coef = gate[:, :, None] * c  # [B, 1, K]
    const = d.b_enc[f].to(r.u.device, dtype)
    if d.subtract_b_dec:
        const = const - d.b_dec.to(r.u.device, dtype) @ d.W_enc[:, f].to(r.u.device, dtype)
    # through the frozen pattern and the values, where the layer lives
    A = cv.get(Site.PATTERN, L, native=True)
    dev = A.device
    rows = torch.arange(B, device=dev)
    Ai = A[rows, :, r.positions[:, 0].to(dev)].to(dtype)  # [B, H, src]
    w = (d.W_enc[:, f].to(dev, dtype) * d.input_scale).reshape(G, H // G, dh)
    WVw = torch.einsum("gmd,grd->grm", view.W_V(L, dtype).to(dev), w).reshape(H, -1)
    bVw = torch.einsum("gd,grd->gr", view.b_V(L, dtype, dev), w).reshape(H)
    D = cv.home(torch.einsum("bhj,hm->bjm", Ai, WVw))  # [B, src, d]: each source's read
    bv = cv.home(torch.einsum("bhj,h->bj", Ai, bVw))  # [B, src]
    n_src = D.shape[1]
    srcs = np.arange(n_src)
    positions = torch.as_tensor(srcs, device=r.positions.device).expand(B, n_src)
    norm1 = view.ln1[L]
    per = coef[:, 0][:, None, :]  # [B, 1, K]
    u_new = norm1.pull_back(D)[:, :, None, :] * per[..., None]  # [B, src, K, d]
    inv_s = (
        1.0 / cv.scale(norm1, positions)
        if norm1.has_scale
        else torch.ones(B, n_src, dtype=dtype, device=u_new.device)
    )
    consts = [
        (ComponentTable.block("b_enc", 1, layer=L, feature=f, at=at), const * coef),
        (
            ComponentTable.block("b_V", n_src, layer=L, feature=f, at=srcs),
            bv[:, :, None] * per,
        ),
    ]
    if norm1.bias is not None:
        consts.append(
            (
                ComponentTable.block("ln.b", n_src, layer=L, feature=f, at=srcs),
                norm1.constant(D)[:, :, None] * per,
            )
        )
    new = Readout(u=u_new, inv_s=inv_s, positions=positions, attn_layers=L, mlp_layers=L)
    return ChainState(new, srcs.astype(np.int64), consts), term


register_hop("feature", HopKind(check=check_feature_hop, step=feature_hop))
register_kinds(
    ("feature", "b_dec", "error", "skip", "b_enc"),
    constant=("b_dec", "b_enc"),
    owner="tlprisms._prisms.features",
)


# ----------------------------------------------------------------------------- the prism
def run(
    rec: Recorded,
    request: Request,
    dictionaries: Sequence[Any],
    split: Split,
    hops: Sequence[Hop] = (),
) -> Terms:
    """The feature prism: the logit (or, with ``hops``, the last hop's term) split into the
    ``dictionaries``' features, ``b_dec``, errors and the writes they do not replace.

    Phases: (1) the frozen final readout; (2) with a path, the chain's hops; (3) every write
    split by the engine, the dictionaries' sites replaced by their terms; (4) the
    structural check; (5) the largest terms kept when ``top_k``/``min_abs`` ask."""
    if hops:
        return chain.run(
            rec,
            request,
            hops,
            split,
            split_last=lambda cv, r: feature_split(cv, r, dictionaries, split),
        )
    cv = rec.cache
    fr, ex = read_logits(rec, request.target, request.pos, request.softcap)
    w = feature_split(cv, fr.readout, dictionaries, split, logit_constants(fr))
    B, P = fr.readout.positions.shape
    k = ex.weights.shape[2]
    values = w.values.reshape(B, P, k, -1) if ex.trivial else weigh(w.values, ex.weights)
    refuse_broken(cv, values, ex.values, w.layer_gap)
    terms = Terms(
        values=values,
        table=w.table,
        explained=ex.values,
        positions=fr.readout.positions,
        labels=target_labels(fr, B, P, k),
        explains=ex.explains,
        name="features",
    )
    return keep_largest(terms, request.top_k, request.min_abs)
