"""``LogitPrism``: exact decompositions of a logit over a TransformerLens cache.

The final norm is frozen at its cached scale ``s = ln_final.hook_scale[b, i]``, so the logit
of target ``t`` at position ``i`` is linear in the final residual stream ``x``:

    logit_t = x . r_t + c_t,   r_t = P(w * W_U[:, t]) / s,   c_t = b . W_U[:, t] + b_U[t]

(``P`` subtracts the mean for LayerNorm-type norms; ``w``/``b`` are the final norm's weight and
bias, absent when folded). The residual, attention and MLP prisms split ``x . r_t`` by every
write into ``x`` (see :mod:`tlprisms._core.engine`); ``c_t`` appears as the constant components
``b_U`` and ``ln_final.b``. With a soft-cap ``logit = cap * tanh(z / cap)`` (Gemma 2) the
pre-cap ``z`` is split exactly, and the post-cap logit by holding
``rho = cap * tanh(z / cap) / z`` fixed per (batch, position, target): every term is scaled
by ``rho``. ``Decomposition.explains`` says which one a result explains.

>>> import tlprisms as tp
>>> from tlprisms.demo import load_demo_model
>>> prism = tp.LogitPrism.run(load_demo_model(), "The capital of France is")
>>> r = prism.residual(" Paris").check()
>>> [str(c) for c in r.components][:4]
['embed', 'L0.attn', 'L0.b_O', 'L0.mlp']
>>> round(float(r.logits[0, 0, 0]), 1), r.explains
(18.9, 'logit')
>>> prism.through_head(0, 2, " Paris").top(1)["component"][0]
'@4 embed'
"""

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Optional, Union

import numpy as np
import torch
from torch import Tensor

from tlprisms._core import arguments as check
from tlprisms._core.engine import Split, split_writes
from tlprisms._core.errors import (
    ArgumentError,
    CacheError,
    CompletenessError,
    NonFiniteError,
    PositionError,
    TargetError,
)
from tlprisms._core.readout import (
    Explained,
    FinalReadout,
    Recorded,
    Softcap,
    explain,
    final_readout,
    weigh,
)
from tlprisms._core.result import ComponentTable, Decomposition
from tlprisms._core.sparse import check_sparse_args, chunked_split, sparse_result
from tlprisms._core.targets import resolve_positions
from tlprisms._prisms.chain import Hop, ReadAt, read_at, run_chain
from tlprisms._seam import CacheView, ModelView, Site, needed_hooks

if TYPE_CHECKING:  # the result types of verify/effects (imported lazily at call time)
    from tlprisms._causal.certificate import Verification
    from tlprisms._causal.effects import Effects

__all__ = ["LogitPrism", "LayerSelection"]

#: internal consistency tolerance (relative to the sum of |terms|) before a result is refused
_STRUCTURAL_RTOL = {torch.float32: 1e-4, torch.float64: 1e-6}  # models may norm in float32
_STRUCTURAL_RTOL_LOWP = 3e-2
#: the model's logits must match the cache's final readout to this (relative, at the last position)
_LOGITS_RTOL = {False: 1e-3, True: 5e-2}
#: a float64 model's logits match the float64 readout to this when it computed in float64
_FLOAT64_LOGITS_RTOL = 1e-12

#: which layers to split: ``"all"``, one layer, a sequence of layers, or ``()`` for none
LayerSelection = Union[str, int, Sequence[int], None]


