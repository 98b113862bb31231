"""The GPU check: the family tests on CUDA (fp32 and bf16) and GPU benchmarks, in <= 5 minutes.

    python benchmarks/gpu_check.py [--json out.json] [--skip-pytest] [--quick]

1. ``pytest`` on the family test files with ``TLPRISMS_TEST_DEVICE=cuda`` (every tiny family
   model and its cache on the GPU, fp32): completeness, chains, device placement.
2. bf16 on CUDA: every family, folded, in bfloat16: ``full``, ``heads`` and a chain, checked
   complete at the bf16 tolerance, compared with the fp32 GPU result, results on the GPU, and
   no large copy to the host (the tracker of ``tests/test_device.py``).
3. A model split across devices (a Llama-type bridge dispatched with an accelerate
   ``device_map``: embedding and layer 0 on the GPU, layer 1, the final norm and the
   unembedding on the CPU): the prisms must agree with the same model on one device.
4. Benchmarks, ratios to the ``run_with_cache`` that made the cache, in this process:
   a gpt2-small-shaped model in fp32 (8 x 128 tokens) and a gemma-2b-shaped model in bf16.

Prints a summary and exits non-zero if a check failed. Needs a CUDA device.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import tlprisms as tp  # noqa: E402

#: the family test files run on CUDA (those of the prisms that exist in this checkout)
PYTEST_FILES = [
    "tests/test_completeness.py",
    "tests/test_chains.py",
    "tests/test_device.py",
    "tests/test_qk.py",
    "tests/test_features.py",
    "tests/test_sparse.py",
]
#: bf16 keeps 8 significant bits: about one ulp of the logit and of the largest term
RTOL_BF16 = 1e-2
#: fp32 on a GPU (TF32 off) against fp32 on the same GPU in another layout
RTOL_FP32 = 1e-4
#: terms kept per position in the long-context check (as benchmarks/bench_scale.py)
LONG_TOP_K = 32
DEV = "cuda"


def sync_time(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall-clock seconds of ``fn()``, the GPU synchronised around each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_extra_mib(fn: Callable[[], Any]) -> float:
    """Peak GPU memory allocated during ``fn()`` above what was allocated before it."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del out
    return (peak - before) / 2**20


