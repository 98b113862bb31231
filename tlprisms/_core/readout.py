"""The frozen final readout: targets -> directions on the final residual stream.

The logit of token ``t`` at position ``i`` reads the final residual ``x`` through the frozen
final norm: ``logit_t = x . r_t + c_t`` with ``r_t = P(w * W_U[:, t]) / s`` and
``c_t = b . W_U[:, t] + b_U[t]``. Targets resolve to at most two *atoms* each (a logit
difference has two); :func:`final_readout` builds ``P(w * u)`` per atom, ``1/s`` per read
position and the constants (a :class:`FinalReadout`), and :func:`explain` gives the per-atom
weights (the frozen soft-cap ratio ``rho = cap*tanh(z/cap)/z`` for post-cap logits) and the
values the terms must add up to (an :class:`Explained`).
"""

from dataclasses import dataclass
from typing import Any, Literal, Optional

import numpy as np
import torch
from beartype import beartype
from jaxtyping import Float, jaxtyped
from torch import Tensor

from tlprisms._core.engine import Readout
from tlprisms._core.ops import dot
from tlprisms._core.table import ComponentTable
from tlprisms._core.targets import Atoms, Positions, resolve_positions, resolve_targets
from tlprisms._seam import CacheView, Site

__all__ = [
    "Recorded",
    "FinalReadout",
    "Explained",
    "Softcap",
    "final_readout",
    "explain",
    "weigh",
    "softcap_ratio",
    "read_logits",
    "logit_constants",
    "target_labels",
]

#: what a soft-capped model's result explains: the logit after the cap (ratio frozen) or before
Softcap = Literal["post", "pre"]
#: below this |z| the soft-cap ratio is its limit, 1
_RHO_EPS = 1e-12


@dataclass(frozen=True)
class Recorded:
    """What one forward pass recorded: the cache (seen through its model), and optionally the
    input tokens ``[batch, pos]`` and the model's logits ``[batch, pos, d_vocab]``."""

    cache: CacheView
    tokens: Optional[Tensor] = None
    logits: Optional[Tensor] = None


@jaxtyped(typechecker=beartype)
@dataclass(frozen=True)
class FinalReadout:
    """The frozen readout of every target atom, with its constants.

    Attributes:
        readout: the engine's input (``u [B', P', k*a, d]``, ``1/s``, positions).
        atoms: the resolved targets.
        positions: the explained positions.
        bias: ``b_U`` of each atom (0 for directions), ``[B', P', k*a]``.
        norm_bias: the final norm's bias read by each atom, ``[B', P', k*a]``.
    """

    readout: Readout
    atoms: Atoms
    positions: Positions
    bias: Float[Tensor, "rb rp ka"]
    norm_bias: Float[Tensor, "rb rp ka"]
    has_b_U: bool
    has_norm_bias: bool


@jaxtyped(typechecker=beartype)
@dataclass(frozen=True)
class Explained:
    """What the terms add up to: ``values [B, P, k]``, and the per-atom ``weights [B, P, k, a]``
    that turn atom terms into target terms (coefficients, times ``rho`` post soft-cap)."""

    weights: Float[Tensor, "batch pos k a"]
    values: Float[Tensor, "batch pos k"]
    explains: str

    @property
    def trivial(self) -> bool:
        """One atom per target with weight 1: the atom terms are the target terms."""
        return self.weights.shape[3] == 1 and bool((self.weights == 1).all())


def predicted(rec: Recorded) -> Tensor:
    """The model's top prediction at the last position, ``[batch]``."""
    if rec.logits is not None:
        return rec.logits[:, -1].argmax(-1).to(rec.cache.device)
    cv = rec.cache
    view, norm = cv.view, cv.view.final_norm
    # the last position, read where it lives and unembedded where W_U lives
    x = cv.get(Site.FINAL_RESID, native=True)[:, -1:]
    scale = cv.get(norm.site, native=True)[:, -1:].to(x.device) if norm.has_scale else None
    x = norm.apply(x.to(cv.dtype), scale)
    W_U = view.unembed_matrix()
    lg = x[:, -1].to(W_U.device, W_U.dtype) @ W_U
    b = view.unembed_bias()
    return cv.home((lg if b is None else lg + b).argmax(-1))


def _atoms_vectors(cv: CacheView, atoms: Atoms) -> tuple[Tensor, Tensor]:
    """``vec [B', P', K, d]`` and ``bias [B', P', K]`` of every atom."""
    ids = atoms.ids.clamp(min=0).to(cv.device)
    cols, bias = cv.view.unembed_columns(ids, cv.dtype)
    cols, bias = cols.to(cv.device), bias.to(cv.device)
    tok = atoms.token_atom.to(cv.device)
    if atoms.vectors is not None:
        dirs = atoms.vectors.to(cv.device, cv.dtype)[None, None]
        cols = torch.where(tok[..., None], cols, dirs)
    bias = torch.where(tok, bias, torch.zeros_like(bias))
    B, P, k, a = ids.shape
    return cols.reshape(B, P, k * a, -1), bias.reshape(B, P, k * a)


