"""Mistakes on the ``tlprisms`` command line: one ``tlprisms: error:`` line, exit code 2.

Each case runs ``tlprisms.cli.main`` on the embedded model (``--model demo``, offline) and
checks the exit code, that stderr is one line naming the problem and the fix, and that no
traceback is printed. One case runs the real command in a subprocess.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tlprisms import cli

PROMPT = "The capital of France is"


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def refused(capsys, *argv, match):
    code, out, err = run(capsys, *argv)
    assert code == 2, (out, err)
    assert err.startswith("tlprisms: error: ") and err.count("\n") == 1, err
    for fragment in [match] if isinstance(match, str) else match:
        assert fragment in err, err
    return err


def explain(*extra, target=" Paris", prompt=PROMPT):
    return ("explain", "--model", "demo", "--prompt", prompt, "--target", target, *extra)


# ---------------------------------------------------------------------------- --out
@pytest.mark.parametrize("command", ["explain", "demo"])
def test_out_is_a_directory(capsys, tmp_path, command):
    argv = (
        explain("--out", str(tmp_path))
        if command == "explain"
        else ("demo", "--quiet", "--out", str(tmp_path))
    )
    refused(capsys, *argv, match=["is a directory", "report.html"])


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("command", ["explain", "demo"])
def test_out_where_no_file_can_be_made(capsys, command):
    out = "/proc/tlprisms-report.html"
    argv = explain("--out", out) if command == "explain" else ("demo", "--quiet", "--out", out)
    refused(capsys, *argv, match=["cannot be written", out, "--out"])


def test_out_under_a_file(capsys, tmp_path):
    (tmp_path / "file.txt").write_text("x")
    refused(
        capsys,
        *explain("--out", str(tmp_path / "file.txt" / "r.html")),
        match="is a file, not a folder",
    )


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root may write in a read-only folder"
)
def test_out_in_a_read_only_folder(capsys, tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        refused(capsys, *explain("--out", str(folder / "r.html")), match="no permission")
    finally:
        folder.chmod(0o700)


def test_report_write_failure_at_the_end(capsys, tmp_path, monkeypatch):
    from tlprisms import render

    def full(self, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(render.Report, "save", full)
    refused(
        capsys,
        *explain("--out", str(tmp_path / "r.html")),
        match=["could not write the report", "No space left"],
    )


def test_the_write_probe_leaves_no_file(capsys, tmp_path):
    out = tmp_path / "new" / "r.html"
    refused(capsys, *explain("--out", str(out), target="Zzyzx"), match="vocabulary")
    out2 = tmp_path / "r.html"
    refused(capsys, *explain("--out", str(out2), target="Zzyzx"), match="vocabulary")
    assert not out.exists() and not out2.exists()


# ---------------------------------------------------------------------------- --device
def test_cuda_without_cuda(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    refused(capsys, *explain("--device", "cuda"), match=["CUDA is not available", "--device cpu"])


def test_cuda_index_out_of_range(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    refused(capsys, *explain("--device", "cuda:3"), match="1 CUDA device(s), cuda:0..cuda:0")


def test_mps_without_mps(capsys, monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    refused(capsys, *explain("--device", "mps"), match=["MPS is not available", "--device cpu"])


@pytest.mark.parametrize("device", ["gpu", "meta"])
def test_not_a_device(capsys, device):
    refused(capsys, *explain("--device", device), match="use cpu, cuda, cuda:N or mps")


# ---------------------------------------------------------------------------- model, text
def test_unknown_model_in_a_real_process():
    """The installed command, offline: a model name the hub cannot give."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "tlprisms.cli",
            "explain",
            "--model",
            "no-such-org/no-such-model",
            "--prompt",
            PROMPT,
            "--target",
            " Paris",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tlprisms: error: load_model:"), lines
    assert "no-such-org/no-such-model" in lines[0] and "--model demo" in lines[0]


def test_multi_token_target(capsys):
    refused(capsys, *explain(target=" Paris Rome"), match="2 tokens")


def test_target_not_in_the_vocabulary(capsys):
    err = refused(
        capsys,
        *explain(target="Zzyzx"),
        match=["'Zzyzx' is not in this model's vocabulary", "'<unk>'", "' Paris'"],
    )
    assert "logit" in err


def test_the_unknown_token_itself_may_be_explained(capsys):
    code, out, _ = run(capsys, *explain(target="<unk>"))
    assert code == 0 and "logit of '<unk>' after 'is' (token 5 of 6, the last)" in out


@pytest.mark.parametrize("prompt", ["", "   "])
def test_empty_prompt(capsys, prompt):
    refused(capsys, *explain(prompt=prompt), match=["--prompt", "is empty"])


def test_position_out_of_range(capsys):
    refused(capsys, *explain("--pos", "99"), match=["position 99 is out of range", "0..5"])


# ---------------------------------------------------------------------------- argparse
@pytest.mark.parametrize(
    "argv, match",
    [
        (("explain", "--model", "demo", "--prompt", PROMPT), "required: --target"),
        (
            ("explain", "--model", "demo", "--prompt", PROMPT, "--target", "x", "--pos", "last"),
            "invalid int value: 'last'",
        ),
        ((), "required: command"),
        (("frobnicate",), "invalid choice: 'frobnicate'"),
    ],
)
def test_usage_errors_are_one_line(capsys, argv, match):
    err = refused(capsys, *argv, match=match)
    assert "--help" in err


def test_help_exits_zero(capsys):
    code, out, _ = run(capsys, "explain", "--help")
    assert code == 0 and "--device" in out


def test_a_bug_still_raises(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("a genuine bug")

    monkeypatch.setattr(cli, "run_explain", broken)
    with pytest.raises(RuntimeError, match="a genuine bug"):
        cli.main(list(explain()))


# ---------------------------------------------------------------------------- flags, help, output
@pytest.mark.parametrize(
    "argv, flag, suggestion",
    [
        (
            ("explain", "--model", "demo", "--prompt", PROMPT, "--targt", " Paris"),
            "--targt",
            "--target",
        ),
        ((*explain(), "--verfy"), "--verfy", "--verify"),
        (("demo", "--quite"), "--quite", "--quiet"),
    ],
)
def test_misspelled_flag_is_named_with_a_suggestion(capsys, argv, flag, suggestion):
    """A misspelled flag is named (not 'required: --target'), the closest flag suggested, and
    the help pointed at is the command's own."""
    refused(
        capsys,
        *argv,
        match=[f"no option {flag}", f"did you mean {suggestion}", f"`tlprisms {argv[0]} --help`"],
    )


def test_help_is_plain_text(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "tlprisms explain --help" in out
    assert "``" not in out and ":func:" not in out  # no reST markup on a terminal


def test_explain_names_the_token_it_reads(capsys):
    code, out, _ = run(capsys, *explain())
    assert code == 0, out
    assert "logit of ' Paris' after 'is' (token 5 of 6, the last):" in out
    assert "position -1" not in out
