"""The QK prism's labels: (query-side writer, key-side writer) pairs.

A QK term's component is a :class:`PairComponent` (``q:L0H2[src 1] x k:embed``); a result's
pairs are a :class:`PairTable`, which keeps each side's table once and per pair the index of
its writer on each side (the full product of two sides of thousands of writers stays
cheap). It overrides the component-table interface (:mod:`tlprisms._core.table`): frame
columns per side (``q_kind`` ... ``k_src``), grouping by side fields for ``aggregate()``,
and remainder groups by both sides' (kind, layer) for sparse results.

This module registers the QK prism's component kinds: ``pair``, and the constants ``b_Q``,
``b_K`` (the query and key biases) and ``alibi`` (an ALiBi model's positional score bias).
"""

from collections.abc import Sequence
from typing import Any, Optional

import numpy as np

from tlprisms._core.errors import ArgumentError
from tlprisms._core.table import KINDS, Component, ComponentTable, register_kinds

__all__ = ["PairComponent", "PairTable", "SIDE_FIELDS", "side_label", "side_block"]

register_kinds(
    ("pair", "b_Q", "b_K", "alibi"),
    constant=("b_Q", "b_K", "alibi"),
    owner="tlprisms._prisms.qk_table",
)

#: the label fields of each side of a pair, as ``to_frame()`` names them (``q_`` / ``k_``)
SIDE_FIELDS = ("kind", "layer", "head", "neuron", "src")


def side_label(c: Component) -> str:
    """One side of a pair as its label prints it: ``L0H2[src 1]``, ``L1.b_Q``, ``whole``
    (a side kept whole, ``sides="query"`` / ``"key"``).

    >>> side_label(Component("b_Q", layer=1)), side_label(Component("resid"))
    ('L1.b_Q', 'whole')
    """
    if c.kind == "resid":  # a side kept whole (sides="query" / "key")
        return "whole"
    if c.kind in ("b_Q", "b_K", "alibi"):
        return f"L{c.layer}.{c.kind}"
    return str(c)


#: the side fields aggregate() may keep (``q_``/``k_`` prefixed); ``"query"`` / ``"key"``
#: keep every field of that side and sum over the other
_AGG_FIELDS = tuple(f"{s}_{f}" for s in ("q", "k") for f in SIDE_FIELDS)
_FINE = ("head", "neuron", "src")


class PairComponent(Component):
    """One QK term's label: a query-side writer ``q`` and a key-side writer ``k``.

    ``rest``: a sparse result's remainder, the sum of the dropped pairs of one (query-side
    kind and layer, key-side kind and layer) group. The ALiBi positional bias is the pair
    of two ``alibi`` constants.

    >>> str(PairComponent(Component("embed"), Component("head", layer=0, head=2, src=1)))
    'q:embed x k:L0H2[src 1]'
    >>> str(PairComponent(Component("head", layer=1), Component("embed"), rest=True))
    'q:L1.heads x k:embed (rest)'
    >>> str(PairComponent(Component("alibi", layer=2, head=0), Component("alibi", layer=2, head=0)))
    'L2H0 alibi'
    """

    q: Component
    k: Component
    rest: bool

    def __init__(self, q: Component, k: Component, rest: bool = False) -> None:
        super().__init__("rest" if rest else "pair", of="pair" if rest else "")
        object.__setattr__(self, "q", q)
        object.__setattr__(self, "k", k)
        object.__setattr__(self, "rest", rest)

    @property
    def is_constant(self) -> bool:
        return self.q.is_constant and self.k.is_constant and not self.rest

    def __str__(self) -> str:
        if self.q.kind == "alibi" and self.k.kind == "alibi":
            return f"L{self.q.layer}H{self.q.head} alibi"
        s = f"q:{side_label(self.q)} x k:{side_label(self.k)}"
        return s + " (rest)" if self.rest else s

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PairComponent) and (self.q, self.k, self.rest) == (
            other.q,
            other.k,
            other.rest,
        )

    def __hash__(self) -> int:
        return hash((self.q, self.k, self.rest))


_PAIR = np.int8(KINDS.index("pair"))
_REST = np.int8(KINDS.index("rest"))


def side_block(table: ComponentTable, rows: np.ndarray, keep: Sequence[str]) -> ComponentTable:
    """Side labels ``rows`` of ``table`` with only the fields ``keep`` (others -1)."""
    cols = {
        f: (getattr(table, f)[rows] if f in keep else np.full(len(rows), -1, dtype=np.int32))
        for f in ("layer", "head", "neuron", "src", "at", "feature")
    }
    return ComponentTable(table.kind[rows], **cols)


