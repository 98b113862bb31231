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
built on the same :class:`~tlprisms._engine.Readout`, so chains compose: every hop's result
sums exactly to the term it splits.
"""

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from tlprisms._engine import Readout, dot, gather_pos, split_writes
from tlprisms._errors import PrismError
from tlprisms._result import ComponentTable, Decomposition
from tlprisms._seam import ModelView, NormSpec, cache_get

__all__ = ["Hop", "run_chain", "run_readout"]


@dataclass(frozen=True)
class Hop:
    """One step of a chain: ``Hop("head", layer, head, src)`` or ``Hop("neuron", layer, n)``.

    ``src`` (heads only) keeps one source position; it is required for every head hop but
    the last, because the next hop reads the residual stream at that position.
    """

    kind: str
    layer: int
    index: int
    src: Optional[int] = None

    def __str__(self) -> str:
        if self.kind == "head":
            return f"L{self.layer}H{self.index}" + ("" if self.src is None else f"[src {self.src}]")
        return f"L{self.layer}N{self.index}"


@dataclass
class _State:
    readout: Readout
    pos_label: np.ndarray  # [P] residual position of each readout slot (-1: explained pos)
    consts: list  # (table, values [B, P, K]): the constants of the last hop


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
    raise PrismError(f"through_neuron: no closed form for activation {name!r}.")


def _limit_at_zero(name: str) -> float:
    """``lim act(x)/x`` at ``x = 0``: 1/2 for the GELUs and SiLU, 0 for ReLU."""
    return 0.0 if name == "relu" else 0.5


def _ratio(num: Tensor, den: Tensor, fallback: Tensor) -> Tensor:
    tiny = den.abs() <= 1e-12 * (1.0 + num.abs())
    return torch.where(tiny, fallback, num / torch.where(tiny, torch.ones_like(den), den))


# ----------------------------------------------------------------------------- hops
def _post_parts(view: ModelView, cache: Any, post: Optional[NormSpec], r: Readout,
                dtype: torch.dtype, caller: str) -> tuple[Tensor, Tensor]:
    """(readout through a post-norm ``[B',1,K,d]``, its full scale factor ``[B, 1]``)."""
    ul = r.u if post is None else post.pull_back(r.u)
    sl = r.inv_s
    if post is not None and post.has_scale:
        s = cache_get(cache, post.scale_hook, caller)[..., 0]
        sl = sl / gather_pos(s, r.positions, dtype)
    return ul, sl


def head_hop(view: ModelView, cache: Any, st: _State, hop: Hop, caller: str) -> tuple[_State, Tensor]:
    r = st.readout
    layer, head = hop.layer, hop.index
    dtype, B = r.u.dtype, r.positions.shape[0]
    ul, sl = _post_parts(view, cache, view.ln1_post[layer], r, dtype, caller)
    W_O = view.W_O(layer, dtype).to(ul.device)[head]  # [dh, d]
    g = head // (view.n_heads // view.n_kv_heads)
    W_V = view.W_V(layer, dtype).to(ul.device)[g]  # [d, dh]
    WOu = ul @ W_O.T  # [B',1,K,dh]
    WVWOu = WOu @ W_V.T  # [B',1,K,d]
    A = cache_get(cache, f"blocks.{layer}.attn.hook_pattern", caller)
    rows = torch.arange(B, device=A.device)
    A = A[rows, head, r.positions[:, 0].to(A.device)].to(dtype)  # [B, src]
    n_src = A.shape[-1]
    coef = A * sl  # [B, src]
    v = cache_get(cache, f"blocks.{layer}.attn.hook_v", caller)[:, :, g].to(dtype)  # [B,src,dh]
    value = torch.einsum("bjd,bkd->bjk", v, WOu[:, 0].expand(B, *WOu.shape[2:]))
    term_src = coef[..., None] * value  # [B, src, K]
    srcs = np.arange(n_src) if hop.src is None else np.asarray([hop.src])
    if hop.src is not None:
        if not 0 <= hop.src < n_src:
            raise PrismError(f"{caller}: src={hop.src} is out of range for {n_src} positions.")
        coef, term_src = coef[:, srcs], term_src[:, srcs]
    norm1 = view.ln1[layer]
    # The readout direction is the same at every source; A[h,i,j] and the scale per source are
    # one scalar per (batch, source), kept in inv_s so the engine contracts weights only once.
    u_new = norm1.pull_back(WVWOu)  # [B',1,K,d]
    positions = torch.as_tensor(srcs, device=r.positions.device).expand(B, len(srcs))
    if norm1.has_scale:
        s1 = cache_get(cache, norm1.scale_hook, caller)[..., 0]
        inv_s = coef / gather_pos(s1, positions, dtype)
    else:
        inv_s = coef
    b_V = view.b_V(layer, dtype, ul.device)[g]
    consts = []  # an earlier hop's constants are not part of this hop's term
    bv = (WOu[:, 0] @ b_V)[:, None, :] * coef[:, :, None]  # [B, P', K]
    consts.append((ComponentTable.block("b_V", len(srcs), layer=layer, head=head, pos=srcs), bv))
    if norm1.bias is not None:
        b1 = norm1.constant(WVWOu[:, 0])[:, None, :] * coef[:, :, None]
        consts.append((ComponentTable.block("ln.b", len(srcs), layer=layer, head=head, pos=srcs), b1))
    new = Readout(u=u_new, inv_s=inv_s, positions=positions, attn_layers=layer, mlp_layers=layer)
    return _State(new, srcs.astype(np.int64), consts), term_src.sum(1, keepdim=True)


def _gate_coefficients(view: ModelView, cache: Any, layer: int, neuron: int, positions: Tensor,
                       dtype: torch.dtype, caller: str) -> tuple[Tensor, Tensor]:
    """``c [B, d_mlp]`` and ``const [B]`` with ``post[n] = sum_m c[m] * in[m] + const``,
    where ``in = ln2(x) @ W_in + b_in`` (the "up"/linear pre-activation)."""
    name = view.act_fn
    post = gather_pos(cache_get(cache, f"blocks.{layer}.mlp.hook_post", caller),
                      positions, dtype)[:, 0]
    B, d_mlp = post.shape
    c = torch.zeros(B, d_mlp, dtype=dtype, device=post.device)
    const = torch.zeros(B, dtype=dtype, device=post.device)
    pre = gather_pos(cache_get(cache, f"blocks.{layer}.mlp.hook_pre", caller), positions, dtype)[:, 0]
    if view.gated:
        up = gather_pos(cache_get(cache, f"blocks.{layer}.mlp.hook_pre_linear", caller),
                        positions, dtype)[:, 0]
        if not view.is_bridge:
            # HookedTransformer's GatedMLP adds b_in after the product: act(g) * (x W_in) + b_in
            b_in = view.b_in(layer, dtype, post.device)[neuron]
            const = const + b_in
            gate = _ratio(post[:, neuron] - b_in, up[:, neuron], _act(name, pre[:, neuron]))
        else:
            gate = _ratio(post[:, neuron], up[:, neuron], _act(name, pre[:, neuron]))
        c[:, neuron] = gate
    elif name == "solu_ln":
        mid = gather_pos(cache_get(cache, view.solu_mid_hook(layer), caller),
                         positions, dtype)[:, 0]
        g = _ratio(mid, pre, torch.softmax(pre, -1))
        ln = view.solu_ln[layer]
        w = 1.0 if ln is None or ln.weight is None else ln.weight.to(post.device, dtype)[neuron]
        s = 1.0
        if ln is not None and ln.has_scale:
            s = gather_pos(cache_get(cache, ln.scale_hook, caller), positions, dtype)[:, 0]
        center = ln is None or ln.centred
        c = -g / d_mlp if center else torch.zeros_like(g)
        c[:, neuron] = c[:, neuron] + g[:, neuron]
        c = c * (w / s if isinstance(s, Tensor) else w / s)
        if ln is not None and ln.bias is not None:
            const = const + ln.bias.to(post.device, dtype)[neuron]
    else:
        limit = torch.full_like(pre[:, neuron], _limit_at_zero(name))
        c[:, neuron] = _ratio(post[:, neuron], pre[:, neuron], limit)
    return c, const


def neuron_hop(view: ModelView, cache: Any, st: _State, hop: Hop, caller: str) -> tuple[_State, Tensor]:
    r = st.readout
    if r.positions.shape[1] != 1:
        raise PrismError(f"{caller}: a neuron hop needs one position per row; give the previous "
                         "head hop a src.")
    layer, neuron = hop.layer, hop.index
    if not 0 <= neuron < view.d_mlp:
        raise PrismError(f"{caller}: neuron {neuron} is out of range; layer {layer} has "
                         f"{view.d_mlp} neurons (0..{view.d_mlp - 1}).")
    dtype, B = r.u.dtype, r.positions.shape[0]
    ul, sl = _post_parts(view, cache, view.ln2_post[layer], r, dtype, caller)
    W_out = view.W_out(layer, dtype).to(ul.device)[neuron]  # [d]
    a = (ul @ W_out).expand(B, 1, ul.shape[2]) * sl[:, :, None]  # [B,1,K]
    c, post_const = _gate_coefficients(view, cache, layer, neuron, r.positions, dtype, caller)
    W_in = view.W_in(layer, dtype).to(ul.device)  # [d, d_mlp]
    Wc = c @ W_in.T  # [B, d]
    norm2 = view.ln2[layer]
    u_new = norm2.pull_back(Wc)[:, None, None, :] * a[..., None]  # [B,1,K,d]
    if norm2.has_scale:
        s2 = cache_get(cache, norm2.scale_hook, caller)[..., 0]
        inv_s = 1.0 / gather_pos(s2, r.positions, dtype)
    else:
        inv_s = torch.ones(B, 1, dtype=dtype, device=u_new.device)
    post = gather_pos(cache_get(cache, f"blocks.{layer}.mlp.hook_post", caller),
                      r.positions, dtype)[:, :, neuron]  # [B,1]
    term = post[:, :, None] * a
    consts = []
    lbl = st.pos_label
    b_in = view.b_in(layer, dtype, ul.device)
    if view.gated and not view.is_bridge:
        b_in = torch.zeros_like(b_in)  # outside the gate: it is in post_const
    consts.append((ComponentTable.block("b_in", 1, layer=layer, neuron=neuron, pos=lbl),
                   (c @ b_in + post_const)[:, None, None] * a))
    if norm2.bias is not None:
        consts.append((ComponentTable.block("ln.b", 1, layer=layer, neuron=neuron, pos=lbl),
                       norm2.constant(Wc)[:, None, None] * a))
    attn_layers = layer if view.parallel else layer + 1
    new = Readout(u=u_new, inv_s=inv_s, positions=r.positions, attn_layers=attn_layers,
                  mlp_layers=layer)
    return _State(new, lbl, consts), term


# ----------------------------------------------------------------------------- runners
def _check_hop(view: ModelView, st: _State, hop: Hop, caller: str) -> None:
    L = view.n_layers
    if hop.kind not in ("head", "neuron"):
        raise PrismError(f"{caller}: hop kind {hop.kind!r}; use 'head' or 'neuron'.")
    if not 0 <= hop.layer < L:
        raise PrismError(f"{caller}: layer {hop.layer} is out of range; the model has {L} "
                         f"layers (0..{L - 1}).")
    r = st.readout
    if hop.kind == "head":
        if not 0 <= hop.index < view.n_heads:
            raise PrismError(f"{caller}: head {hop.index} is out of range; layer {hop.layer} has "
                             f"{view.n_heads} heads (0..{view.n_heads - 1}).")
        if hop.layer >= r.attn_layers:
            raise PrismError(f"{caller}: head L{hop.layer}H{hop.index} does not write into the "
                             "residual stream read at this hop; chain toward earlier layers.")
    else:
        if view.attn_only:
            raise PrismError(f"{caller}: this model has no MLPs.")
        if hop.layer >= r.mlp_layers:
            raise PrismError(f"{caller}: neuron L{hop.layer}N{hop.index} does not write into the "
                             "residual stream read at this hop; chain toward earlier layers.")
    if r.positions.shape[1] != 1:
        raise PrismError(f"{caller}: the previous head hop kept every source position; give it "
                         "src=... to chain further from one source.")


def finish(prism: Any, st: _State, info: dict, term: Tensor, *, heads: frozenset,
           neurons: frozenset, by_source: bool, softcap: str, caller: str, prism_name: str
           ) -> Decomposition:
    """Split the final readout of a chain and package it (values move to components)."""
    view, cache = prism.view, prism.cache
    r = st.readout
    values, table, _ = split_writes(view, cache, r, heads=heads, neurons=neurons,
                                    by_source=by_source, caller=caller)
    B, P, K, C = values.shape
    weights, _, explains = info["weights"]
    k, a = weights.shape[2], weights.shape[3]
    trivial = a == 1 and bool((weights == 1).all())
    n_const = sum(t.kind.shape[0] for t, _ in st.consts)
    out = torch.empty(B, k, P * C + n_const, dtype=values.dtype, device=values.device)
    if trivial:
        out[:, :, :P * C].view(B, k, P, C).copy_(values.permute(0, 2, 1, 3))
    else:
        combined = torch.einsum("bpkac,bka->bpkc", values.reshape(B, P, k, a, C), weights[:, 0])
        out[:, :, :P * C].view(B, k, P, C).copy_(combined.permute(0, 2, 1, 3))
        del combined
    del values
    tables = [table.tile_over_positions(st.pos_label)]
    start = P * C
    for t, v in st.consts:
        v = v.expand(B, -1, K).reshape(B, -1, k, a)  # [B, n, k, a]
        v = (v * weights[:, 0, None]).sum(-1).permute(0, 2, 1)  # [B, k, n]
        out[:, :, start:start + v.shape[-1]] = v
        start += v.shape[-1]
        tables.append(t)
    values = out[:, None]
    table = ComponentTable.concat(tables)
    explained = (term.reshape(B, 1, k, a) * weights).sum(-1)
    prism._validate(values, explained, torch.zeros_like(explained), caller)
    labels = np.array(np.broadcast_to(info["atoms"].labels, (B, 1, k)))
    return Decomposition(values=values, components=table, logits=explained,
                         positions=info["positions"], target_labels=labels,
                         explains=f"{explains} term of {prism_name}", prism=f"through {prism_name}",
                         str_tokens=prism._str_tokens())


def run_chain(prism: Any, target: Any, pos: Any, path: Sequence[Hop], *, heads: frozenset,
              neurons: frozenset, by_source: bool, softcap: str, caller: str) -> Decomposition:
    if not path:
        raise PrismError(f"{caller}: the chain is empty; give at least one Hop.")
    view = prism.view
    readout, info = prism.final_readout(target, pos, caller)
    if readout.positions.shape[1] != 1:
        raise PrismError(f"{caller}: chains explain one position per row; pos='all' is not "
                         "supported here (loop over positions instead).")
    weights, _, explains = prism._explained(readout, info, softcap, caller)
    info["weights"] = (weights, None, explains)
    info["positions"] = readout.positions
    st = _State(readout, np.asarray([-1]), [])
    term = None
    for i, hop in enumerate(path):
        _check_hop(view, st, hop, caller)
        if hop.kind == "head" and hop.src is None and i < len(path) - 1:
            raise PrismError(f"{caller}: hop {hop} is not the last, so it needs src=... (the "
                             "source position the next hop reads).")
        hop_fn = head_hop if hop.kind == "head" else neuron_hop
        st, term = hop_fn(view, prism.cache, st, hop, caller)
    name = " > ".join(str(h) for h in path)
    return finish(prism, st, info, term, heads=heads, neurons=neurons, by_source=by_source,
                  softcap=softcap, caller=caller, prism_name=name)


_AT = {"ln1": "resid_pre", "ln2": "resid_mid", "resid_pre": "resid_pre",
       "resid_mid": "resid_mid", "resid_post": "resid_post", "ln_final": "resid_post"}


def run_readout(prism: Any, vector: Tensor, layer: int, pos: Any, at: str, bias: Any, *,
                heads: frozenset, neurons: frozenset, by_source: bool, caller: str
                ) -> Decomposition:
    """Decompose ``norm(x) . u + bias`` for ``x`` the residual stream at ``at`` of ``layer``."""
    from tlprisms._targets import resolve_positions

    view, cache = prism.view, prism.cache
    L = view.n_layers
    if at not in _AT:
        raise PrismError(f"{caller}: at={at!r}; use one of {sorted(_AT)}.")
    if at == "ln_final":
        layer = L - 1 if layer in (None, -1, L - 1) else layer
        if layer != L - 1:
            raise PrismError(f"{caller}: at='ln_final' reads after the last layer; pass layer={L - 1}.")
    if not -L <= layer < L:
        raise PrismError(f"{caller}: layer {layer} is out of range (0..{L - 1}).")
    layer %= L
    hook = _AT[at]
    if view.parallel and hook == "resid_mid":
        hook = "resid_pre"
    if view.attn_only and at in ("ln2", "resid_mid"):
        raise PrismError(f"{caller}: this model has no MLPs, so no {at}.")
    u = torch.as_tensor(vector)
    u = (u[None] if u.ndim == 1 else u).to(prism.device, prism.dtype)  # [K, d]
    if u.shape[-1] != view.d_model:
        raise PrismError(f"{caller}: the readout vector has {u.shape[-1]} dimensions, "
                         f"expected d_model={view.d_model}.")
    K = u.shape[0]
    positions, pos_all = resolve_positions(pos, prism.batch, prism.n_ctx, caller)
    positions = positions.to(prism.device)
    norm = {"ln1": view.ln1[layer], "ln2": view.ln2[layer], "ln_final": view.final_norm}.get(at)
    B, P = positions.shape
    if norm is not None:
        uu = norm.pull_back(u)[None, None]
        inv_s = (1.0 / gather_pos(cache_get(cache, norm.scale_hook, caller)[..., 0], positions,
                                  prism.dtype)) if norm.has_scale else torch.ones(B, P, dtype=prism.dtype, device=prism.device)
        const = norm.constant(u)
    else:
        uu, inv_s = u[None, None], torch.ones(B, P, dtype=prism.dtype, device=prism.device)
        const = torch.zeros(K, dtype=prism.dtype, device=prism.device)
    if bias is not None:
        const = const + torch.as_tensor(bias, dtype=prism.dtype, device=prism.device).expand(K)
    layers_in = {"resid_pre": (layer, layer), "resid_mid": (layer + 1, layer),
                 "resid_post": (layer + 1, layer + 1)}[hook]
    r = Readout(u=uu, inv_s=inv_s, positions=positions, attn_layers=layers_in[0],
                mlp_layers=layers_in[1])
    values, table, gap = split_writes(
        view, cache, r, heads=heads, neurons=neurons, by_source=by_source, caller=caller,
        extra=[(const[None, None], ComponentTable.block("readout.b", layer=layer))])
    x = gather_pos(cache_get(cache, f"blocks.{layer}.hook_{hook}", caller), positions, prism.dtype)
    explained = dot(x, uu) * inv_s[:, :, None] + const
    prism._validate(values, explained, gap, caller)
    labels = np.array([[[f"u{k}@{at}{layer}" for k in range(K)]]], dtype=object)
    return Decomposition(values=values, components=table, logits=explained, positions=positions,
                         target_labels=labels, explains=f"readout at {at} of layer {layer}",
                         prism="readout", str_tokens=prism._str_tokens())
