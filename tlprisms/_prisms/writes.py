"""The writes prism: a logit split by every write into the final residual stream.

``residual``, ``heads``, ``neurons``, ``full`` and ``decompose`` are one prism with different
splits. The final norm is frozen at its cached scale ``s``, so the logit of target ``t`` at
position ``i`` is linear in the final residual stream ``x``:

    logit_t = x . r_t + c_t,   r_t = P(w * W_U[:, t]) / s,   c_t = b . W_U[:, t] + b_U[t]

and ``x`` is the sum of its writes: the embeddings, and per layer the attention output (one
term, or one per head and source position ``A[h,i,j] v[j] W_O[h] . r_t``) and the MLP output
(one term, or one per neuron ``post[n] W_out[n] . r_t``), each layer's bias write and
post-norm bias a constant (:func:`tlprisms._core.engine.split_writes`). ``c_t`` appears as the
constant components ``b_U`` and ``ln_final.b``. Soft-capped logits (Gemma 2): the pre-cap
``z`` splits exactly, the post-cap logit with ``rho = cap * tanh(z / cap) / z`` held fixed.

Phases of :func:`run`: (1) resolve the targets and positions into the frozen final readout
and what it explains; (2) split every write by the engine (a chunk of positions at a time
when ``top_k``/``min_abs`` keep only the largest terms, with exact remainders); (3) weigh
atom terms into target terms; (4) refuse a result that is not finite or does not add up
(:func:`tlprisms._core.policy.refuse_broken`).

Completeness: the terms plus the constants equal the model's own logit to float rounding.
"""

from typing import Any

from torch import Tensor

from tlprisms._core import arguments as check
from tlprisms._core.engine import Split, split_writes
from tlprisms._core.errors import ArgumentError, PositionError
from tlprisms._core.policy import refuse_broken
from tlprisms._core.readout import (
    Recorded,
    logit_constants,
    read_logits,
    target_labels,
    weigh,
)
from tlprisms._core.request import Request
from tlprisms._core.sparse import chunked_split
from tlprisms._core.targets import resolve_positions
from tlprisms._core.terms import Terms
from tlprisms._seam import CacheView, ModelView, Site

__all__ = ["split_of", "run", "neuron_activations"]


def split_of(view: ModelView, heads: Any, neurons: Any, by_source: Any, caller: str) -> Split:
    """The layers to split into heads (x sources) and neurons, checked."""
    if not isinstance(by_source, bool):
        raise ArgumentError(f"{caller}: by_source={by_source!r}; pass True or False.")
    head_layers = check.layer_set(view, heads, "heads", caller)
    neuron_layers = (
        frozenset() if view.attn_only else check.layer_set(view, neurons, "neurons", caller)
    )
    return Split(heads=head_layers, neurons=neuron_layers, by_source=by_source)


def run(rec: Recorded, request: Request, split: Split) -> Terms:
    """The writes prism's terms for ``request`` (its target, pos, softcap, top_k, min_abs)."""
    cv = rec.cache
    fr, ex = read_logits(rec, request.target, request.pos, request.softcap)
    extra = logit_constants(fr)
    B, P = fr.readout.positions.shape
    k = ex.weights.shape[2]
    index = None
    if request.is_sparse:
        trivial = ex.trivial

        def finish(atoms: Tensor, s: int, e: int, layer_gap: Tensor) -> Tensor:
            values = atoms if trivial else weigh(atoms, ex.weights[:, s:e])
            refuse_broken(cv, values, ex.values[:, s:e], layer_gap)
            return values

        st, table = chunked_split(
            cv, fr.readout, split, extra, finish, request.top_k, request.min_abs
        )
        values, index = st.values, st.index
    else:
        w = split_writes(cv, fr.readout, split, extra=extra)
        values = w.values.reshape(B, P, k, -1) if ex.trivial else weigh(w.values, ex.weights)
        refuse_broken(cv, values, ex.values, w.layer_gap)
        table = w.table
    return Terms(
        values=values,
        table=table,
        explained=ex.values,
        positions=fr.readout.positions,
        labels=target_labels(fr, B, P, k),
        explains=ex.explains,
        name=request.prism,
        index=index,
    )


def neuron_activations(cv: CacheView, layer: Any, pos: Any) -> Tensor:
    """The cached activations of ``layer``'s neurons at one position per row, ``[batch,
    d_mlp]``."""
    caller = cv.caller
    layer = check.layer(cv.view, layer, caller)
    if cv.view.attn_only:
        raise ArgumentError(f"{caller}: this model is attention-only; it has no neurons.")
    positions = resolve_positions(pos, cv.batch, cv.n_ctx, caller)
    if positions.every:
        raise PositionError(
            f"{caller}: pos='all' is not supported; pass an int or one int per batch row."
        )
    return cv.at(Site.MLP_POST, layer, positions.index.to(cv.device))[:, 0]
