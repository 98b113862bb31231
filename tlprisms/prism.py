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

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Optional, Union

import torch
from torch import Tensor

from tlprisms._core import arguments as check
from tlprisms._core.errors import ArgumentError, PositionError
from tlprisms._core.inputs import (
    check_logits,
    check_tokens,
    input_tokens,
    logits_precision,
    str_tokens,
)
from tlprisms._core.readout import Recorded, Softcap
from tlprisms._core.request import Request
from tlprisms._core.result import Decomposition
from tlprisms._core.sparse import check_sparse_args
from tlprisms._core.targets import resolve_positions
from tlprisms._core.terms import Terms, to_result
from tlprisms._prisms import chain, features, qk, qk_chain, read, writes
from tlprisms._prisms.read import ReadAt
from tlprisms._seam import CacheView, ModelView, Site, needed_hooks

if TYPE_CHECKING:  # the result types of verify/effects
    from tlprisms._causal.certificate import Verification
    from tlprisms._causal.effects import Effects

__all__ = ["LogitPrism", "LayerSelection"]

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
    def __init__(self, model: Any, cache: Any, *, tokens: Optional[Tensor] = None,
            logits: Optional[Tensor] = None) -> None:  # fmt: skip
        self.view = ModelView(model)
        self.model, self.cache = model, cache
        cv = CacheView(self.view, cache, "LogitPrism")
        self.batch, self.n_ctx = cv.batch, cv.n_ctx
        self.device, self.dtype = cv.device, cv.dtype
        self.tokens = None if tokens is None else check_tokens(tokens, cv)
        cv.verify(self.tokens)
        self.logits = None if logits is None else check_logits(logits, cv)
        #: the recorded forward pass every prism reads (cache view, tokens, logits)
        self.recorded = Recorded(cv, self.tokens, self.logits)
        #: the dtype the model computed in (sets the default tolerance of ``check()``)
        self.precision = cv.precision()
        if self.logits is not None:  # the logits must be this cache's
            self.precision = logits_precision(self.recorded, self.precision)

    @classmethod
    def trusted(cls, view: ModelView, cache: Any, logits: Tensor, caller: str) -> "LogitPrism":
        """A prism over a cache and logits that the caller has itself just recorded with
        ``view.run_with_cache`` (``explain_task`` does, batch after batch). That the cache
        comes from this model and that the logits belong to it holds by construction, so
        those checks are skipped; terms are still refused when they are not finite or do not
        add up. Never for a cache or logits from outside."""
        self = cls.__new__(cls)
        self.view, self.model, self.cache = view, view.model, cache
        cv = CacheView(view, cache, caller)
        self.batch, self.n_ctx = cv.batch, cv.n_ctx
        self.device, self.dtype = cv.device, cv.dtype
        self.tokens, self.logits = None, logits.detach()
        self.recorded = Recorded(cv, None, self.logits)
        self.precision = cv.precision()
        return self

    @classmethod
    @check.entry
    def run(cls, model: Any, input: Union[str, list, Tensor], *,
            prepend_bos: Optional[bool] = None) -> "LogitPrism":  # fmt: skip
        """Run ``model.run_with_cache`` on ``input`` (text, a list of texts, or tokens) and
        wrap the result.

        Records only the hooks the prisms need (``needed_hooks(model)``), and keeps the
        tokens and the model's logits so that results are checked against the model's own
        output.
        """
        view = ModelView(model)
        tokens = input_tokens(view, input, prepend_bos, "LogitPrism.run")
        logits, cache = view.run_with_cache(tokens, needed_hooks(model))
        return cls(model, cache, tokens=tokens, logits=logits)

    # ------------------------------------------------------------------ the shared steps
    def _call(self, request: Request, run: Callable[..., Terms], *args: Any) -> Decomposition:
        """Run a prism module on this prism's recording and finish its terms as a result."""
        rec = Recorded(
            self.recorded.cache.for_call(f"LogitPrism.{request.prism}"), self.tokens, self.logits
        )
        with torch.no_grad():
            terms = run(rec, request, *args)
        tokens = str_tokens(self.view, self.tokens)
        return to_result(terms, request, self.precision, self.view.n_layers, tokens)

    def _writes(self, request: Request) -> Decomposition:
        caller = f"LogitPrism.{request.prism}"
        split = writes.split_of(
            self.view, request.heads, request.neurons, request.by_source, caller
        )
        top_k, min_abs = check_sparse_args(request.top_k, request.min_abs, caller)
        return self._call(request.with_(top_k=top_k, min_abs=min_abs), writes.run, split)

    def _chain(self, request: Request, path: Any) -> Decomposition:
        caller = f"LogitPrism.{request.prism}"
        hops = chain.check_path(path, caller)
        split = writes.split_of(
            self.view, request.heads, request.neurons, request.by_source, caller
        )
        top_k, min_abs = check_sparse_args(request.top_k, request.min_abs, caller)
        request = request.with_(path=tuple(hops), top_k=top_k, min_abs=min_abs)
        if request.dictionaries:
            return self._call(request, features.run, request.dictionaries, split, hops)
        return self._call(request, chain.run, hops, split)

    # ------------------------------------------------------------------ the writes prism
    @check.entry
    def decompose(self, target: Any, pos: Any = -1, *, heads: LayerSelection = (),
            neurons: LayerSelection = (), by_source: bool = True, softcap: Softcap = "post",
            top_k: Optional[int] = None,
            min_abs: Optional[float] = None) -> Decomposition:  # fmt: skip
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
        check.choice(softcap, "softcap", ("post", "pre"), "LogitPrism.decompose")
        kw = dict(heads=heads, neurons=neurons, by_source=by_source, top_k=top_k, min_abs=min_abs)
        return self._writes(Request("decompose", target, pos, softcap, **kw))

    @check.entry
    def residual(self, target: Any, pos: Any = -1, *, softcap: Softcap = "post",
            top_k: Optional[int] = None,
            min_abs: Optional[float] = None) -> Decomposition:  # fmt: skip
        """One term per embedding, attention layer and MLP layer, plus the bias terms
        (``top_k``/``min_abs``: as for :meth:`decompose`)."""
        check.choice(softcap, "softcap", ("post", "pre"), "LogitPrism.residual")
        return self._writes(Request("residual", target, pos, softcap, top_k=top_k, min_abs=min_abs))

    @check.entry
    def heads(self, target: Any, pos: Any = -1, layers: LayerSelection = "all", *,
            by_source: bool = True, softcap: Softcap = "post", top_k: Optional[int] = None,
            min_abs: Optional[float] = None) -> Decomposition:  # fmt: skip
        """Attention layers (``layers``, default all) split into heads x source positions
        (``top_k``/``min_abs``: as for :meth:`decompose`)."""
        check.choice(softcap, "softcap", ("post", "pre"), "LogitPrism.heads")
        kw = dict(heads=layers, by_source=by_source, top_k=top_k, min_abs=min_abs)
        return self._writes(Request("heads", target, pos, softcap, **kw))

    @check.entry
    def neurons(self, target: Any, pos: Any = -1, layers: LayerSelection = "all", *,
            softcap: Softcap = "post", top_k: Optional[int] = None,
            min_abs: Optional[float] = None) -> Decomposition:  # fmt: skip
        """MLP layers (``layers``, default all) split into neurons (``top_k``/``min_abs``: as
        for :meth:`decompose`)."""
        check.choice(softcap, "softcap", ("post", "pre"), "LogitPrism.neurons")
        kw = dict(neurons=layers, top_k=top_k, min_abs=min_abs)
        return self._writes(Request("neurons", target, pos, softcap, **kw))

    @check.entry
    def full(self, target: Any, pos: Any = -1, *, softcap: Softcap = "post",
            top_k: Optional[int] = None,
            min_abs: Optional[float] = None) -> Decomposition:  # fmt: skip
        """Every head x source and every neuron at once (``top_k``/``min_abs``: as for
        :meth:`decompose`; ``full(tp.NextToken(), pos="all", top_k=32)`` keeps long contexts
        small)."""
        check.choice(softcap, "softcap", ("post", "pre"), "LogitPrism.full")
        kw = dict(heads="all", neurons="all", top_k=top_k, min_abs=min_abs)
        return self._writes(Request("full", target, pos, softcap, **kw))

    # ------------------------------------------------------------------ dictionary features
    @check.entry
    def features(self, target: Any, dictionaries: Any, pos: Any = -1, *, path: Sequence[Any] = (),
            heads: LayerSelection = (), neurons: LayerSelection = (), by_source: bool = True,
            softcap: Softcap = "post", top_k: Optional[int] = None,
            min_abs: Optional[float] = None) -> Decomposition:  # fmt: skip
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
        caller = "LogitPrism.features"
        dicts = tuple(features.check_dictionaries(self.view, dictionaries, caller))
        top_k, min_abs = check_sparse_args(top_k, min_abs, caller)
        check.choice(softcap, "softcap", ("post", "pre"), caller)
        kw = dict(heads=heads, neurons=neurons, by_source=by_source, dictionaries=dicts)
        request = Request("features", target, pos, softcap, top_k=top_k, min_abs=min_abs, **kw)
        if path:
            return self._chain(request, path)
        split = writes.split_of(self.view, heads, neurons, by_source, caller)
        return self._call(request, features.run, dicts, split)

    # ------------------------------------------------------------------ chained prisms
    @check.entry
    def chain(self, target: Any, path: Sequence[Any], pos: Any = -1, *, heads: LayerSelection = (),
            neurons: LayerSelection = (), by_source: bool = True, softcap: Softcap = "post",
            top_k: Optional[int] = None,
            min_abs: Optional[float] = None) -> Decomposition:  # fmt: skip
        """Follow a path of hops (:class:`Hop`) back from the logit and split the last one.

        ``path=[Hop("head", 5, 1, src=3), Hop("neuron", 2, 40)]`` explains neuron L2N40's
        contribution, at position 3, to head L5H1's term. Each hop's result sums exactly to
        the term it splits; components carry ``at``, the residual position they wrote at.
        ``heads``/``neurons``/``by_source`` choose how the last hop's writers are split;
        ``top_k``/``min_abs`` keep the largest terms and a remainder per (kind, layer), as
        for :meth:`decompose`.
        """
        check.choice(softcap, "softcap", ("post", "pre"), "LogitPrism.chain")
        kw = dict(heads=heads, neurons=neurons, by_source=by_source, top_k=top_k, min_abs=min_abs)
        return self._chain(Request("chain", target, pos, softcap, **kw), path)

    @check.entry
    def through_head(self, layer: int, head: int, target: Any, pos: Any = -1, *,
            src: Optional[int] = None, heads: LayerSelection = (), neurons: LayerSelection = (),
            by_source: bool = True, softcap: Softcap = "post", top_k: Optional[int] = None,
            min_abs: Optional[float] = None) -> Decomposition:  # fmt: skip
        """Split head ``(layer, head)``'s term by source position and by what wrote into the
        residual stream there (embed, pos_embed, earlier attention/MLP layers, or their heads
        and neurons when ``heads``/``neurons`` name layers). Totals the head's term in
        :meth:`heads`.
        """
        caller = "LogitPrism.through_head"
        check.choice(softcap, "softcap", ("post", "pre"), caller)
        hop = chain.one_hop("head", layer, head, src, caller)
        kw = dict(heads=heads, neurons=neurons, by_source=by_source, top_k=top_k, min_abs=min_abs)
        return self._chain(Request("through_head", target, pos, softcap, **kw), [hop])

    @check.entry
    def through_neuron(self, layer: int, neuron: int, target: Any, pos: Any = -1, *,
            heads: LayerSelection = (), neurons: LayerSelection = (), by_source: bool = True,
            softcap: Softcap = "post", top_k: Optional[int] = None,
            min_abs: Optional[float] = None) -> Decomposition:  # fmt: skip
        """Split neuron ``(layer, neuron)``'s term by what wrote into the residual stream it
        reads, with its activation gate held fixed. Totals the neuron's term in :meth:`neurons`."""
        caller = "LogitPrism.through_neuron"
        check.choice(softcap, "softcap", ("post", "pre"), caller)
        hop = chain.one_hop("neuron", layer, neuron, None, caller)
        kw = dict(heads=heads, neurons=neurons, by_source=by_source, top_k=top_k, min_abs=min_abs)
        return self._chain(Request("through_neuron", target, pos, softcap, **kw), [hop])

    # ------------------------------------------------------------------ attention scores
    @check.entry
    def qk(self, layer: int, head: int, pos: int = -1, keys: Any = None, *, contrast: bool = False,
            sides: str = "both", path: Optional[Sequence[Any]] = None, q_heads: LayerSelection = (),
            q_neurons: LayerSelection = (), k_heads: LayerSelection = (),
            k_neurons: LayerSelection = (), by_source: bool = True, softcap: Softcap = "post",
            top_k: Optional[int] = None,
            min_abs: Optional[float] = None) -> Decomposition:  # fmt: skip
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
        caller = "LogitPrism.qk"
        layer, head = check.layer(self.view, layer, caller), check.head(self.view, head, caller)
        check.choice(softcap, "softcap", ("post", "pre"), caller)
        qk.check_sides(sides, q_heads, q_neurons, k_heads, k_neurons, caller)
        i, key_list = qk.resolve_keys(pos, keys, contrast, self.n_ctx, caller)
        q_split = writes.split_of(self.view, q_heads, q_neurons, by_source, caller)
        k_split = writes.split_of(self.view, k_heads, k_neurons, by_source, caller)
        if path is not None:  # a chain through one side of the score
            hops = qk_chain.resolve_path(path, sides, caller)
        top_k, min_abs = check_sparse_args(top_k, min_abs, caller)
        kw = dict(heads=q_heads, neurons=q_neurons, k_heads=k_heads, k_neurons=k_neurons)
        request = Request(
            "qk",
            None,
            i,
            softcap,
            by_source=by_source,
            layer=layer,
            head=head,
            keys=tuple(key_list),
            contrast=contrast,
            sides=sides,
            top_k=top_k,
            min_abs=min_abs,
            **kw,
        )
        if path is not None:
            split = q_split if sides == "query" else k_split
            return self._call(request.with_(path=tuple(hops)), qk_chain.run, hops, split)
        return self._call(request, qk.run, q_split, k_split)

    # ------------------------------------------------------------------ any readout
    @check.entry
    def readout(self, vector: Tensor, layer: int, pos: Any = -1, *, at: ReadAt = "ln1",
            bias: Any = None, heads: LayerSelection = (), neurons: LayerSelection = (),
            by_source: bool = True, top_k: Optional[int] = None,
            min_abs: Optional[float] = None) -> Decomposition:  # fmt: skip
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
        split = writes.split_of(self.view, heads, neurons, by_source, caller)
        top_k, min_abs = check_sparse_args(top_k, min_abs, caller)
        kw = dict(heads=heads, neurons=neurons, by_source=by_source, top_k=top_k, min_abs=min_abs)
        request = Request(
            "readout", None, pos, vector=vector, layer=layer, stream=at, bias=bias, **kw
        )
        return self._call(request, read.run, split)

    @check.entry
    def neuron_activations(self, layer: int, pos: Any = -1) -> Tensor:
        """The cached activations of layer ``layer``'s neurons at the explained position
        ``pos`` (an int or one int per batch row): ``[batch, d_mlp]`` (gated MLPs:
        ``act(gate) * up``), e.g. for :func:`tlprisms.weights.neuron_templates`."""
        caller = "LogitPrism.neuron_activations"
        cv = self.recorded.cache.for_call(caller)
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
    def verify(self, result: Decomposition, target: Any = None, *, k: int = 20, sample: int = 20,
            seed: int = 0) -> "Verification":  # fmt: skip
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
        rec = Recorded(self.recorded.cache.for_call("LogitPrism.verify"), self.tokens, self.logits)
        return verify(rec, result, target, k, sample, seed)

    @check.entry
    def effects(self, target: Any, components: Sequence[Any], *, ablation: str = "zero",
            reference: Optional[Tensor] = None, pos: Any = -1, softcap: Softcap = "post",
            seed: int = 0) -> "Effects":  # fmt: skip
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

        rec = Recorded(self.recorded.cache.for_call("LogitPrism.effects"), self.tokens, self.logits)
        return effects(
            rec, self.decompose, target, components, ablation, reference, pos, softcap, seed
        )

    def __repr__(self) -> str:
        v = self.view
        return (
            f"LogitPrism({type(self.model).__name__}, {v.n_layers} layers, batch {self.batch}"
            f" x {self.n_ctx} tokens)"
        )
