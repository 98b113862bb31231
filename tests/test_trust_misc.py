"""Issue 21, "Elsewhere": the unembedding map of a degenerate token set, the QK prism on rows
padded with an ``attention_mask``, HookedTransformer's ``use_split_qkv_input`` and the
shortformer model, ``explain_task``'s Parquet path and a stream that fails part way, and
numpy scalars wherever a number is asked for.

Runs on whichever TransformerLens is installed; the HookedTransformer cases skip on
TransformerLens 4 (``HAS_HOOKED``).
"""

import json
import os
from typing import Any

import numpy as np
import pytest
import torch

import tlprisms as tp
from tlprisms._core import arguments as check
from tlprisms._core.errors import (
    ArgumentError,
    PositionError,
    TargetError,
    UnsupportedModelError,
)
from tlprisms.demo import load_demo_model

from families import HAS_HOOKED

TEXT, SHORT = "The capital of France is", "Paris is"
PARIS = " Paris"

hooked_only = pytest.mark.skipif(
    not HAS_HOOKED, reason="needs HookedTransformer (TransformerLens 3)"
)
KINDS = ["bridge", "hooked"] if HAS_HOOKED else ["bridge"]


@pytest.fixture(scope="module")
def model() -> Any:
    return load_demo_model()


@pytest.fixture(scope="module")
def prism(model: Any) -> Any:
    return tp.LogitPrism.run(model, TEXT)


# ------------------------------------------------------------------ unembedding map
def _ids(model: Any, words: list) -> list:
    return [int(model.to_single_token(w)) for w in words]


def test_unembed_map_refuses_repeated_tokens(model: Any) -> None:
    with pytest.raises(TargetError, match=r"repeat.*entries 0, 1, 2.*distinct"):
        tp.weights.unembed_map(model, ["1", "1", "1"])
    with pytest.raises(TargetError, match=r"repeat.*entries 0, 3"):
        tp.weights.unembed_map(model, [" Paris", " Rome", " Tokyo", " Paris"])


def test_unembed_map_refuses_too_few_distinct_tokens(model: Any) -> None:
    with pytest.raises(TargetError, match=r"at least 3 distinct tokens, got 2"):
        tp.weights.unembed_map(model, ["1", "2"])


def test_unembed_map_zero_variance_and_rank_one() -> None:
    """Equal readout columns: no variance, a clear error (never nan). Collinear columns:
    one direction holds all the variance, the second ratio is exactly 0."""
    m = load_demo_model()
    a, b, c = _ids(m, [" Paris", " Rome", " Tokyo"])
    with torch.no_grad():
        W = m.W_U
        W[:, c] = 2 * W[:, b] - W[:, a]  # on the line through a and b
    r = tp.weights.unembed_map(m, [a, b, c])
    assert torch.isfinite(r.explained_variance).all() and torch.isfinite(r.points).all()
    assert abs(float(r.explained_variance[0]) - 1) < 1e-5
    assert abs(float(r.explained_variance[1])) < 1e-5
    assert "nan" not in repr(r)
    with torch.no_grad():
        W[:, b] = W[:, a]
        W[:, c] = W[:, a]
    with pytest.raises(TargetError, match=r"same readout column.*no variance"):
        tp.weights.unembed_map(m, [a, b, c])


def test_unembed_map_of_distinct_tokens_unchanged(model: Any) -> None:
    r = tp.weights.unembed_map(model, ["1", "2", "3", "4"])
    assert torch.isfinite(r.explained_variance).all()
    assert 0 < float(r.explained_variance.sum()) <= 1 + 1e-6


# ------------------------------------------------------------------ QK on padded rows
def _padded(kind: str) -> tuple:
    """A batch of a long and a left-padded short prompt, recorded with the attention mask."""
    m = load_demo_model(kind=kind)
    tokens = m.to_tokens([TEXT, SHORT], padding_side="left")
    mask = (tokens != m.tokenizer.pad_token_id).long()
    assert mask[1, 0] == 0 and mask[0].all()
    with torch.no_grad():
        logits, cache = m.run_with_cache(tokens, attention_mask=mask)
    prism = tp.LogitPrism(m, cache, tokens=tokens, logits=logits)
    n_pad = int((mask[1] == 0).sum())
    return m, prism, cache, n_pad


