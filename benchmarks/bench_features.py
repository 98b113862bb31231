"""Benchmark: the feature prism on the gpt2-small-shaped benchmark input.

Two calls on the same cache (8 x 128 random tokens, 10 targets, last position), each against
the ``run_with_cache`` that produced the cache, timed round-robin in one process:

``SAE (16k features, resid_pre 6)``
    ``prism.features(targets, sae)``: a random 16,384-feature ReLU SAE at
    ``blocks.6.hook_resid_pre``, the encoding of the cached stream included; later writes
    split by layer. Limits: <= 0.1 x ``run_with_cache``, <= 128 MiB extra peak.
``12 transcoders (one per MLP)``
    ``prism.features(targets, transcoders)``: a random 6,144-feature transcoder on every MLP
    (``ln2.hook_normalized`` -> ``hook_mlp_out``). Limit: <= 0.5 x ``run_with_cache``.
``cross-layer transcoder``
    ``prism.features(targets, clt)``: a random 12-layer x 6,144-feature CLT in
    circuit-tracer's layout (written to a temporary folder first, 1.5 GB of decoders; read
    lazily, one layer's active rows at a time). Limit: <= 1 x ``run_with_cache``, extra peak
    about one layer's decoders (the largest, layer 0's: 12 x 6,144 x 768 float32 = 216 MiB;
    limit 224 MiB), never all of them (1.5 GB).

Memory ("extra peak MiB"): the larger of the RSS-sampled extra peak and the torch
profiler's exact tensor peak of one call (the dictionaries' weights exist before the call).

    python benchmarks/bench_features.py [--repeats N] [--quick]
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from _common import (
    environment,
    gpt2_small_shaped,
    interleaved,
    paired_ratio,
    peak_extra_mib,
    random_tokens,
    silence,
    torch_peak_mib,
    verdict,
)

import tlprisms as tp

BATCH, SEQ, N_TARGETS = 8, 128, 10
SAE_FEATURES, TRANSCODER_FEATURES = 16384, 6144
LIMITS = {"sae": (0.1, 128.0), "transcoders": (0.5, None), "clt": (1.0, 224.0)}


def write_clt(folder: Path, n: int, d: int, F: int) -> Path:
    """A random CLT in circuit-tracer's layout (``config.yaml``, ``W_enc_l`` and ``W_dec_l``
    safetensors per layer), sparse: about 3% of features active on random inputs."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(
        "feature_input_hook: hook_resid_mid\nfeature_output_hook: hook_mlp_out\n"
    )
    for i in range(n):
        g = torch.Generator().manual_seed(100 + i)
        enc = {
            f"W_enc_{i}": torch.randn(F, d, generator=g) / d**0.5,
            f"b_enc_{i}": torch.randn(F, generator=g) * 0.1 - 2.0,
            f"b_dec_{i}": torch.zeros(d),
        }
        save_file(enc, str(folder / f"W_enc_{i}.safetensors"))
        dec = torch.randn(F, n - i, d, generator=g) / d**0.5
        save_file({f"W_dec_{i}": dec}, str(folder / f"W_dec_{i}.safetensors"))
        del dec
    return folder


def dictionary(d: int, F: int, hook: str, seed: int, input_hook=None) -> tp.Dictionary:
    g = torch.Generator().manual_seed(seed)
    return tp.Dictionary(
        torch.randn(d, F, generator=g) / d**0.5,
        torch.randn(F, generator=g) * 0.1,
        torch.randn(F, d, generator=g) / d**0.5,
        torch.zeros(d),
        hook,
        input_hook=input_hook,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    silence()
    torch.set_grad_enabled(False)
    model = gpt2_small_shaped(quick=args.quick)
    L, d = model.cfg.n_layers, model.cfg.d_model
    F_sae = 1024 if args.quick else SAE_FEATURES
    F_tc = 256 if args.quick else TRANSCODER_FEATURES
    tokens = random_tokens(BATCH, SEQ if not args.quick else 32, model.cfg.d_vocab)
    logits, cache = model.run_with_cache(tokens)
    prism = tp.LogitPrism(model, cache, tokens=tokens, logits=logits)
    targets = list(range(N_TARGETS))
    sae = dictionary(d, F_sae, f"blocks.{L // 2}.hook_resid_pre", 0)
    tcs = [
        dictionary(
            d, F_tc, f"blocks.{i}.hook_mlp_out", 1 + i, input_hook=f"blocks.{i}.ln2.hook_normalized"
        )
        for i in range(L)
    ]
    import tempfile

    tmp = tempfile.TemporaryDirectory(prefix="tlprisms-clt-")
    clt = tp.Dictionary.from_circuit_tracer_clt(write_clt(Path(tmp.name) / "clt", L, d, F_tc))
    calls = {
        "run_with_cache": lambda: model.run_with_cache(tokens),
        "sae": lambda: prism.features(targets, sae),
        "transcoders": lambda: prism.features(targets, tcs),
        "clt": lambda: prism.features(targets, clt),
    }
    calls["sae"]().check()
    calls["transcoders"]().check()
    calls["clt"]().check()
    timing = interleaved(calls, repeats=args.repeats)
    out: dict = {
        "input": f"{BATCH} x {tokens.shape[1]} tokens, {N_TARGETS} targets, last position",
        "run_with_cache_s": timing["run_with_cache"]["median"],
    }
    rows = []
    for name, what in (
        ("sae", f"SAE ({F_sae} features, resid_pre {L // 2}), encoding included"),
        ("transcoders", f"{L} transcoders ({F_tc} features each, one per MLP)"),
        ("clt", f"cross-layer transcoder ({L} layers x {F_tc} features, lazy decoders)"),
    ):
        ratio = paired_ratio(timing[name], timing["run_with_cache"])
        mem = max(peak_extra_mib(calls[name]).get("extra_mib") or 0.0, torch_peak_mib(calls[name]))
        t_lim, m_lim = LIMITS[name]
        out[name] = {
            "call": what,
            "seconds": timing[name]["median"],
            "ratio_vs_run_with_cache": ratio,
            "ratio_limit": t_lim,
            "extra_peak_mib": mem,
            "mib_limit": m_lim,
            "verdict": f"time {verdict(ratio, t_lim)}, memory {verdict(mem, m_lim)}",
        }
        rows.append(
            f"| features: {what} | {timing[name]['median']:.3f} s | {ratio:.3f}x "
            f"run_with_cache (limit {t_lim}) | {mem:.0f} MiB extra peak"
            + (f" (limit {m_lim:.0f})" if m_lim else "")
            + " |"
        )
    out["environment"] = environment()
    print(json.dumps({k: v for k, v in out.items() if k != "environment"}, indent=2))
    print("\n" + "\n".join(rows))
    if not args.quick:
        path = Path(__file__).parent / "results" / "features.json"
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
