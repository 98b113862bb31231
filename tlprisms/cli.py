"""The ``tlprisms`` command: ``tlprisms demo`` and ``tlprisms explain``.

``tlprisms demo`` decomposes both tasks of the embedded model (capital cities and one-digit
addition), prints what the prisms found and writes a self-contained HTML report.
``tlprisms explain --model NAME --prompt TEXT --target TOKEN`` does the same for one prompt of
any model TransformerLens can load (``--model demo`` works offline).

A mistake on the command line (an unwritable ``--out``, a device this machine lacks, an
unknown model, a target that is not one token of the vocabulary, an empty prompt, a position
out of range) ends with one line on stderr, ``tlprisms: error: <what is wrong and what to
do>``, and exit code 2; it is checked before the slow work where it can be. Anything else
is a bug and raises.
"""

import argparse
import difflib
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn, Optional

import torch

from tlprisms._core.errors import ArgumentError, PrismError, TargetError

__all__ = ["main", "run_demo", "run_explain"]

#: exit code of a mistake on the command line (argparse's convention)
USAGE = 2


def _say(msg: str) -> None:
    print(msg, flush=True)


def _report(title: str) -> Any:
    from tlprisms.render import Report

    return Report(title)


# ---------------------------------------------------------------------------- checks
def _check_out(out: Path, flag: str = "--out") -> Path:
    """Refuse a report path that cannot be written, before any slow work.

    A directory, a path under a file, a folder without write permission, or a place no file
    can be created (``/proc``, a read-only file system) raises :class:`ArgumentError`. The
    probe opens the file for appending and removes it again if it did not exist.
    """
    out = Path(out).expanduser()
    fix = f"pass {flag} a file path in a folder you can write to, e.g. {flag} report.html"
    if out.is_dir():
        raise ArgumentError(
            f"{flag} {str(out)!r} is a directory, not a file; "
            f"pass a file path, e.g. {flag} {str(out / 'report.html')!r}."
        )
    folder = out.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent  # Report.save creates the missing folders
    if not folder.is_dir():
        raise ArgumentError(f"{flag} {str(out)!r}: {str(folder)!r} is a file, not a folder; {fix}.")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ArgumentError(
            f"{flag} {str(out)!r}: no permission to write in {str(folder)!r}; {fix}."
        )
    if folder == out.parent:
        existed = out.exists()
        try:
            with open(out, "a", encoding="utf-8"):
                pass
        except OSError as err:
            raise ArgumentError(
                f"{flag} {str(out)!r} cannot be written ({err.strerror or err}); {fix}."
            ) from err
        if not existed:
            out.unlink(missing_ok=True)
    return out


