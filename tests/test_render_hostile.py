"""Hostile tokens in every view: a 500-character token, bidi controls, markup, quotes.

Every renderer draws a token label at most 24 characters long (an ellipsis ends a shortened
one) with the full text on hover, shows bidi control characters as ``\\u202e`` escapes
instead of obeying them, isolates each label (FSI ... PDI, or ``<bdi>`` in HTML), and never
lets a token become markup. The browser test (marked ``browser``) checks that a report of
every view stays as wide as the window, raises nothing and requests nothing.
"""

import dataclasses
import html
import re
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch
from test_render import Loaded, browser, outside_bundle, tiny  # noqa: F401 (fixtures)

import tlprisms as tp
from tlprisms import render
from tlprisms.render._page import as_view
from tlprisms.render._views_base import Figure, Widget, bundle_script

LONG = "long" + "x" * 496  # one 500-character token with no space to break at
RLO = "\u202eevil"  # a right-to-left override: would reverse what follows it
HOSTILE = [
    RLO,
    "</script>",
    "<b>&amp;",
    "say \"hi\" 'x' & <i>",
    "\u05e9\u05dc\u05d5\u05dd\u2069",
    LONG,
]  # the last position (the one a prism explains) holds the long token
#: the longest label any view may draw for a token (24 characters in token lists, up to 36
#: as a bar label), quoted and isolated
MAX_LABEL = 36 + 2 + 2
FSI, PDI = "\u2068", "\u2069"
BIDI = re.compile("[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2067]")
RUN = "x" * 40  # any longer run of the long token is a label that was not shortened
SVG = "{http://www.w3.org/2000/svg}"


def hostile(result):
    return dataclasses.replace(result, str_tokens=[list(HOSTILE)] * result.values.shape[0])


@pytest.fixture(scope="module")
def views(tiny):  # noqa: F811
    """Every view of tlprisms.render, fed the hostile tokens."""
    h, r, n = hostile(tiny["h"]), hostile(tiny["r"]), hostile(tiny["n"])
    labels = HOSTILE[:3] + [LONG]
    grid = np.arange(16.0).reshape(4, 4) - 7
    tmap = tp.weights.TokenMap(
        values=torch.tensor(grid, dtype=torch.float32),
        rows=labels,
        cols=labels,
        title="map",
        weights=torch.ones(4),
    )
    proj = tp.weights.TokenProjection(
        points=torch.tensor(grid[:, :2], dtype=torch.float32),
        labels=labels,
        explained_variance=torch.ones(2),
        title="projection",
    )
    return {
        "default heads": as_view(h),
        "default residual": as_view(r),
        "default neurons": as_view(n),
        "bars": render.bars(h),
        "layer_head_heatmap": render.layer_head_heatmap(h),
        "source_tokens": render.source_tokens(h),
        "head_source_map": render.head_source_map(h),
        "token map": as_view(tmap),
        "projection": as_view(proj),
        "heatmap_svg": Figure(render.heatmap_svg(grid, labels, labels, "heatmap " + RLO)),
        "bar_svg": Figure(render.bar_svg([1.0, -2.0, 0.5, 3.0], labels, "bars", total=2.5)),
        "lines_svg": Figure(
            render.lines_svg(
                {LONG: [1, 2, 3, 4], RLO: [0, -1, 2, 1]}, labels, "lines", highlight=RLO
            )
        ),
        "scatter_svg": Figure(render.scatter_svg(grid[:, :2], labels, "scatter")),
    }


@pytest.fixture(scope="module")
def top_tokens_view(tiny):  # noqa: F811
    """top_tokens with a tokenizer that decodes to the hostile tokens."""
    from tlprisms.render import _top_tokens

    prism = tiny["prism"]
    if hasattr(_top_tokens, "_token_str"):  # where top_tokens has looked up token strings
        owner, name = _top_tokens, "_token_str"

        def fake(prism, i):
            return HOSTILE[i % len(HOSTILE)]
    else:
        owner, name = type(prism.view), "token_label"

        def fake(self, i, quote=False):
            return HOSTILE[i % len(HOSTILE)]

    real = getattr(owner, name)
    setattr(owner, name, fake)
    try:
        return render.top_tokens(prism, tp.Component("head", layer=1, head=2), k=6)
    finally:
        setattr(owner, name, real)