# ----------------------------------------------------------------------------- 1
def family_pytest(report: dict, log_dir: Any = None) -> None:
    files = [f for f in PYTEST_FILES if (ROOT / f).exists()]
    env = dict(os.environ, TLPRISMS_TEST_DEVICE=DEV)
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", *files, "-q", "-rfE", "--tb=line"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    tail = (proc.stdout + proc.stderr).strip().splitlines()
    if log_dir is not None:
        (log_dir / "pytest_cuda.txt").write_text(proc.stdout + proc.stderr)
    report["pytest_cuda"] = {
        "files": files,
        "rc": proc.returncode,
        "summary": tail[-1] if tail else "",
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(f"[1] pytest on CUDA ({', '.join(files)}): {tail[-1] if tail else '?'}")
    if proc.returncode != 0:
        print("\n".join(line for line in tail if line.startswith(("FAILED", "ERROR")))[:6000])


# ----------------------------------------------------------------------------- 2
def _case(name: str, dtype: torch.dtype, device: str) -> "tp.LogitPrism":
    from families import FAMILIES, make_tokenizer

    model = FAMILIES[name](True, dtype=dtype, tokenizer=make_tokenizer(), device=device)
    tokens = torch.randint(4, 60, (3, 7), generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
    return tp.LogitPrism(model, cache, tokens=tokens, logits=logits)


def bf16_families(report: dict) -> None:
    from test_device import HostCopies

    from families import FAMILIES

    rows = []
    for name in FAMILIES:
        row: dict = {"family": name}
        try:
            p16 = _case(name, torch.bfloat16, DEV)
            p32 = _case(name, torch.float32, DEV)
            with HostCopies() as seen:
                full = p16.full(7)
                heads = p16.heads([7, tp.LogitDiff(3, 4)])
                chain = p16.through_head(1, 0, 7, heads="all", neurons="all")
            for r in (full, heads, chain):
                assert r.values.device.type == torch.device(DEV).type, "result left the GPU"
                assert r.values.dtype == torch.float32, "bf16 cache not computed in fp32"
                r.check(atol=RTOL_BF16 * float(r.values.abs().max()), rtol=RTOL_BF16)
            assert not seen.large(), f"large copies to the host: {seen.large()}"
            ref = p32.full(7)
            ref.check()
            # the bf16 model is another model (rounded weights): compare per-layer totals
            a = full.aggregate("layer").values
            b = ref.aggregate("layer").values
            row["max_rel_diff_vs_fp32"] = float((a - b).abs().max() / b.abs().max())
            row["max_gap_bf16"] = float(full.gap().abs().max())
            row["ok"] = True
        except Exception as err:  # noqa: BLE001 - reported, and the check fails
            row["ok"] = False
            row["error"] = f"{type(err).__name__}: {err}"[:400]
        rows.append(row)
        print(f"[2] bf16 {name:14s} {'ok' if row['ok'] else 'FAILED ' + row['error']}")
    report["bf16_families"] = rows


# ----------------------------------------------------------------------------- 3
def _place(module: torch.nn.Module, device: str) -> None:
    """Put ``module`` on ``device`` and move its inputs there as it runs: a pipeline split of
    the kind accelerate's ``device_map`` makes (without offloading: the weights live there)."""

    def move(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return x.to(device)
        if isinstance(x, (tuple, list)):
            return type(x)(move(v) for v in x)
        if isinstance(x, dict):
            return {k: move(v) for k, v in x.items()}
        return x

    module.to(device)
    module.register_forward_pre_hook(lambda m, a, kw: (move(a), move(kw)), with_kwargs=True)


#: a view of a CPU-resident (layer 1) cached activation or weight that crosses is "whole"
#: when it holds more than this fraction of it, and more than :data:`_SMALL` elements (a
#: norm's weight, a bias, one scale per position may cross: as tests/fake_devices.py)
_VIEW_SHARE = 6
_SMALL = 64


class _Crossings(TorchFunctionMode):
    """Records every tensor that crosses devices while it runs (``to``/``cuda``/``cpu``/
    ``copy_``), and which of them are (large views of) the watched storages."""

    def __init__(self, watched: dict) -> None:
        super().__init__()
        self.watched = watched  # storage pointer -> elements
        self.moves: list = []
        self.whole: list = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        crossing = func in (torch.Tensor.to, torch.Tensor.cuda, torch.Tensor.cpu)
        if crossing and isinstance(out, torch.Tensor) and out.device != args[0].device:
            self._seen(args[0])
        elif func is torch.Tensor.copy_ and isinstance(args[1], torch.Tensor):
            if args[1].device != args[0].device:
                self._seen(args[1])
        return out

    def _seen(self, src: torch.Tensor) -> None:
        self.moves.append(src.numel())
        of = self.watched.get(src.untyped_storage().data_ptr())
        if of is not None and src.numel() * _VIEW_SHARE > of and src.numel() > _SMALL:
            self.whole.append(tuple(src.shape))


#: what the split step runs on both models (name -> call on a prism)
SPLIT_CALLS: dict = {
    "full": lambda p: p.full(7),
    "heads by source": lambda p: p.heads([7, 9]),
    "neurons": lambda p: p.neurons(7),
    "full, every position, top_k": lambda p: p.full(tp.NextToken(), pos="all", top_k=8),
    "through_head": lambda p: p.through_head(1, 0, 7, heads="all", neurons="all"),
    "through_neuron": lambda p: p.through_neuron(1, 3, 7, heads="all", neurons="all"),
    "qk, heads on both sides": lambda p: p.qk(1, 0, q_heads="all", k_heads="all"),
}


def split_devices(report: dict) -> None:
    """Step 3: the split model against the same model on one device, every call of
    :data:`SPLIT_CALLS`; and no cached activation or weight of the CPU-resident layer crosses
    to the GPU whole (each layer's terms are computed where it lives)."""
    import transformers as tf
    from transformer_lens.model_bridge.sources import build_bridge_from_module

    from families import D_VOCAB, N_CTX, SEED, _perturb

    out: dict = {}
    try:
        cfg = tf.LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=D_VOCAB,
            max_position_embeddings=N_CTX,
        )

        def build(device_map: Any) -> Any:
            torch.manual_seed(SEED)
            hf = tf.LlamaForCausalLM(cfg).eval()
            _perturb(hf.named_parameters(), torch.Generator().manual_seed(SEED), 7.0)
            hf = hf.to(DEV)
            for module in device_map or ():
                _place(hf.get_submodule(module), "cpu")
            b = build_bridge_from_module(hf, "LlamaForCausalLM", hf_config=cfg)
            b.enable_compatibility_mode(disable_warnings=True, no_processing=True)
            return b

        split_map = ("model.layers.1", "model.norm", "lm_head")
        tokens = torch.randint(4, 60, (3, 9), generator=torch.Generator().manual_seed(2))
        results: dict = {}
        whole: dict = {}
        for label, dmap in (("one GPU", None), ("split", split_map)):
            model = build(dmap)
            with torch.no_grad():
                logits, cache = model.run_with_cache(tokens.to(DEV))
            devices = sorted({str(v.device) for v in cache.cache_dict.values()})
            prism = tp.LogitPrism(model, cache, tokens=tokens.to(DEV), logits=logits)
            watched = {
                t.untyped_storage().data_ptr(): t.numel()
                for t in list(cache.cache_dict.values()) + list(model.parameters())
                if t.device.type == "cpu"
            }
            results[label] = {}
            for name, call in SPLIT_CALLS.items():
                with _Crossings(watched) as seen:
                    results[label][name] = call(prism).check()
                if label == "split":
                    whole[name] = seen.whole
            out[f"{label} cache devices"] = devices
        for name in SPLIT_CALLS:
            a, b = results["split"][name], results["one GPU"][name]
            assert a.values.device == b.values.device, f"{name}: result on {a.values.device}"
            err = float((a.values.to(b.values.device) - b.values).abs().max())
            out[f"{name}: max |split - one GPU|"] = err
            assert torch.allclose(a.values, b.values, rtol=RTOL_FP32, atol=RTOL_FP32), name
            assert not whole[name], f"{name} moved layer 1's activations or weights: {whole[name]}"
        out["whole inputs moved"] = 0
        out["ok"] = True
    except Exception as err:  # noqa: BLE001
        out["ok"] = False
        out["error"] = f"{type(err).__name__}: {err}"[:600]
        traceback.print_exc()
    report["split_devices"] = out
    print(f"[3] split across cuda:0 and cpu: {out}")


# ----------------------------------------------------------------------------- 4
def bench_gpt2(report: dict, quick: bool) -> None:
    import transformers as tf
    from _common import bridge_from_hf, random_tokens

    if quick:
        cfg = tf.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=1000, n_positions=128)
    else:
        cfg = tf.GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)
    torch.manual_seed(0)
    model = bridge_from_hf(tf.GPT2LMHeadModel(cfg).eval().to(DEV), "GPT2LMHeadModel", cfg)
    tokens = random_tokens(8, 128, model.cfg.d_vocab).to(DEV)
    names = tp.needed_hooks(model)

    def forward() -> Any:
        with torch.no_grad():
            return model.run_with_cache(tokens, names_filter=names)

    logits, cache = forward()
    prism = tp.LogitPrism(model, cache, tokens=tokens, logits=logits)
    targets = list(range(10))
    calls = {
        "full, 10 targets, last position": lambda: prism.full(targets),
        "full, NextToken, every position": lambda: prism.full(tp.NextToken(), pos="all"),
        "through_head(11, 0), sources split into every head and neuron": lambda: prism.through_head(
            model.cfg.n_layers - 1, 0, 0, heads="all", neurons="all"
        ),
    }
    t_fwd = sync_time(forward)
    rows = [{"call": "run_with_cache (8 x 128)", "seconds": t_fwd, "ratio": 1.0}]
    for label, fn in calls.items():
        t = sync_time(fn, repeats=3)
        rows.append(
            {"call": label, "seconds": t, "ratio": t / t_fwd, "extra_mib": peak_extra_mib(fn)}
        )
    report["gpt2_small_fp32"] = rows
    for r in rows:
        print(f"[4] gpt2-small fp32  {r['call']:<62} {r['seconds']:.4f} s  {r['ratio']:.3f}x")


