"""Component labels: :class:`Component` records, kept column-wise in a :class:`ComponentTable`.

Every term of a result has a label: a kind (``"head"``, ``"neuron"``, ``"b_U"`` ...) and the
fields that place it (``layer``, ``head``, ``neuron``, ``src``, ``at``, ``feature``; -1 where
they do not apply). A table stores them as columns, the kind as an int8 code into
:data:`KINDS`, so a chained result's millions of labels stay cheap.

**Kinds.** Each module that makes terms registers its kinds with :func:`register_kinds`,
saying which are constant terms (biases): the engine's kinds are registered here, the QK
prism's in :mod:`tlprisms._prisms.qk_table`. A kind's int8 code is its index in
:data:`KINDS`, fixed whatever the import order (codes are stored in results and Parquet
files): a new kind is appended to :data:`KINDS`, never inserted.

**Interface.** The generic code (``Decomposition.to_frame``/``top``/``aggregate``, sparse
results' remainders, rendering) asks the table, never its type:
:meth:`~ComponentTable.frame_columns`, :meth:`~ComponentTable.remainder_column`,
:meth:`~ComponentTable.grouped`, :meth:`~ComponentTable.group_keys`,
:meth:`~ComponentTable.remainders`, :meth:`~ComponentTable.append`,
:meth:`~ComponentTable.constant_at` and :attr:`~ComponentTable.is_pairs`. A prism whose
labels are not single writers (the QK prism's pairs,
:class:`tlprisms._prisms.qk_table.PairTable`) subclasses the table and overrides them.
"""

import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np
from torch import Tensor

from tlprisms._core import arguments as check_arg
from tlprisms._core.errors import ArgumentError

__all__ = [
    "Component",
    "ComponentTable",
    "CONSTANT_KINDS",
    "KINDS",
    "FIELDS",
    "register_kinds",
]

#: every component kind at its int8 code (its index). The codes are stored (results, Parquet
#: files), so they never change: a new kind is appended, and registered by the module that
#: makes its terms (:func:`register_kinds`).
KINDS = (
    # the engine's writers and constants (registered below)
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
    "rest",  # a sparse result's remainder: the dropped terms of one group
    # the feature prism's (registered below for now; see the note there)
    "feature",  # a dictionary feature (SAE, transcoder): layer, feature
    "b_dec",  # a dictionary's decoder bias
    "error",  # a dictionary's reconstruction error, taken from the cache
    "skip",  # a transcoder's linear skip connection
    "b_enc",  # a dictionary's encoder bias (the constant of a feature's pre-activation)
    # the QK prism's (registered in tlprisms._prisms.qk_table)
    "pair",  # a QK prism term: (query-side writer, key-side writer)
    "b_Q",
    "b_K",
    "alibi",  # the QK prism's ALiBi positional score bias (a constant per key)
)
#: the constant kinds (biases) of every registered module; filled by :func:`register_kinds`
CONSTANT_KINDS: set[str] = set()
#: the kinds registered so far, and the module that registered each
REGISTERED: dict[str, str] = {}
_FIELDS = ("layer", "head", "neuron", "src", "at", "feature")
#: how a remainder ("rest") component names the kind it aggregates
_PLURAL = {"head": "heads", "neuron": "neurons"}
#: the label fields of a component, besides ``kind``
FIELDS = _FIELDS

_INT = np.int32  # label columns: a chained result can have millions of components
#: True at the code of every constant kind (updated in place by :func:`register_kinds`)
_CONSTANT_CODES = np.zeros(len(KINDS), dtype=bool)


def register_kinds(kinds: Sequence[str], constant: Sequence[str] = (), owner: str = "") -> None:
    """Declare the component kinds a module makes, and which of them are constant terms.

    Each kind must already have its fixed code in :data:`KINDS` (append a new one there);
    registering a kind again (a module reloaded) is harmless, but two modules may not claim
    the same kind.

    >>> register_kinds(("embed",), owner="tlprisms._core.engine")  # registered again: no-op
    >>> "b_U" in CONSTANT_KINDS
    True
    """
    for kind in kinds:
        if kind not in KINDS:
            raise ValueError(
                f"register_kinds: {kind!r} has no code; append it to "
                "tlprisms._core.table.KINDS (codes are stored, so never insert)."
            )
        if REGISTERED.get(kind, owner) != owner:
            raise ValueError(
                f"register_kinds: {kind!r} is already registered by {REGISTERED[kind]!r}."
            )
        REGISTERED[kind] = owner
    for kind in constant:
        if kind not in kinds:
            raise ValueError(f"register_kinds: constant kind {kind!r} is not in kinds.")
        CONSTANT_KINDS.add(kind)
        _CONSTANT_CODES[KINDS.index(kind)] = True


