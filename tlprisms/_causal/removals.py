"""What verification and ablation share: the model run again, and one term's removal.

:func:`rerun_inputs` checks that the model is the one the prism was made from (eval mode,
the cache's provenance check) and gives the tokens and attention mask to run it with;
:func:`check_rerun` refuses a re-run that does not reproduce the recorded forward pass.
:func:`select_terms` picks the terms a verification checks, :func:`removal_of` says what
removing one component's write means (a :class:`~tlprisms._seam.Removal`), :func:`hops_of`
turns a chain's path into the hops a frozen run passes the change through.
"""

from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from tlprisms._core.errors import ArgumentError, CacheError, UnsupportedModelError
from tlprisms._core.readout import Recorded
from tlprisms._core.result import Decomposition
from tlprisms._seam import CacheView, Removal, Site, Through

__all__ = [
    "VERIFY_FACTOR",
    "RERUN_RTOL",
    "RERUN_RTOL_LOWP",
    "WRITERS",
    "rerun_inputs",
    "check_rerun",
    "select_terms",
    "checkable",
    "removal_of",
    "hops_of",
    "bias_removable",
]

#: an intervention may differ from its term by this many completeness tolerances
#: (``t * max(1, |explained|, sum |terms|)``, ``t`` = 1e-5 in float32): the intervention adds
#: the rounding of one more forward pass and of a difference of two residual streams
VERIFY_FACTOR = 10.0
#: a re-run's clean copy must reproduce the recorded stream to this fraction of its size
#: (float32/float64; the rows run in another batch, so only rounding may differ)
RERUN_RTOL = 1e-4
#: the same for bf16/fp16 models
RERUN_RTOL_LOWP = 5e-2
#: the component kinds verified by removing their write
WRITERS = ("embed", "pos_embed", "attn", "head", "mlp", "neuron", "b_O", "b_out")


# ----------------------------------------------------------------------------- the model
def _inferred_mask(cv: CacheView) -> Optional[Tensor]:
    """The ``attention_mask [batch, pos]`` the cache was recorded with, read from layer 0's
    pattern: a key is masked when no real query after it attends to it in any head (a real
    query puts no weight on later keys). None when nothing is masked or no pattern is cached."""
    if not cv.has(Site.PATTERN, 0):
        return None
    pat = cv.get(Site.PATTERN, 0).detach()
    n = pat.shape[-1]
    zero = (pat == 0).all(1)  # [B, Q, K]
    future = torch.ones(n, n, dtype=torch.bool, device=pat.device).triu(1)
    real = (zero | ~future).all(-1)  # [B, Q]: no weight on any later key
    q = torch.arange(n, device=pat.device)
    later = q[:, None] > q[None, :]  # [Q, K]: query after key
    seen = (real[:, :, None] & later).any(1)  # a real query comes after the key
    masked = seen & ((zero | ~(real[:, :, None] & (q[:, None] >= q[None, :]))).all(1))
    if not bool(masked.any()):
        return None
    return (~masked).long()


def rerun_inputs(rec: Recorded, caller: str, what: str) -> tuple[Tensor, Optional[Tensor]]:
    """The tokens and attention mask to run the prism's model again with, after checking that
    the model is the one the prism was made from: in eval mode and passing the cache's
    provenance check (layer 0's values recomputed with the current weights)."""
    cv: CacheView = rec.cache
    view = cv.view
    dropout = [
        float(m.p)
        for m in view.model.modules()
        if isinstance(m, torch.nn.Dropout) and m.training and m.p > 0
    ]
    if view.training and dropout:
        raise UnsupportedModelError(
            f"{caller}: the model is in training mode with dropout (p={max(dropout):g}) active "
            f"(model.train() was called after the prism was made), so {what} would run it "
            "with dropout and give a different answer per call. Call model.eval() first."
        )
    tokens = rec.tokens
    if tokens is None and cv.has(Site.TOKENS):
        tokens = cv.get(Site.TOKENS).long()
    if tokens is None:
        raise ArgumentError(
            f"{caller}: {what} runs the model again, which needs the input "
            "tokens; build the prism with LogitPrism.run(model, tokens) or "
            "LogitPrism(model, cache, tokens=tokens)."
        )
    try:
        cv.verify(None)
    except CacheError as exc:
        raise CacheError(
            f"{caller}: the model changed after the prism was made (its weights no longer "
            f"reproduce the cache), so {what} cannot run it again. Build the prism again with "
            f"the model as it is now. ({exc})"
        ) from None
    return tokens.to(cv.device), _inferred_mask(cv)


def check_rerun(cv: CacheView, got: Tensor, want: Tensor, where: str, caller: str) -> None:
    """Refuse unless the re-run's clean stream ``got`` reproduces the recorded ``want``."""
    rtol = RERUN_RTOL_LOWP if cv.low_precision else RERUN_RTOL
    got, want = got.to(cv.dtype), want.to(got.device, cv.dtype)
    err = float((got - want).abs().max())
    size = float(want.abs().max())
    if not err <= rtol * max(1.0, size):
        raise CacheError(
            f"{caller}: running the model again does not reproduce the recorded forward pass "
            f"(the {where} differs by {err:.3g}, |value| up to {size:.3g}): the model changed "
            "after the prism was made (weights edited, a hook left on it), or the cache was "
            "recorded with inputs the prism cannot know (an attention_mask whose masked keys "
            "still get weight). Build the prism again with LogitPrism.run(model, ...) on "
            "unpadded prompts, or record the cache with the model as it is now."
        )