def parts(view):
    """(figures, widgets) in a view."""
    figs, widgets, todo = [], [], [view]
    while todo:
        v = todo.pop()
        if isinstance(v, Figure):
            figs.append(v)
        elif isinstance(v, Widget):
            widgets.append(v)
        todo.extend(getattr(v, "views", []))
    return figs, widgets


def shown_text(el):
    """An SVG <text> element's drawn text: its own text, without its hover <title>."""
    return (el.text or "") + "".join((c.tail or "") for c in el)


def hover_texts(root):
    return [t.text or "" for t in root.iter(f"{SVG}title")]


def assert_isolated_label(text):
    """A label drawn for a token: printable, no live bidi control, isolates balanced."""
    assert not BIDI.search(text), ascii(text)
    depth = 0
    for ch in text:
        depth += {FSI: 1, PDI: -1}.get(ch, 0)
        assert depth >= 0, ascii(text)
    assert depth == 0, ascii(text)


def check_svg(svg, *, labels_hover):
    root = ET.fromstring(svg)  # well-formed XML
    texts = [shown_text(t) for t in root.iter(f"{SVG}text")]
    for text in texts:
        assert RUN not in text, text[:80]
        assert len(text) <= 140, text[:80]  # titles wrap at about 100 characters
        assert_isolated_label(text)
    if labels_hover:  # the long token is a label: shortened on the page, whole on hover
        assert any(
            t.startswith(FSI)
            and t.endswith(PDI)
            and "\u2026" in t
            and "longxx" in t
            and len(t) <= MAX_LABEL
            for t in texts
        ), texts
        assert any(LONG in h for h in hover_texts(root))
        assert any(t.startswith(FSI) and "\\u202eevil" in t for t in texts), texts
    for h in hover_texts(root):
        assert_isolated_label(h)


def check_html(fragment):
    """A fragment (scripts aside): tokens are text, shortened outside hover attributes."""
    ours = outside_bundle(fragment)
    assert ours.count("<script") == ours.count("</script>")
    body = re.sub(r"<script>.*?</script>", "", ours, flags=re.S)
    assert "<b>" not in body and "<i>" not in body and "</script>" not in body
    assert "\u202e" not in fragment.replace(bundle_script(), "")
    visible = re.sub(r'\stitle="[^"]*"', "", body)
    visible = re.sub(r"<title>.*?</title>", "", visible, flags=re.S)
    assert RUN not in visible


# ---------------------------------------------------------------------------- every view
@pytest.mark.parametrize(
    "name",
    [
        "default heads",
        "default residual",
        "default neurons",
        "bars",
        "layer_head_heatmap",
        "source_tokens",
        "head_source_map",
        "token map",
        "projection",
        "heatmap_svg",
        "bar_svg",
        "lines_svg",
        "scatter_svg",
    ],
)
def test_every_view_shortens_isolates_and_escapes(views, name):
    view = views[name]
    figs, widgets = parts(view)
    assert figs or widgets
    token_labels = name in (
        "token map",
        "projection",
        "heatmap_svg",
        "bar_svg",
        "lines_svg",
        "scatter_svg",
    )
    for fig in figs:
        check_svg(fig.svg, labels_hover=token_labels)
    check_html(render.to_html(view))
    check_html(render.Report("hostile " + RLO).add(view, title=RLO).html())


def test_a_long_title_wraps_within_the_figure():
    svg = render.bar_svg([1.0], ["a"], "title " + LONG)
    root = ET.fromstring(svg)
    lines = [shown_text(t) for t in root.iter(f"{SVG}text") if t.get("font-size") == "14"]
    width = float(root.get("width"))
    assert 1 <= len(lines) <= 3 and lines[-1].endswith("\u2026")
    assert all(8 + 8.6 * len(line) <= width + 8.6 for line in lines), (width, lines)


def test_top_tokens_labels(top_tokens_view):
    check_svg(top_tokens_view.svg, labels_hover=True)
    check_html(top_tokens_view.html())


