#!/usr/bin/env python
# ruff: noqa: E501 - one probe per line: the tables read (and diff) better unwrapped
"""Probe tlprisms as a hostile but realistic user would (issue 9).

About 200 bad or edge inputs over every public entry point: ``LogitPrism(...)``,
``LogitPrism.run``, every prism and chain, ``readout``, ``Hop``, targets, positions,
layer/head/neuron selections, ``Decomposition.check/top/select/aggregate/to_frame``,
``tlprisms.weights``, ``explain_task``, ``needed_hooks``, ``tlprisms.render`` and the command
line; caches that were edited (NaN, another input, another model, a twin with other weights,
``remove_batch_dim``, missing hooks, a dict, other dtypes), models in train mode, and
bf16/fp16/float64 models.

Every probe encodes the behaviour the library promises (the contract of issue 9): either a
result, checked independently where that is cheap (e.g. the total equals the logit of a
fresh forward pass), or an error class of ``tlprisms.errors`` and a fragment of its message.
What happened is classified as

* ``ok``      the correct result;
* ``clear``   a PrismError whose message matches (``clear*`` in the table: the message is
              right but the class is not the contract's one);
* ``unclear`` an error from inside torch/transformers, a misleading message, or a refusal of
              valid input (a false alarm);
* ``silent``  a result where an error was due, a wrong result, or an input that was modified
              (model parameters, buffers, hooks and every cache tensor are hashed around
              each probe).

Run it with the venv of the TransformerLens version to probe::

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/probe_bad_inputs.py > /tmp/probes_tl4.txt
    HF_HUB_OFFLINE=1 .venv-tl3/bin/python scripts/probe_bad_inputs.py > /tmp/probes_tl3.txt

``--only SUBSTRING`` runs the probes whose id contains it; ``--all`` lists every probe.
Probes that need a HookedTransformer run only on TransformerLens 3.
"""

import argparse
import contextlib
import functools
import hashlib
import io
import os
import re
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # families.py: the tiny seeded test models

import tlprisms as tp  # noqa: E402
from tlprisms import errors as tperrors  # noqa: E402

PARIS, TOKYO, ROME, FRANCE = 11, 15, 17, 10  # ids in the demo vocabulary
TEXT = "The capital of France is"  # 6 tokens with <bos>
TEXT_B = "The capital of Japan is"  # another input of the same length
N_CTX, N_LAYERS, N_HEADS, D_MLP, D_MODEL, D_VOCAB = 6, 2, 4, 512, 128, 149


# --------------------------------------------------------------------------- expectations
@dataclass(frozen=True)
class Ok:
    """A result is due; ``verify(result, env)`` returns None when it is right, else why not."""

    verify: Optional[Callable[[Any, "Env"], Optional[str]]] = None


@dataclass(frozen=True)
class Err:
    """An error of class ``cls`` (a name in tlprisms.errors) whose message matches ``frag``.

    ``cls="exit"`` is the command line: a non-zero exit with one error line matching ``frag``
    and no traceback."""

    cls: str
    frag: str


Expect = Union[Ok, Err, tuple]


@dataclass
class Probe:
    id: str
    area: str
    fn: Callable[["Env"], Any]
    expect: Expect
    note: str = ""
    needs: Optional[str] = None  # "hooked": TransformerLens 3 only


@dataclass
class Outcome:
    probe: Probe
    outcome: str
    detail: str = ""
    flag: str = ""  # "class": clear message, other class than the contract's
    seconds: float = 0.0


PROBES: list[Probe] = []
_AREA = ["?"]


def area(name: str) -> None:
    _AREA[0] = name


def add(
    pid: str,
    fn: Callable[["Env"], Any],
    expect: Expect,
    note: str = "",
    needs: Optional[str] = None,
) -> None:
    if any(p.id == pid for p in PROBES):
        raise SystemExit(f"duplicate probe id {pid!r}")
    PROBES.append(Probe(pid, _AREA[0], fn, expect, note, needs))


def OK(verify: Optional[Callable] = None) -> Ok:
    return Ok(verify)


# --------------------------------------------------------------------------- the environment
def _tensor_digest(h: Any, t: torch.Tensor) -> None:
    t = t.detach()
    h.update(f"{tuple(t.shape)}{t.dtype}{t.device}".encode())
    if t.numel():
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def fingerprint_model(model: Any) -> str:
    """Parameters, buffers, hook counts and the training flag of a model."""
    h = hashlib.sha1()
    for name, p in model.named_parameters():
        h.update(name.encode())
        _tensor_digest(h, p)
        h.update(str(p.requires_grad).encode())
    for name, b in model.named_buffers():
        h.update(name.encode())
        _tensor_digest(h, b)
    hooks = 0
    for m in model.modules():
        hooks += len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        hooks += len(getattr(m, "fwd_hooks", []) or []) + len(getattr(m, "bwd_hooks", []) or [])
    h.update(f"hooks={hooks} training={model.training}".encode())
    return h.hexdigest()


def fingerprint_cache(cache: Any) -> str:
    h = hashlib.sha1()
    items = cache.items() if hasattr(cache, "items") else []
    for name, t in sorted(items, key=lambda kv: kv[0]):
        h.update(name.encode())
        if isinstance(t, torch.Tensor):
            _tensor_digest(h, t)
    h.update(str(getattr(cache, "has_batch_dim", "")).encode())
    return h.hexdigest()


def has_hooked() -> bool:
    try:
        import transformer_lens

        return hasattr(transformer_lens, "HookedTransformer")
    except ImportError:
        return False


class Env:
    """Models, inputs and caches, built on first use and shared by the probes.

    Anything built here is hashed before and after every later probe."""

    def __init__(self) -> None:
        self._built: dict[str, Any] = {}

    def _get(self, key: str, build: Callable[[], Any]) -> Any:
        if key not in self._built:
            with torch.no_grad():
                self._built[key] = build()
        return self._built[key]

    def __getattr__(self, key: str) -> Any:
        builder = getattr(type(self), "b_" + key, None)
        if builder is None:
            raise AttributeError(key)
        return self._get(key, lambda: builder(self))

    # -- fingerprints of everything built so far
    def fingerprint(self) -> dict:
        out = {}
        for key, obj in list(self._built.items()):
            if isinstance(obj, torch.nn.Module):
                out[key] = fingerprint_model(obj)
            elif hasattr(obj, "items") and not isinstance(obj, str):
                out[key] = fingerprint_cache(obj)
            elif isinstance(obj, torch.Tensor):
                h = hashlib.sha1()
                _tensor_digest(h, obj)
                out[key] = h.hexdigest()
        return out

    # -- the demo model and its inputs
    def b_M(self):
        from tlprisms.demo import load_demo_model

        return load_demo_model()

    def b_T1(self):
        return self.M.to_tokens(TEXT)

    def b_T1b(self):
        return self.M.to_tokens(TEXT_B)

    def b_T2(self):
        return self.M.to_tokens([TEXT, TEXT_B])

    def b_L1(self):
        return self._run1[0]

    def b_C1(self):
        return self._run1[1]

    @functools.cached_property
    def _run1(self):
        with torch.no_grad():
            return self.M.run_with_cache(self.T1)

    def b_L1b(self):
        return self._run1b[0]

    def b_C1b(self):
        return self._run1b[1]

    @functools.cached_property
    def _run1b(self):
        with torch.no_grad():
            return self.M.run_with_cache(self.T1b)

    def b_L2(self):
        return self._run2[0]

    def b_C2(self):
        return self._run2[1]

    @functools.cached_property
    def _run2(self):
        with torch.no_grad():
            return self.M.run_with_cache(self.T2)

    def b_F1(self):  # fresh logits, no hooks
        return self.M(self.T1)

    def b_F1b(self):
        return self.M(self.T1b)

    def b_F2(self):
        return self.M(self.T2)

    def b_C1_res(self):  # recorded with needed_hooks(model, ("residual",))
        return self.M.run_with_cache(self.T1, names_filter=tp.needed_hooks(self.M, ("residual",)))[
            1
        ]

    def b_C1b_res(self):
        return self.M.run_with_cache(self.T1b, names_filter=tp.needed_hooks(self.M, ("residual",)))[
            1
        ]

    def b_C1_needed(self):
        return self.M.run_with_cache(self.T1, names_filter=tp.needed_hooks(self.M))[1]

    def b_P1(self):
        return tp.LogitPrism(self.M, self.C1, tokens=self.T1, logits=self.L1)

    def b_P1_bare(self):  # no tokens, no logits
        return tp.LogitPrism(self.M, self.C1)

    def b_P2(self):
        return tp.LogitPrism(self.M, self.C2, tokens=self.T2, logits=self.L2)

    def b_PR(self):
        return tp.LogitPrism.run(self.M, TEXT)

    def b_H1(self):  # heads result, reused by the Decomposition probes
        return self.P1.heads(PARIS)

    def b_R1(self):
        return self.P1.residual(PARIS)

    # -- a twin: the same architecture with other weights (e.g. a fine-tune)
    def b_TWIN(self):
        from tlprisms.demo import load_demo_model

        twin = load_demo_model()
        gen = torch.Generator().manual_seed(3)
        for p in twin.parameters():
            p.add_(0.05 * p.std() * torch.randn(p.shape, generator=gen))
        return twin

    def b_C_twin(self):
        return self.TWIN.run_with_cache(self.T1)[1]

    def b_C_twin_res(self):
        return self.TWIN.run_with_cache(
            self.T1, names_filter=tp.needed_hooks(self.M, ("residual",))
        )[1]

    # -- other models: the tiny seeded families of the test suite
    def _family(self, name: str, fold: bool = True, dtype=torch.float32):
        from families import FAMILIES, make_tokenizer

        return FAMILIES[name](fold, dtype=dtype, tokenizer=make_tokenizer())

    def b_G(self):
        return self._family("gpt2/bridge")

    def b_TG(self):
        return torch.randint(4, 60, (2, 7), generator=torch.Generator().manual_seed(1))

    def b_CG(self):
        return self.G.run_with_cache(self.TG)[1]

    def b_G_notok(self):
        from families import FAMILIES

        return FAMILIES["gpt2/bridge"](True)

    def b_CG_notok(self):
        return self.G_notok.run_with_cache(self.TG)[1]

    def b_LLAMA(self):
        return self._family("llama/bridge")

    def b_C_llama(self):
        return self.LLAMA.run_with_cache(self.TG)[1]

    def b_G_train(self):  # GPT-2 has dropout 0.1 in its HF config
        return self._family("gpt2/bridge").train()

    def b_GEMMA64(self):
        return self._family("gemma/bridge", dtype=torch.float64)

    def b_M_bf16(self):
        from tlprisms.demo import load_demo_model

        return load_demo_model(dtype=torch.bfloat16)

    def b_M_fp16(self):
        from tlprisms.demo import load_demo_model

        return load_demo_model(dtype=torch.float16)

    def b_M_f64(self):
        from tlprisms.demo import load_demo_model

        return load_demo_model(dtype=torch.float64)

    def b_M_train(self):  # the demo model has no dropout: train mode changes nothing
        from tlprisms.demo import load_demo_model

        return load_demo_model().train()

    def b_HK(self):
        from tlprisms.demo import load_demo_model

        return load_demo_model(kind="hooked")


# --------------------------------------------------------------------------- verification
def _close(got: float, want: float, rtol: float) -> bool:
    return abs(got - want) <= rtol * max(1.0, abs(want))


def v_logits(fresh: str, ids: Any, pos: Any = -1, rtol: float = 1e-4, model: str = "M") -> Callable:
    """The total (and ``logits``) equal the fresh forward's logits of ``ids`` at ``pos``.

    ``ids``: a list shared by the batch, or per row a list of lists; ``pos``: an int, a list
    (per row) or "all" (then ids is None: each position's next token); ids may hold
    ``(a, b)`` pairs for logit differences."""

    def verify(r: Any, e: Env) -> Optional[str]:
        L = getattr(e, fresh).double()
        B, n, _ = L.shape
        if not hasattr(r, "values"):
            return f"returned {type(r).__name__}, not a Decomposition"
        rows = []
        for b in range(B):
            if pos == "all":
                tok = getattr(e, {"F1": "T1", "F2": "T2", "F1b": "T1b"}[fresh])[b]
                want_ids = [
                    [int(tok[i + 1])] if i + 1 < n else [int(L[b, i].argmax())] for i in range(n)
                ]
                rows.append([(i, want_ids[i]) for i in range(n)])
            else:
                p = pos[b] if isinstance(pos, list) else pos
                row_ids = ids[b] if ids and isinstance(ids[0], list) else ids
                rows.append([(p % n, row_ids)])
        tot, lg = r.total().double(), r.logits.double()
        if tot.shape[:2] != (B, len(rows[0])):
            return f"result has shape {tuple(tot.shape)}, expected batch {B} x {len(rows[0])} positions"
        for b, row in enumerate(rows):
            for j, (p, row_ids) in enumerate(row):
                if int(r.positions[b, j]) != p:
                    return f"explains position {int(r.positions[b, j])}, expected {p}"
                for k, t in enumerate(row_ids):
                    want = (
                        float(L[b, p, t[0]] - L[b, p, t[1]])
                        if isinstance(t, tuple)
                        else float(L[b, p, t])
                    )
                    for what, got in (
                        ("total", float(tot[b, j, k])),
                        ("logits", float(lg[b, j, k])),
                    ):
                        if not _close(got, want, rtol):
                            return (
                                f"{what} {got:.6g} at batch {b}, pos {p}, target {t} but the "
                                f"model's logit is {want:.6g}"
                            )
        return None

    return verify


def v_all(*fns: Callable) -> Callable:
    def verify(r: Any, e: Env) -> Optional[str]:
        for f in fns:
            why = f(r, e)
            if why:
                return why
        return None

    return verify


FALSE_ALARM = "false alarm: "


