"""Shared fixtures: one tiny seeded model per family and folding, with its cache."""

import functools
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
# Offline by default: nothing in the suite may reach a hub (set before transformers loads).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import tlprisms as tp

from families import FAMILIES, make_tokenizer

BATCH, SEQ = 3, 7
#: where the family models live: ``TLPRISMS_TEST_DEVICE=cuda`` runs the family tests on a GPU
#: (``benchmarks/gpu_check.py`` does); the default is the CPU.
DEVICE = os.environ.get("TLPRISMS_TEST_DEVICE", "cpu")


@dataclass
class Case:
    name: str
    fold: bool
    model: Any
    tokens: torch.Tensor
    logits: torch.Tensor
    cache: Any

    @property
    def prism(self) -> "tp.LogitPrism":
        return tp.LogitPrism(self.model, self.cache, tokens=self.tokens, logits=self.logits)


@functools.cache
def build_case(name: str, fold: bool, dtype: torch.dtype = torch.float32) -> Case:
    model = FAMILIES[name](fold, dtype=dtype, tokenizer=make_tokenizer(), device=DEVICE)
    tokens = torch.randint(4, 60, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    tokens = tokens.to(DEVICE)
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
    return Case(name, fold, model, tokens, logits, cache)


CASES = [
    pytest.param((n, f), id=f"{n}-{'folded' if f else 'unfolded'}")
    for n in FAMILIES
    for f in (True, False)
]


@pytest.fixture(params=CASES)
def case(request) -> Case:
    return build_case(*request.param)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """In CI (TLPRISMS_REQUIRE_BROWSER=1) a skipped browser test is a failure."""
    import os

    outcome = yield
    report = outcome.get_result()
    if (
        report.skipped
        and os.environ.get("TLPRISMS_REQUIRE_BROWSER") == "1"
        and item.get_closest_marker("browser") is not None
    ):
        report.outcome = "failed"
        report.longrepr = f"browser test skipped but TLPRISMS_REQUIRE_BROWSER=1: {report.longrepr}"
