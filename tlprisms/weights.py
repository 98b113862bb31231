"""Weight-space prisms: what a head or a neuron does to tokens, with no forward pass.

* **OV token map** of head ``(l, h)``: ``ln1(E_src) @ W_V[kv(h)] @ W_O[h] @ U_dst``, where
  ``E_src`` are the source tokens' embeddings as the model sees them (Gemma's sqrt(d_model)
  scale; the layer's input norm applied to each embedding on its own) and ``U_dst`` are the
  target tokens' readout columns ``P(w_final * W_U[:, t])`` (Gemma 2: times the head's
  ``ln1_post`` weight). Only the token sets are materialised, never vocab x vocab.
* **Neuron templates**: ``W_out[l, n] @ U_tokens`` for a token set (e.g. the digits), and
  their activation-weighted sum.
* **Unembedding map**: a 2-D PCA projection of a token set's readout columns.
* **QK token map** of head ``(l, h)``: ``ln1(E_q) W_Q[h] W_K[kv(h)]^T ln1(E_k)^T`` times the
  score factor, ``ln1`` frozen at a given scale (see :func:`qk_map`).

Positional embeddings and biases are left out: these maps describe the weights alone.

>>> import tlprisms as tp
>>> from tlprisms.demo import load_demo_model
>>> ov = tp.weights.ov_map(load_demo_model(), 0, 2, [" France", " Japan"], [" Paris", " Tokyo"])
>>> ov.values.shape, ov.argmax_index()
(torch.Size([2, 2]), [0, 1])
"""

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from beartype import beartype
from jaxtyping import Float, jaxtyped
from torch import Tensor

from tlprisms._core import arguments as check
from tlprisms._core import views
from tlprisms._core.errors import (
    ArgumentError,
    NonFiniteError,
    TargetError,
    UnsupportedModelError,
)
from tlprisms._core.targets import token_id
from tlprisms._seam import ModelView, Site
from tlprisms.dictionary import Dictionary

__all__ = [
    "TokenMap",
    "TokenProjection",
    "ov_map",
    "neuron_templates",
    "unembed_map",
    "qk_map",
    "feature_templates",
    "feature_top_tokens",
    "ov_feature_map",
]

Tokens = Union[Sequence[Union[int, str]], Tensor]


def _ids(view: ModelView, tokens: Tokens, what: str, caller: str) -> tuple[list[int], list[str]]:
    if isinstance(tokens, (str, int)):
        raise TargetError(
            f"{caller}: {what} must be a list of tokens, got {tokens!r}; wrap it in a list."
        )
    items = tokens.tolist() if isinstance(tokens, Tensor) else list(tokens)
    if not items:
        raise TargetError(f"{caller}: {what} is empty; give at least one token.")
    ids = [token_id(view, t, caller, what=f"{what} entry") for t in items]
    return ids, [view.token_label(i, quote=False) for i in ids]


def _readout_columns(view: ModelView, ids: list[int], dtype: torch.dtype) -> Tensor:
    cols, _ = view.unembed_columns(torch.tensor(ids), dtype)  # [n, d]
    return view.final_norm.pull_back(cols)


def _embeddings(view: ModelView, ids: list[int], layer_norm: Any, dtype: torch.dtype) -> Tensor:
    if view.embedding_normalised:
        raise UnsupportedModelError(
            f"ov_map: {view.architecture} normalises its embeddings before the residual stream, "
            "so a map from W_E's rows would not be what the head reads; use the prisms on a "
            "forward pass (through_head) instead."
        )
    e = view.embed_rows(torch.tensor(ids), dtype)
    if layer_norm is None or not layer_norm.has_scale:
        return e
    return layer_norm.apply(e, eps=view.norm_eps)


