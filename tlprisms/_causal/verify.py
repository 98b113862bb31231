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
``head``        its ``z`` at the position set to 0; one source ``src``: ``v[src, kv(h)]``
                zeroed, with only head ``h``'s ``z`` at the position passed on
``attn``        every head's ``z`` at the position set to 0 (``b_O`` stays)
``neuron``      its activation ``post[at, n]`` set to 0 (``b_out`` stays)
``mlp``         every activation at the position set to 0
``b_O``         the layer's output bias subtracted from its output at the position (layers
                without a post-norm)
``b_out``       the same for the MLP
dictionary      its vector subtracted from the layer output its site adds to the stream
                (``hook_attn_out`` / ``hook_mlp_out``, after any post-norm; before layer 0 for
                ``resid_pre`` of layer 0), that output otherwise held at its clean value
CLT feature     ``a_l[f] W_dec_l[f, L - l]`` subtracted from the MLP output of every layer
                ``L >= l`` at once (a cross-layer transcoder's ``b_dec`` and error: from
                their one layer's)
==============  ==============================================================================

and measures the change ``D`` of the explained value (the final residual stream's change read
through the frozen readout: the logit, pre- or post-soft-cap as ``result.explains`` says, a
logit difference, a direction, or a residual readout). Exactness means ``D = -T``; the error
``|T + D|`` must stay within :data:`VERIFY_FACTOR` times the result's completeness tolerance.
A chained term (``through_head``, ``through_neuron``, ``chain``) is measured along its path:
each hop passes on only its own head's ``z`` (or neuron's activation) at the position it
writes, and after a hop's layer the stream is the clean stream plus that hop's write.

Constant terms: ``b_O`` and ``b_out`` are removed like any write (above). ``b_U`` and the final
norm's bias (``ln_final.b``) are exact by construction: every such term of a direct result is
compared with its value computed again from the weights. Any other constant (a chain's
``b_V``/``ln.b``/``b_in``, a readout's bias, a post-normed layer's bias) is not checked on its
own, and the certificate names it; the sum check covers it.

Before any forward pass the model is checked to be the one the prism was made from: in eval
mode, passing the cache's provenance check again, and its re-run reproducing the recorded
stream at every explained position (:data:`RERUN_RTOL`). A batch recorded with an
``attention_mask`` is re-run with the same mask, read back from the cached layer-0 pattern
(keys that no real query attends to). A sparse result is checked slot by slot: a component a
row did not keep is part of that row's remainder, and is not checked there.

A QK result (``prism.qk``) measures the head's scores instead of the readout:
:mod:`tlprisms._causal.verify_qk`.