def _long_context(seq: int, quick: bool) -> dict:
    import transformers as tf
    from _common import bridge_from_hf, random_tokens

    n_layer, d = (2, 64) if quick else (12, 768)
    cfg = tf.GPT2Config(
        n_layer=n_layer, n_embd=d, n_head=4 if quick else 12, vocab_size=50257, n_positions=seq
    )
    torch.manual_seed(0)
    model = bridge_from_hf(tf.GPT2LMHeadModel(cfg).eval().to(DEV), "GPT2LMHeadModel", cfg)
    tokens = random_tokens(1, seq, cfg.vocab_size).to(DEV)
    names = tp.needed_hooks(model, ("residual", "heads", "neurons"))

    def forward() -> Any:
        with torch.no_grad():
            return model.run_with_cache(tokens, names_filter=names)

    t_fwd = sync_time(forward, repeats=2)  # before the cache is kept: one at a time fits
    logits, cache = forward()
    prism = tp.LogitPrism(model, cache, tokens=tokens, logits=logits)
    del logits
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    r = prism.full(tp.NextToken(), pos="all", top_k=LONG_TOP_K)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    extra = (torch.cuda.max_memory_allocated() - before) / 2**20
    r.check()
    return {
        "call": f"full(NextToken(), pos='all', top_k={LONG_TOP_K}), 1 x {seq} tokens",
        "forward_s": t_fwd,
        "seconds": seconds,
        "ratio": seconds / t_fwd,
        "extra_mib": extra,
        "cache_gib": sum(v.numel() * v.element_size() for v in cache.cache_dict.values()) / 2**30,
        "max_gap": float(r.gap().abs().max()),
    }


