"""Rendering: escaping, one bundle per page, fresh ids, no URLs, lazy imports, exact
top-token readouts, and (marked ``browser``) real rendering in a local headless Chromium
with every network request blocked."""

import dataclasses
import json
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch

import tlprisms as tp
from tlprisms import render
from tlprisms._core.errors import PrismError
from tlprisms.render._escape import script_json
from tlprisms.render._views_base import CV_GLOBAL, bundle_script

HOSTILE = ["</script>", "<b>", "&amp;", "x\ny", "\x00z", "  sp"]
WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]
#: term agreement (float32 terms of a few units)
ATOL_TERMS = 1e-5
#: the only URLs the vendored CircuitsVis bundle holds: namespace names and links inside
#: error messages (never fetched; the browser tests block and record every request)
BUNDLE_URLS = {
    "http://fb.me/use-check-prop-types",
    "http://www.w3.org/1998/Math/MathML",
    "http://www.w3.org/1999/xhtml",
    "http://www.w3.org/1999/xlink",
    "http://www.w3.org/2000/svg",
    "http://www.w3.org/XML/1998/namespace",
    "https://arxiv.org/abs/1706.02515",
    "https://developer.mozilla.org/en-US/docs/Web/API/Fetch_API",
    "https://github.com/tensorflow/tfjs-node",
    "https://github.com/tensorflow/tfjs/issues/1735",
    "https://github.com/tensorflow/tfjs/issues/5447",
    "https://reactjs.org/docs/error-decoder.html?invariant=",
    "https://www.shadertoy.com/view/4djSRW",
}
URL = re.compile(r"https?://[^\s\"'`)<>]*")


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny():
    """The tiny GPT-2 of the brief, weights scaled and norms perturbed so terms are visible."""
    from transformer_lens.model_bridge.sources import build_bridge_from_module
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=60, n_embd=32, n_layer=2, n_head=4, n_positions=32)
    hf = GPT2LMHeadModel(cfg).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.ndim == 1:
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.3 * torch.randn(p.shape, generator=gen))
            else:
                p.mul_(10.0)
    model = build_bridge_from_module(hf, "GPT2LMHeadModel", hf_config=cfg)
    model.enable_compatibility_mode(disable_warnings=True)
    tokens = torch.randint(0, 60, (2, 6), generator=gen)
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
    prism = tp.LogitPrism(model, cache, tokens=tokens, logits=logits)
    return {
        "prism": prism,
        "model": model,
        "cache": cache,
        "r": prism.residual([3, tp.LogitDiff(4, 5)]),
        "h": prism.heads(3),
        "n": prism.neurons(3, layers=[1]),
    }


def words(result):
    return dataclasses.replace(result, str_tokens=[list(WORDS)] * result.values.shape[0])


def hostile(result):
    return dataclasses.replace(result, str_tokens=[list(HOSTILE)] * result.values.shape[0])


def ids_in(html: str) -> list[str]:
    return re.findall(r'\bid="([^"]+)"', outside_bundle(html))


def outside_bundle(html: str) -> str:
    return html.replace(bundle_script(), "")


class Later:
    """A stand-in for a later weight-space result type."""

    def _tlprisms_views(self):
        return [
            render.heatmap_svg(np.eye(2), ["a", "b"], ["c", "d"], "eye"),
            render.bars(LATER_RESULT),
        ]


LATER_RESULT = None


# ---------------------------------------------------------------------------- escaping
def test_script_json_escapes_and_round_trips():
    value = {
        "tokens": ["</script>", "<!--", "a&b", "\u2028\u2029"],
        "v": np.float32(1.5),
        "n": [float("nan"), np.int64(3)],
    }
    text = script_json(value)
    for bad in ("<", ">", "&", "\u2028", "\u2029"):
        assert bad not in text
    back = json.loads(text)
    assert back["tokens"] == value["tokens"] and back["v"] == 1.5 and back["n"] == [0.0, 3]


