"""The frozen final readout: targets -> directions on the final residual stream.

The logit of token ``t`` at position ``i`` reads the final residual ``x`` through the frozen
final norm: ``logit_t = x . r_t + c_t`` with ``r_t = P(w * W_U[:, t]) / s`` and
``c_t = b . W_U[:, t] + b_U[t]``. Targets resolve to at most two *atoms* each (a logit
difference has two); :func:`final_readout` builds ``P(w * u)`` per atom, ``1/s`` per read
position and the constants, and :func:`explained` gives the per-atom weights (the frozen
soft-cap ratio for post-cap logits) and the values the terms must add up to.
"""

from typing import Any

import torch
from torch import Tensor

from tlprisms._engine import Readout, dot, gather_pos
from tlprisms._errors import PrismError
from tlprisms._seam import _param, cache_get
from tlprisms._targets import Atoms, resolve_positions, resolve_targets

__all__ = ["final_readout", "explained", "predicted"]


def predicted(prism: Any) -> Tensor:
    """The model's top prediction at the last position, ``[batch]``."""
    if prism.logits is not None:
        return prism.logits[:, -1].argmax(-1)
    view = prism.view
    norm = view.final_norm
    scale = (cache_get(prism.cache, norm.scale_hook, "NextToken")[:, -1:]
             if norm.has_scale else None)
    x = norm.apply(cache_get(prism.cache, view.final_resid_hook(), "NextToken")[:, -1:]
                   .to(prism.dtype), scale)
    W_U = prism.model.W_U.detach()
    b = _param(prism.model, "b_U")
    lg = x[:, -1].to(W_U.dtype) @ W_U
    if b is not None:
        lg = lg + b
    return lg.argmax(-1)


def _atoms_vectors(prism: Any, atoms: Atoms) -> tuple[Tensor, Tensor]:
    """``vec [B', P', K, d]`` and ``bias [B', P', K]`` of every atom."""
    ids = atoms.ids.clamp(min=0).to(prism.device)
    cols, bias = prism.view.unembed_columns(ids, prism.dtype)
    cols, bias = cols.to(prism.device), bias.to(prism.device)
    tok = atoms.token_atom.to(prism.device)
    if atoms.vectors is not None:
        dirs = atoms.vectors.to(prism.device, prism.dtype)[None, None]
        cols = torch.where(tok[..., None], cols, dirs)
    bias = torch.where(tok, bias, torch.zeros_like(bias))
    B, P, k, a = ids.shape
    return cols.reshape(B, P, k * a, -1), bias.reshape(B, P, k * a)


def final_readout(prism: Any, target: Any, pos: Any, caller: str) -> tuple[Readout, dict]:
    """The frozen final readout for ``target`` at ``pos`` (public for the chained prisms)."""
    positions, pos_all = resolve_positions(pos, prism.batch, prism.n_ctx, caller)
    positions = positions.to(prism.device)
    atoms = resolve_targets(prism.view, target, prism.batch, prism.n_ctx, pos_all, prism.tokens,
                            lambda: predicted(prism), caller)
    if atoms.coef.shape[-1] == 2 and not bool((atoms.coef[..., 1] != 0).any()):
        atoms = Atoms(ids=atoms.ids[..., :1], vectors=None if atoms.vectors is None
                      else atoms.vectors[:, :1], coef=atoms.coef[..., :1],
                      labels=atoms.labels, token_atom=atoms.token_atom[..., :1],
                      extra=atoms.extra)
    vec, bias = _atoms_vectors(prism, atoms)
    norm = prism.view.final_norm
    u = norm.pull_back(vec)
    B, P = positions.shape
    if norm.has_scale:
        s = cache_get(prism.cache, norm.scale_hook, caller)[..., 0]
        inv_s = 1.0 / gather_pos(s, positions, prism.dtype)
    else:
        inv_s = torch.ones(B, P, dtype=prism.dtype, device=prism.device)
    readout = Readout(u=u, inv_s=inv_s, positions=positions, attn_layers=prism.view.n_layers,
                      mlp_layers=prism.view.n_layers)
    info = {"atoms": atoms, "bias": bias, "norm_bias": norm.constant(vec),
            "has_norm_bias": norm.bias is not None,
            "has_b_U": _param(prism.model, "b_U") is not None}
    return readout, info


def explained(prism: Any, readout: Readout, info: dict, softcap: str, caller: str
          ) -> tuple[Tensor, Tensor, str]:
    """(per-atom weights ``[B,P,k,a]``, explained values ``[B,P,k]``, what they are)."""
    atoms: Atoms = info["atoms"]
    B, P = readout.positions.shape
    x = gather_pos(cache_get(prism.cache, prism.view.final_resid_hook(), caller),
                   readout.positions, prism.dtype)
    z = dot(x, readout.u) * readout.inv_s[:, :, None] + (info["bias"] + info["norm_bias"])
    k, a = atoms.coef.shape[2], atoms.coef.shape[3]
    z = z.reshape(B, P, k, a)
    coef = atoms.coef.to(prism.device, prism.dtype).expand(B, P, k, a)
    tok = atoms.token_atom.to(prism.device).expand(B, P, k, a)
    cap = prism.view.softcap
    if softcap not in ("post", "pre"):
        raise PrismError(f"{caller}: softcap={softcap!r}; use 'post' (the logit the model "
                         "outputs) or 'pre' (the logit before the soft-cap).")
    if cap is None:
        weights, atom_val, explains = coef, z, "logit"
    elif softcap == "pre":
        weights, atom_val, explains = coef, z, "pre-softcap logit"
    else:
        capped = cap * torch.tanh(z / cap)
        safe = torch.where(z.abs() > 1e-12, z, torch.ones_like(z))
        rho = torch.where(z.abs() > 1e-12, capped / safe, torch.ones_like(z))
        rho = torch.where(tok, rho, torch.ones_like(rho))
        weights = coef * rho
        atom_val = torch.where(tok, capped, z)
        explains = "post-softcap logit (rho frozen)"
    if prism.logits is not None and (cap is None or softcap == "post"):
        rows = torch.arange(B, device=prism.device)[:, None, None]
        ids = atoms.ids.to(prism.device).clamp(min=0).expand(B, P, k, a).reshape(B, P, -1)
        model_val = prism.logits[rows, readout.positions[:, :, None], ids]  # no [B,P,vocab] copy
        model_val = model_val.to(prism.dtype).reshape(B, P, k, a)
        atom_val = torch.where(tok, model_val, atom_val)
    if bool((~tok & (coef != 0)).any()):
        explains = explains if bool(tok.any()) else "readout"
    explained = (coef * atom_val).sum(-1)
    return weights, explained, explains
