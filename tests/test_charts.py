"""Charts a reader can read (issue 22, part 5): no term larger than a bar shown is merged into
an "other" bar; scatter plots label only their extreme points; template lines that differ in
scale are scaled per line; the QK matrix's title says what it sums. A browser test lays the
views out at a notebook's width (900 px) and fails on any label that overflows its figure or
overlaps another label (bounding boxes from the DOM)."""

import shutil

import numpy as np
import pytest
import torch

import tlprisms as tp
from tlprisms import render
from tlprisms.demo import load_demo_model, load_demo_sae

#: labels may touch, not overlap: the largest overlap (px, both axes) two labels may have
OVERLAP_PX = 1.0
#: a notebook's output width
NOTEBOOK_PX = 900


@pytest.fixture(scope="module")
def demo():
    return tp.LogitPrism.run(load_demo_model(), "The capital of France is")


def test_no_term_larger_than_a_bar_shown_is_merged(demo):
    """bars(kind=...) merges the other kinds into one bar, and terms past k into 'other':
    a term larger than the smallest bar shown gets its own bar instead."""
    r = demo.through_head(1, 3, " Paris", heads="all", neurons="all")
    fig = render.bars(r, kind="neuron", k=3)
    names, vals = fig.data["labels"], np.asarray(fig.data["values"])
    shown = [i for i, n in enumerate(names) if not n.split()[0].isdigit() and "other" not in n]
    shown = [i for i in shown if not names[i].startswith("biases")]
    smallest = np.abs(vals[shown]).min()
    r = r.aggregate("kind", "layer", "head", "neuron", "pos")  # heads summed over sources
    v = r.values[0, 0, 0].numpy()
    labels = [str(c) for c in r.components]
    const = r.components.is_constant()
    for j in np.nonzero((np.abs(v) > smallest) & ~const)[0]:
        assert labels[j] in names, (labels[j], v[j], smallest)
    assert abs(vals.sum() - float(v.sum())) < 1e-4  # the bars still add up


def test_scatter_labels_only_the_extreme_points():
    pts = np.concatenate([np.random.default_rng(0).normal(0, 0.01, (30, 2)), [[5, 5], [-4, 0]]])
    names = [f"p{i}" for i in range(len(pts))]
    svg = render.scatter_svg(pts, names, "s", label_extremes=2)
    texts = [n for n in names if f">{n}<" in svg]
    assert sorted(texts) == ["p30", "p31"]


def test_verification_scatter_labels_at_most_eight(demo):
    v = demo.verify(demo.full(" Paris"), k=20, sample=20)
    svg = render.to_html(v)
    shown = sum(f">{c}<" in svg for c in {str(x) for x in v.components})
    assert 0 < shown <= 8


def test_template_lines_scale_per_line_when_ranges_differ():
    svg = render.lines_svg(
        {"small": [0.1, -0.2, 0.3], "big": [10.0, 0.0, -30.0]}, ["a", "b", "c"], "t",
        scale="per_line",
    )  # fmt: skip
    assert "small (1 = 0.3" in svg and "big (1 = 30" in svg and "scaled to its largest" in svg
    m = tp.weights.neuron_templates(load_demo_model(), 1, [0, 1, 2], ["1", "2", "3"])
    weighted = tp.weights.TokenMap(
        m.values, m.rows, m.cols, m.title, weights=torch.tensor([1.0, 100.0, 1.0])
    )
    assert "scaled to its largest" in render.to_html(weighted)


def test_qk_matrix_title_says_what_it_sums(demo):
    r = demo.qk(1, 0, keys=[4, 2], contrast=True, q_heads="all")
    title = render.pair_matrix(r).title
    assert "between keys" in title and "sum of the cells" in title and "of key" not in title
    assert "at key" in render.pair_matrix(demo.qk(1, 0, keys=[4])).title


LAYOUT_JS = """() => [...document.querySelectorAll('svg')].map(svg => {
  const box = svg.getBoundingClientRect();
  const t = [...svg.querySelectorAll('text')].map(e => e.getBoundingClientRect())
    .filter(r => r.width > 0 && r.height > 0)
    .map(r => [r.left, r.top, r.right, r.bottom]);
  return {box: [box.left, box.top, box.right, box.bottom], texts: t,
          title: (svg.closest('.tlprisms-view') || svg).textContent.slice(0, 60)}; })"""


def _overlap(a, b):
    return min(a[2], b[2]) - max(a[0], b[0]), min(a[3], b[3]) - max(a[1], b[1])