class LogitPrism:
    """Exact decompositions of a model's logits, with the cache's non-linear values frozen.

    Args:
        model: a ``HookedTransformer``, or a ``TransformerBridge`` after
            ``enable_compatibility_mode()``; in eval mode.
        cache: the ``ActivationCache`` (or a dict of hook name -> tensor) that
            ``model.run_with_cache(tokens)`` returned.
        tokens: the input tokens ``[batch, pos]`` (optional): enables :class:`NextToken`
            targets, token labels, and a check that the cache belongs to these tokens.
        logits: the logits ``run_with_cache`` returned (optional): results then explain
            the model's own output and :meth:`Decomposition.check` compares against it.

    The cache is checked to come from this model (and these tokens) before anything is
    decomposed. Nothing is copied from or written to the model or the cache.
    """

    @check.entry
    def __init__(
        self,
        model: Any,
        cache: Any,
        *,
        tokens: Optional[Tensor] = None,
        logits: Optional[Tensor] = None,
    ) -> None:
        caller = "LogitPrism"
        self.view = ModelView(model)
        self.model = model
        self.cache = cache
        cv = CacheView(self.view, cache, caller)
        self.batch, self.n_ctx = cv.batch, cv.n_ctx
        self.device, self.dtype = cv.device, cv.dtype
        self.tokens = None if tokens is None else self._check_tokens(tokens, cv)
        cv.verify(self.tokens)
        self.logits = None if logits is None else self._check_logits(logits, cv)
        self._rec = Recorded(cv, self.tokens, self.logits)
        #: the dtype the model computed in (sets the default tolerance of ``check()``)
        self.precision = cv.precision()
        if self.logits is not None:
            self._check_logits_match()

    @classmethod
    def _recorded(cls, view: ModelView, cache: Any, logits: Tensor, caller: str) -> "LogitPrism":
        """A prism over a cache and logits that the caller has itself just recorded with
        ``view.model.run_with_cache`` (``explain_task`` does, batch after batch). That the
        cache comes from this model and that the logits belong to it holds by construction,
        so those checks (provenance, logits match) are skipped; terms are still refused when
        they are not finite or do not add up. Never for a cache or logits from outside."""
        self = cls.__new__(cls)
        self.view, self.model, self.cache = view, view.model, cache
        cv = CacheView(view, cache, caller)
        self.batch, self.n_ctx = cv.batch, cv.n_ctx
        self.device, self.dtype = cv.device, cv.dtype
        self.tokens = None
        self.logits = logits.detach()
        self._rec = Recorded(cv, None, self.logits)
        self.precision = cv.precision()
        return self

    # ------------------------------------------------------------------ inputs
    @staticmethod
    def _check_tokens(tokens: Any, cv: CacheView) -> Tensor:
        caller = cv.caller
        if (
            not isinstance(tokens, Tensor)
            or tokens.dtype.is_floating_point
            or tokens.dtype == torch.bool
        ):
            what = (
                f"a {tokens.dtype} tensor" if isinstance(tokens, Tensor) else type(tokens).__name__
            )
            raise ArgumentError(
                f"{caller}: tokens must be an integer tensor [batch, pos] (what "
                f"model.to_tokens returns); got {what}."
            )
        tokens = tokens[None] if tokens.ndim == 1 else tokens
        if tuple(tokens.shape) != (cv.batch, cv.n_ctx):
            raise CacheError(
                f"{caller}: tokens has shape {tuple(tokens.shape)} but the cache was "
                f"recorded for inputs of shape ({cv.batch}, {cv.n_ctx}); pass the tokens "
                "the cache was recorded with."
            )
        bad = (tokens < 0) | (tokens >= cv.view.d_vocab_in)
        if bool(bad.any()):
            raise TargetError(
                f"{caller}: token id {int(tokens[bad][0])} is outside the "
                f"vocabulary [0, {cv.view.d_vocab_in})."
            )
        return tokens.to(cv.device)

    @staticmethod
    def _check_logits(logits: Any, cv: CacheView) -> Tensor:
        view, caller = cv.view, cv.caller
        if not isinstance(logits, Tensor) or not logits.dtype.is_floating_point or logits.ndim != 3:
            what = (
                f"shape {tuple(logits.shape)}, dtype {logits.dtype}"
                if isinstance(logits, Tensor)
                else type(logits).__name__
            )
            raise ArgumentError(
                f"{caller}: logits must be the float tensor [batch, pos, d_vocab] "
                f"that run_with_cache returned; got {what}."
            )
        if tuple(logits.shape[:2]) != (cv.batch, cv.n_ctx) or logits.shape[-1] != view.d_vocab:
            raise CacheError(
                f"{caller}: logits has shape {tuple(logits.shape)}, expected "
                f"({cv.batch}, {cv.n_ctx}, {view.d_vocab}) for this cache and model."
            )
        if not bool(torch.isfinite(logits.sum(dtype=torch.float64))):  # NaN/inf make it so
            where = tuple(int(i) for i in torch.nonzero(~torch.isfinite(logits))[0])
            raise NonFiniteError(
                f"{caller}: the logits hold NaN or infinity (first at batch, "
                f"pos, token = {where}); the forward pass overflowed. Re-run it "
                "in float32, or pass logits=None."
            )
        return logits.detach()

    def _check_logits_match(self) -> None:
        """The logits passed in must be this cache's: compare each row's top logit at the
        last position with the frozen readout of the cache."""
        rec = self._rec
        assert rec.logits is not None
        ids = rec.logits[:, -1].argmax(-1)
        fr = final_readout(Recorded(rec.cache.for_call("LogitPrism")), ids, -1)
        ex = explain(Recorded(rec.cache), fr, "post")
        want = ex.values[:, 0, 0]
        got = rec.logits[:, -1].gather(-1, ids[:, None]).to(want.device, self.dtype)[:, 0]
        rtol = _LOGITS_RTOL[rec.cache.low_precision]
        rel = float(((got - want).abs() / (1.0 + want.abs())).max())
        if self.precision == "float64" and rel > _FLOAT64_LOGITS_RTOL:
            # the model computed part of its forward pass in float32 (HF's RMSNorm upcasts to
            # float32 only), so its logits carry float32 rounding
            self.precision = "float32"
        if not rel <= rtol:
            raise CacheError(
                "LogitPrism: the logits passed do not belong to this cache: the top logit at the "
                f"last position is {float(got[0]):.6g} but the cache's final residual stream gives "
                f"{float(want[0]):.6g}. Pass the logits and cache of the same "
                "model.run_with_cache call."
            )

    # ------------------------------------------------------------------ constructors
    @classmethod
    @check.entry
    def run(
        cls, model: Any, input: Union[str, list, Tensor], *, prepend_bos: Optional[bool] = None
    ) -> "LogitPrism":
        """Run ``model.run_with_cache`` on ``input`` (text, a list of texts, or tokens) and
        wrap the result.

        Records only the hooks the prisms need (``needed_hooks(model)``), and keeps the
        tokens and the model's logits so that results are checked against the model's own
        output.
        """
        caller = "LogitPrism.run"
        view = ModelView(model)
        if prepend_bos is not None and not isinstance(prepend_bos, bool):
            raise ArgumentError(f"{caller}: prepend_bos={prepend_bos!r}; pass True, False or None.")
        if isinstance(input, str) or (
            isinstance(input, list) and input and all(isinstance(t, str) for t in input)
        ):
            if view.tokenizer() is None:
                raise ArgumentError(
                    f"{caller}: the model has no tokenizer, so text cannot be "
                    "tokenized; pass token ids [batch, pos] instead."
                )
            kw = {} if prepend_bos is None else {"prepend_bos": prepend_bos}
            tokens = model.to_tokens(input, **kw)
        elif isinstance(input, Tensor):
            tokens = input[None] if input.ndim == 1 else input
            if tokens.dtype.is_floating_point or tokens.dtype == torch.bool or tokens.ndim != 2:
                raise ArgumentError(
                    f"{caller}: token input must be an integer tensor [batch, pos] "
                    f"or [pos]; got dtype {input.dtype}, shape {tuple(input.shape)}."
                )
            bad = (tokens < 0) | (tokens >= view.d_vocab_in)
            if bool(bad.any()):
                raise TargetError(
                    f"{caller}: token id {int(tokens[bad][0])} is outside the "
                    f"vocabulary [0, {view.d_vocab_in})."
                )
        else:
            raise ArgumentError(
                f"{caller}: input={input!r:.60}; pass a string, a non-empty list of "
                "strings, or an integer tensor of token ids."
            )
        if tokens.shape[-1] == 0:
            raise ArgumentError(
                f"{caller}: the input has no tokens; pass at least one token "
                "(an empty string gives none without a BOS token)."
            )
        with torch.no_grad():
            logits, cache = model.run_with_cache(tokens, names_filter=needed_hooks(model))
        return cls(model, cache, tokens=tokens, logits=logits)

    # ------------------------------------------------------------------ the pipeline
    def _split(self, heads: Any, neurons: Any, by_source: Any, caller: str) -> Split:
        if not isinstance(by_source, bool):
            raise ArgumentError(f"{caller}: by_source={by_source!r}; pass True or False.")
        head_layers = check.layer_set(self.view, heads, "heads", caller)
        neuron_layers = (
            frozenset()
            if self.view.attn_only
            else check.layer_set(self.view, neurons, "neurons", caller)
        )
        return Split(heads=head_layers, neurons=neuron_layers, by_source=by_source)

    def _readout(
        self, target: Any, pos: Any, softcap: Any, caller: str
    ) -> tuple[Recorded, FinalReadout, Explained]:
        check.choice(softcap, "softcap", ("post", "pre"), caller)
        rec = Recorded(self._rec.cache.for_call(caller), self.tokens, self.logits)
        fr = final_readout(rec, target, pos)
        return rec, fr, explain(rec, fr, softcap)

    def _refuse_broken(
        self,
        rec: Recorded,
        values: Tensor,
        explained: Tensor,
        layer_gap: Tensor,
        sums: Optional[tuple[Optional[Tensor], Tensor]] = None,
    ) -> None:
        """Refuse a result that is not finite, or whose parts do not add up (a structural
        problem, not rounding). ``sums``: ``(sum |values|, sum values)`` over the components
        when the caller has them, else they are computed here. ``sum |values|`` may be None:
        the sum alone shows NaN/inf in any term, and a gap within ``rtol * (|explained| + 1)``
        passes the full bound too (which adds ``sum |values|`` to the scale), so the second
        pass over the terms is made only when that smaller bound fails."""
        cv = rec.cache
        if sums is None:
            sums = (torch.linalg.vector_norm(values, 1, -1), values.sum(-1))
        l1, total = sums  # NaN/inf in any term makes l1 (and the sum) non-finite
        finite = total if l1 is None else l1
        if not bool(torch.isfinite(finite).all()) or not bool(torch.isfinite(explained).all()):
            cv.refuse_nonfinite("the decomposition")
        rtol = _STRUCTURAL_RTOL_LOWP if cv.low_precision else _STRUCTURAL_RTOL[cv.dtype]
        if l1 is None:
            least = explained.abs() + 1.0
            if not bool(((total - explained).abs() > rtol * least).any()) and not bool(
                (layer_gap.abs().amax(-1) > rtol * least.amax(-1)).any()
            ):
                return
            l1 = torch.linalg.vector_norm(values, 1, -1)
            if not bool(torch.isfinite(l1).all()):
                cv.refuse_nonfinite("the decomposition")
        scale = l1 + explained.abs() + 1.0
        gap = (total - explained).abs()
        if bool((gap > rtol * scale).any()) or bool(
            (layer_gap.abs().amax(-1) > rtol * scale.amax(-1)).any()
        ):
            raise CompletenessError(
                f"{cv.caller}: the terms do not add up to what they explain (gap up to "
                f"{float(gap.max()):.3g}; split-layer gap up to "
                f"{float(layer_gap.abs().max()):.3g})."
                " The cache was probably edited by hooks, or this architecture "
                f"({cv.view.describe()}) writes to the residual stream in a way tlprisms does "
                "not know. Nothing was returned; please report the model config."
            )

    def _result(
        self,
        rec: Recorded,
        values: Tensor,
        table: ComponentTable,
        explained: Tensor,
        positions: Tensor,
        labels: np.ndarray,
        explains: str,
        prism: str,
        index: Optional[Tensor] = None,
    ) -> Decomposition:
        return Decomposition(
            values=values,
            components=table,
            logits=explained,
            positions=positions,
            target_labels=labels,
            explains=explains,
            prism=prism,
            str_tokens=self._str_tokens(),
            precision=self.precision,
            n_layers=self.view.n_layers,
            index=index,
        )

    def _sparse(
        self, rec: Recorded, values: Tensor, table: ComponentTable, top_k: Any, min_abs: Any
    ) -> tuple[Tensor, ComponentTable, Optional[Tensor]]:
        """A checked dense block made sparse when ``top_k``/``min_abs`` ask for it."""
        if top_k is None and min_abs is None:
            return values, table, None
        st, table = sparse_result(values, table, top_k, min_abs)
        return st.values, table, st.index

    @check.entry
    def decompose(
        self,
        target: Any,
        pos: Any = -1,
        *,
        heads: LayerSelection = (),
        neurons: LayerSelection = (),
        by_source: bool = True,
        softcap: Softcap = "post",
        top_k: Optional[int] = None,
        min_abs: Optional[float] = None,
    ) -> Decomposition:
        """The general prism: split the chosen attention layers into heads (x sources) and
        the chosen MLP layers into neurons; every other write stays one term.

        Args:
            target: a token id, a single-token string, :class:`LogitDiff`, :class:`Direction`,
                a list of these (shared by the batch), :class:`PerRow`, an integer tensor
                ``[batch]``/``[batch, k]`` (per row), or with ``pos="all"`` a tensor
                ``[batch, pos]`` or :class:`NextToken`.
            pos: the explained position: an index (default -1), one index per batch row, or
                ``"all"``.
            heads: attention layers to split into heads: ``"all"``, a layer, a list of
                layers, or ``()`` (default) for none.
            neurons: MLP layers to split into neurons, the same way.
            by_source: split heads by the source position they read too (default True).
            softcap: for soft-capped models, explain the ``"post"``-cap logit (default) or the
                ``"pre"``-cap logit.
            top_k: keep per explained value only the ``top_k`` largest terms by ``|value|``,
                every constant, and one remainder (kind ``"rest"``) per (kind, layer) for the
                terms dropped, so totals stay exact (see :mod:`tlprisms._core.sparse`); computed a
                chunk of positions at a time. None (default): every term.
            min_abs: keep only terms with ``|value| >= min_abs`` (with ``top_k``: of the
                ``top_k``); the others go into the remainders. None (default): no threshold.
        """
        return self._decompose(
            target,
            pos,
            heads,
            neurons,
            by_source,
            softcap,
            "LogitPrism.decompose",
            top_k=top_k,
            min_abs=min_abs,
        )

    def _decompose(
        self,
        target: Any,
        pos: Any,
        heads: Any,
        neurons: Any,
        by_source: Any,
        softcap: Any,
        caller: str,
        top_k: Any = None,
        min_abs: Any = None,
    ) -> Decomposition:
        split = self._split(heads, neurons, by_source, caller)
        top_k, min_abs = check_sparse_args(top_k, min_abs, caller)
        with torch.no_grad():
            rec, fr, ex = self._readout(target, pos, softcap, caller)
            extra = []
            if fr.has_b_U:
                extra.append((fr.bias, ComponentTable.block("b_U")))
            if fr.has_norm_bias:
                extra.append((fr.norm_bias, ComponentTable.block("ln_final.b")))
            if top_k is not None or min_abs is not None:
                return self._decompose_sparse(rec, fr, ex, split, extra, top_k, min_abs, caller)
            terms = split_writes(rec.cache, fr.readout, split, extra=extra)
            B, P = fr.readout.positions.shape
            k = ex.weights.shape[2]
            values = (
                terms.values.reshape(B, P, k, -1) if ex.trivial else weigh(terms.values, ex.weights)
            )
            self._refuse_broken(rec, values, ex.values, terms.layer_gap)
        labels = fr.atoms.labels
        labels = np.broadcast_to(labels, (B, P if labels.shape[1] != 1 else 1, k))
        return self._result(
            rec,
            values,
            terms.table,
            ex.values,
            fr.readout.positions,
            np.array(labels),
            ex.explains,
            caller.split(".")[-1],
        )

    def _decompose_sparse(
        self,
        rec: Recorded,
        fr: FinalReadout,
        ex: Explained,
        split: Split,
        extra: list,
        top_k: Optional[int],
        min_abs: Optional[float],
        caller: str,
    ) -> Decomposition:
        """:meth:`_decompose` with ``top_k``/``min_abs``: a chunk of positions at a time."""
        B, P = fr.readout.positions.shape
        k = ex.weights.shape[2]
        trivial = ex.trivial

        def finish(atoms: Tensor, s: int, e: int, layer_gap: Tensor) -> Tensor:
            values = atoms if trivial else weigh(atoms, ex.weights[:, s:e])
            self._refuse_broken(rec, values, ex.values[:, s:e], layer_gap)
            return values

        st, table = chunked_split(rec.cache, fr.readout, split, extra, finish, top_k, min_abs)
        labels = fr.atoms.labels
        labels = np.broadcast_to(labels, (B, P if labels.shape[1] != 1 else 1, k))
        return self._result(
            rec,
            st.values,
            table,
            ex.values,
            fr.readout.positions,
            np.array(labels),
            ex.explains,
            caller.split(".")[-1],
            index=st.index,
        )

    def _str_tokens(self) -> Optional[list]:
        if self.tokens is None or self.view.tokenizer() is None:
            return None
        return [
            [self.view.token_label(int(t), quote=False) for t in row] for row in self.tokens.cpu()
        ]

    # ------------------------------------------------------------------ presets
    @check.entry
    def residual(
        self,
        target: Any,
        pos: Any = -1,
        *,
        softcap: Softcap = "post",
        top_k: Optional[int] = None,
        min_abs: Optional[float] = None,
    ) -> Decomposition:
        """One term per embedding, attention layer and MLP layer, plus the bias terms
        (``top_k``/``min_abs``: as for :meth:`decompose`)."""
        return self._decompose(
            target, pos, (), (), True, softcap, "LogitPrism.residual", top_k, min_abs
        )

    @check.entry
    def heads(
        self,
        target: Any,
        pos: Any = -1,
        layers: LayerSelection = "all",
        *,
        by_source: bool = True,
        softcap: Softcap = "post",
        top_k: Optional[int] = None,
        min_abs: Optional[float] = None,
    ) -> Decomposition:
        """Attention layers (``layers``, default all) split into heads x source positions
        (``top_k``/``min_abs``: as for :meth:`decompose`)."""
        return self._decompose(
            target, pos, layers, (), by_source, softcap, "LogitPrism.heads", top_k, min_abs
        )

    @check.entry
    def neurons(
        self,
        target: Any,
        pos: Any = -1,
        layers: LayerSelection = "all",
        *,
        softcap: Softcap = "post",
        top_k: Optional[int] = None,
        min_abs: Optional[float] = None,
    ) -> Decomposition:
        """MLP layers (``layers``, default all) split into neurons (``top_k``/``min_abs``: as
        for :meth:`decompose`)."""
        return self._decompose(
            target, pos, (), layers, True, softcap, "LogitPrism.neurons", top_k, min_abs
        )

    @check.entry
    def full(
        self,
        target: Any,
        pos: Any = -1,
        *,
        softcap: Softcap = "post",
        top_k: Optional[int] = None,
        min_abs: Optional[float] = None,
    ) -> Decomposition:
        """Every head x source and every neuron at once (``top_k``/``min_abs``: as for
        :meth:`decompose`; ``full(tp.NextToken(), pos="all", top_k=32)`` keeps long contexts
        small)."""
        return self._decompose(
            target, pos, "all", "all", True, softcap, "LogitPrism.full", top_k, min_abs
        )

    # ------------------------------------------------------------------ dictionary features
    @check.entry
    def features(
        self,
        target: Any,
        dictionaries: Any,
        pos: Any = -1,
        *,
        path: Sequence[Any] = (),
        heads: LayerSelection = (),
        neurons: LayerSelection = (),
        by_source: bool = True,
        softcap: Softcap = "post",
        top_k: Optional[int] = None,
        min_abs: Optional[float] = None,
    ) -> Decomposition:
        """Split the logit into dictionary features (SAEs, transcoders), exactly.

        A residual-stream dictionary (at most one) replaces every write before its site by
        its features, ``b_dec`` and its reconstruction error (taken from the cache, so the sum
        is exact); an ``hook_attn_out``/``hook_mlp_out`` dictionary or a transcoder replaces
        that layer's attention/MLP write. Every other write stays as in :meth:`decompose`
        (``heads``/``neurons`` split those layers further).

        Args:
            target: as for :meth:`decompose`.
            dictionaries: a :class:`~tlprisms.Dictionary` or a list of them (e.g. one
                transcoder per layer).
            pos: an index (default -1), one per batch row, or ``"all"``.
            path: hops (:class:`Hop`) to follow back first, as in :meth:`chain`; the last
                hop's readout is then split into features (one position per row).
            top_k / min_abs: keep the largest terms and one remainder per (kind, layer), as
                for :meth:`decompose` (totals stay exact).

        Components: kind ``"feature"`` (``layer``, ``feature``), and per dictionary
        ``"b_dec"``, ``"error"`` (and ``"skip"`` for a transcoder's skip connection).

        >>> import tlprisms as tp
        >>> from tlprisms.demo import load_demo_model, load_demo_sae
        >>> prism = tp.LogitPrism.run(load_demo_model(), "The capital of France is")
        >>> r = prism.features(" Paris", load_demo_sae()).check()
        >>> r.top(1, kind="feature")["component"][0]
        'L1F...'
        """
        from tlprisms._prisms.features import check_dictionaries, feature_split

        caller = "LogitPrism.features"
        dicts = check_dictionaries(self.view, dictionaries, caller)
        top_k, min_abs = check_sparse_args(top_k, min_abs, caller)
        if path:
            return self._chain(
                target,
                path,
                pos,
                heads,
                neurons,
                by_source,
                softcap,
                caller,
                top_k,
                min_abs,
                dictionaries=dicts,
            )
        split = self._split(heads, neurons, by_source, caller)
        with torch.no_grad():
            rec, fr, ex = self._readout(target, pos, softcap, caller)
            extra = []
            if fr.has_b_U:
                extra.append((fr.bias, ComponentTable.block("b_U")))
            if fr.has_norm_bias:
                extra.append((fr.norm_bias, ComponentTable.block("ln_final.b")))
            terms = feature_split(rec.cache, fr.readout, dicts, split, extra)
            B, P = fr.readout.positions.shape
            k = ex.weights.shape[2]
            values = (
                terms.values.reshape(B, P, k, -1) if ex.trivial else weigh(terms.values, ex.weights)
            )
            self._refuse_broken(rec, values, ex.values, terms.layer_gap)
            values, table, index = self._sparse(rec, values, terms.table, top_k, min_abs)
        labels = fr.atoms.labels
        labels = np.broadcast_to(labels, (B, P if labels.shape[1] != 1 else 1, k))
        return self._result(
            rec,
            values,
            table,
            ex.values,
            fr.readout.positions,
            np.array(labels),
            ex.explains,
            "features",
            index,
        )

    # ------------------------------------------------------------------ chained prisms
    @check.entry
    def chain(
        self,
        target: Any,
        path: Sequence[Any],
        pos: Any = -1,
        *,
        heads: LayerSelection = (),
        neurons: LayerSelection = (),
        by_source: bool = True,
        softcap: Softcap = "post",
        top_k: Optional[int] = None,
        min_abs: Optional[float] = None,
    ) -> Decomposition:
        """Follow a path of hops (:class:`Hop`) back from the logit and split the last one.

        ``path=[Hop("head", 5, 1, src=3), Hop("neuron", 2, 40)]`` explains neuron L2N40's
        contribution, at position 3, to head L5H1's term. Each hop's result sums exactly to
        the term it splits; components carry ``at``, the residual position they wrote at.
        ``heads``/``neurons``/``by_source`` choose how the last hop's writers are split;
        ``top_k``/``min_abs`` keep the largest terms and a remainder per (kind, layer), as
        for :meth:`decompose`.
        """
        return self._chain(
            target,
            path,
            pos,
            heads,
            neurons,
            by_source,
            softcap,
            "LogitPrism.chain",
            top_k,
            min_abs,
        )

    def _chain(
        self,
        target: Any,
        path: Any,
        pos: Any,
        heads: Any,
        neurons: Any,
        by_source: Any,
        softcap: Any,
        caller: str,
        top_k: Any = None,
        min_abs: Any = None,
        dictionaries: Sequence[Any] = (),
    ) -> Decomposition:
        if isinstance(path, (Hop, str)) or not isinstance(path, Sequence):
            raise ArgumentError(
                f"{caller}: path={path!r:.80}; pass a list of tlprisms.Hop, e.g. "
                "[tp.Hop('head', 5, 1, src=3), tp.Hop('neuron', 2, 40)]."
            )
        hops = [h if isinstance(h, Hop) else Hop(*h) for h in path]
        split = self._split(heads, neurons, by_source, caller)
        top_k, min_abs = check_sparse_args(top_k, min_abs, caller)
        with torch.no_grad():
            rec, fr, ex = self._readout(target, pos, softcap, caller)
            ct = run_chain(rec, fr, ex, hops, split, dictionaries)
            sums = None if ct.total is None else (ct.l1, ct.total)
            self._refuse_broken(rec, ct.values, ct.term, torch.zeros_like(ct.term), sums)
            values, table, index = self._sparse(rec, ct.values, ct.table, top_k, min_abs)
        name = " > ".join(str(h) for h in hops)
        B, k = ct.values.shape[0], ct.values.shape[2]
        labels = np.array(np.broadcast_to(fr.atoms.labels, (B, 1, k)))
        return self._result(
            rec,
            values,
            table,
            ct.term,
            ct.positions,
            labels,
            f"{ex.explains} term of {name}",
            f"through {name}",
            index=index,
        )

    @check.entry
    def through_head(
        self,
        layer: int,
        head: int,
        target: Any,
        pos: Any = -1,
        *,
        src: Optional[int] = None,
        heads: LayerSelection = (),
        neurons: LayerSelection = (),
        by_source: bool = True,
        softcap: Softcap = "post",
        top_k: Optional[int] = None,
        min_abs: Optional[float] = None,
    ) -> Decomposition:
        """Split head ``(layer, head)``'s term by source position and by what wrote into the
        residual stream there (embed, pos_embed, earlier attention/MLP layers, or their heads
        and neurons when ``heads``/``neurons`` name layers). Totals the head's term in
        :meth:`heads`.
        """
        return self._chain(
            target,
            [_hop("head", layer, head, src, "LogitPrism.through_head")],
            pos,
            heads,
            neurons,
            by_source,
            softcap,
            "LogitPrism.through_head",
            top_k,
            min_abs,
        )

    @check.entry
    def through_neuron(
        self,
        layer: int,
        neuron: int,
        target: Any,
        pos: Any = -1,
        *,
        heads: LayerSelection = (),
        neurons: LayerSelection = (),
        by_source: bool = True,
        softcap: Softcap = "post",
        top_k: Optional[int] = None,
        min_abs: Optional[float] = None,
    ) -> Decomposition:
        """Split neuron ``(layer, neuron)``'s term by what wrote into the residual stream it
        reads, with its activation gate held fixed. Totals the neuron's term in :meth:`neurons`."""
        return self._chain(
            target,
            [_hop("neuron", layer, neuron, None, "LogitPrism.through_neuron")],
            pos,
            heads,
            neurons,
            by_source,
            softcap,
            "LogitPrism.through_neuron",
            top_k,
            min_abs,
        )

    # ------------------------------------------------------------------ attention scores
    @check.entry
    def qk(
        self,
        layer: int,
        head: int,
        pos: int = -1,
        keys: Any = None,
        *,
        contrast: bool = False,
        sides: str = "both",
        path: Optional[Sequence[Any]] = None,
        q_heads: LayerSelection = (),
        q_neurons: LayerSelection = (),
        k_heads: LayerSelection = (),
        k_neurons: LayerSelection = (),
        by_source: bool = True,
        softcap: Softcap = "post",
        top_k: Optional[int] = None,
        min_abs: Optional[float] = None,
    ) -> Decomposition:
        """Why head ``(layer, head)`` attends where it does: its pre-softmax scores at query
        position ``pos`` for each key position, split exactly into (query-side writer,
        key-side writer) pairs, with ln1's cached scale frozen (see :mod:`tlprisms._prisms.qk`).

        Args:
            keys: key positions (default every key up to ``pos``): the targets.
            contrast: with ``keys=[j, j2]``, explain ``score(j) - score(j2)`` (softmax sees
                only differences).
            sides: ``"both"`` (default): pairs of writers; ``"query"``: split the query side
                only, the key vector kept whole (one key-side component, ``k:whole``): the
                query writers' terms of the score; ``"key"``: the reverse.
            path: with ``sides="query"``/``"key"``, a chain of :class:`Hop` back from that
                side (what fed the query at ``pos``, the key at each key): the components are
                the last hop's writers, labelled as :meth:`chain` labels them, and add up to
                the first hop's term of that side (e.g. ``L0H1[src 3]`` of
                ``qk(..., sides="query", q_heads=0)``); ``q_heads``/``q_neurons`` (or
                ``k_...``) split the last hop (see :mod:`tlprisms._prisms.qk_chain`).
            q_heads, q_neurons: earlier layers whose writes into the query position are split
                into heads (x sources when ``by_source``) / neurons; ``k_heads``, ``k_neurons``
                the same for the key positions. By default both sides are layer-level.
            softcap: for soft-capped scores (Gemma 2), explain the ``"post"``-cap score
                (ratio frozen, default) or the ``"pre"``-cap score.
            top_k, min_abs: keep per key only the ``top_k`` largest pair terms (those with
                ``|term| >= min_abs``), the constants and one remainder per (query-side kind
                and layer, key-side kind and layer), ``q:L3.heads x k:embed (rest)``, so the
                totals stay exact; computed a chunk of keys at a time.

        Components are pairs: ``to_frame()`` has ``q_kind, q_layer, q_head, q_neuron, q_src``
        and ``k_kind, ...``; select with the same names (``select(q_kind="head")``);
        ``aggregate("q_kind", "q_layer")`` sums per query-side layer (key side summed). An
        ALiBi model's positional bias is the constant pair ``L{layer}H{head} alibi``.

        >>> import tlprisms as tp
        >>> from tlprisms.demo import load_demo_model
        >>> prism = tp.LogitPrism.run(load_demo_model(), "The capital of France is")
        >>> r = prism.qk(1, 0).check()
        >>> r.explains, r.values.shape[2]
        ('attention score', 6)
        """
        from tlprisms._prisms.qk import qk_terms, resolve_keys

        caller = "LogitPrism.qk"
        layer = check.layer(self.view, layer, caller)
        head = check.head(self.view, head, caller)
        check.choice(softcap, "softcap", ("post", "pre"), caller)
        check.choice(sides, "sides", ("both", "query", "key"), caller)
        whole = {"query": (k_heads, k_neurons, "k"), "key": (q_heads, q_neurons, "q")}
        if sides in whole and any(sel not in ((), None) for sel in whole[sides][:2]):
            side = whole[sides][2]
            raise ArgumentError(
                f"{caller}: sides={sides!r} keeps the {'key' if side == 'k' else 'query'} "
                f"side whole, so {side}_heads/{side}_neurons cannot split it; drop them or "
                "use sides='both'."
            )
        i, key_list = resolve_keys(pos, keys, contrast, self.n_ctx, caller)
        q_split = self._split(q_heads, q_neurons, by_source, caller)
        k_split = self._split(k_heads, k_neurons, by_source, caller)
        if path is not None:  # a chain through one side of the score
            split = q_split if sides == "query" else k_split
            return self._qk_chain(
                layer, head, i, key_list, sides, path, split, softcap, contrast, top_k, min_abs
            )
        top_k, min_abs = check_sparse_args(top_k, min_abs, caller)
        rec = Recorded(self._rec.cache.for_call(caller), self.tokens, self.logits)
        args = (rec, layer, head, i, key_list, q_split, k_split, softcap, contrast, sides)
        with torch.no_grad():
            if top_k is None and min_abs is None:
                # finite and checked against the recorded scores by qk_terms itself
                t: Any = qk_terms(*args)
                index = None
            else:
                from tlprisms._prisms.qk import qk_sparse_terms

                t = qk_sparse_terms(*args, top_k, min_abs)
                index = t.index
                zero = torch.zeros_like(t.explained)
                self._refuse_broken(rec, t.values, t.explained, zero)
        return self._result(
            rec,
            t.values,
            t.table,
            t.explained,
            t.positions,
            t.labels,
            t.explains,
            f"qk L{layer}H{head}",
            index=index,
        )

    def _qk_chain(
        self,
        layer: int,
        head: int,
        pos: int,
        keys: list,
        sides: str,
        path: Any,
        split: Split,
        softcap: str,
        contrast: bool,
        top_k: Any,
        min_abs: Any,
    ) -> Decomposition:
        """``qk(..., path=[...])``: :func:`tlprisms._prisms.qk_chain.qk_chain_terms`, checked, and
        kept sparse as :meth:`chain` keeps it when ``top_k``/``min_abs`` ask."""
        from tlprisms._prisms.qk_chain import qk_chain_terms, resolve_path

        caller = "LogitPrism.qk"
        hops = resolve_path(path, sides, caller)
        top_k, min_abs = check_sparse_args(top_k, min_abs, caller)
        rec = Recorded(self._rec.cache.for_call(caller), self.tokens, self.logits)
        with torch.no_grad():
            t = qk_chain_terms(rec, layer, head, pos, keys, sides, hops, split, softcap, contrast)
            self._refuse_broken(rec, t.values, t.term, torch.zeros_like(t.term))
            values, table, index = self._sparse(rec, t.values, t.table, top_k, min_abs)
        return self._result(
            rec,
            values,
            table,
            t.term,
            t.positions,
            t.labels,
            t.explains,
            f"qk L{layer}H{head} {sides} side through {t.name}",
            index=index,
        )

    @check.entry
    def readout(
        self,
        vector: Tensor,
        layer: int,
        pos: Any = -1,
        *,
        at: ReadAt = "ln1",
        bias: Any = None,
        heads: LayerSelection = (),
        neurons: LayerSelection = (),
        by_source: bool = True,
        top_k: Optional[int] = None,
        min_abs: Optional[float] = None,
    ) -> Decomposition:
        """Decompose any linear read ``norm(x) . vector + bias`` of the residual stream.

        Args:
            vector: ``[d_model]`` or ``[k, d_model]`` (a probe direction, an SAE encoder row,
                ``W_in[:, n]`` for a neuron's pre-activation, a column of ``W_V``...).
            layer: the block whose stream is read.
            at: ``"ln1"`` / ``"ln2"`` / ``"ln_final"`` to read through that norm (frozen at
                its cached scale), or ``"resid_pre"`` / ``"resid_mid"`` / ``"resid_post"`` to
                read the raw stream.
            bias: a constant added to the read (e.g. ``b_in[n]``).
            top_k, min_abs: keep the largest terms and a remainder per (kind, layer), as for
                :meth:`decompose`.
        """
        caller = "LogitPrism.readout"
        split = self._split(heads, neurons, by_source, caller)
        top_k, min_abs = check_sparse_args(top_k, min_abs, caller)
        rec = Recorded(self._rec.cache.for_call(caller), self.tokens, self.logits)
        with torch.no_grad():
            rt = read_at(rec, vector, layer, pos, at, bias, split)
            self._refuse_broken(rec, rt.terms.values, rt.explained, rt.terms.layer_gap)
            values, table, index = self._sparse(
                rec, rt.terms.values, rt.terms.table, top_k, min_abs
            )
        K = rt.explained.shape[-1]
        labels = np.array([[[f"u{k}@{at}{rt.layer}" for k in range(K)]]], dtype=object)
        return self._result(
            rec,
            values,
            table,
            rt.explained,
            rt.positions,
            labels,
            f"readout at {at} of layer {rt.layer}",
            "readout",
            index=index,
        )

    @check.entry
    def neuron_activations(self, layer: int, pos: Any = -1) -> Tensor:
        """The cached activations of layer ``layer``'s neurons at the explained position
        ``pos`` (an int or one int per batch row): ``[batch, d_mlp]`` (gated MLPs:
        ``act(gate) * up``), e.g. for :func:`tlprisms.weights.neuron_templates`."""
        caller = "LogitPrism.neuron_activations"
        cv = self._rec.cache.for_call(caller)
        layer = check.layer(self.view, layer, caller)
        if self.view.attn_only:
            raise ArgumentError(f"{caller}: this model is attention-only; it has no neurons.")
        positions = resolve_positions(pos, cv.batch, cv.n_ctx, caller)
        if positions.every:
            raise PositionError(
                f"{caller}: pos='all' is not supported; pass an int or one int per batch row."
            )
        return cv.at(Site.MLP_POST, layer, positions.index.to(cv.device))[:, 0]

    # ------------------------------------------------------------------ by intervention
    @check.entry
    def verify(
        self,
        result: Decomposition,
        target: Any = None,
        *,
        k: int = 20,
        sample: int = 20,
        seed: int = 0,
    ) -> "Verification":
        """Check ``result``'s terms on the model itself: remove each term's write in a forward
        pass that holds fixed what the prism holds fixed, and compare the change of the
        explained value with minus the term.

        The ``k`` largest terms (by ``|value|``) and ``sample`` others drawn at random
        (``seed``) are checked, every target of a term's position at once; all interventions
        run batched, a few forward passes in all. Constants (biases) are not intervened on;
        the result's sum check covers them. Works on any result of this prism (residual,
        heads, neurons, full, decompose, chains, readouts, and their selections/aggregates).

        Args:
            result: what this prism returned.
            target: the target the result was made for; read back from the result's labels
                when None (tokens and logit differences). Pass it for a :class:`Direction`,
                and the readout vector for a :meth:`readout` result.

        Returns:
            A :class:`~tlprisms.Verification`: ``ok``, ``max_error``, ``to_frame()``, a
            one-line certificate as ``str()``; ``.check()`` raises
            :class:`~tlprisms.errors.VerificationError` unless ``ok``.

        >>> import tlprisms as tp
        >>> from tlprisms.demo import load_demo_model
        >>> prism = tp.LogitPrism.run(load_demo_model(), "The capital of France is")
        >>> print(prism.verify(prism.full(" Paris")))
        20 largest + 20 sampled terms verified by intervention, max error ... of a logit of 18.9
        """
        from tlprisms._causal.verify import verify

        if isinstance(result, Decomposition) and result.index is not None:
            result = result.to_dense()  # a sparse result: its kept terms, laid out densely
        rec = Recorded(self._rec.cache.for_call("LogitPrism.verify"), self.tokens, self.logits)
        return verify(rec, result, target, k, sample, seed)

    @check.entry
    def effects(
        self,
        target: Any,
        components: Sequence[Any],
        *,
        ablation: str = "zero",
        reference: Optional[Tensor] = None,
        pos: Any = -1,
        softcap: Softcap = "post",
        seed: int = 0,
    ) -> "Effects":
        """Each component's direct term next to its total effect when ablated with nothing
        frozen (so later layers, norms and patterns respond, and backups compensate).

        Args:
            target: as for :meth:`decompose` (one position per row).
            components: :class:`Component` records of kind ``"head"``, ``"attn"``,
                ``"neuron"`` or ``"mlp"``, e.g. ``[tp.Component("head", layer=9, head=6)]``.
            ablation: replace the component's output at every position by ``"zero"``, its
                ``"mean"`` over the ``reference`` rows (per position), or its value on a
                ``"resample"``-d reference row (drawn with ``seed``).
            reference: token ids ``[rows, pos]`` with as many positions as the input
                (default: this prism's own input).

        Returns:
            ``Effects``: ``direct``, ``total`` (the drop of the explained value when ablated),
            ``difference = total - direct``, ``to_frame()`` and a direct-vs-total scatter.

        >>> import tlprisms as tp
        >>> from tlprisms.demo import load_demo_model
        >>> prism = tp.LogitPrism.run(load_demo_model(), "The capital of France is")
        >>> e = prism.effects(" Paris", [tp.Component("head", layer=0, head=2)])
        >>> round(float(e.direct[0, 0, 0]), 1), round(float(e.total[0, 0, 0]), 1)
        (2.1, 1.3)
        """
        from tlprisms._causal.effects import effects

        rec = Recorded(self._rec.cache.for_call("LogitPrism.effects"), self.tokens, self.logits)
        return effects(
            rec, self.decompose, target, components, ablation, reference, pos, softcap, seed
        )

    def __repr__(self) -> str:
        v = self.view
        return (
            f"LogitPrism({type(self.model).__name__}, {v.n_layers} layers, batch {self.batch}"
            f" x {self.n_ctx} tokens)"
        )


def _hop(kind: str, layer: Any, index: Any, src: Any, caller: str) -> Hop:
    """A one-hop path, its indices checked with the words of ``caller``'s signature."""
    check.index(layer, "layer", caller)
    check.index(index, kind, caller)
    return Hop(kind, layer, index, src)
