"""Every causal LM TransformerLens can bridge: decomposed exactly, or refused for its true reason.

The rows come from ``arch_zoo`` (TransformerLens's own ``SUPPORTED_ARCHITECTURES``, built as
tiny random models offline), so a new TransformerLens release adds rows by itself: a new
decoder is expected to be exact, a new mixture of experts / hybrid / state-space model to be
refused (:data:`BY_KIND`), until :data:`EXPECT` says otherwise.

For each model (folded; unfolded too where that path differs, the other unfolded rows are
``slow``): either every prism (residual, heads, neurons, full, through_head, through_neuron,
``LogitPrism.run``) passes ``check()``, explains the model's own logit and its chains total
the term they split, or the first call (``LogitPrism(...)`` or ``residual``) raises the
expected :class:`~tlprisms.errors.PrismError` with a message that names the true reason.
``docs/architectures.md`` is this table with the measured results
(``scripts/arch_survey.py --markdown docs/architectures.md``).
"""

import functools
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import pytest
import torch

import tlprisms as tp
from tlprisms.errors import CompletenessError, PrismError, UnsupportedModelError

import arch_zoo as zoo

B, P, TARGET = 3, 7, 7
TOKENS_LO, TOKENS_HI = 4, 60


@dataclass(frozen=True)
class Expect:
    """What tlprisms must do with one architecture."""

    error: Optional[type] = None  # None: every prism exact; else the refusal's class
    reason: str = ""  # regex (case-insensitive) the refusal's message must match
    note: str = ""  # what is special about it (for docs/architectures.md)

    @property
    def exact(self) -> bool:
        return self.error is None


def exact(note: str = "") -> Expect:
    return Expect(note=note)


def refused(reason: str, note: str, error: type = UnsupportedModelError) -> Expect:
    return Expect(error, reason, note)


_NOT_ATTENTION = r"mamba|recurrent|state.space|hybrid|convolution|linear.attention"

#: the rule for an architecture :data:`EXPECT` does not name, by its ``arch_zoo`` kind
BY_KIND: dict[str, Expect] = {
    zoo.DECODER: exact(),
    zoo.MOE: refused(r"mixture.of.experts", "mixture of experts: the routing is not linear"),
    zoo.HYBRID: refused(_NOT_ATTENTION, "recurrent / state-space / convolution layers"),
    zoo.SSM: refused(_NOT_ATTENTION, "no attention (state-space / recurrent)"),
}

