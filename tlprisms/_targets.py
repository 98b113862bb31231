"""What a prism explains: targets and positions.

A *target* is a linear read of the final (normalised) residual stream: one token's logit
(``W_U[:, t]`` plus ``b_U[t]``), a logit difference (:class:`LogitDiff`), or any direction
(:class:`Direction`). Internally every target is a combination ``sum_a coef_a * atom_a`` of
at most two *atoms*, each a vector in ``d_model`` plus a bias; token atoms are the ones a
soft-cap applies to. Targets are shared by the batch or given per row (:class:`PerRow`, or an
integer tensor ``[batch]`` / ``[batch, k]``); :class:`NextToken` gives each position the token
that follows it.
"""

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from tlprisms._errors import PositionError, TargetError

__all__ = ["LogitDiff", "Direction", "PerRow", "NextToken", "Atoms", "resolve_targets",
           "resolve_positions"]

TokenLike = Union[int, str]


@dataclass(frozen=True)
class LogitDiff:
    """The difference of two logits, ``logit[positive] - logit[negative]``.

    >>> LogitDiff(" Paris", " London")
    LogitDiff(positive=' Paris', negative=' London')
    """

    positive: TokenLike
    negative: TokenLike


@dataclass(frozen=True, eq=False)
class Direction:
    """A direction ``u`` in the normalised final residual space (where ``W_U`` reads).

    Its "logit" is ``ln_final(x) . u``; its readout on the raw residual is ``P(w * u) / s``.
    """

    vector: Tensor
    label: str = "direction"

    def __repr__(self) -> str:
        return f"Direction({self.label!r}, d_model={self.vector.shape[-1]})"


@dataclass(frozen=True)
class PerRow:
    """One target per batch row: ``PerRow([" Paris", " Rome"])`` for a batch of two."""

    targets: Sequence[Any]


@dataclass(frozen=True)
class NextToken:
    """Each position's own next input token; the last position gets the model's top prediction.

    Needs the input tokens: build the prism with ``LogitPrism.run(model, tokens)`` or pass
    ``tokens=`` to ``LogitPrism``.
    """


@dataclass
class Atoms:
    """Resolved targets. Leading axes ``[B, P]`` are 1 where a target is shared."""

    ids: Tensor  # [B, P, k, a] token ids (-1 for a direction atom)
    vectors: Optional[Tensor]  # [k, a, d_model] for direction atoms (shared), or None
    coef: Tensor  # [B, P, k, a]
    labels: np.ndarray  # [B, P, k] str
    token_atom: Tensor  # [B, P, k, a] bool: a token logit (soft-capped) vs a direction
    extra: dict = field(default_factory=dict)

    @property
    def k(self) -> int:
        return self.ids.shape[2]


def _token_str(tokenizer: Any, tid: int) -> str:
    if tokenizer is None:
        return f"#{tid}"
    try:
        return repr(tokenizer.decode([tid]))
    except Exception:  # noqa: BLE001 - labels only
        return f"#{tid}"


def _to_id(view: Any, token: Any, caller: str) -> int:
    if isinstance(token, (bool, np.bool_)):
        raise TargetError(f"{caller}: target {token!r} is a bool; pass a token id or string.")
    if isinstance(token, (int, np.integer)) or (isinstance(token, Tensor) and token.ndim == 0):
        tid = int(token)
        if not 0 <= tid < view.d_vocab:
            raise TargetError(
                f"{caller}: target token id {tid} is outside the vocabulary [0, {view.d_vocab}); "
                "pass an id from model.to_tokens(...) or a single-token string."
            )
        return tid
    if isinstance(token, str):
        tok = view.tokenizer()
        if tok is None:
            raise TargetError(
                f"{caller}: target {token!r} is a string but the model has no tokenizer; pass "
                "the token id instead, or attach a tokenizer (model.set_tokenizer(...))."
            )
        ids = tok.encode(token, add_special_tokens=False)
        if len(ids) != 1:
            pieces = [tok.decode([i]) for i in ids]
            raise TargetError(
                f"{caller}: target {token!r} is {len(ids)} tokens under this model's tokenizer "
                f"{pieces!r} (ids {list(ids)}), not one. Pass a single token (often with a "
                "leading space, e.g. ' Paris'), or its id; a prism explains one logit at a time."
            )
        return int(ids[0])
    raise TargetError(
        f"{caller}: cannot read {token!r} (type {type(token).__name__}) as a target; pass a "
        "token id, a single-token string, tlprisms.LogitDiff, tlprisms.Direction, a list of "
        "these, tlprisms.PerRow([...]) or an integer tensor [batch] / [batch, k]."
    )


def _one(view: Any, target: Any, caller: str) -> tuple[list[int], list[float], str, bool, Optional[Tensor]]:
    """(atom ids, coefs, label, is_token, direction vector) for one target."""
    tok = view.tokenizer()
    if isinstance(target, LogitDiff):
        a = _to_id(view, target.positive, caller)
        b = _to_id(view, target.negative, caller)
        return [a, b], [1.0, -1.0], f"{_token_str(tok, a)} - {_token_str(tok, b)}", True, None
    if isinstance(target, Direction):
        v = target.vector
        if v.ndim != 1 or v.shape[0] != view.d_model:
            raise TargetError(
                f"{caller}: Direction {target.label!r} has shape {tuple(v.shape)}, expected "
                f"({view.d_model},) = (d_model,)."
            )
        return [-1], [1.0], target.label, False, v
    tid = _to_id(view, target, caller)
    return [tid], [1.0], _token_str(tok, tid), True, None


