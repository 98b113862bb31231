"""Exact running statistics of per-prompt terms, mergeable in any order.

A batch of per-prompt terms ``values[prompt, comp]`` (and the logits they explain) becomes a
:class:`RunningStats`: the count, the mean and the sum of squared deviations (``m2``) of every
component's term, its min and max, the sum of its |term| and of its share of the logit, and
how often it is among the ``k`` largest terms by |value| of a prompt. Two of them merge with
Chan, Golub and LeVeque's pairwise update (the parallel form of Welford's algorithm) in
float64, so statistics over batches, shards or processes agree with the two-pass numbers of
the whole table to float64 rounding (relative ~1e-15 per merge), whatever the order.

Everything stays on the device of the values it came from until :meth:`RunningStats.cpu`
(the tensors are one row per component: small).
"""

from dataclasses import dataclass, replace
from typing import Optional

import torch
from beartype import beartype
from jaxtyping import Bool, Float, jaxtyped
from torch import Tensor

__all__ = ["RunningStats", "SHARE_EPS", "StatsStream", "top_counts"]

#: logits with ``|logit| <= SHARE_EPS`` give no share (as ``TaskResult.summary``)
SHARE_EPS = 1e-12


def top_counts(values: Float[Tensor, "prompt comp"], keep: Bool[Tensor, "comp"], ks: tuple) -> list:
    """For each ``k`` in ``ks``: how many prompts have each component among their ``k``
    largest |terms| (over the components in ``keep``; ties broken by ``torch.topk``), all
    read from one sorted top-``max(ks)``."""
    C = values.shape[1]
    n_keep = int(keep.sum())
    top = min(max(ks), n_keep)
    out = []
    idx = None
    if top > 0 and values.shape[0] > 0:
        absv = torch.where(keep[None], values.abs(), torch.full_like(values, -torch.inf))
        idx = torch.topk(absv, top, dim=1, sorted=True).indices
    for k in ks:
        counts = torch.zeros(C, dtype=torch.int64, device=values.device)
        if idx is not None:
            flat = idx[:, : min(k, top)].reshape(-1)
            counts.index_add_(0, flat, torch.ones_like(flat))
        out.append(counts)
    return out


@jaxtyped(typechecker=beartype)
@dataclass(frozen=True, eq=False)
class RunningStats:
    """Sufficient statistics of ``n`` prompts' terms (``m2`` = sum of squared deviations).

    ``tops[(k, constants)]`` counts the prompts where a component is among the ``k`` largest
    |terms|, over every component (``constants=True``) or the non-constant ones only.
    ``max_gap`` is the largest |sum of terms - logit| and ``max_gap_ratio`` the largest gap
    divided by ``max(1, |logit|, sum of |terms|)`` (the scale of the completeness bound).
    """

    n: int
    mean: Float[Tensor, "comp"]
    m2: Float[Tensor, "comp"]
    min: Float[Tensor, "comp"]
    max: Float[Tensor, "comp"]
    sum_abs: Float[Tensor, "comp"]
    sum_share: Float[Tensor, "comp"]
    n_share: int
    tops: dict
    max_gap: float
    max_gap_ratio: float
    max_abs_logit: float

    @classmethod
    def of_batch(
        cls,
        values: Float[Tensor, "prompt comp"],
        logits: Float[Tensor, "prompt"],
        constant: Bool[Tensor, "comp"],
        ks: tuple,
    ) -> "RunningStats":
        """The statistics of one batch (two-pass within the batch, float64)."""
        v = values.detach().double()
        lg = logits.detach().double()
        n = v.shape[0]
        mean = v.mean(0)
        valid = lg.abs() > SHARE_EPS
        share = (v[valid] / lg[valid, None]).sum(0)
        gap = (v.sum(1) - lg).abs()
        scale = torch.maximum(lg.abs(), v.abs().sum(1)).clamp(min=1.0)
        tops = {}
        for constants, keep in ((False, ~constant), (True, torch.ones_like(constant))):
            for k, counts in zip(ks, top_counts(values, keep, ks)):
                tops[(k, constants)] = counts
        return cls(
            n=n,
            mean=mean,
            m2=((v - mean) ** 2).sum(0),
            min=v.min(0).values,
            max=v.max(0).values,
            sum_abs=v.abs().sum(0),
            sum_share=share,
            n_share=int(valid.sum()),
            tops=tops,
            max_gap=float(gap.max()),
            max_gap_ratio=float((gap / scale).max()),
            max_abs_logit=float(lg.abs().max()),
        )

    def merge(self, other: "RunningStats") -> "RunningStats":
        """The statistics of both sets of prompts (Chan et al.'s pairwise update)."""
        if other.n == 0:
            return self
        if self.n == 0:
            return other
        if self.mean.shape != other.mean.shape or set(self.tops) != set(other.tops):
            raise ValueError("RunningStats.merge: statistics of different component tables")
        other = other.to(self.mean.device)
        na, nb = self.n, other.n
        n = na + nb
        delta = other.mean - self.mean
        return RunningStats(
            n=n,
            mean=self.mean + delta * (nb / n),
            m2=self.m2 + other.m2 + delta**2 * (na * nb / n),
            min=torch.minimum(self.min, other.min),
            max=torch.maximum(self.max, other.max),
            sum_abs=self.sum_abs + other.sum_abs,
            sum_share=self.sum_share + other.sum_share,
            n_share=self.n_share + other.n_share,
            tops={key: self.tops[key] + other.tops[key] for key in self.tops},
            max_gap=max(self.max_gap, other.max_gap),
            max_gap_ratio=max(self.max_gap_ratio, other.max_gap_ratio),
            max_abs_logit=max(self.max_abs_logit, other.max_abs_logit),
        )

    def to(self, device: torch.device) -> "RunningStats":
        """The same statistics on ``device`` (a no-op where they already are)."""
        if self.mean.device == torch.device(device):
            return self
        move = lambda t: t.to(device)
        return replace(
            self,
            mean=move(self.mean),
            m2=move(self.m2),
            min=move(self.min),
            max=move(self.max),
            sum_abs=move(self.sum_abs),
            sum_share=move(self.sum_share),
            tops={key: move(t) for key, t in self.tops.items()},
        )

    def cpu(self) -> "RunningStats":
        return self.to(torch.device("cpu"))

    @property
    def std(self) -> Float[Tensor, "comp"]:
        """Population standard deviation (``ddof=0``, as ``numpy.std``)."""
        return (self.m2 / self.n).clamp(min=0).sqrt()