def v_checks(r: Any, e: Env) -> Optional[str]:
    """check() passes (a false alarm otherwise)."""
    try:
        r.check()
    except tp.PrismError as err:
        return (
            f"{FALSE_ALARM}check() refused a correct result: {type(err).__name__}: {str(err)[:160]}"
        )
    return None


def v_head_term(layer: int, head: int, pos: int = -1, prism: str = "P1") -> Callable:
    """A through_head result totals the head's term in heads()."""

    def verify(r: Any, e: Env) -> Optional[str]:
        h = getattr(e, prism).heads(PARIS, pos).select(layer=layer, head=head)
        want, got = float(h.total()[0, 0, 0]), float(r.total()[0, 0, 0])
        return None if _close(got, want, 1e-4) else f"total {got:.6g}, head term {want:.6g}"

    return verify


def v_neuron_term(layer: int, neuron: int) -> Callable:
    def verify(r: Any, e: Env) -> Optional[str]:
        n = e.P1.neurons(PARIS, layers=[layer]).select(layer=layer, neuron=neuron)
        want, got = float(n.total()[0, 0, 0]), float(r.total()[0, 0, 0])
        return None if _close(got, want, 1e-4) else f"total {got:.6g}, neuron term {want:.6g}"

    return verify


def v_readout(layer: int, at: str, u: torch.Tensor, bias: float = 0.0, pos: int = -1) -> Callable:
    """The readout equals ``norm(x) . u + bias``, the norm applied by the model's own module."""

    def verify(r: Any, e: Env) -> Optional[str]:
        C = e.C1
        if at == "ln1":
            x = e.M.blocks[layer].ln1(C[f"blocks.{layer}.hook_resid_pre"])
        elif at == "ln2":
            x = e.M.blocks[layer].ln2(C[f"blocks.{layer}.hook_resid_mid"])
        elif at == "ln_final":
            x = e.M.ln_final(C[f"blocks.{layer}.hook_resid_post"])
        else:
            x = C[f"blocks.{layer}.hook_{at}"]
        uu = u if u.ndim == 2 else u[None]
        want = (x[0, pos].double() @ uu.double().T) + bias
        got = r.total()[0, 0].double()
        if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-4, atol=1e-4):
            return f"readout {got.tolist()} but norm(x) . u + bias = {want.tolist()}"
        return v_checks(r, e)

    return verify


def v_frame(r: Any, e: Env) -> Optional[str]:
    df = r
    B, P, K, C = e.H1.values.shape
    if len(df) != B * P * K * C:
        return f"{len(df)} rows, expected {B * P * K * C}"
    if not _close(float(df["value"].sum()), float(e.H1.total().sum()), 1e-4):
        return "the values do not sum to the total"
    return None


def v_same_total(ref: str) -> Callable:
    def verify(r: Any, e: Env) -> Optional[str]:
        want = getattr(e, ref).total()
        return (
            None
            if torch.allclose(r.total(), want, rtol=1e-5, atol=1e-5)
            else f"total changed from {want.flatten()[:3].tolist()} to {r.total().flatten()[:3].tolist()}"
        )

    return verify


def v_n_components(check: Callable[[Any], bool], what: str) -> Callable:
    def verify(r: Any, e: Env) -> Optional[str]:
        return None if check(r) else what

    return verify


def v_true(pred: Callable[[Any, Env], bool], what: str) -> Callable:
    def verify(r: Any, e: Env) -> Optional[str]:
        return None if pred(r, e) else what

    return verify


# --------------------------------------------------------------------------- helpers for probes
def edited(cache: Any, name: str, value: float, index: tuple = (0, -1)) -> dict:
    """A plain-dict copy of ``cache`` with ``value`` written into ``name`` at ``index``."""
    d = {k: v.clone() for k, v in cache.items()}
    d[name][index] = value
    return d


def cast(cache: Any, dtype: torch.dtype, only: Optional[str] = None) -> dict:
    return {k: (v.to(dtype) if only in (None, k) else v) for k, v in cache.items()}


def fresh_cache(model: Any, tokens: torch.Tensor, **kw: Any) -> Any:
    with torch.no_grad():
        return model.run_with_cache(tokens, **kw)[1]


def inference_cache(model: Any, tokens: torch.Tensor) -> Any:
    with torch.inference_mode():
        return model.run_with_cache(tokens)[1]


def without(cache: Any, *names: str) -> dict:
    return {k: v for k, v in cache.items() if k not in names}


@dataclass
class CliRun:
    code: int
    out: str
    err: str


def cli(*argv: str) -> CliRun:
    """``tlprisms.cli.main(argv)`` in this process; an exception propagating is a traceback."""
    from tlprisms import cli as tcli

    out, err = io.StringIO(), io.StringIO()
    grad = torch.is_grad_enabled()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = tcli.main(list(argv))
            except SystemExit as stop:
                code = stop.code if isinstance(stop.code, int) else 1
    finally:
        torch.set_grad_enabled(grad)  # main() switches autograd off for the process
    return CliRun(int(code or 0), out.getvalue(), err.getvalue())


def U(d: int = D_MODEL, seed: int = 0, *shape: int) -> torch.Tensor:
    return torch.randn(*(shape or (d,)), generator=torch.Generator().manual_seed(seed))


def _tmpfile() -> str:
    f = tempfile.NamedTemporaryFile(delete=False, suffix=".txt")
    f.close()
    return f.name


# =========================================================================== the probes

# --------------------------------------------------------------------------- constructor
area("LogitPrism(...)")
add(
    "ctor: full cache, tokens, logits",
    lambda e: tp.LogitPrism(e.M, e.C1, tokens=e.T1, logits=e.L1).residual(PARIS).check(),
    OK(v_logits("F1", [PARIS])),
)
add(
    "ctor: cache recorded with needed_hooks(model)",
    lambda e: tp.LogitPrism(e.M, e.C1_needed, tokens=e.T1).full(PARIS).check(),
    OK(v_logits("F1", [PARIS])),
)
add(
    "ctor: cache recorded with needed_hooks(model, ('residual',))",
    lambda e: tp.LogitPrism(e.M, e.C1_res, tokens=e.T1).residual(PARIS).check(),
    OK(v_logits("F1", [PARIS])),
)
add(
    "ctor: a plain dict instead of an ActivationCache",
    lambda e: tp.LogitPrism(e.M, dict(e.C1.items())).residual(PARIS),
    OK(v_logits("F1", [PARIS])),
)
add(
    "ctor: cache recorded with gradients on",
    lambda e: tp.LogitPrism(e.M, e.M.run_with_cache(e.T1)[1]).residual(PARIS).check(),
    OK(v_logits("F1", [PARIS])),
)
add(
    "ctor: cache recorded under inference_mode",
    lambda e: tp.LogitPrism(e.M, inference_cache(e.M, e.T1)).heads(PARIS).check(),
    OK(v_logits("F1", [PARIS])),
)
add(
    "ctor: no cache at all (None)",
    lambda e: tp.LogitPrism(e.M, None),
    (Err("CacheError", r"cache.*None"), Err("ArgumentError", r"cache.*None")),
)
add("ctor: empty dict as cache", lambda e: tp.LogitPrism(e.M, {}), Err("CacheError", r"hook_embed"))
add(
    "ctor: a list as cache",
    lambda e: tp.LogitPrism(e.M, [e.C1]),
    (
        Err("CacheError", r"cache.*(list|ActivationCache)"),
        Err("ArgumentError", r"cache.*(list|ActivationCache)"),
    ),
)
add(
    "ctor: logits passed where the cache goes",
    lambda e: tp.LogitPrism(e.M, e.L1),
    (
        Err("CacheError", r"cache.*(Tensor|ActivationCache)"),
        Err("ArgumentError", r"cache.*(Tensor|ActivationCache)"),
    ),
)
add(
    "ctor: model and cache swapped",
    lambda e: tp.LogitPrism(e.C1, e.M),
    Err("UnsupportedModelError", r"TransformerLens model"),
)
add(
    "ctor: the HF model inside the bridge",
    lambda e: tp.LogitPrism(e.M.original_model, e.C1),
    Err("UnsupportedModelError", r"TransformerLens model"),
)
add(
    "ctor: cache of another input, tokens given",
    lambda e: tp.LogitPrism(e.M, e.C1b, tokens=e.T1),
    Err("CacheError", r"tokens"),
)
add(
    "ctor: cache of another input (needed_hooks residual), tokens given",
    lambda e: tp.LogitPrism(e.M, e.C1b_res, tokens=e.T1).residual(PARIS),
    Err("CacheError", r"tokens"),
    note="issue 9: provenance skipped",
)
add(
    "ctor: cache of another input, no tokens (a valid cache of that input)",
    lambda e: tp.LogitPrism(e.M, e.C1b).residual(PARIS),
    OK(v_logits("F1b", [PARIS])),
)
add(
    "ctor: logits of another input",
    lambda e: tp.LogitPrism(e.M, e.C1, logits=e.L1b),
    Err("CacheError", r"logits"),
)
add(
    "ctor: logits of another input (needed_hooks residual cache)",
    lambda e: tp.LogitPrism(e.M, e.C1_res, logits=e.L1b).residual(PARIS),
    Err("CacheError", r"logits"),
)
add(
    "ctor: twin model's cache (other weights)",
    lambda e: tp.LogitPrism(e.M, e.C_twin),
    Err("CacheError", r"model"),
)
add(
    "ctor: twin model's cache recorded with needed_hooks residual",
    lambda e: tp.LogitPrism(e.M, e.C_twin_res).residual(PARIS),
    Err("CacheError", r"model"),
    note="issue 9: provenance skipped",
)
add(
    "ctor: twin model's cache without hook_v",
    lambda e: tp.LogitPrism(e.M, without(e.C_twin, "blocks.0.attn.hook_v")).residual(PARIS),
    Err("CacheError", r"model|needed_hooks"),
)
add(
    "ctor: twin model's cache without blocks.0.hook_resid_pre",
    lambda e: tp.LogitPrism(e.M, without(e.C_twin, "blocks.0.hook_resid_pre")).residual(PARIS),
    Err("CacheError", r"model|needed_hooks"),
)
add(
    "ctor: own cache without blocks.0.hook_resid_pre (provenance not checkable)",
    lambda e: tp.LogitPrism(e.M, without(e.C1, "blocks.0.hook_resid_pre")).residual(PARIS),
    (OK(v_logits("F1", [PARIS])), Err("CacheError", r"needed_hooks")),
)
add(
    "ctor: cache of a model of another size",
    lambda e: tp.LogitPrism(e.M, e.CG),
    Err("CacheError", r"another model"),
)
add(
    "ctor: cache of another architecture, same shapes",
    lambda e: tp.LogitPrism(e.G, e.C_llama),
    Err("CacheError", r"model"),
)
add(
    "ctor: cache after remove_batch_dim()",
    lambda e: tp.LogitPrism(e.M, (lambda c: (c.remove_batch_dim(), c)[1])(fresh_cache(e.M, e.T1))),
    Err("CacheError", r"remove_batch_dim|batch (axis|dim)"),
    note="0.1 says 'another model'",
)
add(
    "ctor: cache recorded with remove_batch_dim=True",
    lambda e: tp.LogitPrism(e.M, fresh_cache(e.M, e.T1, remove_batch_dim=True)),
    Err("CacheError", r"remove_batch_dim|batch (axis|dim)"),
)
add(
    "ctor: batch-2 cache with batch-1 tokens",
    lambda e: tp.LogitPrism(e.M, e.C2, tokens=e.T1),
    Err("CacheError", r"tokens.*shape"),
)
add(
    "ctor: tokens as a float tensor",
    lambda e: tp.LogitPrism(e.M, e.C1, tokens=e.T1.float()),
    Err("ArgumentError", r"tokens.*(integer|int)"),
)
add(
    "ctor: tokens as a bool tensor",
    lambda e: tp.LogitPrism(e.M, e.C1, tokens=e.T1.bool()),
    Err("ArgumentError", r"tokens.*(integer|int)"),
)
add(
    "ctor: tokens outside the vocabulary",
    lambda e: tp.LogitPrism(e.M, e.C1, tokens=e.T1 + 1000),
    (Err("TargetError", r"vocabulary"), Err("ArgumentError", r"vocabulary")),
)
add(
    "ctor: tokens as a list of ints",
    lambda e: tp.LogitPrism(e.M, e.C1, tokens=e.T1[0].tolist()).residual(PARIS),
    (OK(v_logits("F1", [PARIS])), Err("ArgumentError", r"tokens.*tensor")),
)
add(
    "ctor: tokens of another shape",
    lambda e: tp.LogitPrism(e.M, e.C1, tokens=e.T1[:, :4]),
    Err("CacheError", r"tokens has shape"),
)
add(
    "ctor: logits of another shape",
    lambda e: tp.LogitPrism(e.M, e.C1, logits=e.L1[:, :3]),
    Err("CacheError", r"logits"),
)
add(
    "ctor: logits holding NaN",
    lambda e: tp.LogitPrism(e.M, e.C1, logits=torch.full_like(e.L1, float("nan"))),
    Err("NonFiniteError", r"logits"),
)
add(
    "ctor: logits as an int tensor",
    lambda e: tp.LogitPrism(e.M, e.C1, logits=e.L1.long()),
    Err("ArgumentError", r"logits"),
)
add(
    "ctor: cache with hook_embed as integers",
    lambda e: tp.LogitPrism(e.M, cast(e.C1, torch.long, "hook_embed")).residual(PARIS),
    (Err("CacheError", r"dtype|float|integer"), Err("ArgumentError", r"dtype|float|integer")),
)
add(
    "ctor: whole cache cast to float64",
    lambda e: tp.LogitPrism(e.M, cast(e.C1, torch.float64)).residual(PARIS),
    (
        OK(v_all(v_logits("F1", [PARIS]), v_checks)),
        Err("CacheError", r"dtype"),
        Err("CompletenessError", r"dtype|cast|float32"),
    ),
    note="a float32 model's cache: check() must not hold it to float64 rounding, or say why",
)
add(
    "ctor: whole cache cast to bfloat16",
    lambda e: tp.LogitPrism(e.M, cast(e.C1, torch.bfloat16)).residual(PARIS),
    (OK(v_all(v_logits("F1", [PARIS], rtol=3e-2), v_checks)), Err("CacheError", r"dtype")),
)
add(
    "ctor: one hook cast to float16, then check()",
    lambda e: (
        tp.LogitPrism(e.M, cast(e.C1, torch.float16, "blocks.0.hook_mlp_out"))
        .residual(PARIS)
        .check()
    ),
    (Err("CacheError", r"dtype|float16"), Err("CompletenessError", r"miss")),
    note="one write rounded to fp16 no longer adds up to the float32 logit",
)
add(
    "ctor: attn_out edited by a hook after the fact",
    lambda e: tp.LogitPrism(e.M, edited(e.C1, "blocks.1.hook_attn_out", 5.0), logits=e.L1).residual(
        PARIS
    ),
    (Err("CompletenessError", r"edited|hook|add up"), Err("CacheError", r"edited|hook|logits")),
)
add(
    "ctor: cache recorded with pos_slice=-1",
    lambda e: tp.LogitPrism(e.M, fresh_cache(e.M, e.T1, pos_slice=-1), tokens=e.T1),
    Err("CacheError", r"pos_slice|position|shape|tokens"),
)