def bench_long(report: dict, quick: bool) -> None:
    rows = []
    for seq in (256,) if quick else (2048, 8192):
        try:
            rows.append(_long_context(seq, quick))
        except torch.OutOfMemoryError as err:
            rows.append({"call": f"1 x {seq} tokens", "error": f"out of memory: {err}"[:300]})
        torch.cuda.empty_cache()
        r = rows[-1]
        print(
            f"[5] long context {r['call']}: "
            + (
                r["error"]
                if "error" in r
                else f"{r['seconds']:.2f} s = {r['ratio']:.2f}x forward ({r['forward_s']:.2f} s), "
                f"+{r['extra_mib']:.0f} MiB beside a {r['cache_gib']:.1f} GiB cache, "
                f"max gap {r['max_gap']:.2g}"
            ),
            flush=True,
        )
    report["long_context"] = rows


def _gemma2b_shaped(quick: bool) -> Any:
    import transformers as tf
    from transformer_lens.model_bridge.sources import build_bridge_from_module

    cfg = tf.GemmaConfig(
        vocab_size=256000,
        hidden_size=2048,
        intermediate_size=16384,
        num_hidden_layers=2 if quick else 18,
        num_attention_heads=8,
        num_key_value_heads=1,
        head_dim=256,
        hidden_activation="gelu_pytorch_tanh",
        max_position_embeddings=8192,
    )
    from transformers.initialization import no_init_weights

    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(DEV), no_init_weights():
            hf = tf.GemmaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    hf.tie_weights()
    hf.eval()
    gen = torch.Generator(device=DEV).manual_seed(0)
    with torch.no_grad():
        for _, p in hf.named_parameters():
            p.normal_(0.0, 0.3 if p.ndim == 1 else 0.02, generator=gen)
    bridge = build_bridge_from_module(hf, "GemmaForCausalLM", hf_config=cfg)
    bridge.enable_compatibility_mode(disable_warnings=True, no_processing=True)
    return bridge