@jaxtyped(typechecker=beartype)
@dataclass(frozen=True, eq=False)
class TokenMap:
    """A labelled matrix over token sets: ``values[row, col]``.

    Attributes:
        values: ``[row, col]``, e.g. source token x target token for an OV map, or
            neuron x token for templates.
        rows, cols: labels of the rows and columns.
        title: what the map is (``"OV map of L15H6"``).
        weights: optional per-row weights (neuron activations) for :meth:`weighted_sum`.
    """

    values: Float[Tensor, "row col"]
    rows: list
    cols: list
    title: str
    weights: Optional[Tensor] = None
    meta: dict = field(default_factory=dict)

    @check.entry
    def top(self, row: Union[int, str], k: int = 5) -> list[tuple[str, float]]:
        """The ``k`` columns with the largest value in ``row`` (an index or a label)."""
        caller = "TokenMap.top"
        n = len(self.rows)
        if isinstance(row, str):
            if row not in self.rows:
                shown = ", ".join(map(repr, self.rows[:8])) + (", ..." if n > 8 else "")
                raise ArgumentError(
                    f"{caller}: row {row!r} is not a row label of {self.title!r}; use one of "
                    f"{shown}, or a row index 0..{n - 1}."
                )
            i = self.rows.index(row)
        else:
            i = check.in_range(row, n, "row", caller, of=f" ({self.title!r} has {n} rows)")
        k = check.count(k, "k", caller, minimum=0)
        v = self.values[i]
        idx = torch.argsort(v, descending=True)[:k]
        return [(self.cols[int(j)], float(v[j])) for j in idx]

    def argmax_cols(self) -> list[str]:
        """For each row, the label of its largest column."""
        return [self.cols[int(j)] for j in self.values.argmax(-1)]

    def argmax_index(self) -> list[int]:
        """For each row, the index of its largest column (compare with ``range(len(cols))``
        when rows and columns are paired, e.g. countries and their capitals)."""
        return [int(j) for j in self.values.argmax(-1)]

    @check.entry
    def weighted_sum(self, weights: Optional[Tensor] = None) -> Tensor:
        """``sum_row weights[row] * values[row]``: e.g. neuron templates weighted by activations.

        ``weights``: one number per row (a tensor, array or list; ``[..., rows]`` for several
        sets at once); default the activations the map was made with.
        """
        caller = "TokenMap.weighted_sum"
        n = self.values.shape[0]
        if weights is None:
            if self.weights is None:
                raise ArgumentError(
                    f"{caller}: no weights; pass activations, one per row ({n} rows), or "
                    "make the map with neuron_templates(..., activations=...)."
                )
            w = self.weights
        else:
            given: Optional[Tensor] = None
            if not (isinstance(weights, (str, bytes, bool)) or check.is_index(weights)):
                try:
                    given = torch.as_tensor(weights).detach()
                except (TypeError, ValueError, RuntimeError):
                    given = None
            if given is None or given.ndim == 0 or given.dtype == torch.bool or given.is_complex():
                raise ArgumentError(
                    f"{caller}: weights must be numbers, one per row ({n}), as a tensor, "
                    f"array or list; got {type(weights).__name__} {str(weights)[:40]!r}."
                )
            w = given
        if w.shape[-1] != n:
            raise ArgumentError(
                f"{caller}: {w.shape[-1]} weights for {n} rows; pass one weight per row."
            )
        w = check.finite(w.to(self.values.device, self.values.dtype), "weights", caller)
        return w @ self.values

    def to_frame(self) -> Any:
        import pandas as pd

        return pd.DataFrame(
            self.values.detach().cpu().numpy(),
            index=list(map(str, self.rows)),
            columns=list(map(str, self.cols)),
        )

    def __repr__(self) -> str:
        head = f"TokenMap({self.title}: {len(self.rows)} x {len(self.cols)})"
        lines = [head]
        for i in range(min(len(self.rows), 6)):
            best = ", ".join(f"{c!r} {v:+.3g}" for c, v in self.top(i, 3))
            lines.append(f"  {self.rows[i]!r:>14} -> {best}")
        return "\n".join(lines)

    def _repr_html_(self) -> str:  # the views tlprisms.render registers (tlprisms._core.views)
        return views.html(self)


@jaxtyped(typechecker=beartype)
@dataclass(frozen=True, eq=False)
class TokenProjection:
    """A 2-D projection of token vectors (``points[token, 2]``) with its variance ratios."""

    points: Float[Tensor, "token 2"]
    labels: list
    explained_variance: Float[Tensor, "2"]
    title: str

    def __repr__(self) -> str:
        ev = ", ".join(f"{float(v):.1%}" for v in self.explained_variance)
        return f"TokenProjection({self.title}: {len(self.labels)} tokens, PCA variance {ev})"

    def _repr_html_(self) -> str:  # the views tlprisms.render registers (tlprisms._core.views)
        return views.html(self)