# --------------------------------------------------------------------------- NaN / inf
area("non-finite caches")
add(
    "nan: hook_mlp_out at the explained position -> residual().check()",
    lambda e: (
        tp.LogitPrism(e.M, edited(e.C1, "blocks.0.hook_mlp_out", float("nan")))
        .residual(PARIS)
        .check()
    ),
    Err("NonFiniteError", r"hook_mlp_out.*\bpos\w*\W{0,3}5\b"),
    note="issue 9: NaN passes check()",
)
add(
    "nan: hook_mlp_out, logits given -> residual().check()",
    lambda e: (
        tp.LogitPrism(e.M, edited(e.C1, "blocks.0.hook_mlp_out", float("nan")), logits=e.L1)
        .residual(PARIS)
        .check()
    ),
    Err("NonFiniteError", r"hook_mlp_out"),
)
add(
    "inf: hook_embed -> residual()",
    lambda e: tp.LogitPrism(e.M, edited(e.C1, "hook_embed", float("inf"))).residual(PARIS),
    Err("NonFiniteError", r"hook_embed|resid_pre"),
)
add(
    "nan: ln_final.hook_scale -> residual()",
    lambda e: tp.LogitPrism(e.M, edited(e.C1, "ln_final.hook_scale", float("nan"))).residual(PARIS),
    Err("NonFiniteError", r"ln_final\.hook_scale"),
)
add(
    "nan: final resid -> residual()",
    lambda e: tp.LogitPrism(e.M, edited(e.C1, "blocks.1.hook_resid_post", float("nan"))).residual(
        PARIS
    ),
    Err("NonFiniteError", r"hook_resid_post"),
)
add(
    "nan: attention pattern -> heads()",
    lambda e: tp.LogitPrism(
        e.M, edited(e.C1, "blocks.1.attn.hook_pattern", float("nan"), (0, 0, -1, 2))
    ).heads(PARIS),
    Err("NonFiniteError", r"hook_pattern"),
)
add(
    "nan: hook_v at a source position -> heads().check()",
    lambda e: (
        tp.LogitPrism(e.M, edited(e.C1, "blocks.1.attn.hook_v", float("nan"), (0, 2)))
        .heads(PARIS)
        .check()
    ),
    Err("NonFiniteError", r"hook_v"),
)
add(
    "inf: mlp hook_post -> neurons()",
    lambda e: tp.LogitPrism(e.M, edited(e.C1, "blocks.1.mlp.hook_post", float("inf"))).neurons(
        PARIS
    ),
    Err("NonFiniteError", r"hook_post"),
)
add(
    "nan: ln1 scale of layer 1 at the source -> through_head()",
    lambda e: tp.LogitPrism(
        e.M, edited(e.C1, "blocks.1.ln1.hook_scale", float("nan"), (0, 3))
    ).through_head(1, 2, PARIS, src=3),
    Err("NonFiniteError", r"ln1\.hook_scale"),
)
add(
    "nan: resid_pre of layer 1 (read by no prism) -> through_head()",
    lambda e: (
        tp.LogitPrism(e.M, edited(e.C1, "blocks.1.hook_resid_pre", float("nan"), (0, 3)))
        .through_head(1, 2, PARIS, src=3)
        .check()
    ),
    (
        OK(
            v_true(
                lambda r, e: _close(
                    float(r.total()[0, 0, 0]),
                    float(e.H1.select(layer=1, head=2, src=3).total()[0, 0, 0]),
                    1e-4,
                ),
                "wrong",
            )
        ),
        Err("NonFiniteError", r"resid_pre"),
    ),
)
add(
    "nan: a hook the prism does not read (hook_q)",
    lambda e: (
        tp.LogitPrism(e.M, edited(e.C1, "blocks.1.attn.hook_q", float("nan")))
        .residual(PARIS)
        .check()
    ),
    (OK(v_logits("F1", [PARIS])), Err("NonFiniteError", r"hook_q")),
)
add(
    "nan: mlp_out at an earlier position -> residual at the last",
    lambda e: (
        tp.LogitPrism(e.M, edited(e.C1, "blocks.0.hook_mlp_out", float("nan"), (0, 1)))
        .residual(PARIS)
        .check()
    ),
    (OK(v_logits("F1", [PARIS])), Err("NonFiniteError", r"hook_mlp_out")),
)

# --------------------------------------------------------------------------- run
area("LogitPrism.run")
add(
    "run: text",
    lambda e: tp.LogitPrism.run(e.M, TEXT).full(PARIS).check(),
    OK(v_logits("F1", [PARIS])),
)
add(
    "run: list of texts",
    lambda e: tp.LogitPrism.run(e.M, [TEXT, TEXT_B]).residual(PARIS).check(),
    OK(v_logits("F2", [PARIS])),
)
add(
    "run: 1-D token tensor",
    lambda e: tp.LogitPrism.run(e.M, e.T1[0]).residual(PARIS).check(),
    OK(v_logits("F1", [PARIS])),
)
add(
    "run: 2-D token tensor",
    lambda e: tp.LogitPrism.run(e.M, e.T1).heads(PARIS).check(),
    OK(v_logits("F1", [PARIS])),
)
add(
    "run: prism.readout(at='ln2') after run",
    lambda e: e.PR.readout(U(), 1, at="ln2"),
    OK(v_readout(1, "ln2", U())),
    note="issue 9: says use needed_hooks, which run used",
)
add(
    "run: through_neuron after run",
    lambda e: e.PR.through_neuron(1, 7, PARIS).check(),
    OK(v_neuron_term(1, 7)),
)
add(
    "run: empty string (the <bos> token only)",
    lambda e: tp.LogitPrism.run(e.M, "").residual(PARIS).check(),
    OK(v_true(lambda r, e: r.values.shape[:2] == (1, 1), "not one position")),
)
add(
    "run: empty string without BOS",
    lambda e: tp.LogitPrism.run(e.M, "", prepend_bos=False),
    Err("ArgumentError", r"no tokens|empty"),
)
add("run: empty list", lambda e: tp.LogitPrism.run(e.M, []), Err("ArgumentError", r"input|empty"))
add(
    "run: empty token tensor",
    lambda e: tp.LogitPrism.run(e.M, torch.zeros(1, 0, dtype=torch.long)),
    Err("ArgumentError", r"no tokens|empty"),
)
add(
    "run: float token tensor",
    lambda e: tp.LogitPrism.run(e.M, e.T1.float()),
    Err("ArgumentError", r"integer|int"),
)
add(
    "run: bool token tensor",
    lambda e: tp.LogitPrism.run(e.M, e.T1.bool()),
    Err("ArgumentError", r"integer|int"),
)
add(
    "run: token ids outside the vocabulary",
    lambda e: tp.LogitPrism.run(e.M, torch.tensor([[2, 500]])),
    (Err("TargetError", r"500.*vocabulary"), Err("ArgumentError", r"500.*vocabulary")),
)
add(
    "run: negative token id",
    lambda e: tp.LogitPrism.run(e.M, torch.tensor([[2, -1]])),
    (Err("TargetError", r"-1.*vocabulary"), Err("ArgumentError", r"-1.*vocabulary")),
)
add(
    "run: 3-D token tensor",
    lambda e: tp.LogitPrism.run(e.M, e.T1[None]),
    Err("ArgumentError", r"\[batch, pos\]|shape"),
)
add("run: input=None", lambda e: tp.LogitPrism.run(e.M, None), Err("ArgumentError", r"input"))
add("run: input=42 (an int)", lambda e: tp.LogitPrism.run(e.M, 42), Err("ArgumentError", r"input"))
add(
    "run: list mixing text and ids",
    lambda e: tp.LogitPrism.run(e.M, [TEXT, 5]),
    Err("ArgumentError", r"input|string"),
)
add(
    "run: prepend_bos='yes'",
    lambda e: tp.LogitPrism.run(e.M, TEXT, prepend_bos="yes"),
    Err("ArgumentError", r"prepend_bos"),
)
add(
    "run: input longer than n_ctx (rotary: the model runs it)",
    lambda e: tp.LogitPrism.run(e.M, torch.full((1, 70), 5)).residual(PARIS).check(),
    (
        OK(
            v_true(
                lambda r, e: _close(
                    float(r.total()[0, 0, 0]),
                    float(e.M(torch.full((1, 70), 5))[0, -1, PARIS]),
                    1e-4,
                ),
                "wrong",
            )
        ),
        Err("ArgumentError", r"n_ctx|context|too long|64"),
    ),
)
add(
    "run: not a model",
    lambda e: tp.LogitPrism.run("gpt2", TEXT),
    Err("UnsupportedModelError", r"TransformerLens model"),
)

# --------------------------------------------------------------------------- targets
area("targets")
add("target: ' Paris'", lambda e: e.P1.residual(" Paris"), OK(v_logits("F1", [PARIS])))
add("target: int id", lambda e: e.P1.residual(PARIS), OK(v_logits("F1", [PARIS])))
add("target: numpy int64 id", lambda e: e.P1.residual(np.int64(PARIS)), OK(v_logits("F1", [PARIS])))
add(
    "target: 0-d long tensor",
    lambda e: e.P1.residual(torch.tensor(PARIS)),
    OK(v_logits("F1", [PARIS])),
)
add(
    "target: '<unk>' itself (in the vocabulary)",
    lambda e: e.P1.residual("<unk>"),
    OK(v_logits("F1", [3])),
)
add(
    "target: 0-d float tensor 11.7",
    lambda e: e.P1.residual(torch.tensor(11.7)),
    Err("TargetError", r"11\.7|float"),
    note="issue 9: read as token 11",
)
add("target: float 11.0", lambda e: e.P1.residual(11.0), Err("TargetError", r"float|11\.0"))
add(
    "target: numpy float32",
    lambda e: e.P1.residual(np.float32(11)),
    Err("TargetError", r"float|11"),
)
add("target: True", lambda e: e.P1.residual(True), Err("TargetError", r"bool|True"))
add("target: -1", lambda e: e.P1.residual(-1), Err("TargetError", r"-1.*vocabulary"))
add(
    "target: d_vocab (149)",
    lambda e: e.P1.residual(D_VOCAB),
    Err("TargetError", r"149.*vocabulary"),
)
add(
    "target: a word not in the vocabulary",
    lambda e: e.P1.residual(" Zebra"),
    Err("TargetError", r"Zebra.*(vocabulary|unknown)"),
    note="issue 9: explained the <unk> logit",
)
add(
    "target: empty string",
    lambda e: e.P1.residual(""),
    Err("TargetError", r"no token|empty|0 tokens"),
)
add("target: two words", lambda e: e.P1.residual(" Paris Rome"), Err("TargetError", r"2 tokens"))
add("target: None", lambda e: e.P1.residual(None), Err("TargetError", r"None"))
add("target: empty list", lambda e: e.P1.residual([]), Err("TargetError", r"empty"))
add(
    "target: list of two",
    lambda e: e.P1.residual([" Paris", " Rome"]),
    OK(v_logits("F1", [PARIS, ROME])),
)
add(
    "target: list with a float",
    lambda e: e.P1.residual([" Paris", 3.5]),
    Err("TargetError", r"3\.5|float"),
)
add("target: bytes", lambda e: e.P1.residual(b" Paris"), Err("TargetError", r"bytes|target"))
add("target: a dict", lambda e: e.P1.residual({" Paris": 1}), Err("TargetError", r"dict|target"))
add(
    "target: LogitDiff",
    lambda e: e.P1.residual(tp.LogitDiff(" Paris", " Rome")),
    OK(v_logits("F1", [(PARIS, ROME)])),
)
add(
    "target: LogitDiff with an unknown word",
    lambda e: e.P1.residual(tp.LogitDiff(" Paris", " Zebra")),
    Err("TargetError", r"Zebra"),
)
add(
    "target: LogitDiff with a bool",
    lambda e: e.P1.residual(tp.LogitDiff(" Paris", True)),
    Err("TargetError", r"bool|True"),
)
add(
    "target: LogitDiff with a float",
    lambda e: e.P1.residual(tp.LogitDiff(11.0, ROME)),
    Err("TargetError", r"float|11\.0"),
)
add(
    "target: Direction",
    lambda e: e.P1.residual(tp.Direction(U())).check(),
    OK(
        v_true(
            lambda r, e: _close(
                float(r.total()[0, 0, 0]),
                float(e.M.ln_final(e.C1["blocks.1.hook_resid_post"])[0, -1] @ U()),
                1e-4,
            ),
            "total differs from ln_final(x) . u",
        )
    ),
)
add(
    "target: Direction of the wrong size",
    lambda e: e.P1.residual(tp.Direction(U(64))),
    Err("TargetError", r"128|d_model"),
)
add(
    "target: Direction 2-D",
    lambda e: e.P1.residual(tp.Direction(U(D_MODEL, 0, 1, D_MODEL))),
    Err("TargetError", r"shape|d_model"),
)
add(
    "target: Direction with NaN",
    lambda e: e.P1.residual(tp.Direction(torch.full((D_MODEL,), float("nan")))),
    Err("NonFiniteError", r"Direction|NaN"),
)
add(
    "target: Direction of ints",
    lambda e: e.P1.residual(tp.Direction(torch.ones(D_MODEL, dtype=torch.long))),
    (
        OK(
            v_true(
                lambda r, e: _close(
                    float(r.total()[0, 0, 0]),
                    float(e.M.ln_final(e.C1["blocks.1.hook_resid_post"])[0, -1].sum()),
                    1e-4,
                ),
                "wrong",
            )
        ),
        Err("TargetError", r"float|Direction"),
    ),
)
add(
    "target: Direction of a list",
    lambda e: e.P1.residual(tp.Direction([0.0] * D_MODEL)),
    Err("TargetError", r"list|tensor|Direction"),
)
add(
    "target: PerRow on a batch of 2",
    lambda e: e.P2.residual(tp.PerRow([" Paris", " Tokyo"])),
    OK(v_logits("F2", [[PARIS], [TOKYO]])),
)
add(
    "target: PerRow too short",
    lambda e: e.P2.residual(tp.PerRow([" Paris"])),
    Err("TargetError", r"PerRow has 1"),
)
add(
    "target: PerRow of a string",
    lambda e: e.P2.residual(tp.PerRow(" Paris")),
    Err("TargetError", r"PerRow.*\b(string|str)\b"),
)
add(
    "target: PerRow with an empty row",
    lambda e: e.P2.residual(tp.PerRow([[], [PARIS]])),
    Err("TargetError", r"empty"),
)
add(
    "target: long tensor [batch]",
    lambda e: e.P2.residual(torch.tensor([PARIS, TOKYO])),
    OK(v_logits("F2", [[PARIS], [TOKYO]])),
)
add(
    "target: long tensor [batch, k]",
    lambda e: e.P2.residual(torch.tensor([[PARIS, ROME], [TOKYO, ROME]])),
    OK(v_logits("F2", [[PARIS, ROME], [TOKYO, ROME]])),
)
add(
    "target: float tensor [batch]",
    lambda e: e.P2.residual(torch.tensor([11.0, 15.0])),
    Err("TargetError", r"integer|float"),
)
add(
    "target: tensor of the wrong batch",
    lambda e: e.P2.residual(torch.tensor([PARIS, TOKYO, ROME])),
    Err("TargetError", r"shape"),
)
add(
    "target: tensor outside the vocabulary",
    lambda e: e.P2.residual(torch.tensor([PARIS, 999])),
    Err("TargetError", r"vocabulary|\[0, 149\)"),
)
add(
    "target: NextToken at pos=-1",
    lambda e: e.P1.residual(tp.NextToken()),
    Err("TargetError", r"'all'"),
)
add(
    "target: NextToken at pos='all'",
    lambda e: e.P1.full(tp.NextToken(), pos="all").check(),
    OK(v_logits("F1", None, "all")),
)
add(
    "target: NextToken without tokens",
    lambda e: e.P1_bare.residual(tp.NextToken(), pos="all"),
    Err("TargetError", r"tokens"),
)
add(
    "target: the NextToken class, not an instance",
    lambda e: e.P1.residual(tp.NextToken, pos="all"),
    Err("TargetError", r"NextToken\(\)|NextToken"),
)
add(
    "target: string on a model without tokenizer",
    lambda e: tp.LogitPrism(e.G_notok, e.CG_notok).residual(" Paris"),
    Err("TargetError", r"tokenizer"),
)