def _check_device(device: str) -> str:
    """Refuse a device torch does not know or this machine does not have."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError) as err:
        raise ArgumentError(
            f"--device {device!r} is not a device ({err}); use cpu, cuda, cuda:N or mps."
        ) from err
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ArgumentError(
                f"--device {device!r}: CUDA is not available here "
                "(torch.cuda.is_available() is False: no NVIDIA GPU or driver, "
                "or a CPU-only torch build); use --device cpu."
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ArgumentError(
                f"--device {device!r}: this machine has "
                f"{torch.cuda.device_count()} CUDA device(s), "
                f"cuda:0..cuda:{torch.cuda.device_count() - 1}."
            )
    elif dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ArgumentError(
                f"--device {device!r}: Apple's MPS is not available here "
                "(torch.backends.mps.is_available() is False); use --device "
                "cpu."
            )
    elif dev.type != "cpu":
        raise ArgumentError(f"--device {device!r}: use cpu, cuda, cuda:N or mps.")
    return device


def _check_prompt(prompt: str) -> str:
    """Refuse an empty (or all-whitespace) prompt."""
    if not prompt.strip():
        raise ArgumentError(
            f"--prompt {prompt!r} is empty; pass the text the model reads, "
            "e.g. --prompt 'The capital of France is'."
        )
    return prompt


def _check_text(model: Any, prompt: str, target: str) -> None:
    """Refuse a prompt of no tokens, and a target the tokenizer only knows as unknown.

    A word outside a word-level vocabulary encodes to the unknown token: explaining it would
    explain the ``<unk>`` logit, a silent wrong answer. A multi-token target is refused by
    the prism itself (its message shows the tokenisation).
    """
    _check_prompt(prompt)
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        return
    if not tok.encode(prompt, add_special_tokens=False):
        raise ArgumentError(
            f"--prompt {prompt!r} is no tokens at all for this model's "
            "tokenizer; pass some text, e.g. --prompt 'The capital of France "
            "is'."
        )
    unk_id, unk = getattr(tok, "unk_token_id", None), getattr(tok, "unk_token", None)
    ids = tok.encode(target, add_special_tokens=False)
    if unk_id is not None and unk_id in ids and target.strip() != unk:
        raise TargetError(
            f"--target {target!r} is not in this model's vocabulary: its "
            f"tokenizer maps it to the unknown token {unk!r} (id {unk_id}), and "
            "explaining it would explain the unknown token's logit. Pass a "
            "single token the vocabulary has (often with a leading space, e.g. "
            "' Paris')."
        )


def _save(report: Any, out: Path) -> Path:
    try:
        return report.save(out)
    except OSError as err:  # checked up front; the disk can still fill or vanish
        raise ArgumentError(
            f"--out {str(out)!r}: could not write the report "
            f"({err.strerror or err}); pass --out a writable file path."
        ) from err


def _gap(*results: Any) -> float:
    return max(
        float(r.gap().abs().max())
        if hasattr(r, "gap")
        else float((r.values.sum(-1) - r.logits).abs().max())
        for r in results
    )


def _capitals(model: Any, report: Any, progress: bool) -> dict:
    import tlprisms as tp
    from tlprisms import weights
    from tlprisms.demo import capital_task

    task = capital_task()
    prompts, answers = [p for p, _ in task], [a for _, a in task]
    res = tp.explain_task(
        model, prompts, answers, heads="all", neurons="all", progress=progress
    ).check()
    summary = res.summary()
    layers = res.decomposition().aggregate("kind", "layer")
    means = layers.values[:, 0, 0].mean(0)
    per_layer = {str(c): float(v) for c, v in zip(layers.components, means) if not c.is_constant}
    heads = summary[summary.kind == "head"]
    top = heads.iloc[0]
    layer, head = int(top["layer"]), int(top["head"])
    prompt, answer = prompts[0], answers[0]
    prism = tp.LogitPrism.run(model, prompt)
    r = prism.residual(answer).check()
    h = prism.heads(answer).check()
    th = prism.through_head(layer, head, answer).check()
    read = th.top(1)["component"][0]
    countries = [p.split()[3] for p in prompts]
    ov = weights.ov_map(model, layer, head, [" " + c for c in countries], answers)
    hits = sum(j == i for i, j in enumerate(ov.argmax_index()))
    if report is not None:
        report.add(r, title=f"Residual prism: {prompt!r} -> {answer!r}")
        report.add(h, title="Heads x source positions")
        report.add(th, title=f"Through L{layer}H{head}: what the head reads")
        report.add(ov, title=f"OV map of L{layer}H{head}: countries -> capitals")
        report.add(res, title=f"All {len(prompts)} capital prompts")
    return {
        "prompts": len(prompts),
        "layer_means": per_layer,
        "head": (layer, head),
        "head_mean": float(top["mean"]),
        "reads": read,
        "ov_hits": hits,
        "gap": _gap(res, r, h, th),
        "top": summary.head(5),
    }


def _addition(model: Any, report: Any, progress: bool) -> dict:
    import tlprisms as tp
    from tlprisms import weights
    from tlprisms.demo import addition_task

    task = addition_task()
    prompts, answers = [p for p, _ in task], [a for _, a in task]
    res = tp.explain_task(
        model, prompts, answers, heads="all", neurons="all", progress=progress
    ).check()
    summary = res.summary()
    neurons = summary[summary.kind == "neuron"]
    mlp_totals = neurons.groupby("layer")["mean"].sum()
    layer = int(mlp_totals.abs().idxmax())
    top_neurons = [int(n) for n in neurons[neurons.layer == layer].neuron.head(5)]
    prompt = "7+2="
    answer = dict(task)[prompt]
    prism = tp.LogitPrism.run(model, prompt)
    r = prism.residual(answer).check()
    acts = prism.neuron_activations(layer)[0, top_neurons]
    sums = [str(s) for s in range(2, 19)]
    templates = weights.neuron_templates(model, layer, top_neurons, sums, activations=acts)
    weighted = templates.weighted_sum()
    peak = templates.cols[int(weighted.argmax())]
    digits = weights.unembed_map(model, [str(d) for d in range(10)])
    if report is not None:
        report.add(r, title=f"Residual prism: {prompt!r} -> {answer!r}")
        report.add(prism.neurons(answer, layers=[layer]), title=f"Layer {layer} neurons")
        report.add(templates, title=f"Top layer-{layer} neurons: templates over the sums")
        report.add(digits, title="Digit unembeddings (PCA)")
        report.add(res, title=f"All {len(prompts)} addition prompts")
    return {
        "prompts": len(prompts),
        "layer": layer,
        "neurons": top_neurons,
        "peak": peak,
        "answer": answer.strip(),
        "gap": _gap(res, r),
        "pca_variance": [float(v) for v in digits.explained_variance],
        "top": summary.head(5),
    }


def run_demo(out: Optional[Path] = Path("tlprisms-demo.html"), progress: bool = True) -> dict:
    """Decompose both tasks on the embedded model; print a summary; write the report."""
    from tlprisms.demo import load_demo_model

    if out is not None:
        out = _check_out(out)
    t0 = time.time()
    _say("tlprisms demo: loading the embedded model (offline)...")
    model = load_demo_model()
    report = _report("tlprisms demo: logit prisms on the embedded model") if out else None
    _say("capital cities: decomposing 'The capital of X is' for every country...")
    cap = _capitals(model, report, progress)
    _say("addition: decomposing 'a+b=' for a, b in 1..9...")
    add = _addition(model, report, progress)
    layer, head = cap["head"]
    lines = [
        "",
        f"Capital cities ({cap['prompts']} prompts)",
        "  mean term per layer: "
        + ", ".join(f"{k} {v:+.2f}" for k, v in cap["layer_means"].items()),
        f"  top head: L{layer}H{head}, the largest mean term in the right capital's logit "
        f"({cap['head_mean']:+.2f}; the capitals notebook ranks heads by the logit difference "
        "right - wrong capital, so its top head may differ)",
        f"  through L{layer}H{head} on 'France': its largest source term is {cap['reads']}",
        f"  OV map of L{layer}H{head}: {cap['ov_hits']}/{cap['prompts']} countries map to "
        "their capital",
        f"Addition ({add['prompts']} prompts)",
        f"  the MLP layer that stands out: layer {add['layer']}; top neurons "
        + ", ".join(f"L{add['layer']}N{n}" for n in add["neurons"]),
        f"  '7+2=': the activation-weighted sum of their templates peaks at {add['peak']!r}"
        f" (answer {add['answer']!r})",
        f"Completeness gap (max |sum of terms - logit|): {max(cap['gap'], add['gap']):.2e}",
    ]
    _say("\n".join(lines))
    if report is not None and out is not None:
        path = _save(report, out)
        _say(f"report: {path} (self-contained, offline)")
    _say(f"done in {time.time() - t0:.1f} s")
    return {"capitals": cap, "addition": add}


def run_explain(
    model_name: str,
    prompt: str,
    target: str,
    *,
    out: Optional[Path] = None,
    pos: int = -1,
    device: str = "cpu",
    top: int = 10,
    verify: bool = False,
) -> dict:
    """Decompose one prompt's target logit on any model; print the top components.

    With ``verify``, also check the full prism's largest and some sampled terms by
    intervention (:meth:`~tlprisms.LogitPrism.verify`) and print the certificate; a failed
    verification is an error.
    """
    import tlprisms as tp
    from tlprisms.hub import load_model

    _check_prompt(prompt)
    _check_device(device)
    if out is not None:
        out = _check_out(out)
    t0 = time.time()
    _say(f"loading {model_name!r}...")
    model = load_model(model_name, device=device)
    _check_text(model, prompt, target)
    _say(f"loaded in {time.time() - t0:.1f} s; running the model and the prisms...")
    prism = tp.LogitPrism.run(model, prompt)
    r = prism.residual(target, pos).check()
    full = prism.full(target, pos)
    per_head = prism.heads(target, pos).aggregate("layer", "head")
    full.check()  # a result that does not add up is an error, never a warning
    gap = _gap(r, full)
    _say(
        f"\n{r.explains} of {target!r} {_where(prism, int(r.positions[0, 0]))}: "
        f"{float(r.explained[0, 0, 0]):.4g}; completeness gap {gap:.2e}"
    )
    for title, res in (
        ("layers", r),
        ("heads", per_head.select(kind="head")),
        ("heads x sources and neurons", full),
    ):
        table = res.top(top)
        _say(
            f"top {title}: "
            + ", ".join(f"{c} {v:+.3g}" for c, v in zip(table["component"], table["value"]))
        )
    verification = None
    if verify:
        verification = prism.verify(full, target)
        _say(f"verification: {verification}")
    if out is not None:
        report = _report(f"tlprisms explain: {model_name}")
        if report is not None:
            report.add(r, title=f"Residual prism: {prompt!r} -> {target!r}")
            report.add(prism.heads(target, pos), title="Heads x source positions")
            if verification is not None:
                report.add(verification, title="Verification by intervention")
            _save(report, out)
            _say(f"report: {out}")
    if verification is not None:
        verification.check()  # after the report, which shows what failed
    return {
        "logit": float(r.explained[0, 0, 0]),
        "gap": gap,
        "top": full.top(top),
        "verification": verification,
    }


def _where(prism: Any, i: int) -> str:
    """Where a logit is read, in words: ``after 'is' (token 5 of 6, the last)``."""
    n = prism.n_ctx
    last = ", the last" if i == n - 1 else ""
    tokens = prism.tokens
    if tokens is None or prism.view.tokenizer() is None:
        return f"at position {i} (of {n}{last})"
    word = prism.view.token_label(int(tokens[0, i]))
    return f"after {word} (token {i} of {n}{last})"


class _ParseError(Exception):
    pass


#: what ``tlprisms --help`` says (plain text: no reST markup on a terminal)
DESCRIPTION = """Exact logit prisms on the command line.

  tlprisms demo       explain both tasks of the embedded model (offline) and write a report
  tlprisms explain    explain one logit of any TransformerLens model

