"""What a rendered view is: a plain SVG :class:`Figure`, a CircuitsVis :class:`Widget`, or a
:class:`Group` of views under a caption; and the offline CircuitsVis bundle they share.

A widget's HTML is ``<div id=...>`` (closed) plus a ``<script>`` that calls the bundle's
``render(id, Component, props)`` with the props as script-safe JSON. The bundle itself
(``circuitsvis/dist/cdn/iife.js``, shipped in the circuitsvis wheel, React included) is
inlined once per page or fragment inside a guard, so a page that holds it twice runs it once;
it then fires the window event ``tlprisms-circuitsvis-ready``. A widget whose script runs
before the bundle waits for that event, so the bundle may come later on the page.
Ids are fresh on every render, so displaying the same view twice gives two live copies.
CircuitsVis is never imported here: only its wheel's files are read.

In Jupyter (the offline mode of notebook plotting libraries): :func:`init_notebook`, run in
a notebook's first cell, emits one output that carries the bundle, again every time it runs;
views displayed after it carry none and wait for it. Without it, the first view displayed
carries the bundle; whenever the cell that carries it is run again (its outputs are replaced)
the next view displayed carries it instead. A saved notebook therefore holds one bundle, and
every view on it renders in any order of the cells (JupyterLab, nbconvert's HTML export).
"""

import functools
import hashlib
import importlib.util
import os
import re
from pathlib import Path
from typing import Any, Optional

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
    "init_notebook",
    "bundle_path",
    "CV_GLOBAL",
    "WRAP",
]

#: the window property the guarded bundle stores CircuitsVis's exports in
CV_GLOBAL = "__tlprismsCircuitsVis"
#: inline style for captions: an unbroken run of text wraps instead of widening the page
WRAP = "overflow-wrap:anywhere;unicode-bidi:isolate"
#: the window event the bundle fires once it has run (views waiting for it draw then)
CV_READY = "tlprisms-circuitsvis-ready"
#: a mount's text where no script ran (a static viewer, or a notebook Jupyter does not trust)
_MOUNT_FALLBACK = (
    "CircuitsVis view: its script has not run here (a viewer without JavaScript, or a "
    "notebook that Jupyter does not trust: run its cells to draw it)."
)
#: the text while a view's script waits for the bundle
_MOUNT_WAITING = "CircuitsVis view: waiting for the CircuitsVis bundle on this page..."
#: the text when the bundle has not come after _MISSING_MS
_MOUNT_MISSING = (
    "CircuitsVis view: this page holds no CircuitsVis bundle. Run "
    "tlprisms.render.init_notebook() (the notebook's first cell), or re-run this cell, "
    "then save the notebook."
)
_MISSING_MS = 4000


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
        f";return CircuitsVis;}})();}}window.dispatchEvent(new Event({script_json(CV_READY)}));"
        "</script>"
    )


#: the kernel's record of the output that carries the bundle: ``carrier`` is the key of the
#: cell that displayed it (see _cell_key), None before one is displayed or once that cell
#: runs again (running a cell replaces its outputs, and with them the bundle)
_NOTEBOOK: dict[str, Any] = {"carrier": None, "shell": None}


def _shell() -> Any:
    """The IPython shell of a Jupyter kernel we run in, or None."""
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    ip = get_ipython()
    return ip if ip is not None and getattr(ip, "kernel", None) is not None else None


def _in_kernel() -> bool:
    return _shell() is not None


def _request() -> dict:
    """The execute request the kernel is running (header, metadata, content), or {}."""
    ip = _shell()
    kernel = getattr(ip, "kernel", None)
    get_parent = getattr(kernel, "get_parent", None)
    try:
        parent = get_parent() if callable(get_parent) else getattr(kernel, "_parent_header", {})
    except Exception:  # noqa: BLE001 - a kernel without a request context: no cell known
        return {}
    return parent if isinstance(parent, dict) else {}