@check.entry
def ov_map(
    model: Any,
    layer: int,
    head: int,
    src_tokens: Tokens,
    dst_tokens: Tokens,
    *,
    dtype: torch.dtype = torch.float32,
) -> TokenMap:
    """The OV circuit of head ``(layer, head)`` between two token sets.

    ``values[s, t]`` is how much reading source token ``s`` (its embedding, through the
    layer's input norm) raises the logit of target token ``t``, per unit of attention.

    >>> # m = tp.weights.ov_map(model, 15, 6, [" France", " Japan"], [" Paris", " Tokyo"])
    """
    caller = "ov_map"
    view = ModelView(model)
    layer = check.layer(view, layer, caller)
    head = check.head(view, head, caller)
    src, src_labels = _ids(view, src_tokens, "src_tokens", caller)
    dst, dst_labels = _ids(view, dst_tokens, "dst_tokens", caller)
    with torch.no_grad():
        E = _embeddings(view, src, view.ln1[layer], dtype)  # [s, d]
        g = view.kv_group(head)
        W_V = view.W_V(layer, dtype).to(E.device)[g]
        W_O = view.W_O(layer, dtype).to(E.device)[head]
        U = _readout_columns(view, dst, dtype).to(E.device)  # [t, d]
        post = view.ln1_post[layer]
        if post is not None:
            U = post.pull_back(U)
        values = ((E @ W_V) @ W_O) @ U.T
    return TokenMap(
        values=values,
        rows=src_labels,
        cols=dst_labels,
        title=f"OV map of L{layer}H{head}",
        meta={"layer": layer, "head": head},
    )


@check.entry
def neuron_templates(
    model: Any,
    layer: int,
    neurons: Sequence[int],
    tokens: Tokens,
    *,
    activations: Optional[Tensor] = None,
    dtype: torch.dtype = torch.float32,
) -> TokenMap:
    """``W_out[layer, n] @ U_tokens`` for each neuron: its template over a token set.

    Pass ``activations`` (one per neuron, e.g. ``cache["blocks.l.mlp.hook_post"][b, -1, neurons]``)
    to get :meth:`TokenMap.weighted_sum`, the neurons' joint direct effect on those tokens.
    """
    caller = "neuron_templates"
    view = ModelView(model)
    layer = check.layer(view, layer, caller)
    if check.is_index(neurons) or isinstance(neurons, str):
        raise ArgumentError(f"{caller}: neurons={neurons!r}; pass a list of neuron indices.")
    neurons = [check.neuron(view, n, caller) for n in neurons]
    if not neurons:
        raise ArgumentError(f"{caller}: no neurons given; pass a list of neuron indices.")
    ids, labels = _ids(view, tokens, "tokens", caller)
    with torch.no_grad():
        W_out = view.W_out(layer, dtype)[neurons]  # [n, d]
        U = _readout_columns(view, ids, dtype).to(W_out.device)
        post = view.ln2_post[layer]
        if post is not None:
            U = post.pull_back(U)
        values = W_out @ U.T
    w = None
    if activations is not None:
        w = torch.as_tensor(activations).detach().to(values.device, dtype).reshape(-1)
        if w.shape[0] != len(neurons):
            raise ArgumentError(
                f"{caller}: {w.shape[0]} activations for {len(neurons)} neurons; "
                "give one activation per neuron."
            )
        check.finite(w, "activations", caller)
    return TokenMap(
        values=values,
        rows=[f"L{layer}N{n}" for n in neurons],
        cols=labels,
        title=f"templates of layer {layer} neurons",
        weights=w,
        meta={"layer": layer, "neurons": neurons},
    )


