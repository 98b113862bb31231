"""Verification by intervention: removing a term's write moves what it explains by the term.

A prism's term for a component is exact *with the cache's non-linear values held fixed*. This
module checks that claim on the model itself. For a term ``T`` of component ``c`` at batch row
``b``, explained position ``i`` and target ``t``, it runs the model on row ``b`` with hooks
that hold fixed what the prism holds fixed (every norm scale: ``ln1``, ``ln2``, their
post-norms, SoLU's inner norm, ``ln_final``; every attention pattern; along a chain, each
neuron's activation gate) and with the output of every layer that is not ``c``'s and not on
the chain's path held at its clean value, so that only ``c``'s path to the readout is open.
Then it removes ``c``'s write:

==============  ==============================================================================
``embed``       its write subtracted from the residual stream at its position, before layer 0
``pos_embed``   the same
``head``        its pattern entry ``A[h, at, src]`` (all sources when summed) set to 0
``attn``        every head's pattern row at the position set to 0 (``b_O`` stays)
``neuron``      its activation ``post[at, n]`` set to 0 (``b_out`` stays)
``mlp``         every activation at the position set to 0
==============  ==============================================================================

and measures the change ``D`` of the explained value (the final residual stream's change read
through the frozen readout: the logit, pre- or post-soft-cap as ``result.explains`` says, a
logit difference, a direction, or a residual readout). Exactness means ``D = -T``; the error
``|T + D|`` must stay within :data:`VERIFY_FACTOR` times the result's completeness tolerance.
A chained term (``through_head``, ``through_neuron``, ``chain``) is measured along its path:
each hop passes on only its own head's ``z`` (or neuron's activation) at the position it
writes, and after a hop's layer the stream is the clean stream plus that hop's write.

Constant terms (biases) are not intervened on: they do not depend on any write of the forward
pass. The sum check (terms + constants = explained value) covers them.

All interventions of one call run as copies of their input rows stacked along the batch axis,
:data:`tlprisms._seam.COPY_TOKENS` tokens per forward pass.
"""

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from tlprisms._causal.certificate import Verification
from tlprisms._core import arguments as check
from tlprisms._core.errors import ArgumentError, TargetError
from tlprisms._core.readout import Recorded, Softcap, explain, final_readout
from tlprisms._core.result import Decomposition, tolerance
from tlprisms._core.table import KINDS
from tlprisms._prisms.chain import limit_at_zero
from tlprisms._prisms.read import READ_AT
from tlprisms._seam import (
    COPY_TOKENS,
    CacheView,
    Copy,
    Removal,
    Site,
    Through,
    run_frozen,
)

__all__ = ["Verification", "verify", "VERIFY_FACTOR", "WRITERS"]

#: an intervention may differ from its term by this many completeness tolerances
#: (``t * max(1, |explained|, sum |terms|)``, ``t`` = 1e-5 in float32): the intervention adds
#: the rounding of one more forward pass and of a difference of two residual streams
VERIFY_FACTOR = 10.0
#: the component kinds verified by removing their write
WRITERS = ("embed", "pos_embed", "attn", "head", "mlp", "neuron")
_DIRECT = ("residual", "heads", "neurons", "full", "decompose")
_CHAINS = ("chain", "through_head", "through_neuron")


# ----------------------------------------------------------------------------- readouts
@dataclass(frozen=True)
class _Measure:
    """How a measured stream change becomes a change of the explained value."""

    u: Tensor  # [rb, rp, ka, d] directions, divided by the frozen scale inv_s [B, P]
    inv_s: Tensor
    weights: Tensor  # [B|1, P|1, k, a]
    site: Site
    layer: Optional[int]
    path: tuple  # of (kind, layer, index, src)

    def change(self, dx: Tensor, b: int, p: int) -> Tensor:
        u = self.u[min(b, self.u.shape[0] - 1), min(p, self.u.shape[1] - 1)]
        atoms = (u @ dx) * self.inv_s[b, p]
        w = self.weights[min(b, self.weights.shape[0] - 1), min(p, self.weights.shape[1] - 1)]
        return (w * atoms.reshape(w.shape)).sum(-1)


def _positions_arg(result: Decomposition, n_ctx: int) -> Any:
    P = result.positions.shape[1]
    if P == 1:
        return result.positions[:, 0].tolist()
    return "all"


