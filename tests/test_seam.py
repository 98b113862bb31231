"""The seam: TransformerLens names live only in tlprisms/_seam, what each prism reads is
declared once (needed_hooks is derived from it and is enough), provenance is always checked,
non-finite values are refused with where they were found, and check()'s bound is true for
the precision a model computed in."""

import ast
import dataclasses
from pathlib import Path

import pytest
import torch

import tlprisms as tp
from tlprisms._seam import PART_SITES, PARTS, ModelView
from tlprisms.errors import CacheError, CompletenessError, NonFiniteError

from conftest import build_case
from families import FAMILIES

PACKAGE = Path(tp.__file__).parent
#: fraction of a logit by which a decomposition that lost a constant term misses it (bf16)
WRONG_BY = 0.05


def _literals(path: Path) -> list[str]:
    """String constants (not docstrings) that look like TransformerLens hook names."""
    tree = ast.parse(path.read_text())
    docs = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            if "hook_" in node.value or node.value.startswith("blocks."):
                out.append(node.value)
    return out


def test_transformerlens_names_only_in_the_seam():
    leaks = {
        str(p.relative_to(PACKAGE)): _literals(p)
        for p in PACKAGE.rglob("*.py")
        if "_seam" not in p.parts
    }
    assert {k: v for k, v in leaks.items() if v} == {}


def _run_part(prism: tp.LogitPrism, part: str) -> list:
    if part == "residual":
        return [prism.residual(7)]
    if part == "heads":
        return [prism.heads(7), prism.decompose(7, heads="all", by_source=False)]
    if part == "neurons":
        return [prism.neurons(7)]
    if part == "qk":
        return [
            prism.qk(1, 0, q_heads="all", k_neurons="all"),
            prism.qk(1, 1, pos=4, keys=[3, 1], contrast=True, q_neurons="all", sides="query"),
        ]
    view = prism.view
    u = torch.ones(view.d_model)
    out = [
        prism.through_head(1, 1, 7),
        prism.through_neuron(1, 3, 7),
        prism.chain(7, [tp.Hop("head", 1, 0, src=2), tp.Hop("neuron", 0, 5)]),
        prism.readout(u, 1, at="ln1"),
        prism.readout(u, 1, at="resid_pre"),
        prism.readout(u, 0, at="resid_post"),
    ]
    if not view.attn_only:
        out += [prism.readout(u, 1, at="ln2"), prism.readout(u, 1, at="resid_mid")]
    return out


@pytest.mark.parametrize("part", PARTS)
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_needed_hooks_is_enough_for_each_part(name, part):
    """A cache recorded with needed_hooks(model, (part,)) serves that part's prisms, exactly."""
    case = build_case(name, True)
    keep = tp.needed_hooks(case.model, (part,))
    logits, cache = case.model.run_with_cache(case.tokens, names_filter=keep)
    assert set(keep.names) <= set(cache.keys()) and len(cache.keys()) < len(case.cache.keys())
    prism = tp.LogitPrism(case.model, cache, tokens=case.tokens, logits=logits)
    for result in _run_part(prism, part):
        result.check()


def test_needed_hooks_names_are_hooks_of_the_model(case):
    view = ModelView(case.model)
    names = tp.needed_hooks(case.model).names
    assert all(view.records(n) for n in names)
    assert set(names) <= set(case.cache.keys())


def test_part_declarations_nest():
    assert PART_SITES["residual"] <= PART_SITES["heads"] <= PART_SITES["chains"]
    assert PART_SITES["neurons"] <= PART_SITES["chains"]


# ----------------------------------------------------------------------------- provenance
@pytest.fixture(scope="module")
def demo():
    from tlprisms.demo import load_demo_model

    return load_demo_model()


@pytest.mark.parametrize("part", PARTS)
def test_cache_of_other_tokens_is_refused_whatever_it_holds(demo, part):
    t1 = demo.to_tokens("The capital of France is")
    t2 = demo.to_tokens("The capital of Japan is")
    _, cache = demo.run_with_cache(t1, names_filter=tp.needed_hooks(demo, (part,)))
    with pytest.raises(CacheError, match="not recorded from these tokens"):
        tp.LogitPrism(demo, cache, tokens=t2)


@pytest.mark.parametrize("part", PARTS)
def test_cache_of_a_twin_with_other_weights_is_refused(part):
    case = build_case("llama/bridge", True)
    twin = FAMILIES["llama/bridge"](True)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(1.1)
    _, cache = twin.run_with_cache(case.tokens, names_filter=tp.needed_hooks(twin, (part,)))
    with pytest.raises(CacheError, match="does not come from this model"):
        tp.LogitPrism(case.model, cache)


