"""The result type every prism returns: terms with labelled axes that add up.

A :class:`Decomposition` holds ``values[batch, pos, target, comp]``: for every explained
position and target, one term per component, where components are records
(:class:`~tlprisms._core.table.Component`: kind, layer, head, neuron, src, at) kept column-
wise in a :class:`~tlprisms._core.table.ComponentTable`. The constant terms (biases) are
components too, with ``Component.is_constant``; so ``values.sum(-1)``
(:meth:`Decomposition.total`) is the whole logit, and :meth:`Decomposition.check` verifies
it against what the model computed.

A sparse result's methods work on its slots with :mod:`tlprisms._core.sparse`; how a result
is shown is looked up in :mod:`tlprisms._core.views` (rendering registers itself there).
"""

import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any, Literal, Optional, Union

import numpy as np
import torch
from beartype import beartype
from jaxtyping import Float, Int, jaxtyped
from torch import Tensor

from tlprisms._core import arguments as check_arg
from tlprisms._core import views
from tlprisms._core.errors import ArgumentError, CompletenessError, NonFiniteError
from tlprisms._core.request import Request
from tlprisms._core.sparse import (
    component_row,
    regroup_slots,
    scatter_slots,
    subset_slots,
    used_components,
)
from tlprisms._core.table import Component, ComponentTable

__all__ = [
    "Decomposition",
    "ATOL_FLOAT32",
    "ATOL_FLOAT64",
    "TOLERANCE",
    "tolerance",
    "fresh_empty",
    "mean0",
    "largest",
]

#: completeness tolerance in float32:
#: ``|total - logit| <= ATOL_FLOAT32 * max(1, |logit|, sum of |terms|)``
ATOL_FLOAT32 = 1e-5
#: the same in float64
ATOL_FLOAT64 = 1e-10
#: the unit roundoff of the low-precision dtypes a model may compute in
UNIT_ROUNDOFF = {"bfloat16": 2.0**-8, "float16": 2.0**-11}
#: the default tolerance by the precision the model computed in; for bf16/fp16 see
#: :func:`tolerance` (every residual addition is rounded)
TOLERANCE = {"float64": ATOL_FLOAT64, "float32": ATOL_FLOAT32}

Order = Literal["abs", "positive", "negative"]
_ORDER_OLD = {"pos": "positive", "neg": "negative"}


def tolerance(precision: str, n_layers: int = 1) -> float:
    """The default completeness tolerance for a model that computed in ``precision``.

    float32 and float64: :data:`ATOL_FLOAT32` and :data:`ATOL_FLOAT64`. bf16 and fp16 models
    round the residual stream at each of their ``2 * n_layers + 2`` additions, so their
    logits differ from the exact sum of their (rounded) writes by about the unit roundoff
    ``u`` times ``sqrt(2 * n_layers + 2)`` of the sum of |terms|: that is the bound (about
    1e-2 for a 2-layer bf16 model, 2.4e-2 for an 18-layer one).

    >>> tolerance("float32"), round(tolerance("bfloat16", 18), 4)
    (1e-05, 0.0241)
    """
    if precision in UNIT_ROUNDOFF:
        return UNIT_ROUNDOFF[precision] * float(np.sqrt(2 * n_layers + 2))
    return TOLERANCE.get(precision, ATOL_FLOAT32)


def _fmt(x: float) -> str:
    return f"{x:+.4g}"


#: tensors at least this large (bytes) on the CPU are allocated through NumPy (see below)
_NUMPY_ALLOC_MIN = 2**22


def fresh_empty(shape: tuple, dtype: torch.dtype, device: torch.device) -> Tensor:
    """An uninitialised tensor. A large float32/float64 one on the CPU is allocated by
    NumPy, which asks Linux for transparent huge pages on big arrays (as PyTorch does only
    with ``THP_MEM_ALLOC_ENABLE=1``): the first write into fresh memory then costs about a
    quarter of the page faults (a chained result of 139 MB: ~25 ms instead of ~100 ms)."""
    itemsize = {torch.float32: 4, torch.float64: 8}.get(dtype)
    if device.type != "cpu" or itemsize is None or math.prod(shape) * itemsize < _NUMPY_ALLOC_MIN:
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.from_numpy(np.empty(shape, dtype=np.float32 if itemsize == 4 else np.float64))