#: THE expectation table: architecture -> exact, or (error class, regex of the true reason)
EXPECT: dict[str, Expect] = {
    # ---- decoders: exact (what each one exercises)
    "LlamaForCausalLM": exact("RMSNorm, rotary, GQA, SwiGLU"),
    "MistralForCausalLM": exact("sliding-window attention"),
    "Ministral3ForCausalLM": exact(),
    "Qwen2ForCausalLM": exact("attention biases"),
    "Qwen3ForCausalLM": exact("q/k norm"),
    "SeedOssForCausalLM": exact("attention biases"),
    "SmolLM3ForCausalLM": exact(),
    "HunYuanDenseV1ForCausalLM": exact(),
    "Ernie4_5ForCausalLM": exact(),
    "GlmForCausalLM": exact("partial rotary"),
    "Glm4ForCausalLM": exact("post-norms"),
    "Starcoder2ForCausalLM": exact("LayerNorm, plain MLP"),
    "StableLmForCausalLM": exact("partial rotary"),
    "Phi3ForCausalLM": exact("fused qkv / gate-up"),
    "GemmaForCausalLM": exact("embedding x sqrt(d_model), RMSNorm (1 + w)"),
    "Gemma2ForCausalLM": exact("post-norms, logit soft-cap, sliding window"),
    "Gemma3ForCausalLM": exact("q/k norm, post-norms, sliding window"),
    "GPT2LMHeadModel": exact("LayerNorm, learned positions"),
    "GPTBigCodeForCausalLM": exact("multi-query attention"),
    "GPTNeoForCausalLM": exact("local attention"),
    "GPTNeoXForCausalLM": exact("parallel attention + MLP, two LayerNorms"),
    "MptForCausalLM": exact("ALiBi"),
    "OlmoForCausalLM": exact("non-parametric LayerNorm"),
    "Olmo2ForCausalLM": exact("post-norms only, q/k norm"),
    "Olmo3ForCausalLM": exact("post-norms only, sliding window"),
    "Exaone4ForCausalLM": exact("post-norms only, sliding window"),
    "ApertusForCausalLM": exact("xIELU activation, q/k norm"),
    "ArceeForCausalLM": exact("relu^2 activation"),
    "Jais2ForCausalLM": exact("relu^2, LayerNorm with bias"),
    "NemotronForCausalLM": exact("relu^2, LayerNorm1p"),
    "NanoChatForCausalLM": exact("unhooked RMSNorm after the embedding, relu^2, soft-cap"),
    "BloomForCausalLM": exact("LayerNorm after the embedding, ALiBi"),
    "XGLMForCausalLM": exact("sinusoidal positions with no hook, embedding x sqrt(d_model)"),
    "GraniteForCausalLM": exact("embedding, residual and logit multipliers"),
    "CohereForCausalLM": exact("parallel attention + MLP, one shared LayerNorm, logit scale"),
    "Cohere2ForCausalLM": exact("parallel attention + MLP, one shared LayerNorm, logit scale"),
    "FalconForCausalLM": exact("parallel attention + MLP, one shared LayerNorm, MQA"),
    "PhiForCausalLM": exact("parallel attention + MLP, one shared LayerNorm"),
    "GPTJForCausalLM": exact("parallel attention + MLP, one shared LayerNorm, rotary"),
    "OPTForCausalLM": exact("hooks flattened to [batch*pos], ffn_dim"),
    # ---- decoders: refused
    "OpenAIGPTLMHeadModel": refused(
        r"post-LN", "post-LN blocks: each LayerNorm rescales the whole residual stream"
    ),
    "ModernBertDecoderForCausalLM": refused(
        r"prediction head", "a nonlinear prediction head between the final norm and W_U"
    ),
    "Gemma4ForCausalLM": refused(
        r"per-layer|layer.scalar", "per-layer input writes and a layer scalar"
    ),
    "BitNetForCausalLM": refused(
        r"attn_sub_norm|sub.?norm", "a norm over all heads between z and W_O (attn_sub_norm)"
    ),
    "YoutuForCausalLM": refused(
        r"multi-head latent attention", "multi-head latent attention (no W_V)"
    ),
    "VaultGemmaForCausalLM": refused(
        r"compatibility mode", "TransformerLens does not support compatibility mode for it"
    ),
    # ---- mixtures of experts, hybrids with a reason of their own (both reasons are true)
    "DeepseekV2ForCausalLM": refused(
        r"mixture.of.experts|multi-head latent attention", "also multi-head latent attention"
    ),
    "DeepseekV3ForCausalLM": refused(
        r"mixture.of.experts|multi-head latent attention", "also multi-head latent attention"
    ),
    "FalconH1ForCausalLM": refused(r"mamba", "a mamba mixer in parallel with attention"),
    "HrmTextForCausalLM": refused(
        r"recurrent|no TransformerLens 'blocks'",
        "recurrent stacks that TransformerLens bridges without blocks",
    ),
}

#: TransformerLens (or transformers) cannot build or run these tiny models: name -> (folds, why)
TL_BROKEN: dict[str, tuple[tuple[bool, ...], str]] = {
    "CodeGenForCausalLM": (
        (True, False),
        "its bridge reads CodeGenAttention.embed_positions, which transformers 5 removed",
    ),
    "BloomModel": ((True, False), "a base model without an LM head"),
    "GraniteMoeHybridForCausalLM": ((True, False), "NoPE layers crash on rotary_emb"),
    "FalconH1ForCausalLM": ((True,), "folding its weights fails in TransformerLens"),
}

#: whose unfolded path differs from the folded one; the other unfolded rows are ``slow``
UNFOLDED = {
    "CohereForCausalLM",
    "Cohere2ForCausalLM",
    "GraniteForCausalLM",
    "BloomForCausalLM",
    "FalconH1ForCausalLM",
    "LlamaForCausalLM",
    "GPT2LMHeadModel",
    "Gemma2ForCausalLM",
    "GPTNeoXForCausalLM",
}