@check.entry
def unembed_map(
    model: Any, tokens: Tokens, *, dtype: torch.dtype = torch.float32
) -> TokenProjection:
    """A 2-D PCA projection of the tokens' readout columns ``P(w_final * W_U[:, t])``."""
    caller = "unembed_map"
    view = ModelView(model)
    ids, labels = _ids(view, tokens, "tokens", caller)
    seen: dict = {}
    for i, t in enumerate(ids):
        seen.setdefault(t, []).append(i)
    repeated = {t: at for t, at in seen.items() if len(at) > 1}
    if repeated:
        t, at = next(iter(repeated.items()))
        raise TargetError(
            f"{caller}: tokens repeat: {view.token_label(t)} is at entries "
            f"{', '.join(map(str, at))} of {len(ids)}; a projection places each token once, "
            "so pass distinct tokens."
        )
    if len(ids) < 3:
        raise TargetError(
            f"{caller}: a 2-D projection needs at least 3 tokens: at least 3 distinct "
            f"tokens, got {len(ids)}; pass more tokens."
        )
    with torch.no_grad():
        U = _readout_columns(view, ids, torch.float64)
        X = U - U.mean(0, keepdim=True)
        _, S, Vh = torch.linalg.svd(X, full_matrices=False)
        points = X @ Vh[:2].T
        var = S.pow(2)
        total = var.sum()
        scale = U.pow(2).sum()
        if not bool(torch.isfinite(total)):
            raise NonFiniteError(
                f"{caller}: the tokens' readout columns hold NaN or infinity; the model's "
                "unembedding (W_U) or final norm weight is not finite."
            )
        if not float(total) > 1e-24 * max(float(scale), 1e-300):
            raise TargetError(
                f"{caller}: the {len(ids)} tokens have the same readout column (their "
                "unembedding columns do not differ), so there is no variance to project; "
                "pass tokens the model reads out differently."
            )
        ratio = var[:2] / total
    return TokenProjection(
        points=points.to(dtype),
        labels=labels,
        explained_variance=ratio.to(dtype),
        title="unembedding map (PCA)",
    )


@check.entry
def qk_map(
    model: Any,
    layer: int,
    head: int,
    query_tokens: Tokens,
    key_tokens: Tokens,
    *,
    scale: Union[int, float] = 1.0,
    qk_norm_scale: Union[int, float] = 1.0,
    dtype: torch.dtype = torch.float32,
) -> TokenMap:
    """The QK circuit of head ``(layer, head)`` between two token sets.

    ``values[q, k]`` is the attention score a query reading token ``q``'s embedding gives a
    key reading token ``k``'s embedding: ``ln1(E_q) W_Q W_K^T ln1(E_k)^T`` times the score
    factor (``1/sqrt(d_head)``...), with ``ln1`` frozen at ``scale`` (1 by default: the
    norm's weight and centring only) and its bias, ``b_Q`` and ``b_K`` left out. The
    positional parts are stated, not included (``meta["positional"]``): learned position
    embeddings are not added, and rotary is taken at zero query-key offset (the identity);
    :meth:`LogitPrism.qk` gives them exactly on a forward pass. A model that normalises
    its queries and keys (Gemma 3, Qwen3, OLMo 2) applies that norm's weight with its scale
    held at ``qk_norm_scale`` (1 by default), stated in the title and ``meta``.

    >>> import tlprisms as tp
    >>> from tlprisms.demo import load_demo_model
    >>> qk = tp.weights.qk_map(load_demo_model(), 1, 0, [" is"], [" France", " capital"])
    >>> qk.values.shape
    torch.Size([1, 2])
    """
    caller = "qk_map"
    view = ModelView(model)
    layer = check.layer(view, layer, caller)
    head = check.head(view, head, caller)
    if not check.is_real(scale) or not float(scale) > 0 or float(scale) == float("inf"):
        raise ArgumentError(
            f"{caller}: scale={scale!r}; pass the positive number ln1 is frozen at (e.g. a "
            "typical scale of the layer's ln1 on a forward pass), default 1."
        )
    if view.embedding_normalised:
        raise UnsupportedModelError(
            f"{caller}: {view.architecture} normalises its embeddings before the residual "
            "stream, so a map from W_E's rows would not be what the head reads; use "
            "LogitPrism.qk on a forward pass instead."
        )
    if not check.is_real(qk_norm_scale) or not 0 < float(qk_norm_scale) < float("inf"):
        raise ArgumentError(
            f"{caller}: qk_norm_scale={qk_norm_scale!r}; pass the positive number the query "
            "and key norms are frozen at (e.g. a typical recorded q_norm scale), default 1."
        )
    qids, q_labels = _ids(view, query_tokens, "query_tokens", caller)
    kids, k_labels = _ids(view, key_tokens, "key_tokens", caller)
    ln1 = view.ln1[layer]
    with torch.no_grad():
        Eq = view.embed_rows(torch.tensor(qids), dtype)
        Ek = view.embed_rows(torch.tensor(kids), dtype)
        s = torch.tensor(float(scale), dtype=dtype, device=Eq.device)
        Eq, Ek = (ln1.apply(e, s, bias=False) for e in (Eq, Ek))
        W_Q = view.W_Q(layer, dtype).to(Eq.device)[head]
        W_K = view.W_K(layer, dtype).to(Eq.device)[view.kv_group(head)]
        q, k = Eq @ W_Q, Ek @ W_K
        normed = []
        for side, idx in (("q", head), ("k", view.kv_group(head))):
            norm = view.qk_norm(layer, side)
            if norm is None or norm.weight is None:
                continue
            w, d = norm.weight.to(Eq.device, dtype), view.d_head
            if not view.qk_norm_per_head(layer, side):  # OLMo 2: this head's slice
                w = w[idx * d : (idx + 1) * d]
            if side == "q":
                q = q * w / float(qk_norm_scale)
            else:
                k = k * w / float(qk_norm_scale)
            normed.append(side)
        values = q @ k.T * view.attn_score_factor(layer)
    positional = []
    if view.pos_embed_in_resid:
        positional.append("learned position embeddings are left out")
    if view.shortformer:
        positional.append(
            "shortformer position embeddings (added to the query and key inputs after ln1) "
            "are left out"
        )
    if view.rotary:
        positional.append("rotary is taken at zero query-key offset (no rotation)")
    if view.alibi_kind is not None:
        positional.append("the ALiBi score bias (the head's slope x a key distance) is left out")
    return TokenMap(
        values=values,
        rows=q_labels,
        cols=k_labels,
        title=f"QK map of L{layer}H{head}"
        + (f" (q/k norms at scale {float(qk_norm_scale):g})" if normed else ""),
        meta={
            "layer": layer,
            "head": head,
            "scale": float(scale),
            "qk_norm": (
                f"the {' and '.join({'q': 'query', 'k': 'key'}[n] for n in normed)} norm's "
                f"weight applied with its scale held at {float(qk_norm_scale):g}"
                if normed
                else "no query/key norm"
            ),
            "positional": "; ".join(positional) or "the model adds no positional information",
        },
    )


