"""A feature prism's terms with each feature's top tokens: what the features that wrote the
logit are, in the model's own vocabulary.

Each bar is one feature's term (of :meth:`~tlprisms.LogitPrism.features`), labelled with the
tokens its decoder direction promotes and suppresses most through the final norm and ``W_U``
(:func:`tlprisms.weights.feature_top_tokens`); the dictionary's ``b_dec``, error (and skip)
terms are shown as their own bars, so the picture says how much the features explain.
"""

from typing import Any

from tlprisms._core import arguments as check
from tlprisms._core.errors import ArgumentError
from tlprisms._core.result import Decomposition
from tlprisms.dictionary import Dictionary
from tlprisms.render._svg import bar_svg
from tlprisms.render._views_base import Figure
from tlprisms.weights import feature_top_tokens

__all__ = ["feature_terms"]


@check.entry
def feature_terms(
    result: Decomposition,
    model: Any,
    dictionaries: Any,
    *,
    k: int = 10,
    tokens: int = 3,
    batch: int = 0,
    pos: int = 0,
    target: int = 0,
) -> Figure:
    """The ``k`` largest feature terms of ``result`` (one batch row, explained position and
    target) as bars labelled with each feature's top ``tokens`` promoted / suppressed tokens,
    plus every dictionary's ``b_dec``, ``error`` and ``skip`` terms.

    >>> import tlprisms as tp
    >>> from tlprisms.demo import load_demo_model, load_demo_sae
    >>> model, sae = load_demo_model(), load_demo_sae()
    >>> r = tp.LogitPrism.run(model, "The capital of France is").features(" Paris", sae)
    >>> fig = tp.render.feature_terms(r, model, sae, k=3)
    >>> fig.svg.startswith("<svg"), len(fig.data["features"])
    (True, 3)
    """
    caller = "feature_terms"
    if not isinstance(result, Decomposition):
        raise ArgumentError(f"{caller}: result must be what prism.features returned.")
    dicts = [dictionaries] if isinstance(dictionaries, Dictionary) else list(dictionaries)
    if not dicts or not all(isinstance(d, Dictionary) for d in dicts):
        raise ArgumentError(f"{caller}: pass the Dictionary (or list) the result was made with.")
    by_layer = {d.layer: d for d in dicts}
    kinds = set(result.components.kinds())
    if "feature" not in kinds:
        raise ArgumentError(
            f"{caller}: the result has no feature terms; pass what prism.features returned."
        )
    k = check.count(k, "k", caller)
    n_tok = check.count(tokens, "tokens", caller)
    top = result.top(k, batch=batch, pos=pos, target=target, kind="feature")
    values, labels, rows = [], [], []
    for layer, f, v in zip(top["layer"], top["feature"], top["value"]):
        d = by_layer.get(int(layer))
        if d is None:
            raise ArgumentError(
                f"{caller}: no dictionary at layer {int(layer)} was given; pass the ones the "
                "result was made with."
            )
        t = feature_top_tokens(model, d, int(f), k=n_tok)
        up = ", ".join(w for w, _ in t["promoted"])
        down = ", ".join(w for w, _ in t["suppressed"])
        values.append(float(v))
        labels.append(f"L{int(layer)}F{int(f)} (+{up} / -{down})")
        rows.append({"layer": int(layer), "feature": int(f), "value": float(v), **t})
    rest = result.top(
        len(result.components),
        batch=batch,
        pos=pos,
        target=target,
        kind=["b_dec", "error", "skip"],
        constants=True,
    )
    for comp, v in zip(rest["component"], rest["value"]):
        values.append(float(v))
        labels.append(str(comp))
    title = f"feature terms of {result.target_labels.reshape(-1)[target]!s}"
    svg = bar_svg(values, labels, title, note="each feature: +promoted / -suppressed tokens")
    return Figure(svg, title, data={"features": rows})