INFOS = [i for i in zoo.architectures() if i.buildable]
KINDS = {i.name: i.kind for i in INFOS}


#: where TransformerLens 3.x bridges an architecture differently: (name, fold) -> expectation
TL3_EXPECT: dict[tuple[str, bool], Expect] = {
    ("Cohere2ForCausalLM", True): refused(
        r"TransformerLens 3\.x still applies it",
        "TL 3.x reports the logit scale folded into W_U but applies it after W_U",
    ),
}


def _tl_major() -> int:
    from importlib.metadata import version

    return int(version("transformer-lens").split(".")[0])


def expect_for(name: str, fold: Optional[bool] = None) -> Expect:
    """The expectation for ``name``: :data:`EXPECT`, else the rule of its kind."""
    if fold is not None and _tl_major() < 4 and (name, fold) in TL3_EXPECT:
        return TL3_EXPECT[(name, fold)]
    if name in EXPECT:
        return EXPECT[name]
    if not zoo.supports_compatibility_mode(name):
        return refused(r"compatibility mode", "TransformerLens refuses compatibility mode")
    return BY_KIND[KINDS[name]]


# ---------------------------------------------------------------- building and measuring
@dataclass
class Case:
    name: str
    fold: bool
    model: Any = None
    tokens: Any = None
    logits: Any = None
    cache: Any = None
    skip: str = ""  # the zoo cannot build it here
    broken: str = ""  # TransformerLens / transformers failed to build or run it


def _versions() -> str:
    from importlib.metadata import version

    import transformer_lens
    import transformers

    tl = getattr(transformer_lens, "__version__", None) or version("transformer_lens")
    return f"TransformerLens {tl}, transformers {transformers.__version__}"


@functools.cache
def build_case(name: str, fold: bool, attn_implementation: str = "eager") -> Case:
    """The tiny model, its tokens, logits and cache (built once per module)."""
    case = Case(name, fold)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model = zoo.build(name, fold, attn_implementation=attn_implementation)
        except zoo.ZooSkip as exc:
            case.skip = str(exc)
            return case
        except Exception as exc:  # noqa: BLE001 - TransformerLens's failure, not tlprisms'
            case.broken = f"{type(exc).__name__}: {exc}"
            return case
        tokens = torch.randint(
            TOKENS_LO, TOKENS_HI, (B, P), generator=torch.Generator().manual_seed(1)
        )
        try:
            with torch.no_grad():
                logits, cache = model.run_with_cache(tokens)
        except Exception as exc:  # noqa: BLE001
            case.broken = f"run_with_cache: {type(exc).__name__}: {exc}"
            return case
    case.model, case.tokens, case.logits, case.cache = model, tokens, logits, cache
    return case