# ----------------------------------------------------------------------------- features
def _dictionary(view: ModelView, dictionary: Any, caller: str) -> Any:
    if not isinstance(dictionary, Dictionary):
        raise ArgumentError(f"{caller}: dictionary={dictionary!r:.60}; pass a tlprisms.Dictionary.")
    dictionary.check_model(view, caller)
    return dictionary


def _features(dictionary: Any, features: Any, caller: str) -> list[int]:
    if check.is_index(features):
        features = [features]
    if isinstance(features, str) or not isinstance(features, (Sequence, Tensor)):
        raise ArgumentError(f"{caller}: features={features!r}; pass a list of feature indices.")
    items = features.tolist() if isinstance(features, Tensor) else list(features)
    if not items:
        raise ArgumentError(f"{caller}: no features given; pass a list of feature indices.")
    n = dictionary.d_sae
    return [check.in_range(f, n, "feature", caller, of=f" ({n} features)") for f in items]


def _logit_directions(view: ModelView, dictionary: Any, feats: list[int], dtype: Any) -> Tensor:
    """The features' writes as readouts of the logits: ``w_final * P(W_dec[f])`` ``[n, d]``
    (the final norm's scale left out: 1)."""
    v = dictionary.W_dec[feats].to(dtype) / dictionary.input_scale
    norm = view.final_norm
    if norm.centred:
        v = v - v.mean(-1, keepdim=True)
    return v if norm.weight is None else v * norm.weight.to(v.device, dtype)


@check.entry
def feature_templates(
    model: Any,
    dictionary: Any,
    features: Sequence[int],
    tokens: Tokens,
    *,
    dtype: torch.dtype = torch.float32,
) -> TokenMap:
    """Each feature's direct logit template over a token set: ``W_dec[f]`` read through the
    final norm (its weight and centring; scale 1) and ``W_U``: ``values[f, t]`` is the logit
    change of token ``t`` per unit of activation and per unit of the final norm's ``1/s``.

    >>> import tlprisms as tp
    >>> from tlprisms.demo import load_demo_model, load_demo_sae
    >>> m = tp.weights.feature_templates(load_demo_model(), load_demo_sae(), [0, 1], [" Paris"])
    >>> m.values.shape
    torch.Size([2, 1])
    """
    caller = "feature_templates"
    view = ModelView(model)
    d = _dictionary(view, dictionary, caller)
    feats = _features(d, features, caller)
    ids, labels = _ids(view, tokens, "tokens", caller)
    with torch.no_grad():
        r = _logit_directions(view, d, feats, dtype)
        cols, _ = view.unembed_columns(torch.tensor(ids), dtype)  # [t, d]
        values = r @ cols.to(r.device).T
    return TokenMap(
        values=values,
        rows=[f"L{d.layer}F{f}" for f in feats],
        cols=labels,
        title=f"logit templates of {d.name} features",
        meta={"layer": d.layer, "features": feats, "hook": d.hook},
    )