def final_readout(rec: Recorded, target: Any, pos: Any) -> FinalReadout:
    """The frozen final readout for ``target`` at ``pos``."""
    cv = rec.cache
    positions = resolve_positions(pos, cv.batch, cv.n_ctx, cv.caller)
    index = positions.index.to(cv.device)
    atoms, _ = resolve_targets(
        cv.view,
        target,
        cv.batch,
        cv.n_ctx,
        positions.every,
        rec.tokens,
        lambda: predicted(rec),
        cv.caller,
    )
    atoms = atoms.single()
    vec, bias = _atoms_vectors(cv, atoms)
    norm = cv.view.final_norm
    readout = Readout(
        u=norm.pull_back(vec),
        inv_s=cv.inv_scale_or_one(norm, index),
        positions=index,
        attn_layers=cv.view.n_layers,
        mlp_layers=cv.view.n_layers,
    )
    return FinalReadout(
        readout=readout,
        atoms=atoms,
        positions=Positions(index, positions.every),
        bias=bias,
        norm_bias=norm.constant(vec),
        has_b_U=cv.view.has_b_U,
        has_norm_bias=norm.bias is not None,
    )


def softcap_ratio(z: Tensor, cap: float) -> Tensor:
    """``rho = cap * tanh(z / cap) / z`` (1 where ``z`` is 0): post-cap = ``rho`` * pre-cap."""
    capped = cap * torch.tanh(z / cap)
    nonzero = z.abs() > _RHO_EPS
    return torch.where(
        nonzero, capped / torch.where(nonzero, z, torch.ones_like(z)), torch.ones_like(z)
    )


def explain(rec: Recorded, fr: FinalReadout, softcap: Softcap) -> Explained:
    """The per-atom weights, the explained values and what they are."""
    cv, atoms, r = rec.cache, fr.atoms, fr.readout
    B, P = r.positions.shape
    # read where the final residual stream lives (a model split across devices: the last)
    x = cv.at(Site.FINAL_RESID, None, r.positions, native=True)
    z = cv.home(dot(x, r.u.to(x.device)) * r.inv_s.to(x.device)[:, :, None])
    z = z + (fr.bias + fr.norm_bias)
    k, a = atoms.coef.shape[2], atoms.coef.shape[3]
    z = z.reshape(B, P, k, a)
    coef = atoms.coef.to(cv.device, cv.dtype).expand(B, P, k, a)
    tok = atoms.token_atom.to(cv.device).expand(B, P, k, a)
    cap = cv.view.softcap
    if cap is None:
        weights, atom_val, explains = coef, z, "logit"
    elif softcap == "pre":
        weights, atom_val, explains = coef, z, "pre-softcap logit"
    else:
        rho = torch.where(tok, softcap_ratio(z, cap), torch.ones_like(z))
        weights = coef * rho
        atom_val = torch.where(tok, cap * torch.tanh(z / cap), z)
        explains = "post-softcap logit (rho frozen)"
    if rec.logits is not None and (cap is None or softcap == "post"):
        rows = torch.arange(B, device=cv.device)[:, None, None]
        ids = atoms.ids.to(cv.device).clamp(min=0).expand(B, P, k, a).reshape(B, P, -1)
        at = rec.logits.device  # a model split across devices returns them from its last
        model_val = rec.logits[rows.to(at), r.positions[:, :, None].to(at), ids.to(at)]
        model_val = model_val.to(cv.device, cv.dtype)  # [B, P, k*a]: no [B,P,vocab] copy
        atom_val = torch.where(tok, model_val.reshape(B, P, k, a), atom_val)
    if bool((~tok & (coef != 0)).any()):
        explains = explains if bool(tok.any()) else "readout"
    return Explained(weights=weights, values=(coef * atom_val).sum(-1), explains=explains)


def weigh(values: Tensor, weights: Tensor) -> Tensor:
    """Atom terms ``[B, P, k*a, C]`` -> target terms ``[B, P, k, C]``.

    ``weights`` is ``[B|1, P|1, k, a]``."""
    B, P, _, C = values.shape
    k, a = weights.shape[2], weights.shape[3]
    if weights.shape[1] == 1 and P != 1:  # one explained position, P read positions (chains)
        return torch.einsum("bpkac,bka->bpkc", values.reshape(B, P, k, a, C), weights[:, 0])
    return torch.einsum("bpkac,bpka->bpkc", values.reshape(B, P, k, a, C), weights)


def read_logits(
    rec: Recorded, target: Any, pos: Any, softcap: Softcap
) -> tuple[FinalReadout, Explained]:
    """The frozen final readout of ``target`` at ``pos`` and what its terms add up to."""
    fr = final_readout(rec, target, pos)
    return fr, explain(rec, fr, softcap)


def logit_constants(fr: FinalReadout) -> list:
    """The final readout's constant terms: ``b_U`` and the final norm's bias, each with its
    one-component table (the ``extra`` blocks of :func:`~tlprisms._core.engine.split_writes`)."""
    extra = []
    if fr.has_b_U:
        extra.append((fr.bias, ComponentTable.block("b_U")))
    if fr.has_norm_bias:
        extra.append((fr.norm_bias, ComponentTable.block("ln_final.b")))
    return extra


def target_labels(fr: FinalReadout, B: int, P: int, k: int) -> np.ndarray:
    """The label of every target, ``[B, P or 1, k]``."""
    labels = fr.atoms.labels
    return np.array(np.broadcast_to(labels, (B, P if labels.shape[1] != 1 else 1, k)))
