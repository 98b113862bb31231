"""Benchmark: a two-hop chained prism on the gpt2-small-shaped benchmark input.

Through every head of the last layer (the logit term of each head split by source position
and by what wrote into the residual stream there, earlier heads and neurons split too),
measured against the ``run_with_cache`` that produced the cache, in the same process.

    python benchmarks/bench_chain.py [--repeats N] [--quick] [--threads N]

``--threads 1`` is less sensitive to other jobs on a shared machine (results go to
``results/chain-threads1.json``).
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
)

import tlprisms as tp

BATCH, SEQ, N_TARGETS = 8, 128, 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    silence()
    torch.set_grad_enabled(False)
    model = gpt2_small_shaped(quick=args.quick)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    tokens = random_tokens(BATCH, SEQ if not args.quick else 32, model.cfg.d_vocab)
    logits, cache = model.run_with_cache(tokens)
    prism = tp.LogitPrism(model, cache, tokens=tokens, logits=logits)
    target = int(logits[0, -1].argmax())

    def chain():
        """Each head's chained result, reduced to its top terms (what a user keeps)."""
        tops = []
        for h in range(H):
            r = prism.through_head(L - 1, h, target, heads="all", neurons="all", by_source=False)
            tops.append(r.top(5))
            del r
        return tops

    first = prism.through_head(
        L - 1, 0, target, heads="all", neurons="all", by_source=False
    ).check()
    comps = first.values.shape[-1]
    del first
    timing = interleaved(
        {"run_with_cache": lambda: model.run_with_cache(tokens), "two-hop chain": chain},
        repeats=args.repeats,
    )
    ratio = paired_ratio(timing["two-hop chain"], timing["run_with_cache"])
    mem = peak_extra_mib(chain)
    out = {
        "input": f"{BATCH} x {tokens.shape[1]} tokens, {N_TARGETS} target, last position",
        "chain": f"through each of the {H} heads of layer {L - 1}; sources split into "
        f"{L - 1} layers of heads and neurons ({comps} terms per head)",
        "run_with_cache_s": timing["run_with_cache"]["median"],
        "chain_s": timing["two-hop chain"]["median"],
        "ratio_vs_run_with_cache": ratio,
        "extra_peak_mib": mem.get("extra_mib"),
        "environment": environment(),
    }
    print(json.dumps({k: v for k, v in out.items() if k != "environment"}, indent=2))
    print(
        f"\n| two-hop chain ({H} heads of the last layer, sources split into heads and neurons) "
        f"| {out['chain_s']:.2f} s | {ratio:.2f}x run_with_cache | "
        f"{out['extra_peak_mib'] or float('nan'):.0f} MiB extra peak |"
    )
    if not args.quick:
        name = "chain.json" if not args.threads else f"chain-threads{args.threads}.json"
        path = Path(__file__).parent / "results" / name
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
