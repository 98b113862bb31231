"""Survey: does tlprisms decompose every architecture TransformerLens can bridge exactly?

For every causal LM of ``tests/arch_zoo.py`` (TransformerLens's own list of supported
architectures, built as tiny random models offline), folded and unfolded: run the model on a
3 x 7 batch of random tokens, then every prism (residual, heads, neurons, full, through_head,
through_neuron, ``LogitPrism.run``) with ``check()``, and cross-check the chained results
against the terms they split. Each (architecture, fold) gets a verdict:

* ``exact``: every prism adds up to the model's own logits and the chains to their terms;
* ``refused``: some prism raised a tlprisms error (``PrismError``) before computing anything
  (whether its message is true is judged by hand: see the findings);
* ``WRONG``: a prism returned numbers that do not add up (``CompletenessError`` from
  ``check()``, or a chain that misses its term), or crashed with a non-tlprisms exception;
* ``broken-build``: TransformerLens (or transformers) could not build or run the tiny model;
* ``skip``: the zoo cannot build it here (no class in ``transformers``, no tiny config).

It also records, per model, the structural facts the prisms rely on (``--diag``): which of
the needed hooks exist, the module classes, and whether the recorded values satisfy the
identities of a standard block (``resid_post = resid_pre + attn_out + mlp_out``,
``z = pattern @ v``, ``attn_out = sum_h z_h W_O[h] + b_O``, ``hook_embed = W_E[tokens] * c``,
``logits = ln_final.hook_out @ W_U + b_U``, ...). Relative errors are ``max|a - b| / max|b|``.

Usage::

    HF_HUB_OFFLINE=1 python scripts/arch_survey.py [--only NAME ...] [--kinds decoder,moe]
        [--tlprisms DIR] [--out /tmp/arch_table.md] [--diag /tmp/arch_diag.json]
    HF_HUB_OFFLINE=1 python scripts/arch_survey.py --markdown docs/architectures.md

``--markdown FILE`` writes the per-family verdict table instead: the expectations of
``tests/test_architectures.py`` (``EXPECT``, ``BY_KIND``) beside what that test measures on
each architecture, folded and unfolded (the same build, calls and checks).

``--tlprisms DIR`` imports tlprisms from ``DIR`` (e.g. an export of another commit) instead
of this checkout.
"""

import argparse
import json
import os
import signal
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402

B, P, LO, HI = 3, 7, 4, 60
TARGET = 7
NEEDED = (
    "hook_embed",
    "ln_final.hook_scale",
    "blocks.{l}.hook_resid_pre",
    "blocks.{l}.hook_resid_mid",
    "blocks.{l}.hook_resid_post",
    "blocks.{l}.hook_attn_out",
    "blocks.{l}.hook_mlp_out",
    "blocks.{l}.attn.hook_pattern",
    "blocks.{l}.attn.hook_v",
    "blocks.{l}.attn.hook_z",
    "blocks.{l}.attn.hook_q",
    "blocks.{l}.attn.hook_k",
    "blocks.{l}.mlp.hook_pre",
    "blocks.{l}.mlp.hook_post",
    "blocks.{l}.ln1.hook_scale",
    "blocks.{l}.ln2.hook_scale",
)
OPTIONAL = (
    "hook_pos_embed",
    "blocks.{l}.mlp.hook_pre_linear",
    "blocks.{l}.ln1_post.hook_scale",
    "blocks.{l}.ln2_post.hook_scale",
    "blocks.{l}.attn.hook_rot_q",
    "blocks.{l}.attn.hook_rot_k",
    "blocks.{l}.attn.hook_attn_scores",
)


class _Timeout(Exception):
    pass


def _alarm(_sig, _frame):
    raise _Timeout("timed out")


def _msg(exc: BaseException, n: int = 400) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= n else text[: n - 3] + "..."


