"""Tests of the embedded demo model (tlprisms.demo): offline, a few seconds."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import tlprisms.demo as demo
from tlprisms.demo import (
    ASSETS_DIR,
    DEMO_CONFIG,
    addition_task,
    capital_task,
    load_demo_hf_model,
    load_demo_model,
    load_demo_tokenizer,
)

REPO = Path(__file__).resolve().parent.parent


def _has_hooked() -> bool:
    try:
        from transformer_lens import HookedTransformer  # noqa: F401
    except ImportError:  # removed in TransformerLens 4.0
        return False
    return True


def _require_kind(kind: str) -> None:
    if kind == "hooked" and not _has_hooked():
        pytest.skip("transformer_lens.HookedTransformer is not available (TransformerLens >= 4)")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matmuls run far faster on one thread on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    _MODELS.clear()


_MODELS: dict = {}


def _model(kind: str, fold: bool):
    _require_kind(kind)
    key = (kind, fold)
    if key not in _MODELS:
        _MODELS[key] = load_demo_model(kind, fold=fold)
    return _MODELS[key]


def _task_logits(model, task):
    prompts = [p for p, _ in task]
    answers = torch.tensor([model.to_single_token(a) for _, a in task])
    tokens = model.to_tokens(prompts)
    with torch.no_grad():
        logits = model(tokens)
    return logits, answers, tokens


def _centered(x: torch.Tensor) -> torch.Tensor:
    return x - x.mean(-1, keepdim=True)


def _assert_close_rel(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-4) -> None:
    scale = b.abs().max().item()
    torch.testing.assert_close(a, b, rtol=rel, atol=rel * scale)


# --------------------------------------------------------------------------- data


def test_tasks_shape():
    cap = capital_task()
    add = addition_task()
    assert len(cap) >= 40
    assert ("The capital of France is", " Paris") in cap
    assert ("The capital of Japan is", " Tokyo") in cap
    assert len({p for p, _ in cap}) == len(cap)
    assert len(add) == 81
    assert ("7+2=", " 9") in add and ("9+9=", " 18") in add and ("1+1=", " 2") in add
    assert all(a.startswith(" ") for _, a in cap + add)


def test_import_is_light():
    code = (
        "import sys, tlprisms.demo; "
        "heavy = [m for m in ('transformers', 'transformer_lens', 'tokenizers', 'safetensors') "
        "if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


def test_assets_present_and_small():
    names = {p.name for p in ASSETS_DIR.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "metadata.json"} <= names
    total = sum(p.stat().st_size for p in ASSETS_DIR.iterdir() if p.is_file())
    assert total < 5_000_000, total
    meta = demo.demo_metadata()
    assert meta["accuracy"]["capital"] >= 0.99 and meta["accuracy"]["addition"] >= 0.99


def test_config_is_miniature_gemma():
    cfg = demo.demo_hf_config()
    assert type(cfg).__name__ == "GemmaConfig"
    for key, value in DEMO_CONFIG.items():
        assert getattr(cfg, key) == value, key
    assert cfg.num_key_value_heads == 1  # multi-query attention, as gemma-2b
    assert cfg.tie_word_embeddings
    assert cfg.hidden_act == "gelu_pytorch_tanh"
    assert cfg.head_dim * cfg.num_attention_heads == cfg.hidden_size
    tok = load_demo_tokenizer()
    assert cfg.vocab_size == len(tok)
    with open(ASSETS_DIR / "config.json", encoding="utf-8") as f:
        assert json.load(f)["model_type"] == "gemma"


# ---------------------------------------------------------------------- tokenizer


def test_tokenizer_words_and_specials():
    tok = load_demo_tokenizer()
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (0, 1, 2)
    assert tok.unk_token == "<unk>"
    ids = tok("The capital of France is")["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert tok.convert_ids_to_tokens(ids) == ["<bos>", "The", "capital", "of", "France", "is"]
    assert tok.convert_ids_to_tokens(tok("7+2=")["input_ids"]) == ["<bos>", "7", "+", "2", "="]
    assert tok.convert_ids_to_tokens(tok("11+3=", add_special_tokens=False)["input_ids"]) == [
        "11",
        "+",
        "3",
        "=",
    ]
    assert tok.convert_ids_to_tokens(tok(" Paris", add_special_tokens=False)["input_ids"]) == [
        "Paris"
    ]
    assert tok("Atlantis", add_special_tokens=False)["input_ids"] == [tok.unk_token_id]


def test_tokenizer_single_tokens_and_round_trip():
    tok = load_demo_tokenizer()
    for prompt, answer in capital_task() + addition_task():
        a_ids = tok(answer, add_special_tokens=False)["input_ids"]
        assert len(a_ids) == 1 and a_ids[0] != tok.unk_token_id, answer
        assert tok.decode(a_ids) == answer.strip()
        ids = tok(prompt)["input_ids"]
        assert tok.unk_token_id not in ids, prompt
        text = tok.decode(ids, skip_special_tokens=True)
        assert tok(text)["input_ids"] == ids, (prompt, text)
    for prompt, _ in capital_task():
        assert len(tok(prompt)["input_ids"]) == 6


# ------------------------------------------------------------------------ models


def test_hf_model_accuracy():
    model, cfg = load_demo_hf_model()
    tok = load_demo_tokenizer()
    assert type(model).__name__ == "GemmaForCausalLM"
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    for task in (capital_task(), addition_task()):
        batch = tok([p for p, _ in task], return_tensors="pt", padding=True)
        assert batch["attention_mask"].all()
        answers = torch.tensor([tok(a, add_special_tokens=False)["input_ids"][0] for _, a in task])
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"]).logits
        acc = (logits[:, -1].argmax(-1) == answers).float().mean().item()
        assert acc >= 0.99


@pytest.mark.parametrize("fold", [True, False], ids=["fold", "nofold"])
@pytest.mark.parametrize("kind", ["bridge", "hooked"])
def test_tl_model_accuracy(kind, fold):
    model = _model(kind, fold)
    expected = "TransformerBridge" if kind == "bridge" else "HookedTransformer"
    assert type(model).__name__ == expected
    assert model.cfg.n_key_value_heads == 1
    assert model.tokenizer is not None
    assert model.to_str_tokens("The capital of France is") == [
        "<bos>",
        "The",
        "capital",
        "of",
        "France",
        "is",
    ]
    assert model.to_tokens("7+2=")[0, 0].item() == model.tokenizer.bos_token_id
    for task in (capital_task(), addition_task()):
        logits, answers, _ = _task_logits(model, task)
        acc = (logits[:, -1].argmax(-1) == answers).float().mean().item()
        assert acc >= 0.99, (kind, fold, acc)


def test_auto_is_bridge():
    model = load_demo_model()
    assert type(model).__name__ == "TransformerBridge"
    assert getattr(model, "compatibility_mode", True)


@pytest.mark.parametrize("kind", ["bridge", "hooked"])
def test_fold_matches_unfolded(kind):
    folded = _model(kind, True)
    raw = _model(kind, False)
    for task in (capital_task(), addition_task()):
        lf, _, tokens = _task_logits(folded, task)
        lr, _, _ = _task_logits(raw, task)
        # centring the unembedding shifts each position's logits by a constant
        _assert_close_rel(_centered(lf), _centered(lr))
        _assert_close_rel(lf.log_softmax(-1), lr.log_softmax(-1))


def test_tl_matches_hf():
    hf, _ = load_demo_hf_model()
    for kind in ("bridge", "hooked"):
        if kind == "hooked" and not _has_hooked():
            continue
        for fold in (True, False):
            model = _model(kind, fold)
            for task in (capital_task(), addition_task()):
                lt, _, tokens = _task_logits(model, task)
                with torch.no_grad():
                    lh = hf(input_ids=tokens).logits
                _assert_close_rel(_centered(lt), _centered(lh))
                if not fold:
                    _assert_close_rel(lt, lh)


@pytest.mark.parametrize("kind", ["bridge", "hooked"])
def test_float64(kind):
    _require_kind(kind)
    m64 = load_demo_model(kind, dtype=torch.float64)
    assert next(m64.parameters()).dtype == torch.float64
    l64, answers, _ = _task_logits(m64, capital_task())
    l32, _, _ = _task_logits(_model(kind, True), capital_task())
    assert (l64[:, -1].argmax(-1) == answers).all()
    _assert_close_rel(l64.float(), l32)


def test_folded_weights_look_processed():
    model = _model("bridge", True)
    # compatibility mode exposes HookedTransformer-style weights
    assert model.W_U.shape == (model.cfg.d_model, model.cfg.d_vocab)
    assert model.W_E.shape == (model.cfg.d_vocab, model.cfg.d_model)
    assert model.blocks[0].attn.W_V.shape[0] == 1  # a single key/value head
    logits, cache = model.run_with_cache("The capital of France is")
    assert "blocks.0.attn.hook_pattern" in cache
    assert cache["blocks.0.attn.hook_pattern"].shape[1] == 4


def test_hooked_unavailable_error():
    if _has_hooked():
        pytest.skip("this TransformerLens has HookedTransformer")
    with pytest.raises(RuntimeError, match="HookedTransformer"):
        load_demo_model("hooked")


def test_bad_kind():
    with pytest.raises(ValueError):
        load_demo_model("nope")


# ------------------------------------------------------------------ global state


def _global_state():
    loggers = ["", "transformers", "transformer_lens", "torch"]
    return {
        "rng": torch.random.get_rng_state().clone(),
        "default_dtype": torch.get_default_dtype(),
        "grad": torch.is_grad_enabled(),
        "threads": torch.get_num_threads(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "env": dict(os.environ),
        "warning_filters": list(warnings.filters),
        "log_levels": {name: logging.getLogger(name).level for name in loggers},
        "log_disabled": logging.root.manager.disable,
    }


@pytest.mark.parametrize("kind", ["bridge", "hooked"])
def test_loader_leaves_global_state_and_stays_offline(kind, monkeypatch):
    _require_kind(kind)
    _model(kind, True)  # the libraries' own import-time effects happen first

    def no_network(*args, **kwargs):
        raise AssertionError(f"the demo loader tried to open a connection: {args}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    before = _global_state()
    for fold in (True, False):
        load_demo_model(kind, fold=fold)
    after = _global_state()
    assert torch.equal(before.pop("rng"), after.pop("rng"))
    assert before == after