@dataclass
class Measured:
    verdict: str  # exact | refused | partial | wrong | crash | skip | tl-broken
    call: str = ""  # the call that did not give an exact result
    error: str = ""  # its exception class
    message: str = ""
    exc: Optional[BaseException] = None

    def line(self) -> str:
        text = " ".join(self.message.split())
        head = f"{self.verdict}"
        if self.call:
            head += f" at {self.call}"
        if self.error:
            head += f" ({self.error})"
        return f"{head}: {text}" if text else head


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def measure(case: Case) -> Measured:
    """Run every prism on ``case`` and say what came of it (never raises)."""
    if case.skip:
        return Measured("skip", message=case.skip)
    if case.broken:
        return Measured("tl-broken", message=case.broken)
    model, tokens, logits, cache = case.model, case.tokens, case.logits, case.cache
    n_layers = int(model.cfg.n_layers)
    layer = min(1, n_layers - 1)
    post = f"blocks.{layer}.mlp.hook_post"
    neuron = min(3, int(cache[post].shape[-1]) - 1) if post in cache else 3
    results: dict[str, Any] = {}
    calls = [
        ("LogitPrism", lambda: tp.LogitPrism(model, cache, tokens=tokens, logits=logits)),
        ("residual", lambda: results["LogitPrism"].residual(TARGET)),
        ("heads", lambda: results["LogitPrism"].heads(TARGET)),
        ("neurons", lambda: results["LogitPrism"].neurons(TARGET)),
        ("full", lambda: results["LogitPrism"].full(TARGET)),
        ("through_head", lambda: results["LogitPrism"].through_head(layer, 0, TARGET)),
        ("through_neuron", lambda: results["LogitPrism"].through_neuron(layer, neuron, TARGET)),
        ("run", lambda: tp.LogitPrism.run(model, tokens).full(TARGET)),
        ("own logits", lambda: tp.LogitPrism(model, cache, tokens=tokens).residual(TARGET)),
    ]
    for i, (name, call) in enumerate(calls):
        try:
            res = call()
            if name != "LogitPrism":
                res.check()
            results[name] = res
        except CompletenessError as exc:
            return Measured("wrong", name, type(exc).__name__, str(exc), exc)
        except PrismError as exc:
            verdict = "refused" if i <= 1 else "partial"
            return Measured(verdict, name, type(exc).__name__, str(exc), exc)
        except Exception as exc:  # noqa: BLE001
            return Measured("crash", name, type(exc).__name__, str(exc), exc)
    # the explained value is the model's own logit (not only a total that matches itself)
    own = logits[:, -1, TARGET].detach()
    tol = 1e-5 * max(1.0, float(own.abs().max()))
    for name in ("residual", "own logits"):
        got = results[name].logits[:, 0, 0]
        if not torch.allclose(got, own, rtol=1e-4, atol=tol):
            return Measured(
                "wrong",
                name,
                message=(
                    f"explains {got.tolist()} but the model's logit of token {TARGET} at the last "
                    f"position is {own.tolist()}"
                ),
            )
    # each chain totals the term it splits; run() agrees with the prism on the same cache
    checks = [
        (
            "through_head",
            results["through_head"].total(),
            results["heads"].select(kind="head", layer=layer, head=0).values.sum(-1),
        ),
        (
            "through_neuron",
            results["through_neuron"].total(),
            results["neurons"].select(kind="neuron", layer=layer, neuron=neuron).values.sum(-1),
        ),
        ("run", results["run"].total(), results["full"].total()),
    ]
    for name, got, want in checks:
        err = _rel(got, want)
        if not err <= 1e-4:
            return Measured(
                "wrong",
                name,
                message=(
                    f"totals {got.flatten()[:3].tolist()} but the term it splits is "
                    f"{want.flatten()[:3].tolist()} (relative error {err:.2g})"
                ),
            )
    return Measured("exact")


def judge(expect: Expect, got: Measured) -> Optional[str]:
    """None when ``got`` is what ``expect`` says, else what differs (one line)."""
    if got.verdict in ("skip", "tl-broken"):
        return None
    if expect.exact:
        return None if got.verdict == "exact" else f"expected exact, got {got.line()}"
    want = f"expected {expect.error.__name__} matching /{expect.reason}/"
    if got.verdict != "refused":
        return f"{want}, got {got.line()}"
    if not isinstance(got.exc, expect.error):
        return f"{want}, got {got.line()}"
    if not re.search(expect.reason, got.message, re.IGNORECASE):
        return f"{want}, but the message does not say so: {got.line()}"
    return None


# ---------------------------------------------------------------- the tests
def _params() -> list:
    params = []
    for info in INFOS:
        for fold in (True, False):
            marks = [] if fold or info.name in UNFOLDED else [pytest.mark.slow]
            params.append(
                pytest.param(
                    info.name,
                    fold,
                    marks=marks,
                    id=f"{info.name}-{'folded' if fold else 'unfolded'}",
                )
            )
    return params


def _built(name: str, fold: bool, attn_implementation: str = "eager") -> Case:
    case = build_case(name, fold, attn_implementation)
    if case.skip:
        pytest.skip(case.skip)
    if case.broken:
        folds, why = TL_BROKEN.get(name, ((), ""))
        reason = f"{_versions()} cannot build or run it ({why or 'unexpected'}): {case.broken}"
        if fold in folds:
            pytest.xfail(reason)
        pytest.skip(reason)
    return case