@pytest.mark.parametrize("make", ["heatmap", "bar", "lines", "scatter"])
def test_svg_helpers_escape_every_label(make):
    labs = HOSTILE[:3]
    svg = {
        "heatmap": lambda: render.heatmap_svg(
            np.arange(9.0).reshape(3, 3) - 4, labs, labs, "<title> & </script>"
        ),
        "bar": lambda: render.bar_svg([1.0, -2.0, 0.5], labs, "</script>", total=-0.5),
        "lines": lambda: render.lines_svg(
            {"<b>": [1, 2, 3], "</script>": [0, -1, 2]}, labs, "&amp;", highlight="<b>"
        ),
        "scatter": lambda: render.scatter_svg(np.array([[0, 1], [1, 0], [2, 2.0]]), labs, "<i>"),
    }[make]()
    assert "</script>" not in svg and "<b>" not in svg and "<i>" not in svg
    assert "&lt;/script&gt;" in svg and "&lt;b&gt;" in svg and "&amp;amp;" in svg
    root = ET.fromstring(svg)  # well-formed XML, even with control characters in labels
    assert root.tag == "{http://www.w3.org/2000/svg}svg"


def test_svg_control_characters_stay_well_formed():
    svg = render.bar_svg([1.0, 2.0], ["\x00nul", "a\nb"], "t")
    ET.fromstring(svg)
    assert "\\x00nul" in svg and "a\\nb" in svg


def test_svg_helpers_teach_on_bad_input():
    with pytest.raises(PrismError, match="heatmap_svg: got 1 row_labels for 2 rows"):
        render.heatmap_svg(np.zeros((2, 2)), ["a"], ["b", "c"])
    with pytest.raises(PrismError, match=r"scatter_svg: points must be \[n, 2\]"):
        render.scatter_svg(np.zeros((3, 3)), ["a", "b", "c"])
    with pytest.raises(PrismError, match="series 's' has 2 values for 3 x labels"):
        render.lines_svg({"s": [1, 2]}, ["a", "b", "c"])


def test_hostile_tokens_are_text_in_widget_props(tiny):
    html = render.to_html(hostile(tiny["h"]))
    # only real script elements end scripts; the tokens are escaped inside the JSON props
    ours = outside_bundle(html)
    assert ours.count("</script") == ours.count("<script") == 1  # the widget's mount call
    assert bundle_script().lower().count("</script") == 1  # the bundle cannot end early
    assert "<b>" not in ours
    props = re.findall(r'"ColoredTokens"\],(\{.*?\})\);', html)
    tokens = json.loads(props[0])["tokens"]
    # inserted as HTML: each an isolated <bdi> whose title holds the full text and value
    shown = [re.fullmatch(r'<bdi/title="[^"<>]*">([^<>]*)</bdi>', t) for t in tokens[:3]]
    assert [m.group(1) for m in shown] == ["&lt;/script&gt;", "&lt;b&gt;", "&amp;amp;"]


# ---------------------------------------------------------------------------- pages
def test_one_bundle_per_report_and_per_fragment(tiny):
    h = tiny["h"]
    marker = "var CircuitsVis="
    page = (
        render.Report("r")
        .add(h)
        .add(render.head_source_map(h))
        .add(render.source_tokens(h))
        .add(tiny["r"])
        .html()
    )
    assert page.count(marker) == 1
    assert page.index(marker) < page.index('class="tlprisms-cv-mount"')
    frag = render.to_html(h)
    assert frag.count(marker) == 1 and f"if(!window.{CV_GLOBAL})" in frag
    assert render.to_html(tiny["r"]).count(marker) == 0  # plain SVG needs no bundle
    assert render.Report("svg only").add(tiny["r"]).html().count(marker) == 0


