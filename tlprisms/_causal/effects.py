"""Direct terms next to total effects: what a component writes vs what ablating it changes.

A prism's term for a component is its **direct** effect: its write, read by the frozen readout
(everything the forward pass computed after it held fixed). Its **total** effect is what
ablating it changes when *nothing* is frozen: later layers, norm scales and attention patterns
respond, so the total effect also carries every indirect path through the model, including
compensation by other components ("backup" heads, self-repair, erasure by later layers).

``LogitPrism.effects`` ablates each component at every position, one batch-stacked copy of
each input row per component, and measures the explained value the way the model computes it
(the final norm at its new scale, the soft-cap applied when the result explains the post-cap
logit). The ablated value is 0 (``"zero"``), its mean over a reference batch at each position
(``"mean"``), or its value on a reference row drawn at random (``"resample"``):

* ``head``: its ``z`` (mixed values), so its write ``z W_O`` (``b_O`` stays, as in its term);
* ``attn``: every head's ``z`` of the layer;
* ``neuron``: its activation (``b_out`` stays);
* ``mlp``: every activation of the layer.

A head component with a source (``L0H2[src 4]``, from ``heads().top()``) is ablated exactly:
only what the head reads from that source, at every destination (its value row zeroed for
that head), under zero ablation; its direct term is the source's term. A chained component
(``at`` set) is refused: its term is one path's, not the component's. Mean and resample
ablation need a reference of several rows that differ from the input (else the total effect
is 0 by construction). The model must be the one the prism was made from (checked as for
``verify``: eval mode, provenance, and its clean re-run reproducing the recorded stream), and
a batch recorded with an ``attention_mask`` is re-run with it.

``total = explained(clean) - explained(ablated)``, so a component whose whole effect is direct
has ``total == direct`` under zero ablation; ``difference = total - direct`` is its indirect
effect (negative when the rest of the model compensates).
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
from beartype import beartype
from jaxtyping import Float, Int, jaxtyped
from torch import Tensor

from tlprisms._causal.verify import check_rerun, rerun_inputs
from tlprisms._core import arguments as check
from tlprisms._core import views
from tlprisms._core.errors import ArgumentError, PositionError
from tlprisms._core.readout import FinalReadout, Recorded, final_readout
from tlprisms._core.result import Decomposition
from tlprisms._core.table import Component, ComponentTable
from tlprisms._seam import COPY_TOKENS, Ablation, CacheView, Site, record, run_ablated

__all__ = ["Effects", "effects", "ABLATIONS"]

#: how a component is ablated for its total effect
ABLATIONS = ("zero", "mean", "resample")
_KINDS = ("head", "attn", "neuron", "mlp")


@jaxtyped(typechecker=beartype)
@dataclass(frozen=True, eq=False)
class Effects:
    """Each component's direct term next to its total effect when ablated.

    Attributes:
        direct: the prism's term, ``[batch, target, comp]``.
        total: ``explained(clean) - explained(ablated)`` with nothing frozen,
            ``[batch, target, comp]``.
        components: the components (``len == comp``).
        explained: the clean explained value, ``[batch, target]``.
        positions: the explained position of each batch row, ``[batch]``.
        target_labels: a name per target.
        explains: what is explained (``"logit"``, ``"pre-softcap logit"`` ...); the total
            effect applies the soft-cap itself, the direct term holds its ratio frozen.
        ablation: ``"zero"``, ``"mean"`` or ``"resample"``.
    """

    direct: Float[Tensor, "batch target comp"]
    total: Float[Tensor, "batch target comp"]
    components: ComponentTable
    explained: Float[Tensor, "batch target"]
    positions: Int[Tensor, "batch"]
    target_labels: np.ndarray
    explains: str
    ablation: str

    @property
    def difference(self) -> Float[Tensor, "batch target comp"]:
        """``total - direct``: the indirect effect (negative when the model compensates)."""
        return self.total - self.direct

    def to_frame(self) -> Any:
        """One row per (batch, target, component): ``batch``, ``pos``, ``target``,
        ``component``, ``kind``, ``layer``, ``head``, ``neuron``, ``direct``, ``total``,
        ``difference``."""
        import pandas as pd

        B, K, C = self.direct.shape
        grid = np.meshgrid(np.arange(B), np.arange(K), np.arange(C), indexing="ij")
        bb, kk, cc = (g.ravel() for g in grid)
        c = self.components
        labels = np.broadcast_to(self.target_labels, (B, K))
        return pd.DataFrame(
            {
                "batch": bb,
                "pos": self.positions.numpy()[bb],
                "target": labels[bb, kk],
                "component": [str(c[int(i)]) for i in cc],
                "kind": c.kinds()[cc],
                "layer": c.layer[cc],
                "head": c.head[cc],
                "neuron": c.neuron[cc],
                "direct": self.direct.numpy().ravel(),
                "total": self.total.numpy().ravel(),
                "difference": self.difference.numpy().ravel(),
            }
        )

    def __repr__(self) -> str:
        B, K, C = self.direct.shape
        lines = [
            f"Effects({self.ablation} ablation of {C} components; {B} rows x {K} targets; "
            f"explains {self.explains}; means over rows:"
        ]
        d, t = self.direct.mean(0), self.total.mean(0)
        for k in range(min(K, 3)):
            lines.append(f"  target {np.broadcast_to(self.target_labels, (B, K))[0, k]}:")
            for i in range(min(C, 12)):
                lines.append(
                    f"    {str(self.components[i]):<14} direct {float(d[k, i]):+.4g}"
                    f"  total {float(t[k, i]):+.4g}  difference "
                    f"{float(t[k, i] - d[k, i]):+.4g}"
                )
        return "\n".join(lines) + ")"

    # drawn by the views tlprisms.render registers for this type (tlprisms._core.views)
    def svg(self, target: int = 0) -> str:
        """Direct term (x) against total effect (y), one point per component (mean over rows);
        a component off the diagonal acts through the rest of the model."""
        return views.svg(self, target=target)

    def _repr_html_(self) -> str:
        return views.html(self)


# ----------------------------------------------------------------------------- helpers
def _components(view: Any, components: Any, caller: str) -> list[Component]:
    if isinstance(components, Component):
        components = [components]
    if (
        isinstance(components, (str, bytes))
        or not isinstance(components, Sequence)
        or not components
    ):
        raise ArgumentError(
            f"{caller}: components={components!r:.60}; pass a non-empty list of "
            "tlprisms.Component, e.g. [tp.Component('head', layer=1, head=2)]."
        )
    out = []
    for c in components:
        if not isinstance(c, Component) or c.kind not in _KINDS:
            raise ArgumentError(
                f"{caller}: {c!r} is not a component effects() can ablate; pass Components of "
                f"kind {', '.join(map(repr, _KINDS))} (e.g. Component('neuron', layer=1, "
                "neuron=5))."
            )
        layer = check.layer(view, c.layer, caller)
        if c.at >= 0:
            raise ArgumentError(
                f"{caller}: {c} is a chained term (written at position {c.at} along a path): "
                "its term is that path's, not the component's, so ablating the component "
                "would not measure it. Pass the component itself, e.g. "
                f"Component({c.kind!r}, layer={c.layer}"
                + (f", head={c.head}" if c.kind == "head" else "")
                + (f", neuron={c.neuron}" if c.kind == "neuron" else "")
                + ")."
            )
        if c.kind == "head":
            check.head(view, c.head, caller)
        if c.kind == "neuron":
            check.neuron(view, c.neuron, caller)
        if c.kind in ("neuron", "mlp") and view.attn_only:
            raise ArgumentError(f"{caller}: this model is attention-only; it has no MLPs.")
        out.append(
            Component(
                c.kind,
                layer=layer,
                head=c.head if c.kind == "head" else -1,
                neuron=c.neuron if c.kind == "neuron" else -1,
                src=c.src if c.kind == "head" and c.src >= 0 else -1,
            )
        )
    return out


def _mask(table: ComponentTable, c: Component) -> np.ndarray:
    """The terms of a decomposition that make up component ``c``'s direct term."""
    layer = table.layer == c.layer
    kinds = table.kinds()
    if c.kind == "head":
        mine = layer & (kinds == "head") & (table.head == c.head)
        return mine & (table.src == c.src) if c.src >= 0 else mine
    if c.kind == "neuron":
        return layer & (kinds == "neuron") & (table.neuron == c.neuron)
    if c.kind == "attn":
        return layer & np.isin(kinds, ("attn", "head"))
    return layer & np.isin(kinds, ("mlp", "neuron"))