# --------------------------------------------------------------------------- positions
area("positions")
add("pos=0", lambda e: e.P1.residual(PARIS, pos=0), OK(v_logits("F1", [PARIS], 0)))
add("pos=5", lambda e: e.P1.residual(PARIS, pos=5), OK(v_logits("F1", [PARIS], 5)))
add("pos=-6", lambda e: e.P1.residual(PARIS, pos=-6), OK(v_logits("F1", [PARIS], 0)))
add(
    "pos=np.int64(3)",
    lambda e: e.P1.residual(PARIS, pos=np.int64(3)),
    OK(v_logits("F1", [PARIS], 3)),
)
add(
    "pos=torch.tensor(3)",
    lambda e: e.P1.residual(PARIS, pos=torch.tensor(3)),
    OK(v_logits("F1", [PARIS], 3)),
)
add(
    "pos='all' (residual)",
    lambda e: e.P1.residual(PARIS, pos="all").check(),
    OK(
        v_true(
            lambda r, e: (
                r.values.shape[1] == N_CTX
                and torch.allclose(r.total()[0, :, 0], e.F1[0, :, PARIS], atol=1e-4)
            ),
            "not every position",
        )
    ),
)
add("pos=[2] on batch 1", lambda e: e.P1.residual(PARIS, pos=[2]), OK(v_logits("F1", [PARIS], [2])))
add(
    "pos=[2, 3] on batch 2",
    lambda e: e.P2.residual(PARIS, pos=[2, 3]),
    OK(v_logits("F2", [PARIS], [2, 3])),
)
add(
    "pos=torch.tensor([2, 3]) on batch 2",
    lambda e: e.P2.residual(PARIS, pos=torch.tensor([2, 3])),
    OK(v_logits("F2", [PARIS], [2, 3])),
)
add(
    "pos=np.array([2, 3]) on batch 2",
    lambda e: e.P2.residual(PARIS, pos=np.array([2, 3])),
    OK(v_logits("F2", [PARIS], [2, 3])),
)
add(
    "pos=6 (one past the end)",
    lambda e: e.P1.residual(PARIS, pos=6),
    Err("PositionError", r"6.*out of range.*0\.\.5"),
)
add("pos=-7", lambda e: e.P1.residual(PARIS, pos=-7), Err("PositionError", r"-7.*out of range"))
add(
    "pos=True",
    lambda e: e.P1.residual(PARIS, pos=True),
    Err("PositionError", r"True|bool"),
    note="issue 9: read as 1",
)
add("pos=False", lambda e: e.P1.residual(PARIS, pos=False), Err("PositionError", r"False|bool"))
add(
    "pos=2.7",
    lambda e: e.P1.residual(PARIS, pos=2.7),
    Err("PositionError", r"2\.7|float"),
    note="issue 9: read as 2",
)
add("pos=2.0", lambda e: e.P1.residual(PARIS, pos=2.0), Err("PositionError", r"2\.0|float"))
add(
    "pos=np.float64(3)",
    lambda e: e.P1.residual(PARIS, pos=np.float64(3)),
    Err("PositionError", r"3\.0|float"),
)
add(
    "pos=torch.tensor(3.0)",
    lambda e: e.P1.residual(PARIS, pos=torch.tensor(3.0)),
    Err("PositionError", r"float|3\.0|tensor"),
)
add("pos=None", lambda e: e.P1.residual(PARIS, pos=None), Err("PositionError", r"None.*int.*'all'"))
add(
    "pos=slice(None)",
    lambda e: e.P1.residual(PARIS, pos=slice(None)),
    Err("PositionError", r"slice.*int.*'all'"),
)
add(
    "pos='last'", lambda e: e.P1.residual(PARIS, pos="last"), Err("PositionError", r"'last'.*'all'")
)
add("pos='-1' (a string)", lambda e: e.P1.residual(PARIS, pos="-1"), Err("PositionError", r"'-1'"))
add(
    "pos=[] on batch 1",
    lambda e: e.P1.residual(PARIS, pos=[]),
    Err("PositionError", r"0 positions|batch"),
)
add("pos=[2.5]", lambda e: e.P1.residual(PARIS, pos=[2.5]), Err("PositionError", r"2\.5|float"))
add("pos=[True]", lambda e: e.P1.residual(PARIS, pos=[True]), Err("PositionError", r"True|bool"))
add(
    "pos=[[2]] (nested)",
    lambda e: e.P1.residual(PARIS, pos=[[2]]),
    Err("PositionError", r"\[2\]|list|int"),
)
add(
    "pos=[2] on batch 2",
    lambda e: e.P2.residual(PARIS, pos=[2]),
    Err("PositionError", r"1 position.*batch of 2"),
)
add(
    "pos=[2, 9] on batch 2",
    lambda e: e.P2.residual(PARIS, pos=[2, 9]),
    Err("PositionError", r"9.*out of range"),
)
add(
    "pos=torch.tensor([2., 3.])",
    lambda e: e.P2.residual(PARIS, pos=torch.tensor([2.0, 3.0])),
    Err("PositionError", r"float|2\.0"),
)
add("pos={2} (a set)", lambda e: e.P1.residual(PARIS, pos={2}), Err("PositionError", r"set|\{2\}"))
add(
    "pos=2-D tensor",
    lambda e: e.P2.residual(PARIS, pos=torch.tensor([[2], [3]])),
    Err("PositionError", r"shape|2-D|per batch row|int"),
)

# --------------------------------------------------------------------------- layers, heads, neurons, modes
area("layer / head / neuron selections, modes")
add(
    "heads(layers='all')",
    lambda e: e.P1.heads(PARIS, layers="all").check(),
    OK(v_logits("F1", [PARIS])),
    note="the contract's spelling of every layer (0.1: None)",
)
add(
    "heads(layers=1)",
    lambda e: e.P1.heads(PARIS, layers=1).check(),
    OK(
        v_true(
            lambda r, e: set(r.select(kind="head").components.layer.tolist()) == {1},
            "not layer 1 only",
        )
    ),
)
add(
    "heads(layers=[0, 1])",
    lambda e: e.P1.heads(PARIS, layers=[0, 1]).check(),
    OK(v_logits("F1", [PARIS])),
)
add(
    "heads(layers=-1)",
    lambda e: e.P1.heads(PARIS, layers=-1),
    OK(
        v_true(
            lambda r, e: set(r.select(kind="head").components.layer.tolist()) == {1},
            "not the last layer",
        )
    ),
)
add(
    "heads(layers=np.array([0, 1]))",
    lambda e: e.P1.heads(PARIS, layers=np.array([0, 1])),
    OK(v_logits("F1", [PARIS])),
)
add(
    "heads(layers=torch.tensor([1]))",
    lambda e: e.P1.heads(PARIS, layers=torch.tensor([1])),
    OK(
        v_true(
            lambda r, e: set(r.select(kind="head").components.layer.tolist()) == {1},
            "not layer 1 only",
        )
    ),
)
add(
    "heads(layers=range(2))",
    lambda e: e.P1.heads(PARIS, layers=range(2)),
    OK(v_logits("F1", [PARIS])),
)
add(
    "heads(layers=())",
    lambda e: e.P1.heads(PARIS, layers=()).check(),
    OK(v_true(lambda r, e: "head" not in set(r.components.kinds().tolist()), "split heads")),
)
add(
    "heads(layers='10')",
    lambda e: e.P1.heads(PARIS, layers="10"),
    Err("ArgumentError", r"'10'"),
    note="issue 9: layers 1 and 0",
)
add("heads(layers='0')", lambda e: e.P1.heads(PARIS, layers="0"), Err("ArgumentError", r"'0'"))
add(
    "heads(layers='al')",
    lambda e: e.P1.heads(PARIS, layers="al"),
    Err("ArgumentError", r"'al'.*'all'"),
)
add(
    "heads(layers=True)",
    lambda e: e.P1.heads(PARIS, layers=True),
    Err("ArgumentError", r"True|bool"),
)
add(
    "heads(layers=[True])",
    lambda e: e.P1.heads(PARIS, layers=[True]),
    Err("ArgumentError", r"True|bool"),
)
add(
    "heads(layers=1.0)",
    lambda e: e.P1.heads(PARIS, layers=1.0),
    Err("ArgumentError", r"1\.0|float"),
)
add(
    "heads(layers=[0.5])",
    lambda e: e.P1.heads(PARIS, layers=[0.5]),
    Err("ArgumentError", r"0\.5|float"),
)
add(
    "heads(layers=torch.tensor([1.]))",
    lambda e: e.P1.heads(PARIS, layers=torch.tensor([1.0])),
    Err("ArgumentError", r"float|1\.0|tensor"),
)
add(
    "heads(layers=2)",
    lambda e: e.P1.heads(PARIS, layers=2),
    Err("ArgumentError", r"2.*out of range.*0\.\.1"),
)
add(
    "heads(layers=-3)",
    lambda e: e.P1.heads(PARIS, layers=-3),
    Err("ArgumentError", r"-3.*out of range"),
)
add(
    "heads(layers=[0, 5])",
    lambda e: e.P1.heads(PARIS, layers=[0, 5]),
    Err("ArgumentError", r"5.*out of range"),
)
add(
    "heads(layers={'a': 1})",
    lambda e: e.P1.heads(PARIS, layers={"a": 1}),
    Err("ArgumentError", r"layers|dict"),
)
add(
    "heads(by_source=False)",
    lambda e: e.P1.heads(PARIS, by_source=False).check(),
    OK(
        v_true(
            lambda r, e: (r.select(kind="head").components.src == -1).all(), "still split by source"
        )
    ),
)
add(
    "heads(by_source='yes')",
    lambda e: e.P1.heads(PARIS, by_source="yes"),
    Err("ArgumentError", r"by_source"),
)
add(
    "heads(by_source=1)",
    lambda e: e.P1.heads(PARIS, by_source=1),
    Err("ArgumentError", r"by_source"),
)
add("neurons() (every layer)", lambda e: e.P1.neurons(PARIS).check(), OK(v_logits("F1", [PARIS])))
add(
    "neurons(layers=[0.0])",
    lambda e: e.P1.neurons(PARIS, layers=[0.0]),
    Err("ArgumentError", r"0\.0|float"),
)
add("neurons(layers='1')", lambda e: e.P1.neurons(PARIS, layers="1"), Err("ArgumentError", r"'1'"))
add("full()", lambda e: e.P1.full(PARIS).check(), OK(v_logits("F1", [PARIS])))
add(
    "full(pos='all') with one target",
    lambda e: e.P1.full(PARIS, pos="all").check(),
    OK(
        v_true(
            lambda r, e: torch.allclose(r.total()[0, :, 0], e.F1[0, :, PARIS], atol=1e-4),
            "totals differ from the logits",
        )
    ),
)
add(
    "decompose(heads=[0, 1], neurons=[1])",
    lambda e: e.P1.decompose(PARIS, heads=[0, 1], neurons=[1]).check(),
    OK(v_logits("F1", [PARIS])),
)
add(
    "decompose(heads=None) (0.1 spelling of all)",
    lambda e: e.P1.decompose(PARIS, heads=None).check(),
    OK(v_logits("F1", [PARIS])),
)
add(
    "decompose(neurons=3)",
    lambda e: e.P1.decompose(PARIS, neurons=3),
    Err("ArgumentError", r"3.*out of range"),
)
add(
    "decompose(heads='al')",
    lambda e: e.P1.decompose(PARIS, heads="al"),
    Err("ArgumentError", r"'al'"),
)
add(
    "decompose(heads=[[0]])",
    lambda e: e.P1.decompose(PARIS, heads=[[0]]),
    Err("ArgumentError", r"\[0\]|list|int"),
)
add(
    "residual(softcap='both')",
    lambda e: e.P1.residual(PARIS, softcap="both"),
    Err("ArgumentError", r"softcap.*'post'"),
)
add(
    "residual(softcap=None)",
    lambda e: e.P1.residual(PARIS, softcap=None),
    Err("ArgumentError", r"softcap"),
)
add(
    "residual(softcap='pre') on a model without soft-cap",
    lambda e: e.P1.residual(PARIS, softcap="pre"),
    OK(v_logits("F1", [PARIS])),
)
add(
    "residual(softcap=True)",
    lambda e: e.P1.residual(PARIS, softcap=True),
    Err("ArgumentError", r"softcap"),
)

