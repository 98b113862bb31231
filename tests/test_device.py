"""Device placement: every prism computes where the cache lives and moves only small results.

A ``TorchFunctionMode`` watches every tensor operation while a prism runs and records each
copy to the host: ``.cpu()``, ``.numpy()``, ``.tolist()``, ``.item()``, and ``.to(...)`` from a
GPU to the CPU. A copy of more than :data:`LARGE` elements fails the test (a cache tensor, a
weight matrix, a dense block of terms). On a machine without a GPU the model runs on the CPU,
where ``.to("cpu")`` is a no-op, so there the test catches the explicit host copies;
``benchmarks/gpu_check.py`` runs this file with ``TLPRISMS_TEST_DEVICE=cuda``, where every copy
to the host is real and recorded. The results themselves must stay on the cache's device.
"""

import os
from typing import Any

import pytest
import torch
from torch.overrides import TorchFunctionMode

import tlprisms as tp
from tlprisms.demo import load_demo_model, load_demo_sae

DEVICE = os.environ.get("TLPRISMS_TEST_DEVICE", "cpu")
#: a copy to the host of more than this many elements is "large": the demo model's cache
#: tensors at 4 x 48 tokens hold 24k (residual stream) to 98k (MLP activations) elements,
#: its weights 16k and more; targets, positions and per-component tables hold far fewer.
LARGE = 4096

_EXPLICIT = {torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.tolist, torch.Tensor.item}


def _target_device(args: tuple, kwargs: dict) -> Any:
    if "device" in kwargs:
        return torch.device(kwargs["device"])
    for a in args[1:]:
        if isinstance(a, (str, torch.device)):
            return torch.device(a)
        if isinstance(a, torch.Tensor):
            return a.device
    return None


class HostCopies(TorchFunctionMode):
    """Records (what, elements) for every copy of a tensor to the host."""

    def __init__(self) -> None:
        super().__init__()
        self.copies: list[tuple[str, int]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if args and isinstance(args[0], torch.Tensor):
            src = args[0]
            if func in _EXPLICIT:
                self.copies.append((func.__name__, src.numel()))
            elif func is torch.Tensor.to:
                dst = _target_device(args, kwargs)
                if dst is not None and dst.type == "cpu" and src.device.type != "cpu":
                    self.copies.append(("to(cpu)", src.numel()))
        return func(*args, **kwargs)

    def large(self) -> list[tuple[str, int]]:
        return [c for c in self.copies if c[1] > LARGE]


@pytest.fixture(scope="module")
def prism() -> tp.LogitPrism:
    model = load_demo_model(device=DEVICE)
    tokens = torch.randint(
        1, model.cfg.d_vocab, (4, 48), generator=torch.Generator().manual_seed(0)
    )
    tokens = tokens.to(DEVICE)
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
    return tp.LogitPrism(model, cache, tokens=tokens, logits=logits)


CALLS = {
    "residual": lambda p: p.residual(7),
    "heads by source": lambda p: p.heads([7, tp.LogitDiff(3, 4)]),
    "neurons": lambda p: p.neurons(7),
    "full, every position": lambda p: p.full(tp.NextToken(), pos="all"),
    "through_head": lambda p: p.through_head(1, 2, 7, heads="all", neurons="all"),
    "through_neuron": lambda p: p.through_neuron(1, 5, 7, heads="all", neurons="all"),
    "readout": lambda p: p.readout(torch.ones(p.view.d_model, device=DEVICE), 1, at="ln2"),
    "full, every position, top_k": lambda p: p.full(tp.NextToken(), pos="all", top_k=8),
    "qk, heads on both sides": lambda p: p.qk(1, 0, q_heads="all", k_heads="all"),
    "features (demo SAE)": lambda p: p.features(7, load_demo_sae()),
}


@pytest.mark.parametrize("name", list(CALLS))
def test_no_large_copy_to_host(prism, name):
    with HostCopies() as seen:
        result = CALLS[name](prism)
    assert not seen.large(), f"{name} copied large tensors to the host: {seen.large()}"
    assert result.values.device == prism.device, "the result left the cache's device"
    result.check()


def test_verify_and_effects_copy_only_their_tables(prism):
    result = prism.full(7)
    with HostCopies() as seen:
        prism.verify(result, k=5, sample=5)
        prism.effects(7, [tp.Component("head", layer=1, head=h) for h in range(2)])
    assert not seen.large(), f"verify/effects copied large tensors to the host: {seen.large()}"


def test_the_tracker_sees_host_copies():
    """The tracker itself: an explicit copy of a large tensor is seen (so an empty list above
    means no copy, not a blind tracker)."""
    x = torch.zeros(LARGE + 1, device=DEVICE)
    with HostCopies() as seen:
        x.cpu()
        x.to("cpu")
    kinds = {k for k, _ in seen.large()}
    assert "cpu" in kinds
    if DEVICE != "cpu":
        assert "to(cpu)" in kinds


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_finiteness_is_checked_in_slices(monkeypatch, bad):
    """The cache's finiteness check reads big tensors in slices (no copy of a whole
    attention pattern) and still finds a bad value in the first or the last slice."""
    from tlprisms._seam import _cache

    monkeypatch.setattr(_cache, "FINITE_CHUNK", 7)
    t = torch.randn(5, 13)
    assert _cache.all_finite(t)
    for where in ((0, 0), (4, 12), (2, 6)):
        u = t.clone()
        u[where] = bad
        assert not _cache.all_finite(u)
        assert not _cache.all_finite(u.T)  # not contiguous: checked whole
