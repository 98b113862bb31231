"""The readout prism: any linear read of the residual stream, split by writer.

A probe direction, an SAE encoder row, a neuron's ``W_in`` column or a column of ``W_V``
reads the residual stream ``x`` at some layer, through a frozen norm or raw:

    read = norm(x) . u + bias = x . P(w * u) / s + (b . u + bias)

with ``s`` the norm's cached scale at each position. ``x`` is the sum of the writes before
that point, so the read splits into one term per write (split further into heads x sources
and neurons where asked) plus the constant ``readout.b``, exactly.

Phases of :func:`run`: (1) resolve the stream, its norm and the positions; (2) split every
write into that stream by the engine; (3) the structural check; (4) keep the largest terms
when ``top_k``/``min_abs`` ask.
"""

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from beartype import beartype
from jaxtyping import Float, Int, jaxtyped
from torch import Tensor

from tlprisms._core import arguments as check
from tlprisms._core.engine import Readout, Split, Writes, split_writes
from tlprisms._core.errors import ArgumentError
from tlprisms._core.ops import dot
from tlprisms._core.policy import refuse_broken
from tlprisms._core.readout import Recorded
from tlprisms._core.request import Request
from tlprisms._core.table import ComponentTable
from tlprisms._core.targets import resolve_positions
from tlprisms._core.terms import Terms, keep_largest
from tlprisms._seam import Site

__all__ = ["READ_AT", "ReadAt", "StreamRead", "read_at", "run"]

#: where a readout can read, and the residual stream each reads
READ_AT = {
    "ln1": Site.RESID_PRE,
    "ln2": Site.RESID_MID,
    "ln_final": Site.RESID_POST,
    "resid_pre": Site.RESID_PRE,
    "resid_mid": Site.RESID_MID,
    "resid_post": Site.RESID_POST,
}
ReadAt = Literal["ln1", "ln2", "ln_final", "resid_pre", "resid_mid", "resid_post"]


@jaxtyped(typechecker=beartype)
@dataclass(frozen=True)
class StreamRead:
    """A residual readout split by writer, and the readout's own value ``[B, P, K]``."""

    terms: Writes
    explained: Float[Tensor, "batch pos k"]
    positions: Int[Tensor, "batch pos"]
    layer: int


def read_at(
    rec: Recorded, vector: Any, layer: Any, pos: Any, at: str, bias: Any, split: Split
) -> StreamRead:
    """Split ``norm(x) . u + bias`` for ``x`` the residual stream at ``at`` of ``layer``."""

    cv = rec.cache
    view, caller = cv.view, cv.caller
    L = view.n_layers
    check.choice(at, "at", tuple(READ_AT), caller)
    layer = check.layer(view, layer, caller)
    if at == "ln_final" and layer != L - 1:
        raise ArgumentError(
            f"{caller}: at='ln_final' reads after the last layer; pass layer={L - 1} (or -1)."
        )
    site = READ_AT[at]
    if view.parallel and site is Site.RESID_MID:
        site = Site.RESID_PRE
    if view.attn_only and at in ("ln2", "resid_mid"):
        raise ArgumentError(f"{caller}: this model has no MLPs, so no {at}.")
    if (
        not isinstance(vector, Tensor)
        or not vector.dtype.is_floating_point
        or vector.ndim not in (1, 2)
        or vector.shape[-1] != view.d_model
    ):
        got = (
            f"shape {tuple(vector.shape)}, dtype {vector.dtype}"
            if isinstance(vector, Tensor)
            else type(vector).__name__
        )
        raise ArgumentError(
            f"{caller}: the readout vector must be a float tensor [d_model] or "
            f"[k, d_model] with d_model={view.d_model}; got {got}."
        )
    check.finite(vector, "the readout vector", caller)
    u = (vector[None] if vector.ndim == 1 else vector).detach().to(cv.device, cv.dtype)
    K = u.shape[0]
    positions = resolve_positions(pos, cv.batch, cv.n_ctx, caller).index.to(cv.device)
    norm = {"ln1": view.ln1[layer], "ln2": view.ln2[layer], "ln_final": view.final_norm}.get(at)
    if norm is not None:
        uu = norm.pull_back(u)[None, None]
        inv_s = cv.inv_scale_or_one(norm, positions)
        const = norm.constant(u)
    else:
        uu, inv_s = u[None, None], cv.inv_scale_or_one(None, positions)
        const = torch.zeros(K, dtype=cv.dtype, device=cv.device)
    if bias is not None:
        if not (check.is_real(bias) or isinstance(bias, Tensor)) or isinstance(bias, bool):
            raise ArgumentError(
                f"{caller}: bias={bias!r}; pass a number or a tensor of one "
                "number per readout vector."
            )
        b = torch.as_tensor(
            float(bias) if check.is_real(bias) else bias, dtype=cv.dtype, device=cv.device
        )
        if b.ndim > 1 or (b.ndim == 1 and b.shape[0] not in (1, K)):
            raise ArgumentError(
                f"{caller}: bias has shape {tuple(b.shape)}; pass a number or "
                f"one number per readout vector ({K})."
            )
        const = const + check.finite(b, "bias", caller).expand(K)
    layers_in = {
        Site.RESID_PRE: (layer, layer),
        Site.RESID_MID: (layer + 1, layer),
        Site.RESID_POST: (layer + 1, layer + 1),
    }[site]
    r = Readout(
        u=uu, inv_s=inv_s, positions=positions, attn_layers=layers_in[0], mlp_layers=layers_in[1]
    )
    terms = split_writes(
        cv, r, split, extra=[(const[None, None], ComponentTable.block("readout.b", layer=layer))]
    )
    x = cv.at(site, layer, positions)
    explained = dot(x, uu) * inv_s[:, :, None] + const
    return StreamRead(terms=terms, explained=explained, positions=positions, layer=layer)


def run(rec: Recorded, request: Request, split: Split) -> Terms:
    """The readout prism's terms for ``request`` (its vector, layer, pos, stream and bias)."""
    rt = read_at(
        rec, request.vector, request.layer, request.pos, request.stream, request.bias, split
    )
    refuse_broken(rec.cache, rt.terms.values, rt.explained, rt.terms.layer_gap)
    K = rt.explained.shape[-1]
    at = request.stream
    labels = np.array([[[f"u{k}@{at}{rt.layer}" for k in range(K)]]], dtype=object)
    terms = Terms(
        values=rt.terms.values,
        table=rt.terms.table,
        explained=rt.explained,
        positions=rt.positions,
        labels=labels,
        explains=f"readout at {at} of layer {rt.layer}",
        name="readout",
    )
    return keep_largest(terms, request.top_k, request.min_abs)