# ----------------------------------------------------------------------------- selection
def select_terms(
    result: Decomposition, ok: Tensor, k: int, sample: int, seed: int
) -> tuple[Tensor, Tensor]:
    """Flat indices into ``values`` of the ``k`` largest checkable terms and of ``sample``
    others drawn at random (seeded); ``ok [B, P, K, C]`` says which terms are checkable."""
    values = result.values.detach()
    B = values.shape[0]
    mask = ok.to(values.device)
    per_row = values[0].numel()
    cand_i, cand_v = [], []
    for b in range(B):
        score = torch.where(mask[b], values[b].abs(), torch.full_like(values[b], -1.0)).reshape(-1)
        n = min(k, per_row)
        v, i = score.topk(n) if n else (score[:0], torch.zeros(0, dtype=torch.long))
        cand_v.append(v)
        cand_i.append(i.cpu() + b * per_row)
    v, i = torch.cat([x.cpu() for x in cand_v]), torch.cat(cand_i)
    keep = v >= 0
    v, i = v[keep], i[keep]
    top = i[v.argsort(descending=True, stable=True)[:k]].cpu()
    flat_ok = ok.reshape(-1)  # built on the host (the component table is a numpy mask)
    n_ok = int(flat_ok.sum())
    want = min(sample, n_ok - top.numel())
    gen = torch.Generator().manual_seed(seed)
    taken = set(top.tolist())
    picked: list[int] = []
    if want > 0:
        flat = torch.nonzero(flat_ok)[:, 0]
        flat = flat[torch.randperm(flat.numel(), generator=gen)]
        picked = [x for x in flat[: want + top.numel()].tolist() if x not in taken][:want]
    return top, torch.as_tensor(picked, dtype=torch.long)


def checkable(result: Decomposition, writer: np.ndarray) -> tuple[Decomposition, Tensor]:
    """The result laid out densely and which of its terms can be checked, per
    ``(batch, pos, target, comp)``: a sparse result's kept slots only (a component a row did
    not keep is in that row's remainder)."""
    B, P, K = result.values.shape[:3]
    w = torch.as_tensor(writer)
    if result.index is not None:
        kept = torch.zeros(B, P, K, len(result.components), dtype=torch.bool)
        idx = result.index.cpu().long()
        rows = torch.nonzero(idx >= 0)
        kept[rows[:, 0], rows[:, 1], rows[:, 2], idx[idx >= 0]] = True
        dense = result.to_dense()
        # to_dense keeps the components used anywhere, in table order
        used = kept.reshape(-1, kept.shape[-1]).any(0)
        return dense, kept[..., used] & w[used][None, None, None]
    ok = w[None, None, None].expand(B, P, K, -1).clone()
    if result.components.of is not None:
        # laid out densely from a sparse result: 0 where the row kept it in a remainder
        ok &= result.values.detach().cpu() != 0
    return result, ok


# ----------------------------------------------------------------------------- removals
def removal_of(
    kind: str,
    c: Any,
    at: int,
    b: int,
    embed: Tensor,
    pos_embed: Optional[Tensor],
    view: Any,
    cv: CacheView,
) -> Removal:
    if kind == "embed":
        return Removal("embed", -1, at, vector=embed[b, at])
    if kind == "pos_embed":
        if pos_embed is None:  # pragma: no cover - a pos_embed term needs learned positions
            raise ArgumentError("verify: a pos_embed term on a model without learned positions.")
        return Removal("pos_embed", -1, at, vector=pos_embed[b, at])
    if kind == "b_O":
        return Removal("b_O", c.layer, at, vector=view.b_O(c.layer, cv.dtype, cv.device))
    if kind == "b_out":
        return Removal("b_out", c.layer, at, vector=view.b_out(c.layer, cv.dtype, cv.device))
    if kind in ("attn", "head"):
        return Removal(
            "heads",
            c.layer,
            at,
            index=c.head if kind == "head" else -1,
            src=c.src if kind == "head" else -1,
        )
    return Removal("neurons", c.layer, at, index=c.neuron if kind == "neuron" else -1)


def hops_of(path: tuple, i: int, at: int, patterns: Any) -> tuple[tuple, int]:
    """The path's hops, each with the position it writes (a head hop with its recorded pattern
    row), and the position the removed write is at: what the last hop reads (a head hop
    without ``src`` reads each term's ``at``)."""
    out, hops = i, []
    for kind, layer, index, src in path:
        row = patterns(layer, index, out) if kind == "head" else None
        hops.append(Through(kind, layer, index, out, row))
        if kind == "head":
            out = src if src is not None else at
    return tuple(hops), out


def bias_removable(view: Any, kind: str, layer: int) -> bool:
    post = view.ln1_post if kind == "b_O" else view.ln2_post
    return layer >= 0 and (layer >= len(post) or post[layer] is None)
