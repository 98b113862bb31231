"""A gemma-2b-shaped random model in bfloat16: the prisms at full size (slow; ``-m slow``).

Shape of google/gemma-2b: 18 layers, d_model 2048, 8 query heads of size 256 sharing 1
key/value head, gated MLP of 16384, vocabulary 256000 (2.5 B parameters, 5 GB in bf16).
No weights can be downloaded, so the model is built from its config with weight
initialisation switched off (``transformers.initialization.no_init_weights``) and filled
with cheap random values in place, in bf16, so that no float32 copy of it ever exists.
The test runs one 32-token prompt through ``run_with_cache`` (only the hooks the prisms
need), then ``prism.full(target)`` and ``prism.heads(...)``, checks completeness at a bf16
tolerance, and prints the time and the peak resident memory of every step.

The bridge is put in compatibility mode with ``no_processing=True`` (HookedTransformer hook
names, weights left unfolded). With weight processing (the default ``fold_ln``/centring),
TransformerLens 4.3 upcasts the whole state dict to float32 before folding
(``ProcessWeights.process_weights``): measured on this shape with 2 and 4 layers the peak RSS
of ``enable_compatibility_mode()`` was 18.4 GB and 21.3 GB (+1.47 GB per layer), which
extrapolates to about 42 GB for 18 layers; the full model was OOM-killed on a 24 GB machine.
That is TransformerLens's load-time cost, not the prisms'.

Run with ``pytest -m slow tests/test_slow_gemma2b.py -s``.
"""

import gc
import os
import resource
import threading
import time
from contextlib import contextmanager, nullcontext

import pytest
import torch

import tlprisms as tp

pytestmark = pytest.mark.slow

SEQ = 32
SEED = 0

#: bf16 keeps 8 significant bits: one unit in the last place is 2**-7 = 0.8% relative. The
#: model's own logit is rounded to bf16 (half an ulp), and every residual write is added in
#: bf16 while the prism sums the cached, bf16-rounded writes in float32, so the two also
#: differ by the rounding of the residual stream, which scales with the largest term:
#: allow about one ulp of each, 1% of the logit plus 1% of the largest term.
RTOL_BF16 = 1e-2

MiB = 2**20
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss() -> int:
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * _PAGE


@contextmanager
def _measure(log: list, name: str):
    """Wall time and RSS-sampled peak (a thread reads /proc/self/statm every ~1 ms)."""
    gc.collect()
    state = {"peak": _rss(), "stop": False}
    base = state["peak"]

    def sample() -> None:
        while not state["stop"]:
            state["peak"] = max(state["peak"], _rss())
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    try:
        yield
    finally:
        seconds = time.perf_counter() - t0
        state["stop"] = True
        thread.join()
        peak = max(state["peak"], _rss())
        log.append((name, seconds, (peak - base) / MiB, peak / MiB))


def _gemma2b_shaped() -> object:
    import transformers as tf
    from transformer_lens.model_bridge.sources import build_bridge_from_module

    cfg = tf.GemmaConfig(
        vocab_size=256000,
        hidden_size=2048,
        intermediate_size=16384,
        num_hidden_layers=18,
        num_attention_heads=8,
        num_key_value_heads=1,
        head_dim=256,
        hidden_activation="gelu_pytorch_tanh",
        max_position_embeddings=8192,
    )
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers: pay for the default initialisation
        no_init_weights = nullcontext
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with no_init_weights():
            hf = tf.GemmaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    hf.tie_weights()  # gemma-2b ties lm_head to the embedding (skipped with init switched off)
    hf.eval()
    gen = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for _, p in hf.named_parameters():
            if p.ndim == 1:  # RMSNorm weights, effective 1 + w: perturb away from 1
                p.normal_(0.0, 0.3, generator=gen)
            else:  # in place, in bf16: no float32 copy of 5 GB
                p.normal_(0.0, 0.02, generator=gen)
        for name, b in hf.named_buffers():
            if not torch.isfinite(b.float()).all():
                raise AssertionError(f"buffer {name} was left uninitialised")
    bridge = build_bridge_from_module(hf, "GemmaForCausalLM", hf_config=cfg)
    # no_processing: TransformerLens's weight folding upcasts the whole state dict to float32
    # and peaks at ~42 GB for this shape (see the module docstring); the prisms read the
    # unfolded norm weights themselves.
    bridge.enable_compatibility_mode(disable_warnings=True, no_processing=True)
    return bridge


def test_gemma2b_shaped_full_and_heads(capsys):
    log: list = []
    with _measure(log, "build model (bf16, random)"):
        model = _gemma2b_shaped()
    n_params = sum(p.numel() for p in model.original_model.parameters())
    tokens = torch.randint(0, 256000, (1, SEQ), generator=torch.Generator().manual_seed(1))
    with _measure(log, f"run_with_cache ({SEQ} tokens, needed hooks)"):
        with torch.no_grad():
            logits, cache = model.run_with_cache(tokens, names_filter=tp.needed_hooks(model))
    assert logits.dtype == torch.bfloat16
    with _measure(log, "LogitPrism(...)"):
        prism = tp.LogitPrism(model, cache, tokens=tokens, logits=logits)
    target = int(logits[0, -1].float().argmax())
    with _measure(log, "prism.full(target)"):
        full = prism.full(target)
    with _measure(log, "prism.heads([target, other])"):
        heads = prism.heads([target, (target + 1) % 256000])

    tolerances = []
    for r in (full, heads):
        atol = RTOL_BF16 * float(r.values.abs().max())
        r.check(atol=atol, rtol=RTOL_BF16)
        assert torch.isfinite(r.values).all()
        tolerances.append(atol + RTOL_BF16 * float(r.logits.abs().max()))
    L, H, d_mlp = 18, 8, 16384
    assert full.values.shape[:3] == (1, 1, 1)
    assert int(full.components.is_constant().sum()) >= 0
    assert len(full.select(kind="neuron").components) == L * d_mlp
    assert len(full.select(kind="head").components) == L * H * SEQ
    assert heads.values.shape[:3] == (1, 1, 2)
    # the heads prism and the full prism agree on every head x source term
    a = full.select(kind="head").values[0, 0, 0]
    b = heads.select(kind="head").values[0, 0, 0]
    assert torch.allclose(a, b, atol=1e-5 * float(a.abs().max()) + 1e-6)

    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with capsys.disabled():
        print(
            f"\n[gemma-2b-shaped: {n_params / 1e9:.2f} B params, bf16, {SEQ} tokens; "
            f"{torch.get_num_threads()} torch threads; load average {os.getloadavg()}]"
        )
        print(f"  {'step':<42} {'seconds':>8} {'extra peak MiB':>15} {'RSS peak MiB':>13}")
        for name, seconds, extra, peak in log:
            print(f"  {name:<42} {seconds:8.2f} {extra:15.0f} {peak:13.0f}")
        print(f"  process peak RSS (ru_maxrss): {peak_mib:.0f} MiB")
        for name, r, tol in (("full", full, tolerances[0]), ("heads", heads, tolerances[1])):
            gap = float(r.gap().abs().max())
            print(
                f"  {name}: {r.values.shape[-1]} terms, max |gap| {gap:.3g} (tolerance {tol:.3g})"
                f" on logits up to {float(r.logits.abs().max()):.3g}, "
                f"largest term {float(r.values.abs().max()):.3g}"
            )