@check.entry
def feature_top_tokens(
    model: Any, dictionary: Any, feature: int, *, k: int = 10, dtype: torch.dtype = torch.float32
) -> dict:
    """The ``k`` tokens a feature's decoder direction promotes most and suppresses most,
    through the final norm and ``W_U`` (see :func:`feature_templates`):
    ``{"promoted": [(token, value)...], "suppressed": [...]}``.

    >>> import tlprisms as tp
    >>> from tlprisms.demo import load_demo_model, load_demo_sae
    >>> top = tp.weights.feature_top_tokens(load_demo_model(), load_demo_sae(), 0, k=3)
    >>> len(top["promoted"]), len(top["suppressed"])
    (3, 3)
    """
    caller = "feature_top_tokens"
    view = ModelView(model)
    d = _dictionary(view, dictionary, caller)
    f = _features(d, [feature], caller)
    k = check.count(k, "k", caller)
    with torch.no_grad():
        r = _logit_directions(view, d, f, dtype)[0]
        logits = r @ view.unembed_matrix().to(r.device, dtype)  # [vocab]
    k = min(k, logits.shape[0])
    up, down = logits.topk(k), (-logits).topk(k)
    return {
        "promoted": [(view.token_label(int(i), quote=False), float(v)) for v, i in zip(*up)],
        "suppressed": [(view.token_label(int(i), quote=False), -float(v)) for v, i in zip(*down)],
    }


@check.entry
def ov_feature_map(
    model: Any,
    layer: int,
    head: int,
    dictionary: Any,
    src_tokens: Tokens,
    features: Sequence[int],
    *,
    dtype: torch.dtype = torch.float32,
) -> TokenMap:
    """How head ``(layer, head)``'s OV circuit moves source tokens into a later dictionary's
    features: ``values[s, f] = ln1(E_s) W_V W_O . W_enc[:, f]`` (times the dictionary's input
    scale; through its ``ln2`` weight and centring for a transcoder reading
    ``ln2.hook_normalized``, scale 1), per unit of attention: the feature's pre-activation
    change when the head reads token ``s``.

    >>> import tlprisms as tp
    >>> from tlprisms.demo import load_demo_model, load_demo_sae
    >>> m = tp.weights.ov_feature_map(load_demo_model(), 0, 2, load_demo_sae(), [" France"], [0])
    >>> m.values.shape
    torch.Size([1, 1])
    """
    caller = "ov_feature_map"
    view = ModelView(model)
    layer = check.layer(view, layer, caller)
    head = check.head(view, head, caller)
    d = _dictionary(view, dictionary, caller)
    feats = _features(d, features, caller)
    reads_layer = {
        Site.RESID_PRE: d.layer > layer,
        Site.RESID_MID: d.layer >= layer,
        Site.LN2_NORMALIZED: d.layer >= layer and not view.parallel,
        Site.RESID_POST: d.layer >= layer,
    }.get(d.input_site)
    if not reads_layer:
        raise ArgumentError(
            f"{caller}: the dictionary reads {d.input_hook!r}, which does not hold layer "
            f"{layer}'s attention output (a dictionary on a residual stream after it, or on "
            "the MLP input of this or a later layer, does)."
        )
    src, src_labels = _ids(view, src_tokens, "src_tokens", caller)
    with torch.no_grad():
        E = _embeddings(view, src, view.ln1[layer], dtype)  # [s, d]
        g = view.kv_group(head)
        W_V = view.W_V(layer, dtype).to(E.device)[g]
        W_O = view.W_O(layer, dtype).to(E.device)[head]
        enc = d.W_enc[:, feats].T.to(E.device, dtype) * d.input_scale  # [f, d]
        if d.input_site is Site.LN2_NORMALIZED:
            enc = view.ln2[d.layer].pull_back(enc)
        post = view.ln1_post[layer]
        if post is not None:
            enc = post.pull_back(enc)
        values = ((E @ W_V) @ W_O) @ enc.T
    return TokenMap(
        values=values,
        rows=src_labels,
        cols=[f"L{d.layer}F{f}" for f in feats],
        title=f"OV map of L{layer}H{head} into {d.name} features",
        meta={"layer": layer, "head": head, "features": feats},
    )