@pytest.mark.parametrize("name,fold", _params())
def test_architecture(name: str, fold: bool) -> None:
    """Exact in every prism, or refused at the first call for the reason :data:`EXPECT` says."""
    case = _built(name, fold)
    problem = judge(expect_for(name, fold), measure(case))
    assert problem is None, f"{name} ({'folded' if fold else 'unfolded'}): {problem}"


#: architectures whose attention scores carry ALiBi: the QK prism splits them exactly, the
#: positional bias one constant pair per key (``L{layer}H{head} alibi``)
QK_ALIBI = ("BloomForCausalLM", "MptForCausalLM")


@pytest.mark.parametrize("name", QK_ALIBI)
def test_qk_exact_on_alibi_models(name: str) -> None:
    """The QK prism on an ALiBi model: exact against the recorded scores, every head."""
    from tlprisms._seam import Site

    case = _built(name, True)
    prism = tp.LogitPrism(case.model, case.cache, tokens=case.tokens, logits=case.logits)
    layer = int(case.model.cfg.n_layers) - 1
    scores = case.cache[prism.view.hook(Site.ATTN_SCORES, layer)]
    for head in range(int(case.model.cfg.n_heads)):
        r = prism.qk(layer, head, q_heads="all").check()
        assert torch.equal(r.logits[:, 0], scores[:, head, -1])
        assert r.select(q_kind="alibi").values.shape[-1] == 1


def test_sdpa_bridge_says_why_the_pattern_is_missing() -> None:
    """A bridge running HF's sdpa attention records no pattern: the refusal names sdpa and
    how to get eager attention, not a names_filter the user never passed."""
    case = _built("OPTForCausalLM", True, "sdpa")
    if "blocks.0.attn.hook_pattern" in case.cache:
        pytest.skip("this TransformerLens records the pattern under sdpa")
    with pytest.raises(PrismError) as info:
        tp.LogitPrism(case.model, case.cache, tokens=case.tokens).heads(TARGET)
    message = str(info.value)
    assert re.search(r"sdpa", message) and re.search(r"eager", message), message


def test_expectations_name_real_architectures() -> None:
    """Every name in the tables is a ``transformers`` class: a typo would silently fall back
    to the rule of the kind."""
    import transformers

    unknown = sorted(
        n
        for n in (*EXPECT, *TL_BROKEN, *UNFOLDED)
        if not isinstance(getattr(transformers, n, None), type)
    )
    assert not unknown, unknown


# ---------------------------------------------------------------- the QK prism, every family
#: architectures (exact in the logit prisms) whose attention scores the QK prism refuses,
#: with the regex of the true reason; every other exact architecture is split exactly
QK_REFUSED: dict[str, str] = {
    "NanoChatForCausalLM": r"normalises queries",  # a weightless RMSNorm on q and k
}
#: where only TransformerLens 4.x's bridge differs: HunYuan normalises q/k after rotary as
#: Hugging Face does (TL 3.9's bridge normalises before, which the prism splits exactly)
QK_REFUSED_TL4: dict[str, str] = {"HunYuanDenseV1ForCausalLM": r"after rotary"}
#: the softmax of the explained scores over the keys attended equals the recorded pattern
#: (probabilities, float32)
QK_PATTERN_ATOL = 1e-5
#: with the scales frozen, removing a writer moves each score difference by minus its terms
#: (relative to 1 + |score| + sum |terms|)
QK_CAUSAL_RTOL = 1e-4
#: attention weights at or below this (float32 underflow territory) carry no score difference
QK_UNDERFLOW = 1e-30


def qk_verdict(name: str, fold: Optional[bool] = True) -> str:
    """``"exact"``, ``"refused"`` (the QK prism's own reason) or ``"no"`` (the logit prisms
    already refuse the model): what the QK column of docs/architectures.md says."""
    if not expect_for(name, fold).exact:
        return "no"
    return "refused" if name in qk_refused() else "exact"


def qk_refused() -> dict[str, str]:
    """:data:`QK_REFUSED` for the installed TransformerLens."""
    return {**QK_REFUSED, **(QK_REFUSED_TL4 if _tl_major() >= 4 else {})}


