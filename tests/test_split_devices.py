"""Models split across devices: each layer's terms are computed where that layer lives.

A split model is simulated on the CPU (``tests/fake_devices.py``): layer 1, the final norm and
the unembedding of each two-layer family model, and their cached activations, live on a second
device. Every prism must then (a) give the values it gives on one device, bit for bit (the
same kernels run on the same data), (b) return its result on the device where the residual
stream starts (the embedding's), and (c) never move a far layer's cached activation or weight
across: the far layer's terms are computed there and only they (the results) cross. A real
pair of GPUs is checked by ``benchmarks/gpu_check.py``'s ``split`` step.
"""

import pytest
import torch
from fake_devices import FAR, HOME, TwoDevices, home, split_cache, split_model, to_far

import tlprisms as tp

from conftest import DEVICE, build_case
from families import FAMILIES

CUT = 1  # layers >= CUT live on the far device (the family models have 2 layers)

if DEVICE != "cpu":  # the simulated pair is the CPU and a CPU-backed second device
    pytest.skip("simulated on the CPU; gpu_check.py splits real devices", allow_module_level=True)


def _sae(p):
    d, n = p.view.d_model, 12
    gen = torch.Generator().manual_seed(3)
    return tp.Dictionary(
        W_enc=torch.randn(d, n, generator=gen),
        W_dec=torch.randn(n, d, generator=gen),
        b_enc=torch.randn(n, generator=gen),
        b_dec=torch.randn(d, generator=gen),
        hook="blocks.1.hook_resid_pre",
    )


CALLS = {
    "residual": lambda p: p.residual(5),
    "heads by source": lambda p: p.heads([5, tp.LogitDiff(3, 4)]),
    "neurons": lambda p: p.neurons(5),
    "full, every position": lambda p: p.full(tp.NextToken(), pos="all"),
    "full, every position, top_k": lambda p: p.full(tp.NextToken(), pos="all", top_k=4),
    "through_head": lambda p: p.through_head(1, 2, 5, heads="all", neurons="all"),
    "through_neuron": lambda p: p.through_neuron(1, 5, 5, heads="all", neurons="all"),
    "readout at ln2": lambda p: p.readout(torch.ones(p.view.d_model), 1, at="ln2"),
    "features": lambda p: p.features(5, _sae(p)),
    "every next token, without logits": lambda p: tp.LogitPrism(
        p.model, p.cache, tokens=p.tokens
    ).residual(tp.NextToken(), pos="all"),
    "qk, heads on both sides": lambda p: p.qk(1, 0, q_heads="all", k_heads="all"),
    "qk, key side through a head": lambda p: p.qk(
        1, 0, keys=[4], sides="key", path=[tp.Hop("head", 0, 1)]
    ),
}

NAMES = sorted(FAMILIES)


@pytest.fixture(scope="module", params=NAMES)
def pair(request):
    case = build_case(request.param, False)
    model = split_model(case.model, CUT)
    cache = split_cache(case.cache, CUT)
    return case, model, cache, to_far(case.logits)


@pytest.mark.parametrize("call", list(CALLS))
def test_split_model_gives_the_one_device_values(pair, call):
    case, model, cache, logits = pair
    want = CALLS[call](case.prism)
    with TwoDevices() as devices:
        prism = tp.LogitPrism(model, cache, tokens=case.tokens, logits=logits)
        got = CALLS[call](prism)
        got.check()
    assert got.values.device == HOME, "the result left the embedding's device"
    assert torch.equal(home(got.values), want.values)
    moved = devices.whole_inputs_moved()
    assert not moved, f"{call} moved a far layer's activations or weights: {moved}"


def test_the_harness_enforces_devices_and_records_moves():
    """The simulated pair refuses mixed-device arithmetic and sees a whole-tensor move (so an
    empty list above means none happened, not a blind harness)."""
    x = to_far(torch.arange(96.0).reshape(24, 4))
    with TwoDevices() as devices:
        with pytest.raises(RuntimeError, match="same device"):
            x + torch.ones(24, 4)
        y = (x * 2).sum(0)  # computed on the far device
        assert y.device == FAR
        assert torch.equal(home(y.to(HOME)), torch.tensor([2208.0, 2256.0, 2304.0, 2352.0]))
        x.to(HOME)
        x[-1:].to(HOME)  # a small view may cross
    moved = devices.whole_inputs_moved()
    assert len(moved) == 1 and moved[0].numel == 96
    assert [m.numel for m in devices.moves] == [4, 96, 4]


def test_task_kernel_on_a_split_model(pair):
    """explain_task's per-batch kernel on a split model: decompose's values bit for bit (on
    one device), computed where each layer lives."""
    from tlprisms._prisms.writes import split_of
    from tlprisms._seam import ModelView
    from tlprisms._tasks.kernel import TaskKernel

    case, model, cache, logits = pair
    targets, pos = [5, 6, 7], [2, 6, 4]
    split = {"heads": "all", "neurons": "all"}
    want = case.prism.decompose(tp.PerRow(targets), pos, by_source=False, **split)
    with TwoDevices() as devices:
        prism = tp.LogitPrism(model, cache, tokens=case.tokens, logits=logits)
        plan = split_of(prism.view, split["heads"], split["neurons"], False, "test")
        view = ModelView(model)
        kernel = TaskKernel(view, prism.recorded.cache, plan, "post", want.components)
        values, explained, _, _ = kernel(prism.recorded, targets, pos)
    assert values.device == HOME
    assert torch.equal(home(values), want.values) and torch.equal(home(explained), want.logits)
    moved = devices.whole_inputs_moved()
    assert not moved, f"the task kernel moved a far layer's activations or weights: {moved}"


def test_features_where_the_dictionary_lives(pair):
    """A dictionary the user put on its layer's (far) device: its features' terms, and a
    chain through one of its features, are computed there; its weights never cross."""
    case, model, cache, logits = pair
    want_d = _sae(case.prism)
    want = [case.prism.features(5, want_d), case.prism.chain(5, [tp.Hop("feature", want_d, 3)])]
    with TwoDevices() as devices:
        d = _sae(case.prism)
        d.W_enc, d.W_dec = to_far(d.W_enc), to_far(d.W_dec)
        prism = tp.LogitPrism(model, cache, tokens=case.tokens, logits=logits)
        got = [prism.features(5, d), prism.chain(5, [tp.Hop("feature", d, 3)])]
    for g, w in zip(got, want):
        assert g.values.device == HOME
        assert torch.equal(home(g.values), w.values)
    moved = devices.whole_inputs_moved()
    assert not moved, f"the dictionary's weights or far activations moved: {moved}"
