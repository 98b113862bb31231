# ruff: noqa: B023  (each lambda is called at once, inside its loop turn)
"""Save, or compare bit for bit, the outputs of every prism on every family (a refactor's check).

    python scripts/golden.py save /tmp/golden.pt      # before a change
    python scripts/golden.py compare /tmp/golden.pt   # after it: every tensor and label equal

Uses only the public API, so it survives moves inside the package. Covers residual, heads,
neurons, full, decompose (dense and sparse), through_head, through_neuron, chain, readout,
qk (dense, sparse, contrast, one side, a chain through one side), and features and a feature
hop on the demo model, on every family of ``tests/families.py``, folded and unfolded.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import tlprisms as tp

from conftest import build_case
from families import FAMILIES


def _record(out: dict, key: str, fn) -> None:
    try:
        r = fn()
    except tp.PrismError as e:  # a refusal is an output too
        out[key] = ("refused", type(e).__name__, str(e))
        return
    vals = r.values
    out[key] = (
        vals.detach().cpu().clone(),
        [str(c) for c in r.components],
        getattr(r, "explained", None) if hasattr(r, "explained") else r.logits.detach().cpu(),
        None if getattr(r, "index", None) is None else r.index.cpu().clone(),
        str(r.explains),
    )


def outputs() -> dict:
    out: dict = {}
    for name in FAMILIES:
        for fold in (True, False):
            c = build_case(name, fold)
            p = c.prism
            t = [5, 7]
            k = f"{name}/{'folded' if fold else 'unfolded'}"
            _record(out, k + "/residual", lambda: p.residual(t))
            _record(out, k + "/heads", lambda: p.heads(t))
            _record(out, k + "/neurons", lambda: p.neurons(t))
            _record(out, k + "/full", lambda: p.full(t))
            _record(out, k + "/full_all", lambda: p.full(5, pos="all"))
            _record(out, k + "/full_topk", lambda: p.full(t, top_k=5))
            _record(out, k + "/decompose", lambda: p.decompose(t, heads=0, neurons="all"))
            _record(out, k + "/through_head", lambda: p.through_head(1, 0, t, heads="all"))
            _record(out, k + "/through_neuron", lambda: p.through_neuron(1, 3, t, neurons="all"))
            _record(
                out,
                k + "/chain",
                lambda: p.chain(t, [tp.Hop("head", 1, 1, src=2), tp.Hop("head", 0, 0)]),
            )
            d = c.model.cfg.d_model
            vec = torch.linspace(-1, 1, d, dtype=torch.float32)
            _record(out, k + "/readout", lambda: p.readout(vec, 1, heads="all"))
            _record(out, k + "/qk", lambda: p.qk(1, 0, q_heads="all", k_neurons="all"))
            _record(out, k + "/qk_sparse", lambda: p.qk(1, 1, top_k=3, q_heads="all"))
            _record(out, k + "/qk_contrast", lambda: p.qk(1, 0, keys=[2, 4], contrast=True))
            _record(out, k + "/qk_query", lambda: p.qk(1, 0, sides="query", q_heads="all"))
            _record(
                out,
                k + "/qk_chain",
                lambda: p.qk(1, 0, sides="query", path=[tp.Hop("head", 0, 1)], q_heads="all"),
            )
    from tlprisms.demo import load_demo_model, load_demo_sae

    m = load_demo_model()
    p = tp.LogitPrism.run(m, ["The capital of France is", "The capital of Japan is"])
    sae = load_demo_sae()
    _record(out, "demo/features", lambda: p.features(" Paris", sae))
    _record(out, "demo/features_topk", lambda: p.features(" Paris", sae, top_k=4))
    _record(out, "demo/full", lambda: p.full(" Paris"))
    _record(out, "demo/feature_hop", lambda: p.chain(" Paris", [tp.Hop("feature", sae, 3)]))
    return out


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        return (
            a.dtype == b.dtype
            and a.shape == b.shape
            and bool(
                torch.equal(
                    a.view(torch.uint8) if a.dtype != torch.bool else a,
                    b.view(torch.uint8) if b.dtype != torch.bool else b,
                )
            )
            if a.numel()
            else a.shape == b.shape
        )
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def main() -> int:
    mode, path = sys.argv[1], sys.argv[2]
    out = outputs()
    if mode == "save":
        torch.save(out, path)
        n = sum(not isinstance(v[0], str) for v in out.values())
        print(f"saved {len(out)} outputs ({n} results, {len(out) - n} refusals) to {path}")
        return 0
    want = torch.load(path, weights_only=False)
    bad = [
        k
        for k in sorted(set(want) | set(out))
        if k not in out or k not in want or not _same(want[k], out[k])
    ]
    print(f"{len(want)} saved outputs, {len(out)} now, {len(bad)} differ")
    for k in bad[:20]:
        print("  differs:", k)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