# --------------------------------------------------------------------------- chains
area("chains, Hop")
add("through_head(1, 2)", lambda e: e.P1.through_head(1, 2, PARIS).check(), OK(v_head_term(1, 2)))
add(
    "through_head(-1, 2)",
    lambda e: e.P1.through_head(-1, 2, PARIS).check(),
    (OK(v_head_term(1, 2)), Err("ArgumentError", r"-1.*out of range.*0\.\.1")),
)
add(
    "through_head(1, 2, src=3)",
    lambda e: e.P1.through_head(1, 2, PARIS, src=3).check(),
    OK(
        v_true(
            lambda r, e: _close(
                float(r.total()[0, 0, 0]),
                float(e.H1.select(layer=1, head=2, src=3).total()[0, 0, 0]),
                1e-4,
            ),
            "not the head x source term",
        )
    ),
)
add(
    "through_head(1.0, 2)",
    lambda e: e.P1.through_head(1.0, 2, PARIS),
    Err("ArgumentError", r"layer.*(1\.0|float)"),
)
add(
    "through_head(True, 2)",
    lambda e: e.P1.through_head(True, 2, PARIS),
    Err("ArgumentError", r"layer.*(True|bool)"),
)
add(
    "through_head(1, '2')",
    lambda e: e.P1.through_head(1, "2", PARIS),
    Err("ArgumentError", r"head.*'2'"),
)
add(
    "through_head(1, 2.0)",
    lambda e: e.P1.through_head(1, 2.0, PARIS),
    Err("ArgumentError", r"2\.0|float"),
)
add(
    "through_head(2, 0): layer out of range",
    lambda e: e.P1.through_head(2, 0, PARIS),
    Err("ArgumentError", r"2.*out of range.*0\.\.1"),
)
add(
    "through_head(1, 4): head out of range",
    lambda e: e.P1.through_head(1, 4, PARIS),
    Err("ArgumentError", r"4.*out of range.*0\.\.3"),
)
add(
    "through_head(1, -1)",
    lambda e: e.P1.through_head(1, -1, PARIS),
    (OK(v_head_term(1, 3)), Err("ArgumentError", r"-1.*out of range")),
)
add(
    "through_head(src=6)",
    lambda e: e.P1.through_head(1, 2, PARIS, src=6),
    Err("PositionError", r"6.*out of range"),
)
add(
    "through_head(src=2.5)",
    lambda e: e.P1.through_head(1, 2, PARIS, src=2.5),
    (Err("PositionError", r"2\.5|float"), Err("ArgumentError", r"2\.5|float")),
)
add(
    "through_head(src=True)",
    lambda e: e.P1.through_head(1, 2, PARIS, src=True),
    (Err("PositionError", r"True|bool"), Err("ArgumentError", r"True|bool")),
)
add(
    "through_head(pos='all')",
    lambda e: e.P1.through_head(1, 2, PARIS, pos="all"),
    Err("PositionError", r"'all'|one position"),
)
add(
    "through_head(pos=None)",
    lambda e: e.P1.through_head(1, 2, PARIS, pos=None),
    Err("PositionError", r"None"),
)
add(
    "through_head(heads='10')",
    lambda e: e.P1.through_head(1, 2, PARIS, heads="10"),
    Err("ArgumentError", r"'10'"),
)
add(
    "through_head(0, 1, neurons=[1]): a later layer feeds nothing",
    lambda e: e.P1.through_head(0, 1, PARIS, neurons=[1]).check(),
    (OK(v_head_term(0, 1)), Err("ArgumentError", r"layer 1|before|earlier")),
)
add(
    "through_neuron(1, 7)",
    lambda e: e.P1.through_neuron(1, 7, PARIS).check(),
    OK(v_neuron_term(1, 7)),
)
add(
    "through_neuron(0, 100)",
    lambda e: e.P1.through_neuron(0, 100, PARIS).check(),
    OK(v_neuron_term(0, 100)),
)
add(
    "through_neuron(1, 512): out of range",
    lambda e: e.P1.through_neuron(1, D_MLP, PARIS),
    Err("ArgumentError", r"512.*out of range.*0\.\.511"),
)
add(
    "through_neuron(1, 7.0)",
    lambda e: e.P1.through_neuron(1, 7.0, PARIS),
    Err("ArgumentError", r"7\.0|float"),
)
add(
    "through_neuron(1, np.int64(7))",
    lambda e: e.P1.through_neuron(1, np.int64(7), PARIS).check(),
    OK(v_neuron_term(1, 7)),
)
add(
    "through_neuron(1, torch.tensor(7))",
    lambda e: e.P1.through_neuron(1, torch.tensor(7), PARIS).check(),
    OK(v_neuron_term(1, 7)),
)
add(
    "through_neuron(1, torch.tensor(7.9))",
    lambda e: e.P1.through_neuron(1, torch.tensor(7.9), PARIS),
    Err("ArgumentError", r"7\.9|float"),
)
add(
    "chain: head then neuron",
    lambda e: e.P1.chain(PARIS, [tp.Hop("head", 1, 2, src=3), tp.Hop("neuron", 0, 100)]).check(),
    OK(
        v_true(
            lambda r, e: _close(
                float(r.total()[0, 0, 0]),
                float(
                    e.P1.through_head(1, 2, PARIS, src=3, neurons=[0])
                    .select(kind="neuron", neuron=100)
                    .total()[0, 0, 0]
                ),
                1e-4,
            ),
            "not the neuron's share of the head term",
        )
    ),
)
add(
    "chain: hops as tuples",
    lambda e: e.P1.chain(PARIS, [("head", 1, 2, 3)]).check(),
    (
        OK(
            v_true(
                lambda r, e: _close(
                    float(r.total()[0, 0, 0]),
                    float(e.H1.select(layer=1, head=2, src=3).total()[0, 0, 0]),
                    1e-4,
                ),
                "wrong",
            )
        ),
        Err("ArgumentError", r"Hop"),
    ),
)
add("chain: empty path", lambda e: e.P1.chain(PARIS, []), Err("ArgumentError", r"empty"))
add(
    "chain: a Hop, not a list",
    lambda e: e.P1.chain(PARIS, tp.Hop("head", 1, 2)),
    Err("ArgumentError", r"list"),
)
add("chain: a string path", lambda e: e.P1.chain(PARIS, "L1H2"), Err("ArgumentError", r"Hop|list"))
add(
    "chain: first head hop without src",
    lambda e: e.P1.chain(PARIS, [tp.Hop("head", 1, 2), tp.Hop("neuron", 0, 1)]),
    Err("ArgumentError", r"src"),
)
add(
    "chain: second hop in a later layer",
    lambda e: e.P1.chain(PARIS, [tp.Hop("head", 0, 1, src=2), tp.Hop("head", 1, 2)]),
    Err("ArgumentError", r"does not write|earlier|before"),
)
add(
    "chain: two neurons of one layer",
    lambda e: e.P1.chain(PARIS, [tp.Hop("neuron", 1, 5), tp.Hop("neuron", 1, 6)]),
    Err("ArgumentError", r"does not write|earlier|before"),
)
add(
    "chain: src out of range",
    lambda e: e.P1.chain(PARIS, [tp.Hop("head", 1, 2, src=9)]),
    Err("PositionError", r"9.*out of range"),
)
add(
    "chain: pos='all'",
    lambda e: e.P1.chain(PARIS, [tp.Hop("head", 1, 2)], pos="all"),
    Err("PositionError", r"'all'|one position"),
)
add("Hop('attn', 1, 2)", lambda e: tp.Hop("attn", 1, 2), Err("ArgumentError", r"'attn'.*'head'"))
add("Hop('head', 1.0, 2)", lambda e: tp.Hop("head", 1.0, 2), Err("ArgumentError", r"1\.0|float"))
add("Hop('head', 1, True)", lambda e: tp.Hop("head", 1, True), Err("ArgumentError", r"True|bool"))
add(
    "Hop('neuron', 1, 2, src=3)",
    lambda e: tp.Hop("neuron", 1, 2, src=3),
    Err("ArgumentError", r"src"),
)
add("Hop('head', '1', 2)", lambda e: tp.Hop("head", "1", 2), Err("ArgumentError", r"'1'"))

# --------------------------------------------------------------------------- readout
area("readout")
add(
    "readout(u, 1, at='ln1')",
    lambda e: e.P1.readout(U(), 1, at="ln1"),
    OK(v_readout(1, "ln1", U())),
)
add(
    "readout(u, 0, at='resid_post')",
    lambda e: e.P1.readout(U(), 0, at="resid_post"),
    OK(v_readout(0, "resid_post", U())),
)
add(
    "readout(u, 1, at='ln_final')",
    lambda e: e.P1.readout(U(), 1, at="ln_final"),
    OK(v_readout(1, "ln_final", U())),
)
add(
    "readout([2, d_model], 1, bias=1.5)",
    lambda e: e.P1.readout(U(D_MODEL, 0, 2, D_MODEL), 1, bias=1.5),
    OK(v_readout(1, "ln1", U(D_MODEL, 0, 2, D_MODEL), bias=1.5)),
)
add(
    "readout(at='ln3')",
    lambda e: e.P1.readout(U(), 1, at="ln3"),
    Err("ArgumentError", r"'ln3'.*'ln1'"),
)
add("readout(at=None)", lambda e: e.P1.readout(U(), 1, at=None), Err("ArgumentError", r"at"))
add(
    "readout(u of 64 dims)",
    lambda e: e.P1.readout(U(64), 1),
    Err("ArgumentError", r"64.*128|d_model"),
)
add(
    "readout(u 3-D)",
    lambda e: e.P1.readout(U(D_MODEL, 0, 1, 2, D_MODEL), 1),
    Err("ArgumentError", r"\[d_model\]|\[k, d_model\]|shape|3-D"),
    note="issue 9: raw error",
)
add(
    "readout(u 0-D)",
    lambda e: e.P1.readout(torch.tensor(1.0), 1),
    Err("ArgumentError", r"d_model|shape"),
)
add(
    "readout(u with NaN)",
    lambda e: e.P1.readout(torch.full((D_MODEL,), float("nan")), 1),
    Err("NonFiniteError", r"NaN|finite"),
)
add(
    "readout(u of ints)",
    lambda e: e.P1.readout(torch.ones(D_MODEL, dtype=torch.long), 1),
    (OK(v_readout(1, "ln1", torch.ones(D_MODEL))), Err("ArgumentError", r"float")),
)
add(
    "readout(u as a list)",
    lambda e: e.P1.readout([0.1] * D_MODEL, 1),
    (OK(v_readout(1, "ln1", torch.full((D_MODEL,), 0.1))), Err("ArgumentError", r"tensor|list")),
)
add("readout(layer=1.0)", lambda e: e.P1.readout(U(), 1.0), Err("ArgumentError", r"1\.0|float"))
add(
    "readout(layer=5)",
    lambda e: e.P1.readout(U(), 5),
    Err("ArgumentError", r"5.*out of range.*0\.\.1"),
)
add("readout(layer='1')", lambda e: e.P1.readout(U(), "1"), Err("ArgumentError", r"'1'"))
add("readout(layer=True)", lambda e: e.P1.readout(U(), True), Err("ArgumentError", r"True|bool"))
add(
    "readout(at='ln_final', layer=0)",
    lambda e: e.P1.readout(U(), 0, at="ln_final"),
    Err("ArgumentError", r"ln_final.*layer"),
)
add("readout(bias='x')", lambda e: e.P1.readout(U(), 1, bias="x"), Err("ArgumentError", r"bias"))
add(
    "readout(bias=nan)",
    lambda e: e.P1.readout(U(), 1, bias=float("nan")),
    Err("NonFiniteError", r"bias|NaN|finite"),
)
add(
    "readout(bias of 3 for k=1)",
    lambda e: e.P1.readout(U(), 1, bias=torch.zeros(3)),
    Err("ArgumentError", r"bias"),
)
add("readout(pos=None)", lambda e: e.P1.readout(U(), 1, pos=None), Err("PositionError", r"None"))
add(
    "readout(pos=2.5)", lambda e: e.P1.readout(U(), 1, pos=2.5), Err("PositionError", r"2\.5|float")
)
add("readout(pos=3)", lambda e: e.P1.readout(U(), 1, pos=3), OK(v_readout(1, "ln1", U(), pos=3)))

