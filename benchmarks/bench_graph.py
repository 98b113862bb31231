"""Benchmark: attribution graphs (``prism.graph``), what a user pays for a fresh graph.

Cases, each timed round-robin against ``run_with_cache`` on the same input in one process:

``demo``
    The embedded demo model, "The capital of France is" -> " Paris": ``LogitPrism.run``
    plus ``graph`` (the whole first call a notebook makes). Limit: 2 s.
``neurons``
    gpt2-small shape (random weights), 1 x 64 tokens, neurons as nodes, ``max_nodes=1000``,
    a fresh prism on the recorded cache plus ``graph``. Limits: 50 x ``run_with_cache``,
    2 GiB extra peak.
``transcoders``
    The same with 12 random transcoders of 6,144 features (one per MLP) as nodes.

Cost model (printed): one descent of the frozen model from the logit (influence of every
node), then one per chunk of at most ``READER_CHUNK_ROWS`` kept nodes (sorted by position;
readers join at their own layer): per layer two ``[rows x positions, d] @ [d, d]`` matmuls
and one batched ``[head]`` matmul over positions. ``heads=True`` repeats the edge descents
with one channel per head.

    python benchmarks/bench_graph.py [--repeats N] [--quick]
"""

import argparse
import json
import sys
import time
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
from tlprisms._prisms.graph import READER_CHUNK_ROWS

SEQ, MAX_NODES, FEATURES = 64, 1000, 6144
LIMITS = {"demo_s": 2.0, "ratio": 50.0, "mib": 2048.0}


def transcoders(model, F: int) -> list:
    d, L = model.cfg.d_model, model.cfg.n_layers
    out = []
    for i in range(L):
        g = torch.Generator().manual_seed(i)
        out.append(
            tp.Dictionary(
                torch.randn(d, F, generator=g) / d**0.5,
                torch.randn(F, generator=g) * 0.1 - 0.6,  # sparse: ~a few % active
                torch.randn(F, d, generator=g) / d**0.5,
                torch.zeros(d),
                f"blocks.{i}.hook_mlp_out",
                input_hook=f"blocks.{i}.ln2.hook_normalized",
            )
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    silence()
    torch.set_grad_enabled(False)
    out: dict = {}
    rows = []

    from tlprisms.demo import load_demo_model

    demo = load_demo_model()
    prompt = "The capital of France is"
    demo_calls = {
        "run_with_cache": lambda: demo.run_with_cache(demo.to_tokens(prompt)),
        "demo": lambda: tp.LogitPrism.run(demo, prompt).graph(" Paris"),
    }
    t = interleaved(demo_calls, repeats=args.repeats)
    g = demo_calls["demo"]().check()
    out["demo"] = {
        "seconds": t["demo"]["median"],
        "ratio_vs_run_with_cache": paired_ratio(t["demo"], t["run_with_cache"]),
        "nodes": len(g),
        "edges": g.n_edges,
        "limit_s": LIMITS["demo_s"],
        "verdict": verdict(t["demo"]["median"], LIMITS["demo_s"]),
    }
    rows.append(
        f"| graph, demo model, capital prompt (LogitPrism.run + graph) | "
        f"{t['demo']['median']:.2f} s | {len(g)} nodes, {g.n_edges} edges | limit 2 s |"
    )

    model = gpt2_small_shaped(quick=args.quick)
    seq = 16 if args.quick else SEQ
    tokens = random_tokens(1, seq, model.cfg.d_vocab)
    logits, cache = model.run_with_cache(tokens)
    target = int(logits[0, -1].argmax())
    max_nodes = 100 if args.quick else MAX_NODES
    tcs = transcoders(model, 256 if args.quick else FEATURES)

    def fresh(**kw):
        prism = tp.LogitPrism(model, cache, tokens=tokens, logits=logits)
        return prism.graph(target, max_nodes=max_nodes, **kw)

    calls = {
        "run_with_cache": lambda: model.run_with_cache(tokens),
        "neurons": lambda: fresh(),
        "transcoders": lambda: fresh(nodes=tcs),
    }
    graphs = {name: calls[name]().check() for name in ("neurons", "transcoders")}
    timing = interleaved(calls, repeats=args.repeats, warmup=0)
    out["run_with_cache_s"] = timing["run_with_cache"]["median"]
    for name, what in (
        ("neurons", f"neurons, max_nodes={max_nodes}"),
        ("transcoders", f"{len(tcs)} transcoders x {tcs[0].d_sae} features, max_nodes={max_nodes}"),
    ):
        ratio = paired_ratio(timing[name], timing["run_with_cache"])
        mem = max(peak_extra_mib(calls[name]).get("extra_mib") or 0.0, torch_peak_mib(calls[name]))
        g = graphs[name]
        descents = 1 + -(-(g.meta["kept_nodes"] + 1) // READER_CHUNK_ROWS)
        out[name] = {
            "call": f"fresh prism + graph, gpt2-small shape, 1 x {seq}, {what}",
            "seconds": timing[name]["median"],
            "ratio_vs_run_with_cache": ratio,
            "extra_peak_mib": mem,
            "nodes": len(g),
            "candidates": g.meta["candidates"],
            "edges": g.n_edges,
            "descents": descents,
            "verdict": (
                f"time {verdict(ratio, LIMITS['ratio'])}, memory {verdict(mem, LIMITS['mib'])}"
            ),
        }
        rows.append(
            f"| graph, gpt2-small shape, 1 x {seq}, {what} | {timing[name]['median']:.2f} s | "
            f"{ratio:.1f}x run_with_cache (aim 50x) | {mem:.0f} MiB extra peak (aim 2048) | "
            f"{descents} descents |"
        )
    t0 = time.perf_counter()
    v = tp.LogitPrism(model, cache, tokens=tokens, logits=logits).verify(graphs["neurons"])
    out["verify_s"] = time.perf_counter() - t0
    out["verify"] = str(v)
    rows.append(
        f"| verify(graph) of the neurons graph (20 + 20 nodes) | {out['verify_s']:.2f} s | {v.ok} |"
    )
    out["environment"] = environment()
    print(json.dumps({k: v for k, v in out.items() if k != "environment"}, indent=2))
    print("\n" + "\n".join(rows))
    if not args.quick:
        path = Path(__file__).parent / "results" / "graph.json"
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