def _build(view: Any, rows: list[list[Any]], caller: str) -> Atoms:
    """rows[b][k] targets -> Atoms with B = len(rows), P = 1."""
    B, k = len(rows), len(rows[0])
    ids = torch.full((B, 1, k, 2), -1, dtype=torch.long)
    coef = torch.zeros((B, 1, k, 2))
    is_tok = torch.zeros((B, 1, k, 2), dtype=torch.bool)
    labels = np.empty((B, 1, k), dtype=object)
    vectors: Optional[Tensor] = None
    for b, row in enumerate(rows):
        if len(row) != k:
            raise TargetError(f"{caller}: every batch row needs the same number of targets.")
        for j, target in enumerate(row):
            aids, coefs, label, token, vec = _one(view, target, caller)
            if vec is not None:
                if B != 1:
                    raise TargetError(f"{caller}: a Direction target must be shared by the batch.")
                if vectors is None:
                    vectors = torch.zeros(k, 2, view.d_model, dtype=torch.float64)
                vectors[j, 0] = vec.detach().to(torch.float64).cpu()
            for a, (tid, c) in enumerate(zip(aids, coefs)):
                ids[b, 0, j, a] = tid
                coef[b, 0, j, a] = c
                is_tok[b, 0, j, a] = token
            labels[b, 0, j] = label
    return Atoms(ids=ids, vectors=vectors, coef=coef, labels=labels, token_atom=is_tok)


def resolve_targets(view: Any, target: Any, batch: int, n_pos: int, pos_all: bool,
                    tokens: Optional[Tensor], predicted: Any, caller: str) -> Atoms:
    """Turn what the user passed as ``target`` into :class:`Atoms`.

    Args:
        predicted: a callable giving the model's top prediction at the last position,
            ``[batch]`` (for :class:`NextToken`).
    """
    if isinstance(target, NextToken):
        if tokens is None:
            raise TargetError(
                f"{caller}: NextToken needs the input tokens; build the prism with "
                "LogitPrism.run(model, tokens) or LogitPrism(model, cache, tokens=tokens)."
            )
        if not pos_all:
            raise TargetError(f"{caller}: NextToken is for pos='all'; for one position pass "
                              "the token itself.")
        target = torch.empty_like(tokens)
        target[:, :-1] = tokens[:, 1:]
        target[:, -1] = predicted()
    if isinstance(target, Tensor) and not target.dtype.is_floating_point and target.ndim >= 1:
        t = target.detach().cpu().long()
        if pos_all and t.ndim == 2 and t.shape == (batch, n_pos):
            t = t[:, :, None]
            per_pos = True
        elif t.ndim in (1, 2) and t.shape[0] == batch:
            t = t.reshape(batch, -1)[:, None, :]
            per_pos = False
        else:
            want = f"[batch={batch}] or [batch, k]" + (f" or [batch, pos={n_pos}]" if pos_all else "")
            raise TargetError(
                f"{caller}: a tensor target is read per batch row and must have shape {want}; "
                f"got {tuple(target.shape)}. For targets shared by the batch pass a list."
            )
        if (t < 0).any() or (t >= view.d_vocab).any():
            raise TargetError(f"{caller}: target ids must lie in [0, {view.d_vocab}).")
        B, P, k = t.shape
        ids = torch.full((B, P, k, 2), -1, dtype=torch.long)
        ids[..., 0] = t
        coef = torch.zeros((B, P, k, 2))
        coef[..., 0] = 1.0
        is_tok = torch.zeros((B, P, k, 2), dtype=torch.bool)
        is_tok[..., 0] = True
        tok = view.tokenizer()
        cache_lab: dict[int, str] = {}
        labels = np.empty((B, P, k), dtype=object)
        flat = t.reshape(-1).tolist()
        for idx, tid in enumerate(flat):
            if tid not in cache_lab:
                cache_lab[tid] = _token_str(tok, tid)
            labels.reshape(-1)[idx] = cache_lab[tid]
        return Atoms(ids=ids, vectors=None, coef=coef, labels=labels, token_atom=is_tok,
                     extra={"per_pos": per_pos})
    if isinstance(target, PerRow):
        rows = list(target.targets)
        if len(rows) != batch:
            raise TargetError(
                f"{caller}: PerRow has {len(rows)} targets but the batch has {batch} rows; give "
                "one target (or one list of targets) per row."
            )
        rows = [list(r) if isinstance(r, (list, tuple)) else [r] for r in rows]
        return _build(view, rows, caller)
    if isinstance(target, (list, tuple)):
        if len(target) == 0:
            raise TargetError(f"{caller}: the target list is empty.")
        return _build(view, [list(target)], caller)
    return _build(view, [[target]], caller)


def resolve_positions(pos: Any, batch: int, n_ctx: int, caller: str) -> tuple[Tensor, bool]:
    """``pos`` -> (positions ``[batch, P]`` as non-negative indices, whether it is 'all')."""
    if isinstance(pos, str):
        if pos != "all":
            raise PositionError(f"{caller}: pos={pos!r}; pass an int, one int per batch row, "
                                "or 'all'.")
        return torch.arange(n_ctx).expand(batch, n_ctx), True
    if isinstance(pos, Tensor):
        pos = pos.tolist()
    if isinstance(pos, (list, tuple)):
        if len(pos) != batch:
            raise PositionError(
                f"{caller}: got {len(pos)} positions for a batch of {batch}; give one index per "
                "batch row (e.g. the last non-padding token of each prompt), or a single int."
            )
        values = [int(p) for p in pos]
    else:
        values = [int(pos)] * batch
    out = []
    for p in values:
        if not -n_ctx <= p < n_ctx:
            raise PositionError(
                f"{caller}: position {p} is out of range for inputs of {n_ctx} tokens; use "
                f"0..{n_ctx - 1} or -{n_ctx}..-1."
            )
        out.append(p % n_ctx)
    return torch.tensor(out, dtype=torch.long)[:, None], False