# --------------------------------------------------------------------------- Decomposition
area("Decomposition")
add("check()", lambda e: e.H1.check(), OK(v_logits("F1", [PARIS])))
add("check(atol=1e-3, rtol=0)", lambda e: e.H1.check(atol=1e-3, rtol=0), OK())
add("check(atol=-1)", lambda e: e.H1.check(atol=-1), Err("ArgumentError", r"atol"))
add("check(atol='0.1')", lambda e: e.H1.check(atol="0.1"), Err("ArgumentError", r"atol"))
add("check(atol=True)", lambda e: e.H1.check(atol=True), Err("ArgumentError", r"atol"))
add("check(rtol=nan)", lambda e: e.H1.check(rtol=float("nan")), Err("ArgumentError", r"rtol"))
add(
    "check() on terms shifted by 1",
    lambda e: __import__("dataclasses").replace(e.H1, values=e.H1.values + 1.0).check(),
    Err("CompletenessError", r"miss"),
)
add(
    "check() on a NaN term",
    lambda e: (
        __import__("dataclasses")
        .replace(e.H1, values=e.H1.values.clone().index_fill_(-1, torch.tensor([0]), float("nan")))
        .check()
    ),
    Err("NonFiniteError", r"NaN|finite"),
)
add(
    "check() on a selection",
    lambda e: e.H1.select(layer=0).check(),
    Err("CompletenessError", r"selection"),
)
add(
    "top(5)",
    lambda e: e.H1.top(5),
    OK(
        v_true(
            lambda df, e: len(df) == 5 and df["value"].abs().is_monotonic_decreasing,
            "not the 5 largest",
        )
    ),
)
add(
    "top(0)",
    lambda e: e.H1.top(0),
    (OK(v_true(lambda df, e: len(df) == 0, "rows")), Err("ArgumentError", r"k")),
)
add("top(-1)", lambda e: e.H1.top(-1), Err("ArgumentError", r"k.*-1|-1"))
add("top(2.5)", lambda e: e.H1.top(2.5), Err("ArgumentError", r"2\.5|float"))
add("top(True)", lambda e: e.H1.top(True), Err("ArgumentError", r"True|bool"))
add("top('5')", lambda e: e.H1.top("5"), Err("ArgumentError", r"'5'"))
add(
    "top(kind='head')",
    lambda e: e.H1.top(3, kind="head"),
    OK(v_true(lambda df, e: set(df["kind"]) == {"head"}, "other kinds")),
)
add(
    "top(kind='heads')",
    lambda e: e.H1.top(3, kind="heads"),
    Err("ArgumentError", r"'heads'.*'head'"),
)
add(
    "top(batch=3) on batch 1",
    lambda e: e.H1.top(3, batch=3),
    (Err("ArgumentError", r"batch.*3"), Err("PositionError", r"batch.*3")),
)
add(
    "top(batch=0.5)",
    lambda e: e.H1.top(3, batch=0.5),
    (Err("ArgumentError", r"0\.5|float"), Err("PositionError", r"0\.5|float")),
)
add(
    "top(pos=4) with one explained position",
    lambda e: e.H1.top(3, pos=4),
    (Err("ArgumentError", r"pos.*4"), Err("PositionError", r"pos.*4")),
)
add(
    "top(target=1) with one target",
    lambda e: e.H1.top(3, target=1),
    (Err("ArgumentError", r"target.*1"), Err("TargetError", r"target.*1")),
)
add(
    "top(target=' Paris')",
    lambda e: e.H1.top(3, target=" Paris"),
    (
        OK(v_true(lambda df, e: len(df) == 3, "rows")),
        Err("ArgumentError", r"target"),
        Err("TargetError", r"target"),
    ),
)
add(
    "select(layer=1, head=2)",
    lambda e: e.H1.select(layer=1, head=2),
    OK(
        v_true(
            lambda r, e: (
                len(r.components) == N_CTX and set(map(str, r.components)) >= {"L1H2[src 0]"}
            ),
            "not head L1H2's terms",
        )
    ),
)
add(
    "select(kind='head')",
    lambda e: e.H1.select(kind="head"),
    OK(v_true(lambda r, e: len(r.components) == N_LAYERS * N_HEADS * N_CTX, "count")),
)
add(
    "select(layer=[0, 1])",
    lambda e: e.H1.select(layer=[0, 1]),
    OK(v_true(lambda r, e: len(r.components) > 0, "empty")),
)
add(
    "select(layer=lambda l: l > 0)",
    lambda e: e.H1.select(layer=lambda l: l > 0),
    OK(v_true(lambda r, e: set(r.components.layer.tolist()) == {1}, "layers")),
)
add(
    "select(kind='heads')",
    lambda e: e.H1.select(kind="heads"),
    Err("ArgumentError", r"'heads'.*'head'"),
    note="issue 9: selects nothing",
)
add(
    "select(head='2')",
    lambda e: e.H1.select(head="2"),
    Err("ArgumentError", r"head.*'2'"),
    note="issue 9: selects nothing",
)
add("select(layer=1.0)", lambda e: e.H1.select(layer=1.0), Err("ArgumentError", r"1\.0|float"))
add("select(layer=True)", lambda e: e.H1.select(layer=True), Err("ArgumentError", r"True|bool"))
add("select(layer=None)", lambda e: e.H1.select(layer=None), Err("ArgumentError", r"None"))
add("select(src='3')", lambda e: e.H1.select(src="3"), Err("ArgumentError", r"src.*'3'"))
add(
    "select(heads=1): unknown field",
    lambda e: e.H1.select(heads=1),
    Err("ArgumentError", r"'heads'.*(head|layer)"),
)
add(
    "select(kind=['head', 'mlpp'])",
    lambda e: e.H1.select(kind=["head", "mlpp"]),
    Err("ArgumentError", r"'mlpp'"),
)
add(
    "aggregate('layer', 'head')",
    lambda e: e.H1.aggregate("layer", "head").check(),
    OK(v_same_total("H1")),
)
add("aggregate()", lambda e: e.H1.aggregate().check(), OK(v_same_total("H1")))
add("aggregate('heads')", lambda e: e.H1.aggregate("heads"), Err("ArgumentError", r"'heads'"))
add("aggregate(1)", lambda e: e.H1.aggregate(1), Err("ArgumentError", r"1"))
add(
    "aggregate(['layer'])", lambda e: e.H1.aggregate(["layer"]), Err("ArgumentError", r"layer|list")
)
add("to_frame()", lambda e: e.H1.to_frame(), OK(v_frame))
add(
    "to_frame() of a selection",
    lambda e: e.H1.select(layer=1).to_frame(),
    OK(v_true(lambda df, e: set(df["layer"]) == {1}, "layers")),
)
add(
    "constants",
    lambda e: e.H1.constants,
    OK(v_true(lambda r, e: len(r.components) >= 1 and not r.complete, "no constants")),
)
add(
    "repr and _repr_html_",
    lambda e: (repr(e.H1), e.H1._repr_html_()),
    OK(v_true(lambda r, e: "L1H" in r[0] and "<" in r[1], "empty")),
)

# --------------------------------------------------------------------------- weights
area("tlprisms.weights")
add(
    "ov_map(1, 2, countries, capitals)",
    lambda e: tp.weights.ov_map(e.M, 1, 2, [" France", " Japan"], [" Paris", " Tokyo"]),
    OK(
        v_true(
            lambda m, e: tuple(m.values.shape) == (2, 2) and bool(torch.isfinite(m.values).all()),
            "shape",
        )
    ),
)
add(
    "ov_map(layer=2)",
    lambda e: tp.weights.ov_map(e.M, 2, 0, [" France"], [" Paris"]),
    Err("ArgumentError", r"2.*out of range"),
)
add(
    "ov_map(layer=1.0)",
    lambda e: tp.weights.ov_map(e.M, 1.0, 0, [" France"], [" Paris"]),
    Err("ArgumentError", r"1\.0|float"),
)
add(
    "ov_map(layer=True)",
    lambda e: tp.weights.ov_map(e.M, True, 0, [" France"], [" Paris"]),
    Err("ArgumentError", r"True|bool"),
)
add(
    "ov_map(head=4)",
    lambda e: tp.weights.ov_map(e.M, 1, 4, [" France"], [" Paris"]),
    Err("ArgumentError", r"4.*out of range"),
)
add(
    "ov_map(head='2')",
    lambda e: tp.weights.ov_map(e.M, 1, "2", [" France"], [" Paris"]),
    Err("ArgumentError", r"'2'"),
)
add(
    "ov_map(head=-1)",
    lambda e: tp.weights.ov_map(e.M, 1, -1, [" France"], [" Paris"]),
    (OK(), Err("ArgumentError", r"-1.*out of range")),
)
add(
    "ov_map(src=['Zebra'])",
    lambda e: tp.weights.ov_map(e.M, 1, 2, [" Zebra"], [" Paris"]),
    Err("TargetError", r"Zebra"),
)
add(
    "ov_map(src=' France') a string",
    lambda e: tp.weights.ov_map(e.M, 1, 2, " France", [" Paris"]),
    Err("TargetError", r"list"),
)
add(
    "ov_map(src=[])",
    lambda e: tp.weights.ov_map(e.M, 1, 2, [], [" Paris"]),
    Err("TargetError", r"empty"),
)
add(
    "ov_map(src=[1.5])",
    lambda e: tp.weights.ov_map(e.M, 1, 2, [1.5], [" Paris"]),
    Err("TargetError", r"1\.5|float"),
)
add(
    "ov_map(src=float tensor)",
    lambda e: tp.weights.ov_map(e.M, 1, 2, torch.tensor([10.0]), [" Paris"]),
    Err("TargetError", r"float|10\.0"),
)
add(
    "ov_map(dst=[' Paris Rome'])",
    lambda e: tp.weights.ov_map(e.M, 1, 2, [" France"], [" Paris Rome"]),
    Err("TargetError", r"2 tokens"),
)
add(
    "ov_map(dst=[999])",
    lambda e: tp.weights.ov_map(e.M, 1, 2, [" France"], [999]),
    Err("TargetError", r"999"),
)
add(
    "ov_map(not a model)",
    lambda e: tp.weights.ov_map(e.C1, 1, 2, [" France"], [" Paris"]),
    Err("UnsupportedModelError", r"TransformerLens"),
)
add(
    "neuron_templates(1, [5, 6], digits)",
    lambda e: tp.weights.neuron_templates(e.M, 1, [5, 6], ["1", "2", "3"]),
    OK(v_true(lambda m, e: tuple(m.values.shape) == (2, 3), "shape")),
)
add(
    "neuron_templates(neurons=[512])",
    lambda e: tp.weights.neuron_templates(e.M, 1, [D_MLP], ["1"]),
    Err("ArgumentError", r"512.*out of range"),
)
add(
    "neuron_templates(neurons=[5.5])",
    lambda e: tp.weights.neuron_templates(e.M, 1, [5.5], ["1"]),
    Err("ArgumentError", r"5\.5|float"),
)
add(
    "neuron_templates(neurons=[True])",
    lambda e: tp.weights.neuron_templates(e.M, 1, [True], ["1"]),
    Err("ArgumentError", r"True|bool"),
)
add(
    "neuron_templates(neurons=5)",
    lambda e: tp.weights.neuron_templates(e.M, 1, 5, ["1", "2"]),
    (
        OK(v_true(lambda m, e: tuple(m.values.shape) == (1, 2), "shape")),
        Err("ArgumentError", r"neurons"),
    ),
)
add(
    "neuron_templates(neurons='5')",
    lambda e: tp.weights.neuron_templates(e.M, 1, "5", ["1"]),
    Err("ArgumentError", r"'5'"),
)
add(
    "neuron_templates(neurons=[])",
    lambda e: tp.weights.neuron_templates(e.M, 1, [], ["1"]),
    Err("ArgumentError", r"neuron"),
)
add(
    "neuron_templates(layer=2)",
    lambda e: tp.weights.neuron_templates(e.M, 2, [5], ["1"]),
    Err("ArgumentError", r"2.*out of range"),
)
add(
    "neuron_templates(activations of 3 for 2)",
    lambda e: tp.weights.neuron_templates(e.M, 1, [5, 6], ["1"], activations=torch.ones(3)),
    Err("ArgumentError", r"3.*2"),
)
add(
    "neuron_templates(activations with NaN)",
    lambda e: tp.weights.neuron_templates(
        e.M, 1, [5, 6], ["1"], activations=torch.tensor([1.0, float("nan")])
    ),
    Err("NonFiniteError", r"activations|NaN"),
)
add(
    "neuron_templates(tokens=['Zebra'])",
    lambda e: tp.weights.neuron_templates(e.M, 1, [5], [" Zebra"]),
    Err("TargetError", r"Zebra"),
)
add(
    "unembed_map(digits)",
    lambda e: tp.weights.unembed_map(e.M, [str(d) for d in range(10)]),
    OK(v_true(lambda m, e: tuple(m.points.shape) == (10, 2), "shape")),
)
add(
    "unembed_map(2 tokens)",
    lambda e: tp.weights.unembed_map(e.M, ["1", "2"]),
    (Err("TargetError", r"3"), Err("ArgumentError", r"3")),
)
add(
    "unembed_map('123') a string",
    lambda e: tp.weights.unembed_map(e.M, "123"),
    Err("TargetError", r"list"),
)
add(
    "TokenMap.top(row='nope')",
    lambda e: tp.weights.ov_map(e.M, 1, 2, [" France"], [" Paris"]).top("nope"),
    Err("ArgumentError", r"'nope'"),
)
add(
    "TokenMap.top(k=0)",
    lambda e: tp.weights.ov_map(e.M, 1, 2, [" France"], [" Paris"]).top(0, k=0),
    (OK(), Err("ArgumentError", r"k")),
)
add(
    "TokenMap.weighted_sum(3 weights for 2 rows)",
    lambda e: tp.weights.neuron_templates(e.M, 1, [5, 6], ["1"]).weighted_sum(torch.ones(3)),
    Err("ArgumentError", r"3.*2"),
)