def _cell_key(request: dict) -> str:
    """Which cell a request runs: the front end's cell id (JupyterLab, Notebook 7 and VS Code
    send ``cellId``), else the hash of its code (a re-run cell sends the same code)."""
    meta = request.get("metadata") or {}
    if meta.get("cellId"):
        return "id:" + str(meta["cellId"])
    code = str((request.get("content") or {}).get("code", ""))
    return "code:" + hashlib.sha256(code.encode("utf-8")).hexdigest()


def _cell_starts(*_info: Any) -> None:
    """IPython ``pre_run_cell`` hook: the carrier's cell runs again (its outputs, the bundle
    among them, are replaced) or was deleted (JupyterLab's ``deletedCells``): forget it."""
    carrier = _NOTEBOOK.get("carrier")
    if carrier is None:
        return
    request = _request()
    deleted = (request.get("metadata") or {}).get("deletedCells") or []
    if _cell_key(request) == carrier or carrier in {f"id:{c}" for c in deleted}:
        _NOTEBOOK["carrier"] = None


def _carry_here() -> None:
    """Record that the cell running now displays the bundle, and watch for it to run again."""
    _NOTEBOOK["carrier"] = _cell_key(_request())
    ip = _shell()
    if ip is not None and _NOTEBOOK.get("shell") is not ip:
        ip.events.register("pre_run_cell", _cell_starts)
        _NOTEBOOK["shell"] = ip


def notebook_bundle(needed: bool) -> bool:
    """Whether a view Jupyter displays now must carry the bundle: outside a kernel always
    (when needed); in a kernel when no output of this session carries it any more (none was
    displayed yet, or the cell that displayed it ran again)."""
    if not needed:
        return False
    if not _in_kernel():
        return True
    if _NOTEBOOK.get("carrier") is not None:
        return False
    _carry_here()
    return True


def init_notebook() -> None:
    """Make CircuitsVis views work offline in this notebook: call it in the first cell.

    It displays one output that carries the CircuitsVis bundle (about 1.3 MB, read from the
    circuitsvis wheel; no network), every time it runs. The views displayed after it carry no
    copy and draw from it, whatever order the cells run in, so the saved notebook (and its
    ``jupyter nbconvert --to html`` export) holds the bundle once and every view renders when
    it is reopened. Without this call the first view displayed carries the bundle instead.

    Outside a Jupyter kernel (a script, a terminal) it does nothing. Without circuitsvis
    installed it says so in the output (the plain SVG views work without it).

    >>> import tlprisms as tp
    >>> tp.render.init_notebook()  # a no-op outside Jupyter
    """
    if not _in_kernel():
        return
    from IPython.display import display

    try:
        script = bundle_script()
    except PrismError as e:
        note = f"tlprisms: CircuitsVis widgets are not available here: {e}"
        display({"text/plain": note}, raw=True)
        return
    note = (
        "tlprisms: CircuitsVis views enabled offline (this output carries the bundle for "
        "the whole notebook; keep this cell first)."
    )
    html = f'{script}<div class="tlprisms-init" style="font-size:11px;color:#666">{esc(note)}</div>'
    _carry_here()
    display({"text/html": html, "text/plain": note}, raw=True)


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

    def _repr_html_(self) -> str:  # Jupyter: the bundle only where notebook_bundle says
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
        # draw now if the bundle is on the page, else when it fires CV_READY (it may come
        # later on the page); say what is missing if it has not come after _MISSING_MS
        call = (
            f"(function(){{var mount={script_json(mount)},el=document.getElementById(mount);"
            f"if(!el){{return;}}var ev={script_json(CV_READY)};"
            f"function draw(){{var cv=window.{CV_GLOBAL};if(!cv||!el.isConnected){{return false;}}"
            f"window.removeEventListener(ev,draw);el.textContent='';"
            f"cv.render(mount,cv[{script_json(self.component)}],{script_json(self.props)});"
            f"return true;}}"
            f"if(draw()){{return;}}el.textContent={script_json(_MOUNT_WAITING)};"
            f"window.addEventListener(ev,draw);"
            f"setTimeout(function(){{if(!window.{CV_GLOBAL}){{"
            f"el.textContent={script_json(_MOUNT_MISSING)};}}}},{_MISSING_MS});}})();"
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