def _reread(rec: Recorded, result: Decomposition, target: Any, caller: str) -> _Measure:
    cv: CacheView = rec.cache
    view = cv.view
    request = result.request
    if request is None:
        raise ArgumentError(
            f"{caller}: cannot verify a result of {result.prism!r}: it carries no request "
            "(it was not made by a LogitPrism method); verify what this prism's "
            "residual/heads/neurons/full/decompose, chains and readout return."
        )
    name = request.prism
    if name == "readout":
        at = request.stream
        layer = check.layer(view, request.layer, caller)
        target = request.vector if target is None else target
        if (
            not isinstance(target, Tensor)
            or not target.dtype.is_floating_point
            or target.shape[-1] != view.d_model
            or target.ndim not in (1, 2)
        ):
            raise ArgumentError(
                f"{caller}: a readout result is verified against its vector: "
                "pass prism.verify(result, target=vector), the [d_model] or "
                "[k, d_model] vector given to readout()."
            )
        u = (target[None] if target.ndim == 1 else target).detach().to(cv.device, cv.dtype)
        if u.shape[0] != result.values.shape[2]:
            raise ArgumentError(
                f"{caller}: the result has {result.values.shape[2]} readout "
                f"vectors but target has {u.shape[0]}."
            )
        site = READ_AT[at]
        if view.parallel and site is Site.RESID_MID:
            site = Site.RESID_PRE
        norm = {"ln1": view.ln1[layer], "ln2": view.ln2[layer], "ln_final": view.final_norm}.get(at)
        positions = result.positions.to(cv.device)
        if norm is not None:
            uu, inv = norm.pull_back(u), cv.inv_scale_or_one(norm, positions)
        else:
            uu, inv = u, cv.inv_scale_or_one(None, positions)
        ones = torch.ones(1, 1, u.shape[0], 1, dtype=cv.dtype, device=cv.device)
        return _Measure(uu[None, None], inv, ones, site, layer, ())
    path: tuple = ()
    if request.is_chain and name in _CHAINS:
        if any(h.kind not in ("head", "neuron") for h in request.path):
            raise ArgumentError(
                f"{caller}: cannot verify a chain through {result.prism!r} (a feature hop); "
                "verify the chains through heads and neurons, and the direct prisms."
            )
        path = tuple((h.kind, h.layer, h.index, h.src) for h in request.path)
    elif name not in _DIRECT:
        raise ArgumentError(
            f"{caller}: cannot verify a result of {result.prism!r}; verify what this "
            "prism's residual/heads/neurons/full/decompose, chains and readout "
            "return."
        )
    if target is None:
        target = request.target
    softcap: Softcap = request.softcap
    B, P, K = result.values.shape[:3]
    fr = final_readout(rec, target, _positions_arg(result, cv.n_ctx))
    labels = np.broadcast_to(
        fr.atoms.labels, (B, P if fr.atoms.labels.shape[1] != 1 else 1, fr.atoms.labels.shape[2])
    )
    want = (
        np.broadcast_to(result.target_labels, labels.shape)
        if result.target_labels.ndim == 3 and result.target_labels.shape[2] == labels.shape[2]
        else None
    )
    if (
        want is None
        or not bool(np.all(np.asarray(want) == labels))
        or not torch.equal(fr.readout.positions.cpu(), result.positions.cpu())
    ):
        raise TargetError(
            f"{caller}: target does not match the result: the result explains "
            f"{list(np.unique(result.target_labels))[:4]} at positions "
            f"{result.positions[:, 0].tolist()[:4]}..., the target gives "
            f"{list(np.unique(labels))[:4]}. Pass the target the result was "
            "made for."
        )
    ex = explain(rec, fr, softcap)
    r = fr.readout
    return _Measure(r.u, r.inv_s, ex.weights, Site.FINAL_RESID, None, path)