@pytest.mark.parametrize("kind", KINDS)
def test_qk_padded_default_keys_leave_masked_keys_out(kind: str) -> None:
    m, prism, cache, n_pad = _padded(kind)
    n = cache["hook_embed"].shape[1]
    scores = cache["blocks.1.attn.hook_attn_scores"][:, 0, -1]
    for kw in ({}, {"sides": "query"}, {"sides": "key"}, {"top_k": 3}, {"q_heads": "all"}):
        r = prism.qk(1, 0, **kw).check()
        assert r.values.shape[2] == n - n_pad, kw  # only the keys every row attends to
        got = r.total()[:, 0] if "top_k" not in kw else r.explained[:, 0]
        want = scores[:, n_pad:]
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), kw
        assert torch.isfinite(r.values).all()
    # the short row alone: the same scores
    alone = tp.LogitPrism.run(m, SHORT).qk(1, 0)
    assert torch.allclose(prism.qk(1, 0).explained[1], alone.explained[0], atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_qk_padded_masked_keys_named(kind: str) -> None:
    m, prism, cache, n_pad = _padded(kind)
    with pytest.raises(PositionError, match=r"key 0 .*masked in row 1.*attention mask.*keys="):
        prism.qk(1, 0, keys=[0, n_pad])
    with pytest.raises(PositionError, match=r"attention mask.*keys="):
        prism.qk(1, 0, keys=[0, n_pad], contrast=True)
    with pytest.raises(PositionError, match=r"attention mask.*rows separately"):
        prism.qk(1, 0, pos=n_pad - 1)  # a pad query: no key is attended to in row 1
    # keys every row attends to work, contrast included
    r = prism.qk(1, 0, keys=[n_pad, n_pad + 1], contrast=True).check()
    s = cache["blocks.1.attn.hook_attn_scores"][:, 0, -1]
    assert torch.allclose(r.explained[:, 0, 0], s[:, n_pad] - s[:, n_pad + 1], atol=1e-4)


def test_masked_key_detection_of_hugging_face_masks(model: Any) -> None:
    """Hugging Face masks with the dtype's lowest value, not -inf: masked all the same."""
    from tlprisms._prisms.qk import masked_keys
    from tlprisms._seam import CacheView, ModelView

    _, prism, cache, n_pad = _padded("bridge")
    d = dict(cache.items())
    name = "blocks.1.attn.hook_attn_scores"
    d[name] = d[name].clone()
    d[name][torch.isneginf(d[name])] = torch.finfo(d[name].dtype).min
    cv = CacheView(ModelView(prism.view.model), d, "test")
    got = masked_keys(cv, 1, 0, 5, range(6))
    assert got is not None
    assert got[1].tolist() == [True] * n_pad + [False] * (6 - n_pad)
    assert not got[0].any()


# ------------------------------------------------------------------ HookedTransformer flags
def _hooked(**kw: Any) -> Any:
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=2,
        d_model=32,
        n_ctx=16,
        d_head=8,
        n_heads=4,
        d_vocab=60,
        act_fn="gelu",
        normalization_type="LN",
        seed=0,
        **kw,
    )
    m = HookedTransformer(cfg).eval()
    with torch.no_grad():  # logits far from uniform, so a missing term shows
        for p in m.parameters():
            p.mul_(3)
    return m


TOKENS = torch.tensor([[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]])


@hooked_only
@pytest.mark.parametrize(
    "flag, setter",
    [("use_split_qkv_input", "set_use_split_qkv_input"), ("use_attn_in", "set_use_attn_in")],
)
def test_split_qkv_input_refused_with_the_fix(flag: str, setter: str) -> None:
    m = _hooked(**{flag: True})
    with torch.no_grad():
        logits, cache = m.run_with_cache(TOKENS)
    with pytest.raises(UnsupportedModelError, match=rf"{flag}=True.*model\.{setter}\(False\)"):
        tp.LogitPrism(m, cache, tokens=TOKENS, logits=logits)
    getattr(m, setter)(False)  # the fix the message names works
    P = tp.LogitPrism.run(m, TOKENS)
    P.full(3).check()
    P.qk(1, 0).check()


