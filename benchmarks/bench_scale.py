"""Benchmark: long contexts with sparse results, and the dense all-positions mode.

Model: a random GPT-2-small-shaped bridge (12 layers, d_model 768, 12 heads, random weights
from the config, ``n_positions`` widened to the context). Measured in one process against the
``run_with_cache`` that made the cache (recording the hooks the prisms need,
``tp.needed_hooks(model)``, as ``LogitPrism.run`` does):

``long context``
    ``prism.full(tp.NextToken(), pos="all", top_k=32)`` on 1 x ``--seq`` tokens (default
    2,048): every position's next token split into heads x sources and neurons, the 32
    largest terms kept per position plus one remainder per (kind, layer). Limits: <= 1 x
    ``run_with_cache``, <= 512 MiB extra peak.
``dense all positions``
    ``prism.full(tp.NextToken(), pos="all")`` on 8 x 128 tokens. Limit: extra peak <= 1.25 x
    the result's size.

Extra peak memory: RSS sampled about every millisecond during the call (``_common.RssSampler``),
above the RSS just before it (cache and prism already built), the result included. Run in a
fresh process started with ``_common.MEASURE_ENV`` for honest numbers (the default; pass
``--inline`` to skip).

    python benchmarks/bench_scale.py [--seq 2048] [--repeats 2] [--quick]
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from _common import (
    MEASURE_ENV,
    environment,
    gpt2_small_shaped,
    interleaved,
    paired_ratio,
    peak_extra_mib,
    random_tokens,
    silence,
)

import tlprisms as tp

TOP_K = 32
DENSE_BATCH, DENSE_SEQ = 8, 128
MiB = 2**20


def _setup(seq: int, batch: int, quick: bool):
    model = gpt2_small_shaped(quick=quick, n_positions=max(1024, seq))
    tokens = random_tokens(batch, seq, model.cfg.d_vocab)
    hooks = tp.needed_hooks(model)

    def rwc():
        return model.run_with_cache(tokens, names_filter=hooks)

    logits, cache = rwc()
    prism = tp.LogitPrism(model, cache, tokens=tokens, logits=logits)
    return model, tokens, rwc, prism


def long_context(seq: int, repeats: int, quick: bool, top_k: int = TOP_K) -> dict:
    model, tokens, rwc, prism = _setup(seq, 1, quick)

    def sparse():
        return prism.full(tp.NextToken(), pos="all", top_k=top_k)

    print(f"long context {seq}: cache made", file=sys.stderr, flush=True)
    r = sparse().check()
    print("long context: first call done", file=sys.stderr, flush=True)
    out = {
        "input": f"1 x {seq} tokens, every position's next token, full split, top_k={top_k}",
        "components": len(r.components),
        "slots": r.values.shape[-1],
        "result_mib": (r.values.nbytes + r.index.nbytes) / MiB,
        "dense_result_would_be_mib": seq * len(r.components) * 4 / MiB,
        "max_gap": float(r.gap().abs().max()),
    }
    del r
    mem = peak_extra_mib(sparse)
    out["extra_peak_mib"] = mem["extra_mib"]
    print(f"long context: {out}", file=sys.stderr, flush=True)
    if repeats:
        t = interleaved({"run_with_cache": rwc, "sparse": sparse}, repeats=repeats)
        out["run_with_cache_s"] = t["run_with_cache"]["median"]
        out["sparse_s"] = t["sparse"]["median"]
        out["ratio_vs_run_with_cache"] = paired_ratio(t["sparse"], t["run_with_cache"])
    return out


def dense_all(repeats: int, quick: bool) -> dict:
    model, tokens, rwc, prism = _setup(DENSE_SEQ, DENSE_BATCH, quick)

    def dense():
        return prism.full(tp.NextToken(), pos="all")

    r = dense().check()
    size = r.values.nbytes / MiB
    del r
    mem = peak_extra_mib(dense)
    out = {
        "input": f"{DENSE_BATCH} x {DENSE_SEQ} tokens, every position's next token, full split",
        "result_mib": size,
        "extra_peak_mib": mem["extra_mib"],
        "peak_over_result": mem["extra_mib"] / size,
    }
    if repeats:
        t = interleaved({"run_with_cache": rwc, "dense": dense}, repeats=repeats)
        out["ratio_vs_run_with_cache"] = paired_ratio(t["dense"], t["run_with_cache"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--case", choices=("long", "dense", "both"), default="both")
    parser.add_argument("--inline", action="store_true", help="measure in this process")
    args = parser.parse_args()
    if not args.inline and any(os.environ.get(k) != v for k, v in MEASURE_ENV.items()):
        os.execve(
            sys.executable, [sys.executable, *sys.argv, "--inline"], {**os.environ, **MEASURE_ENV}
        )
    silence()
    torch.set_grad_enabled(False)
    res = {}
    if args.case in ("long", "both"):
        res["long_context"] = long_context(args.seq, args.repeats, args.quick)
    if args.case in ("dense", "both"):
        res["dense_all_positions"] = dense_all(args.repeats, args.quick)
    res["environment"] = environment()
    print(json.dumps({k: v for k, v in res.items() if k != "environment"}, indent=2))


if __name__ == "__main__":
    main()
