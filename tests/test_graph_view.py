"""The attribution-graph view (tlprisms.render.graph): offline, escaped, interactive.

The HTML holds every kept node's label (escaped), fetches nothing, and a hostile token or
label (markup, ``</script>``, quotes, right-to-left overrides, a 500-character token) stays
text. The browser test (marked ``browser``) loads the view in headless Chromium at a
notebook's width, hovers and clicks a node and checks the highlighted paths, that nothing
raised or was requested, and that no label overflows its figure.
"""

import dataclasses
import html
import re
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from test_render import Loaded, browser  # noqa: F401 (fixture)

import tlprisms as tp
from tlprisms import render
from tlprisms._core import views as registry
from tlprisms._core.graph import AttributionGraph
from tlprisms.demo import load_demo_model
from tlprisms.render._escape import token_label
from tlprisms.render.graph import GraphView, graph_svg, graph_view

LONG = "long" + "x" * 496
PWN = "</script><img src=x onerror=window.__pwned=1><script>window.__pwned=2</script>"
HOSTILE_TOKENS = [
    PWN,
    "say \"hi\" 'x' & <i>",
    "\u202eevil",
    "\u05e9\u05dc\u05d5\u05dd",
    "<!--",
    LONG,
]
BIDI = re.compile("[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2067]")
SVG = "{http://www.w3.org/2000/svg}"
XMLNS = "http://www.w3.org/2000/svg"
NOTEBOOK_PX = 900


@pytest.fixture(scope="module")
def graph():
    prism = tp.LogitPrism.run(load_demo_model(), "The capital of France is")
    return prism.graph(" Paris", heads=True, qk=2)


def hostile(g: AttributionGraph) -> AttributionGraph:
    """``g`` with hostile tokens, target and node labels (the five strongest neurons and
    the logit renamed)."""
    labels = g.nodes.label.astype(object).copy()
    infl = np.abs(g.nodes.influence)
    neurons = [i for i in np.argsort(-infl) if g.nodes.kind[i] == "neuron"][:5]
    for k, i in enumerate(neurons):
        labels[i] = f"{HOSTILE_TOKENS[k % len(HOSTILE_TOKENS)]}#{k}"
    (logit,) = np.nonzero(g.nodes.kind == "logit")[0]
    labels[logit] = f"logit {PWN!r}@{g.meta['pos']}"
    nodes = dataclasses.replace(g.nodes, label=np.asarray(labels, dtype=str))
    meta = dict(g.meta, tokens=[list(HOSTILE_TOKENS)], target_label=repr(PWN))
    return dataclasses.replace(g, nodes=nodes, meta=meta)


def drawn_text(el) -> str:
    """An SVG <text>'s drawn text, without its hover <title>."""
    return (el.text or "") + "".join((c.tail or "") for c in el)


def svg_of(page_html: str) -> ET.Element:
    m = re.search(r"<svg.*?</svg>", page_html, flags=re.S)
    assert m
    return ET.fromstring(m.group(0))


# ---------------------------------------------------------------------------- the HTML
def test_every_kept_node_label_is_in_the_html_escaped(graph):
    page = render.to_html(graph)
    for label in graph.nodes.label:
        assert html.escape(token_label(label).full) in page, label
    assert page.count('class="tlp-node"') == len(graph)


def test_nothing_is_fetched(graph):
    page = render.to_html(graph)
    assert not re.search(r"<script[^>]*\bsrc\s*=", page, flags=re.I)
    assert set(re.findall(r"https?://[^\"'\s<>)]*", page)) <= {XMLNS}
    assert "<link" not in page and "@import" not in page and "url(" not in page


def test_registered_for_every_way_a_graph_is_shown(graph, tmp_path, capsys):
    assert "tlprisms-graph" in graph._repr_html_()
    assert "tlprisms-graph" in render.to_html(graph)
    assert registry.svg(graph).startswith("<svg")
    assert render.save_svg(graph, tmp_path / "g.svg").read_text().count('class="tlp-node"') == len(
        graph
    )
    shown = graph.show()  # outside IPython: a page written to a temporary file
    assert shown.path.is_file() and "tlprisms-graph" in shown.path.read_text()
    assert "wrote the view" in capsys.readouterr().out
    page = render.Report("graphs").add(graph, title="graph").html()
    assert page.count("tlprisms-graph") >= 1 and page.count("<script>") >= 1
    # options reach the view through to_html
    assert render.to_html(graph, max_edges=5).count('class="tlp-edge"') == 5


