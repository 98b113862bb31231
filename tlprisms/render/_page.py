"""Turning objects into HTML: ``to_html``, ``show``, ``Report``, ``save_svg``, ``save_png``.

A page made here is one self-contained file: styles inline, the CircuitsVis bundle inlined
once, a Content-Security-Policy that forbids every network fetch, and no URL other than
the inert SVG ``xmlns`` attributes (the vendored bundle's own strings aside: error-message
links and namespace names, never fetched).
"""

import datetime
import functools
import inspect
import re
import sys
import tempfile
from pathlib import Path
from types import FrameType
from typing import Any, Optional, Union

from tlprisms._core import arguments as check
from tlprisms._core import views as registry
from tlprisms._core.errors import ArgumentError
from tlprisms._core.result import Decomposition
from tlprisms.render import _args as arg
from tlprisms.render._browser import screenshot
from tlprisms.render._escape import esc
from tlprisms.render._views import default_view
from tlprisms.render._views_base import (
    WRAP,
    Figure,
    Group,
    View,
    bundle_script,
    notebook_bundle,
)

__all__ = ["to_html", "show", "Report", "save_svg", "save_png", "as_view"]

_CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "img-src data:; font-src data:; connect-src 'none'; form-action 'none'; "
    "base-uri 'none'"
)
_PAGE_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:24px;
color:#111;background:#fff;max-width:1200px}
h1{font-size:22px;margin:0 0 4px}
h1,h2,h3,.tlprisms-meta{overflow-wrap:anywhere}
.tlprisms-meta{color:#666;font-size:12px;margin-bottom:16px}
section.tlprisms-section{border-top:1px solid #ddd;padding:12px 0 20px}
section.tlprisms-section>h2{font-size:17px;margin:4px 0 8px}
"""


#: the options ``to_html`` passes on to a Decomposition's default view
_POINT = ("batch", "pos", "target")


def _names(options: Any) -> str:
    """``option 'colour'`` / ``options 'a', 'b'``."""
    names = sorted(options)
    return f"option{'s' if len(names) > 1 else ''} {', '.join(map(repr, names))}"


def as_view(obj: Any, caller: str = "to_html", **kw: Any) -> View:
    """The view ``to_html`` renders for ``obj`` (``caller`` names the call in errors).

    * a view (from :func:`bars`, :func:`source_tokens`, ...): itself;
    * a :class:`~tlprisms.Decomposition`: its default view (``kw``: ``batch``, ``pos``,
      ``target``);
    * a result type with a ``views`` function registered (:mod:`tlprisms._core.views`:
      ``Verification``, ``Effects``, the weight maps), or an object with a
      ``_tlprisms_views()`` method: a group of the views or HTML fragments it returns
      (``kw``: the options it takes);
    * an ``<svg>`` string: a figure; a list or tuple: a group of the above.
    """
    if isinstance(obj, Decomposition):
        unknown = sorted(set(kw) - set(_POINT))
        if unknown:
            raise ArgumentError(
                f"{caller}: unknown {_names(unknown)}; a Decomposition is shown at batch=, "
                "pos= and target= (e.g. to_html(result, batch=1)). Other views take their own "
                "options: "
                "bars(result, k=10), source_tokens(result, layers=[3])."
            )
        return default_view(obj, caller=caller, **kw)
    if isinstance(obj, View) or (isinstance(obj, str) and obj.lstrip().startswith("<svg")):
        if kw:
            raise ArgumentError(
                f"{caller}: {_names(kw)} {'apply' if len(kw) > 1 else 'applies'} to a "
                "Decomposition; "
                f"this {'view' if isinstance(obj, View) else '<svg> string'} is already "
                "rendered. Pass them to the view's function instead, e.g. "
                "bars(result, batch=1)."
            )
        return obj if isinstance(obj, View) else Figure(obj)
    maker = registry.find(obj, "views")
    views = functools.partial(maker, obj) if maker else getattr(obj, "_tlprisms_views", None)
    if callable(views):
        name = type(obj).__name__
        try:
            inspect.signature(views).bind(**kw)
        except TypeError as e:
            raise ArgumentError(
                f"{caller}: {name} does not take {_names(kw)} ({e}); "
                f"call {caller}(obj) without them."
            ) from e
        except ValueError:  # no signature to read: let the call decide
            pass
        items = views(**kw)
        return Group(
            [
                x
                if isinstance(x, str) and not x.lstrip().startswith("<svg")
                else as_view(x, caller)
                for x in items
            ],
            title=name,
        )
    if isinstance(obj, (list, tuple)):
        return Group([as_view(x, caller, **kw) for x in obj])
    raise ArgumentError(
        f"{caller}: cannot render a {type(obj).__name__}. Pass a Decomposition (what the "
        "prisms return), a view from tlprisms.render (bars, layer_head_heatmap, "
        "source_tokens, head_source_map, top_tokens), an <svg> string, or an object with a "
        "_tlprisms_views() method."
    )


def to_html(obj: Any, **kw: Any) -> str:
    """A self-contained HTML fragment for ``obj``, safe to paste into any page.

    It inlines the CircuitsVis bundle when a view needs it (guarded: a page holding several
    fragments runs it once) and makes no network request. Element ids are fresh on every
    call, so the same object can be shown twice. See :func:`as_view` for what ``obj`` can be.
    """
    view = as_view(obj, **kw)
    if _displayed_by_jupyter():  # an object's _repr_html_: the bundle as notebook_bundle says
        return view.fragment(bundle=notebook_bundle(view.needs_bundle))
    return view.html()


def _displayed_by_jupyter() -> bool:
    """``to_html`` was called by an object's ``_repr_html_`` (Jupyter displaying it)."""
    frame: Optional[FrameType] = sys._getframe(2)
    for _ in range(16):  # type-checking wrappers and the view registry may stand in between
        if frame is None:
            return False
        if frame.f_code.co_name == "_repr_html_":
            return True
        frame = frame.f_back
    return False


class _HTML:
    """What :func:`show` returns outside IPython: shows in any ``_repr_html_`` front end."""

    def __init__(self, data: str, path: Optional[Path] = None) -> None:
        self.data, self.path = data, path

    def __repr__(self) -> str:
        where = "" if self.path is None else f", written to {self.path}"
        return f"<tlprisms view: {len(self.data):,} characters of HTML{where}>"

    def _repr_html_(self) -> str:
        return self.data

    def __str__(self) -> str:
        return self.data


def show(obj: Any, **kw: Any) -> Any:
    """Display ``obj`` in Jupyter (offline, self-contained); elsewhere (a script, a terminal)
    write it as a self-contained page to a temporary file and say where, as plotting
    libraries do.

    Returns None after displaying in an IPython session; otherwise an object with
    ``_repr_html_`` whose ``path`` is the page written.
    """
    view = as_view(obj, "show", **kw)
    try:
        from IPython import get_ipython
        from IPython.display import HTML, display
    except ImportError:
        get_ipython = None
    if get_ipython is None or get_ipython() is None:
        page = view.html()
        with tempfile.NamedTemporaryFile(
            "w", prefix="tlprisms-", suffix=".html", delete=False, encoding="utf-8"
        ) as f:
            f.write(page)
        print(f"tlprisms: not in Jupyter; wrote the view to {f.name} (open it in a browser)")
        return _HTML(page, Path(f.name))
    display(HTML(view.fragment(bundle=notebook_bundle(view.needs_bundle))))
    return None


class Report:
    """One self-contained HTML page of several views, with CircuitsVis inlined once.

    >>> report = Report("IOI, layer 9")           # doctest: +SKIP
    >>> report.add(result, title="Heads").add(bars(result), title="Bars").save("ioi.html")

    Args:
        title: the page title.
    """

    @check.entry
    def __init__(self, title: str = "tlprisms report") -> None:
        self.title = str(arg.text(title, "title", "Report"))
        self.sections: list[tuple[str, View]] = []

    @check.entry
    def add(self, obj: Any, title: Optional[str] = None, **kw: Any) -> "Report":
        """Add a section: anything :func:`to_html` accepts (``kw`` as there). Returns self."""
        title = arg.text(title, "title", "Report.add", optional=True)
        view = as_view(obj, "Report.add", **kw)
        self.sections.append((title or "", view))
        return self

    def html(self) -> str:
        """The whole page as a string."""
        stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
        parts = [
            '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">',
            f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">',
            '<meta name="viewport" content="width=device-width,initial-scale=1">',
            f"<title>{esc(self.title)}</title><style>{_PAGE_CSS}</style></head><body>",
            f"<h1>{esc(self.title)}</h1>",
            f'<div class="tlprisms-meta">tlprisms report, {esc(stamp)}; '
            f"{len(self.sections)} sections; works offline</div>",
        ]
        if any(v.needs_bundle for _, v in self.sections):
            parts.append(bundle_script())
        for title, view in self.sections:
            parts.append('<section class="tlprisms-section">')
            if title:
                parts.append(f"<h2>{esc(title)}</h2>")
            parts.append(view.fragment(bundle=False))
            parts.append("</section>")
        parts.append("</body></html>\n")
        return "".join(parts)

    @check.entry
    def save(self, path: Union[str, Path]) -> Path:
        """Write the page to ``path`` (UTF-8), creating its folders. Returns the path.

        A path that is a directory, lies under a file or cannot be written is an
        :class:`~tlprisms.errors.ArgumentError` naming it.
        """
        arg.out_path(path, "Report.save")  # refused before the page is built
        return arg.write(path, self.html(), "Report.save")

    def _repr_html_(self) -> str:  # Jupyter: the bundle only where notebook_bundle says
        needed = any(v.needs_bundle for _, v in self.sections)
        bundle = bundle_script() if notebook_bundle(needed) else ""
        body = "".join(
            (f'<h3 style="{WRAP}">{esc(t)}</h3>' if t else "") + v.fragment(bundle=False)
            for t, v in self.sections
        )
        return f'{bundle}<div><h2 style="{WRAP}">{esc(self.title)}</h2>{body}</div>'

    def __repr__(self) -> str:
        return f"Report({self.title!r}, {len(self.sections)} sections)"


@check.entry
def save_svg(obj: Any, path: Union[str, Path], **kw: Any) -> Path:
    """Write the plain SVG figures of ``obj`` to one ``.svg`` file (stacked vertically).

    ``obj`` is a figure, an ``<svg>`` string, or anything :func:`to_html` accepts; the
    CircuitsVis widgets in it (source tokens, head maps) are interactive HTML and are
    skipped: use :meth:`Report.save` or :func:`save_png` for those.
    """
    caller = "save_svg"
    arg.out_path(path, caller)
    figures = as_view(obj, caller, **kw).figures()
    if not figures:
        raise ArgumentError(
            "save_svg: this view has no plain SVG figure (CircuitsVis widgets are "
            "HTML); save it with Report(...).add(obj).save('page.html') or "
            "save_png(obj, 'view.png')."
        )
    if len(figures) == 1:
        svg = figures[0].svg
    else:
        svg = _stack([f.svg for f in figures])
    return arg.write(path, '<?xml version="1.0" encoding="UTF-8"?>\n' + svg + "\n", caller)


def _size(svg: str) -> tuple[int, int]:
    m = re.match(r'\s*<svg[^>]*?width="(\d+)" height="(\d+)"', svg)
    if not m:
        raise ArgumentError(
            "save_svg: an SVG without explicit width and height cannot be stacked; save it "
            "on its own, or give its <svg> element width= and height=."
        )
    return int(m.group(1)), int(m.group(2))


def _stack(svgs: list[str]) -> str:
    sizes = [_size(s) for s in svgs]
    width, height = max(w for w, _ in sizes), sum(h for _, h in sizes) + 8 * (len(svgs) - 1)
    parts, y = [], 0
    for svg, (_, h) in zip(svgs, sizes):
        parts.append(svg.replace("<svg ", f'<svg x="0" y="{y}" ', 1))
        y += h + 8
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}">' + "".join(parts) + "</svg>"
    )


@check.entry
def save_png(obj: Any, path: Union[str, Path], *, width: int = 1200, **kw: Any) -> Path:
    """A full-page PNG screenshot of ``obj`` rendered by a local headless Chromium.

    Needs the ``playwright`` Python package and a ``chromium`` executable on the PATH (no
    browser download); every network request is blocked.
    """
    caller = "save_png"
    out = arg.out_path(path, caller)
    width = check.count(width, "width", caller)
    if isinstance(obj, Report):
        if kw:
            raise ArgumentError(
                f"{caller}: {_names(kw)} {'apply' if len(kw) > 1 else 'applies'} to a "
                "Decomposition; a Report's sections are already rendered (pass them to "
                "Report.add)."
            )
        page = obj
    else:
        title = getattr(obj, "title", "")
        page = Report(title if isinstance(title, str) and title else "tlprisms")
        page.sections.append(("", as_view(obj, caller, **kw)))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ArgumentError(
            f"{caller}: cannot write {str(out)!r}: {e.strerror or e}; pass a path in a "
            "writable directory."
        ) from e
    return screenshot(page.html(), out, width=width)