def _rel(a: Any, b: Any) -> Optional[float]:
    """max|a - b| / max|b| (None when a shape does not fit)."""
    try:
        a, b = a.detach().double(), b.detach().double()
        if a.shape != b.shape:
            return None
        return float((a - b).abs().max() / (b.abs().max() + 1e-12))
    except Exception:  # noqa: BLE001
        return None


def _fit_scale(a: Any, b: Any) -> tuple[Optional[float], Optional[float]]:
    """The c minimising |a - c b|, and the relative error left: (c, rel)."""
    try:
        a, b = a.detach().double(), b.detach().double()
        if a.shape != b.shape:
            return None, None
        c = float((a * b).sum() / ((b * b).sum() + 1e-30))
        return c, _rel(a, c * b)
    except Exception:  # noqa: BLE001
        return None, None


def _get(obj: Any, name: str) -> Any:
    try:
        return getattr(obj, name)
    except Exception:  # noqa: BLE001 - bias-free models raise AttributeError
        return None


def _r(x: Optional[float]) -> Optional[float]:
    return None if x is None else float(f"{x:.3g}")


def diagnose(model: Any, tokens: Any, logits: Any, cache: Any) -> dict:
    """Structural facts of one bridged model and its cache (see the module docstring)."""
    keys = set(cache.keys())
    n_layers = int(model.cfg.n_layers)
    d: dict[str, Any] = {
        "cfg": {
            k: _get(model.cfg, k)
            for k in (
                "normalization_type",
                "positional_embedding_type",
                "act_fn",
                "gated_mlp",
                "parallel_attn_mlp",
                "n_key_value_heads",
                "final_rms",
                "output_logits_soft_cap",
                "attn_scores_soft_cap",
                "use_normalization_before_and_after",
                "rotary_dim",
                "default_prepend_bos",
            )
        }
    }
    d["cfg"] = {
        k: (v if isinstance(v, (int, float, str, bool, type(None))) else str(v))
        for k, v in d["cfg"].items()
    }
    missing, present_opt = [], []
    for pat in NEEDED:
        for layer in [0] if "{l}" in pat else [None]:
            name = pat.format(l=layer)
            if name not in keys:
                missing.append(name)
    for pat in OPTIONAL:
        name = pat.format(l=0)
        if name in keys:
            present_opt.append(name)
    d["missing_hooks_L0"] = missing
    d["optional_hooks_L0"] = present_opt
    blk = model.blocks[0]
    d["modules"] = {
        n: type(_get(blk, n)).__name__
        for n in ("ln1", "ln2", "attn", "mlp", "ln1_post", "ln2_post")
        if _get(blk, n) is not None
    }
    d["modules"]["ln_final"] = type(_get(model, "ln_final")).__name__
    d["modules"]["embed"] = type(_get(model, "embed")).__name__
    hf_block = getattr(blk, "original_component", None)
    d["hf_block_children"] = (
        [f"{n}:{type(m).__name__}" for n, m in hf_block.named_children()]
        if hf_block is not None
        else None
    )
    attn = _get(blk, "attn")
    hf_attn = getattr(attn, "original_component", None)
    d["hf_attn_children"] = (
        [f"{n}:{type(m).__name__}" for n, m in hf_attn.named_children()]
        if hf_attn is not None
        else None
    )
    weights = {}
    for owner, names in (
        (attn, ("W_Q", "W_K", "W_V", "W_O", "b_V", "b_O")),
        (_get(blk, "mlp"), ("W_in", "W_gate", "W_out", "b_in", "b_out")),
        (model, ("W_E", "W_U", "b_U", "W_pos")),
    ):
        for name in names:
            w = _get(owner, name) if owner is not None else None
            weights[name] = list(w.shape) if isinstance(w, torch.Tensor) else None
    d["weights"] = weights

    ids: dict[str, Any] = {}
    c = cache
    # embeddings
    W_E = _get(model, "W_E")
    if "hook_embed" in keys and isinstance(W_E, torch.Tensor):
        scale, err = _fit_scale(c["hook_embed"], W_E[tokens])
        ids["embed=c*W_E[tok]"] = (_r(scale), _r(err))
    try:  # what the model's own embedding component gives for these tokens
        with torch.no_grad():
            ids["embed=model.embed(tok)"] = _r(_rel(model.embed(tokens), c["hook_embed"]))
    except Exception as exc:  # noqa: BLE001
        ids["embed=model.embed(tok)"] = f"{type(exc).__name__}"
    pre0 = c["blocks.0.hook_resid_pre"] if "blocks.0.hook_resid_pre" in keys else None
    if pre0 is not None and "hook_embed" in keys:
        emb = c["hook_embed"] + (c["hook_pos_embed"] if "hook_pos_embed" in keys else 0)
        ids["resid_pre0=embed(+pos)"] = _r(_rel(emb, pre0))
    # per layer (all layers; report the worst)
    worst: dict[str, float] = {}

    def note(name: str, value: Optional[float]) -> None:
        if value is not None:
            worst[name] = max(worst.get(name, 0.0), value)

    for layer in range(n_layers):
        b = f"blocks.{layer}"

        def have(n: str, b: str = b) -> bool:
            return f"{b}.{n}" in keys

        def get(n: str, b: str = b) -> Any:
            return c[f"{b}.{n}"]

        if (
            have("hook_resid_pre")
            and have("hook_resid_post")
            and have("hook_attn_out")
            and have("hook_mlp_out")
        ):
            note(
                "resid_post=pre+attn+mlp",
                _rel(
                    get("hook_resid_pre") + get("hook_attn_out") + get("hook_mlp_out"),
                    get("hook_resid_post"),
                ),
            )
        if have("hook_resid_pre") and have("hook_resid_mid") and have("hook_attn_out"):
            note(
                "resid_mid=pre+attn",
                _rel(get("hook_resid_pre") + get("hook_attn_out"), get("hook_resid_mid")),
            )
        if (
            layer + 1 < n_layers
            and have("hook_resid_post")
            and f"blocks.{layer + 1}.hook_resid_pre" in keys
        ):
            note(
                "resid_pre[l+1]=resid_post[l]",
                _rel(get("hook_resid_post"), c[f"blocks.{layer + 1}.hook_resid_pre"]),
            )
        blk = model.blocks[layer]
        attn = _get(blk, "attn")
        W_O, W_V, b_V, b_O = (_get(attn, n) for n in ("W_O", "W_V", "b_V", "b_O"))
        z = get("attn.hook_z") if have("attn.hook_z") else None
        v = get("attn.hook_v") if have("attn.hook_v") else None
        pat = get("attn.hook_pattern") if have("attn.hook_pattern") else None
        if v is not None and v.ndim == 4:
            n_h = pat.shape[1] if pat is not None else (z.shape[2] if z is not None else v.shape[2])
            ve = v.repeat_interleave(n_h // v.shape[2], dim=2) if n_h % v.shape[2] == 0 else None
            if pat is not None and ve is not None and z is not None:
                note("z=pattern@v", _rel(torch.einsum("bhqk,bkhd->bqhd", pat, ve), z))
        if (
            z is not None
            and isinstance(W_O, torch.Tensor)
            and z.ndim == 4
            and W_O.shape[0] == z.shape[2]
        ):
            out = torch.einsum("bqhd,hdm->bqm", z, W_O.to(z.dtype))
            if isinstance(b_O, torch.Tensor):
                out = out + b_O
            if have("hook_attn_out"):
                note("attn_out=sum_h z W_O+b_O", _rel(out, get("hook_attn_out")))
            if have("ln1_post.hook_in"):
                note("ln1_post.in=sum_h z W_O+b_O", _rel(out, get("ln1_post.hook_in")))
        if (
            v is not None
            and have("ln1.hook_out")
            and isinstance(W_V, torch.Tensor)
            and W_V.ndim == 3
            and W_V.shape[0] == v.shape[2]
        ):
            vh = torch.einsum("bpm,gmd->bpgd", get("ln1.hook_out"), W_V.to(v.dtype))
            if isinstance(b_V, torch.Tensor):
                vh = vh + b_V
            note("v=ln1.out@W_V+b_V", _rel(vh, v))
        if have("ln1.hook_in") and have("hook_resid_pre"):
            note("ln1.in=resid_pre", _rel(get("ln1.hook_in"), get("hook_resid_pre")))
        mlp = _get(blk, "mlp")
        W_out, b_out = _get(mlp, "W_out"), _get(mlp, "b_out")
        if have("mlp.hook_post") and isinstance(W_out, torch.Tensor):
            post = get("mlp.hook_post")
            if post.shape[-1] == W_out.shape[0]:
                out = post @ W_out.to(post.dtype)
                if isinstance(b_out, torch.Tensor):
                    out = out + b_out
                if have("hook_mlp_out"):
                    note("mlp_out=post@W_out+b_out", _rel(out, get("hook_mlp_out")))
                if have("ln2_post.hook_in"):
                    note("ln2_post.in=post@W_out+b_out", _rel(out, get("ln2_post.hook_in")))
    ids.update({k: _r(v) for k, v in worst.items()})
    # final readout
    last = f"blocks.{n_layers - 1}.hook_resid_post"
    if "ln_final.hook_in" in keys and last in keys:
        ids["ln_final.in=resid_post[-1]"] = _r(_rel(c["ln_final.hook_in"], c[last]))
    W_U, b_U = _get(model, "W_U"), _get(model, "b_U")
    if "ln_final.hook_out" in keys and isinstance(W_U, torch.Tensor):
        lo = c["ln_final.hook_out"] @ W_U.to(c["ln_final.hook_out"].dtype)
        if isinstance(b_U, torch.Tensor):
            lo = lo + b_U
        scale, err = _fit_scale(logits, lo)
        ids["logits=c*(ln_final.out@W_U+b_U)"] = (_r(scale), _r(err))
        adapter = getattr(model, "adapter", None)
        if adapter is not None and hasattr(adapter, "apply_output_logits_transform"):
            try:  # TransformerLens's own map from the unembedding's output to the logits
                ids["logits=T(ln_final.out@W_U+b_U)"] = _r(
                    _rel(adapter.apply_output_logits_transform(lo), logits)
                )
            except Exception as exc:  # noqa: BLE001
                ids["logits=T(ln_final.out@W_U+b_U)"] = type(exc).__name__
    d["identities"] = ids
    return d


def _prism_calls(tp: Any, model: Any, tokens: Any, logits: Any, cache: Any) -> dict:
    """Run every prism; per call: ('ok', gap) / ('refused'|'incomplete'|'crash', message)."""
    out: dict[str, Any] = {}
    try:
        prism = tp.LogitPrism(model, cache, tokens=tokens, logits=logits)
    except tp.PrismError as exc:
        kind = "incomplete" if isinstance(exc, tp.errors.CompletenessError) else "refused"
        return {"LogitPrism": (kind, f"{type(exc).__name__}: {_msg(exc)}")}
    except Exception as exc:  # noqa: BLE001
        return {"LogitPrism": ("crash", f"{type(exc).__name__}: {_msg(exc)}")}
    results: dict[str, Any] = {}
    calls = {
        "residual": lambda: prism.residual(TARGET),
        "heads": lambda: prism.heads(TARGET),
        "neurons": lambda: prism.neurons(TARGET),
        "full": lambda: prism.full(TARGET),
        "through_head": lambda: prism.through_head(1, 0, TARGET),
        "through_neuron": lambda: prism.through_neuron(1, 3, TARGET),
        "run": lambda: tp.LogitPrism.run(model, tokens).full(TARGET),
    }
    for name, call in calls.items():
        try:
            res = call()
            gap = float(res.gap().abs().max())
            res.check()
            results[name] = res
            out[name] = ("ok", gap)
        except tp.PrismError as exc:
            kind = "incomplete" if isinstance(exc, tp.errors.CompletenessError) else "refused"
            out[name] = (kind, f"{type(exc).__name__}: {_msg(exc)}")
        except Exception as exc:  # noqa: BLE001
            tb = traceback.extract_tb(exc.__traceback__)[-1]
            out[name] = (
                "crash",
                f"{type(exc).__name__}: {_msg(exc)} [{Path(tb.filename).name}:{tb.lineno}]",
            )
    # chains must total the term they split (and that term must be the one of heads/neurons)
    try:
        if "through_head" in results and "heads" in results:
            term = results["heads"].select(kind="head", layer=1, head=0).values.sum(-1)
            err = _rel(results["through_head"].total(), term)
            if err is None or err > 1e-4:
                out["through_head"] = (
                    "incomplete",
                    f"chain total differs from the L1H0 term of heads() by rel {err}",
                )
        if "through_neuron" in results and "neurons" in results:
            term = results["neurons"].select(kind="neuron", layer=1, neuron=3).values.sum(-1)
            err = _rel(results["through_neuron"].total(), term)
            if err is None or err > 1e-4:
                out["through_neuron"] = (
                    "incomplete",
                    f"chain total differs from the L1N3 term of neurons() by rel {err}",
                )
        if "full" in results and "run" in results:
            err = _rel(results["run"].total(), results["full"].total())
            if err is None or err > 1e-4:
                out["run"] = (
                    "incomplete",
                    f"LogitPrism.run differs from LogitPrism(...) by rel {err}",
                )
    except Exception as exc:  # noqa: BLE001
        out["crosscheck"] = ("crash", f"{type(exc).__name__}: {_msg(exc)}")
    return out


def verdict(calls: dict) -> tuple[str, float, str]:
    """(verdict, max |gap| of the prisms that ran, the first problem's message)."""
    gaps = [v[1] for v in calls.values() if v[0] == "ok"]
    gap = max(gaps) if gaps else float("nan")
    problems = [(k, v) for k, v in calls.items() if v[0] != "ok"]
    if not problems:
        return "exact", gap, ""
    bad = [(k, v) for k, v in problems if v[0] in ("incomplete", "crash")]
    first = bad[0] if bad else problems[0]
    message = f"{first[0]}: {first[1][1]}"
    if bad:
        return "WRONG", gap, message
    ok = [k for k in calls if calls[k][0] == "ok"]
    return ("refused" if not ok else f"partial ({', '.join(ok)} exact)"), gap, message


def survey_one(zoo: Any, tp: Any, name: str, fold: bool, want_diag: bool, timeout: int) -> dict:
    row: dict[str, Any] = {"arch": name, "fold": fold}
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(timeout)
    t0 = time.time()
    try:
        try:
            model = zoo.build(name, fold)
        except zoo.ZooSkip as exc:
            row.update(verdict="skip", message=_msg(exc))
            return row
        except Exception as exc:  # noqa: BLE001
            row.update(verdict="broken-build", message=f"{type(exc).__name__}: {_msg(exc)}")
            return row
        gen = torch.Generator().manual_seed(1)
        tokens = torch.randint(LO, HI, (B, P), generator=gen)
        try:
            with torch.no_grad():
                logits, cache = model.run_with_cache(tokens)
        except Exception as exc:  # noqa: BLE001
            row.update(
                verdict="broken-build", message=f"run_with_cache: {type(exc).__name__}: {_msg(exc)}"
            )
            return row
        row["logit_absmax"] = float(logits.abs().max())
        if want_diag:
            try:
                row["diag"] = diagnose(model, tokens, logits, cache)
            except Exception as exc:  # noqa: BLE001
                row["diag"] = {"error": f"{type(exc).__name__}: {_msg(exc)}"}
        calls = _prism_calls(tp, model, tokens, logits, cache)
        row["calls"] = calls
        v, gap, message = verdict(calls)
        row.update(verdict=v, gap=gap, message=message)
        return row
    except _Timeout:
        row.update(verdict="broken-build", message=f"timed out after {timeout} s")
        return row
    finally:
        signal.alarm(0)
        row["seconds"] = round(time.time() - t0, 2)


def _short(row: dict) -> str:
    calls = row.get("calls") or {}
    sym = {"ok": "+", "refused": "r", "incomplete": "X", "crash": "!"}
    abbrev = {"LogitPrism": "init", "through_neuron": "tn"}
    return " ".join(f"{abbrev.get(k, k[:2])}{sym[v[0]]}" for k, v in calls.items())


def table(rows: list, infos: list) -> str:
    lines = [
        "| architecture | kind | fold | verdict | max gap | calls | message |",
        "|---|---|---|---|---:|---|---|",
    ]
    kinds = {i.name: i.kind for i in infos}
    for row in rows:
        gap = row.get("gap")
        gap_s = "" if gap is None or gap != gap else f"{gap:.1e}"
        msg = (row.get("message") or "").replace("|", "\\|")
        msg = msg if len(msg) <= 260 else msg[:257] + "..."
        lines.append(
            f"| {row['arch']} | {kinds.get(row['arch'], '')} | "
            f"{'fold' if row['fold'] else 'raw'} | {row['verdict']} | {gap_s} | "
            f"{_short(row)} | {msg} |"
        )
    lines.append("")
    lines.append(
        "Not surveyed (TransformerLens supports them, but they are not causal LMs that "
        "transformers ships):"
    )
    lines.append("")
    for info in infos:
        if not info.buildable:
            lines.append(f"* {info.name} ({info.kind}: {info.reason})")
    lines.append("")
    lines.append(
        "calls: init=LogitPrism(...) re=residual he=heads ne=neurons fu=full "
        "th=through_head tn=through_neuron ru=LogitPrism.run; + exact, r refused "
        "(PrismError), X incomplete/wrong numbers, ! crash (non-tlprisms exception)"
    )
    return "\n".join(lines)


_KIND_TITLES = {
    "moe": "Mixture of experts",
    "hybrid": "Hybrid (attention + recurrent / state-space / convolution layers)",
    "ssm": "State-space / recurrent (no attention)",
}
_OTHER_TITLES = {
    "encoder": "encoders",
    "encoder-decoder": "encoder-decoders",
    "multimodal": "multimodal (vision / audio towers)",
    "alias": "aliases of a listed name",
    "no-hf-class": "no class in transformers (remote code / TL-native)",
}


def _cell(ta: Any, expect: Any, measured: Any) -> str:
    """One measured cell: a tick when it is what the test expects."""
    if measured is None:
        return ""
    if measured.verdict == "tl-broken":
        return "TL error"
    if measured.verdict == "skip":
        return "skip"
    if ta.judge(expect, measured) is None:
        return f"{measured.verdict} \u2713"
    text = " ".join(measured.message.split()).replace("|", "\\|")
    text = text if len(text) <= 120 else text[:117] + "..."
    where = f" at {measured.call}" if measured.call else ""
    return f"**{measured.verdict}{where}** \u2717: {text}"


def _expected(expect: Any) -> str:
    return "exact" if expect.exact else f"refused ({expect.error.__name__})"


def markdown(zoo: Any, ta: Any, infos: list, folds: list, timeout: int) -> str:
    """docs/architectures.md: the test's expectation per architecture and what it measured."""
    import platform

    import tlprisms as tp

    measured: dict[tuple[str, bool], Any] = {}
    t0 = time.time()
    for info in infos:
        if not info.buildable:
            continue
        for fold in folds:
            signal.signal(signal.SIGALRM, _alarm)
            signal.alarm(timeout)
            try:
                m = ta.measure(ta.build_case.__wrapped__(info.name, fold))
            except _Timeout:
                m = ta.Measured("tl-broken", message=f"timed out after {timeout} s")
            finally:
                signal.alarm(0)
            measured[info.name, fold] = m
            print(
                f"{info.name:32s} {'fold' if fold else 'raw ':4s} {m.line()[:150]}",
                file=sys.stderr,
                flush=True,
            )
    print(f"{len(measured)} runs in {time.time() - t0:.0f} s", file=sys.stderr)

    def cells(name: str) -> list:
        expect = ta.expect_for(name)
        return [
            _cell(ta, expect, measured.get((name, f))) if f in folds else "not run"
            for f in (True, False)
        ]

    def tested(name: str) -> bool:
        return any(
            (name, f) in measured and measured[name, f].verdict not in ("tl-broken", "skip")
            for f in folds
        )

    def broken(name: str) -> str:
        folds_b = [
            f
            for f in (True, False)
            if (name, f) in measured and measured[name, f].verdict == "tl-broken"
        ]
        if not folds_b:
            return ""
        why = (
            ta.TL_BROKEN.get(name, ((), ""))[1]
            or " ".join(measured[name, folds_b[0]].message.split())[:120]
        )
        which = "" if len(folds_b) == 2 else f" ({'folded' if folds_b[0] else 'unfolded'})"
        return f"TransformerLens cannot build or run it{which}: {why}"

    lines = [
        "# Architectures",
        "",
        "tlprisms either decomposes a model exactly (every prism's terms add up to the model's "
        "own logit, and `check()` says so) or refuses it with an error that names the reason. "
        "Below is every causal LM in TransformerLens's `SUPPORTED_ARCHITECTURES`, as "
        "`tests/test_architectures.py` tests it: a tiny random model of each (2 layers, "
        "d_model 32, vocab 60, sliding windows shorter than the input, perturbed weights, "
        "eager attention), folded (`enable_compatibility_mode()`) and unfolded "
        "(`no_processing=True`), run through `residual`, `heads`, `neurons`, `full`, "
        "`through_head`, `through_neuron` and `LogitPrism.run`. *tlprisms* is what the test "
        "expects; *folded* / *unfolded* is what it measured (\u2713: as expected; "
        "*TL error*: TransformerLens or transformers could not build or run the tiny model).",
        "",
        f"Generated by `HF_HUB_OFFLINE=1 python scripts/arch_survey.py --markdown "
        f"docs/architectures.md` with {ta._versions()}, torch {torch.__version__}, "
        f"tlprisms {getattr(tp, '__version__', '?')}, Python {platform.python_version()}. "
        "Re-run it after changing the expectations (`EXPECT` in the test) or upgrading "
        "TransformerLens: a new architecture there adds a row.",
        "",
        "## Decoder-only transformers",
        "",
        "| Architecture | tlprisms | folded | unfolded | What is special |",
        "|---|---|---|---|---|",
    ]
    decoders = [i for i in infos if i.buildable and i.kind == zoo.DECODER]
    decoders.sort(
        key=lambda i: (not tested(i.name), not ta.expect_for(i.name).exact, i.name.lower())
    )
    for info in decoders:
        expect = ta.expect_for(info.name)
        note = "; ".join(x for x in (expect.note, broken(info.name)) if x)
        wanted = _expected(expect) if tested(info.name) else "not tested"
        lines.append(f"| {info.name} | {wanted} | " + " | ".join(cells(info.name)) + f" | {note} |")
    lines += [
        "",
        "## Refused by kind",
        "",
        "| Kind | tlprisms | Why | Architectures | Measured |",
        "|---|---|---|---|---|",
    ]
    for kind, title in _KIND_TITLES.items():
        group = sorted(
            (i for i in infos if i.buildable and i.kind == kind), key=lambda i: i.name.lower()
        )
        if not group:
            continue
        rule = ta.BY_KIND[kind]
        names, odd = [], []
        for info in group:
            expect = ta.expect_for(info.name)
            names.append(info.name + (f" ({expect.note})" if info.name in ta.EXPECT else ""))
            bad = {
                fold: measured[info.name, fold]
                for fold in folds
                if (info.name, fold) in measured
                and (
                    measured[info.name, fold].verdict == "tl-broken"
                    or ta.judge(expect, measured[info.name, fold]) is not None
                )
            }
            for fold, m in bad.items():
                tag = (
                    info.name
                    if len(bad) == len(folds) == 2
                    else f"{info.name} {'folded' if fold else 'unfolded'}"
                )
                odd.append(
                    f"{tag}: TL error"
                    if m.verdict == "tl-broken"
                    else f"{tag}: {_cell(ta, expect, m)}"
                )
                if tag == info.name:
                    break
        ok = "all refused \u2713" if not odd else "refused \u2713 except " + "; ".join(odd)
        lines.append(f"| {title} | {_expected(rule)} | {rule.note} | {', '.join(names)} | {ok} |")
    lines += ["", "## Not causal LMs that transformers ships (not tested)", ""]
    for kind, title in _OTHER_TITLES.items():
        names = sorted((i.name for i in infos if i.kind == kind and not i.buildable), key=str.lower)
        if names:
            lines.append(f"* {title}: {', '.join(names)}")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="*", help="architecture names (default: all)")
    ap.add_argument("--kinds", default="decoder,moe,hybrid,ssm")
    ap.add_argument("--folds", default="1,0")
    ap.add_argument("--tlprisms", help="import tlprisms from this directory")
    ap.add_argument("--out", default="/tmp/arch_table.md")
    ap.add_argument("--diag", default="/tmp/arch_diag.json", help="'' to skip diagnostics")
    ap.add_argument("--timeout", type=int, default=60)
    ap.add_argument(
        "--markdown",
        metavar="FILE",
        help="write the per-family verdict table (docs/architectures.md) instead",
    )
    args = ap.parse_args()
    sys.path.insert(0, args.tlprisms or str(ROOT))
    warnings.filterwarnings("ignore")
    import logging

    logging.disable(logging.WARNING)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    import tlprisms as tp

    import arch_zoo as zoo

    print(f"tlprisms from {Path(tp.__file__).parent}", file=sys.stderr)
    infos = zoo.architectures()
    kinds = set(args.kinds.split(","))
    todo = [
        i
        for i in infos
        if i.hf_class is not None and i.kind in kinds and (not args.only or i.name in args.only)
    ]
    folds = [bool(int(f)) for f in args.folds.split(",")]
    if args.markdown:
        import test_architectures as ta

        chosen = [i for i in infos if not args.only or i.name in args.only or not i.buildable]
        Path(args.markdown).write_text(markdown(zoo, ta, chosen, folds, args.timeout))
        print(f"wrote {args.markdown}", file=sys.stderr)
        return
    rows = []
    t0 = time.time()
    for info in todo:
        for fold in folds:
            row = survey_one(zoo, tp, info.name, fold, bool(args.diag), args.timeout)
            row["kind"] = info.kind
            rows.append(row)
            print(
                f"{info.name:32s} {'fold' if fold else 'raw ':4s} {row['verdict']:28s} "
                f"{_short(row):32s} {row.get('seconds')}s {(row.get('message') or '')[:150]}",
                file=sys.stderr,
                flush=True,
            )
    text = table(rows, infos)
    print(text)
    Path(args.out).write_text(text + "\n")
    if args.diag:
        Path(args.diag).write_text(json.dumps(rows, indent=1, default=str))
    print(f"{len(rows)} runs in {time.time() - t0:.0f} s; table in {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
