"""Build a report with one view of each kind, save it as HTML and as a full-page PNG.

    python scripts/screenshot_report.py [--out out] [--tiny]

Uses the embedded demo model ("The capital of France is" -> " Paris") when it loads, else
(or with ``--tiny``) a tiny random GPT-2 with position labels instead of tokens. The PNG
is taken by a local headless Chromium (``chromium`` on the PATH, via playwright) with every
network request blocked; look at it to check the views drew.
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

import tlprisms as tp
from tlprisms import render


def demo_prism() -> tuple:
    model = tp.demo.load_demo_model()
    prism = tp.LogitPrism.run(model, "The capital of France is")
    cities = [c for _, c in tp.demo.capital_task()[:8]]
    return prism, " Paris", cities, model


def tiny_prism() -> tuple:
    from transformer_lens.model_bridge.sources import build_bridge_from_module
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=60, n_embd=32, n_layer=2, n_head=4, n_positions=32)
    hf = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.ndim > 1:
                p.mul_(10.0)
    model = build_bridge_from_module(hf, "GPT2LMHeadModel", hf_config=cfg)
    model.enable_compatibility_mode(disable_warnings=True)
    tokens = torch.randint(0, 60, (2, 6))
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
    prism = tp.LogitPrism(model, cache, tokens=tokens, logits=logits)
    return prism, 3, list(range(10, 18)), model


def token_ids(model, targets: list) -> list:
    if all(isinstance(t, int) for t in targets):
        return targets
    return [int(model.to_single_token(t)) for t in targets]


def build(prism, target, targets, model) -> render.Report:
    residual = prism.residual(target)
    heads = prism.heads(target)
    neurons = prism.neurons(target, layers=[prism.view.n_layers - 1])
    per_head = heads.aggregate("kind", "layer", "head").select(kind="head")
    best = per_head.top(1, batch=0, pos=-1)
    head = tp.Component("head", layer=int(best["layer"].iloc[0]), head=int(best["head"].iloc[0]))

    # generic helpers: neuron terms over a set of targets (lines), head terms per target
    # (heatmap), a 2-D map of the targets' unembeddings (scatter)
    last = prism.view.n_layers - 1
    many = prism.neurons(targets, layers=[last])
    top_n = many.select(kind="neuron").top(3, batch=0, pos=-1, target=0)
    names = [str(t) for t in many.target_labels[0, 0]]
    series = {}
    for _, row in top_n.iterrows():
        sel = many.select(kind="neuron", layer=int(row["layer"]), neuron=int(row["neuron"]))
        series[f"L{row['layer']}N{row['neuron']}"] = sel.values[0, -1, :, 0].tolist()
    series["sum of these"] = list(np.sum(list(series.values()), axis=0))
    hm = prism.heads(targets, by_source=False).select(kind="head")
    matrix = hm.values[0, -1].numpy()  # [target, head]
    cols = [str(c) for c in hm.components]
    W = model.W_U.detach()[:, token_ids(model, targets)].T.numpy()
    W = W - W.mean(0)
    _, _, vt = np.linalg.svd(W, full_matrices=False)
    points = W @ vt[:2].T

    return (
        render.Report("tlprisms: one view of each kind")
        .add(residual, title="Residual prism (default view: waterfall bars)")
        .add(heads, title="Heads prism (default view: layer x head heatmap + source tokens)")
        .add(neurons, title="Neurons prism (default view: top neurons)")
        .add(render.head_source_map(heads), title="Head x source maps (CircuitsVis)")
        .add(render.top_tokens(prism, head, k=8), title=f"Top tokens of {head}")
        .add(render.heatmap_svg(matrix, names, cols, "Head terms per target"), title="heatmap_svg")
        .add(
            render.lines_svg(
                series, names, "Top neurons' terms across targets", highlight="sum of these"
            ),
            title="lines_svg",
        )
        .add(
            render.scatter_svg(points, names, "Targets' unembeddings, top 2 PCs"),
            title="scatter_svg",
        )
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out")
    parser.add_argument("--tiny", action="store_true", help="use the tiny random GPT-2")
    args = parser.parse_args()
    t0 = time.time()
    try:
        made = tiny_prism() if args.tiny else demo_prism()
    except Exception as e:  # noqa: BLE001 - the demo model missing or broken: fall back, say so
        print(f"demo model unavailable ({type(e).__name__}: {e}); using the tiny GPT-2")
        made = tiny_prism()
    report = build(*made)
    out = Path(args.out)
    html = report.save(out / "report.html")
    png = render.save_png(report, out / "report.png")
    print(f"wrote {html} ({html.stat().st_size / 1e6:.1f} MB) and {png} in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