class StatsStream:
    """:meth:`RunningStats.of_batch` of each batch merged into the running total in turn,
    bit for bit as ``total.merge(RunningStats.of_batch(...))`` gives them, with the totals
    updated in place: no typed record is built per batch, and the largest gaps and the
    share count stay tensors until :meth:`result` (no device sync per batch).

    Args:
        constant: which components are constants (excluded from the top-k counts with
            ``constants=False``).
        ks: the ``k`` of the top-k counts.
    """

    def __init__(self, constant: Bool[Tensor, "comp"], ks: tuple) -> None:
        #: per ``constants`` flag: the components ranked, how many, and the counts so far
        self.keeps = ((False, constant), (True, None))
        self.n_keep = {False: int((~constant).sum()), True: int(constant.shape[0])}
        self.ks = ks
        self.n = 0
        self.t: dict = {}
        self.tops = {
            (k, c): torch.zeros(constant.shape[0], dtype=torch.int64, device=constant.device)
            for c in (False, True)
            for k in ks
        }

    def _count_tops(self, values: Float[Tensor, "prompt comp"]) -> None:
        """:func:`top_counts` of both ``keep`` masks, added to the running counts (integer
        sums: exact in any order); the top ``max(ks)`` read once per mask."""
        absv = values.abs()
        for constants, constant in self.keeps:
            top = min(max(self.ks), self.n_keep[constants])
            if top <= 0:
                continue
            ranked = absv if constant is None else absv.masked_fill(constant[None], -torch.inf)
            idx = torch.topk(ranked, top, dim=1, sorted=True).indices
            for k in self.ks:
                flat = idx[:, : min(k, top)].reshape(-1)
                self.tops[(k, constants)].index_add_(0, flat, torch.ones_like(flat))

    def add(self, values: Float[Tensor, "prompt comp"], logits: Float[Tensor, "prompt"]) -> None:
        """Merge one batch of per-prompt terms and the logits they explain."""
        v = values.detach().double()
        lg = logits.detach().double()
        nb = v.shape[0]
        mean = v.mean(0)
        av, alg = v.abs(), lg.abs()  # each read twice or more below: computed once
        valid = alg > SHARE_EPS
        if bool(valid.all()):  # v[valid] would be a copy of v: the same sum
            share = (v / lg[:, None]).sum(0)
        else:
            share = (v[valid] / lg[valid, None]).sum(0)
        gap = (v.sum(1) - lg).abs()
        scale = torch.maximum(alg, av.sum(1)).clamp(min=1.0)
        self._count_tops(values.detach())
        part = {
            "mean": mean,
            "m2": ((v - mean) ** 2).sum(0),
            "min": v.min(0).values,
            "max": v.max(0).values,
            "sum_abs": av.sum(0),
            "sum_share": share,
            "n_share": valid.sum(),
            "max_gap": gap.max(),
            "max_gap_ratio": (gap / scale).max(),
            "max_abs_logit": alg.max(),
        }
        if self.n == 0:
            self.n, self.t = nb, part
            return
        t, na = self.t, self.n
        n = na + nb
        delta = mean - t["mean"]
        t["mean"] = t["mean"] + delta * (nb / n)
        t["m2"] = t["m2"] + part["m2"] + delta**2 * (na * nb / n)
        t["min"] = torch.minimum(t["min"], part["min"])
        t["max"] = torch.maximum(t["max"], part["max"])
        for key in ("sum_abs", "sum_share", "n_share"):
            t[key] = t[key] + part[key]
        for key in ("max_gap", "max_gap_ratio", "max_abs_logit"):
            t[key] = torch.maximum(t[key], part[key])
        self.n = n

    def result(self) -> Optional[RunningStats]:
        """The statistics of every batch added, or None before the first."""
        if self.n == 0:
            return None
        t = self.t
        return RunningStats(
            n=self.n,
            mean=t["mean"],
            m2=t["m2"],
            min=t["min"],
            max=t["max"],
            sum_abs=t["sum_abs"],
            sum_share=t["sum_share"],
            n_share=int(t["n_share"]),
            tops=dict(self.tops),
            max_gap=float(t["max_gap"]),
            max_gap_ratio=float(t["max_gap_ratio"]),
            max_abs_logit=float(t["max_abs_logit"]),
        )