All interventions of one call run as copies of their input rows stacked along the batch axis,
:data:`tlprisms._seam.COPY_TOKENS` tokens per forward pass.
"""

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from tlprisms._causal.certificate import Verification
from tlprisms._causal.removals import (
    RERUN_RTOL,
    RERUN_RTOL_LOWP,
    VERIFY_FACTOR,
    WRITERS,
    bias_removable,
    check_rerun,
    checkable,
    hops_of,
    removal_of,
    rerun_inputs,
    select_terms,
)
from tlprisms._causal.verify_qk import verify_qk
from tlprisms._core import arguments as check
from tlprisms._core.errors import ArgumentError, TargetError
from tlprisms._core.readout import Recorded, Softcap, explain, final_readout
from tlprisms._core.result import Decomposition, tolerance
from tlprisms._core.table import KINDS
from tlprisms._prisms.chain import limit_at_zero
from tlprisms._prisms.features import dictionary_input
from tlprisms._prisms.read import READ_AT
from tlprisms._seam import (
    COPY_TOKENS,
    CacheView,
    Copy,
    Removal,
    Site,
    run_frozen,
)
from tlprisms.dictionary import CrossLayerTranscoder

__all__ = [
    "Verification",
    "verify",
    "rerun_inputs",
    "check_rerun",
    "VERIFY_FACTOR",
    "RERUN_RTOL",
    "RERUN_RTOL_LOWP",
    "WRITERS",
]

#: constants of the final readout, checked against the weights
_READOUT_CONSTANTS = ("b_U", "ln_final.b")
_DIRECT = ("residual", "heads", "neurons", "full", "decompose", "features")
#: a dictionary's terms, each a vector written at its site: removed like a layer's bias
_DICTIONARY_KINDS = ("feature", "b_dec", "skip", "error")
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


def _reread(
    rec: Recorded, result: Decomposition, target: Any, caller: str
) -> tuple[_Measure, Any, Any]:
    """How to measure ``result``'s explained value, with its final readout and explained
    values (None for a readout of the residual stream)."""
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
        return _Measure(uu[None, None], inv, ones, site, layer, ()), None, None
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
    return _Measure(r.u, r.inv_s, ex.weights, Site.FINAL_RESID, None, path), fr, ex


def _readout_constants(result: Decomposition, fr: Any, explained: Any) -> tuple[int, float]:
    """Compare every ``b_U`` / ``ln_final.b`` term with its value from the weights: (terms
    compared, largest error relative to its explained value's scale)."""
    kinds = result.components.kinds()
    values = result.values.detach()
    scale = torch.maximum(
        result.explained.detach().abs(), torch.linalg.vector_norm(values, 1, -1)
    ).clamp(min=1.0)
    n, worst = 0, 0.0
    for kind, vec in (("b_U", fr.bias), ("ln_final.b", fr.norm_bias)):
        cols = np.nonzero(kinds == kind)[0]
        if not len(cols):
            continue
        w = explained.weights  # [B|1, P|1, k, a]
        k, a = w.shape[-2], w.shape[-1]
        want = (w * vec.reshape(*vec.shape[:2], k, a).to(w.device, w.dtype)).sum(-1)
        got = values[..., torch.as_tensor(cols, device=values.device)].sum(-1)
        err = (got - want.to(got.device, got.dtype)).abs() / scale
        n += int(got.numel())
        worst = max(worst, float(err.max()))
    return n, worst


# ----------------------------------------------------------------------------- verify
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


class _Dictionaries:
    """The dictionaries of a ``features`` result, by layer, and the vector each of their
    terms writes at a position (what removing the term subtracts from the stream)."""

    def __init__(self, cv: CacheView, result: Decomposition) -> None:
        self.cv = cv
        req = result.request
        dicts = list(req.dictionaries) if req is not None and not req.is_chain else []
        clts = [d for d in dicts if isinstance(d, CrossLayerTranscoder)]
        self.clt = _CrossLayer(cv, clts[0]) if clts else None
        by_layer: dict[int, list] = {}
        for d in dicts:
            if not isinstance(d, CrossLayerTranscoder):
                by_layer.setdefault(int(d.layer), []).append(d)
        # a term names its layer only: two dictionaries at one layer cannot be told apart
        self.at_layer = {ly: ds[0] for ly, ds in by_layer.items() if len(ds) == 1}
        self._parts: dict[int, tuple] = {}

    def removable(self, kind: str, layer: int) -> bool:
        if self.clt is not None:
            return self.clt.removable(kind, int(layer))
        d = self.at_layer.get(int(layer))
        return d is not None and self._where(d) is not None

    def _where(self, d: Any) -> Optional[tuple[str, int]]:
        """Where a vector that ``d`` writes is subtracted: ``("attn"/"mlp", layer)``, the
        layer output the stream adds at ``d``'s site (after any post-norm), ``("embed",
        -1)`` before layer 0, or None."""
        view, L = self.cv.view, int(d.layer)
        if d.site is Site.ATTN_OUT or (d.site is Site.RESID_MID and not view.parallel):
            return ("attn", L)
        if d.site in (Site.MLP_OUT, Site.RESID_POST):
            return ("mlp", L)
        if d.site is Site.RESID_PRE:
            return ("embed", -1) if L == 0 else ("mlp", L - 1)
        return None

    def _of(self, d: Any) -> tuple:
        """``(acts [B, n, F], x_in, x_out)`` of ``d`` at every position (computed once)."""
        key = id(d)
        if key not in self._parts:
            cv = self.cv
            pos = torch.arange(cv.n_ctx, device=cv.device).expand(cv.batch, cv.n_ctx)
            x_in = dictionary_input(cv, d, pos, cv.dtype, cv.device)
            x_out = cv.at(d.site, d.layer, pos, cv.dtype) if d.transcoder else x_in
            self._parts[key] = (d.encode(x_in), x_in, x_out)
        return self._parts[key]

    def removal(self, c: Any, b: int, at: int) -> Removal:
        if self.clt is not None:
            return self.clt.removal(c, b, at)
        d = self.at_layer[int(c.layer)]
        where = self._where(d)
        if where is None:  # removable() said no: such a term is never checked
            raise ValueError(f"verify: {c} has no one write to remove")
        acts, x_in, x_out = self._of(d)
        dt, dev = self.cv.dtype, self.cv.device
        W_dec = d.W_dec.to(dev, dt) / d.input_scale
        b_dec = d.b_dec.to(dev, dt) / d.input_scale
        skip = None if d.W_skip is None else x_in[b, at] @ d.W_skip.to(dev, dt)
        if c.kind == "feature":
            vec = acts[b, at, c.feature] * W_dec[c.feature]
        elif c.kind == "b_dec":
            vec = b_dec
        elif c.kind == "skip" and skip is not None:
            vec = skip
        elif c.kind == "error":  # what the dictionary does not reconstruct
            x_hat = acts[b, at] @ W_dec + b_dec + (0 if skip is None else skip)
            vec = x_out[b, at] - x_hat
        else:
            raise ValueError(f"verify: {c} is not a term of the dictionary at layer {c.layer}")
        if where[0] == "embed":
            return Removal("embed", -1, at, vector=vec)
        return Removal("outputs", where[1], at, vectors=((where[0], where[1], vec),))


class _CrossLayer:
    """A cross-layer transcoder's terms as writes: feature ``(l, f)`` writes ``a_l[f]
    W_dec_l[f, L - l]`` to the MLP output of every layer ``L >= l``; ``b_dec`` and the error
    of layer ``L`` write to its MLP output only. Removed together (one copy), every other
    MLP output held at its clean value. Decoder rows are read from the files as needed."""

    def __init__(self, cv: CacheView, clt: CrossLayerTranscoder) -> None:
        self.cv, self.clt = cv, clt
        self._acts: dict[int, Tensor] = {}

    def removable(self, kind: str, layer: int) -> bool:
        """Whether the term is one of this transcoder's (each is a vector subtracted from
        ``hook_mlp_out``, which is what the stream adds, after any post-norm)."""
        return 0 <= layer < self.cv.view.n_layers and kind in ("feature", "b_dec", "error")

    def acts(self, layer: int) -> Tensor:
        """Layer ``layer``'s feature activations at every position, ``[B, n_ctx, F]``."""
        if layer not in self._acts:
            cv = self.cv
            view = cv.view
            pos = torch.arange(cv.n_ctx, device=cv.device).expand(cv.batch, cv.n_ctx)
            if self.clt.input_site is Site.LN2_NORMALIZED:  # ln2 in full, at its recorded scale
                norm = view.ln2[layer]
                stream = Site.RESID_PRE if view.parallel else Site.RESID_MID
                x = cv.at(stream, layer, pos, cv.dtype)
                scale = cv.scale(norm, pos)[..., None].to(x.dtype) if norm.has_scale else None
                x = norm.apply(x, scale)
            else:
                x = cv.at(self.clt.input_site, layer, pos, cv.dtype)
            self._acts[layer] = self.clt.encode(layer, x)
        return self._acts[layer]

    def _decoded(self, b: int, at: int, L: int) -> Tensor:
        """Every feature's write to layer ``L``'s MLP output at ``(b, at)``, summed."""
        cv = self.cv
        out = torch.zeros(cv.view.d_model, dtype=cv.dtype, device=cv.device)
        for l in range(L + 1):
            a = self.acts(l)[b, at]
            active = torch.nonzero(a)[:, 0].cpu()
            if active.numel():
                W = self.clt.decoder(l, L - l + 1, active)[:, L - l].to(cv.device, cv.dtype)
                out = out + a[active.to(a.device)] @ W
        return out

    def removal(self, c: Any, b: int, at: int) -> Removal:
        cv = self.cv
        n, dt, dev = cv.view.n_layers, cv.dtype, cv.device
        L = int(c.layer)
        if c.kind == "feature":
            W = self.clt.decoder(L, n - L, torch.as_tensor([int(c.feature)]))[0].to(dev, dt)
            a = self.acts(L)[b, at, int(c.feature)]
            vectors = tuple(("mlp", L + j, a * W[j]) for j in range(n - L))
        elif c.kind == "b_dec":
            vectors = (("mlp", L, self.clt.b_dec[L].to(dev, dt)),)
        else:  # the error: the MLP output less every decode into it and b_dec
            x = cv.get(Site.MLP_OUT, L)[b, at].to(dev, dt)
            rest = x - self._decoded(b, at, L) - self.clt.b_dec[L].to(dev, dt)
            vectors = (("mlp", L, rest),)
        return Removal("outputs", L, at, vectors=vectors)


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
    B, P, K = result.values.shape[:3]
    if (
        B != cv.batch
        or result.n_layers != view.n_layers
        or bool((result.positions >= cv.n_ctx).any())
    ):
        raise ArgumentError(
            f"{caller}: the result does not come from this prism (batch {B}, "
            f"{result.n_layers} layers; this prism: batch {cv.batch}, "
            f"{view.n_layers} layers, {cv.n_ctx} positions). Verify a result with the prism "
            "that made it."
        )
    tokens, mask = rerun_inputs(rec, caller, "verifying")
    if result.request is not None and result.request.prism == "qk":
        if target is not None:
            raise ArgumentError(
                f"{caller}: a QK result is verified against the scores it explains (its "
                "request's head, query and keys); pass no target."
            )
        return verify_qk(rec, result, tokens, mask, k, sample, seed, caller)
    ro, fr, ex = _reread(rec, result, target, caller)
    comps_all = result.components
    codes = comps_all.kind  # compared as codes: a chained result has millions of components
    kinds = comps_all.kinds()
    layered = np.isin(codes, [KINDS.index(k) for k in ("attn", "head", "mlp", "neuron")])
    writer = np.isin(codes, [KINDS.index(k) for k in WRITERS]) & ~(layered & (comps_all.layer < 0))
    skipped: dict = {}
    bias = np.isin(kinds, ("b_O", "b_out"))
    if bias.any():
        removable = np.array(
            [bias_removable(view, str(kd), int(ly)) for kd, ly in zip(kinds, comps_all.layer)]
        )
        writer &= ~bias | removable
    dictionaries = _Dictionaries(cv, result)
    dict_terms = np.isin(kinds, _DICTIONARY_KINDS)
    if dict_terms.any():
        removable = np.array(
            [
                dictionaries.removable(str(kd), int(ly))
                for kd, ly in zip(kinds[dict_terms], comps_all.layer[dict_terms])
            ],
            dtype=bool,
        )
        writer[np.nonzero(dict_terms)[0][removable]] = True
        if (~removable).any():
            skipped[
                "dictionary terms (two dictionaries at one layer, or a write behind a "
                "post-norm: no one vector to remove)"
            ] = int((~removable).sum())
    if ro.path and ro.path[-1][0] == "head" and ro.path[-1][3] is None:
        writer &= comps_all.at >= 0  # summed over the positions read: no one position to remove
    constant = comps_all.is_constant()
    readout_const = np.isin(kinds, _READOUT_CONSTANTS) & (fr is not None and not ro.path)
    n_unchecked_const = int((constant & ~writer & ~readout_const).sum())
    if n_unchecked_const:
        names = sorted(set(kinds[constant & ~writer & ~readout_const].tolist()))
        skipped[
            f"constants ({', '.join(names)}: no write of the forward pass to remove; the sum "
            "check covers them)"
        ] = n_unchecked_const
    sums = ~writer & ~constant
    if int(sums.sum()):
        skipped["sums over layers or positions (no one write to remove)"] = int(sums.sum())
    dense, ok = checkable(result, writer)
    comps = dense.components
    C = dense.values.shape[-1]
    top, picked = select_terms(dense, ok, k, sample, seed)
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

        def patterns(layer: int, head: int, out: int, b: int = b) -> Tensor:
            return cv.get(Site.PATTERN, layer)[b, head, out].detach()

        hops, at = hops_of(ro.path, i, comp.at, patterns)
        if comp.kind in _DICTIONARY_KINDS:
            removal = dictionaries.removal(comp, b, at)
        else:
            removal = removal_of(comp.kind, comp, at, b, embed, pos_embed, view, cv)
        copies.append(Copy(b, removal, hops))
    per_pass = max(2, COPY_TOKENS // cv.n_ctx)
    change: dict[tuple, Tensor] = {}
    passes = 0
    gate = lambda pre: limit_at_zero(str(view.act_fn), pre)
    recorded = cv.has(ro.site, ro.layer)
    for part in _chunks(copies, per_pass):
        chunk, ks = copies[part], keys[part]
        new, clean = run_frozen(view, tokens, chunk, ro.site, ro.layer, gate, mask)
        passes += 1
        if recorded:
            rows = torch.as_tensor([b for b, _, _ in ks], device=cv.device)
            ats = result.positions.to(cv.device)[rows, torch.as_tensor([p for _, p, _ in ks])]
            want = cv.get(ro.site, ro.layer)[rows.to(cv.device), ats.to(cv.device)]
            got = clean[torch.arange(len(ks), device=clean.device), ats.to(clean.device)]
            check_rerun(cv, got, want, "residual stream read at the explained position", caller)
        for (b, p, c), x1, x0 in zip(ks, new, clean):
            i = int(result.positions[b, p])
            dx = x1[i].to(cv.dtype) - x0[i].to(cv.dtype)
            change[(b, p, c)] = ro.change(dx, b, p)
    terms = dense.values[bb, pp, tt, cc].detach().cpu()
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
    l1 = torch.linalg.vector_norm(dense.values.detach(), 1, -1)[bb, pp, tt].cpu()
    scale = torch.maximum(explained.abs(), l1).clamp(min=1.0)
    bound = VERIFY_FACTOR * tolerance(result.precision, result.n_layers) * scale
    error = (terms + measured).abs()
    if result.complete:
        gap = result.gap().abs()
        sum_gap, sum_ok = float(gap.max()), bool((gap <= result.tolerance()).all())
    else:
        sum_gap, sum_ok = float("nan"), True
    n_const, const_err = 0, 0.0
    if readout_const.any() and fr is not None and ex is not None:
        n_const, const_err = _readout_constants(result, fr, ex)
    const_ok = const_err <= VERIFY_FACTOR * tolerance(result.precision, result.n_layers)
    labels = np.broadcast_to(result.target_labels, (B, P, K))[bb, pp, tt]
    return Verification(
        ok=bool((error <= bound).all())
        and sum_ok
        and const_ok
        and bool(torch.isfinite(measured).all()),
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
        constants_checked=n_const,
        constants_error=const_err,
        constants_ok=const_ok,
    )
