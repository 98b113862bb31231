"""Sparse results with exact totals: keep the largest terms, sum the rest per (kind, layer).

With ``top_k=`` / ``min_abs=`` a prism keeps, per explained ``(batch, pos, target)``, the
``top_k`` terms of largest ``|value|`` (and of those only the ones with ``|value| >= min_abs``;
``min_abs`` alone keeps every term that large), every constant (bias) term, and ONE remainder
per ``(kind, layer)`` group of the terms it dropped: a component of kind ``"rest"`` printed
``"L3.heads (rest)"`` / ``"L3.neurons (rest)"`` / ``"embed (rest)"``, whose ``layer`` is the
group's and whose ``of`` names the kind it sums. So every total is still the logit: the kept
terms are the dense terms bit for bit, each remainder is the sum of the dense terms it replaces.

**Layout (slots).** The kept components differ per ``(batch, pos, target)``, so a sparse
:class:`~tlprisms.Decomposition` stores ``values[B, P, K, S]`` with
``index[B, P, K, S]``: slot ``s`` holds the term of component ``index[..., s]`` of
``components`` (-1: an empty slot, value 0). Slots are ``[kept terms, largest |value| first |
constants | one remainder per group]``. ``components`` is every component of the dense result
plus the remainders, so labels, ``select``, ``aggregate`` and ``to_frame`` keep working;
``to_frame`` lists only the kept terms; ``to_dense()`` gives the usual layout over the union
of kept components. This layout is bounded by ``B * P * K * (top_k + constants + groups)``
whatever the context length (a union-with-zeros layout would grow with the number of
distinct components kept anywhere, tens of thousands at 2,048 tokens).

**Chunks.** :func:`chunked_split` computes the dense terms of a chunk of explained positions
at a time (its size set so the dense block stays under :data:`CHUNK_BYTES`), reduces the chunk
with :func:`sparsify`, and writes the slots into a preallocated result: the dense
``[pos, components]`` block of all positions never exists.

To give a new prism ``top_k``: compute its dense terms ``[B, P, K, C]`` per chunk, then
``groups = remainder_groups(table)``, ``sparsify(values, groups, top_k, min_abs)`` and
``extend(table, groups)`` for the labels (what :func:`sparse_result` does for a whole block).
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
from beartype import beartype
from jaxtyping import Float, Int, jaxtyped
from torch import Tensor

from tlprisms._core import arguments as check_arg
from tlprisms._core.engine import Readout, Split, split_writes, writes_table
from tlprisms._core.errors import ArgumentError
from tlprisms._core.table import KINDS, ComponentTable

__all__ = [
    "CHUNK_BYTES",
    "CHUNK_BYTES_CUDA",
    "Groups",
    "SparseTerms",
    "remainder_groups",
    "extend",
    "sparsify",
    "sparse_result",
    "chunked_split",
    "check_sparse_args",
    "scatter_slots",
    "component_row",
    "subset_slots",
    "used_components",
    "regroup_slots",
]

#: the most bytes of dense terms one chunk of explained positions may hold
CHUNK_BYTES = 32 * 2**20
#: the same on a GPU, where each chunk's fixed cost (a few dozen kernel launches per layer)
#: dominates small chunks and memory is plentiful
CHUNK_BYTES_CUDA = 256 * 2**20


def check_sparse_args(
    top_k: Any, min_abs: Any, caller: str
) -> tuple[Optional[int], Optional[float]]:
    """``top_k`` (an int >= 1 or None) and ``min_abs`` (a number >= 0 or None), checked."""
    if top_k is not None and not check_arg.is_index(top_k):
        raise ArgumentError(
            f"{caller}: top_k={top_k!r} (type {type(top_k).__name__}); pass a whole number of "
            "terms to keep per explained value (e.g. top_k=32), or None for every term."
        )
    if top_k is not None and int(top_k) < 1:
        raise ArgumentError(
            f"{caller}: top_k={int(top_k)}; keep at least 1 term (top_k=1 or more), or pass "
            "None for every term."
        )
    if min_abs is not None and (
        not check_arg.is_real(min_abs) or not (float(min_abs) >= 0 and np.isfinite(float(min_abs)))
    ):
        raise ArgumentError(
            f"{caller}: min_abs={min_abs!r}; pass a finite number >= 0 (terms with a smaller "
            "|value| go into their layer's remainder), or None."
        )
    return (None if top_k is None else int(top_k)), (None if min_abs is None else float(min_abs))


@dataclass(frozen=True)
class Groups:
    """The remainder groups of a component table: one per ``(kind, layer)`` of its
    non-constant components, in first-appearance order.

    Attributes:
        table: the remainders' labels (kind ``"rest"``).
        const: column indices of the constant components (always kept).
        free: True for every column that may be dropped.
        order: a column permutation that makes every group contiguous (None: already so).
        bounds: ``(start, end)`` of each group in the (permuted) columns.
    """

    table: ComponentTable
    const: np.ndarray
    free: np.ndarray
    order: Optional[np.ndarray]
    bounds: list

    def __len__(self) -> int:
        return len(self.bounds)


def remainder_groups(table: ComponentTable) -> Groups:
    """The ``(kind, layer)`` groups of ``table``'s non-constant components."""
    const_mask = table.is_constant() | (table.kind == KINDS.index("rest"))
    free_idx = np.nonzero(~const_mask)[0]
    keys = table.group_keys(free_idx)  # (kind, layer); QK pairs: both sides' kind, layer
    uniq, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    order_g = np.argsort(first, kind="stable")  # first-appearance order of the groups
    rank = np.empty_like(order_g)
    rank[order_g] = np.arange(len(order_g))
    gid = rank[inverse.reshape(-1)]
    perm = free_idx[np.argsort(gid, kind="stable")]
    counts = np.bincount(gid, minlength=len(uniq)).astype(np.int64)
    ends = np.cumsum(counts)
    starts = ends - counts
    # is every group one column range of the table itself? (true for split_writes' tables)
    contiguous = all(
        int(perm[e - 1]) - int(perm[s]) == e - 1 - s for s, e in zip(starts, ends) if e > s
    )
    if contiguous:
        bounds = [(int(perm[s]), int(perm[s]) + int(c)) for s, c in zip(starts, counts)]
        order = None
    else:
        bounds = [(int(s), int(e)) for s, e in zip(starts, ends)]
        order = perm
    rep = free_idx[first[order_g]]
    rest = table.remainders(rep)  # "L3.heads (rest)"; QK pairs: "q:L3.heads x k:embed (rest)"
    return Groups(
        table=rest, const=np.nonzero(const_mask)[0], free=~const_mask, order=order, bounds=bounds
    )


