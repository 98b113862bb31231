"""The one terms type: what every prism module returns to the facade.

A prism module turns a recorded forward pass and a typed request
(:class:`~tlprisms._core.request.Request`) into :class:`Terms`: the terms
``values [batch, pos, target, comp]`` labelled by a component table, that add up to
``explained [batch, pos, target]`` (the logit, a logit difference, a readout, an attention
score, or the term a chain splits), the explained position per row, a label per target, what
``explained`` is, and the prism's name. A sparse split (``top_k``/``min_abs``) also gives the
slot ``index``. :func:`tlprisms._core.finish.finish` turns it into a
:class:`~tlprisms.Decomposition`.
"""

from dataclasses import dataclass, replace
from typing import Optional

import numpy as np
from beartype import beartype
from jaxtyping import Float, Int, jaxtyped
from torch import Tensor

from tlprisms._core.request import Request
from tlprisms._core.result import Decomposition
from tlprisms._core.sparse import sparse_result
from tlprisms._core.table import ComponentTable

__all__ = ["Terms", "keep_largest", "to_result"]


@jaxtyped(typechecker=beartype)
@dataclass(frozen=True)
class Terms:
    """Terms that add up to what they explain.

    Attributes:
        values: ``[batch, pos, target, comp]`` (sparse: ``comp`` are slots, see ``index``).
        table: the label of every component.
        explained: what the terms add up to, ``[batch, pos, target]``.
        positions: the explained (query) position of each ``(batch, pos)``.
        labels: a readable name per ``(batch, pos, target)`` (broadcastable).
        explains: what ``explained`` is (``"logit"``, ``"attention score"`` ...).
        name: the prism's name as results print it (``"heads"``, ``"through L3H2"`` ...).
        index: the component of each slot of a sparse split, -1 for an empty slot.
    """

    values: Float[Tensor, "batch pos target comp"]
    table: ComponentTable
    explained: Float[Tensor, "batch pos target"]
    positions: Int[Tensor, "batch pos"]
    labels: np.ndarray
    explains: str
    name: str
    index: Optional[Int[Tensor, "batch pos target comp"]] = None


def keep_largest(terms: Terms, top_k: Optional[int], min_abs: Optional[float]) -> Terms:
    """``terms`` (dense, already checked) with only the ``top_k`` largest terms (those with
    ``|term| >= min_abs``) per explained value, every constant and one remainder per (kind,
    layer), so totals stay exact; unchanged when both are None."""
    if top_k is None and min_abs is None:
        return terms
    st, table = sparse_result(terms.values, terms.table, top_k, min_abs)
    return replace(terms, values=st.values, table=table, index=st.index)


def to_result(
    terms: Terms,
    request: Request,
    precision: str,
    n_layers: int,
    str_tokens: Optional[list],
) -> Decomposition:
    """The one finishing step of every prism: ``terms`` as a :class:`Decomposition` that
    carries its ``request``, the input's tokens and the precision the model computed in."""
    return Decomposition(
        values=terms.values,
        components=terms.table,
        explained=terms.explained,
        positions=terms.positions,
        target_labels=terms.labels,
        explains=terms.explains,
        prism=terms.name,
        str_tokens=str_tokens,
        precision=precision,
        n_layers=n_layers,
        index=terms.index,
        request=request,
    )