def test_edges_are_capped_by_flow_and_the_rest_counted(graph):
    svg = graph_svg(graph, max_edges=20)
    assert svg.count('class="tlp-edge"') == 20
    assert f"{graph.n_edges - 20} hidden" in svg
    view = graph_view(graph, max_edges=20)
    strongest = np.sort(np.abs(graph.flow))[-20:]
    drawn = sorted(abs(graph.flow[np.nonzero((graph.src == s) & (graph.dst == d))[0][0]])
                   for s, d in view.data["e"])  # fmt: skip
    np.testing.assert_allclose(drawn, strongest)
    assert "all drawn" in graph_svg(graph, max_edges=10**6)


def test_sign_colours_and_sizes(graph):
    root = svg_of(graph_svg(graph, max_edges=50))
    colours = {p.get("stroke") for p in root.iter(f"{SVG}path") if p.get("class") == "tlp-edge"}
    assert colours == {render._svg.POSITIVE, render._svg.NEGATIVE}
    radius = {}
    for g in root.iter(f"{SVG}g"):
        if g.get("class") == "tlp-node":
            radius[int(g.get("data-n"))] = float(g.find(f"{SVG}circle").get("r"))
    neurons = np.nonzero(graph.nodes.kind == "neuron")[0]
    big = neurons[np.argmax(np.abs(graph.nodes.influence[neurons]))]
    small = neurons[np.argmin(np.abs(graph.nodes.influence[neurons]))]
    assert radius[int(big)] > radius[int(small)]


def test_hostile_labels_and_tokens_stay_text(graph):
    h = hostile(graph)
    page = render.to_html(h)
    assert "<img" not in page and "<i>" not in page and "<!--" not in page
    assert page.count("<script") == 1 and page.count("</script>") == 1  # the view's own
    assert "\u202e" not in page
    for label in h.nodes.label:
        assert html.escape(token_label(label).full) in page
    root = svg_of(page)  # the SVG is well-formed XML
    for t in root.iter(f"{SVG}text"):
        shown = drawn_text(t)
        assert not BIDI.search(shown), ascii(shown)
        assert "x" * 40 not in shown  # the long token is shortened where drawn
    # the title names the hostile target as text
    assert html.escape("</script>") in page


def test_refuses_what_is_not_a_graph(graph):
    with pytest.raises(tp.errors.ArgumentError, match="AttributionGraph"):
        graph_view("not a graph")
    with pytest.raises(tp.errors.ArgumentError, match="max_edges"):
        graph_view(graph, max_edges=-1)


def test_a_circuit_tracer_graph_is_drawn():
    """A graph read from circuit-tracer JSON (no flows, no inputs) is drawn by |weight|."""
    data = {
        "metadata": {"prompt_tokens": ["<b>", " x"]},
        "nodes": [
            {"node_id": "E_5_0", "feature_type": "embedding", "ctx_idx": 0, "layer": "E",
             "influence": 0.5},
            {"node_id": "0_7_1", "feature_type": "cross layer transcoder", "ctx_idx": 1,
             "layer": "0", "feature": 7, "influence": 0.3, "activation": 1.2},
            {"node_id": "2_9_1", "feature_type": "logit", "ctx_idx": 1, "layer": "2",
             "feature": 9, "is_target_logit": True, "clerp": "logit </script>"},
        ],
        "links": [
            {"source": "E_5_0", "target": "0_7_1", "weight": 0.4},
            {"source": "0_7_1", "target": "2_9_1", "weight": -0.2},
        ],
    }  # fmt: skip
    g = AttributionGraph.from_json(data)
    page = render.to_html(g)
    assert page.count('class="tlp-edge"') == 2 and page.count('class="tlp-node"') == 3
    assert "&lt;b&gt;" in page and "<b>" not in page and page.count("</script>") == 1