def extend(table: ComponentTable, groups: Groups) -> ComponentTable:
    """``table`` followed by the remainder components (what a sparse result's slots index)."""
    return table.append(groups.table)  # QK pairs keep their two sides


@jaxtyped(typechecker=beartype)
@dataclass(frozen=True)
class SparseTerms:
    """Slots of a sparse chunk: ``values[B, P, K, S]`` are the terms of components
    ``index[B, P, K, S]`` of the extended table (-1: empty slot, value 0)."""

    values: Float[Tensor, "batch pos k slot"]
    index: Int[Tensor, "batch pos k slot"]


def sparsify(
    values: Float[Tensor, "batch pos k comp"],
    groups: Groups,
    top_k: Optional[int],
    min_abs: Optional[float],
    inplace: bool = False,
) -> SparseTerms:
    """Keep the ``top_k`` largest ``|terms|`` (those ``>= min_abs``) of every ``(b, p, k)``,
    every constant, and one remainder per group: the sum of the terms dropped from it.

    ``values`` is a chunk of dense terms labelled by the table ``groups`` was made from;
    remainder ``g`` is column ``C + g`` of :func:`extend`'s table. ``inplace``: ``values``
    may be overwritten (a chunk nobody else holds), which saves a copy."""
    B, P, K, C = values.shape
    dev = values.device
    const = torch.as_tensor(groups.const, dtype=torch.long, device=dev)
    n_free = int(groups.free.sum())
    score = values.abs().index_fill_(-1, const, -1.0)  # constants are never candidates
    kk = n_free if top_k is None else min(top_k, n_free)
    if min_abs is not None and kk > 0:
        kk = min(kk, int((score >= min_abs).sum(-1).max()))
    top, idx = score.topk(kk, dim=-1, sorted=True)
    del score
    keep = top >= (0.0 if min_abs is None else min_abs)
    picked = values.gather(-1, idx)
    const_values = values.index_select(-1, const)
    # zero the kept terms (a slot not kept writes its own value back): the group sums are
    # then the sums of the dropped terms
    dropped = values if inplace else values.clone()
    dropped.scatter_(-1, idx, torch.where(keep, torch.zeros_like(picked), picked))
    if groups.order is not None:
        dropped = dropped.index_select(-1, torch.as_tensor(groups.order, device=dev))
    rest = torch.empty(B, P, K, len(groups), dtype=values.dtype, device=dev)
    for g, (s, e) in enumerate(groups.bounds):
        rest[..., g] = dropped[..., s:e].sum(-1)
    del dropped
    n_c, G = len(groups.const), len(groups)
    S = kk + n_c + G
    out_v = torch.empty(B, P, K, S, dtype=values.dtype, device=dev)
    out_i = torch.empty(B, P, K, S, dtype=torch.long, device=dev)
    out_v[..., :kk] = torch.where(keep, picked, torch.zeros_like(picked))
    out_i[..., :kk] = torch.where(keep, idx, torch.full_like(idx, -1))
    out_v[..., kk : kk + n_c] = const_values
    out_i[..., kk : kk + n_c] = const
    out_v[..., kk + n_c :] = rest
    out_i[..., kk + n_c :] = torch.arange(C, C + G, device=dev)
    return SparseTerms(values=out_v, index=out_i)