def _explained(
    fr: FinalReadout,
    x: Tensor,
    s: Optional[Tensor],
    rows: Tensor,
    softcap: str,
    cap: Optional[float],
) -> Tensor:
    """The explained value ``[N, k]`` from the final stream ``x [N, d]`` at the explained
    position, its norm's scale ``s [N]`` (None: no norm), for batch rows ``rows [N]``."""
    atoms, r = fr.atoms, fr.readout
    pick = rows.clamp(max=r.u.shape[0] - 1)
    u = r.u[pick, 0]  # [N, ka, d]
    z = torch.einsum("nd,nkd->nk", x, u)
    if s is not None:
        z = z / s[:, None]
    z = (
        z
        + fr.bias[rows.clamp(max=fr.bias.shape[0] - 1), 0]
        + fr.norm_bias[rows.clamp(max=fr.norm_bias.shape[0] - 1), 0]
    )
    k, a = atoms.coef.shape[2], atoms.coef.shape[3]
    z = z.reshape(-1, k, a)
    coef = atoms.coef.to(z.device, z.dtype)[rows.clamp(max=atoms.coef.shape[0] - 1), 0]
    if cap is not None and softcap == "post":
        tok = atoms.token_atom.to(z.device)[rows.clamp(max=atoms.coef.shape[0] - 1), 0]
        z = torch.where(tok, cap * torch.tanh(z / cap), z)
    return (coef * z).sum(-1)


