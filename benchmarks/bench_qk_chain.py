"""Benchmark: QK chains (``qk(..., sides=, path=[Hop...])``) on the gpt2-small-shaped input.

8 x 128 tokens, CPU, against the ``run_with_cache`` that produced the cache (round-robin
timing, same-round ratios; see ``benchmarks/_common.py``). The hop is head ``L-2``H0 from the
middle source position ``S // 2``; the QK head is ``L-1``H0 at the last query position.

``query, all keys, layer-level``
    ``prism.qk(L-1, 0, sides="query", path=[hop])``: what the hop head wrote into the query
    (from its source), split by layer-level writers at that source, for every key.
``query, one key, heads + neurons, top 10``
    the same for one key, the source split into every earlier head x source and neuron.
``key, 64 keys, layer-level``
    ``prism.qk(L-1, 0, keys=range(S // 2, S), sides="key", path=[hop])``: the same hop on
    the key side of each key at or after the source.
``through_head, heads + neurons, top 10`` (reference)
    ``prism.through_head(L-2, 0, target, src=S // 2, heads="all", neurons="all")``: the same
    hop from the logit instead of a score.

No limits: the issue sets none for chains. Extra peak memory: RSS sampled and the torch
allocator's exact peak, the larger of the two.

    python benchmarks/bench_qk_chain.py [--repeats N] [--quick] [--threads N]
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
)

import tlprisms as tp

BATCH, SEQ = 8, 128


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    silence()
    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = gpt2_small_shaped(quick=args.quick)
    L = model.cfg.n_layers
    seq = SEQ if not args.quick else 32
    tokens = random_tokens(BATCH, seq, model.cfg.d_vocab)
    logits, cache = model.run_with_cache(tokens)
    prism = tp.LogitPrism(model, cache, tokens=tokens, logits=logits)
    src = seq // 2
    hop = [tp.Hop("head", L - 2, 0, src=src)]
    split = {"q_heads": "all", "q_neurons": "all"}
    calls = {
        "query, all keys, layer-level": lambda: prism.qk(L - 1, 0, sides="query", path=hop),
        "query, one key, heads + neurons, top 10": lambda: prism.qk(
            L - 1, 0, keys=[src], sides="query", path=hop, **split
        ).top(10),
        f"key, {seq - src} keys, layer-level": lambda: prism.qk(
            L - 1, 0, keys=list(range(src, seq)), sides="key", path=hop
        ),
        "through_head, heads + neurons, top 10 (reference)": lambda: prism.through_head(
            L - 2, 0, 5, src=src, heads="all", neurons="all"
        ).top(10),
    }
    checked = [
        prism.qk(L - 1, 0, sides="query", path=hop).check(),
        prism.qk(L - 1, 0, keys=[src], sides="query", path=hop, **split).check(),
        prism.qk(L - 1, 0, keys=list(range(src, seq)), sides="key", path=hop).check(),
    ]
    gap = max(float(r.gap().abs().max()) for r in checked)
    shapes = [list(r.values.shape) for r in checked]
    del checked
    timing = interleaved(
        {"run_with_cache": lambda: model.run_with_cache(tokens), **calls}, repeats=args.repeats
    )
    rows = {}
    for name, fn in calls.items():
        rows[name] = {
            "seconds": timing[name]["median"],
            "x_run_with_cache": paired_ratio(timing[name], timing["run_with_cache"]),
            "extra_peak_mib": max(peak_extra_mib(fn)["extra_mib"], torch_peak_mib(fn)),
        }
    out = {
        "input": f"{BATCH} x {seq} tokens, gpt2-small shape (random init), CPU",
        "threads": torch.get_num_threads(),
        "run_with_cache_s": timing["run_with_cache"]["median"],
        "values_shapes": shapes,
        "max_abs_gap": gap,
        "cases": rows,
        "environment": environment(),
    }
    print(json.dumps({k: v for k, v in out.items() if k != "environment"}, indent=2))
    for name, r in rows.items():
        print(
            f"| {name} | {r['seconds']:.3f} s | {r['x_run_with_cache']:.3f}x run_with_cache | "
            f"{r['extra_peak_mib']:.1f} MiB extra peak |"
        )
    if not args.quick:
        stem = "qk-chain" if not args.threads else f"qk-chain-threads{args.threads}"
        path = Path(__file__).parent / "results" / f"{stem}.json"
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
