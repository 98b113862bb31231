"""The result type every prism returns: terms with labelled axes that add up.

A :class:`Decomposition` holds ``values[batch, pos, target, comp]``: for every explained
position and target, one term per component, where components are records
(:class:`Component`: kind, layer, head, neuron, src, at) kept column-wise in a
:class:`ComponentTable`. The constant terms (biases) are components too, with
``Component.is_constant``; so ``values.sum(-1)`` (:meth:`Decomposition.total`) is the whole
logit, and :meth:`Decomposition.check` verifies it against what the model computed.
"""

import math
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any, Literal, Optional, Union

import numpy as np
import torch
from beartype import beartype
from jaxtyping import Float, Int, jaxtyped
from torch import Tensor

from tlprisms._core import arguments as check_arg
from tlprisms._core.errors import ArgumentError, CompletenessError, NonFiniteError

__all__ = [
    "Component",
    "ComponentTable",
    "Decomposition",
    "ATOL_FLOAT32",
    "ATOL_FLOAT64",
    "TOLERANCE",
    "CONSTANT_KINDS",
    "KINDS",
    "FIELDS",
    "tolerance",
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

KINDS = (
    "embed",
    "pos_embed",
    "attn",
    "head",
    "b_O",
    "mlp",
    "neuron",
    "b_out",
    "b_U",
    "ln_final.b",
    "b_V",
    "ln.b",
    "b_in",
    "resid",
    "readout.b",
    "rest",
    "feature",  # a dictionary feature (SAE, transcoder): layer, feature
    "b_dec",  # a dictionary's decoder bias
    "error",  # a dictionary's reconstruction error, taken from the cache
    "skip",  # a transcoder's linear skip connection
    "b_enc",  # a dictionary's encoder bias (the constant of a feature's pre-activation)
    "pair",  # a QK prism term: (query-side writer, key-side writer)
    "b_Q",
    "b_K",
    "alibi",  # the QK prism's ALiBi positional score bias (a constant per key)
)
CONSTANT_KINDS = frozenset(
    {"b_O", "b_out", "b_U", "ln_final.b", "b_V", "ln.b", "b_in", "readout.b", "b_dec", "b_enc"}
)
#: the QK prism's query and key biases are constants too
CONSTANT_KINDS = CONSTANT_KINDS | {"b_Q", "b_K", "alibi"}
_FIELDS = ("layer", "head", "neuron", "src", "at", "feature")
#: how a remainder ("rest") component names the kind it aggregates
_PLURAL = {"head": "heads", "neuron": "neurons"}
#: the label fields of a component, besides ``kind``
FIELDS = _FIELDS


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


_INT = np.int32  # label columns: a chained result can have millions of components
#: True at the code of every constant kind
_CONSTANT_CODES = np.asarray([k in CONSTANT_KINDS for k in KINDS], dtype=bool)


@dataclass(frozen=True, init=False)
class Component:
    """One term's label: ``Component("head", layer=3, head=7)`` prints as ``L3H7``.

    Fields that do not apply are -1. ``src`` is the source position a head reads; ``at`` is
    the residual position a chained term was written at (-1: the explained position).

    >>> str(Component("head", layer=3, head=7)), str(Component("neuron", layer=16, neuron=10029))
    ('L3H7', 'L16N10029')
    >>> str(Component("head", layer=9, head=6, src=2, at=4))
    '@4 L9H6[src 2]'
    """

    kind: str
    layer: int = -1
    head: int = -1
    neuron: int = -1
    src: int = -1
    at: int = -1
    feature: int = -1
    #: for a remainder (kind ``"rest"`` of a sparse result): the kind of the terms it sums
    of: str = ""

    def __init__(
        self,
        kind: str,
        layer: int = -1,
        head: int = -1,
        neuron: int = -1,
        src: int = -1,
        at: int = -1,
        feature: int = -1,
        *,
        pos: Optional[int] = None,
        of: str = "",
    ) -> None:
        if pos is not None:
            warnings.warn(
                "Component(pos=...) is deprecated; use at= (the residual position a "
                "chained term was written at).",
                DeprecationWarning,
                stacklevel=2,
            )
            at = pos
        for name, value in (
            ("kind", kind),
            ("layer", layer),
            ("head", head),
            ("neuron", neuron),
            ("src", src),
            ("at", at),
            ("feature", feature),
            ("of", of),
        ):
            object.__setattr__(self, name, value)

    @property
    def pos(self) -> int:
        """Deprecated name of :attr:`at` (tlprisms 0.1)."""
        warnings.warn(
            "Component.pos is deprecated; use Component.at (the residual position a "
            "chained term was written at).",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.at

    @property
    def is_constant(self) -> bool:
        return self.kind in CONSTANT_KINDS

    def __str__(self) -> str:
        if self.kind == "rest":  # a sparse result's remainder: "L3.heads (rest)", "embed (rest)"
            of = _PLURAL.get(self.of, self.of)
            return (f"L{self.layer}.{of}" if self.layer >= 0 else of) + " (rest)"
        if self.kind == "head":
            s = f"L{self.layer}H{self.head}" if self.head >= 0 else f"L{self.layer}.heads"
        elif self.kind == "neuron":
            s = f"L{self.layer}N{self.neuron}" if self.neuron >= 0 else f"L{self.layer}.neurons"
        elif self.kind == "feature":
            s = f"L{self.layer}F{self.feature}" if self.feature >= 0 else "features"
            if self.feature < 0 and self.layer >= 0:
                s = f"L{self.layer}.features"
        elif self.layer >= 0 and self.kind in (
            "b_dec",
            "b_enc",
            "error",
            "skip",
            "attn",
            "mlp",
            "b_O",
            "b_out",
            "b_V",
            "ln.b",
            "b_in",
            "resid",
        ):
            s = f"L{self.layer}.{self.kind}" + (f"H{self.head}" if self.head >= 0 else "")
            if self.kind == "b_in" and self.neuron >= 0:
                s += f"N{self.neuron}"
        else:
            s = self.kind
        if self.src >= 0:
            s += f"[src {self.src}]"
        if self.at >= 0:
            s = f"@{self.at} {s}"
        return s

    def __repr__(self) -> str:
        return f"Component({str(self)})"


@dataclass(frozen=True, eq=False)
class ComponentTable:
    """Component labels stored column-wise (a million heads x sources stay cheap)."""

    kind: np.ndarray  # int8 codes into KINDS
    layer: np.ndarray
    head: np.ndarray
    neuron: np.ndarray
    src: np.ndarray
    at: np.ndarray
    #: a dictionary feature's index (-1 for other components); filled with -1s when None
    feature: np.ndarray = None  # type: ignore[assignment]
    #: int8 codes into KINDS: the kind a "rest" component sums (-1 otherwise); None when the
    #: table has no remainders (every dense result)
    of: Optional[np.ndarray] = None

    def __post_init__(self) -> None:
        if self.feature is None:
            object.__setattr__(self, "feature", np.full(len(self.kind), -1, dtype=_INT))

    @property
    def pos(self) -> np.ndarray:
        """Deprecated name of :attr:`at` (tlprisms 0.1)."""
        return self.at

    @staticmethod
    def empty() -> "ComponentTable":
        z = np.zeros(0, dtype=_INT)
        return ComponentTable(np.zeros(0, dtype=np.int8), z, z, z, z, z)

    @staticmethod
    def block(kind: str, n: int = 1, **fields: Any) -> "ComponentTable":
        """``n`` components of one kind; each field is a scalar or an array of length n."""
        cols = {}
        for name in _FIELDS:
            value = fields.get(name, -1)
            cols[name] = np.broadcast_to(np.asarray(value, dtype=_INT), (n,)).copy()
        of = fields.get("of")
        if of is not None:  # kind names (or int8 codes) of what "rest" components sum
            codes = [KINDS.index(k) if isinstance(k, str) else int(k) for k in np.ravel(of)]
            cols["of"] = np.broadcast_to(np.asarray(codes, dtype=np.int8), (n,)).copy()
        return ComponentTable(np.full(n, KINDS.index(kind), dtype=np.int8), **cols)

    @staticmethod
    def concat(tables: Iterable["ComponentTable"]) -> "ComponentTable":
        tables = list(tables)
        if not tables:
            return ComponentTable.empty()
        of = None
        if any(t.of is not None for t in tables):
            of = np.concatenate([t.of_codes() for t in tables])
        cols = {f: np.concatenate([getattr(t, f) for t in tables]) for f in ("kind",) + _FIELDS}
        return ComponentTable(**cols, of=of)

    def of_codes(self) -> np.ndarray:
        """The ``of`` column (int8 kind codes, -1 where not a remainder), never None."""
        return self.of if self.of is not None else np.full(len(self), -1, dtype=np.int8)

    def __len__(self) -> int:
        return int(self.kind.shape[0])

    def __getitem__(self, i: Union[int, np.integer]) -> Component:
        of = -1 if self.of is None else int(self.of[i])
        return Component(
            KINDS[int(self.kind[i])],
            *(int(getattr(self, f)[i]) for f in _FIELDS),
            of=KINDS[of] if of >= 0 else "",
        )

    def __iter__(self) -> Iterator[Component]:
        return (self[i] for i in range(len(self)))

    def take(self, idx: np.ndarray) -> "ComponentTable":
        cols = {f: getattr(self, f)[idx] for f in ("kind",) + _FIELDS}
        return ComponentTable(**cols, of=None if self.of is None else self.of[idx])

    def tile_over_positions(self, positions: np.ndarray) -> "ComponentTable":
        """This table repeated once per residual position, with ``pos`` set to each."""
        P = len(positions)
        cols = {f: np.tile(getattr(self, f), P) for f in _FIELDS if f != "at"}
        at = np.repeat(np.asarray(positions, dtype=_INT), len(self))
        of = None if self.of is None else np.tile(self.of, P)
        return ComponentTable(np.tile(self.kind, P), at=at, of=of, **cols)

    def kinds(self) -> np.ndarray:
        return np.asarray(KINDS, dtype=object)[self.kind]

    def is_constant(self) -> np.ndarray:
        return _CONSTANT_CODES[self.kind]  # a lookup per int8 code (millions of components)

    @check_arg.entry
    def mask(self, caller: str = "select", **criteria: Any) -> np.ndarray:
        """Which components match every criterion (a value, a collection, or a predicate).

        Field names and value types are checked: an unknown field, an unknown kind, or a
        string where an integer field is compared is an :class:`ArgumentError`.
        """
        keep = np.ones(len(self), dtype=bool)
        for name, want in criteria.items():
            if name == "pos":
                warnings.warn(
                    f"{caller}(pos=...) is deprecated: the position a chained term "
                    "was written at is now 'at'; use at=.",
                    DeprecationWarning,
                    stacklevel=3,
                )
                name = "at"
            if name == "kind":
                col = self.kinds()
            elif name == "of":  # the kind a remainder sums ("" for other components)
                col = np.asarray(KINDS + ("",), dtype=object)[self.of_codes()]
            elif name in _FIELDS:
                col = getattr(self, name)
            else:
                raise ArgumentError(
                    f"{caller}: unknown field {name!r}; use kind, {', '.join(_FIELDS)} (e.g. "
                    "result.select(layer=3, head=7)), or of (the kind a 'rest' term sums)."
                )
            if callable(want):
                keep &= np.asarray([bool(want(v)) for v in col], dtype=bool)
                continue
            single = isinstance(want, (str, bool, float, np.generic)) or (
                isinstance(want, Tensor) and want.ndim == 0
            )
            values = [want] if single or check_arg.is_index(want) else want
            if not isinstance(values, (Iterable, np.ndarray)):
                raise ArgumentError(
                    f"{caller}: {name}={want!r}; pass a value, a collection of "
                    "values, or a predicate."
                )
            values = list(values)
            for v in values:
                if name in ("kind", "of"):
                    if not isinstance(v, str) or v not in KINDS:
                        raise ArgumentError(
                            f"{caller}: kind={v!r} is not a kind; use one of "
                            f"{', '.join(map(repr, KINDS))}."
                        )
                elif not check_arg.is_index(v):
                    raise ArgumentError(
                        f"{caller}: {name}={v!r} (type {type(v).__name__}); "
                        f"{name} is an integer field."
                    )
            keep &= np.isin(col, [v if isinstance(v, str) else int(v) for v in values])
        return keep


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


def _mean0(v: Tensor) -> Tensor:
    """``v.mean(0)`` into :func:`fresh_empty` memory; over one row that is ``v[0] + 0.0``,
    bit for bit (-0.0 becomes 0.0), in one cheap pass instead of a reduction."""
    v = v.detach()  # out= takes no autograd
    out = fresh_empty(tuple(v.shape[1:]), v.dtype, v.device)
    if v.shape[0] == 1:
        return torch.add(v[0], 0.0, out=out)
    return torch.mean(v, 0, out=out)


#: :func:`_largest` works on results with at least this many components (blocks of 4,096)
_LARGEST_MIN = 2**16
_LARGEST_BLOCK = 4096


def _largest(
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
        cand = cand[~_CONSTANT_CODES[table.kind[cand]]]
    if len(cand) < k:  # the bound came from constants
        return None
    return cand[np.lexsort((cand, -score[cand]))[:k]]


@jaxtyped(typechecker=beartype)
@dataclass(frozen=True, eq=False)
class Decomposition:
    """Terms that add up to a logit (or any readout), one per component.

    Attributes:
        values: the terms, ``[batch, pos, target, comp]``.
        components: the label of every term (``len == comp``).
        logits: what the terms explain, ``[batch, pos, target]``: the model's own logit (post
            soft-cap unless ``explains`` says otherwise), logit difference or readout.
        positions: the explained position of each ``(batch, pos)``.
        target_labels: a readable name per ``(batch, pos, target)``.
        explains: what ``logits`` is, e.g. ``"logit"``, ``"pre-softcap logit"``.
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
    """

    values: Float[Tensor, "batch pos target comp"]
    components: ComponentTable
    logits: Float[Tensor, "batch pos target"]
    positions: Int[Tensor, "batch pos"]
    target_labels: np.ndarray
    explains: str = "logit"
    prism: str = "residual"
    complete: bool = True
    str_tokens: Optional[list] = None
    precision: str = "float32"
    n_layers: int = 1
    index: Optional[Int[Tensor, "batch pos target comp"]] = None

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
        from tlprisms._core.sparse import to_dense

        return to_dense(self)

    @property
    def constants(self) -> "Decomposition":
        """Only the constant terms (biases of ``W_U``, norms, ``b_O``, ``b_out`` ...)."""
        return self._subset(self.components.is_constant())

    def total(self) -> Float[Tensor, "batch pos target"]:
        """The sum of the terms: equals :attr:`logits` for a complete decomposition."""
        return self.values.sum(-1)

    def gap(self) -> Float[Tensor, "batch pos target"]:
        """``total() - logits``: the completeness error, at float rounding when exact."""
        return self.total() - self.logits

    def tolerance(self) -> Float[Tensor, "batch pos target"]:
        """The default completeness bound per explained value:
        ``t * max(1, |logit|, sum of |terms|)`` with ``t`` = :func:`tolerance` of the precision
        the model computed in (1e-5 in float32, 1e-10 in float64); the sum of ``|terms|`` bounds
        the rounding of a sum whose terms cancel."""
        t = tolerance(self.precision, self.n_layers)
        scale = torch.maximum(self.logits.abs(), torch.linalg.vector_norm(self.values, 1, -1))
        return t * scale.clamp(min=1.0)

    @check_arg.entry
    def check(
        self, atol: Optional[Union[int, float]] = None, rtol: Optional[Union[int, float]] = None
    ) -> "Decomposition":
        """Raise :class:`CompletenessError` unless the terms add up to :attr:`logits`.

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
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0
            ):
                raise ArgumentError(f"check: {what}={value!r}; pass a number >= 0.")
        for t, what in ((self.values, "terms"), (self.logits, self.explains)):
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
            atol = default if atol is None else atol
            rtol = default if rtol is None else rtol
            tol = atol + rtol * self.logits.abs()
            bound = f"{atol:g} + {rtol:g}*|logit|"
        bad = err > tol
        if bool(bad.any()):
            where = tuple(int(i) for i in torch.nonzero(bad)[0])
            raise CompletenessError(
                f"check: the {self.prism} terms miss the {self.explains} by up to "
                f"{float(err.max()):.3g} (first at batch, pos, target = {where}: total "
                f"{float(self.total()[where]):.6g} vs {float(self.logits[where]):.6g}; bound "
                f"{bound}, for a model computing in {self.precision}). The terms were changed "
                "after the prism made them, or the cache was edited by hooks."
            )
        return self

    # ------------------------------------------------------------ selection
    def _subset(self, keep: np.ndarray) -> "Decomposition":
        if self.index is not None:
            from tlprisms._core.sparse import subset

            return subset(self, keep)
        idx = np.nonzero(keep)[0]
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
        (its label ``whole``); see :meth:`tlprisms._prisms.qk.PairTable.grouped`.
        """
        if hasattr(self.components, "grouped"):  # QK pairs: fields of either side
            group, table = self.components.grouped(by)
            if self.index is not None:
                from tlprisms._core.sparse import regroup

                return regroup(self, group, table)
            g = torch.as_tensor(group, dtype=torch.long, device=self.values.device)
            out = torch.zeros(
                *self.values.shape[:-1], len(table), dtype=self.values.dtype, device=g.device
            )
            return replace(self, values=out.index_add_(-1, g, self.values), components=table)
        if "pos" in by:
            warnings.warn(
                "aggregate('pos') is deprecated: the position a chained term was "
                "written at is now 'at'.",
                DeprecationWarning,
                stacklevel=2,
            )
            by = tuple("at" if name == "pos" else name for name in by)
        if "kind" not in by:
            by = ("kind",) + tuple(by)
        for name in by:
            if not isinstance(name, str) or name not in ("kind",) + _FIELDS:
                raise ArgumentError(
                    f"aggregate: unknown field {name!r}; use kind, {', '.join(_FIELDS)}."
                )
        c = self.components
        keys = np.stack(
            [c.kind.astype(np.int64)]
            + ([c.of.astype(np.int64)] if c.of is not None else [])  # remainders stay apart
            + [getattr(c, f) for f in by if f != "kind"],
            1,
        )
        uniq, first, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
        order = np.argsort(first)  # keep first-appearance order
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        if self.index is not None:
            from tlprisms._core.sparse import regroup

            table = c.take(first[order])
            cols = {
                f: (getattr(table, f) if f in by else np.full(len(table), -1, dtype=_INT))
                for f in _FIELDS
            }
            new = ComponentTable(table.kind, **cols, of=table.of)
            return regroup(self, rank[inverse.reshape(-1)], new)
        group = torch.as_tensor(
            rank[inverse.reshape(-1)], dtype=torch.long, device=self.values.device
        )
        out = torch.zeros(
            *self.values.shape[:-1], len(order), dtype=self.values.dtype, device=self.values.device
        )
        out.index_add_(-1, group, self.values)
        table = c.take(first[order])
        cols = {
            f: (getattr(table, f) if f in by else np.full(len(table), -1, dtype=_INT))
            for f in _FIELDS
        }
        return replace(self, values=out, components=ComponentTable(table.kind, **cols, of=table.of))

    # ------------------------------------------------------------ tables
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
            from tlprisms._core.sparse import component_row

            if batch is not None:
                batch = check_arg.in_range(batch, B, "batch", "top", of=f" ({B} rows)")
            if pos is not None:
                pos = check_arg.in_range(pos, P, "pos", "top", of=f" ({P} explained positions)")
            v = component_row(self, target, batch, pos)
            batch = pos = 0
        else:
            v = self.values[..., target, :]
        v = (
            _mean0(v)
            if batch is None
            else v[check_arg.in_range(batch, B, "batch", "top", of=f" ({B} rows)")]
        )
        v = (
            _mean0(v)
            if pos is None
            else v[check_arg.in_range(pos, P, "pos", "top", of=f" ({P} explained positions)")]
        )
        w = v.detach().float().cpu().numpy()
        score = {"abs": np.abs(w), "positive": w, "negative": -w}[order]
        idx = None
        if kind is None and type(self.components) is ComponentTable:
            idx = _largest(score, self.components, k, constants)
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
        if hasattr(c, "side_columns"):  # pairs (the QK prism): one column set per side
            cols = {"component": [str(c[i]) for i in idx], **c.side_columns(idx)}
            return pd.DataFrame({**cols, "value": w[idx]})
        return pd.DataFrame(
            {
                "component": [str(c[i]) for i in idx],
                "kind": np.asarray(KINDS, dtype=object)[c.kind[idx]],
                "layer": c.layer[idx],
                "head": c.head[idx],
                "neuron": c.neuron[idx],
                "src": c.src[idx],
                "at": c.at[idx],
                "feature": c.feature[idx],
                "value": w[idx],
            }
        )

    def to_frame(self) -> Any:
        """A long pandas table: one row per (batch, pos, target, component).

        Columns: ``batch``, ``pos`` (the explained position), ``target``, ``kind``, ``layer``,
        ``head``, ``neuron``, ``src``, ``at`` (where a chained term was written), ``feature``
        (a dictionary feature's index), ``value``.
        """
        import pandas as pd

        if self.index is not None:  # only the kept terms (and remainders, constants)
            from tlprisms._core.sparse import to_frame

            return to_frame(self)
        B, P, K, C = self.values.shape
        c = self.components
        bb, pp, kk, cc = np.meshgrid(
            np.arange(B), np.arange(P), np.arange(K), np.arange(C), indexing="ij"
        )
        positions = self.positions.cpu().numpy()
        labels = np.broadcast_to(self.target_labels, (B, P, K))
        if hasattr(c, "side_columns"):  # pairs (the QK prism): one column set per side
            rows = {
                "batch": bb.ravel(),
                "pos": positions[bb.ravel(), pp.ravel()],
                "target": labels[bb.ravel(), pp.ravel(), kk.ravel()],
            }
            values = self.values.detach().float().cpu().numpy().ravel()
            return pd.DataFrame({**rows, **c.side_columns(cc.ravel()), "value": values})
        return pd.DataFrame(
            {
                "batch": bb.ravel(),
                "pos": positions[bb.ravel(), pp.ravel()],
                "target": labels[bb.ravel(), pp.ravel(), kk.ravel()],
                "kind": c.kinds()[cc.ravel()],
                "layer": c.layer[cc.ravel()],
                "head": c.head[cc.ravel()],
                "neuron": c.neuron[cc.ravel()],
                "src": c.src[cc.ravel()],
                "at": c.at[cc.ravel()],
                "feature": c.feature[cc.ravel()],
                "value": self.values.detach().float().cpu().numpy().ravel(),
            }
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
                f" {what} {float(self.logits[0, -1, k]):.4g} = sum of terms "
                f"{float(tot[0, -1, k]):.4g}"
            )
            v = self.values[0, -1, k].detach().float().cpu().numpy()
            slot = None if self.index is None else self.index[0, -1, k].cpu().numpy()
            for i in np.argsort(-np.abs(v))[:5]:
                j = int(i) if slot is None else int(slot[i])
                if j >= 0:
                    lines.append(f"    {str(self.components[j]):<24} {_fmt(float(v[i]))}")
        return "\n".join(lines)

    # rendering lives in tlprisms.render; imported lazily
    def _repr_html_(self) -> str:
        from tlprisms import render

        return render.to_html(self)

    def show(self) -> Any:
        """Display the default view in Jupyter (offline, self-contained)."""
        from tlprisms import render

        return render.show(self)