# --------------------------------------------------------------------------- explain_task
area("explain_task")
_TASK = (["The capital of France is", "7+2="], [" Paris", " 9"])


def _v_task(res: Any, e: Env) -> Optional[str]:
    for i, (p, a) in enumerate(zip(*_TASK)):
        L = e.M(e.M.to_tokens(p))[0, -1]
        want = float(L[e.M.to_single_token(a.strip())])
        if not _close(float(res.logits[i]), want, 1e-4) or not _close(
            float(res.values[i].sum()), want, 1e-4
        ):
            return f"prompt {i}: {float(res.logits[i]):.6g} vs the model's {want:.6g}"
    return None


add(
    "explain_task: prompts of different lengths",
    lambda e: tp.explain_task(e.M, *_TASK).check(),
    OK(_v_task),
)
add(
    "explain_task: fewer answers",
    lambda e: tp.explain_task(e.M, _TASK[0], _TASK[1][:1]),
    Err("ArgumentError", r"2 prompts.*1 answer"),
)
add(
    "explain_task: no prompts",
    lambda e: tp.explain_task(e.M, [], []),
    Err("ArgumentError", r"prompt"),
)
add(
    "explain_task: prompts as one string",
    lambda e: tp.explain_task(e.M, "The capital of France is", [" Paris"]),
    Err("ArgumentError", r"string|list"),
)
add(
    "explain_task: batch_size=0",
    lambda e: tp.explain_task(e.M, *_TASK, batch_size=0),
    Err("ArgumentError", r"batch_size"),
)
add(
    "explain_task: batch_size=1.5",
    lambda e: tp.explain_task(e.M, *_TASK, batch_size=1.5),
    Err("ArgumentError", r"batch_size"),
)
add(
    "explain_task: batch_size=True",
    lambda e: tp.explain_task(e.M, *_TASK, batch_size=True),
    Err("ArgumentError", r"batch_size"),
)
add(
    "explain_task: unknown answer word",
    lambda e: tp.explain_task(e.M, _TASK[0], [" Paris", " Zebra"]),
    Err("TargetError", r"Zebra"),
)
add(
    "explain_task: multi-token answer",
    lambda e: tp.explain_task(e.M, _TASK[0], [" Paris", " 9 9"]),
    Err("TargetError", r"2 tokens"),
)
add(
    "explain_task: heads='10'",
    lambda e: tp.explain_task(e.M, *_TASK, heads="10"),
    Err("ArgumentError", r"'10'"),
)
add(
    "explain_task: model in train mode with dropout",
    lambda e: tp.explain_task(e.G_train, ["Paris is", "Rome is"], [" a", " a"]),
    Err("UnsupportedModelError", r"eval\(\)"),
)
add(
    "TaskResult.summary()",
    lambda e: tp.explain_task(e.M, *_TASK).summary(),
    OK(v_true(lambda df, e: len(df) > 0 and "mean" in df.columns, "empty summary")),
)
add(
    "TaskResult.check(atol=-1)",
    lambda e: tp.explain_task(e.M, *_TASK).check(atol=-1),
    Err("ArgumentError", r"atol"),
)

# --------------------------------------------------------------------------- needed_hooks
area("needed_hooks")
add(
    "needed_hooks(model)",
    lambda e: tp.needed_hooks(e.M),
    OK(
        v_true(
            lambda f, e: f("blocks.1.attn.hook_pattern") and not f("blocks.1.attn.hook_q"), "names"
        )
    ),
)
add(
    "needed_hooks(model, ('residual',)) keeps provenance hooks",
    lambda e: tp.needed_hooks(e.M, ("residual",)),
    OK(
        v_true(
            lambda f, e: (
                f("blocks.0.hook_resid_pre") and f("blocks.0.attn.hook_v") and f("hook_embed")
            ),
            "drops blocks.0.hook_resid_pre / blocks.0.attn.hook_v: provenance cannot be checked",
        )
    ),
    note="issue 9",
)
add(
    "needed_hooks(model, 'residual') a string",
    lambda e: tp.needed_hooks(e.M, "residual"),
    Err("ArgumentError", r"'residual'.*tuple|parts"),
)
add(
    "needed_hooks(model, ('resid',))",
    lambda e: tp.needed_hooks(e.M, ("resid",)),
    Err("ArgumentError", r"'resid'"),
)
add(
    "needed_hooks(model, ())",
    lambda e: tp.needed_hooks(e.M, ()),
    (OK(), Err("ArgumentError", r"parts")),
)
add(
    "needed_hooks(not a model)",
    lambda e: tp.needed_hooks(e.C1),
    Err("UnsupportedModelError", r"TransformerLens"),
)

# --------------------------------------------------------------------------- render
area("tlprisms.render")
add(
    "to_html(result)",
    lambda e: tp.render.to_html(e.H1),
    OK(v_true(lambda h, e: "<svg" in h or "<div" in h, "no html")),
)
add("show(result)", lambda e: tp.render.show(e.R1), OK())
add("to_html(42)", lambda e: tp.render.to_html(42), Err("ArgumentError", r"cannot render.*int"))
add(
    "to_html(result, batch=5)",
    lambda e: tp.render.to_html(e.H1, batch=5),
    (Err("ArgumentError", r"batch.*5"), Err("PositionError", r"batch.*5")),
)
add(
    "to_html(result, pos=2.5)",
    lambda e: tp.render.to_html(e.H1, pos=2.5),
    (
        Err("ArgumentError", r"2\.5.*(float|integer)"),
        Err("PositionError", r"2\.5.*(float|integer)"),
    ),
)
add(
    "to_html(result, colour='red')",
    lambda e: tp.render.to_html(e.H1, colour="red"),
    Err("ArgumentError", r"colour"),
)
add("bars(result)", lambda e: tp.render.bars(e.R1), OK())
add("bars(result, k=-1)", lambda e: tp.render.bars(e.R1, k=-1), Err("ArgumentError", r"k"))
add("bars(result, k='5')", lambda e: tp.render.bars(e.R1, k="5"), Err("ArgumentError", r"'5'"))
add(
    "bars(result, order='x')",
    lambda e: tp.render.bars(e.R1, order="x"),
    Err("ArgumentError", r"order"),
)
add(
    "bars(result, batch=True)",
    lambda e: tp.render.bars(e.R1, batch=True),
    (Err("ArgumentError", r"bool|True.*integer"), Err("PositionError", r"bool|True.*integer")),
)
add(
    "bars(result, kind='heads')",
    lambda e: tp.render.bars(e.H1, kind="heads"),
    Err("ArgumentError", r"'heads'"),
)
add("bars(not a result)", lambda e: tp.render.bars(e.P1), Err("ArgumentError", r"Decomposition"))
add(
    "layer_head_heatmap(residual result)",
    lambda e: tp.render.layer_head_heatmap(e.R1),
    Err("ArgumentError", r"no head"),
)
add("layer_head_heatmap(heads result)", lambda e: tp.render.layer_head_heatmap(e.H1), OK())
add(
    "source_tokens(result, layers='10')",
    lambda e: tp.render.source_tokens(e.H1, layers="10"),
    Err("ArgumentError", r"'10'"),
)
add(
    "source_tokens(result, heads=[9])",
    lambda e: tp.render.source_tokens(e.H1, heads=[9]),
    Err("ArgumentError", r"9"),
)
add(
    "head_source_map(result, top=0)",
    lambda e: tp.render.head_source_map(e.H1, top=0),
    (OK(), Err("ArgumentError", r"top")),
)
add(
    "head_source_map(result, top=2.5)",
    lambda e: tp.render.head_source_map(e.H1, top=2.5),
    Err("ArgumentError", r"2\.5|top"),
)
add(
    "top_tokens(prism, L1H2)",
    lambda e: tp.render.top_tokens(e.P1, tp.Component("head", layer=1, head=2)),
    OK(v_true(lambda t, e: t.values.shape[0] == D_VOCAB, "not the vocabulary")),
)
add(
    "top_tokens(prism, 'L1H2')",
    lambda e: tp.render.top_tokens(e.P1, "L1H2"),
    Err("ArgumentError", r"Component"),
)
add(
    "top_tokens(prism, L5H0)",
    lambda e: tp.render.top_tokens(e.P1, tp.Component("head", layer=5, head=0)),
    Err("ArgumentError", r"layer.*5"),
)
add(
    "top_tokens(prism, L1H9)",
    lambda e: tp.render.top_tokens(e.P1, tp.Component("head", layer=1, head=9)),
    Err("ArgumentError", r"head.*9"),
)
add(
    "top_tokens(pos=2.5)",
    lambda e: tp.render.top_tokens(e.P1, tp.Component("head", layer=1, head=2), pos=2.5),
    Err("PositionError", r"2\.5|float"),
)
add(
    "top_tokens(batch=True)",
    lambda e: tp.render.top_tokens(e.P1, tp.Component("head", layer=1, head=2), batch=True),
    (Err("ArgumentError", r"bool|True.*integer"), Err("PositionError", r"bool|True.*integer")),
)
add(
    "top_tokens(k=-1)",
    lambda e: tp.render.top_tokens(e.P1, tp.Component("head", layer=1, head=2), k=-1),
    Err("ArgumentError", r"k"),
)
add(
    "top_tokens(a result, not the prism)",
    lambda e: tp.render.top_tokens(e.H1, tp.Component("head", layer=1, head=2)),
    Err("ArgumentError", r"LogitPrism"),
)
add("Report().add(42)", lambda e: tp.render.Report().add(42).html(), Err("ArgumentError", r"int"))
add(
    "Report.save into a file's 'directory'",
    lambda e: tp.render.Report().add(e.R1).save(Path(_tmpfile()) / "r.html"),
    (
        Err("ArgumentError", r"r\.html|directory|write"),
        Err("PrismError", r"r\.html|directory|write"),
    ),
)
add(
    "save_svg(widget)",
    lambda e: tp.render.save_svg(tp.render.source_tokens(e.H1), Path(tempfile.mkdtemp()) / "x.svg"),
    Err("ArgumentError", r"SVG"),
)
add(
    "save_svg(result)",
    lambda e: tp.render.save_svg(e.R1, Path(tempfile.mkdtemp()) / "x.svg"),
    OK(v_true(lambda p, e: Path(p).read_text().count("<svg") >= 1, "no svg")),
)
add(
    "heatmap_svg(1-D)",
    lambda e: tp.render.heatmap_svg(np.zeros(3), ["a"], ["b"]),
    Err("ArgumentError", r"2-D"),
)
add(
    "heatmap_svg(labels do not fit)",
    lambda e: tp.render.heatmap_svg(np.zeros((2, 2)), ["a"], ["b", "c"]),
    Err("ArgumentError", r"label"),
)
add(
    "heatmap_svg(NaN cell)",
    lambda e: tp.render.heatmap_svg(np.array([[1.0, np.nan]]), ["a"], ["b", "c"]),
    OK(),
)
add(
    "bar_svg(values and labels differ)",
    lambda e: tp.render.bar_svg([1.0, 2.0], ["a"]),
    Err("ArgumentError", r"label"),
)
add(
    "bar_svg(inf value)",
    lambda e: tp.render.bar_svg([1.0, float("inf")], ["a", "b"]),
    (OK(), Err("NonFiniteError", r"inf|finite")),
)
add(
    "lines_svg(highlight unknown)",
    lambda e: tp.render.lines_svg({"a": [1, 2]}, ["x", "y"], highlight="b"),
    Err("ArgumentError", r"highlight"),
)
add(
    "lines_svg(series too short)",
    lambda e: tp.render.lines_svg({"a": [1]}, ["x", "y"]),
    Err("ArgumentError", r"'a'.*1"),
)
add(
    "scatter_svg([n, 3])",
    lambda e: tp.render.scatter_svg(np.zeros((3, 3)), ["a", "b", "c"]),
    Err("ArgumentError", r"\[n, 2\]"),
)

# --------------------------------------------------------------------------- models
area("models: precision, mode, architecture")
add(
    "bf16 model: run + full().check()",
    lambda e: tp.LogitPrism.run(e.M_bf16, TEXT).full(PARIS).check(),
    OK(),
    note="issue 9: false alarm",
)
add(
    "fp16 model: run + residual().check()",
    lambda e: tp.LogitPrism.run(e.M_fp16, TEXT).residual(PARIS).check(),
    OK(),
)
add(
    "float64 model: run + heads().check()",
    lambda e: tp.LogitPrism.run(e.M_f64, TEXT).heads(PARIS).check(),
    OK(),
)
add(
    "float64 HF Gemma: run + residual().check()",
    lambda e: tp.LogitPrism.run(e.GEMMA64, torch.tensor([[1, 5, 6, 7, 8]])).residual(7).check(),
    OK(),
    note="issue 9: fails at float64 tolerance",
)
add(
    "bf16 model: through_head().check()",
    lambda e: tp.LogitPrism.run(e.M_bf16, TEXT).through_head(1, 2, PARIS).check(),
    OK(),
)
add(
    "bf16 model: check() of wrong terms",
    lambda e: (lambda r: __import__("dataclasses").replace(r, values=r.values * 1.5).check())(
        tp.LogitPrism.run(e.M_bf16, TEXT).residual(PARIS)
    ),
    Err("CompletenessError", r"miss"),
)
add(
    "float64 model: check() of wrong terms",
    lambda e: (lambda r: __import__("dataclasses").replace(r, values=r.values + 1e-3).check())(
        tp.LogitPrism.run(e.M_f64, TEXT).residual(PARIS)
    ),
    Err("CompletenessError", r"miss"),
)
add(
    "gpt2 in train mode with dropout: LogitPrism(...)",
    lambda e: (lambda out: tp.LogitPrism(e.G_train, out[1], logits=out[0]).residual(7))(
        e.G_train.run_with_cache(e.TG)
    ),
    Err("UnsupportedModelError", r"eval\(\)"),
    note="issue 9: completeness error",
)
add(
    "gpt2 in train mode with dropout: run",
    lambda e: tp.LogitPrism.run(e.G_train, e.TG).residual(7),
    Err("UnsupportedModelError", r"eval\(\)"),
)
add(
    "demo in train mode (no dropout)",
    lambda e: tp.LogitPrism.run(e.M_train, TEXT).residual(PARIS).check(),
    (OK(v_logits("F1", [PARIS])), Err("UnsupportedModelError", r"eval\(\)")),
)


