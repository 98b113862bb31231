"""The ``>>>`` examples in the docstrings run (STYLE habit 7)."""

import doctest
import importlib

import pytest

#: every public module, and the internal ones whose docstrings carry examples
MODULES = [
    "tlprisms",
    "tlprisms.prism",
    "tlprisms.weights",
    "tlprisms.dictionary",
    "tlprisms._tasks.task",
    "tlprisms.distributed",
    "tlprisms.errors",
    "tlprisms.render",
    "tlprisms.demo",
    "tlprisms.hub",
    "tlprisms._seam",
    "tlprisms._core.targets",
    "tlprisms._core.result",
    "tlprisms._core.table",
    "tlprisms._core.views",
    "tlprisms._prisms.chain",
    "tlprisms._prisms.qk_table",
    "tlprisms._prisms.qk_chain",
    "tlprisms.render.graph",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
    assert result.attempted > 0