def test_colored_tokens_props(views):
    (widget,) = parts(views["source_tokens"])[1]
    tokens = widget.props["tokens"]
    assert len(tokens) == len(HOSTILE)
    for tok, raw in zip(tokens, HOSTILE):
        # ColoredTokens turns whitespace into &nbsp; and inserts the token as HTML: no
        # whitespace in the markup, the label escaped and isolated, the full text on hover
        m = re.fullmatch(r'<bdi/title="([^"<>]*)">([^<>]*)</bdi>', tok)
        assert m, tok
        title, shown = html.unescape(m.group(1)), html.unescape(m.group(2))
        assert len(shown) <= 24 and not BIDI.search(shown) and "\u2069" not in shown
        full = raw.replace("\u202e", "\\u202e").replace("\u2069", "\\u2069")
        assert title.startswith(f"{FSI}{full}{PDI} (position "), ascii(title[:60])
    assert html.unescape(tokens[-1]).count("x") > 400  # the hover holds all of it
    assert "\u2026" in tokens[-1] and RUN not in tokens[-1].split(">", 1)[1]
    assert ".colored-tokens>div{display:none" in widget.css  # CircuitsVis's raw-HTML tooltip
    assert LONG in html.unescape(widget.footer)  # full text of the shortened labels


def test_attention_heads_tokens(views):
    (widget,) = parts(views["head_source_map"])[1]
    tokens = widget.props["tokens"]
    for tok in tokens:  # drawn on a canvas as "token (position)": isolated, short
        assert tok.startswith(FSI) and tok.endswith(PDI) and len(tok) <= 26, ascii(tok)
        assert_isolated_label(tok)
    assert tokens[0] == f"{FSI}\\u202eevil{PDI}"
    assert tokens[1] == f"{FSI}</script>{PDI}"  # canvas text: not HTML-escaped
    assert tokens[-1] == FSI + LONG[:23] + "\u2026" + PDI
    assert "1 token label shortened" in widget.footer and LONG in html.unescape(widget.footer)


def test_captions_quote_the_shortened_token(views):
    title = views["bars"].title
    assert f"position 5 {FSI}{(chr(39) + LONG)[:25]}\u2026{PDI} (batch 0)" in title


# ---------------------------------------------------------------------------- browser
WIDTH_JS = "() => document.documentElement.scrollWidth"
TOKENS_JS = """() => [...document.querySelectorAll('.colored-tokens')].map(ct =>
  [...ct.querySelectorAll(':scope>span>span')].map(s => {
    const r = s.getBoundingClientRect(); const b = s.querySelector('bdi');
    return {x: r.left, y: r.top, w: r.width, text: s.innerText, title: b ? b.title : null};
  }))"""


@pytest.mark.browser
def test_hostile_report_stays_narrow_offline(browser, views, top_tokens_view, tmp_path):  # noqa: F811
    report = render.Report("hostile tokens " + LONG)
    for name, view in views.items():
        report.add(view, title=f"{name}: {LONG}")
    report.add(top_tokens_view, title="top tokens")
    page = Loaded(browser, path=report.save(tmp_path / "hostile.html"))
    width = page.eval(WIDTH_JS)
    assert width <= 1200, width  # the window is 1200 px wide: nothing sticks out
    groups = page.eval(TOKENS_JS)
    assert len(groups) == 2  # the default heads view and source_tokens
    for toks in groups:
        assert len(toks) == len(HOSTILE)
        rows = [t for t in toks if abs(t["y"] - toks[0]["y"]) < 2]
        xs = [t["x"] for t in rows]
        assert xs == sorted(xs), toks  # left to right in token order: nothing reversed
        assert all(t["w"] < 400 for t in toks), toks
        assert toks[0]["text"].replace("\u00a0", " ") == "\\u202eevil"
        assert RUN not in toks[-1]["text"] and LONG in toks[-1]["title"]
    # hovering a token shows its title only, never CircuitsVis's tooltip of raw markup
    page.page.hover(".colored-tokens>span>span >> nth=1")
    page.page.wait_for_timeout(100)
    text = page.eval("() => document.body.innerText")
    assert "bdi" not in text and "\u202e" not in text  # (the section titles hold LONG)
    assert (
        page.eval(
            "() => document.querySelectorAll('.tlprisms-section b, .tlprisms-section i').length"
        )
        == 0
    )
    page.clean()