Examples:
  tlprisms demo --out report.html
  tlprisms explain --model demo --prompt "The capital of France is" --target " Paris"
  tlprisms explain --model gpt2 --prompt "The Eiffel Tower is in" --target " Paris" --verify

Run `tlprisms explain --help` for the options of one command."""


def _unknown_flags(parser: argparse.ArgumentParser, argv: Sequence[str]) -> Optional[str]:
    """The first ``--flag`` of ``argv`` that its command does not have, with the closest
    flags it does have (checked before argparse, which would first complain that a required
    flag is missing when the user misspelled it)."""
    if not argv or argv[0].startswith("-"):
        return None
    subs = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    command = subs.choices.get(argv[0]) if subs is not None else None
    if command is None:
        return None
    known = [o for a in command._actions for o in a.option_strings]
    for arg in argv[1:]:
        if not arg.startswith("--"):
            continue
        flag = arg.split("=", 1)[0]
        if flag in known or sum(k.startswith(flag) for k in known) == 1:
            continue
        close = difflib.get_close_matches(flag, known, n=2, cutoff=0.6)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        return f"{argv[0]} has no option {flag}{hint} (see `tlprisms {argv[0]} --help`)"
    return None


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as one ``tlprisms: error:`` line (see :func:`main`)."""

    def error(self, message: str) -> NoReturn:
        raise _ParseError(f"{message} (see `{self.prog} --help`)")