def _reference(view: Any, cv: CacheView, reference: Any, tokens: Tensor, caller: str) -> Tensor:
    if reference is None:
        return tokens
    if (
        not isinstance(reference, Tensor)
        or reference.dtype.is_floating_point
        or reference.dtype == torch.bool
        or reference.ndim != 2
        or reference.shape[1] != cv.n_ctx
        or reference.shape[0] == 0
    ):
        what = (
            f"shape {tuple(reference.shape)}, dtype {reference.dtype}"
            if isinstance(reference, Tensor)
            else type(reference).__name__
        )
        raise ArgumentError(
            f"{caller}: reference must be token ids [rows, {cv.n_ctx}] (as many "
            f"positions as the input: values are taken per position); got "
            f"{what}."
        )
    if bool(((reference < 0) | (reference >= view.d_vocab_in)).any()):
        raise ArgumentError(
            f"{caller}: reference holds token ids outside the vocabulary [0, {view.d_vocab_in})."
        )
    return reference.to(tokens.device)


# ----------------------------------------------------------------------------- effects
def effects(
    rec: Recorded,
    direct_of: Callable[..., Decomposition],
    target: Any,
    components: Any,
    ablation: Any,
    reference: Any,
    pos: Any,
    softcap: Any,
    seed: Any,
    caller: str = "LogitPrism.effects",
) -> Effects:
    """See :meth:`tlprisms.LogitPrism.effects`."""
    cv: CacheView = rec.cache
    view = cv.view
    check.choice(ablation, "ablation", ABLATIONS, caller)
    check.choice(softcap, "softcap", ("post", "pre"), caller)
    seed = check.index(seed, "seed", caller)
    comps = _components(view, components, caller)
    if isinstance(pos, str):
        raise PositionError(
            f"{caller}: pos={pos!r}; effects explain one position per row: pass "
            "an int or one int per batch row."
        )
    if ablation == "zero" and reference is not None:
        raise ArgumentError(f"{caller}: reference= is for ablation='mean' or 'resample'.")
    sources = [c for c in comps if c.src >= 0]
    if sources and ablation != "zero":
        raise ArgumentError(
            f"{caller}: {sources[0]} is one source of a head; only ablation='zero' removes "
            "exactly what it reads (a mean or resampled value of one source is not defined). "
            "Use ablation='zero', or pass the whole head."
        )
    tokens, mask = rerun_inputs(rec, caller, "ablating")
    ref = None if ablation == "zero" else _reference(view, cv, reference, tokens, caller)
    if ref is not None and torch.unique(ref, dim=0).shape[0] < 2:
        raise ArgumentError(
            f"{caller}: ablation={ablation!r} against a reference of one distinct row (the "
            "default on a one-prompt prism, or a reference equal to the input) replaces each "
            "component by its own value, so every total effect would be 0. Pass reference= "
            f"token ids [rows, {cv.n_ctx}] of several other prompts (e.g. "
            "model.to_tokens([...]))."
        )
    heads = sorted({c.layer for c in comps if c.kind == "head"})
    neurons = sorted({c.layer for c in comps if c.kind == "neuron"})
    direct_res = direct_of(
        target, pos, heads=heads, neurons=neurons, by_source=bool(sources), softcap=softcap
    )
    B, _, K, _ = direct_res.values.shape
    direct = torch.stack(
        [direct_res.values[:, 0, :, _mask(direct_res.components, c)].sum(-1) for c in comps], -1
    ).cpu()
    fr = final_readout(rec, target, pos)
    positions = fr.readout.positions[:, 0]
    rows = torch.arange(B, device=cv.device)
    scale = cv.view.final_norm
    s0 = cv.scale(scale, positions[:, None])[:, 0] if scale.has_scale else None
    x0 = cv.at(Site.FINAL_RESID, None, positions[:, None])[:, 0]
    clean = _explained(fr, x0, s0, rows, softcap, view.softcap)
    values: dict = {}
    if ref is not None:
        acts = record(view, ref, sorted({(c.kind, c.layer) for c in comps}))
        gen = torch.Generator().manual_seed(seed)
        pick = torch.randint(0, ref.shape[0], (B,), generator=gen)
        for c in comps:
            act = acts[(c.kind, c.layer)]
            if c.kind in ("head", "neuron"):
                act = act[:, :, c.head if c.kind == "head" else c.neuron]
            values[c] = act.mean(0) if ablation == "mean" else act[pick.to(act.device)]
    ablations = [
        Ablation(
            b,
            c.kind,
            c.layer,
            c.head if c.kind == "head" else c.neuron,
            None if ref is None else (values[c] if ablation == "mean" else values[c][b]),
            src=c.src,
        )
        for c in comps
        for b in range(B)
    ]
    # one clean copy per row: the re-run must reproduce the recorded stream
    ablations += [Ablation(b, "none", -1) for b in range(B)]
    per_pass = max(1, COPY_TOKENS // cv.n_ctx)
    drops = []
    for start in range(0, len(ablations), per_pass):
        part = ablations[start : start + per_pass]
        x, s = run_ablated(view, tokens, part, mask)
        r = torch.as_tensor([a.row for a in part], device=cv.device)
        at = positions[r].to(x.device)
        n = torch.arange(len(part), device=x.device)
        xi = x[n, at].to(cv.dtype)
        si = None if s is None else s[n, at].to(cv.dtype)
        drops.append(clean[r] - _explained(fr, xi, si, r, softcap, view.softcap))
    drop = torch.cat(drops)
    n_abl = len(comps) * B
    check_rerun(cv, drop[n_abl:], torch.zeros_like(drop[n_abl:]), "explained value", caller)
    total = drop[:n_abl].reshape(len(comps), B, K).permute(1, 2, 0).cpu()
    labels = np.broadcast_to(fr.atoms.labels, (B, 1, K))[:, 0]
    return Effects(
        direct=direct.to(total.dtype),
        total=total,
        components=ComponentTable.concat(
            [
                ComponentTable.block(c.kind, layer=c.layer, head=c.head, neuron=c.neuron, src=c.src)
                for c in comps
            ]
        ),
        explained=clean.cpu(),
        positions=positions.cpu(),
        target_labels=np.asarray(labels),
        explains=direct_res.explains.replace(" (rho frozen)", ""),
        ablation=ablation,
    )