@pytest.mark.browser
def test_labels_neither_overflow_nor_overlap_at_notebook_width(demo, tmp_path):
    if shutil.which("chromium") is None:
        pytest.skip("needs Debian's chromium")
    from playwright.sync_api import sync_playwright

    from tlprisms.render._browser import CHROMIUM_ARGS

    model, sae = demo.model, load_demo_sae()
    h = demo.heads(" Paris")
    m = tp.weights.neuron_templates(model, 1, [0, 1, 2, 3, 4], [str(i) for i in range(10)])
    weighted = tp.weights.TokenMap(
        m.values, m.rows, m.cols, m.title, weights=torch.linspace(1, 50, 5)
    )
    report = (
        render.Report("layout")
        .add(render.bars(demo.residual(" Paris")), title="bars")
        .add(render.bars(demo.through_head(1, 3, " Paris", heads="all"), k=6), title="waterfall")
        .add(render.layer_head_heatmap(h), title="heatmap")
        .add(weighted, title="templates")
        .add(demo.verify(demo.full(" Paris")), title="verification")
        .add(render.pair_matrix(demo.qk(1, 0, keys=[4, 2], contrast=True)), title="qk")
        .add(render.bars(demo.neurons(" Paris"), kind="neuron"), title="neuron bars")
        .add(render.head_source_map(h), title="head x source map")
        .add(render.top_tokens(demo, tp.Component("neuron", layer=1, neuron=7)), title="top tokens")
        .add(tp.weights.unembed_map(model, [str(i) for i in range(10)]), title="unembeddings")
        .add(demo.effects(" Paris", [tp.Component("head", layer=1, head=h) for h in range(4)]),
             title="effects")
        .add(render.feature_terms(demo.features(" Paris", sae), model, [sae]), title="features")
    )  # fmt: skip
    path = report.save(tmp_path / "layout.html")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=shutil.which("chromium"), args=CHROMIUM_ARGS)
        page = b.new_page(viewport={"width": NOTEBOOK_PX, "height": 900})
        page.route(
            "**/*", lambda r: r.continue_() if r.request.url.startswith("file:") else r.abort()
        )
        page.goto(path.resolve().as_uri())
        page.wait_for_timeout(500)
        figures = page.evaluate(LAYOUT_JS)
        b.close()
    assert len(figures) >= 12
    bad = []
    for f in figures:
        x0, y0, x1, y1 = f["box"]
        for r in f["texts"]:
            if r[0] < x0 - 1 or r[2] > x1 + 1 or r[1] < y0 - 1 or r[3] > y1 + 1:
                bad.append(("overflow", f["title"], r))
        t = f["texts"]
        for i in range(len(t)):
            for j in range(i + 1, len(t)):
                dx, dy = _overlap(t[i], t[j])
                if dx > OVERLAP_PX and dy > OVERLAP_PX:
                    bad.append(("overlap", f["title"], t[i], t[j]))
    assert bad == [], bad[:5]


#: an attention pattern of a few tokens must fit a notebook screen (it was 1,180 px tall)
PATTERN_MAX_HEIGHT_PX = 600


@pytest.mark.browser
def test_attention_pattern_of_six_tokens_is_not_a_page_tall(demo, tmp_path):
    if shutil.which("chromium") is None:
        pytest.skip("needs Debian's chromium")
    from playwright.sync_api import sync_playwright

    from tlprisms.render._browser import CHROMIUM_ARGS, RENDERED_JS

    toks = [f"t{i}" for i in range(demo.n_ctx)]
    w = render.attention_pattern(demo.cache["blocks.1.attn.hook_pattern"][0, 3], toks)
    path = render.Report("pattern").add(w).save(tmp_path / "pattern.html")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=shutil.which("chromium"), args=CHROMIUM_ARGS)
        page = b.new_page(viewport={"width": NOTEBOOK_PX, "height": 900})
        page.goto(path.resolve().as_uri())
        page.wait_for_function(RENDERED_JS, timeout=20000)
        page.wait_for_timeout(500)
        h = page.evaluate(
            "() => document.querySelector('.tlprisms-cv-mount').getBoundingClientRect().height"
        )
        b.close()
    assert 100 < h <= PATTERN_MAX_HEIGHT_PX


def test_task_bars_are_sorted_by_the_value_shown():
    """A task's 'mean term' bars were in mean-|term| order while showing the mean."""
    import re

    from tlprisms.demo import capital_task

    res = tp.explain_task(load_demo_model(), capital_task()[:12], heads="all", progress=False)
    svg = render.to_html(res)
    shown = [float(x) for x in re.findall(r">(-?\d+\.\d+(?:e-?\d+)?)</text>", svg)]
    means = res.summary().head(20)["mean"].tolist()
    bars = [v for v in shown if any(abs(v - m) < 5e-3 * max(1, abs(m)) for m in means)]
    assert len(bars) == len(means) and bars == sorted(bars, reverse=True), bars
