"""Shared helpers for the tlprisms benchmarks: models, timing, peak memory, child processes.

Timing
    :func:`timeit` runs a callable ``repeats`` times (after ``warmup`` untimed calls) and
    returns the median; :func:`interleaved` times several callables round-robin, so that a
    change of machine load hits all of them alike, and :func:`paired_ratio` gives the median
    over rounds of ``t_a / t_b`` measured in the same round (wall-clock, or process CPU
    time with ``key="cpu"``). Ratios are what the benchmarks judge; absolute seconds depend
    on the machine and on whatever else runs on it.

Peak memory
    Two independent methods, both of which see torch's CPU allocations:

    * :class:`RssSampler` / :func:`peak_extra_mib`: a daemon thread reads the resident set
      size from ``/proc/self/statm`` about every millisecond while the call runs (torch ops
      release the GIL, so the thread keeps sampling during long kernels, and the sampler
      lowers ``sys.setswitchinterval`` so that Python code cannot starve it). "Extra peak"
      is the highest sample minus the RSS just before the call, after ``gc.collect()`` and
      glibc ``malloc_trim(0)``. RSS sees every byte the process really touches (torch
      tensors, numpy, Python objects), but two effects could hide allocations: memory that
      glibc keeps after a ``free`` and hands out again without a new page fault, and spikes
      shorter than the sampling interval. The first is removed by running the measured call
      in a fresh child process started with ``MALLOC_MMAP_THRESHOLD_=65536`` and
      ``MALLOC_TRIM_THRESHOLD_=0`` (:data:`MEASURE_ENV`): every block of 64 KiB or more is
      then its own ``mmap`` and goes back to the kernel on ``free``, so a new tensor always
      faults in new pages. The second is what the next method is for.
    * :func:`torch_peak_mib`: the torch profiler with ``profile_memory=True`` records every
      allocation and free of torch's CPU allocator, with its size and time; the running sum
      of those events, maximised, is the exact peak of tensor bytes allocated during the call
      above what was allocated before it. It sees torch tensors only (not numpy or Python
      objects) and misses nothing.

    ``tracemalloc`` is useless here (it sees Python's allocator, not torch's), and
    ``ru_maxrss`` cannot be reset; both are deliberately not used.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch

MiB = 2**20

#: environment for child processes that measure memory (see the module docstring)
MEASURE_ENV = {
    "MALLOC_MMAP_THRESHOLD_": "65536",
    "MALLOC_TRIM_THRESHOLD_": "0",
}

_PAGE = os.sysconf("SC_PAGE_SIZE")
try:
    _LIBC = ctypes.CDLL("libc.so.6")
except OSError:  # not glibc: trimming is a no-op
    _LIBC = None


# ------------------------------------------------------------------------- models
def silence() -> None:
    """Quieten the warnings TransformerLens and transformers print for random models."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("transformers", "transformer_lens", "torch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
    except Exception:  # noqa: BLE001 - transformers always present in the venvs
        pass


def bridge_from_hf(hf_model: Any, architecture: str, cfg: Any, **kw: Any) -> Any:
    """Wrap a ``transformers`` model as a TransformerBridge in compatibility mode (TL >= 3.x)."""
    from transformer_lens.model_bridge.sources import build_bridge_from_module

    bridge = build_bridge_from_module(hf_model, architecture, hf_config=cfg, **kw)
    bridge.enable_compatibility_mode(disable_warnings=True)
    return bridge


def gpt2_small_shaped(quick: bool = False, seed: int = 0, n_positions: int = 1024) -> Any:
    """A random GPT-2-small-shaped bridge (12 layers, d_model 768, 12 heads, vocab 50257).

    ``quick=True`` gives a 2-layer, d_model 64 model with a 1000-token vocabulary for smoke
    runs. Random init: logits are tiny, which does not matter for timing or memory.
    """
    import transformers as tf

    if quick:
        cfg = tf.GPT2Config(
            n_layer=2, n_embd=64, n_head=4, vocab_size=1000, n_positions=max(128, n_positions)
        )
    else:
        cfg = tf.GPT2Config(
            n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=n_positions
        )
    torch.manual_seed(seed)
    hf = tf.GPT2LMHeadModel(cfg).eval()
    return bridge_from_hf(hf, "GPT2LMHeadModel", cfg)