def _bench_gemma_shape(model: Any, batch: int, seq: int) -> list:
    tokens = torch.randint(0, 256000, (batch, seq), generator=torch.Generator().manual_seed(1))
    tokens = tokens.to(DEV)
    names = tp.needed_hooks(model)

    def forward() -> Any:
        with torch.no_grad():
            return model.run_with_cache(tokens, names_filter=names)

    logits, cache = forward()
    prism = tp.LogitPrism(model, cache, tokens=tokens, logits=logits)
    target = int(logits[0, -1].float().argmax())
    full = prism.full(target)
    full.check(atol=RTOL_BF16 * float(full.values.abs().max()), rtol=RTOL_BF16)
    t_fwd = sync_time(forward, repeats=3)
    rows = []
    for label, fn in (
        ("full(target), last position", lambda: prism.full(target)),
        ("heads([target, other]) by source", lambda: prism.heads([target, target + 1])),
    ):
        t = sync_time(fn, repeats=3)
        rows.append(
            {
                "shape": f"{batch} x {seq}",
                "call": label,
                "forward_s": t_fwd,
                "seconds": t,
                "ratio": t / t_fwd,
                "extra_mib": peak_extra_mib(fn),
                "max_gap": float(full.gap().abs().max()),
            }
        )
    return rows


def bench_gemma(report: dict, quick: bool) -> None:
    model = _gemma2b_shaped(quick)
    rows = []
    for batch, seq in ((1, 32), (8, 128)):
        rows += _bench_gemma_shape(model, batch, seq)
        torch.cuda.empty_cache()
    report["gemma2b_bf16"] = rows
    for r in rows:
        print(
            f"[4] gemma-2b bf16 {r['shape']:>8} {r['call']:<36} {r['seconds']:.4f} s "
            f"{r['ratio']:.3f}x forward ({r['forward_s']:.4f} s), +{r['extra_mib']:.0f} MiB"
        )


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None, help="write the report here")
    parser.add_argument("--skip-pytest", action="store_true")
    parser.add_argument("--quick", action="store_true", help="small benchmark models")
    parser.add_argument(
        "--steps", default="pytest,bf16,split,gpt2,gemma,long", help="comma-separated steps"
    )
    parser.add_argument(
        "--chunk-mib", type=int, default=None, help="sparse chunk budget on CUDA (MiB)"
    )
    args = parser.parse_args()
    if args.chunk_mib is not None:
        from tlprisms._core import sparse as _sparse

        _sparse.CHUNK_BYTES_CUDA = args.chunk_mib * 2**20
    if not torch.cuda.is_available():
        sys.exit("gpu_check.py needs a CUDA device (torch.cuda.is_available() is False).")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    report: dict = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "transformer_lens": _version("transformer-lens"),
        "tlprisms": tp.__version__,
    }
    print(f"[0] {report}")
    t0 = time.perf_counter()
    steps = [("bf16", lambda: bf16_families(report)), ("split", lambda: split_devices(report))]
    steps += [("gpt2", lambda: bench_gpt2(report, args.quick))]
    steps += [("gemma", lambda: bench_gemma(report, args.quick))]
    steps += [("long", lambda: bench_long(report, args.quick))]
    if not args.skip_pytest:
        log_dir = Path(args.json).parent if args.json else None
        steps.insert(0, ("pytest", lambda: family_pytest(report, log_dir)))
    wanted = set(args.steps.split(","))
    steps = [(name, step) for name, step in steps if name in wanted]
    failed = []
    for name, step in steps:
        try:
            step()
        except Exception:  # noqa: BLE001 - a failed step is reported, the others still run
            traceback.print_exc()
            failed.append(name)
        print(f"    ({time.perf_counter() - t0:.0f} s so far)", flush=True)
    failed += [r["family"] for r in report.get("bf16_families", []) if not r["ok"]]
    if report.get("pytest_cuda", {}).get("rc", 0) != 0:
        failed.append("pytest")
    if not report.get("split_devices", {}).get("ok", True):
        failed.append("split")
    report["failed"] = failed
    report["seconds"] = round(time.perf_counter() - t0, 1)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    print(f"GPU check on {report['device']}: {'FAILED ' + str(failed) if failed else 'all ok'}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
