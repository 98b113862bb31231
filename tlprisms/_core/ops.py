"""Two tensor helpers every prism uses: gather read positions, and dot with a readout."""

import torch
from jaxtyping import Float, Int, Shaped
from torch import Tensor

__all__ = ["gather_pos", "dot"]


def gather_pos(
    x: Shaped[Tensor, "batch n *rest"], positions: Int[Tensor, "batch pos"], dtype: torch.dtype
) -> Shaped[Tensor, "batch pos *rest"]:
    """``x[b, positions[b, p]]`` for ``x [B, n, ...]`` -> ``[B, P, ...]`` in ``dtype``."""
    B, P = positions.shape
    if P == x.shape[1] and bool((positions == torch.arange(P, device=positions.device)).all()):
        return x.to(dtype)
    rows = torch.arange(B, device=x.device)[:, None]
    return x[rows, positions.to(x.device)].to(dtype)


def dot(
    x: Float[Tensor, "batch pos d_model"], u: Float[Tensor, "rb rp k d_model"]
) -> Float[Tensor, "batch pos k"]:
    """``x [B, P, d]`` . ``u [B', P', K, d]`` -> ``[B, P, K]``, without expanding ``u``."""
    B, P, d = x.shape
    if u.shape[0] == 1 and u.shape[1] == 1:
        return (x.reshape(B * P, d) @ u[0, 0].T).reshape(B, P, -1)
    return torch.einsum("bpd,bpkd->bpk", x, u.expand(B, P, *u.shape[2:]))
