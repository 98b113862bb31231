"""What a prism explains: targets and positions.

A *target* is a linear read of the final (normalised) residual stream: one token's logit
(``W_U[:, t]`` plus ``b_U[t]``), a logit difference (:class:`LogitDiff`), or any direction
(:class:`Direction`). Internally every target is a combination ``sum_a coef_a * atom_a`` of
at most two *atoms*, each a vector in ``d_model`` plus a bias; token atoms are the ones a
soft-cap applies to. Targets are shared by the batch or given per row (:class:`PerRow`, or an
integer tensor ``[batch]`` / ``[batch, k]``); :class:`NextToken` gives each position the token
that follows it.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np
import torch
from beartype import beartype
from jaxtyping import Bool, Float, Int, jaxtyped
from torch import Tensor

from tlprisms._core import arguments as check
from tlprisms._core.errors import NonFiniteError, PositionError, TargetError

__all__ = [
    "LogitDiff",
    "Direction",
    "PerRow",
    "NextToken",
    "Atoms",
    "Positions",
    "resolve_targets",
    "resolve_positions",
    "token_id",
]

TokenLike = Union[int, str]


@dataclass(frozen=True)
class LogitDiff:
    """The difference of two logits, ``logit[positive] - logit[negative]``.

    >>> LogitDiff(" Paris", " London")
    LogitDiff(positive=' Paris', negative=' London')
    """

    positive: TokenLike
    negative: TokenLike


@dataclass(frozen=True, eq=False, init=False)
class Direction:
    """A direction ``u`` in the normalised final residual space (where ``W_U`` reads).

    Its "logit" is ``ln_final(x) . u``; its readout on the raw residual is ``P(w * u) / s``.
    """

    vector: Tensor
    label: str = "direction"

    @check.entry
    def __init__(self, vector: Tensor, label: str = "direction") -> None:
        if not isinstance(vector, Tensor) or not vector.dtype.is_floating_point or vector.ndim != 1:
            what = (
                f"a {vector.dtype} tensor of shape {tuple(vector.shape)}"
                if isinstance(vector, Tensor)
                else f"a {type(vector).__name__}"
            )
            raise TargetError(
                f"Direction: vector must be a 1-D float tensor [d_model]; got "
                f"{what}. Wrap it: Direction(torch.tensor(...))."
            )
        if not isinstance(label, str):
            raise TargetError(f"Direction: label must be a string, got {label!r}.")
        object.__setattr__(self, "vector", vector)
        object.__setattr__(self, "label", label)

    def __repr__(self) -> str:
        return f"Direction({self.label!r}, d_model={self.vector.shape[-1]})"


@dataclass(frozen=True, init=False)
class PerRow:
    """One target per batch row: ``PerRow([" Paris", " Rome"])`` for a batch of two."""

    targets: Sequence[Any]

    @check.entry
    def __init__(self, targets: Sequence[Any]) -> None:
        if isinstance(targets, (str, bytes)) or not isinstance(targets, (Sequence, Tensor)):
            raise TargetError(
                f"PerRow: targets={targets!r:.60} is a {type(targets).__name__}, not a list; "
                "give one target per batch row, e.g. PerRow([' Paris', ' Rome'])."
            )
        object.__setattr__(self, "targets", targets)


@dataclass(frozen=True)
class NextToken:
    """Each position's own next input token; the last position gets the model's top prediction.

    Needs the input tokens: build the prism with ``LogitPrism.run(model, tokens)`` or pass
    ``tokens=`` to ``LogitPrism``.
    """


@jaxtyped(typechecker=beartype)
@dataclass(frozen=True)
class Atoms:
    """Resolved targets: each is ``sum_a coef[a] * atom[a]``, an atom a token's logit or a
    direction. Leading axes are 1 where a target is shared by the batch / positions."""

    ids: Int[Tensor, "tb tp k a"]  # token ids (-1 for a direction atom)
    vectors: Optional[Float[Tensor, "k a d_model"]]  # direction atoms (shared), or None
    coef: Float[Tensor, "tb tp k a"]
    labels: np.ndarray  # [tb, tp, k] str
    token_atom: Bool[Tensor, "tb tp k a"]  # a token logit (soft-capped) vs a direction

    @property
    def k(self) -> int:
        return self.ids.shape[2]

    def single(self) -> "Atoms":
        """The same targets with the unused second atom dropped (no logit differences)."""
        if self.coef.shape[-1] != 2 or bool((self.coef[..., 1] != 0).any()):
            return self
        return Atoms(
            ids=self.ids[..., :1],
            coef=self.coef[..., :1],
            labels=self.labels,
            vectors=None if self.vectors is None else self.vectors[:, :1],
            token_atom=self.token_atom[..., :1],
        )


@jaxtyped(typechecker=beartype)
@dataclass(frozen=True)
class Positions:
    """The explained positions: ``index[b, p]`` (non-negative), and whether they are every
    position of the input (``pos="all"``)."""

    index: Int[Tensor, "batch pos"]
    every: bool


def token_id(view: Any, token: Any, caller: str, what: str = "target") -> int:
    """One token id from an int (not a bool, not a float) or a single-token string."""
    if isinstance(token, (bool, np.bool_)) or (
        isinstance(token, Tensor) and token.ndim == 0 and not check.is_index(token)
    ):
        raise TargetError(
            f"{caller}: {what} {token!r} is not a token id (type "
            f"{type(token).__name__}); pass an integer id or a single-token string."
        )
    if isinstance(token, (float, np.floating)):
        raise TargetError(
            f"{caller}: {what} {token!r} is a float; token ids are integers. Pass "
            "an int or a single-token string."
        )
    if check.is_index(token):
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
        ids = view.encode(token)
        if not ids:
            raise TargetError(
                f"{caller}: {what} {token!r} encodes to no token at all; pass a "
                "non-empty single-token string or a token id."
            )
        unk = view.unknown_token_id()
        if (
            len(ids) == 1
            and unk is not None
            and ids[0] == unk
            and token != getattr(tok, "unk_token", None)
        ):
            raise TargetError(
                f"{caller}: {what} {token!r} is not in this model's vocabulary: its tokenizer "
                f"maps it to the unknown token {getattr(tok, 'unk_token', '')!r} (id {unk}). A "
                "prism of that would explain the unknown token's logit. Pass a word the "
                "vocabulary has (check model.to_str_tokens(...)), or its id."
            )
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


def _one(
    view: Any, target: Any, caller: str
) -> tuple[list[int], list[float], str, bool, Optional[Tensor]]:
    """(atom ids, coefs, label, is_token, direction vector) for one target."""
    if isinstance(target, LogitDiff):
        a = token_id(view, target.positive, caller, "LogitDiff.positive")
        b = token_id(view, target.negative, caller, "LogitDiff.negative")
        return [a, b], [1.0, -1.0], f"{view.token_label(a)} - {view.token_label(b)}", True, None
    if isinstance(target, Direction):
        v = target.vector
        if (
            not isinstance(v, Tensor)
            or v.ndim != 1
            or v.shape[0] != view.d_model
            or not v.dtype.is_floating_point
        ):
            raise TargetError(
                f"{caller}: Direction {target.label!r} has "
                f"{'shape ' + str(tuple(v.shape)) if isinstance(v, Tensor) else type(v).__name__}"
                f", expected a float tensor of shape ({view.d_model},) = (d_model,)."
            )
        if not bool(torch.isfinite(v).all()):
            raise NonFiniteError(
                f"{caller}: Direction {target.label!r} contains NaN or "
                "infinity; pass a finite vector."
            )
        return [-1], [1.0], target.label, False, v
    tid = token_id(view, target, caller)
    return [tid], [1.0], view.token_label(tid), True, None


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


def resolve_targets(
    view: Any,
    target: Any,
    batch: int,
    n_pos: int,
    pos_all: bool,
    tokens: Optional[Tensor],
    predicted: Callable[[], Tensor],
    caller: str,
) -> tuple[Atoms, bool]:
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
            raise TargetError(
                f"{caller}: NextToken is for pos='all'; for one position pass the token itself."
            )
        target = torch.empty_like(tokens)
        target[:, :-1] = tokens[:, 1:]
        target[:, -1] = predicted()
    if isinstance(target, Tensor) and target.ndim >= 1:
        if target.dtype.is_floating_point or target.dtype in (
            torch.bool,
            torch.complex64,
            torch.complex128,
        ):
            raise TargetError(
                f"{caller}: a tensor target holds token ids and must be an integer tensor; got "
                f"dtype {target.dtype}. Convert it with .long() if it really holds ids."
            )
        t = target.detach().cpu().long()
        if pos_all and t.ndim == 2 and t.shape == (batch, n_pos):
            t = t[:, :, None]
            per_pos = True
        elif t.ndim in (1, 2) and t.shape[0] == batch:
            t = t.reshape(batch, -1)[:, None, :]
            per_pos = False
        else:
            want = f"[batch={batch}] or [batch, k]" + (
                f" or [batch, pos={n_pos}]" if pos_all else ""
            )
            raise TargetError(
                f"{caller}: a tensor target is read per batch row and must have shape {want}; "
                f"got {tuple(target.shape)}. For targets shared by the batch pass a list."
            )
        if (t < 0).any() or (t >= view.d_vocab).any():
            bad = int(t[(t < 0) | (t >= view.d_vocab)][0])
            raise TargetError(
                f"{caller}: target id {bad} is outside the vocabulary; ids must lie "
                f"in [0, {view.d_vocab})."
            )
        B, P, k = t.shape
        ids = torch.full((B, P, k, 2), -1, dtype=torch.long)
        ids[..., 0] = t
        coef = torch.zeros((B, P, k, 2))
        coef[..., 0] = 1.0
        is_tok = torch.zeros((B, P, k, 2), dtype=torch.bool)
        is_tok[..., 0] = True
        uniq, inverse = np.unique(t.reshape(-1).numpy(), return_inverse=True)
        names = np.array([view.token_label(int(tid)) for tid in uniq], dtype=object)
        labels = names[inverse].reshape(B, P, k)
        return Atoms(ids=ids, vectors=None, coef=coef, labels=labels, token_atom=is_tok), per_pos
    if isinstance(target, PerRow):
        rows = list(target.targets)
        if len(rows) != batch:
            raise TargetError(
                f"{caller}: PerRow has {len(rows)} targets but the batch has {batch} rows; give "
                "one target (or one list of targets) per row."
            )
        rows = [list(r) if isinstance(r, (list, tuple)) else [r] for r in rows]
        if any(not r for r in rows):
            raise TargetError(
                f"{caller}: a PerRow entry is an empty list; give each row at least one target."
            )
        return _build(view, rows, caller), False
    if isinstance(target, (list, tuple)):
        if len(target) == 0:
            raise TargetError(f"{caller}: the target list is empty; give at least one target.")
        return _build(view, [list(target)], caller), False
    return _build(view, [[target]], caller), False


def resolve_positions(pos: Any, batch: int, n_ctx: int, caller: str) -> Positions:
    """``pos`` (an int, one int per batch row, or ``"all"``) -> :class:`Positions`."""
    accepted = "pass an int, one int per batch row, or 'all'"
    if isinstance(pos, str):
        if pos != "all":
            raise PositionError(f"{caller}: pos={pos!r}; {accepted}.")
        return Positions(torch.arange(n_ctx).expand(batch, n_ctx), True)
    if isinstance(pos, Tensor) and pos.ndim == 1:
        pos = list(pos)
    if isinstance(pos, np.ndarray) and pos.ndim == 1:
        pos = list(pos)
    if isinstance(pos, (list, tuple)):
        if len(pos) != batch:
            raise PositionError(
                f"{caller}: got {len(pos)} positions for a batch of {batch}; give one index per "
                "batch row (e.g. the last non-padding token of each prompt), or a single int."
            )
        values = list(pos)
    elif check.is_index(pos):
        values = [pos] * batch
    else:
        raise PositionError(
            f"{caller}: pos={pos!r} (type {type(pos).__name__}) is not a "
            f"position; {accepted} (bools, floats, None and slices are not)."
        )
    out = [
        check.in_range(
            p, n_ctx, "position", caller, PositionError, of=f" for inputs of {n_ctx} tokens"
        )
        for p in values
    ]
    return Positions(torch.tensor(out, dtype=torch.long)[:, None], False)
