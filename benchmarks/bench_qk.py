"""Benchmark: the QK prism on the gpt2-small-shaped benchmark input (8 x 128 tokens, CPU).

Measured against the ``run_with_cache`` that produced the cache, in the same process
(round-robin timing, same-round ratios; see ``benchmarks/_common.py``):

``one head, layer-level``
    ``prism.qk(L-1, 0)``: one head of the last layer, the last query, every key, layer-level
    writers on both sides (GPT-2 has no rotary: the key side is read with the 48 query-side
    writers pulled back through ``W_K``). Limit 0.02 x ``run_with_cache``.
``all heads, query heads x sources``
    ``prism.qk(L-1, h, keys=[SEQ // 2], q_heads="all", sides="query").top(10)`` for each of
    the 12 heads of the last layer: the query side split into every earlier head x source
    position (16.9k writers), against the whole key vector, one key; each result reduced to
    its top terms (what a user keeps). Limit 0.2 x ``run_with_cache``.

Extra peak memory (RSS sampled, and the torch allocator's exact peak) of each call, result
included, measured in a fresh child process started with ``_common.MEASURE_ENV`` (glibc
returns every block of 64 KiB or more to the kernel on ``free``, so the RSS samples see each
call's own pages; in the timing process the allocator's reuse made the RSS reading of the
same call vary from 24 to 76 MiB between runs). Limit 64 MiB.

    python benchmarks/bench_qk.py [--repeats N] [--quick] [--threads N] [--only one|all]
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
    run_child,
    silence,
    torch_peak_mib,
)

import tlprisms as tp

BATCH, SEQ = 8, 128
#: (max x run_with_cache, max extra MiB)
LIMITS = {"one head, layer-level": (0.02, 64.0), "all heads, query heads x sources": (0.2, 64.0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument(
        "--only", choices=("one", "all"), help="time only the one-head or the all-heads case"
    )
    parser.add_argument("--child-memory", choices=("one", "all"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    silence()
    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = gpt2_small_shaped(quick=args.quick)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    seq = SEQ if not args.quick else 32
    tokens = random_tokens(BATCH, seq, model.cfg.d_vocab)
    logits, cache = model.run_with_cache(tokens)
    prism = tp.LogitPrism(model, cache, tokens=tokens, logits=logits)

    def one_head():
        return prism.qk(L - 1, 0)

    def split_head(h):
        return prism.qk(L - 1, h, keys=[seq // 2], q_heads="all", sides="query")

    def all_heads():
        return [split_head(h).top(10) for h in range(H)]

    ONE, ALL = "one head, layer-level", "all heads, query heads x sources"
    if args.child_memory:  # a fresh process with MEASURE_ENV: the memory of one case
        fn = one_head if args.child_memory == "one" else all_heads
        cold = peak_extra_mib(fn)["extra_mib"]  # with the label tables the prism then keeps
        warm = peak_extra_mib(fn)["extra_mib"]
        print(json.dumps({"rss_mib": max(cold, warm), "torch_peak_mib": torch_peak_mib(fn)}))
        return
    shapes: dict = {}
    gaps: dict = {}
    calls: dict = {}
    if args.only != "all":
        first = one_head().check()
        shapes[ONE], gaps[ONE] = list(first.values.shape), float(first.gap().abs().max())
        calls[ONE] = one_head
        del first
    if args.only != "one":
        split = [split_head(h).check() for h in range(H)]
        shapes[ALL] = [H] + list(split[0].values.shape)
        gaps[ALL] = max(float(r.gap().abs().max()) for r in split)
        calls[ALL] = all_heads
        del split
    timing = interleaved(
        {"run_with_cache": lambda: model.run_with_cache(tokens), **calls}, repeats=args.repeats
    )
    rows = {}
    for name in calls:
        ratio = paired_ratio(timing[name], timing["run_with_cache"])
        argv = [__file__, "--child-memory", "one" if name == ONE else "all"]
        argv += ["--quick"] * args.quick + ["--threads", str(args.threads)] * bool(args.threads)
        child = run_child(argv)
        mem = max(child["rss_mib"], child["torch_peak_mib"])
        lim = LIMITS[name]
        rows[name] = {
            "values_shape": shapes[name],
            "max_abs_gap": gaps[name],
            "seconds": timing[name]["median"],
            "x_run_with_cache": ratio,
            "extra_peak_mib": mem,
            "ok": ratio <= lim[0] and mem <= lim[1],
            "limits": {"x_run_with_cache": lim[0], "extra_peak_mib": lim[1]},
        }
    out = {
        "input": f"{BATCH} x {seq} tokens, gpt2-small shape (random init), CPU",
        "threads": torch.get_num_threads(),
        "run_with_cache_s": timing["run_with_cache"]["median"],
        "cases": rows,
        "environment": environment(),
    }
    print(json.dumps({k: v for k, v in out.items() if k != "environment"}, indent=2))
    for name, r in rows.items():
        lim = r["limits"]
        print(
            f"| qk: {name} | {r['seconds']:.3f} s | {r['x_run_with_cache']:.4f}x run_with_cache "
            f"(<= {lim['x_run_with_cache']}) | {r['extra_peak_mib']:.1f} MiB extra peak "
            f"(<= {lim['extra_peak_mib']:.0f}) | {'ok' if r['ok'] else 'MISS'} |"
        )
    if not args.quick:
        name = "qk" + (f"-{args.only}" if args.only else "")
        name += ".json" if not args.threads else f"-threads{args.threads}.json"
        path = Path(__file__).parent / "results" / name
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
