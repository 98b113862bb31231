"""Verification benchmark: ``prism.verify`` and ``prism.effects`` against ``run_with_cache``.

Model and input as in ``bench_core.py``: a random GPT-2-small-shaped ``TransformerBridge``
(12 layers, d_model 768, 12 heads, vocab 50257) in compatibility mode, batch 8 x 128 random
tokens, cache from ``model.run_with_cache(tokens)`` under ``torch.no_grad()``.

Measured calls (same process, round-robin, same-round ratios as in ``bench_core.py``):

``run_with_cache``
    the forward pass (the reference: "one forward pass").
``verify full``
    ``prism.verify(prism.full(targets), k=20, sample=20)``: 10 targets at the last
    position, the 20 largest and 20 sampled terms of every head x source and neuron checked
    by intervention (the full result is computed once, outside the timing).
``verify chain``
    ``prism.verify(prism.through_head(11, 0, target, heads="all", neurons="all"))``: a
    chained result, every term measured along the head's path.
``effects``
    ``prism.effects(target, [the 12 heads of layer 11], ablation="zero")``: 12 x 8 ablated
    copies, nothing frozen.

Limit (from the project issue): ``verify full`` <= 40 x ``run_with_cache``. A MISS is
printed, but the exit code is 0: this is a measurement, not a test. Each call's exact torch
tensor peak (the profiler's allocation trace, see ``_common.py``) is reported too.

Usage::

    python benchmarks/bench_verify.py [--repeats N] [--quick] [--out PATH]
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _common as C  # noqa: E402

C.silence()

import tlprisms as tp  # noqa: E402

N_TARGETS = 10
CASES = ("run_with_cache", "verify_full", "verify_chain", "effects")
TITLES = {
    "run_with_cache": "run_with_cache",
    "verify_full": "verify(full(10 targets), k=20, sample=20)",
    "verify_chain": "verify(through_head(11, 0, heads/neurons='all'), k=20, sample=20)",
    "effects": "effects(12 heads of layer 11, zero ablation)",
}
#: max x run_with_cache
LIMITS = {"verify_full": 40.0}


class Setup:
    def __init__(self, quick: bool) -> None:
        self.batch, self.seq = (2, 16) if quick else (8, 128)
        self.model = C.gpt2_small_shaped(quick=quick)
        vocab = self.model.cfg.d_vocab
        self.tokens = C.random_tokens(self.batch, self.seq, vocab, seed=1)
        self.targets = C.random_tokens(1, N_TARGETS, vocab, seed=2)[0].tolist()
        with torch.no_grad():
            self.logits, self.cache = self.model.run_with_cache(self.tokens)
        self.prism = tp.LogitPrism(self.model, self.cache, tokens=self.tokens, logits=self.logits)
        L = self.model.cfg.n_layers
        self.last = L - 1
        self.full = self.prism.full(self.targets).check()
        self.chain = self.prism.through_head(
            self.last, 0, self.targets[0], heads="all", neurons="all"
        ).check()
        self.heads = [
            tp.Component("head", layer=self.last, head=h) for h in range(self.model.cfg.n_heads)
        ]

    def calls(self) -> dict[str, Callable[[], Any]]:
        p, model, tokens = self.prism, self.model, self.tokens

        def run_with_cache():
            with torch.no_grad():
                return model.run_with_cache(tokens)

        return {
            "run_with_cache": run_with_cache,
            "verify_full": lambda: p.verify(self.full, k=20, sample=20),
            "verify_chain": lambda: p.verify(self.chain, k=20, sample=20),
            "effects": lambda: p.effects(self.targets[0], self.heads),
        }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds (median reported)")
    ap.add_argument("--quick", action="store_true", help="tiny model: a smoke run")
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON output (default benchmarks/results/verify.json; none for --quick)",
    )
    args = ap.parse_args(argv)
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    env = C.environment()
    t0 = time.perf_counter()
    s = Setup(args.quick)
    print(
        f"setup: {s.model.cfg.n_layers} layers, d_model {s.model.cfg.d_model}, batch "
        f"{s.batch} x {s.seq} ({time.perf_counter() - t0:.0f} s); {env['cpu_count']} CPUs, "
        f"load average {env['loadavg']}",
        flush=True,
    )
    calls = s.calls()
    checks = {}
    for case in ("verify_full", "verify_chain"):
        v = calls[case]()
        checks[case] = {
            "ok": v.ok,
            "certificate": str(v),
            "max_error": v.max_error,
            "max_relative_error": v.max_relative_error,
            "forward_passes": v.forward_passes,
            "terms_checked": int(v.terms.numel()),
        }
        print(f"sanity {case}: {v} ({v.forward_passes} forward passes)", flush=True)
    e = calls["effects"]()
    checks["effects"] = {
        "max_abs_difference": float(e.difference.abs().max()),
        "max_abs_direct": float(e.direct.abs().max()),
    }

    print(f"timing: {args.repeats} rounds after 1 warm-up round", flush=True)
    timing = C.interleaved(
        calls,
        repeats=args.repeats,
        on_round=lambda r, t: print(
            f"  round {r + 1}/{args.repeats}: " + ", ".join(f"{k} {v:.3f}s" for k, v in t.items()),
            flush=True,
        ),
    )
    peaks = {case: round(C.torch_peak_mib(calls[case]), 1) for case in CASES}
    rows = []
    for case in CASES:
        ratio = C.paired_ratio(timing[case], timing["run_with_cache"])
        cpu = C.paired_ratio(timing[case], timing["run_with_cache"], key="cpu")
        rows.append(
            {
                "case": case,
                "name": TITLES[case],
                "median_s": timing[case]["median"],
                "times_s": timing[case]["times"],
                "x_run_with_cache": ratio,
                "cpu_x_run_with_cache": cpu,
                "torch_peak_mib": peaks[case],
                "limit_x_run_with_cache": LIMITS.get(case),
                "verdict": C.verdict(ratio, LIMITS.get(case)),
            }
        )
    print("\n| call | median s | x run_with_cache | CPU x run_with_cache | torch peak MiB |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        lim = r["limit_x_run_with_cache"]
        cell = f"{r['x_run_with_cache']:.2f}" + (
            "" if lim is None else f" {r['verdict']} (<= {lim:g})"
        )
        print(
            f"| {r['name']} | {r['median_s']:.3f} | {cell} | {r['cpu_x_run_with_cache']:.2f} | "
            f"{r['torch_peak_mib']:.1f} |"
        )
    out = args.out or (None if args.quick else HERE / "results" / "verify.json")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "benchmark": "verify",
            "started": started,
            "quick": args.quick,
            "repeats": args.repeats,
            "batch": s.batch,
            "seq": s.seq,
            "environment_before": env,
            "environment_after": C.environment(),
            "checks": checks,
            "rows": rows,
        }
        out.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