def _qk_prism(case: Case) -> Any:
    return tp.LogitPrism(case.model, case.cache, tokens=case.tokens, logits=case.logits)


def _norm_sized_qk_norms(hf: Any) -> None:
    """Cohere's per-head q/k norm weights (``[heads, d_head]``) back to norm size,
    ``1 + 0.3 * N(0, 1)``: the zoo scales every 2-D parameter as a matrix (x7), which makes
    q and k so large that a score of order 1 is the float32 difference of products of order
    100 and the model's own rounding passes ``check()``'s bound (the terms are not at fault)."""
    g = torch.Generator().manual_seed(5)
    for name, p in hf.named_parameters():
        if name.endswith(("q_norm.weight", "k_norm.weight")) and p.ndim == 2:
            p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))


@functools.cache
def _qk_case(name: str, fold: bool) -> Case:
    """:func:`build_case`, with Cohere's q/k norm weights at norm size."""
    if name != "CohereForCausalLM":
        return _built(name, fold)
    case = Case(name, fold)
    try:
        model = zoo.build(name, fold, prepare=_norm_sized_qk_norms)
    except zoo.ZooSkip as exc:
        pytest.skip(str(exc))
    except Exception as exc:  # noqa: BLE001 - TransformerLens's failure, not tlprisms'
        pytest.skip(f"{_versions()} cannot build it: {type(exc).__name__}: {exc}")
    tokens = torch.randint(TOKENS_LO, TOKENS_HI, (B, P), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
    case.model, case.tokens, case.logits, case.cache = model, tokens, logits, cache
    return case


@pytest.mark.parametrize("name", [i.name for i in INFOS if i.kind == zoo.DECODER])
def test_qk_every_architecture(name: str) -> None:
    """The QK prism on every decoder the logit prisms split: on every layer the terms add up
    to the model's own scores (or, where the bridge records none, to scores whose softmax
    over the attended keys is the recorded pattern), or it is refused for its true reason."""
    verdict = qk_verdict(name)
    if verdict == "no":
        pytest.skip("the logit prisms refuse this model (test_architecture)")
    case = _qk_case(name, True)
    prism = _qk_prism(case)
    view = prism.view
    from tlprisms._seam import Site

    for layer in range(view.n_layers):
        if verdict == "refused":
            with pytest.raises(UnsupportedModelError, match=qk_refused()[name]):
                prism.qk(layer, 0)
            continue
        pattern = case.cache[view.hook(Site.PATTERN, layer)]
        for head in sorted({0, view.n_heads - 1}):
            r = prism.qk(layer, head, q_heads="all").check()
            keys = [int(str(k).split("@")[-1].split()[-1]) for k in r.target_labels[0, 0]]
            p = torch.zeros(B, P)
            p[:, keys] = r.logits[:, 0].softmax(-1)
            row = pattern.reshape(B, view.n_heads, P, P)[:, head, -1]
            assert torch.allclose(p, row, atol=QK_PATTERN_ATOL), (name, layer, head)
            assert float(r.logits.abs().max()) > 0.1


#: rotary variants the QK causal check covers: GPT-J (partial, adjacent pairs, computed from
#: the model), Cohere (interleaved tables, per-head LayerNorm q/k norms), GLM (halves tables
#: applied to adjacent pairs), Cohere2 (interleaved, a NoPE global layer)
QK_CAUSAL = ("GPTJForCausalLM", "CohereForCausalLM", "GlmForCausalLM", "Cohere2ForCausalLM")


@pytest.mark.parametrize("name", QK_CAUSAL)
@pytest.mark.parametrize("fold", [True, False], ids=["folded", "unfolded"])
def test_qk_causal_rotary_variants(name: str, fold: bool) -> None:
    """With ln1's (and the q/k norms') scales frozen, removing the embedding's write at the
    query position moves every score difference ``s_j - s_0`` (keys ``j`` before the query)
    by minus the difference of its query-side embedding terms; read from the recorded
    pattern (``log p_j - log p_0``), so bridges that record no scores are checked too."""
    if not expect_for(name, fold).exact:
        pytest.skip("the logit prisms refuse this build")
    case = _qk_case(name, fold)
    prism = _qk_prism(case)
    view = prism.view
    from tlprisms._seam import Site

    pos, head = P - 1, 1
    got: dict = {}
    for layer in range(view.n_layers):
        r = prism.qk(layer, head, pos=pos)
        keys = [int(str(k).split("@")[-1].split()[-1]) for k in r.target_labels[0, 0]]
        n = len([j for j in keys if j < pos])
        terms = r.select(q_kind="embed").values[:, 0].sum(-1)[:, :n]  # [B, keys before pos]
        write = case.cache[view.hook(Site.EMBED)][:, pos]

        def remove(x, hook, write=write):
            x = x.clone()
            x[:, pos] -= write.to(x.dtype)
            return x

        def freeze(x, hook):
            return case.cache[hook.name].to(x.dtype).reshape(x.shape).clone()

        def grab(x, hook):
            got["p"] = x.detach().reshape(B, view.n_heads, P, P)[:, head, pos].clone()

        hooks = [(view.hook(Site.RESID_PRE, layer), remove)]
        for site in (Site.LN1_SCALE, Site.Q_NORM_SCALE, Site.K_NORM_SCALE):
            name_ = view.hook(site, layer)
            if view.has_site(site, layer) and name_ in case.cache:
                hooks.append((name_, freeze))
        hooks.append((view.hook(Site.PATTERN, layer), grab))
        with torch.no_grad():
            case.model.run_with_hooks(case.tokens, fwd_hooks=hooks)
        # differences to the key the model now attends most; keys whose attention
        # underflowed to 0 after the removal carry no difference and are left out
        p_new = got["p"][:, keys[:n]].double()
        ref = p_new.argmax(-1, keepdim=True)
        ok = p_new > QK_UNDERFLOW
        logp = p_new.clamp(min=QK_UNDERFLOW).log()
        moved = (logp - logp.gather(-1, ref)).float()
        new_s = r.logits[:, 0, :n] - terms
        want = new_s - new_s.gather(-1, ref)
        size = 1 + r.logits[:, 0, :n].abs() + r.values.abs().sum(-1)[:, 0, :n]
        err = torch.where(ok, (moved - want).abs(), 0.0)
        assert bool((err <= QK_CAUSAL_RTOL * size).all()), (layer, float(err.max()))
        assert int(ok.sum()) > B  # differences were checked, not only each reference
        base = r.logits[:, 0, :n] - r.logits[:, 0, :n].gather(-1, ref)
        assert float(torch.where(ok, moved - base, 0.0).abs().max()) > 1e-3  # it moved


# ---------------------------------------------------------------- the coverage table
#: the architectures ``tests/families.py`` builds: features (SAEs, transcoders, CLTs) and
#: ``verify`` are tested on them (test_features, test_dictionary_formats, test_verify,
#: test_verify_features); on the other exact architectures they are expected, not tested
FAMILY_ARCHITECTURES = {
    "GPT2LMHeadModel",
    "GPTNeoXForCausalLM",
    "LlamaForCausalLM",
    "Qwen2ForCausalLM",
    "GemmaForCausalLM",
    "Gemma2ForCausalLM",
}
#: what the graph column says until attribution graphs are tested per family
#: every cell of an architecture TransformerLens cannot build as a tiny model (TL_BROKEN)
TL_ERROR_CELL = "TL error"
COVERAGE_DOC = Path(__file__).resolve().parents[1] / "docs" / "architectures.md"


def coverage_rows() -> dict[str, list[str]]:
    """The rows of the coverage table in docs/architectures.md: architecture -> cells
    (logit prisms, QK, features, graph, verify)."""
    text = COVERAGE_DOC.read_text()
    start = text.index("## Coverage per prism")
    rows = {}
    for line in text[start:].splitlines()[1:]:
        if line.startswith("## "):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 6 and not set(cells[0]) <= set("-"):
            rows[cells[0]] = cells[1:]
    rows.pop("Architecture", None)
    return rows


def test_coverage_table_is_what_the_tests_show() -> None:
    """docs/architectures.md's coverage table has a row for every decoder of TransformerLens's
    supported list, and each cell says what the tests here expect: the logit prisms'
    verdict (:data:`EXPECT`), the QK prism's (:func:`qk_verdict`, both TL versions named
    where they differ), features and verify tested on :data:`FAMILY_ARCHITECTURES`."""
    rows = coverage_rows()
    decoders = sorted(i.name for i in INFOS if i.kind == zoo.DECODER)
    assert sorted(rows) == decoders
    for name, (logit, qk, features, graph, verify) in rows.items():
        if TL_BROKEN.get(name, ((), ""))[0] == (True, False):  # TransformerLens cannot build it
            assert logit == qk == features == graph == verify == TL_ERROR_CELL, (name, logit)
            continue
        exact = expect_for(name).exact
        assert logit.startswith("exact" if exact else "refused"), (name, logit)
        verdict = qk_verdict(name, None)  # the table's rows: as EXPECT says (TL3_EXPECT aside)
        if verdict == "no":
            assert qk == "—", (name, qk)
        else:
            assert verdict in qk, (name, qk)
        for name_tl4 in QK_REFUSED_TL4:
            if name == name_tl4:
                assert "TL 4" in qk and "TL 3" in qk, (name, qk)
        tested = "tested" if name in FAMILY_ARCHITECTURES else "expected"
        for cell in (features, verify):
            assert cell.startswith(tested if exact else "—"), (name, cell)
        want = {"exact": "exact", "refused": "refused", "no": "—"}[graph_verdict(name, None)]
        if name in GRAPH_NOT_VERIFIED:
            want += " (verify refused: TL fails to edit its weightless norm)"
        assert graph == want, (name, graph)


#: architectures whose graphs are refused, and the reason the refusal names
GRAPH_REFUSED: dict[str, str] = {}
#: architectures whose graphs ``verify`` cannot rerun, and the reason it names
GRAPH_NOT_VERIFIED: dict[str, str] = {
    # TransformerLens's bridge of a norm without a weight fails when its scale is edited
    "NanoChatForCausalLM": "has no attribute 'weight'",
    "OlmoForCausalLM": "has no attribute 'weight'",
}
#: the same on TransformerLens 3.x only
GRAPH_NOT_VERIFIED_TL3: dict[str, str] = {
    # its 3.x bridge computes the MLP input from something the held hooks do not hold
    "NemotronForCausalLM": "does not reproduce",
}


def graph_verdict(name: str, fold: Optional[bool] = True) -> str:
    """``"exact"``, ``"refused"`` or ``"no"`` (the logit prisms already refuse the model);
    ``fold=None``: as the coverage table says (EXPECT, TL3_EXPECT aside)."""
    if not expect_for(name, fold).exact:
        return "no"
    return "refused" if name in GRAPH_REFUSED else "exact"


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name", [i.name for i in INFOS if i.kind == zoo.DECODER])
def test_graph_every_architecture(name: str) -> None:
    """``prism.graph`` on every decoder the logit prisms split: every kept node's input and
    the logit equal their edges plus remainders, the sources' influences add up to the logit,
    and removing the largest nodes in the frozen model moves their readers by their edges;
    or it is refused for its true reason."""
    verdict = graph_verdict(name)
    if verdict == "no":
        pytest.skip("the logit prisms refuse this model")
    case = _built(name, True)
    prism = tp.LogitPrism(case.model, case.cache, tokens=case.tokens, logits=case.logits)
    if verdict == "refused":
        with pytest.raises(PrismError, match=GRAPH_REFUSED[name]):
            prism.graph(TARGET, row=0)
        return
    g = prism.graph(TARGET, row=0, max_nodes=40).check()
    try:
        v = prism.verify(g, k=4, sample=2)
    except PrismError as exc:  # a rerun with the held values is impossible: said so
        why = GRAPH_NOT_VERIFIED.get(name) or (_tl_major() < 4 and GRAPH_NOT_VERIFIED_TL3.get(name))
        assert why, str(exc)
        assert why in str(exc), str(exc)
        return
    assert v.ok, str(v)
