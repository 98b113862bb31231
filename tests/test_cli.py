"""The ``tlprisms`` command and hub loading (no network: hub calls are stubbed)."""

import pytest

from tlprisms import cli, hub
from tlprisms.errors import PrismError

#: an offline hub failure must come within this many seconds (it took 31 s of retries)
HUB_FAIL_FAST_S = 5.0


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "report.html"
    return cli.run_demo(out, progress=False), out


def test_demo_finds_the_mechanisms_and_writes_a_report(demo_run):
    result, out = demo_run
    cap, add = result["capitals"], result["addition"]
    assert cap["prompts"] >= 40 and add["prompts"] == 81
    assert cap["reads"] == "@4 embed"  # the top head reads the country token
    assert cap["ov_hits"] > cap["prompts"] // 2
    assert add["peak"] == add["answer"] == "9"
    assert cap["gap"] < 1e-4 and add["gap"] < 1e-4
    html = out.read_text()
    assert html.count("<section") >= 5 or len(html) > 100_000


def test_demo_summary_is_printed(capsys):
    assert cli.main(["demo", "--no-report", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "top head" in text and "Completeness gap" in text and "peaks at '9'" in text


def test_explain_on_the_demo_model(capsys, tmp_path):
    code = cli.main(
        [
            "explain",
            "--model",
            "demo",
            "--prompt",
            "The capital of France is",
            "--target",
            " Paris",
            "--out",
            str(tmp_path / "r.html"),
        ]
    )
    assert code == 0
    text = capsys.readouterr().out
    assert "completeness gap" in text and "top heads" in text
    assert (tmp_path / "r.html").exists()


def test_explain_refuses_a_multi_token_target(capsys):
    code = cli.main(
        [
            "explain",
            "--model",
            "demo",
            "--prompt",
            "The capital of France is",
            "--target",
            " Paris Rome",
        ]
    )
    assert code == 2
    assert "2 tokens" in capsys.readouterr().err


@pytest.mark.parametrize(
    "message, expected",
    [
        ("We couldn't connect to 'https://huggingface.co' to load the files", "not reachable"),
        (
            "no/such-model is not a local folder and is not a valid model identifier",
            "unknown model",
        ),
    ],
)
def test_hub_errors_are_explained(monkeypatch, message, expected):
    from transformer_lens.model_bridge import TransformerBridge

    def fail(*args, **kwargs):
        raise OSError(message)

    monkeypatch.setattr(TransformerBridge, "boot_transformers", fail)
    monkeypatch.setattr(hub, "_offline_reason", lambda: None)  # as if online: TL's error
    with pytest.raises(PrismError, match=expected):
        hub.load_model("no/such-model", bridge=True)


@pytest.mark.parametrize(
    "name, expected",
    [("gtp2", r"unknown model 'gtp2'.*did you mean 'gpt2'"), ("gpt2", "could not download 'gpt2'")],
)
def test_hub_offline_fails_fast_and_tells_unknown_from_unreachable(monkeypatch, name, expected):
    """Offline (HF_HUB_OFFLINE=1), a misspelled name is called unknown, with suggestions, and a
    known name not in the local cache is called unreachable: at once, no retries."""
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "_cached", lambda *names: False)
    t0 = time.perf_counter()
    with pytest.raises(PrismError, match=expected) as err:
        hub.load_model(name)
    assert time.perf_counter() - t0 < HUB_FAIL_FAST_S
    assert "HF_HUB_OFFLINE=1" in str(err.value) and "--model demo" in str(err.value)
