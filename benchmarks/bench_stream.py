"""Benchmark: streamed task analysis (``explain_task(rows, keep="stats", parquet=...)``).

The demo model and its tasks (capitals and additions, cycled to N prompts), every head and
neuron split (1,038 components), batch 16, length buckets:

* memory: each N (default 2,000 and 20,000) runs in a fresh child process (glibc returns
  every block of 64 KiB or more on free, see ``_common.py``); the peak RSS of the whole
  process is sampled during the call. Limit: the peak grows <= 10% from the smallest N to
  the largest.
* throughput, in one process, round-robin: the streamed call vs a bare loop of
  ``model.run_with_cache(tokens, names_filter=<the hooks explain_task records>)`` over the
  same batches (same bucketing, same tokenisation). Limit: >= 0.7 x the bare loop's
  prompts per second.

    python benchmarks/bench_stream.py [--mode all|throughput|memory] [--sizes 2000,20000]
        [--time-prompts 2000] [--repeats 3] [--threads N]

``--mode memory`` runs only the two children (about 10 minutes on a loaded 2-core box),
``--mode throughput`` only the timing; results go to ``results/stream[-MODE].json``.
"""

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from _common import (
    RssSampler,
    environment,
    interleaved,
    paired_ratio,
    run_child,
    silence,
    verdict,
)

import tlprisms as tp

BATCH = 16
SPLIT = {"heads": "all", "neurons": "all"}
GROWTH_LIMIT = 0.10
THROUGHPUT_LIMIT = 0.7


def rows(n: int) -> list:
    from tlprisms.demo import addition_task, capital_task

    return list(itertools.islice(itertools.cycle(capital_task() + addition_task()), n))


def child(n: int) -> None:
    """One streamed run of ``n`` prompts; prints a JSON line with its peak RSS."""
    silence()
    from tlprisms.demo import load_demo_model

    model = load_demo_model()
    task = itertools.islice(itertools.cycle(rows(141)), n)  # never a list of n prompts
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "terms.parquet"
        with RssSampler() as s:
            t0 = time.perf_counter()
            st = tp.explain_task(model, task, keep="stats", parquet=path, progress=False, **SPLIT)
            seconds = time.perf_counter() - t0
        size = path.stat().st_size
    st.check()
    print(
        json.dumps(
            {
                "n": st.n,
                "seconds": seconds,
                "prompts_per_s": st.n / seconds,
                "peak_rss_mib": s.peak / 2**20,
                "baseline_rss_mib": s.baseline / 2**20,
                "extra_peak_mib": s.extra_mib,
                "parquet_mib": size / 2**20,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--mode",
        choices=("all", "throughput", "memory"),
        default="all",
        help="throughput only, memory only (2,000 -> 20,000 prompts), or both",
    )
    parser.add_argument("--sizes", default="2000,20000")
    parser.add_argument("--time-prompts", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.child is not None:
        child(args.child)
        return
    silence()
    torch.set_grad_enabled(False)
    from tlprisms._seam import needed_hooks
    from tlprisms._tasks.task import _batches
    from tlprisms.demo import load_demo_model

    out: dict = {
        "model": "demo (2 layers, d_model 128, 4 heads, d_mlp 512; 1,038 components)",
        "batch": BATCH,
        "torch_threads": torch.get_num_threads(),
    }
    lines = []
    if args.mode in ("all", "throughput"):
        # ---- throughput, same process. Like with like: the bare loop records the same
        # hooks (needed_hooks for the residual, heads and neurons prisms) from the same
        # token batches; only the batches' tokenization into lengths is left out of it.
        model = load_demo_model()
        task = rows(args.time_prompts)
        names = needed_hooks(model, ("residual", "heads", "neurons"))
        length = lambda p: int(model.to_tokens(p).shape[-1])
        items = ((i, p, a) for i, (p, a) in enumerate(task))
        lengths = lambda ps: list(map(length, ps))
        batches = [[b[1] for b in batch] for batch in _batches(items, BATCH, 32, True, lengths)]
        kernel = []

        def bare() -> None:
            for ps in batches:
                model.run_with_cache(model.to_tokens(ps), names_filter=names)

        def stream() -> None:
            st = tp.explain_task(model, iter(task), keep="stats", progress=False, **SPLIT)
            kernel.append(st.meta["kernel"])

        timing = interleaved({"bare": bare, "stream": stream}, repeats=args.repeats)
        throughput = paired_ratio(timing["bare"], timing["stream"])  # t_bare / t_stream
        throughput_cpu = paired_ratio(timing["bare"], timing["stream"], key="cpu")
        out.update(
            time_prompts=args.time_prompts,
            kernel=all(kernel),
            bare_s=timing["bare"]["median"],
            stream_s=timing["stream"]["median"],
            throughput_ratio=throughput,
            throughput_ratio_cpu=throughput_cpu,
            rounds_bare_s=timing["bare"]["times"],
            rounds_stream_s=timing["stream"]["times"],
        )
        print(
            "bare loop: run_with_cache(to_tokens(batch), names_filter=needed_hooks(model, "
            "('residual', 'heads', 'neurons')), the hooks explain_task records) over the same "
            "length-bucketed batches of "
            f"{BATCH}; streamed: explain_task(rows, keep='stats', heads='all', "
            f"neurons='all') (kernel: {all(kernel)}); {torch.get_num_threads()} thread(s)"
        )
        lines.append(
            f"| streamed task, {args.time_prompts} prompts, keep='stats' "
            f"| {out['stream_s']:.2f} s | {throughput:.2f}x the bare run_with_cache loop's "
            f"throughput (CPU time {throughput_cpu:.2f}x) "
            f"{verdict(-throughput, -THROUGHPUT_LIMIT)} (>= {THROUGHPUT_LIMIT}) |"
        )
    if args.mode in ("all", "memory"):
        # ---- memory, one child per size
        sizes = [int(s) for s in args.sizes.split(",")]
        child_args = [] if args.threads is None else ["--threads", str(args.threads)]
        mem = []
        for n in sizes:
            mem.append(run_child([__file__, *child_args, "--child", str(n)], timeout=7200))
            print(json.dumps(mem[-1]), flush=True)
        growth = mem[-1]["peak_rss_mib"] / mem[0]["peak_rss_mib"] - 1
        out.update(memory=mem, peak_rss_growth=growth)
        lines.append(
            f"| peak RSS, {sizes[0]} -> {sizes[-1]} prompts (+ Parquet) "
            f"| {mem[0]['peak_rss_mib']:.0f} -> {mem[-1]['peak_rss_mib']:.0f} MiB "
            f"| {100 * growth:+.1f}% {verdict(growth, GROWTH_LIMIT)} (<= +10%) |"
        )
    out["environment"] = environment()
    print(json.dumps({k: v for k, v in out.items() if k != "environment"}, indent=2))
    print("\n" + "\n".join(lines))
    name = "stream.json" if args.mode == "all" else f"stream-{args.mode}.json"
    path = Path(__file__).parent / "results" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
