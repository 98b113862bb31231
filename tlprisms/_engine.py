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

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from tlprisms._errors import CacheError
from tlprisms._result import ComponentTable
from tlprisms._seam import ModelView, NormSpec, cache_get

__all__ = ["Readout", "split_writes", "gather_pos", "dot"]


@dataclass
class Readout:
    """A frozen linear read of the residual stream.

    Attributes:
        u: ``[B', P', K, d_model]`` readout directions times the scale (``B'``/``P'`` are 1
            when shared by the batch / positions).
        inv_s: ``[B, P]`` the frozen ``1 / scale`` at each read position.
        positions: ``[B, P]`` the residual positions read.
        attn_layers: attention writes of layers ``< attn_layers`` are in the stream read.
        mlp_layers: MLP writes of layers ``< mlp_layers`` are in the stream read.
    """

    u: Tensor
    inv_s: Tensor
    positions: Tensor
    attn_layers: int
    mlp_layers: int


def gather_pos(x: Tensor, positions: Tensor, dtype: torch.dtype) -> Tensor:
    """``x[b, positions[b, p]]`` for ``x [B, n, ...]`` -> ``[B, P, ...]``."""
    B, P = positions.shape
    if P == x.shape[1] and bool((positions == torch.arange(P, device=positions.device)).all()):
        return x.to(dtype)
    rows = torch.arange(B, device=x.device)[:, None]
    return x[rows, positions.to(x.device)].to(dtype)


def dot(x: Tensor, u: Tensor) -> Tensor:
    """``x [B, P, d]`` . ``u [B', P', K, d]`` -> ``[B, P, K]``, without expanding ``u``."""
    B, P, d = x.shape
    if u.shape[0] == 1 and u.shape[1] == 1:
        return (x.reshape(B * P, d) @ u[0, 0].T).reshape(B, P, -1)
    return torch.einsum("bpd,bpkd->bpk", x, u.expand(B, P, *u.shape[2:]))


def _post_scale(cache: Any, post: Optional[NormSpec], positions: Tensor, dtype: torch.dtype,
                caller: str) -> Optional[Tensor]:
    if post is None or not post.has_scale:
        return None
    s = cache_get(cache, post.scale_hook, caller)[..., 0]
    return 1.0 / gather_pos(s, positions, dtype)


def _through_post(post: Optional[NormSpec], u: Tensor) -> Tensor:
    return u if post is None else post.pull_back(u)


def _post_bias(post: Optional[NormSpec], u: Tensor) -> Tensor:
    return post.constant(u) if post is not None else torch.zeros(u.shape[:-1], dtype=u.dtype,
                                                                  device=u.device)


def _expand(t: Tensor, B: int, P: int) -> Tensor:
    return t.expand(B, P, *t.shape[2:])


def _head_terms(view: ModelView, cache: Any, layer: int, ul: Tensor, positions: Tensor,
                dtype: torch.dtype, by_source: bool, caller: str) -> Tensor:
    """``[B, P, K, head, src]`` (``src`` summed away when not ``by_source``: ``[B,P,K,head]``)."""
    A = cache_get(cache, f"blocks.{layer}.attn.hook_pattern", caller)
    v = cache_get(cache, f"blocks.{layer}.attn.hook_v", caller).to(dtype)
    B, P = positions.shape
    H, G = view.n_heads, view.n_kv_heads
    if v.shape[2] != G:
        raise CacheError(
            f"{caller}: blocks.{layer}.attn.hook_v has {v.shape[2]} heads but this model has "
            f"{G} key/value heads; the cache comes from another model. Re-run "
            "model.run_with_cache(tokens) with this model."
        )
    rep = H // G
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


def _neuron_terms(view: ModelView, cache: Any, layer: int, ul: Tensor, positions: Tensor,
                  dtype: torch.dtype, caller: str) -> Tensor:
    """``[B, P, K, d_mlp]``"""
    post = gather_pos(cache_get(cache, f"blocks.{layer}.mlp.hook_post", caller), positions, dtype)
    W_out = view.W_out(layer, dtype).to(ul.device)  # [n, d]
    B, P = positions.shape
    if ul.shape[0] == 1 and ul.shape[1] == 1:
        Wu = ul[0, 0] @ W_out.T  # [K, n] (this layout is the fast one)
        return post[:, :, None, :] * Wu[None, None]
    if ul.shape[1] == 1:  # one readout per batch row
        Wu = torch.einsum("nm,bkm->bkn", W_out, ul[:, 0].expand(B, *ul.shape[2:]))
        return post[:, :, None, :] * Wu[:, None]
    Wu = torch.einsum("nm,bpkm->bpkn", W_out, _expand(ul, B, P))
    return post[:, :, None, :] * Wu


