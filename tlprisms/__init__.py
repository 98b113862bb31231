"""tlprisms: exact logit prisms over TransformerLens caches.

Hold the non-linear values of one forward pass fixed (norm scales, attention patterns, MLP
gates); the logit is then exactly a sum of terms, one per embedding, head x source and
neuron. Importing this package does nothing else: no network, no patching, no CircuitsVis.

>>> import tlprisms as tp
>>> from tlprisms.demo import load_demo_model
>>> prism = tp.LogitPrism.run(load_demo_model(), "The capital of France is")
>>> prism.heads(" Paris").check().top(1, order="positive", kind="head")["component"][0]
'L0H2[src 4]'

Glossary: every call, result column and renderer uses these words in one sense.

==============  =================================================================================
``pos``         the **explained position**: where the explained logit (or readout) is read.
                An int, one int per batch row, or ``"all"``; the ``pos`` axis of
                ``Decomposition.values`` and the ``pos`` column of ``to_frame()``.
``src``         the **source position** a head read (``A[h, pos, src]``): ``Component.src``.
``at``          the **residual position a chained term was written at** (``through_head``
                reads the stream at the head's sources): ``Component.at``, ``-1`` when it is the
                explained position.
``target``      what is explained at a position: a token's logit, a ``LogitDiff``, a
                ``Direction``; the ``target`` axis.
``component``   one term's label (``Component``): ``kind``, ``layer``, ``head``, ``neuron``,
                ``src``, ``at``; fields that do not apply are ``-1``.
``heads=``      which attention layers to split into heads: ``"all"``, a layer, a list of
                layers, or ``()`` (the default everywhere; the ``heads()``/``neurons()`` presets
                take ``layers="all"``).
``neurons=``    the same for MLP layers split into neurons.
``by_source``   split heads by their source position too (default ``True`` everywhere).
``k``           how many (``top(k)``, ``summary(k)``, ``top_tokens(k=)``).
``order``       how ``top`` ranks: ``"abs"``, ``"positive"``, ``"negative"``.
``softcap``     for soft-capped models, explain the ``"post"``-cap logit (ratio frozen) or the
                ``"pre"``-cap one; ``Decomposition.explains`` says which.
``at=``         (``readout`` only) the norm or stream read: ``"ln1"``, ``"ln2"``, ``"ln_final"``,
                ``"resid_pre"``, ``"resid_mid"``, ``"resid_post"``.
==============  =================================================================================
"""

from tlprisms import render as _render  # noqa: F401 - registers the views of every result type (imports no circuitsvis)
from tlprisms._causal.certificate import Verification
from tlprisms._causal.graph_verify import GraphVerification
from tlprisms._core.errors import PrismError
from tlprisms._core.graph import AttributionGraph
from tlprisms._core.result import Decomposition
from tlprisms._core.table import Component
from tlprisms._core.targets import Direction, LogitDiff, NextToken, PerRow
from tlprisms._prisms.chain import Hop
from tlprisms._seam import needed_hooks
from tlprisms.dictionary import CrossLayerTranscoder, Dictionary
from tlprisms.prism import LogitPrism
from tlprisms.task import explain_task

__all__ = [
    "LogitPrism",
    "Decomposition",
    "Component",
    "LogitDiff",
    "Direction",
    "PerRow",
    "NextToken",
    "Hop",
    "explain_task",
    "needed_hooks",
    "PrismError",
    "Verification",
    "Dictionary",
    "CrossLayerTranscoder",
    "AttributionGraph",
    "GraphVerification",
]

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("tlprisms")  # the version lives in pyproject.toml only
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0+unknown"


def __getattr__(name: str):  # lazy submodules: demo, render, errors, weights
    import importlib

    if name in ("demo", "render", "errors", "weights", "cli", "hub"):
        return importlib.import_module(f"tlprisms.{name}")
    raise AttributeError(f"module 'tlprisms' has no attribute {name!r}")