def test_ids_fresh_per_render_and_unique_per_page(tiny):
    h = tiny["h"]
    first, second = ids_in(render.to_html(h)), ids_in(render.to_html(h))
    assert first and not set(first) & set(second)
    page = render.Report("r").add(h).add(h).add(render.head_source_map(h)).html()
    ids = ids_in(page)
    assert len(ids) == len(set(ids))
    # every widget's mount div is closed
    assert page.count('<div class="tlprisms-cv-mount"') == 3
    assert page.count("<div") == page.count("</div>")


def test_no_urls_outside_inert_xmlns(tiny):
    global LATER_RESULT
    LATER_RESULT = tiny["r"]
    page = (
        render.Report("urls")
        .add(tiny["r"])
        .add(tiny["h"])
        .add(tiny["n"])
        .add(render.head_source_map(tiny["h"]))
        .add(Later())
        .add(render.top_tokens(tiny["prism"], tp.Component("head", layer=1, head=2)))
        .add(render.lines_svg({"a": [1, 2]}, ["x", "y"]))
        .add(render.scatter_svg([[0, 1], [1, 0]], ["p", "q"]))
        .html()
    )
    ours = outside_bundle(page)
    for match in URL.finditer(ours):
        before = ours[max(0, match.start() - 7) : match.start()]
        assert before == 'xmlns="' and match.group() == "http://www.w3.org/2000/svg", match.group()
    assert set(URL.findall(bundle_script())) <= BUNDLE_URLS
    assert "sourceMappingURL" not in page
    assert "Content-Security-Policy" in page and "connect-src 'none'" in page