def split_writes(view: ModelView, cache: Any, readout: Readout, *, heads: frozenset,
                 neurons: frozenset, by_source: bool, caller: str,
                 extra: Sequence[tuple[Tensor, ComponentTable]] = ()
                 ) -> tuple[Tensor, ComponentTable, Tensor]:
    """Split a readout by every write into the residual stream it reads.

    Args:
        heads: layers whose attention is split into heads (x sources when ``by_source``).
        neurons: layers whose MLP is split into neurons.
        extra: more ``([B', P', K] values, labels)`` to append (the readout's constants), so
            that the result is assembled with one copy.

    Returns:
        ``values [B, P, K, C]``, their labels, and ``layer_check [B, P, K]``: for split
        layers, the difference between the parts and the layer's whole write (should be ~0).
    """
    u, inv_s, positions = readout.u, readout.inv_s, readout.positions
    dtype = u.dtype
    B, P = positions.shape
    K = u.shape[2]
    parts: list[Tensor] = []
    tables: list[ComponentTable] = []
    check = torch.zeros(B, P, K, dtype=dtype, device=u.device)

    def add(values: Tensor, table: ComponentTable) -> None:
        parts.append(values.reshape(B, P, K, -1))
        tables.append(table)

    s = inv_s[:, :, None]
    add(dot(gather_pos(cache_get(cache, "hook_embed", caller), positions, dtype), u) * s,
        ComponentTable.block("embed"))
    if view.pos_embed_in_resid:
        pe = cache_get(cache, "hook_pos_embed", caller)
        if pe.shape[0] != B:
            pe = pe.expand(B, *pe.shape[1:])
        add(dot(gather_pos(pe, positions, dtype), u) * s, ComponentTable.block("pos_embed"))
    n_src = cache_get(cache, "hook_embed", caller).shape[1]
    for layer in range(max(readout.attn_layers, readout.mlp_layers)):
        for kind in ("attn", "mlp"):
            if kind == "attn" and layer >= readout.attn_layers:
                continue
            if kind == "mlp" and (layer >= readout.mlp_layers or view.attn_only):
                continue
            post = view.ln1_post[layer] if kind == "attn" else view.ln2_post[layer]
            ul = _through_post(post, u)
            sl = s
            post_inv = _post_scale(cache, post, positions, dtype, caller)
            if post_inv is not None:
                sl = s * post_inv[:, :, None]
            bias = (view.b_O if kind == "attn" else view.b_out)(layer, dtype, u.device)
            bias_term = (ul @ bias).expand(B, P, K) * sl  # [B,P,K]
            post_b = _post_bias(post, u)
            whole = dot(gather_pos(cache_get(cache, f"blocks.{layer}.hook_{kind}_out", caller),
                                   positions, dtype), u) * s
            whole = whole - bias_term - (post_b.expand(B, P, K) * s if post is not None else 0)
            split = heads if kind == "attn" else neurons
            if layer in split:
                if kind == "attn":
                    t = _head_terms(view, cache, layer, ul, positions, dtype, by_source, caller)
                    t = t * sl[..., None, None] if by_source else t * sl[..., None]
                    H = view.n_heads
                    if by_source:
                        hh, jj = np.meshgrid(np.arange(H), np.arange(n_src), indexing="ij")
                        table = ComponentTable.block("head", H * n_src, layer=layer,
                                                     head=hh.ravel(), src=jj.ravel())
                    else:
                        table = ComponentTable.block("head", H, layer=layer, head=np.arange(H))
                else:
                    t = _neuron_terms(view, cache, layer, ul, positions, dtype, caller)
                    t = t * sl[..., None]
                    table = ComponentTable.block("neuron", t.shape[-1], layer=layer,
                                                 neuron=np.arange(t.shape[-1]))
                flat = t.reshape(B, P, K, -1)
                check = check + (flat.sum(-1) - whole)
                add(flat, table)
            else:
                add(whole, ComponentTable.block(kind, layer=layer))
            add(bias_term, ComponentTable.block("b_O" if kind == "attn" else "b_out", layer=layer))
            if post is not None and post.bias is not None:
                add(post_b.expand(B, P, K) * s, ComponentTable.block("ln.b", layer=layer))
    for values, table in extra:
        add(values.expand(B, P, K), table)
    return torch.cat(parts, dim=-1), ComponentTable.concat(tables), check
