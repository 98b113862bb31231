"""What a rendered view is: a plain SVG :class:`Figure`, a CircuitsVis :class:`Widget`, or a
:class:`Group` of views under a caption; and the offline CircuitsVis bundle they share.

A widget's HTML is ``<div id=...>`` (closed) plus a ``<script>`` that calls the bundle's
``render(id, Component, props)`` with the props as script-safe JSON. The bundle itself
(``circuitsvis/dist/cdn/iife.js``, shipped in the circuitsvis wheel, React included) is
inlined once per page or fragment inside a guard, so a page that holds it twice runs it once.
Ids are fresh on every render, so displaying the same view twice gives two live copies.
CircuitsVis is never imported here: only its wheel's files are read.
"""

import functools
import importlib.util
import os
import re
from pathlib import Path
from typing import Optional

from tlprisms._core import arguments as check
from tlprisms._core.errors import ArgumentError, PrismError
from tlprisms.render import _args as arg
from tlprisms.render._escape import esc, new_id, script_json

__all__ = [
    "View",
    "Figure",
    "Widget",
    "Group",
    "bundle_script",
    "notebook_bundle",
    "bundle_path",
    "CV_GLOBAL",
    "WRAP",
]

#: the window property the guarded bundle stores CircuitsVis's exports in
CV_GLOBAL = "__tlprismsCircuitsVis"
#: inline style for captions: an unbroken run of text wraps instead of widening the page
WRAP = "overflow-wrap:anywhere;unicode-bidi:isolate"
_MOUNT_FALLBACK = (
    "CircuitsVis view: it needs JavaScript (in Jupyter, trust the notebook to run it)."
)