def sparse_result(
    values: Float[Tensor, "batch pos k comp"],
    table: ComponentTable,
    top_k: Optional[int],
    min_abs: Optional[float],
) -> tuple[SparseTerms, ComponentTable]:
    """A whole dense block made sparse: the slots and the extended table they index."""
    groups = remainder_groups(table)
    return sparsify(values, groups, top_k, min_abs), extend(table, groups)


def _slice_readout(r: Readout, s: int, e: int) -> Readout:
    return Readout(
        u=r.u if r.u.shape[1] == 1 else r.u[:, s:e],
        inv_s=r.inv_s[:, s:e],
        positions=r.positions[:, s:e],
        attn_layers=r.attn_layers,
        mlp_layers=r.mlp_layers,
    )


def _pos_slice(t: Tensor, s: int, e: int) -> Tensor:
    return t if t.shape[1] == 1 else t[:, s:e]


def chunked_split(
    cv: Any,
    readout: Readout,
    split: Split,
    extra: Sequence[tuple[Tensor, ComponentTable]],
    finish: Callable[[Tensor, int, int, Tensor], Tensor],
    top_k: Optional[int],
    min_abs: Optional[float],
    chunk: Optional[int] = None,
) -> tuple[SparseTerms, ComponentTable]:
    """:func:`~tlprisms._core.engine.split_writes` over chunks of explained positions, each chunk
    turned into target terms by ``finish(atom_terms, start, end, layer_gap)`` (which weighs
    and checks it) and then made sparse; the slots are assembled into one result.

    ``chunk`` positions per step (default: as many as keep the dense block under
    :data:`CHUNK_BYTES`)."""
    B, P = readout.positions.shape
    K = readout.u.shape[2]
    table = writes_table(cv, readout, split, [t for _, t in extra])
    groups = remainder_groups(table)
    if chunk is None:
        per_pos = B * K * len(table) * readout.u.element_size()
        budget = CHUNK_BYTES_CUDA if readout.u.device.type == "cuda" else CHUNK_BYTES
        chunk = max(1, min(P, budget // max(per_pos, 1)))
    pieces: list[SparseTerms] = []
    for s in range(0, P, chunk):
        e = min(P, s + chunk)
        ex_chunk = [(_pos_slice(v, s, e), t) for v, t in extra]
        terms = split_writes(cv, _slice_readout(readout, s, e), split, extra=ex_chunk)
        values = finish(terms.values, s, e, terms.layer_gap)
        del terms
        pieces.append(sparsify(values, groups, top_k, min_abs, inplace=True))
        del values
    S = max(p.values.shape[-1] for p in pieces)
    k_out = pieces[0].values.shape[2]
    v0 = pieces[0].values
    out_v = torch.zeros(B, P, k_out, S, dtype=v0.dtype, device=v0.device)
    out_i = torch.full((B, P, k_out, S), -1, dtype=torch.long, device=v0.device)
    s = 0
    for p in pieces:  # widths differ only with min_abs: the padding is empty slots
        e, w = s + p.values.shape[1], p.values.shape[-1]
        n_tail = len(groups.const) + len(groups)
        out_v[:, s:e, :, : w - n_tail] = p.values[..., : w - n_tail]
        out_i[:, s:e, :, : w - n_tail] = p.index[..., : w - n_tail]
        out_v[:, s:e, :, S - n_tail :] = p.values[..., w - n_tail :]
        out_i[:, s:e, :, S - n_tail :] = p.index[..., w - n_tail :]
        s = e
    return SparseTerms(values=out_v, index=out_i), extend(table, groups)


# ----------------------------------------------------------------------------- slot algebra
# What a sparse Decomposition's methods compute on its slots (``values``, ``index``), as
# functions of tensors: the result type (tlprisms._core.result) builds on them.
def scatter_slots(values: Tensor, index: Tensor, n: int) -> Tensor:
    """Slots ``[..., S]`` -> dense ``[..., n]`` over the ``n`` components (empty slots
    dropped)."""
    out = torch.zeros(*values.shape[:-1], n + 1, dtype=values.dtype, device=values.device)
    out.scatter_add_(-1, torch.where(index >= 0, index, torch.full_like(index, n)), values)
    return out[..., :n]


def component_row(
    values: Tensor,
    index: Tensor,
    n: int,
    target: int,
    batch: Optional[int],
    pos: Optional[int],
) -> Tensor:
    """The terms of one target as a dense vector over the ``n`` components ``[1, 1, n]``: at
    one ``(batch, pos)`` or averaged over the ones not given (a component not kept counts 0)."""
    v, i = values[..., target, :], index[..., target, :]
    if batch is not None:
        v, i = v[batch : batch + 1], i[batch : batch + 1]
    if pos is not None:
        v, i = v[:, pos : pos + 1], i[:, pos : pos + 1]
    flat_i = i.reshape(-1)
    flat_v = v.reshape(-1)
    row = torch.zeros(n + 1, dtype=v.dtype, device=v.device)
    row.index_add_(0, torch.where(flat_i >= 0, flat_i, torch.full_like(flat_i, n)), flat_v)
    count = v.shape[0] * v.shape[1]
    return (row[:n] / count)[None, None]


def subset_slots(values: Tensor, index: Tensor, keep: np.ndarray) -> tuple[Tensor, Tensor]:
    """The slots whose component is kept (``keep`` over the components), re-indexed into
    the kept components; the others become empty slots."""
    n = len(keep)
    idx = np.nonzero(keep)[0]
    new_of_old = np.full(n + 1, -1, dtype=np.int64)
    new_of_old[idx] = np.arange(len(idx))
    remap = torch.as_tensor(new_of_old, device=index.device)
    new_index = remap[torch.where(index >= 0, index, torch.full_like(index, n))]
    return torch.where(new_index >= 0, values, torch.zeros_like(values)), new_index


def used_components(index: Tensor, n: int) -> np.ndarray:
    """True for each of the ``n`` components that some slot holds."""
    used = torch.unique(index[index >= 0]).cpu().numpy()
    return np.isin(np.arange(n), used)


def regroup_slots(
    values: Tensor, index: Tensor, n: int, group: np.ndarray, G: int
) -> tuple[Tensor, Optional[Tensor]]:
    """Sum the slots by ``group[component]`` (over ``n`` components) into ``G`` new
    components: dense (index None) when that is no wider than the slots, else slots again
    (one per group met, summed)."""
    g = torch.as_tensor(np.append(group, -1), dtype=torch.long, device=index.device)
    gi = g[torch.where(index >= 0, index, torch.full_like(index, n))]
    if G <= values.shape[-1]:
        out = torch.zeros(*values.shape[:-1], G + 1, dtype=values.dtype, device=values.device)
        out.scatter_add_(-1, torch.where(gi >= 0, gi, torch.full_like(gi, G)), values)
        return out[..., :G], None
    # sort each row's slots by group, sum runs of one group into the run's first slot
    key = torch.where(gi >= 0, gi, torch.full_like(gi, G))
    key, order = key.sort(dim=-1, stable=True)
    vals = values.gather(-1, order)
    starts = torch.ones_like(key, dtype=torch.bool)
    starts[..., 1:] = key[..., 1:] != key[..., :-1]
    run = starts.long().cumsum(-1) - 1
    out_v = torch.zeros_like(vals).scatter_add_(-1, run, vals)
    out_i = torch.full_like(key, -1).scatter_(-1, run, key)
    out_i = torch.where(out_i >= G, torch.full_like(out_i, -1), out_i)
    out_v = torch.where(out_i >= 0, out_v, torch.zeros_like(out_v))
    return out_v, out_i
