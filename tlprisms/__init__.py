"""tlprisms: exact logit prisms over TransformerLens caches.

Hold the non-linear values of one forward pass fixed (norm scales, attention patterns, MLP
gates); the logit is then exactly a sum of terms, one per embedding, head x source and
neuron. Importing this package does nothing else: no network, no patching, no CircuitsVis.
"""

from tlprisms._errors import PrismError
from tlprisms._result import Component, Decomposition
from tlprisms._seam import needed_hooks
from tlprisms._chain import Hop
from tlprisms._targets import Direction, LogitDiff, NextToken, PerRow
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
]

__version__ = "0.1.0"


def __getattr__(name: str):  # lazy submodules: demo, render, errors, weights
    import importlib

    if name in ("demo", "render", "errors", "weights", "cli"):
        return importlib.import_module(f"tlprisms.{name}")
    raise AttributeError(f"module 'tlprisms' has no attribute {name!r}")