# ----------------------------------------------------------------------------- selection
def _select(
    result: Decomposition, ok: np.ndarray, k: int, sample: int, seed: int
) -> tuple[Tensor, Tensor]:
    """Flat indices into ``values`` of the ``k`` largest checkable terms and of ``sample``
    others drawn at random (seeded)."""
    values = result.values.detach()
    B = values.shape[0]
    mask = torch.as_tensor(ok, device=values.device)
    per_row = values[0].numel()
    cand_i, cand_v = [], []
    for b in range(B):
        score = torch.where(mask, values[b].abs(), torch.full_like(values[b], -1.0)).reshape(-1)
        n = min(k, per_row)
        v, i = score.topk(n) if n else (score[:0], torch.zeros(0, dtype=torch.long))
        cand_v.append(v)
        cand_i.append(i + b * per_row)
    v, i = torch.cat(cand_v), torch.cat(cand_i)
    keep = v >= 0
    v, i = v[keep], i[keep]
    top = i[v.argsort(descending=True, stable=True)[:k]].cpu()
    C = values.shape[-1]
    n_ok = int(ok.sum()) * (values.numel() // C)
    want = min(sample, n_ok - top.numel())
    gen = torch.Generator().manual_seed(seed)
    taken = set(top.tolist())
    picked: list[int] = []
    if want > 0 and n_ok <= 4 * (want + top.numel()) + 1_000_000:
        flat = torch.nonzero(torch.as_tensor(ok).repeat(values.numel() // C))[:, 0]
        flat = flat[torch.randperm(flat.numel(), generator=gen)]
        picked = [x for x in flat[: want + top.numel()].tolist() if x not in taken][:want]
    else:
        for _ in range(50):
            if len(picked) >= want:
                break
            draw = torch.randint(0, values.numel(), (4 * want + 16,), generator=gen)
            for x in draw.tolist():
                if ok[x % C] and x not in taken and len(picked) < want:
                    taken.add(x)
                    picked.append(x)
    return top, torch.as_tensor(picked, dtype=torch.long)


# ----------------------------------------------------------------------------- verify
def _removal(
    kind: str, c: Any, at: int, b: int, embed: Tensor, pos_embed: Optional[Tensor]
) -> Removal:
    if kind == "embed":
        return Removal("embed", -1, at, vector=embed[b, at])
    if kind == "pos_embed":
        assert pos_embed is not None
        return Removal("pos_embed", -1, at, vector=pos_embed[b, at])
    if kind in ("attn", "head"):
        return Removal(
            "heads",
            c.layer,
            at,
            index=c.head if kind == "head" else -1,
            src=c.src if kind == "head" else -1,
        )
    return Removal("neurons", c.layer, at, index=c.neuron if kind == "neuron" else -1)


def _path(path: tuple, i: int, at: int) -> tuple[tuple, int]:
    """The path's hops, each with the position it writes, and the position the removed write
    is at: what the last hop reads (a head hop without ``src`` reads each term's ``at``)."""
    out, hops = i, []
    for kind, layer, index, src in path:
        hops.append(Through(kind, layer, index, out))
        if kind == "head":
            out = src if src is not None else at
    return tuple(hops), out


def _chunks(copies: list, per_pass: int) -> list[slice]:
    """Consecutive runs of copies (sorted by row) that fit one pass with their clean rows."""
    out: list[slice] = []
    start, rows = 0, set[int]()
    for n, copy in enumerate(copies):
        if n > start and (n - start) + len(rows | {copy.row}) > per_pass:
            out.append(slice(start, n))
            start, rows = n, set()
        rows.add(copy.row)
    if copies:
        out.append(slice(start, len(copies)))
    return out


def verify(
    rec: Recorded,
    result: Any,
    target: Any,
    k: Any,
    sample: Any,
    seed: Any,
    caller: str = "LogitPrism.verify",
) -> Verification:
    """See :meth:`tlprisms.LogitPrism.verify`."""
    if not isinstance(result, Decomposition):
        raise ArgumentError(
            f"{caller}: result must be a Decomposition that this prism returned; "
            f"got {type(result).__name__}."
        )
    k = check.count(k, "k", caller, minimum=0)
    sample = check.count(sample, "sample", caller, minimum=0)
    seed = check.index(seed, "seed", caller)
    cv: CacheView = rec.cache
    view = cv.view
    B, P, K, C = result.values.shape
    if (
        B != cv.batch
        or result.n_layers != view.n_layers
        or bool((result.positions >= cv.n_ctx).any())
    ):
        raise ArgumentError(
            f"{caller}: the result does not come from this prism (batch {B}, "
            f"{result.n_layers} layers; this prism: batch {cv.batch}, "
            f"{view.n_layers} layers, {cv.n_ctx} positions)."
        )
    tokens = rec.tokens
    if tokens is None and cv.has(Site.TOKENS):
        tokens = cv.get(Site.TOKENS).long()
    if tokens is None:
        raise ArgumentError(
            f"{caller}: verifying runs the model again, which needs the input "
            "tokens; build the prism with LogitPrism.run(model, tokens) or "
            "LogitPrism(model, cache, tokens=tokens)."
        )
    ro = _reread(rec, result, target, caller)
    comps = result.components
    codes = comps.kind  # compared as codes: a chained result has millions of components
    layered = np.isin(codes, [KINDS.index(k) for k in ("attn", "head", "mlp", "neuron")])
    writer = np.isin(codes, [KINDS.index(k) for k in WRITERS]) & ~(layered & (comps.layer < 0))
    if ro.path and ro.path[-1][0] == "head" and ro.path[-1][3] is None:
        writer &= comps.at >= 0  # summed over the positions read: no one position to remove
    skipped = {}
    n_const = int(comps.is_constant().sum())
    if n_const:
        skipped[
            "constants (biases: no forward-pass write to remove; the sum check covers them)"
        ] = n_const
    if int((~writer & ~comps.is_constant()).sum()):
        skipped["sums over layers or positions (no one write to remove)"] = int(
            (~writer & ~comps.is_constant()).sum()
        )
    top, picked = _select(result, writer, k, sample, seed)
    flat = torch.cat([top, picked])
    bb, pp, tt, cc = np.unravel_index(flat.numpy(), (B, P, K, C))
    # one intervention per (batch, pos, component): it gives every target at once
    keys = list(dict.fromkeys(zip(bb.tolist(), pp.tolist(), cc.tolist())))
    keys.sort()
    embed = cv.embed_write(torch.arange(cv.n_ctx, device=cv.device).expand(B, cv.n_ctx), cv.dtype)
    pos_embed = cv.get(Site.POS_EMBED).expand(B, -1, -1) if view.pos_embed_in_resid else None
    copies = []
    for b, p, c in keys:
        comp = comps[c]
        i = int(result.positions[b, p])
        hops, at = _path(ro.path, i, comp.at)
        copies.append(Copy(b, _removal(comp.kind, comp, at, b, embed, pos_embed), hops))
    per_pass = max(2, COPY_TOKENS // cv.n_ctx)
    change: dict[tuple, Tensor] = {}
    passes = 0
    gate = lambda pre: limit_at_zero(str(view.act_fn), pre)
    for part in _chunks(copies, per_pass):
        chunk, ks = copies[part], keys[part]
        new, clean = run_frozen(view, tokens.to(cv.device), chunk, ro.site, ro.layer, gate)
        passes += 1
        for (b, p, c), x1, x0 in zip(ks, new, clean):
            i = int(result.positions[b, p])
            dx = x1[i].to(cv.dtype) - x0[i].to(cv.dtype)
            change[(b, p, c)] = ro.change(dx, b, p)
    terms = result.values[bb, pp, tt, cc].detach().cpu()
    measured = (
        torch.stack(
            [
                change[(b, p, c)][t]
                for b, p, t, c in zip(bb.tolist(), pp.tolist(), tt.tolist(), cc.tolist())
            ]
        ).cpu()
        if len(keys)
        else terms.clone()
    )
    explained = result.explained[bb, pp, tt].detach().cpu()
    l1 = torch.linalg.vector_norm(result.values.detach(), 1, -1)[bb, pp, tt].cpu()
    scale = torch.maximum(explained.abs(), l1).clamp(min=1.0)
    bound = VERIFY_FACTOR * tolerance(result.precision, result.n_layers) * scale
    error = (terms + measured).abs()
    if result.complete:
        gap = result.gap().abs()
        sum_gap, sum_ok = float(gap.max()), bool((gap <= result.tolerance()).all())
    else:
        sum_gap, sum_ok = float("nan"), True
    labels = np.broadcast_to(result.target_labels, (B, P, K))[bb, pp, tt]
    return Verification(
        ok=bool((error <= bound).all()) and sum_ok and bool(torch.isfinite(measured).all()),
        terms=terms,
        change=measured,
        error=error,
        bound=bound,
        explained=explained,
        batch=torch.as_tensor(bb, dtype=torch.long),
        pos=result.positions.cpu()[bb, pp].long(),
        target=torch.as_tensor(tt, dtype=torch.long),
        components=comps.take(cc),
        sampled=torch.arange(len(bb)) >= top.numel(),
        target_labels=np.asarray(labels),
        skipped=skipped,
        sum_gap=sum_gap,
        sum_ok=sum_ok,
        explains=result.explains,
        prism=result.prism,
        forward_passes=passes,
    )
