"""Verification of attention-score (QK) results by intervention.

A QK term of head ``(l, h)`` at query ``i`` and key ``j`` is one pair ``(a, b)``: the part
``(R_i Q_a) . (R_j K_b) c`` of the score that query-side writer ``a`` (its write at ``i``)
and key-side writer ``b`` (its write at ``j``) make together, with ln1's scale (and the
query/key norms' scales) frozen. The model checks it in frozen forward passes
(:func:`tlprisms._seam.run_frozen` measuring the head's pre-softmax scores, every other
layer output, norm scale and hop pattern held as for the logit prisms):

==========  ===================================================================================
copy        what it runs
==========  ===================================================================================
``A_a``     ``a``'s write removed at ``i``, every key taken from the clean copy: the score
            moves by ``-Q_a . K`` (the sum of ``a``'s row of terms)
``B_b,j``   ``b``'s write removed at ``j``, every query taken from the clean copy: the score
            at ``j`` moves by ``-Q . K_b`` (the sum of ``b``'s column)
``AB``      nothing removed; queries taken from ``A_a``, keys from ``B_b,j``: the score moves
            by ``-Q_a.K - Q.K_b + Q_a.K_b``
==========  ===================================================================================

So a pair's term is measured by the second difference ``AB - A - B`` (bilinearity), a
``sides="query"`` term ``(a, whole)`` by ``A`` alone and a ``sides="key"`` term by ``B``
alone. A complete result also checks the row of every query-side writer it checked (``q:a
x k:whole``, the sum of its terms against every key-side item, constants included) and the
column of every key-side writer: a pair with one constant side (``b_Q``, ``b_K``, ln1's bias)
has no write to remove, but its row or column does. Constant pairs (``b_Q x b_K``, ALiBi)
are named in the certificate; the sum check covers them. A soft-capped score is measured
post-cap and taken back through ``cap * atanh(s / cap)``; a ``"post"`` result's terms carry
the frozen ratio ``rho`` of the clean score, and so does the measured change.

A chain through one side (``qk(..., sides="query", path=...)``) is measured as the logit
chains are: the term's write removed, only the path's hops passing the change on, and the
other side's queries or keys taken from the clean copy.

Before the interventions the model's layer is probed (:func:`tlprisms._seam.score_problem`):
it must record the scores it uses and honour edits of its queries and keys; a model where it
does not (a TransformerLens bridge whose attention is Hugging Face's own function records
the softmaxed weights in ``hook_attn_scores``) is refused, naming why.
"""

from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from tlprisms._causal.certificate import Verification
from tlprisms._causal.removals import (
    VERIFY_FACTOR,
    WRITERS,
    bias_removable,
    check_rerun,
    checkable,
    hops_of,
    removal_of,
    select_terms,
)
from tlprisms._core.errors import ArgumentError, UnsupportedModelError
from tlprisms._core.readout import Recorded, softcap_ratio
from tlprisms._core.result import Decomposition, tolerance
from tlprisms._core.table import ComponentTable
from tlprisms._prisms.chain import limit_at_zero
from tlprisms._prisms.qk import unmasked_keys
from tlprisms._prisms.qk_table import PairTable
from tlprisms._seam import COPY_TOKENS, CacheView, Copy, Removal, Site, run_frozen
from tlprisms._seam._interventions import score_problem

__all__ = ["verify_qk", "ATANH_MARGIN"]

#: a soft-capped score ``s`` is taken back to its pre-cap value through ``cap * atanh(s /
#: cap)`` with ``|s / cap|`` clipped below 1 by this margin (the model's own tanh saturates)
ATANH_MARGIN = 1e-7

#: a side of a pair: kept whole, a write that can be removed, anything else
_WHOLE, _WRITER, _FIXED = 0, 1, 2
_LAYERED = ("attn", "head", "mlp", "neuron", "b_O", "b_out")


