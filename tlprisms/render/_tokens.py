"""Input tokens in views: a result's token strings, and tokens for CircuitsVis
``ColoredTokens`` (shared by the decomposition views and the QK views)."""

from typing import Any

from tlprisms.render._escape import FSI, PDI, Label, esc
from tlprisms.render._svg import fmt

__all__ = ["tokens_of", "TOKEN_CSS", "colored_token"]


def tokens_of(result: Any, batch: int) -> list:
    """The token strings of one batch row of a :class:`~tlprisms.Decomposition`, or
    ``"[i]"`` position labels when unknown."""
    n = 1 + max(
        int(result.positions.max()),
        int(result.components.src.max(initial=-1)),
        int(result.components.at.max(initial=-1)),
    )
    toks = result.str_tokens
    if toks is not None and batch < len(toks) and toks[batch] is not None:
        row = [str(t) for t in toks[batch]]
        return row + [f"[{i}]" for i in range(len(row), n)]
    return [f"[{i}]" for i in range(n)]


#: token boundaries visible (word-level tokens carry no spaces); CircuitsVis's own tooltip
#: (a ``div`` beside each token) hidden: it would print the token's HTML as text, so each
#: token carries its full text and value in a ``title`` instead (see :func:`colored_token`)
TOKEN_CSS = (
    ".colored-tokens>span>span{border-color:#b8b8b8!important;margin-right:2px!important;"
    "padding:3px 2px!important;unicode-bidi:isolate}"
    ".colored-tokens>div{display:none!important}"
)


def colored_token(lab: Label, position: int, value: float) -> str:
    """One token for CircuitsVis ``ColoredTokens``, which inserts tokens as HTML after
    turning every whitespace character into ``&nbsp;``: the short label isolated in a
    ``<bdi>`` whose ``title`` holds the full token, its position and its value.

    The tag has no whitespace to lose: ``<bdi/title=...>`` is read as ``<bdi title=...>``
    by every HTML parser (the ``/`` is skipped before an attribute name).
    """
    tip = f"{FSI}{lab.full}{PDI} (position {position}): {fmt(value)}"
    return f'<bdi/title="{esc(tip)}">{esc(lab.short)}</bdi>'