def bundle_path() -> Path:
    """The installed CircuitsVis wheel's offline bundle (``dist/cdn/iife.js``), found without
    importing circuitsvis; a :class:`PrismError` saying how to install it otherwise."""
    spec = importlib.util.find_spec("circuitsvis")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise PrismError(
            "tlprisms.render: this view needs the circuitsvis package (its offline JavaScript "
            "bundle), which is not installed. Install it with `pip install tlprisms[viz]` "
            "(or `pip install circuitsvis`); the plain SVG views (bars, layer_head_heatmap) "
            "work without it."
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "dist" / "cdn" / "iife.js"
        if path.is_file():
            return path
    raise PrismError(
        "tlprisms.render: the installed circuitsvis has no dist/cdn/iife.js bundle (a source "
        "checkout without a build?). Install the circuitsvis wheel from PyPI: "
        "`pip install --force-reinstall circuitsvis`."
    )


@functools.lru_cache(maxsize=2)
def _bundle_text(path: str, mtime: float) -> str:
    js = Path(path).read_text(encoding="utf-8")
    # drop the source-map comment (devtools would fetch it) and make the text unable to end
    # or comment out the <script> element it is inlined in
    js = re.sub(r"//[#@] sourceMappingURL=\S*\s*$", "", js)
    js = re.sub(r"</(script)", r"<\\/\1", js, flags=re.IGNORECASE)
    js = js.replace("<!--", "<\\!--")
    return js


def bundle_script() -> str:
    """A ``<script>`` that defines the CircuitsVis bundle once per page (guarded)."""
    path = bundle_path()
    js = _bundle_text(str(path), os.path.getmtime(path))
    return (
        f"<script>if(!window.{CV_GLOBAL}){{window.{CV_GLOBAL}=(function(){{\n{js}\n"
        f";return CircuitsVis;}})();}}</script>"
    )


#: Jupyter shows many views per notebook: the first view displayed in a kernel session
#: carries the CircuitsVis bundle and the later ones reuse it (``window.__tlprismsCircuitsVis``),
#: so a saved notebook holds one copy and still renders offline (outputs run in order)
_NOTEBOOK = {"sent": False}


def _in_kernel() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    ip = get_ipython()
    return ip is not None and getattr(ip, "kernel", None) is not None


def notebook_bundle(needed: bool) -> bool:
    """Whether a view Jupyter displays now must carry the bundle: outside a kernel always
    (when needed), in a kernel only the first time in the session."""
    if not needed:
        return False
    if not _in_kernel():
        return True
    if _NOTEBOOK["sent"]:
        return False
    _NOTEBOOK["sent"] = True
    return True


class View:
    """One rendered view. ``html()`` is a self-contained fragment; Jupyter shows it."""

    title: str = ""

    @property
    def needs_bundle(self) -> bool:
        return False

    def fragment(self, *, bundle: bool) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def html(self) -> str:
        """A self-contained HTML fragment (inlines the CircuitsVis bundle when needed)."""
        return self.fragment(bundle=self.needs_bundle)

    def _repr_html_(self) -> str:  # Jupyter: the bundle once per kernel session
        return self.fragment(bundle=notebook_bundle(self.needs_bundle))

    def figures(self) -> list["Figure"]:
        """The plain SVG figures in this view (for :func:`save_svg`)."""
        return []


class Figure(View):
    """A plain SVG figure (``.svg``), exportable with :func:`tlprisms.render.save_svg`.

    ``data`` holds the numbers drawn (e.g. ``labels``, ``values``, ``total`` for bars).
    """

    @check.entry
    def __init__(self, svg: str, title: str = "", data: Optional[dict] = None) -> None:
        svg = str(arg.text(svg, "svg", "Figure"))
        if "<svg" not in svg:
            raise ArgumentError(
                f"Figure: svg must be an <svg> element as a string, got {svg[:40]!r}; make "
                "one with heatmap_svg, bar_svg, lines_svg or scatter_svg."
            )
        if data is not None and not isinstance(data, dict):
            raise ArgumentError(f"Figure: data must be a dict or None, got {arg.describe(data)}.")
        self.svg = svg
        self.title = str(arg.text(title, "title", "Figure"))
        self.data = data or {}  # the numbers drawn, for tests and re-use

    def fragment(self, *, bundle: bool) -> str:
        return (
            f'<div class="tlprisms-view tlprisms-figure" id="{new_id()}" '
            f'style="margin:8px 0;overflow-x:auto">{self.svg}</div>'
        )

    def figures(self) -> list["Figure"]:
        return [self]

    def __repr__(self) -> str:
        return f"Figure({self.title!r})"


class Widget(View):
    """A CircuitsVis component rendered offline from the bundle in the circuitsvis wheel.

    Args:
        component: the bundle's export, e.g. ``"ColoredTokens"``, ``"AttentionHeads"``.
        props: its props (Python builtins; strings that the component inserts as HTML must
            already be escaped by the caller).
        title: a caption drawn above it (escaped).
        note: a line of small text under the caption (escaped).
        css: style rules scoped to this widget (each selector is prefixed with its mount's
            id), e.g. ``".colored-tokens>span>span{margin-right:2px}"``.
        footer: HTML drawn under the widget (already escaped by the caller), e.g. the full
            text of token labels the component shows shortened.
    """

    @check.entry
    def __init__(
        self,
        component: str,
        props: dict,
        title: str = "",
        note: str = "",
        css: str = "",
        footer: str = "",
    ) -> None:
        caller = "Widget"
        self.component = str(arg.text(component, "component", caller))
        if not isinstance(props, dict):
            raise ArgumentError(
                f"{caller}: props must be a dict of the component's props, got "
                f"{arg.describe(props)}."
            )
        self.props = props
        self.title = str(arg.text(title, "title", caller))
        self.note = str(arg.text(note, "note", caller))
        self.css = str(arg.text(css, "css", caller))
        self.footer = str(arg.text(footer, "footer", caller))

    @property
    def needs_bundle(self) -> bool:
        return True

    def fragment(self, *, bundle: bool) -> str:
        mount = new_id("tlp-cv")
        caption = ""
        if self.title:
            caption += (
                f'<div style="font-weight:600;font-size:14px;margin:4px 0;{WRAP}">'
                f"{esc(self.title)}</div>"
            )
        if self.note:
            caption += (
                f'<div style="font-size:11px;color:#555;margin:2px 0 6px;{WRAP}">'
                f"{esc(self.note)}</div>"
            )
        call = (
            f"(function(){{var cv=window.{CV_GLOBAL};var el=document.getElementById("
            f"{script_json(mount)});if(!cv||!el){{return;}}el.textContent='';"
            f"cv.render({script_json(mount)},cv[{script_json(self.component)}],"
            f"{script_json(self.props)});}})();"
        )
        style = ""
        if self.css:
            rules = self.css.replace("<", "").split("}")
            style = (
                "<style>"
                + "".join(f"#{mount} {r.strip()}}}" for r in rules if r.strip())
                + "</style>"
            )
        return (
            (bundle_script() if bundle else "")
            + style
            + f'<div class="tlprisms-view tlprisms-widget" id="{new_id()}" '
            f'style="margin:8px 0">{caption}'
            f'<div class="tlprisms-cv-mount" id="{mount}" '
            f'data-component="{esc(self.component)}">{esc(_MOUNT_FALLBACK)}</div>'
            f"{self.footer}</div><script>{call}</script>"
        )

    def __repr__(self) -> str:
        return f"Widget({self.component}, {self.title!r})"


class Group(View):
    """Several views under one caption (the default view of a result)."""

    def __init__(self, views: list, caption: str = "", title: str = "") -> None:
        self.views = list(views)
        self.caption = caption
        self.title = title

    @property
    def needs_bundle(self) -> bool:
        return any(isinstance(v, View) and v.needs_bundle for v in self.views)

    def fragment(self, *, bundle: bool) -> str:
        parts = [bundle_script()] if bundle and self.needs_bundle else []
        parts.append(
            f'<div class="tlprisms-group" id="{new_id()}" style="font-family:system-ui,'
            f'-apple-system,Segoe UI,Helvetica,Arial,sans-serif">'
        )
        if self.caption:
            parts.append(
                f'<div style="font-size:13px;color:#222;margin:4px 0 8px;{WRAP}">'
                f"{esc(self.caption)}</div>"
            )
        for v in self.views:
            parts.append(v.fragment(bundle=False) if isinstance(v, View) else str(v))
        parts.append("</div>")
        return "".join(parts)

    def figures(self) -> list[Figure]:
        return [f for v in self.views if isinstance(v, View) for f in v.figures()]

    def __repr__(self) -> str:
        return f"Group({len(self.views)} views: {self.caption!r})"