def _sides(view: Any, table: ComponentTable, layer: int) -> np.ndarray:
    """Per side label: :data:`_WHOLE`, :data:`_WRITER` (its write at the read position can
    be removed) or :data:`_FIXED` (a constant, a sum over layers, a remainder...)."""
    kinds = table.kinds()
    out = np.full(len(table), _FIXED, dtype=np.int8)
    writer = np.isin(kinds, WRITERS)
    layered = np.isin(kinds, _LAYERED)
    writer &= ~(layered & ((table.layer < 0) | (table.layer >= layer)))
    # a source summed over heads has no one head's values to zero
    writer &= ~((kinds == "head") & (table.head < 0) & (table.src >= 0))
    if view.shortformer:  # added to the query/key inputs after ln1: not a write of the stream
        writer &= kinds != "pos_embed"
    for n in np.nonzero(writer & np.isin(kinds, ("b_O", "b_out")))[0]:
        writer[n] = bias_removable(view, str(kinds[n]), int(table.layer[n]))
    out[writer] = _WRITER
    out[kinds == "resid"] = _WHOLE
    return out


class _Scores:
    """How a measured score becomes the explained quantity's change: pre-cap scores (a
    soft-capped score taken back through atanh), times the clean score's frozen ratio for a
    ``"post"`` result."""

    def __init__(self, cap: Optional[float], post: bool) -> None:
        self.cap, self.post = cap, post

    def pre(self, s: Tensor) -> Tensor:
        s = s.double()
        if self.cap is None:
            return s
        r = (s / self.cap).clamp(-1 + ATANH_MARGIN, 1 - ATANH_MARGIN)
        return self.cap * torch.atanh(r)

    def change(self, mine: Tensor, clean: Tensor) -> tuple[Tensor, Tensor]:
        """``(d, rho)``: the pre-cap change of every score of a row and its frozen ratio."""
        z0 = self.pre(clean)
        d = self.pre(mine) - z0
        rho = softcap_ratio(z0, self.cap) if self.cap is not None and self.post else d * 0 + 1
        return d, rho


