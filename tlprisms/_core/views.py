"""How a result is shown, without the result importing rendering.

Result types (:class:`~tlprisms.Decomposition`, :class:`~tlprisms.Verification`, the
``tlprisms.weights`` maps ...) live below the rendering layer: their ``_repr_html_``, ``show``
and ``svg`` call :func:`html`, :func:`show` and :func:`svg` here, which look up what
:mod:`tlprisms.render` registered for the type (through its MRO, so a subclass is shown as
its base) when it was imported (``import tlprisms`` imports it). A new result type gets its
view by one :func:`register` call in ``tlprisms.render``; nothing here imports it.

>>> class Note:
...     pass
>>> register(Note, html=lambda obj, **kw: "<b>note</b>")
>>> html(Note())
'<b>note</b>'
>>> show(Note())
Traceback (most recent call last):
...
tlprisms._core.errors.ArgumentError: show: no show view is registered for Note; ...
"""

from collections.abc import Callable
from typing import Any, Optional

from tlprisms._core.errors import ArgumentError

__all__ = ["register", "find", "html", "show", "svg", "views", "VIEWS"]

#: what each registered function makes: ``html`` a fragment (``str``), ``show`` a display in
#: Jupyter, ``svg`` one plain SVG figure (``str``), ``views`` the list of views and HTML
#: fragments a page shows for the object (what ``tlprisms.render.to_html`` lays out)
VIEWS = ("html", "show", "svg", "views")

_REGISTRY: dict[type, dict[str, Callable[..., Any]]] = {}


def register(result_type: type, **functions: Optional[Callable[..., Any]]) -> None:
    """Register how ``result_type`` (and its subclasses) is shown: ``html=``, ``show=``,
    ``svg=`` and/or ``views=`` (see :data:`VIEWS`), each called as ``f(obj, **options)``.
    A later registration for the same type and name replaces the earlier one."""
    unknown = sorted(set(functions) - set(VIEWS))
    if unknown:
        raise ArgumentError(
            f"register: unknown view {', '.join(map(repr, unknown))}; use {', '.join(VIEWS)}."
        )
    entry = _REGISTRY.setdefault(result_type, {})
    for name, fn in functions.items():
        if fn is not None:
            entry[name] = fn


def find(obj: Any, name: str) -> Optional[Callable[..., Any]]:
    """The ``name`` view registered for ``obj``'s type or its nearest base, or None."""
    for cls in type(obj).__mro__:
        fn = _REGISTRY.get(cls, {}).get(name)
        if fn is not None:
            return fn
    return None


def _call(name: str, obj: Any, options: dict) -> Any:
    fn = find(obj, name)
    if fn is None:
        raise ArgumentError(
            f"{name}: no {name} view is registered for {type(obj).__name__}; import "
            "tlprisms.render (import tlprisms does) to register the package's views, or "
            f"register one with tlprisms._core.views.register({type(obj).__name__}, "
            f"{name}=...)."
        )
    return fn(obj, **options)


def html(obj: Any, **options: Any) -> str:
    """``obj`` as a self-contained HTML fragment (its type's registered ``html`` view)."""
    return _call("html", obj, options)


def show(obj: Any, **options: Any) -> Any:
    """Display ``obj`` in Jupyter (its type's registered ``show`` view)."""
    return _call("show", obj, options)


def svg(obj: Any, **options: Any) -> str:
    """``obj`` as one plain SVG figure (its type's registered ``svg`` view)."""
    return _call("svg", obj, options)


def views(obj: Any, **options: Any) -> list:
    """The views and HTML fragments a page shows for ``obj`` (its ``views`` view)."""
    return _call("views", obj, options)