def test_cache_without_the_provenance_hooks_is_refused_not_trusted():
    case = build_case("gpt2/bridge", True)
    cache = {k: v for k, v in case.cache.items() if k != "blocks.0.hook_resid_pre"}
    with pytest.raises(CacheError, match=r"cannot check.*needed_hooks"):
        tp.LogitPrism(case.model, cache)


def test_logits_of_another_input_are_refused():
    case = build_case("gpt2/bridge", True)
    with pytest.raises(CacheError, match="logits passed do not belong to this cache"):
        tp.LogitPrism(case.model, case.cache, logits=case.logits.flip(0))


def test_cache_without_batch_axis_is_told_so():
    case = build_case("gpt2/bridge", True)
    _, cache = case.model.run_with_cache(case.tokens[:1])
    cache = cache.remove_batch_dim()
    with pytest.raises(CacheError, match="no batch axis.*remove_batch_dim"):
        tp.LogitPrism(case.model, cache)


def test_missing_hook_blames_the_names_filter_only_when_true():
    case = build_case("gpt2/bridge", True)
    _, cache = case.model.run_with_cache(case.tokens, names_filter=lambda n: "pattern" not in n)
    with pytest.raises(CacheError, match="names_filter that dropped it.*does record it"):
        tp.LogitPrism(case.model, cache).heads(7)


# ----------------------------------------------------------------------------- non-finite
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_cache_values_are_refused_with_where(value):
    case = build_case("gpt2/bridge", True)
    cache = {k: v.clone() for k, v in case.cache.items()}
    cache["blocks.1.hook_mlp_out"][1, 3, 5] = value
    with pytest.raises(NonFiniteError, match=r"blocks.1.hook_mlp_out.*batch 1, position 3"):
        tp.LogitPrism(case.model, cache).residual(7, pos=5)
    assert torch.isfinite(case.cache["blocks.1.hook_mlp_out"]).all()  # the user's is untouched


def test_non_finite_direction_and_readout_vector():
    case = build_case("gpt2/bridge", True)
    u = torch.ones(32)
    u[3] = float("nan")
    with pytest.raises(NonFiniteError, match="Direction"):
        case.prism.residual(tp.Direction(u))
    with pytest.raises(NonFiniteError, match="readout vector"):
        case.prism.readout(u, 1)


def test_check_refuses_non_finite_results():
    r = build_case("gpt2/bridge", True).prism.residual(7)
    for field in ("values", "logits"):
        t = getattr(r, field).clone()
        t.view(-1)[0] = float("inf")
        with pytest.raises(NonFiniteError, match="NaN or infinity"):
            dataclasses.replace(r, **{field: t}).check()


# ----------------------------------------------------------------------------- tolerances
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["llama/bridge", "gemma2/bridge", "gpt2/bridge"])
def test_low_precision_default_check_is_true(name, dtype):
    """A right decomposition of a bf16/fp16 model passes its default check; one that lost a
    constant term of a few percent of the logit fails it."""
    r = build_case(name, True, dtype).prism.full(7)
    assert r.precision == str(dtype).replace("torch.", "")
    r.check()
    wrong = r.values.clone()
    wrong[..., 0] += WRONG_BY * torch.maximum(r.logits.abs(), r.values.abs().sum(-1))
    with pytest.raises(CompletenessError, match=f"computing in {r.precision}"):
        dataclasses.replace(r, values=wrong).check()


def test_float64_model_with_float32_norms_passes_its_default_check():
    """HF's RMSNorm computes in float32 even in a float64 model: the logits then carry
    float32 rounding, and check() says so instead of blaming the cache."""
    case = build_case("gemma/bridge", True, torch.float64)
    r = case.prism.full(7)
    assert r.precision == "float32"
    r.check()
    no_logits = tp.LogitPrism(case.model, case.cache, tokens=case.tokens).full(7)
    assert no_logits.precision == "float64"
    no_logits.check()


def test_scaled_unembedding_passes_the_float32_bound():
    """Logits far from 1 with cancelling terms: the bound scales with the sum of |terms|."""
    case = build_case("neox/bridge", True)
    r = case.prism.full(7)
    assert float((r.values.abs().sum(-1) / r.logits.abs()).max()) > 10
    r.check()


def test_sdpa_bridge_without_pattern_is_told_to_use_eager_attention():
    """A bridge that calls Hugging Face's attention under sdpa never fires hook_pattern: the
    message says so (not "a names_filter dropped it") and names the fix."""
    from arch_zoo import build

    model = build("OPTForCausalLM", True)
    model.original_model.config._attn_implementation = "sdpa"
    _, cache = model.run_with_cache(torch.randint(4, 60, (2, 5)))
    prism = tp.LogitPrism(model, cache)
    prism.residual(7).check()
    with pytest.raises(CacheError, match="sdpa.*force_eager_attention"):
        prism.heads(7)