class _Runs:
    """The copies of one verification, run a pass at a time; each copy's measured row of
    scores at the query position (and its clean copy's), by the copy's key."""

    def __init__(
        self,
        rec: Recorded,
        tokens: Tensor,
        mask: Optional[Tensor],
        where: tuple[int, int, int],
        keys: list[int],
        caller: str,
    ) -> None:
        cv: CacheView = rec.cache
        self.cv, self.tokens, self.mask, self.caller = cv, tokens, mask, caller
        self.where, self.keys = where, keys
        self.per_pass = max(3, COPY_TOKENS // cv.n_ctx)
        self.pending: list[tuple[Any, Copy]] = []
        self.index: dict[Any, int] = {}
        self.rows: dict[Any, tuple[Tensor, Tensor]] = {}
        self.passes = 0

    def need(self, items: list[tuple[Any, Any]]) -> None:
        """Queue the copies ``(key, make)`` of one check, the copies another refers to
        first (``make(index)`` builds a copy from the indices of the copies of this pass);
        a full pass is run first."""
        new = [key for key, _ in items if key not in self.index]
        rows = {c.row for _, c in self.pending}
        if self.pending and len(self.pending) + len(new) + len(rows) + 1 > self.per_pass:
            self.flush()
        for key, make in items:
            if key not in self.index:
                self.index[key] = len(self.pending)
                self.pending.append((key, make(self.index)))

    def flush(self) -> None:
        if not self.pending:
            return
        cv = self.cv
        view = cv.view
        layer, head, i = self.where
        copies = [c for _, c in self.pending]
        gate = lambda pre: limit_at_zero(str(view.act_fn), pre)
        mine, clean = run_frozen(
            view, self.tokens, copies, Site.ATTN_SCORES, layer, gate, self.mask, head=head
        )
        self.passes += 1
        if cv.has(Site.ATTN_SCORES, layer):  # the clean copies reproduce the recorded scores
            rows = torch.as_tensor([c.row for c in copies])
            recorded = cv.cache[view.hook(Site.ATTN_SCORES, layer)]
            want = recorded[rows.to(recorded.device), head, i][:, self.keys]
            got = clean[:, i][:, self.keys]
            check_rerun(cv, got, want, f"L{layer}H{head}'s scores at query {i}", self.caller)
        for (key, _), x1, x0 in zip(self.pending, mine, clean):
            self.rows[key] = (x1[i], x0[i])
        self.pending, self.index = [], {}


def _reads(result: Decomposition, keys: list, contrast: bool, caller: str) -> list[tuple]:
    """Per target, the ``(key, sign)`` scores it is made of."""
    K = result.values.shape[2]
    reads: list[tuple]
    if contrast:
        reads = [((keys[0], 1.0), (keys[1], -1.0))] if len(keys) == 2 else []
    else:
        reads = [((j, 1.0),) for j in keys]
    if len(reads) != K or result.values.shape[1] != 1:
        raise ArgumentError(
            f"{caller}: the result's {K} targets do not match the keys of its request "
            f"({keys}); verify a QK result as prism.qk returned it (or a selection or "
            "aggregate of it)."
        )
    return reads


def verify_qk(
    rec: Recorded,
    result: Decomposition,
    tokens: Tensor,
    mask: Optional[Tensor],
    k: int,
    sample: int,
    seed: int,
    caller: str,
) -> Verification:
    """Verify a result of ``prism.qk`` (module docstring)."""
    cv: CacheView = rec.cache
    view = cv.view
    req = result.request
    if req is None:  # the caller dispatched on it
        raise ArgumentError(f"{caller}: the result carries no request; verify what prism.qk made.")
    layer, head, i = int(req.layer), int(req.head), int(req.pos)
    problem = score_problem(view, tokens, layer)
    if problem is not None:
        raise UnsupportedModelError(
            f"{caller}: {result.prism} cannot be verified by intervention on this model "
            f"({view.describe()}): {problem}. The terms still add up to the score they "
            "explain (Decomposition.check()); the logit prisms' results can be verified."
        )
    keys = unmasked_keys(cv, layer, head, i, list(req.keys), bool(req.contrast))
    reads = _reads(result, keys, bool(req.contrast), caller)
    scores = _Scores(view.attn_softcap(layer), req.softcap == "post")
    used = sorted({j for r in reads for j, _ in r})
    runs = _Runs(rec, tokens, mask, (layer, head, i), used, caller)
    if req.path:
        return _verify_chain(rec, result, runs, scores, reads, k, sample, seed)
    return _verify_pairs(rec, result, runs, scores, reads, k, sample, seed)


def _embeddings(cv: CacheView) -> tuple[Tensor, Optional[Tensor]]:
    B = cv.batch
    embed = cv.embed_write(torch.arange(cv.n_ctx, device=cv.device).expand(B, cv.n_ctx), cv.dtype)
    pos = cv.get(Site.POS_EMBED).expand(B, -1, -1) if cv.view.pos_embed_in_resid else None
    return embed, pos


def _measured(runs: _Runs, scores: _Scores, parts: list, reads: tuple) -> Tensor:
    """``sum_reads sign * rho_j * sum_parts weight * d_copy(j)``: the explained value's
    change (``parts``: ``(weight, key of the copy per key position)``)."""
    total = torch.zeros((), dtype=torch.float64)
    for j, sign in reads:
        for weight, key_of in parts:
            x1, x0 = runs.rows[key_of(j)]
            d, rho = scores.change(x1[j], x0[j])
            total = total + sign * weight * float(rho) * d.cpu()
    return total


def _finish(
    result: Decomposition,
    bb: np.ndarray,
    tt: np.ndarray,
    terms: Tensor,
    measured: Tensor,
    components: ComponentTable,
    sampled: Tensor,
    skipped: dict,
    passes: int,
    sums: int = 0,
) -> Verification:
    B, P, K = result.values.shape[:3]
    explained = result.explained.detach().cpu()[bb, 0, tt]
    l1 = torch.linalg.vector_norm(result.values.detach(), 1, -1).cpu()[bb, 0, tt]
    scale = torch.maximum(explained.abs(), l1).clamp(min=1.0)
    bound = VERIFY_FACTOR * tolerance(result.precision, result.n_layers) * scale
    measured = measured.to(terms.dtype)
    error = (terms + measured).abs()
    if result.complete:
        gap = result.gap().abs()
        sum_gap, sum_ok = float(gap.max()), bool((gap <= result.tolerance()).all())
    else:
        sum_gap, sum_ok = float("nan"), True
    labels = np.broadcast_to(result.target_labels, (B, P, K))[bb, 0, tt]
    return Verification(
        ok=bool((error <= bound).all()) and sum_ok and bool(torch.isfinite(measured).all()),
        terms=terms,
        change=measured,
        error=error,
        bound=bound,
        explained=explained,
        batch=torch.as_tensor(bb, dtype=torch.long),
        pos=result.positions.cpu()[bb, 0].long(),
        target=torch.as_tensor(tt, dtype=torch.long),
        components=components,
        sampled=sampled,
        target_labels=np.asarray(labels),
        skipped=skipped,
        sum_gap=sum_gap,
        sum_ok=sum_ok,
        explains=result.explains,
        prism=result.prism,
        forward_passes=passes,
        sums_checked=sums,
    )


# ----------------------------------------------------------------------------- pairs
def _verify_pairs(
    rec: Recorded,
    result: Decomposition,
    runs: _Runs,
    scores: _Scores,
    reads: list,
    k: int,
    sample: int,
    seed: int,
) -> Verification:
    cv = rec.cache
    view = cv.view
    table = result.components
    if not isinstance(table, PairTable):
        raise ArgumentError(
            f"{runs.caller}: the result of {result.prism!r} has no (query, key) pairs; verify "
            "a QK result as prism.qk returned it (or a selection or aggregate of it)."
        )
    layer, head, i = runs.where
    qs, ks = _sides(view, table.q, layer), _sides(view, table.k, layer)
    q_of, k_of = qs[table.qi], ks[table.ki]
    rest = table.rest()
    pair = (q_of == _WRITER) & (k_of == _WRITER) & ~rest
    query = (q_of == _WRITER) & (k_of == _WHOLE) & ~rest
    key = (q_of == _WHOLE) & (k_of == _WRITER) & ~rest
    checked = pair | query | key
    skipped: dict = {}
    const = table.is_constant() & ~checked
    one_fixed = ~checked & ~rest & ~const & ((q_of != _FIXED) | (k_of != _FIXED))
    if one_fixed.any():
        names = sorted(
            set(table.q.kinds()[table.qi[one_fixed & (q_of == _FIXED)]].tolist())
            | set(table.k.kinds()[table.ki[one_fixed & (k_of == _FIXED)]].tolist())
        )
        skipped[
            f"pairs with a side that is no one write ({', '.join(names)}; a checked writer's "
            "row or column sum includes them)"
        ] = int(one_fixed.sum())
    if const.any():
        names = sorted({str(table[int(n)]) for n in np.nonzero(const)[0][:4]})
        skipped[
            f"constant pairs ({', '.join(names)}{', ...' if const.sum() > 4 else ''}: no write "
            "of the forward pass to remove; the sum check covers them)"
        ] = int(const.sum())
    other = ~checked & ~one_fixed & ~const
    if other.any():
        skipped["sums of pairs (remainders, sums over layers: no one write to remove)"] = int(
            other.sum()
        )
    dense, ok = checkable(result, checked)
    top, picked = select_terms(dense, ok, k, sample, seed)
    flat = torch.cat([top, picked])
    B, P, K, C = dense.values.shape
    bb, _, tt, cc = (np.asarray(x) for x in np.unravel_index(flat.numpy(), (B, P, K, C)))
    embed, pos_embed = _embeddings(cv)
    qtab, ktab = table.q, table.k

    def a_copy(b: int, a: int) -> tuple:
        comp = qtab[a]
        r = removal_of(comp.kind, comp, i, b, embed, pos_embed, view, cv)
        return (("A", b, a), lambda idx: Copy(b, r, key_from=-1))

    def b_copy(b: int, kb: int, j: int) -> tuple:
        comp = ktab[kb]
        r = removal_of(comp.kind, comp, j, b, embed, pos_embed, view, cv)
        return (("B", b, kb, j), lambda idx: Copy(b, r, query_from=-1))

    def ab_copy(b: int, a: int, kb: int, j: int) -> tuple:
        none = Removal("none", -1, 0)

        def make(idx: dict) -> Copy:
            return Copy(b, none, query_from=idx[("A", b, a)], key_from=idx[("B", b, kb, j)])

        return (("AB", b, a, kb, j), make)

    # the checks: (b, t, a or -1, kb or -1); a complete result adds rows and columns
    checks = [
        (int(b), int(t), int(table.qi[c]) if q_of[c] == _WRITER else -1,
         int(table.ki[c]) if k_of[c] == _WRITER else -1)
        for b, t, c in zip(bb, tt, cc)
    ]  # fmt: skip
    sums: list = []
    if result.complete and not rest.any():
        seen = set()
        for b, t, a, kb in checks:
            if a >= 0 and kb >= 0:
                for s in ((b, t, a, -1), (b, t, -1, kb)):
                    if s not in seen:
                        seen.add(s)
                        sums.append(s)
    for b, t, a, kb in checks + sums:
        need: list = []
        for j, _ in reads[t]:
            if a >= 0:
                need.append(a_copy(b, a))
            if kb >= 0:
                need.append(b_copy(b, kb, j))
            if a >= 0 and kb >= 0:
                need.append(ab_copy(b, a, kb, j))
        runs.need(need)
    runs.flush()
    measured = []
    for b, t, a, kb in checks + sums:
        parts: list = []
        if a >= 0 and kb >= 0:
            parts = [
                (1.0, lambda j, b=b, a=a, kb=kb: ("AB", b, a, kb, j)),
                (-1.0, lambda j, b=b, a=a: ("A", b, a)),
                (-1.0, lambda j, b=b, kb=kb: ("B", b, kb, j)),
            ]
            # the second difference measures +term: its negative is the removal's change
            measured.append(-_measured(runs, scores, parts, reads[t]))
            continue
        if a >= 0:
            parts = [(1.0, lambda j, b=b, a=a: ("A", b, a))]
        else:
            parts = [(1.0, lambda j, b=b, kb=kb: ("B", b, kb, j))]
        measured.append(_measured(runs, scores, parts, reads[t]))
    values = dense.values.detach().cpu()
    terms = [values[b, 0, t, c] for b, t, c in zip(bb, tt, cc)]
    for b, t, a, kb in sums:
        cols = (table.qi == a) if a >= 0 else (table.ki == kb)
        terms.append(values[b, 0, t, torch.as_tensor(np.nonzero(cols)[0])].sum())
    n_q, n_k = len(qtab), len(ktab)
    whole = ComponentTable.block("resid")
    labels = PairTable.make(
        ComponentTable.concat([qtab, whole]),
        ComponentTable.concat([ktab, whole]),
        np.array(
            [table.qi[c] for c in cc] + [a if a >= 0 else n_q for _, _, a, _ in sums], np.int32
        ),
        np.array(
            [table.ki[c] for c in cc] + [kb if kb >= 0 else n_k for _, _, _, kb in sums], np.int32
        ),
    )
    n = len(cc) + len(sums)
    return _finish(
        result,
        np.concatenate([bb, np.array([s[0] for s in sums], dtype=np.int64)]).astype(np.int64),
        np.concatenate([tt, np.array([s[1] for s in sums], dtype=np.int64)]).astype(np.int64),
        torch.stack(terms) if n else torch.zeros(0),
        torch.stack(measured) if n else torch.zeros(0),
        labels,
        (torch.arange(n) >= top.numel()) & (torch.arange(n) < len(cc)),
        skipped,
        runs.passes,
        sums=len(sums),
    )


# ----------------------------------------------------------------------------- chains
def _verify_chain(
    rec: Recorded,
    result: Decomposition,
    runs: _Runs,
    scores: _Scores,
    reads: list,
    k: int,
    sample: int,
    seed: int,
) -> Verification:
    cv = rec.cache
    view = cv.view
    req = result.request
    if req is None:
        raise ArgumentError(f"{runs.caller}: the result carries no request.")
    comps = result.components
    path = tuple((h.kind, h.layer, h.index, h.src) for h in req.path)
    if any(kind not in ("head", "neuron") for kind, _, _, _ in path):
        raise ArgumentError(
            f"{runs.caller}: cannot verify a QK chain through {result.prism!r} (a feature "
            "hop); verify the chains through heads and neurons."
        )
    layer, head, i = runs.where
    side = req.sides
    kinds = comps.kinds()
    writer = _sides(view, comps, layer) == _WRITER
    if path[-1][0] == "head" and path[-1][3] is None:
        writer &= comps.at >= 0  # summed over the positions read: no one position to remove
    skipped: dict = {}
    const = comps.is_constant()
    if (const & ~writer).any():
        names = sorted(set(kinds[const & ~writer].tolist()))
        skipped[
            f"constants ({', '.join(names)}: no write of the forward pass to remove; the sum "
            "check covers them)"
        ] = int((const & ~writer).sum())
    sums = ~writer & ~const
    if sums.any():
        skipped["sums over layers or positions (no one write to remove)"] = int(sums.sum())
    dense, ok = checkable(result, writer)
    top, picked = select_terms(dense, ok, k, sample, seed)
    flat = torch.cat([top, picked])
    B, P, K, C = dense.values.shape
    bb, _, tt, cc = (np.asarray(x) for x in np.unravel_index(flat.numpy(), (B, P, K, C)))
    embed, pos_embed = _embeddings(cv)
    table = dense.components

    def copy_of(b: int, c: int, start: int) -> tuple:
        comp = table[c]

        def patterns(ly: int, hd: int, out: int) -> Tensor:
            return cv.get(Site.PATTERN, ly)[b, hd, out].detach()

        hops, at = hops_of(path, start, int(comp.at), patterns)
        r = removal_of(comp.kind, comp, at, b, embed, pos_embed, view, cv)
        if side == "query":
            return (("C", b, c, start), lambda idx: Copy(b, r, hops, key_from=-1))
        return (("C", b, c, start), lambda idx: Copy(b, r, hops, query_from=-1))

    def start_of(j: int) -> int:
        return i if side == "query" else j

    for b, t, c in zip(bb.tolist(), tt.tolist(), cc.tolist()):
        runs.need([copy_of(b, c, start_of(j)) for j, _ in reads[t]])
    runs.flush()
    measured = [
        _measured(runs, scores, [(1.0, lambda j, b=b, c=c: ("C", b, c, start_of(j)))], reads[t])
        for b, t, c in zip(bb.tolist(), tt.tolist(), cc.tolist())
    ]
    values = dense.values.detach().cpu()
    terms = [values[b, 0, t, c] for b, t, c in zip(bb, tt, cc)]
    n = len(cc)
    return _finish(
        result,
        bb.astype(np.int64),
        tt.astype(np.int64),
        torch.stack(terms) if n else torch.zeros(0),
        torch.stack(measured) if n else torch.zeros(0),
        table.take(cc),
        torch.arange(n) >= top.numel(),
        skipped,
        runs.passes,
    )