def test_lazy_imports():
    code = (
        "import sys, torch, tlprisms, tlprisms.render as R\n"
        "assert 'circuitsvis' not in sys.modules\n"
        "html = R.Report('x').add(R.bar_svg([1.0], ['a'])).html()\n"
        "from tlprisms.render._views_base import bundle_script\n"
        "bundle_script()\n"  # reads the wheel's bundle without importing circuitsvis
        "bad = [m for m in ('circuitsvis', 'playwright', 'IPython') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


# ---------------------------------------------------------------------------- dispatch
def test_default_views_by_prism(tiny):
    r, h, n = tiny["r"], tiny["h"], tiny["n"]
    res = render.to_html(r)
    assert "L1.mlp" in res and "= logit" in res and "tlprisms-cv-mount" not in res
    heads = render.to_html(h)
    assert "Heads (summed over sources)" in heads and '"ColoredTokens"' in heads
    neurons = render.to_html(n)
    assert "L1N" in neurons and "other " in neurons
    assert r._repr_html_().count("<svg") == 1
    assert render.to_html(h, batch=1, target=0).count("batch 1") >= 1


def test_tlprisms_views_protocol_and_errors(tiny):
    global LATER_RESULT
    LATER_RESULT = tiny["r"]
    html = render.to_html(Later())
    assert html.count("<svg") == 2 and ">eye<" in html
    with pytest.raises(PrismError, match="to_html: cannot render a int"):
        render.to_html(3)
    with pytest.raises(PrismError, match="no head terms"):
        render.source_tokens(tiny["r"])
    with pytest.raises(PrismError, match="not split by source position"):
        render.source_tokens(tiny["prism"].heads(3, by_source=False))
    with pytest.raises(PrismError, match="bars: target=5 is out of range"):
        render.bars(tiny["r"], target=5)


def test_without_circuitsvis_plain_views_still_render(tiny, monkeypatch):
    import importlib.util

    from tlprisms.render import _views_base

    real = importlib.util.find_spec
    monkeypatch.setattr(
        _views_base.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "circuitsvis" else real(name, *a),
    )
    html = render.to_html(tiny["h"])
    assert "<svg" in html and "pip install circuitsvis" in html and "CircuitsVis=" not in html
    with pytest.raises(PrismError, match=r"needs the circuitsvis package.*pip install"):
        render.to_html(render.source_tokens(tiny["h"]))


def test_show_outside_ipython_returns_html_object(tiny):
    obj = render.show(tiny["r"])
    assert "<svg" in obj._repr_html_()


def test_save_svg(tiny, tmp_path):
    one = render.save_svg(tiny["r"], tmp_path / "r.svg")
    ET.parse(one)
    both = render.save_svg(tiny["h"], tmp_path / "h.svg")  # heatmap; the widget is skipped
    ET.parse(both)
    stacked = render.save_svg([render.bars(tiny["r"]), render.bars(tiny["n"])], tmp_path / "s.svg")
    assert ET.parse(stacked).getroot().tag.endswith("svg")
    with pytest.raises(PrismError, match="save_svg: this view has no plain SVG figure"):
        render.save_svg(render.source_tokens(tiny["h"]), tmp_path / "w.svg")


# ---------------------------------------------------------------------------- numbers
def test_bars_add_up_to_the_logit(tiny):
    for result, kw in (
        (tiny["r"], {}),
        (tiny["n"], {"kind": "neuron", "k": 5}),
        (tiny["h"], {"k": 3}),
        (tiny["r"], {"target": 1}),
    ):
        fig = render.bars(result, **kw)
        d = fig.data
        assert abs(sum(d["values"]) - d["total"]) < ATOL_TERMS
        assert abs(d["total"] - d["logit"]) < ATOL_TERMS


def test_layer_head_heatmap_and_source_views_match_terms(tiny):
    h = tiny["h"]
    per_head = h.aggregate("kind", "layer", "head").select(kind="head")
    m = render.layer_head_heatmap(h).data["matrix"]
    want = per_head.values[0, -1, 0].reshape(2, 4).double().numpy()
    np.testing.assert_allclose(m, want, atol=ATOL_TERMS)
    props = render.source_tokens(h).props
    by_src = h.select(kind="head").aggregate("kind", "src").values[0, -1, 0].double().numpy()
    np.testing.assert_allclose(props["values"], by_src, atol=ATOL_TERMS)
    maps = render.head_source_map(h, top=None).props
    att = np.array(maps["attention"])  # [head, dest, src]
    assert att.shape == (8, 6, 6)
    assert np.abs(att[:, :5]).max() == 0  # only the explained row is filled
    np.testing.assert_allclose(att.sum((0, 1)), by_src, atol=ATOL_TERMS)
    assert maps["maxValue"] == pytest.approx(np.abs(att).max())
    assert all(isinstance(x, float) for x in props["values"])


@pytest.mark.parametrize(
    "component",
    [
        tp.Component("head", layer=1, head=2),
        tp.Component("head", layer=0, head=1, src=3),
        tp.Component("neuron", layer=1, neuron=7),
        tp.Component("attn", layer=1),
        tp.Component("mlp", layer=0),
        tp.Component("embed"),
        tp.Component("pos_embed"),
    ],
    ids=str,
)
def test_top_tokens_equals_the_prism_terms(tiny, component):
    prism = tiny["prism"]
    tt = render.top_tokens(prism, component, batch=1, pos=-1, k=4)
    ids = [i for _, i, _ in tt.promoted + tt.suppressed]
    kw = {}
    if component.kind == "head":
        kw["heads"] = [component.layer]
        kw["by_source"] = component.src >= 0
    if component.kind == "neuron":
        kw["neurons"] = [component.layer]
    d = prism.decompose(
        ids,
        heads=kw.get("heads", ()),
        neurons=kw.get("neurons", ()),
        by_source=kw.get("by_source", True),
    )
    crit = {
        f: getattr(component, f)
        for f in ("kind", "layer", "head", "neuron", "src")
        if getattr(component, f) != -1 or f == "kind"
    }
    got = d.select(**crit).values[1, 0, :, 0]
    assert d.select(**crit).values.shape[-1] == 1
    torch.testing.assert_close(tt.values[ids].to(got.dtype), got, atol=ATOL_TERMS, rtol=1e-4)
    assert tt.promoted[0][2] == pytest.approx(float(tt.values.max()))
    assert "<svg" in tt.html()


def test_top_tokens_head_against_a_direct_computation(tiny):
    prism, cache, model = tiny["prism"], tiny["cache"], tiny["model"]
    b, i, layer, head = 0, 5, 1, 3
    with torch.no_grad():
        A = cache[f"blocks.{layer}.attn.hook_pattern"][b, head, i]
        v = cache[f"blocks.{layer}.attn.hook_v"][b, :, head]
        write = (A @ v) @ model.blocks[layer].attn.W_O[head]
        write = write - write.mean()  # the final LayerNorm's centring (its weight is in W_U)
        direct = (write / cache["ln_final.hook_scale"][b, i, 0]) @ model.W_U
    tt = render.top_tokens(prism, tp.Component("head", layer=layer, head=head), batch=b, pos=i)
    torch.testing.assert_close(tt.values, direct, atol=1e-6, rtol=1e-4)
    assert float(direct.abs().max()) > 0.1  # the scaled model makes it a real test


def test_top_tokens_teaches(tiny):
    with pytest.raises(PrismError, match="cannot read out a component of kind 'b_U'"):
        render.top_tokens(tiny["prism"], tp.Component("b_U"))
    with pytest.raises(PrismError, match="the first argument must be the LogitPrism"):
        render.top_tokens(tiny["model"], tp.Component("embed"))
    with pytest.raises(PrismError, match="head 9"):
        render.top_tokens(tiny["prism"], tp.Component("head", layer=0, head=9))


def test_top_tokens_on_the_demo_model_gqa_rmsnorm():
    demo = pytest.importorskip("tlprisms.demo")
    model = demo.load_demo_model()
    prism = tp.LogitPrism.run(model, "The capital of France is")
    comp = tp.Component("head", layer=1, head=2)  # one key/value head shared by 4 heads
    tt = render.top_tokens(prism, comp, k=3)
    ids = [i for _, i, _ in tt.promoted]
    d = prism.heads(ids, layers=[1], by_source=False).select(kind="head", layer=1, head=2)
    torch.testing.assert_close(tt.values[ids], d.values[0, 0, :, 0], atol=1e-4, rtol=1e-4)
    assert not any(tok.startswith("#") for tok, _, _ in tt.promoted)  # decoded tokens


# ---------------------------------------------------------------------------- browser
def _playwright():
    if shutil.which("chromium") is None:
        pytest.skip("no chromium executable on the PATH (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright Python package is not installed")
    return sync_playwright


@pytest.fixture(scope="module")
def browser():
    sync_playwright = _playwright()
    from tlprisms.render._browser import CHROMIUM_ARGS

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=shutil.which("chromium"), args=CHROMIUM_ARGS)
        yield b
        b.close()