# ---------------------------------------------------------------------------- the browser
LAYOUT_JS = """() => [...document.querySelectorAll('.tlprisms-graph svg')].map(svg => {
  const box = svg.getBoundingClientRect();
  const t = [...svg.querySelectorAll('text')].map(e => e.getBoundingClientRect())
    .filter(r => r.width > 0 && r.height > 0).map(r => [r.left, r.top, r.right, r.bottom]);
  const labels = [...svg.querySelectorAll('text.tlp-label, text.tlp-const')]
    .map(e => e.getBoundingClientRect()).map(r => [r.left, r.top, r.right, r.bottom]);
  return {box: [box.left, box.top, box.right, box.bottom], texts: t, labels: labels}; })"""
STATE_JS = """() => ({
  on: [...document.querySelectorAll('.tlp-edge.tlp-on')].map(e => +e.dataset.e)
    .sort((a, b) => a - b),
  nodes: [...document.querySelectorAll('.tlp-node.tlp-on')].map(e => +e.dataset.n),
  sel: [...document.querySelectorAll('.tlp-node.tlp-sel')].map(e => +e.dataset.n),
  info: document.querySelector('.tlp-graph-info').textContent,
  pwned: window.__pwned === undefined ? null : window.__pwned,
  width: document.documentElement.scrollWidth })"""


def paths_through(edges: list, node: int) -> tuple[set, set]:
    """(edges, nodes) on the drawn paths through ``node``: its ancestors' edges into it and
    its descendants' edges out of it, transitively."""
    on, nodes = set(), {node}
    for end, other in ((1, 0), (0, 1)):  # incoming (walk to sources), then outgoing
        todo, seen = [node], {node}
        while todo:
            v = todo.pop()
            for j, e in enumerate(edges):
                if e[end] == v:
                    on.add(j)
                    nodes.add(e[other])
                    if e[other] not in seen:
                        seen.add(e[other])
                        todo.append(e[other])
    return on, nodes


@pytest.mark.browser
@pytest.mark.parametrize("kind", ["plain", "hostile"])
def test_hover_click_highlight_in_chromium(browser, graph, tmp_path, kind):  # noqa: F811
    g = hostile(graph) if kind == "hostile" else graph
    view = graph_view(g, max_edges=120)
    assert isinstance(view, GraphView)
    path = render.Report("graph").add(view).save(tmp_path / "graph.html")
    page = Loaded(browser, path=path)
    page.page.set_viewport_size({"width": NOTEBOOK_PX, "height": 900})
    page.page.wait_for_timeout(100)
    infl = np.abs(np.nan_to_num(g.nodes.influence))
    node = int(max(np.nonzero(g.nodes.kind == "neuron")[0], key=lambda i: infl[i]))
    circle = page.page.locator(f".tlp-node[data-n='{node}'] circle")
    circle.hover()
    state = page.eval(STATE_JS)
    assert token_label(g.nodes.label[node]).full in state["info"]
    assert "influence" in state["info"] and state["on"] == []
    circle.click()
    state = page.eval(STATE_JS)
    on, nodes = paths_through(view.data["e"], node)
    assert state["sel"] == [node]
    assert on and state["on"] == sorted(on)
    assert set(state["nodes"]) == nodes
    circle.click()  # a second click clears
    state = page.eval(STATE_JS)
    assert state["on"] == [] and state["sel"] == [] and state["nodes"] == []
    # the logit's hover line shows its (hostile) label as text
    page.page.locator(".tlp-node[data-kind='logit'] circle").hover()
    state = page.eval(STATE_JS)
    logit = int(np.nonzero(g.nodes.kind == "logit")[0][0])
    assert token_label(g.nodes.label[logit]).full in state["info"]
    assert state["pwned"] is None
    assert state["width"] <= NOTEBOOK_PX  # a wide graph scrolls inside its view
    layout = page.eval(LAYOUT_JS)
    page.clean()  # no page error, no console error, no request
    page.page.close()
    assert len(layout) == 1
    x0, y0, x1, y1 = layout[0]["box"]
    bad = [r for r in layout[0]["texts"]
           if r[0] < x0 - 1 or r[2] > x1 + 1 or r[1] < y0 - 1 or r[3] > y1 + 1]  # fmt: skip
    assert bad == []
    labels = layout[0]["labels"]
    assert labels
    for i in range(len(labels)):
        for j in range(i + 1, len(labels)):
            a, b = labels[i], labels[j]
            dx = min(a[2], b[2]) - max(a[0], b[0])
            dy = min(a[3], b[3]) - max(a[1], b[1])
            assert not (dx > 1 and dy > 1), (a, b)
