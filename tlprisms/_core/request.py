"""What a result answers, as fields: the typed request every prism is called with.

A facade method of :class:`~tlprisms.LogitPrism` checks its arguments, builds a
:class:`Request` and hands it to its prism module; the finished
:class:`~tlprisms.Decomposition` carries it (``result.request``), so that verification,
rendering and tables learn what a result is from fields, never by parsing its labels.

>>> r = Request("heads", target=" Paris", heads="all")
>>> r.prism, r.target, r.pos, r.is_chain
('heads', ' Paris', -1, False)
"""

from dataclasses import dataclass, replace
from typing import Any

__all__ = ["Request", "PRISMS"]

#: every prism a request may name (the facade method that made the result)
PRISMS = (
    "decompose",
    "residual",
    "heads",
    "neurons",
    "full",
    "features",
    "chain",
    "through_head",
    "through_neuron",
    "readout",
    "qk",
    "graph",
)


@dataclass(frozen=True)
class Request:
    """The arguments that define a result (already checked by the facade).

    Attributes:
        prism: the facade method that made it (one of :data:`PRISMS`).
        target: the target as passed (a token, ``LogitDiff``, ``Direction``, ...); None for
            ``readout`` and ``qk``, whose targets are a vector and key positions.
        pos: the explained position as passed (query position for ``qk``).
        softcap: ``"post"`` or ``"pre"`` (soft-capped models).
        heads, neurons, by_source: the layers split into heads / neurons (``qk``: the
            query side's; ``k_heads``/``k_neurons`` the key side's).
        path: the hops of a chain (:class:`~tlprisms.Hop`), first hop first.
        dictionaries: the dictionaries of a feature split.
        vector, layer, stream, bias: a ``readout``'s vector, block, the norm or stream read
            (its ``at=`` argument) and constant.
        head, keys, contrast, sides: the ``qk`` prism's head (with ``layer``), key
            positions, contrast flag and split sides.
        top_k, min_abs: the sparse arguments (None: dense).
    """

    prism: str
    # the arguments as the user passed them (checked by the prism module that reads them)
    target: Any = None
    pos: Any = -1
    softcap: Any = "post"
    heads: Any = ()
    neurons: Any = ()
    by_source: Any = True
    k_heads: Any = ()
    k_neurons: Any = ()
    path: Any = ()  # tuple of Hop
    dictionaries: Any = ()  # tuple of Dictionary
    vector: Any = None
    layer: Any = None
    stream: Any = None
    bias: Any = None
    head: Any = None
    keys: Any = None
    contrast: Any = False
    sides: Any = "both"
    top_k: Any = None
    min_abs: Any = None

    def __post_init__(self) -> None:
        if self.prism not in PRISMS:  # a programming error inside the package, not user input
            raise ValueError(f"Request: unknown prism {self.prism!r}; one of {PRISMS}.")

    @property
    def is_chain(self) -> bool:
        """True for a result that splits a term again (a path of hops)."""
        return bool(self.path)

    @property
    def is_sparse(self) -> bool:
        return self.top_k is not None or self.min_abs is not None

    def with_(self, **changes: Any) -> "Request":
        """This request with some fields changed."""
        return replace(self, **changes)