class Loaded:
    def __init__(self, browser, html=None, path=None):
        self.page = browser.new_page(viewport={"width": 1200, "height": 900})
        self.requests, self.errors, self.console = [], [], []
        allowed = path.resolve().as_uri() if path is not None else None

        def route(r):
            if allowed is not None and r.request.url == allowed:
                r.continue_()
            else:
                self.requests.append(r.request.url)
                r.abort()

        self.page.route("**/*", route)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on(
            "console", lambda m: self.console.append(m.text) if m.type == "error" else None
        )
        if path is not None:
            self.page.goto(allowed)
        else:
            self.page.set_content(html)
        from tlprisms.render._browser import RENDERED_JS

        self.page.wait_for_function(RENDERED_JS, timeout=20000)
        self.page.wait_for_timeout(300)

    def clean(self):
        assert self.errors == [], self.errors
        assert self.console == [], self.console
        assert self.requests == [], self.requests

    def eval(self, js):
        return self.page.evaluate(js)


NONWHITE_JS = """() => [...document.querySelectorAll('canvas')].map(c => {
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; let n = 0;
  for (let i = 0; i < d.length; i += 4)
    if (d[i + 3] > 0 && (d[i] < 245 || d[i + 1] < 245 || d[i + 2] < 245)) n++;
  return n; })"""