def _no_compat(e: Env) -> Any:
    from transformer_lens.model_bridge.sources import build_bridge_from_module

    from tlprisms.demo import load_demo_hf_model

    hf, _ = load_demo_hf_model()
    bridge = build_bridge_from_module(hf, type(hf).__name__, hf_config=hf.config)
    return tp.LogitPrism(bridge, e.C1)


add("bridge without compatibility mode", _no_compat, Err("UnsupportedModelError", r"compatibility"))


def _moe(e: Env) -> Any:
    from families import tiny_moe

    bridge = tiny_moe()
    return tp.LogitPrism.run(bridge, torch.tensor([[1, 2, 3]]))


add(
    "mixture-of-experts model",
    _moe,
    Err("UnsupportedModelError", r"(?i)mixture.of.experts|Mixtral"),
)
add(
    "hooked demo: run + full().check()",
    lambda e: tp.LogitPrism.run(e.HK, TEXT).full(PARIS).check(),
    OK(v_logits("F1", [PARIS])),
    needs="hooked",
)
add(
    "hooked demo: pos=True",
    lambda e: tp.LogitPrism.run(e.HK, TEXT).residual(PARIS, pos=True),
    Err("PositionError", r"True|bool"),
    needs="hooked",
)
add(
    "hooked demo: cache of the bridge (same weights)",
    lambda e: tp.LogitPrism(e.HK, e.C1, tokens=e.T1).residual(PARIS).check(),
    (OK(v_logits("F1", [PARIS])), Err("CacheError", r"model")),
    needs="hooked",
)
add(
    "hooked demo: remove_batch_dim cache",
    lambda e: tp.LogitPrism(e.HK, fresh_cache(e.HK, e.T1, remove_batch_dim=True)),
    Err("CacheError", r"remove_batch_dim|batch (axis|dim)"),
    needs="hooked",
)
add(
    "hooked demo in float64: check()",
    lambda e: (
        tp.LogitPrism.run(
            __import__("tlprisms.demo", fromlist=["x"]).load_demo_model(
                kind="hooked", dtype=torch.float64
            ),
            TEXT,
        )
        .full(PARIS)
        .check()
    ),
    OK(),
    needs="hooked",
)
add(
    "hooked demo in bf16: check()",
    lambda e: (
        tp.LogitPrism.run(
            __import__("tlprisms.demo", fromlist=["x"]).load_demo_model(
                kind="hooked", dtype=torch.bfloat16
            ),
            TEXT,
        )
        .full(PARIS)
        .check()
    ),
    OK(),
    needs="hooked",
)
add(
    "hooked demo: twin cache (needed_hooks residual)",
    lambda e: tp.LogitPrism(e.HK, e.C_twin_res).residual(PARIS),
    Err("CacheError", r"model"),
    needs="hooked",
)


def _attn_only(e: Env) -> Any:
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=2,
        d_model=32,
        n_ctx=16,
        d_head=8,
        n_heads=4,
        d_vocab=60,
        attn_only=True,
        act_fn="gelu",
        normalization_type="LN",
        seed=0,
    )
    return tp.LogitPrism.run(HookedTransformer(cfg).eval(), torch.tensor([[1, 2, 3]]))


add(
    "attn-only model: through_neuron",
    lambda e: _attn_only(e).through_neuron(1, 0, 7),
    Err("ArgumentError", r"attention-only|no neurons|no MLP"),
    needs="hooked",
)
add(
    "attn-only model: readout(at='ln2')",
    lambda e: _attn_only(e).readout(torch.ones(32), 1, at="ln2"),
    Err("ArgumentError", r"no MLP|ln2"),
    needs="hooked",
)

# --------------------------------------------------------------------------- command line
area("command line")
_EX = ("explain", "--model", "demo", "--prompt", TEXT)
add(
    "cli: explain ' Paris'",
    lambda e: cli(*_EX, "--target", " Paris"),
    OK(v_true(lambda r, e: r.code == 0 and "completeness gap" in r.out, "failed")),
)
add(
    "cli: unknown word",
    lambda e: cli(*_EX, "--target", " Zebra"),
    Err("exit", r"Zebra.*(vocabulary|unknown)"),
)
add(
    "cli: two-word target", lambda e: cli(*_EX, "--target", " Paris Rome"), Err("exit", r"2 tokens")
)
add(
    "cli: --pos 99",
    lambda e: cli(*_EX, "--target", " Paris", "--pos", "99"),
    Err("exit", r"99.*out of range"),
)
add(
    "cli: --pos 2.5",
    lambda e: cli(*_EX, "--target", " Paris", "--pos", "2.5"),
    Err("exit", r"--pos|2\.5"),
)
add(
    "cli: --model no/such-model (offline)",
    lambda e: cli("explain", "--model", "no/such-model", "--prompt", TEXT, "--target", " Paris"),
    Err("exit", r"no/such-model"),
)
add(
    "cli: --device nonsense",
    lambda e: cli(*_EX, "--target", " Paris", "--device", "nonsense"),
    Err("exit", r"device|nonsense"),
)
add(
    "cli: --out under a file",
    lambda e: cli(*_EX, "--target", " Paris", "--out", str(Path(_tmpfile()) / "r.html")),
    Err("exit", r"r\.html|directory|write"),
)
add(
    "cli: empty --target",
    lambda e: cli(*_EX, "--target", ""),
    Err("exit", r"target|no token|empty"),
)
add("cli: missing --target", lambda e: cli(*_EX), Err("exit", r"--target"))
add("cli: unknown command", lambda e: cli("explian"), Err("exit", r"explian|choose"))
add("cli: no command", lambda e: cli(), Err("exit", r"command|required"))


# =========================================================================== running
def _matches(exc: BaseException, alt: Err) -> tuple[bool, bool]:
    """(message matches, class matches the contract)."""
    msg = str(exc)
    ok_msg = re.search(alt.frag, msg, re.S | re.I) is not None
    cls = getattr(tperrors, alt.cls, tp.PrismError)
    return ok_msg, isinstance(exc, cls)


def classify_cli(run: CliRun, expect: tuple) -> tuple[str, str, str]:
    errs = [a for a in expect if isinstance(a, Err)]
    if run.code == 0:
        if any(isinstance(a, Ok) for a in expect):
            return "", "", ""
        return "silent", f"exit 0; stdout {run.out.strip()[-120:]!r}", ""
    if not errs:
        return "unclear", f"exit {run.code}: {run.err.strip()[-200:]!r}", ""
    lines = [line for line in run.err.strip().splitlines() if line.strip()]
    error_lines = [line for line in lines if "error" in line.lower()]
    if "Traceback" in run.err:
        return "unclear", f"traceback: {lines[-1][:200] if lines else ''}", ""
    if len(error_lines) == 1 and any(re.search(a.frag, error_lines[0], re.I) for a in errs):
        return "clear", error_lines[0][:200], ""
    return "unclear", f"exit {run.code}: {' | '.join(lines)[-240:]!r}", ""


def run_probe(p: Probe, env: Env) -> Outcome:
    expect = p.expect if isinstance(p.expect, tuple) else (p.expect,)
    is_cli = any(isinstance(a, Err) and a.cls == "exit" for a in expect) or p.id.startswith("cli:")
    before = env.fingerprint()
    grad = torch.is_grad_enabled()
    t0 = time.time()
    result: Any = None
    exc: Optional[BaseException] = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            result = p.fn(env)
        except Exception as err:  # noqa: BLE001 - classified below
            exc = err
    seconds = time.time() - t0
    torch.set_grad_enabled(grad)
    after = env.fingerprint()
    changed = [k for k in before if before[k] != after.get(k)]
    if changed:
        return Outcome(p, "silent", f"modified the user's {', '.join(changed)}", seconds=seconds)
    if is_cli and exc is None:
        if isinstance(result, CliRun):
            out, detail, flag = classify_cli(result, expect)
            if out:
                return Outcome(p, out, detail, flag, seconds)
        # expected ok: fall through to the verifier
    if exc is not None:
        if is_cli:
            return Outcome(
                p, "unclear", f"traceback: {type(exc).__name__}: {str(exc)[:200]}", seconds=seconds
            )
        msg = f"{type(exc).__name__}: {str(exc)}"
        short = msg if len(msg) <= 260 else msg[:257] + "..."
        errs = [a for a in expect if isinstance(a, Err)]
        for alt in errs:
            ok_msg, ok_cls = _matches(exc, alt)
            if ok_msg and ok_cls:
                return Outcome(p, "clear", short, seconds=seconds)
        if isinstance(exc, tp.PrismError):
            for alt in errs:
                ok_msg, _ = _matches(exc, alt)
                if ok_msg:
                    want = " or ".join(a.cls for a in errs)
                    return Outcome(
                        p, "clear", short, f"class {type(exc).__name__}, contract {want}", seconds
                    )
        return Outcome(p, "unclear", short, seconds=seconds)
    oks = [a for a in expect if isinstance(a, Ok)]
    if not oks:
        shown = repr(result)
        shown = shown.splitlines()[0][:160] if shown else ""
        return Outcome(p, "silent", f"returned {shown}", seconds=seconds)
    reasons = []
    for alt in oks:
        if alt.verify is None:
            return Outcome(p, "ok", seconds=seconds)
        try:
            with torch.no_grad():
                why = alt.verify(result, env)
        except Exception as err:  # noqa: BLE001 - a verifier that cannot read the result
            why = f"result unreadable: {type(err).__name__}: {str(err)[:160]}"
        if not why:
            return Outcome(p, "ok", seconds=seconds)
        reasons.append(why)
    if all(why.startswith(FALSE_ALARM) for why in reasons):
        return Outcome(
            p, "unclear", "; ".join(why[len(FALSE_ALARM) :] for why in reasons), seconds=seconds
        )
    return Outcome(p, "silent", "; ".join(reasons), seconds=seconds)


def expected_text(p: Probe) -> str:
    expect = p.expect if isinstance(p.expect, tuple) else (p.expect,)
    parts = []
    for a in expect:
        if isinstance(a, Ok):
            parts.append("a correct result")
        elif a.cls == "exit":
            parts.append(f"exit != 0, one line /{a.frag}/")
        else:
            parts.append(f"{a.cls} /{a.frag}/")
    return " or ".join(parts)


def main(argv: Optional[list] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="run the probes whose id contains this")
    ap.add_argument("--all", action="store_true", help="list every probe, not only the failures")
    ap.add_argument("--verbose", action="store_true", help="with --all: what each probe gave")
    ap.add_argument("--label", default="", help="a line printed first (e.g. the commit probed)")
    args = ap.parse_args(argv)

    import importlib.metadata as md

    tl_version = md.version("transformer_lens")
    hooked = has_hooked()
    env = Env()
    probes = [p for p in PROBES if args.only in p.id]
    if args.label:
        print(args.label)
    print(f"tlprisms {getattr(tp, '__version__', '?')} from {Path(tp.__file__).parent}")
    print(f"TransformerLens {tl_version}, torch {torch.__version__}; HookedTransformer: {hooked}")
    results: list[Outcome] = []
    t0 = time.time()
    for p in probes:
        if p.needs == "hooked" and not hooked:
            continue
        try:
            results.append(run_probe(p, env))
        except Exception as err:  # noqa: BLE001 - the harness itself failed (e.g. a model builder)
            results.append(Outcome(p, "unclear", f"HARNESS: {type(err).__name__}: {err}"))
            traceback.print_exc()
    counts = {k: sum(r.outcome == k for r in results) for k in ("ok", "clear", "unclear", "silent")}
    flagged = [r for r in results if r.flag]
    print(
        f"\n{len(results)} probes in {time.time() - t0:.0f} s: "
        + ", ".join(f"{k} {v}" for k, v in counts.items())
        + f"   (clear with another class than the contract's: {len(flagged)})"
    )
    by_area: dict[str, dict[str, int]] = {}
    for r in results:
        by_area.setdefault(r.probe.area, {k: 0 for k in counts})[r.outcome] += 1
    print("\nper area:        " + "  ".join(f"{k:>7}" for k in counts))
    for name, c in by_area.items():
        print(f"  {name[:40]:<40} " + "  ".join(f"{c[k]:>7}" for k in counts))
    for kind in ("silent", "unclear"):
        rows = [r for r in results if r.outcome == kind]
        print(f"\n{kind.upper()} ({len(rows)}): probe -> what happened -> expected")
        for r in rows:
            note = f"  [{r.probe.note}]" if r.probe.note else ""
            print(
                f"- [{r.probe.area}] {r.probe.id}{note}\n    got:      {r.detail}\n    expected: {expected_text(r.probe)}"
            )
    print(f"\nCLEAR BUT ANOTHER CLASS ({len(flagged)})")
    for r in flagged:
        print(f"- {r.probe.id}: {r.flag}")
    if args.all:
        print("\nALL")
        for r in results:
            print(f"{r.outcome:>8} {r.seconds:6.2f}s  [{r.probe.area}] {r.probe.id}")
            if args.verbose and r.detail:
                print(f"{'':>18}{r.detail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