def mean0(v: Tensor) -> Tensor:
    """``v.mean(0)`` into :func:`fresh_empty` memory; over one row that is ``v[0] + 0.0``,
    bit for bit (-0.0 becomes 0.0), in one cheap pass instead of a reduction."""
    v = v.detach()  # out= takes no autograd
    out = fresh_empty(tuple(v.shape[1:]), v.dtype, v.device)
    if v.shape[0] == 1:
        return torch.add(v[0], 0.0, out=out)
    return torch.mean(v, 0, out=out)


#: :func:`largest` works on results with at least this many components (blocks of 4,096)
_LARGEST_MIN = 2**16
_LARGEST_BLOCK = 4096


def largest(
    score: np.ndarray, table: ComponentTable, k: int, constants: bool
) -> Optional[np.ndarray]:
    """The indices of the ``k`` largest ``score`` (constants left out unless ``constants``),
    largest first, ties by index; None where the caller's full selection is needed.

    The ``k``-th largest block maximum bounds the answer from below, so only the terms at or
    above it (usually a few more than ``k``) are labelled and sorted: a few passes over the
    scores instead of a partition of millions."""
    n = len(score)
    nb = n // _LARGEST_BLOCK
    if n < _LARGEST_MIN or k <= 0 or nb < k:
        return None
    peaks = score[: nb * _LARGEST_BLOCK].reshape(nb, _LARGEST_BLOCK).max(1)
    bound = np.partition(peaks, nb - k)[nb - k]
    cand = np.flatnonzero(score >= bound)  # NaN anywhere: the bound is NaN, nothing passes
    if len(cand) > _LARGEST_MIN:  # many ties: the full selection is faster
        return None
    if not constants:
        cand = cand[~table.constant_at(cand)]
    if len(cand) < k:  # the bound came from constants
        return None
    return cand[np.lexsort((cand, -score[cand]))[:k]]


_LOGITS_DEPRECATED = "Decomposition.logits is deprecated, use .explained; removed in 0.4"