VIEWS_JS = """() => [...document.querySelectorAll('.tlprisms-view')].map(v => {
  const m = v.querySelector('.tlprisms-cv-mount');
  return {widget: !!m, kids: (m || v).childElementCount,
          fallback: m ? m.textContent.includes('needs JavaScript') : false}; })"""


@pytest.mark.browser
def test_report_renders_offline_in_chromium(browser, tiny, tmp_path):
    global LATER_RESULT
    LATER_RESULT = tiny["r"]
    h = words(tiny["h"])
    report = (
        render.Report("every view")
        .add(words(tiny["r"]), title="residual")
        .add(h, title="heads")
        .add(words(tiny["n"]), title="neurons")
        .add(render.head_source_map(h), title="head map")
        .add(render.top_tokens(tiny["prism"], tp.Component("neuron", layer=1, neuron=7)))
        .add(
            render.lines_svg(
                {"a": [1, 2, 0], "sum": [0, 1, 3]}, ["x", "y", "z"], "lines", highlight="sum"
            )
        )
        .add(render.scatter_svg([[0, 1], [1, 0], [2, 2]], ["p", "q", "r"], "scatter"))
        .add(Later(), title="later")
    )
    path = report.save(tmp_path / "report.html")
    page = Loaded(browser, path=path)
    views = page.eval(VIEWS_JS)
    assert len(views) == 10 and sum(v["widget"] for v in views) == 2
    assert all(v["kids"] > 0 and not v["fallback"] for v in views), views
    text = page.eval("() => document.body.innerText")
    assert all(w in text for w in WORDS[:5])  # the ColoredTokens view shows the tokens
    pixels = page.eval(NONWHITE_JS)
    assert len(pixels) == 9 and min(pixels) > 0, pixels  # 8 thumbnails + the zoomed map
    assert page.eval(f"() => typeof window.{CV_GLOBAL}.render") == "function"
    page.clean()


@pytest.mark.browser
def test_hostile_tokens_render_as_literal_text(browser, tiny):
    h = hostile(tiny["h"])
    html = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'></head><body>"
        + render.to_html(h)
        + render.to_html(render.head_source_map(h))
        + render.to_html(render.bars(h))
        + "<p id='end'>end</p></body></html>"
    )
    page = Loaded(browser, html=html)
    tokens = page.eval("() => document.querySelector('.colored-tokens').innerText")
    for tok in ("</script>", "<b>", "&amp;"):
        assert tok in tokens
    assert page.eval("() => document.querySelectorAll('.tlprisms-view b').length") == 0
    assert page.eval("() => document.getElementById('end').textContent") == "end"
    assert all(v["kids"] > 0 for v in page.eval(VIEWS_JS))
    page.clean()


@pytest.mark.browser
def test_same_fragment_twice_renders_twice(browser, tiny):
    h = tiny["h"]
    html = "<html><body>" + render.to_html(h) + render.to_html(h) + "</body></html>"
    page = Loaded(browser, html=html)
    mounts = page.eval(
        "() => [...document.querySelectorAll('.tlprisms-cv-mount')]"
        ".map(m => [m.id, m.childElementCount])"
    )
    assert len(mounts) == 2 and len({m[0] for m in mounts}) == 2
    assert all(kids > 0 for _, kids in mounts)
    assert "[0]" in page.eval("() => document.body.innerText")  # positions label tokens
    page.clean()


def test_show_outside_jupyter_writes_the_page_and_says_where(tiny, capsys):
    """In a script, show() writes a self-contained page to a temporary file and prints where
    (it used to return an object silently)."""
    obj = render.show(tiny["r"])
    out = capsys.readouterr().out
    assert obj.path is not None and obj.path.exists() and str(obj.path) in out
    assert obj.path.read_text(encoding="utf-8") == obj._repr_html_()
    obj.path.unlink()