def _fail(message: str) -> int:
    print("tlprisms: error: " + " ".join(message.split()), file=sys.stderr, flush=True)
    return USAGE


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit code (2 for a mistake, with one line on stderr)."""
    parser = _Parser(
        prog="tlprisms",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="explain both tasks of the embedded model (offline)")
    demo.add_argument(
        "--out",
        type=Path,
        default=Path("tlprisms-demo.html"),
        help="where to write the HTML report",
    )
    demo.add_argument("--no-report", action="store_true", help="print the summary only")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    ex = sub.add_parser("explain", help="explain one logit of any TransformerLens model")
    ex.add_argument("--model", required=True, help="'demo' or a TransformerLens model name")
    ex.add_argument("--prompt", required=True)
    ex.add_argument("--target", required=True, help="a single token, e.g. ' Paris'")
    ex.add_argument(
        "--pos",
        type=int,
        default=-1,
        help="the position whose next-token logit is explained (default -1, last)",
    )
    ex.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or mps")
    ex.add_argument("--out", type=Path, default=None, help="also write an HTML report")
    ex.add_argument(
        "--verify",
        action="store_true",
        help="check the largest and some sampled terms by intervention on the model and print "
        "the certificate (a failure is an error)",
    )
    argv = list(sys.argv[1:] if argv is None else argv)
    unknown = _unknown_flags(parser, argv)
    if unknown is not None:
        return _fail(unknown)
    try:
        args = parser.parse_args(argv)
    except _ParseError as err:
        return _fail(str(err))
    except SystemExit as done:  # --help
        return done.code if isinstance(done.code, int) else USAGE

    torch.set_grad_enabled(False)
    try:
        if args.command == "demo":
            run_demo(None if args.no_report else args.out, progress=not args.quiet)
        else:
            run_explain(
                args.model,
                args.prompt,
                args.target,
                out=args.out,
                pos=args.pos,
                device=args.device,
                verify=args.verify,
            )
    except PrismError as err:
        return _fail(str(err))
    except KeyboardInterrupt:
        print("tlprisms: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