@jaxtyped(typechecker=beartype)
@dataclass(frozen=True, eq=False, init=False)
class Decomposition:
    """Terms that add up to a logit (or any readout), one per component.

    Attributes:
        values: the terms, ``[batch, pos, target, comp]``.
        components: the label of every term (``len == comp``).
        explained: what the terms explain, ``[batch, pos, target]``: the model's own logit
            (post soft-cap unless ``explains`` says otherwise), a logit difference, a
            readout, or a QK result's attention scores. (``logits``: its deprecated name,
            also accepted by the constructor.)
        positions: the explained position of each ``(batch, pos)``.
        target_labels: a readable name per ``(batch, pos, target)``.
        explains: what ``explained`` is, e.g. ``"logit"``, ``"pre-softcap logit"``.
        prism: which prism made it (``"residual"``, ``"heads"``, ``"through L3H2"`` ...).
        complete: False for a :meth:`select`-ion, whose terms are only part of the logit.
        str_tokens: the input tokens as strings, per batch row, when known.
        precision: the dtype the model computed in (``"float32"``, ``"bfloat16"`` ...), which
            with ``n_layers`` sets :meth:`check`'s default tolerance.
        n_layers: the model's number of layers.
        index: None for a dense result (the usual case). A sparse result (``top_k=`` /
            ``min_abs=`` on a prism) keeps per ``(batch, pos, target)`` only some terms:
            then ``values[b, p, t, s]`` is the term of component ``index[b, p, t, s]`` (a
            *slot*; -1 marks an empty slot, whose value is 0), and ``components`` lists every
            component any slot may name, the remainders (kind ``"rest"``) included. Totals,
            :meth:`check`, :meth:`top`, :meth:`select`, :meth:`aggregate` and :meth:`to_frame`
            read the slots; :meth:`to_dense` gives the usual layout over the kept components.
        request: the typed request that made the result (which prism, target, position,
            splits ...), filled by :class:`~tlprisms.LogitPrism`; None when built by hand.
            :meth:`select`, :meth:`aggregate`, :meth:`to_dense` keep it.
    """

    values: Float[Tensor, "batch pos target comp"]
    components: ComponentTable
    explained: Float[Tensor, "batch pos target"]
    positions: Int[Tensor, "batch pos"]
    target_labels: np.ndarray
    explains: str = "logit"
    prism: str = "residual"
    complete: bool = True
    str_tokens: Optional[list] = None
    precision: str = "float32"
    n_layers: int = 1
    index: Optional[Int[Tensor, "batch pos target comp"]] = None
    request: Optional[Request] = None

    def __init__(
        self,
        values: Float[Tensor, "batch pos target comp"],
        components: ComponentTable,
        explained: Optional[Float[Tensor, "batch pos target"]] = None,
        positions: Optional[Int[Tensor, "batch pos"]] = None,
        target_labels: Optional[np.ndarray] = None,
        explains: str = "logit",
        prism: str = "residual",
        complete: bool = True,
        str_tokens: Optional[list] = None,
        precision: str = "float32",
        n_layers: int = 1,
        index: Optional[Int[Tensor, "batch pos target comp"]] = None,
        request: Optional[Request] = None,
        *,
        logits: Optional[Float[Tensor, "batch pos target"]] = None,
    ) -> None:
        if logits is not None:
            warnings.warn(
                "Decomposition(logits=...) is deprecated, use explained=; removed in 0.4",
                DeprecationWarning,
                stacklevel=2,
            )
            explained = logits  # the old name wins: dataclasses.replace(d, logits=...) passes both
        for name, given in (
            ("explained", explained),
            ("positions", positions),
            ("target_labels", target_labels),
        ):
            if given is None:
                raise TypeError(f"Decomposition: missing the required argument {name!r}.")
        fields: tuple[tuple[str, Any], ...] = (
            ("values", values),
            ("components", components),
            ("explained", explained),
            ("positions", positions),
            ("target_labels", target_labels),
            ("explains", explains),
            ("prism", prism),
            ("complete", complete),
            ("str_tokens", str_tokens),
            ("precision", precision),
            ("n_layers", n_layers),
            ("index", index),
            ("request", request),
        )
        for name, value in fields:
            object.__setattr__(self, name, value)

    @property
    def logits(self) -> Float[Tensor, "batch pos target"]:
        """Deprecated name of :attr:`explained` (removed in 0.4)."""
        warnings.warn(_LOGITS_DEPRECATED, DeprecationWarning, stacklevel=2)
        return self.explained

    # ------------------------------------------------------------ basic views
    @property
    def labels(self) -> list[Component]:
        """Every component as a :class:`Component` record (built on demand)."""
        return list(self.components)

    @property
    def is_sparse(self) -> bool:
        """True for a result with ``top_k=``/``min_abs=`` (see :attr:`index`)."""
        return self.index is not None

    def to_dense(self) -> "Decomposition":
        """This result with one term per component (``values[batch, pos, target, comp]``).

        A dense result is returned as is. A sparse one gets one column per component kept
        anywhere (remainders included), 0 where a ``(batch, pos, target)`` did not keep it;
        its totals are the sparse totals.
        """
        if self.index is None:
            return self
        sub = self._subset(used_components(self.index, len(self.components)))
        assert sub.index is not None
        values = scatter_slots(sub.values, sub.index, len(sub.components))
        return replace(sub, values=values, index=None, complete=self.complete)

    @property
    def constants(self) -> "Decomposition":
        """Only the constant terms (biases of ``W_U``, norms, ``b_O``, ``b_out`` ...)."""
        return self._subset(self.components.is_constant())

    def total(self) -> Float[Tensor, "batch pos target"]:
        """The sum of the terms: equals :attr:`explained` for a complete decomposition."""
        return self.values.sum(-1)

    def gap(self) -> Float[Tensor, "batch pos target"]:
        """``total() - explained``: the completeness error, at float rounding when exact."""
        return self.total() - self.explained

    def tolerance(self) -> Float[Tensor, "batch pos target"]:
        """The default completeness bound per explained value:
        ``t * max(1, |logit|, sum of |terms|)`` with ``t`` = :func:`tolerance` of the precision
        the model computed in (1e-5 in float32, 1e-10 in float64); the sum of ``|terms|`` bounds
        the rounding of a sum whose terms cancel."""
        t = tolerance(self.precision, self.n_layers)
        scale = torch.maximum(self.explained.abs(), torch.linalg.vector_norm(self.values, 1, -1))
        return t * scale.clamp(min=1.0)

    @check_arg.entry
    def check(
        self, atol: Optional[Union[int, float]] = None, rtol: Optional[Union[int, float]] = None
    ) -> "Decomposition":
        """Raise :class:`CompletenessError` unless the terms add up to :attr:`explained`.

        By default the bound is :meth:`tolerance`; with ``atol``/``rtol`` it is
        ``atol + rtol * |logit|``. NaN or infinity anywhere is a :class:`NonFiniteError`.
        Returns ``self``.
        """
        if not self.complete:
            raise CompletenessError(
                "check: this result is a selection (select/top) of a decomposition, so its "
                "terms are only part of the logit; call check() on the full result."
            )
        for value, what in ((atol, "atol"), (rtol, "rtol")):
            if value is not None and (not check_arg.is_real(value) or not float(value) >= 0):
                raise ArgumentError(f"check: {what}={value!r}; pass a number >= 0.")
        for t, what in ((self.values, "terms"), (self.explained, self.explains)):
            if not bool(torch.isfinite(t).all()):
                where = tuple(int(i) for i in torch.nonzero(~torch.isfinite(t))[0])
                raise NonFiniteError(
                    f"check: the {self.prism} {what} hold NaN or infinity (first at {where}), "
                    "so nothing can be checked. The cache or a readout vector is not finite; "
                    "re-run model.run_with_cache(tokens) (in float32 if it overflowed)."
                )
        err = self.gap().abs()
        if atol is None and rtol is None:
            tol = self.tolerance()
            bound = f"{tolerance(self.precision, self.n_layers):.3g} * max(1, |logit|, sum |terms|)"
        else:
            default = tolerance(self.precision, self.n_layers)
            atol = default if atol is None else float(atol)
            rtol = default if rtol is None else float(rtol)
            tol = atol + rtol * self.explained.abs()
            bound = f"{atol:g} + {rtol:g}*|logit|"
        bad = err > tol
        if bool(bad.any()):
            where = tuple(int(i) for i in torch.nonzero(bad)[0])
            raise CompletenessError(
                f"check: the {self.prism} terms miss the {self.explains} by up to "
                f"{float(err.max()):.3g} (first at batch, pos, target = {where}: total "
                f"{float(self.total()[where]):.6g} vs {float(self.explained[where]):.6g}; bound "
                f"{bound}, for a model computing in {self.precision}). The terms were changed "
                "after the prism made them, or the cache was edited by hooks."
            )
        return self

    # ------------------------------------------------------------ selection
    def _subset(self, keep: np.ndarray) -> "Decomposition":
        idx = np.nonzero(keep)[0]
        if self.index is not None:  # the slots of the kept components, re-indexed
            values, index = subset_slots(self.values, self.index, keep)
            components = self.components.take(idx)
            return replace(self, values=values, index=index, components=components, complete=False)
        t_idx = torch.as_tensor(idx, dtype=torch.long, device=self.values.device)
        return replace(
            self,
            values=self.values.index_select(-1, t_idx),
            components=self.components.take(idx),
            complete=False,
        )

    @check_arg.entry
    def select(self, **criteria: Union[int, str, Iterable, Callable]) -> "Decomposition":
        """The terms whose labels match: ``select(layer=9, head=6)``, ``select(kind="neuron")``.

        Each criterion is a value, a collection of values, or a predicate, on ``kind``,
        ``layer``, ``head``, ``neuron``, ``src`` or ``at``. The result is marked incomplete
        (its terms are part of the logit).
        """
        return self._subset(self.components.mask("select", **criteria))

    def mask(self, **criteria: Union[int, str, Iterable, Callable]) -> np.ndarray:
        """The boolean mask over components that :meth:`select` would keep."""
        return self.components.mask("mask", **criteria)

    @check_arg.entry
    def aggregate(self, *by: str) -> "Decomposition":
        """Sum the terms that share the fields ``by``; the result stays complete.

        ``heads_result.aggregate("kind", "layer", "head")`` gives one term per head (sources
        summed); ``aggregate("kind", "layer")`` one per layer and kind.

        A QK result (pairs) aggregates per side: ``aggregate("q_kind", "q_layer", "k_kind",
        "k_layer")`` (the default) one term per (query-side layer, key-side layer);
        ``aggregate("q_kind", "q_layer")`` or ``aggregate("query")`` sum over the key side
        (its label ``whole``); see :meth:`tlprisms._prisms.qk_table.PairTable.grouped`.
        """
        group, table = self.components.grouped(by, stacklevel=3)
        if self.index is not None:
            values, index = regroup_slots(
                self.values, self.index, len(self.components), group, len(table)
            )
            return replace(self, values=values, index=index, components=table)
        g = torch.as_tensor(group, dtype=torch.long, device=self.values.device)
        out = torch.zeros(
            *self.values.shape[:-1], len(table), dtype=self.values.dtype, device=g.device
        )
        return replace(self, values=out.index_add_(-1, g, self.values), components=table)

    # ------------------------------------------------------------ tables
    def top_heads(
        self,
        k: int = 10,
        *,
        order: Order = "positive",
        batch: Optional[int] = None,
        pos: Optional[int] = None,
        target: int = 0,
    ) -> Any:
        """Which heads push the explained value up (``order="positive"``, the default) or down
        (``"negative"``), or matter most (``"abs"``): each head's term summed over its source
        positions, heads only (no embeddings, MLPs or biases), as a DataFrame like
        :meth:`top`'s. ``prism.heads(" Paris").top_heads(3)`` is the common question.

        >>> import tlprisms as tp
        >>> from tlprisms.demo import load_demo_model
        >>> prism = tp.LogitPrism.run(load_demo_model(), "The capital of Germany is")
        >>> list(prism.heads(" Berlin").top_heads(2)["component"])
        ['L0H0', 'L0H2']
        """
        if not (self.components.kinds() == "head").any():
            raise ArgumentError(
                f"top_heads: this result ({self.prism}) has no head terms; split attention "
                "into heads first, e.g. prism.heads(target) or decompose(target, heads='all')."
            )
        per_head = self.aggregate("kind", "layer", "head", "at")
        return per_head.top(k, order=order, kind="head", batch=batch, pos=pos, target=target)

    @check_arg.entry
    def top(
        self,
        k: int = 10,
        *,
        batch: Optional[int] = None,
        pos: Optional[int] = None,
        target: int = 0,
        order: Order = "abs",
        constants: bool = False,
        kind: Optional[Union[str, Iterable]] = None,
        by: Optional[str] = None,
    ) -> Any:
        """The ``k`` largest terms as a pandas DataFrame (mean over batch/pos when not given).

        Args:
            k: how many terms.
            batch: a batch row (index), or None for the mean over rows.
            pos: an index into the explained positions (``values``' pos axis), or None for
                the mean over them.
            target: an index into the targets.
            order: ``"abs"`` (largest magnitude), ``"positive"`` (most positive) or
                ``"negative"`` (most negative).
            constants: include the constant (bias) terms.
            kind: only components of this kind (or kinds), e.g. ``"head"``.
            by: deprecated name of ``order`` (0.1: ``"abs"``, ``"pos"``, ``"neg"``).

        Columns: ``component``, ``kind``, ``layer``, ``head``, ``neuron``, ``src``, ``at``
        (where a chained term was written), ``feature``, ``value``.
        """
        import pandas as pd

        if by is not None:
            order = check_arg.renamed("top", "by", "order", _ORDER_OLD.get(by, by), order, "abs")
        check_arg.choice(order, "order", ("abs", "positive", "negative"), "top")
        k = check_arg.count(k, "k", "top", minimum=0)
        B, P, K, _ = self.values.shape
        target = check_arg.in_range(target, K, "target", "top", of=f" ({K} targets)")
        if self.index is not None:  # scatter the slots onto the components first
            if batch is not None:
                batch = check_arg.in_range(batch, B, "batch", "top", of=f" ({B} rows)")
            if pos is not None:
                pos = check_arg.in_range(pos, P, "pos", "top", of=f" ({P} explained positions)")
            v = component_row(self.values, self.index, len(self.components), target, batch, pos)
            batch = pos = 0
        else:
            v = self.values[..., target, :]
        v = (
            mean0(v)
            if batch is None
            else v[check_arg.in_range(batch, B, "batch", "top", of=f" ({B} rows)")]
        )
        v = (
            mean0(v)
            if pos is None
            else v[check_arg.in_range(pos, P, "pos", "top", of=f" ({P} explained positions)")]
        )
        w = v.detach().float().cpu().numpy()
        score = {"abs": np.abs(w), "positive": w, "negative": -w}[order]
        idx = None
        if kind is None and type(self.components) is ComponentTable:
            idx = largest(score, self.components, k, constants)
        if idx is None:
            keep = np.ones_like(w, dtype=bool) if constants else ~self.components.is_constant()
            if kind is not None:
                keep &= self.components.mask("top", kind=kind)
            score = np.where(keep, score, -np.inf)
            k = min(k, int(keep.sum()))
            if k <= 0:
                idx = np.zeros(0, dtype=np.int64)
            else:  # partial selection, then sort the k winners (millions of terms stay cheap)
                part = np.argpartition(-score, k - 1)[:k]
                idx = part[np.argsort(-score[part], kind="stable")]
        c = self.components
        # the table's label columns (a QK result's pairs: one column set per side)
        cols = {"component": [str(c[i]) for i in idx], **c.frame_columns(idx)}
        return pd.DataFrame({**cols, "value": w[idx]})

    def to_frame(self) -> Any:
        """A long pandas table: one row per (batch, pos, target, component).

        Columns: ``batch``, ``pos`` (the explained position), ``target``, ``kind``, ``layer``,
        ``head``, ``neuron``, ``src``, ``at`` (where a chained term was written), ``feature``
        (a dictionary feature's index), ``value``. A QK result has one label column set per
        side (``q_kind`` ... ``k_src``). A sparse result lists only its kept slots, without
        ``feature`` and with ``of`` (the kind a remainder sums; a QK result: ``rest``).
        """
        import pandas as pd

        if self.index is not None:  # only the kept terms (and remainders, constants)
            return self._slots_frame()
        B, P, K, C = self.values.shape
        c = self.components
        bb, pp, kk, cc = np.meshgrid(
            np.arange(B), np.arange(P), np.arange(K), np.arange(C), indexing="ij"
        )
        positions = self.positions.cpu().numpy()
        labels = np.broadcast_to(self.target_labels, (B, P, K))
        rows = {
            "batch": bb.ravel(),
            "pos": positions[bb.ravel(), pp.ravel()],
            "target": labels[bb.ravel(), pp.ravel(), kk.ravel()],
        }
        values = self.values.detach().float().cpu().numpy().ravel()
        return pd.DataFrame({**rows, **c.frame_columns(cc.ravel()), "value": values})

    def _slots_frame(self) -> Any:
        """:meth:`to_frame` of a sparse result: one row per kept slot."""
        import pandas as pd

        assert self.index is not None
        B, P, K, S = self.values.shape
        idx = self.index.cpu().numpy()
        bb, pp, kk, ss = np.nonzero(idx >= 0)
        cc = idx[bb, pp, kk, ss]
        vals = self.values.detach().float().cpu().numpy()[bb, pp, kk, ss]
        c = self.components
        positions = self.positions.cpu().numpy()
        labels = np.broadcast_to(self.target_labels, (B, P, K))
        rows = {"batch": bb, "pos": positions[bb, pp], "target": labels[bb, pp, kk]}
        return pd.DataFrame(
            {**rows, **c.frame_columns(cc, sparse=True), "value": vals, **c.remainder_column(cc)}
        )

    def __repr__(self) -> str:
        B, P, K, _ = self.values.shape
        C = len(self.components)
        kept = ""
        if self.index is not None:  # slots per row (after select, some are empty)
            n = int((self.index >= 0).sum(-1).max()) if self.index.numel() else 0
            kept = f" (sparse: up to {n} kept per row)"
        head = (
            f"Decomposition({self.prism}: {B} batch x {P} pos x {K} target, {C} components"
            f"{kept}; explains {self.explains}"
        )
        if self.complete:
            head += f"; max |gap| {float(self.gap().abs().max()):.2g})"
        else:
            head += "; a selection)"
        lines = [head]
        labels = np.broadcast_to(self.target_labels, (B, P, K))
        tot = self.total()
        # what each target's total is: "logit" for every logit prism (soft-capped or not)
        what = "logit" if "logit" in self.explains else self.explains.split(" (")[0]
        for k in range(min(K, 3)):
            lines.append(
                f"  target {labels[0, -1, k]} @ batch 0, pos {int(self.positions[0, -1])}:"
                f" {what} {float(self.explained[0, -1, k]):.4g} = sum of terms "
                f"{float(tot[0, -1, k]):.4g}"
            )
            v = self.values[0, -1, k].detach().float().cpu().numpy()
            slot = None if self.index is None else self.index[0, -1, k].cpu().numpy()
            for i in np.argsort(-np.abs(v))[:5]:
                j = int(i) if slot is None else int(slot[i])
                if j >= 0:
                    lines.append(f"    {str(self.components[j]):<24} {_fmt(float(v[i]))}")
        return "\n".join(lines)

    # shown by the views tlprisms.render registers (tlprisms._core.views)
    def _repr_html_(self) -> str:
        return views.html(self)

    def show(self) -> Any:
        """Display the default view in Jupyter (offline, self-contained)."""
        return views.show(self)