@hooked_only
def test_shortformer_qk_is_exact() -> None:
    """Shortformer adds the position embedding to the query and key inputs after ln1: the
    QK terms add up to the recorded scores on every path (pulled-back keys, d_head vectors,
    one side whole, sparse, contrast), with a ``pos_embed`` writer on each side."""
    import tlprisms._prisms.qk as qk

    m = _hooked(positional_embedding_type="shortformer")
    with torch.no_grad():
        logits, cache = m.run_with_cache(TOKENS)
    P = tp.LogitPrism(m, cache, tokens=TOKENS, logits=logits)
    for layer, head in ((0, 1), (1, 2)):
        scores = cache[f"blocks.{layer}.attn.hook_attn_scores"][:, head, -1]
        for kw in ({}, {"sides": "query"}, {"sides": "key"}, {"q_heads": "all", "k_neurons": 0}):
            r = P.qk(layer, head, **kw).check()
            assert torch.allclose(r.total()[:, 0], scores, atol=1e-4, rtol=1e-4), kw
            labels = [str(c) for c in r.components]
            side = {"query": "q:pos_embed", "key": "k:pos_embed"}.get(kw.get("sides"), "pos_embed")
            assert any(side in x for x in labels), kw
        r = P.qk(layer, head, top_k=4).check()
        assert torch.allclose(r.explained[:, 0], scores, atol=1e-4, rtol=1e-4)
        r = P.qk(layer, head, keys=[1, 4], contrast=True).check()
        assert torch.allclose(r.explained[:, 0, 0], scores[:, 1] - scores[:, 4], atol=1e-4)
    old = qk.PULL_BACK_MAX_RATIO
    try:
        qk.PULL_BACK_MAX_RATIO = 0  # each key writer's d_head vector
        P.qk(1, 2).check()
        P.qk(1, 0, q_heads=0, k_heads=0).check()
    finally:
        qk.PULL_BACK_MAX_RATIO = old
    # the pos_embed pair is what the shortformer positions add to the score
    r = P.qk(1, 2, sides="query")
    pe = r.select(q_kind="pos_embed").total()
    assert float(pe.abs().max()) > 1e-3
    # needed_hooks records what the QK prism reads on shortformer models
    names = tp.needed_hooks(m, ("qk",))
    with torch.no_grad():
        _, small = m.run_with_cache(TOKENS, names_filter=names)
    tp.LogitPrism(m, small, tokens=TOKENS).qk(1, 2).check()
    # the weight-space map says that the shortformer positions are left out
    meta = tp.weights.qk_map(m, 1, 0, [1, 2], [3])
    assert "shortformer" in meta.meta["positional"]


# ------------------------------------------------------------------ explain_task
def _untouched_rows(flag: list) -> Any:
    def rows() -> Any:
        flag.append(True)
        yield TEXT, PARIS

    return rows()


@pytest.mark.parametrize(
    "where, match",
    [
        ("x.csv", r"does not end in \.parquet"),
        ("", r"is a directory"),
        ("file.parquet/x.parquet", r"is a file, not a directory"),
    ],
)
def test_parquet_path_checked_before_any_work(
    model: Any, tmp_path: Any, where: str, match: str
) -> None:
    (tmp_path / "file.parquet").write_text("")
    read: list = []
    with pytest.raises(ArgumentError, match=match):
        tp.explain_task(
            model, _untouched_rows(read), parquet=tmp_path / where if where else tmp_path
        )
    assert not read, "rows were read before the path was checked"
    assert not (tmp_path / "x.csv").exists()


def test_parquet_path_not_writable(model: Any, tmp_path: Any, monkeypatch: Any) -> None:
    real = os.access
    monkeypatch.setattr(
        os, "access", lambda p, mode: False if str(p) == str(tmp_path) else real(p, mode)
    )
    with pytest.raises(ArgumentError, match=r"not writable"):
        tp.explain_task(model, [TEXT], [PARIS], parquet=tmp_path / "t.parquet", progress=False)