def random_tokens(batch: int, seq: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------- timing
def timeit(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> dict:
    """Median (and min, all) wall-clock seconds of ``fn()`` over ``repeats`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        del out
    return {"median": statistics.median(times), "min": min(times), "times": times}


def interleaved(
    fns: dict[str, Callable[[], Any]],
    repeats: int = 5,
    warmup: int = 1,
    on_round: Optional[Callable[[int, dict], None]] = None,
) -> dict[str, dict]:
    """Time every callable once per round, round-robin, ``repeats`` rounds.

    Returns ``name -> {"median", "min", "times", "cpu_median", "cpu"}``: ``times[r]`` is the
    wall-clock time in round ``r`` and ``cpu[r]`` the process CPU time (all threads) of the
    same call. CPU time barely grows when other jobs compete for the cores, wall time does.
    """
    for _ in range(warmup):
        for fn in fns.values():
            out = fn()
            del out
    times: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(repeats):
        for name, fn in fns.items():
            gc.collect()
            c0, t0 = time.process_time(), time.perf_counter()
            out = fn()
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
            del out
        if on_round is not None:
            on_round(r, {name: t[-1] for name, t in times.items()})
    return {
        name: {
            "median": statistics.median(t),
            "min": min(t),
            "times": t,
            "cpu_median": statistics.median(cpu[name]),
            "cpu": cpu[name],
        }
        for name, t in times.items()
    }


def paired_ratio(a: dict, b: dict, key: str = "times") -> float:
    """Median over rounds of ``a[key][r] / b[key][r]`` (both from :func:`interleaved`).

    ``key="times"`` compares wall-clock times, ``key="cpu"`` process CPU times.
    """
    return statistics.median(x / y for x, y in zip(a[key], b[key]))


# ------------------------------------------------------------------------- memory
def rss_bytes() -> int:
    """The current resident set size of this process."""
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * _PAGE


def trim() -> None:
    """Collect garbage and hand freed heap memory back to the kernel (glibc only)."""
    gc.collect()
    if _LIBC is not None:
        try:
            _LIBC.malloc_trim(0)
        except AttributeError:  # pragma: no cover
            pass


class RssSampler:
    """``with RssSampler() as s: ...`` then ``s.peak``/``s.baseline`` (bytes), ``s.samples``."""

    def __init__(self, interval: float = 0.001) -> None:
        self.interval = interval
        self.baseline = 0
        self.peak = 0
        self.samples = 0
        self.elapsed = 0.0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _run(self) -> None:
        with open("/proc/self/statm", "rb") as f:
            while not self._stop.is_set():
                f.seek(0)
                rss = int(f.read().split()[1]) * _PAGE
                if rss > self.peak:
                    self.peak = rss
                self.samples += 1
                time.sleep(self.interval)

    def __enter__(self) -> RssSampler:
        trim()
        # let the sampler take the GIL often while the measured call runs Python code
        self._switch = sys.getswitchinterval()
        sys.setswitchinterval(min(self._switch, 0.0002))
        self.baseline = self.peak = rss_bytes()
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.peak = max(self.peak, rss_bytes())
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        sys.setswitchinterval(self._switch)
        self.elapsed = time.perf_counter() - self._t0

    @property
    def extra_mib(self) -> float:
        return (self.peak - self.baseline) / MiB

    @property
    def interval_ms(self) -> float:
        """The achieved mean sampling interval."""
        return 1e3 * self.elapsed / max(self.samples, 1)


def peak_extra_mib(fn: Callable[[], Any], keep: bool = False) -> dict:
    """RSS-sampled extra peak of ``fn()``; the result stays alive until the sampler stops.

    Returns ``{"extra_mib", "interval_ms", "samples", "seconds"}`` (plus ``"result"`` when
    ``keep``). For honest numbers call it in a child started with :data:`MEASURE_ENV`.
    """
    with RssSampler() as s:
        out = fn()
    res = {
        "extra_mib": s.extra_mib,
        "interval_ms": s.interval_ms,
        "samples": s.samples,
        "seconds": s.elapsed,
    }
    if keep:
        res["result"] = out
    del out
    return res


def torch_peak_mib(fn: Callable[[], Any]) -> float:
    """Exact peak of torch CPU tensor bytes allocated during ``fn()`` (result included)."""
    from torch.profiler import ProfilerActivity, profile

    trim()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        del out
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    cum = peak = 0
    cpu = torch.autograd.DeviceType.CPU
    for e in events:
        if e.device_type() != cpu:
            continue
        cum += e.nbytes()
        peak = max(peak, cum)
    return peak / MiB


# ------------------------------------------------------------------------- child processes
def run_child(argv: Sequence[str], timeout: float = 3600) -> dict:
    """Run ``python argv...`` with :data:`MEASURE_ENV`; its last stdout line must be JSON."""
    env = dict(os.environ)
    env.update(MEASURE_ENV)
    proc = subprocess.run(
        [sys.executable, *argv], env=env, capture_output=True, text=True, timeout=timeout
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"child {argv} failed (exit {proc.returncode}):\n"
            f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        )
    return json.loads(lines[-1])


def environment() -> dict:
    """What the numbers were measured on."""
    import transformer_lens

    try:
        tl_version = transformer_lens.__version__
    except AttributeError:  # pragma: no cover
        from importlib.metadata import version

        tl_version = version("transformer-lens")
    try:
        import transformers

        tf_version = transformers.__version__
    except ImportError:  # pragma: no cover
        tf_version = None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformer_lens": tl_version,
        "transformers": tf_version,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "loadavg": list(os.getloadavg()),
    }


# ------------------------------------------------------------------------- reporting
def verdict(value: Optional[float], limit: Optional[float]) -> str:
    if limit is None or value is None:
        return "-"
    return "PASS" if value <= limit else "MISS"


def fmt(x: Optional[float], spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)