class PairTable(ComponentTable):
    """Pair labels: the query side's and the key side's tables, and per pair the index of
    its writer on each side. The base columns say ``kind="pair"`` (``"rest"`` for a sparse
    result's remainders; other fields -1); select pairs by side with ``q_``/``k_`` prefixed
    fields: ``select(q_kind="head", k_layer=0)``, or ``select(kind="rest")``."""

    q: ComponentTable
    k: ComponentTable
    qi: np.ndarray
    ki: np.ndarray

    @staticmethod
    def make(
        q: ComponentTable,
        k: ComponentTable,
        qi: np.ndarray,
        ki: np.ndarray,
        rest: Optional[np.ndarray] = None,
    ) -> "PairTable":
        n = len(qi)
        minus = np.broadcast_to(np.int32(-1), (n,))
        kind = np.broadcast_to(_PAIR, (n,)) if rest is None else np.where(rest, _REST, _PAIR)
        of = None if rest is None else np.where(rest, _PAIR, np.int8(-1)).astype(np.int8)
        t = object.__new__(PairTable)
        ComponentTable.__init__(
            t, kind=kind, layer=minus, head=minus, neuron=minus, src=minus, at=minus, of=of
        )
        for name, value in (("q", q), ("k", k), ("qi", qi), ("ki", ki)):
            object.__setattr__(t, name, value)
        return t

    @staticmethod
    def product(q: ComponentTable, k: ComponentTable) -> "PairTable":
        """Every (query writer, key writer) pair, the query side varying fastest (the
        layout the pair products are computed in: each key-side writer's block is one
        contiguous row of query-side writers)."""
        nq, nk = len(q), len(k)
        qi = np.tile(np.arange(nq, dtype=np.int32), nk)
        ki = np.repeat(np.arange(nk, dtype=np.int32), nq)
        return PairTable.make(q, k, qi, ki)

    def rest(self) -> np.ndarray:
        """True at the remainders of a sparse result."""
        return self.kind == _REST

    def __getitem__(self, i: Any) -> PairComponent:
        return PairComponent(
            self.q[int(self.qi[i])], self.k[int(self.ki[i])], rest=bool(self.kind[i] == _REST)
        )

    def take(self, idx: np.ndarray) -> "PairTable":
        rest = self.rest()
        return PairTable.make(
            self.q, self.k, self.qi[idx], self.ki[idx], rest[idx] if rest.any() else None
        )

    def append(self, other: ComponentTable) -> "PairTable":
        """This table's pairs, then ``other``'s (a pair table; both sides' tables appended)."""
        assert isinstance(other, PairTable)
        nq, nk = len(self.q), len(self.k)
        return PairTable.make(
            ComponentTable.concat([self.q, other.q]),
            ComponentTable.concat([self.k, other.k]),
            np.concatenate([self.qi, other.qi + nq]).astype(np.int32),
            np.concatenate([self.ki, other.ki + nk]).astype(np.int32),
            np.concatenate([self.rest(), other.rest()]),
        )

    def is_constant(self) -> np.ndarray:
        const = self.q.is_constant()[self.qi] & self.k.is_constant()[self.ki]
        return const & ~self.rest()

    def constant_at(self, idx: np.ndarray) -> np.ndarray:
        const = self.q.constant_at(self.qi[idx]) & self.k.constant_at(self.ki[idx])
        return const & (self.kind[idx] != _REST)

    @property
    def is_pairs(self) -> bool:
        return True

    def remainder_column(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        """The last column of a sparse QK result's frame: ``rest``, True at remainders."""
        return {"rest": self.kind[idx] == _REST}

    # ------------------------------------------------------------ sparse remainders
    def group_keys(self, idx: np.ndarray) -> np.ndarray:
        """One int64 per pair ``idx``: its (query kind, layer, key kind, layer) group."""
        q, k = self.qi[idx], self.ki[idx]
        key = self.q.kind[q].astype(np.int64)
        key = key * 2**24 + (self.q.layer[q].astype(np.int64) + 1)
        key = key * 2**7 + self.k.kind[k].astype(np.int64)
        return key * 2**24 + (self.k.layer[k].astype(np.int64) + 1)

    def remainders(self, rep: np.ndarray) -> "PairTable":
        """One remainder pair per group, labelled by its representative pairs ``rep``:
        each side's kind and layer (``q:L3.heads x k:embed (rest)``)."""
        keep = ("layer",)
        q = side_block(self.q, self.qi[rep], keep)
        k = side_block(self.k, self.ki[rep], keep)
        n = len(rep)
        idx = np.arange(n, dtype=np.int32)
        return PairTable.make(q, k, idx, idx, np.ones(n, dtype=bool))

    # ------------------------------------------------------------ aggregate
    def grouped(self, by: Sequence[Any], stacklevel: int = 2) -> tuple[np.ndarray, "PairTable"]:
        """The group of every pair when the fields ``by`` are kept (``q_kind``,
        ``q_layer``, ... ``k_src``; ``"query"`` / ``"key"``: every field of that side), and
        the groups' labels. A side none of whose fields is named is summed over (its label
        ``whole``); a named side always keeps its kind. Remainders join the groups of their
        (kind, layer) unless a finer field (head, neuron, src) of their side is kept."""
        fields: dict[str, list[str]] = {"q": [], "k": []}
        for name in by:
            if name in ("query", "key"):
                fields[name[0]] = list(SIDE_FIELDS)
                continue
            if not isinstance(name, str) or name not in _AGG_FIELDS:
                raise ArgumentError(
                    f"aggregate: {name!r} is not a field of a QK result; use q_kind, q_layer, "
                    "q_head, q_neuron, q_src, k_kind, ... (e.g. aggregate('q_kind', 'q_layer') "
                    "for one term per query-side layer, the key side summed), or 'query' / "
                    "'key' for every field of one side."
                )
            side, _, f = name.partition("_")
            if f not in fields[side]:
                fields[side].append(f)
        if not fields["q"] and not fields["k"]:  # default: (kind, layer) on both sides
            fields = {"q": ["kind", "layer"], "k": ["kind", "layer"]}
        rest = self.rest()
        cols = []
        sides = {}
        for side, table, rows in (("q", self.q, self.qi), ("k", self.k, self.ki)):
            keep = [f for f in SIDE_FIELDS if f in fields[side] and f != "kind"]
            if fields[side]:
                cols.append(table.kind[rows].astype(np.int64))
                cols += [getattr(table, f)[rows].astype(np.int64) for f in keep]
            sides[side] = keep
        fine = any(f in _FINE for s in ("q", "k") for f in sides[s] if fields[s])
        cols.append((rest & fine).astype(np.int64))
        keys = np.stack(cols, 1)
        _, first, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
        order = np.argsort(first, kind="stable")  # first-appearance order of the groups
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        rep = first[order]
        labels = {}
        for side, table, rows in (("q", self.q, self.qi), ("k", self.k, self.ki)):
            if fields[side]:
                labels[side] = side_block(table, rows[rep], sides[side])
            else:
                labels[side] = ComponentTable.block("resid", len(rep))
        idx = np.arange(len(rep), dtype=np.int32)
        group_rest = (rest & fine)[rep]
        table = PairTable.make(
            labels["q"], labels["k"], idx, idx, group_rest if group_rest.any() else None
        )
        return rank[inverse.reshape(-1)], table

    def frame_columns(self, idx: np.ndarray, sparse: bool = False) -> dict[str, np.ndarray]:
        """``q_kind, q_layer, q_head, q_neuron, q_src, k_kind, ...`` of the pairs ``idx``:
        one column set per side (dense and sparse frames alike)."""
        out: dict = {}
        for side, table, rows in (("q", self.q, self.qi), ("k", self.k, self.ki)):
            r = rows[idx]
            for f in SIDE_FIELDS:
                out[f"{side}_{f}"] = table.kinds()[r] if f == "kind" else getattr(table, f)[r]
        return out

    def mask(self, caller: str = "select", **criteria: Any) -> np.ndarray:
        keep = np.ones(len(self), dtype=bool)
        for name, want in criteria.items():
            side, _, field = name.partition("_")
            if side in ("q", "k") and field in SIDE_FIELDS:
                table, rows = (self.q, self.qi) if side == "q" else (self.k, self.ki)
                keep &= table.mask(caller, **{field: want})[rows]
            elif name == "kind":
                keep &= ComponentTable.mask(self, caller, kind=want)
            else:
                raise ArgumentError(
                    f"{caller}: {name!r} is not a field of a QK result, whose components are "
                    "(query-side, key-side) pairs; use q_kind, q_layer, q_head, q_neuron, q_src "
                    "or k_kind, ... (e.g. select(q_kind='head', k_layer=0))."
                )
        return keep