@pytest.mark.parametrize("keep", ["values", "stats"])
def test_stream_failure_writes_completed_rows(model: Any, tmp_path: Any, keep: str) -> None:
    """A malformed row 7 of a stream (bucketed, look-ahead window): rows 0..6 are computed
    and written before the error is raised."""
    import pyarrow.parquet as pq

    def rows() -> Any:
        for i in range(12):
            yield ("bad",) if i == 7 else ((TEXT, PARIS) if i % 2 else ("7+2=", " 9"))

    path = tmp_path / "t.parquet"
    with pytest.raises(ArgumentError, match=r"item 7"):
        tp.explain_task(model, rows(), parquet=path, progress=False, keep=keep, batch_size=2)
    table = pq.read_table(path)
    assert sorted(set(table.column("index").to_pylist())) == list(range(7))
    run = json.loads(pq.ParquetFile(path).metadata.metadata[b"tlprisms_run"])
    assert run["prompts"] == 7 and run["complete"] is False


def test_task_arguments_checked_up_front(model: Any) -> None:
    for kw, match in (
        ({"heads": "L1"}, r"explain_task: heads='L1'"),
        ({"softcap": "none"}, r"explain_task: softcap='none'"),
        ({"prepend_bos": "yes"}, r"explain_task: prepend_bos='yes'"),
    ):
        read: list = []
        with pytest.raises(ArgumentError, match=match):
            tp.explain_task(model, _untouched_rows(read), progress=False, **kw)
        assert not read


# ------------------------------------------------------------------ numpy scalars
@pytest.mark.parametrize(
    "value, ok",
    [
        (np.float32(0.5), True),
        (np.float64(0.5), True),
        (np.int64(3), True),
        (np.uint8(3), True),
        (np.array(0.5), True),
        (torch.tensor(0.5), True),
        (3, True),
        (0.5, True),
        (True, False),
        (np.bool_(True), False),
        (np.array([0.5, 1.0]), False),
        (np.array([0.5]), False),
        (torch.tensor([0.5, 1.0]), False),
        ("0.5", False),
        (1 + 2j, False),
        (np.complex64(1), False),
        (None, False),
    ],
)
def test_is_real(value: Any, ok: bool) -> None:
    assert check.is_real(value) is ok
    if ok:
        assert check.real(value, "x", "f") == float(value)
    else:
        with pytest.raises(ArgumentError, match=r"f: x must be a number"):
            check.real(value, "x", "f")


def test_is_index_numpy() -> None:
    assert check.is_index(np.int32(2)) and check.is_index(np.array(2))
    assert not check.is_index(np.array([2])) and not check.is_index(np.float32(2))


def test_numpy_scalars_accepted_where_numbers_are_asked(model: Any, prism: Any) -> None:
    same = lambda a, b: torch.equal(a.values, b.values) and torch.equal(a.explained, b.explained)
    assert same(prism.heads(PARIS, min_abs=np.float32(0.5)), prism.heads(PARIS, min_abs=0.5))
    assert same(prism.heads(PARIS, top_k=np.int64(3)), prism.heads(PARIS, top_k=3))
    assert same(
        prism.qk(1, 0, top_k=np.int32(2), min_abs=np.float64(0.1)),
        prism.qk(1, 0, top_k=2, min_abs=0.1),
    )
    u = torch.randn(128, generator=torch.Generator().manual_seed(0))
    assert same(prism.readout(u, 1, bias=np.float32(1.5)), prism.readout(u, 1, bias=1.5))
    r = prism.full(PARIS)
    r.check(atol=np.float32(1e-4), rtol=np.float64(1e-5))
    a = tp.weights.qk_map(model, 1, 0, [" is"], [" France"], scale=np.float32(2.0))
    b = tp.weights.qk_map(model, 1, 0, [" is"], [" France"], scale=2.0)
    assert torch.equal(a.values, b.values) and a.meta["scale"] == 2.0
    with pytest.raises(ArgumentError, match=r"min_abs"):
        prism.heads(PARIS, min_abs=np.bool_(True))
    with pytest.raises(ArgumentError, match=r"min_abs"):
        prism.heads(PARIS, min_abs=np.array([0.1, 0.2]))
    with pytest.raises(ArgumentError, match=r"top_k"):
        prism.heads(PARIS, top_k=np.float32(3))