register_kinds(
    KINDS[: KINDS.index("rest") + 1],
    constant=("b_O", "b_out", "b_U", "ln_final.b", "b_V", "ln.b", "b_in", "readout.b"),
    owner="tlprisms._core.engine",
)


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

    def constant_at(self, idx: np.ndarray) -> np.ndarray:
        """:meth:`is_constant` at the components ``idx`` only (a few of millions)."""
        return _CONSTANT_CODES[self.kind[idx]]

    # ------------------------------------------------------------ interface: tables
    @property
    def is_pairs(self) -> bool:
        """Whether the components are (query-side, key-side) pairs of the QK prism
        (:class:`tlprisms._prisms.qk_table.PairTable`); rendering picks its views by it."""
        return False

    def frame_columns(self, idx: np.ndarray, sparse: bool = False) -> dict[str, np.ndarray]:
        """The label columns of the components ``idx`` in ``to_frame()`` and ``top()``:
        ``kind``, ``layer``, ``head``, ``neuron``, ``src``, ``at`` and ``feature`` (a sparse
        result's frame has no ``feature`` column)."""
        cols = {"kind": np.asarray(KINDS, dtype=object)[self.kind[idx]]}  # idx first: millions
        for f in _FIELDS if not sparse else _FIELDS[:-1]:
            cols[f] = getattr(self, f)[idx]
        return cols

    def remainder_column(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        """The last column of a sparse result's frame: ``of``, the kind a remainder sums
        (``""`` for other components)."""
        return {"of": np.asarray(KINDS + ("",), dtype=object)[self.of_codes()[idx]]}

    def grouped(
        self, by: Sequence[Any], stacklevel: int = 2
    ) -> tuple[np.ndarray, "ComponentTable"]:
        """What ``aggregate(*by)`` sums: the group of every component and the groups' labels.

        Components sharing the fields ``by`` (and their kind; remainders stay apart from the
        terms) form one group, in first-appearance order; a group's label keeps the fields
        ``by`` and -1 in the others. ``stacklevel``: passed to the deprecation warning of
        ``"pos"`` (2: the caller of this method).
        """
        if "pos" in by:
            warnings.warn(
                "aggregate('pos') is deprecated: the position a chained term was "
                "written at is now 'at'.",
                DeprecationWarning,
                stacklevel=stacklevel,
            )
            by = tuple("at" if name == "pos" else name for name in by)
        if "kind" not in by:
            by = ("kind",) + tuple(by)
        for name in by:
            if not isinstance(name, str) or name not in ("kind",) + _FIELDS:
                raise ArgumentError(
                    f"aggregate: unknown field {name!r}; use kind, {', '.join(_FIELDS)}."
                )
        keys = np.stack(
            [self.kind.astype(np.int64)]
            + ([self.of.astype(np.int64)] if self.of is not None else [])  # remainders apart
            + [getattr(self, f) for f in by if f != "kind"],
            1,
        )
        uniq, first, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
        order = np.argsort(first)  # keep first-appearance order
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        table = self.take(first[order])
        cols = {
            f: (getattr(table, f) if f in by else np.full(len(table), -1, dtype=_INT))
            for f in _FIELDS
        }
        return rank[inverse.reshape(-1)], ComponentTable(table.kind, **cols, of=table.of)

    # ------------------------------------------------------------ interface: remainders
    def group_keys(self, idx: np.ndarray) -> np.ndarray:
        """One int64 per component ``idx``: its remainder group in a sparse result (its
        kind and layer)."""
        keys = self.kind[idx].astype(np.int64) * (2**32)
        return keys + self.layer[idx].astype(np.int64)

    def remainders(self, rep: np.ndarray) -> "ComponentTable":
        """One remainder (kind ``"rest"``) per group, labelled by its representative
        components ``rep``: their layer, and their kind in ``of`` (``L3.heads (rest)``)."""
        return ComponentTable.block(
            "rest", len(rep), layer=self.layer[rep], of=self.kind[rep].astype(np.int8)
        )

    def append(self, other: "ComponentTable") -> "ComponentTable":
        """This table's components, then ``other``'s (a table of the same type)."""
        return ComponentTable.concat([self, other])
