"""The ``>>>`` examples in the docstrings run (STYLE habit 7)."""

import doctest
import importlib

import pytest

MODULES = ["tlprisms.prism", "tlprisms._targets", "tlprisms._result"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
    assert result.attempted > 0
