"""One vocabulary: every word means one thing everywhere, and the 0.1 spellings keep working
for one release with a DeprecationWarning (CHANGELOG's migration table)."""

import inspect

import pytest
import torch

import tlprisms as tp

from conftest import build_case


@pytest.fixture(scope="module")
def prism():
    return build_case("gpt2/bridge", True).prism


def test_top_order_and_its_old_name(prism):
    r = prism.full(7)
    new = r.top(5, order="positive")
    with pytest.deprecated_call(match="order"):
        old = r.top(5, by="pos")
    assert new.equals(old)
    assert (new["value"].diff().dropna() <= 0).all()
    assert (r.top(3, order="negative")["value"] <= r.top(3, order="positive")["value"].min()).all()


def test_at_is_where_a_chained_term_was_written(prism):
    th = prism.through_head(1, 1, 7)
    assert set(th.components.at.tolist()) <= set(range(7))
    assert "at" in th.top(3).columns and "pos" not in th.top(3).columns
    frame = th.to_frame()
    assert {"pos", "src", "at"} <= set(frame.columns)
    assert (frame["pos"] == 6).all()  # pos: the explained position
    with pytest.deprecated_call(match="at"):
        old = th.select(pos=3)
    assert torch.equal(old.values, th.select(at=3).values)
    with pytest.deprecated_call():
        assert th.aggregate("pos").values.shape == th.aggregate("at").values.shape


def test_heads_none_meant_all_and_still_does_for_one_release(prism):
    with pytest.deprecated_call(match="heads='all'"):
        old = prism.decompose(7, heads=None)
    assert torch.equal(old.values, prism.decompose(7, heads="all").values)
    assert torch.equal(prism.decompose(7).values, prism.decompose(7, heads=()).values)
    assert torch.equal(prism.heads(7).values, prism.decompose(7, heads="all").values)


def test_summary_k_and_its_old_name():
    case = build_case("gpt2/bridge", True)
    res = tp.explain_task(
        case.model,
        ["The capital is", "a Rome is"],
        [" Paris", " Rome"],
        heads="all",
        progress=False,
    )
    with pytest.deprecated_call(match="k="):
        old = res.summary(top_k=3)
    assert old.equals(res.summary(k=3))


def _params(fn):
    return inspect.signature(fn).parameters


def test_same_words_same_defaults_everywhere():
    """heads=/neurons= default to () and by_source to True in every call that has them;
    no internal parameter (name=, caller=) is public; "how many" is k."""
    calls = [
        tp.LogitPrism.decompose,
        tp.LogitPrism.chain,
        tp.LogitPrism.through_head,
        tp.LogitPrism.through_neuron,
        tp.LogitPrism.readout,
        tp.explain_task,
    ]
    for fn in calls:
        p = _params(fn)
        assert p["heads"].default == () and p["neurons"].default == (), fn.__name__
        if "by_source" in p:
            assert p["by_source"].default is True, fn.__name__
        assert not {"name", "caller"} & set(p), fn.__name__
    for fn in (tp.LogitPrism.heads, tp.LogitPrism.neurons):
        assert _params(fn)["layers"].default == "all"
    assert "k" in _params(tp.Decomposition.top)
    assert "k" in _params(tp.render.top_tokens)
    assert not hasattr(tp.LogitPrism, "final_readout")


def test_glossary_names_every_word():
    for word in (
        "``pos``",
        "``src``",
        "``at``",
        "``heads=``",
        "``neurons=``",
        "``by_source``",
        "``k``",
        "``order``",
        "``softcap``",
    ):
        assert word in tp.__doc__
