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
from typing import Any, Optional, Union

import torch
from torch import Tensor

from tlprisms._causal.certificate import Verification
from tlprisms._causal.effects import Effects, effects
from tlprisms._causal.graph_verify import GraphVerification, verify_graph
from tlprisms._causal.verify import verify
from tlprisms._core import arguments as check
from tlprisms._core.graph import AttributionGraph
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
from tlprisms._core.terms import Terms, to_result
from tlprisms._prisms import chain, features, qk, qk_chain, read, writes
from tlprisms._prisms import graph as graph_prism
from tlprisms._prisms.read import ReadAt
from tlprisms._seam import CacheView, ModelView, needed_hooks

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
        logits, cache = view.record_cache(tokens, needed_hooks(model))
        return cls(model, cache, tokens=tokens, logits=logits)

    # ------------------------------------------------------------------ the shared steps
    def _recording(self, method: str) -> Recorded:
        """This prism's recording, seen by ``LogitPrism.<method>`` (its errors name it)."""
        return Recorded(
            self.recorded.cache.for_call(f"LogitPrism.{method}"), self.tokens, self.logits
        )

    def _call(self, request: Request, run: Callable[..., Terms], *args: Any) -> Decomposition:
        """Run a prism module on this prism's recording and finish its terms as a result."""
        with torch.no_grad():
            terms = run(self._recording(request.prism), request, *args)
        tokens = str_tokens(self.view, self.tokens)
        return to_result(terms, request, self.precision, self.view.n_layers, tokens)

    def _writes(self, request: Request, run: Callable = writes.run, *args: Any) -> Decomposition:
        """Check the split, sparse and soft-cap arguments; run ``run(rec, request, *args,
        split)`` (the writes prism by default)."""
        caller, r = f"LogitPrism.{request.prism}", request
        check.choice(r.softcap, "softcap", ("post", "pre"), caller)
        split = writes.split_of(self.view, r.heads, r.neurons, r.by_source, caller)
        top_k, min_abs = check_sparse_args(r.top_k, r.min_abs, caller)
        return self._call(r.with_(top_k=top_k, min_abs=min_abs), run, *args, split)

    def _chain(self, request: Request, path: Any) -> Decomposition:
        caller = f"LogitPrism.{request.prism}"
        check.choice(request.softcap, "softcap", ("post", "pre"), caller)
        hops = chain.check_path(path, caller, self.view)
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
            pos, heads, neurons, by_source, softcap: as the glossary of :mod:`tlprisms` says:
                the explained position (default -1, one per row, or ``"all"``); the attention
                / MLP layers split into heads (x sources) / neurons (default none); the
                ``"post"``-cap (default) or ``"pre"``-cap logit of a soft-capped model.
            top_k: keep per explained value only the ``top_k`` largest terms by ``|value|``,
                every constant, and one remainder (kind ``"rest"``) per (kind, layer), so
                totals stay exact (:mod:`tlprisms._core.sparse`). None (default): every term.
            min_abs: keep only terms with ``|value| >= min_abs`` (with ``top_k``: of those);
                the others go into the remainders. None (default): no threshold.
        """
        kw = dict(heads=heads, neurons=neurons, by_source=by_source, top_k=top_k, min_abs=min_abs)
        return self._writes(Request("decompose", target, pos, softcap, **kw))

    @check.entry
    def residual(self, target: Any, pos: Any = -1, *, softcap: Softcap = "post",
            top_k: Optional[int] = None,
            min_abs: Optional[float] = None) -> Decomposition:  # fmt: skip
        """One term per embedding, attention layer and MLP layer, plus the bias terms
        (``top_k``/``min_abs``: as for :meth:`decompose`)."""
        return self._writes(Request("residual", target, pos, softcap, top_k=top_k, min_abs=min_abs))

    @check.entry
    def heads(self, target: Any, pos: Any = -1, layers: LayerSelection = "all", *,
            by_source: bool = True, softcap: Softcap = "post", top_k: Optional[int] = None,
            min_abs: Optional[float] = None) -> Decomposition:  # fmt: skip
        """Attention layers (``layers``, default all) split into heads x source positions
        (``top_k``/``min_abs``: as for :meth:`decompose`)."""
        kw = dict(heads=layers, by_source=by_source, top_k=top_k, min_abs=min_abs)
        return self._writes(Request("heads", target, pos, softcap, **kw))

    @check.entry
    def neurons(self, target: Any, pos: Any = -1, layers: LayerSelection = "all", *,
            softcap: Softcap = "post", top_k: Optional[int] = None,
            min_abs: Optional[float] = None) -> Decomposition:  # fmt: skip
        """MLP layers (``layers``, default all) split into neurons (``top_k``/``min_abs``: as
        for :meth:`decompose`)."""
        kw = dict(neurons=layers, top_k=top_k, min_abs=min_abs)
        return self._writes(Request("neurons", target, pos, softcap, **kw))

    @check.entry
    def full(self, target: Any, pos: Any = -1, *, softcap: Softcap = "post",
            top_k: Optional[int] = None,
            min_abs: Optional[float] = None) -> Decomposition:  # fmt: skip
        """Every head x source and every neuron at once (``top_k``/``min_abs``: as for
        :meth:`decompose`; ``full(tp.NextToken(), pos="all", top_k=32)`` keeps long contexts
        small)."""
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

        ``dictionaries``: a :class:`~tlprisms.Dictionary` or a list of them (e.g. one
        transcoder per layer); ``path``: hops (:class:`Hop`) to follow back first, as in
        :meth:`chain`, whose last readout is then split into features; the other arguments
        as for :meth:`decompose`.

        Components: kind ``"feature"`` (``layer``, ``feature``), and per dictionary
        ``"b_dec"``, ``"error"`` (and ``"skip"`` for a transcoder's skip connection).

        >>> import tlprisms as tp
        >>> from tlprisms.demo import load_demo_model, load_demo_sae
        >>> prism = tp.LogitPrism.run(load_demo_model(), "The capital of France is")
        >>> r = prism.features(" Paris", load_demo_sae()).check()
        >>> r.top(1, kind="feature")["component"][0]
        'L1F...'
        """
        dicts = tuple(features.check_dictionaries(self.view, dictionaries, "LogitPrism.features"))
        kw = dict(heads=heads, neurons=neurons, by_source=by_source, top_k=top_k, min_abs=min_abs)
        request = Request("features", target, pos, softcap, dictionaries=dicts, **kw)
        return self._chain(request, path) if path else self._writes(request, features.run, dicts)

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
            q_heads, q_neurons, k_heads, k_neurons: the layers whose writes into the query
                (key) positions are split into heads / neurons (default: layer-level).
            softcap: the ``"post"``-cap score (ratio frozen, default) or the ``"pre"``-cap one.
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
        request, q_split, k_split = qk_chain.request_of(
            self.view, self.n_ctx, layer, head, pos, keys, contrast, sides, path, q_heads,
            q_neurons, k_heads, k_neurons, by_source, softcap, top_k, min_abs)  # fmt: skip
        if request.path:  # a chain through one side of the score
            split = q_split if sides == "query" else k_split
            return self._call(request, qk_chain.run, request.path, split)
        return self._call(request, qk.run, q_split, k_split)

    # ------------------------------------------------------------------ the circuit
    @check.entry
    def graph(self, target: Any = None, pos: int = -1, *, nodes: Any = "neurons",
            max_nodes: int = 500, node_threshold: float = 0.8, edge_threshold: float = 0.98,
            heads: bool = False, qk: int = 0, row: Optional[int] = None,
            softcap: Softcap = "post") -> AttributionGraph:  # fmt: skip
        """The exact attribution graph of ``target``'s logit at ``pos`` (batch ``row``): see
        :mod:`tlprisms._prisms.graph` and docs/graphs.md."""
        args = graph_prism.check_args(self.view, self.batch, pos, nodes, max_nodes, node_threshold,
            edge_threshold, heads, qk, row, "LogitPrism.graph")  # fmt: skip
        with torch.no_grad():
            return graph_prism.run(self._recording("graph"),
                Request("graph", target, pos, softcap), *args, self.qk)  # fmt: skip

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
        cv = self.recorded.cache.for_call("LogitPrism.neuron_activations")
        return writes.neuron_activations(cv, layer, pos)

    # ------------------------------------------------------------------ by intervention
    @check.entry
    def verify(self, result: Decomposition, target: Any = None, *, k: int = 20, sample: int = 20,
            seed: int = 0) -> Union[Verification, GraphVerification]:  # fmt: skip
        """Check ``result``'s terms on the model: remove each term's write in a forward pass
        that holds what the prism holds, and compare the change of the explained value (a QK
        result's score) with minus the term: the ``k`` largest, ``sample`` others (``seed``).
        Returns a :class:`~tlprisms.Verification`; for an :class:`AttributionGraph` (edges
        and influences) a :class:`GraphVerification`.

        >>> import tlprisms as tp
        >>> from tlprisms.demo import load_demo_model
        >>> prism = tp.LogitPrism.run(load_demo_model(), "The capital of France is")
        >>> print(prism.verify(prism.full(" Paris")))
        20 largest + 20 sampled terms verified by intervention and 1 constant term ... of 18.9
        """
        if isinstance(result, AttributionGraph):
            return verify_graph(self._recording("verify"), result, k, sample, seed)
        if isinstance(result, Decomposition) and result.index is not None:
            result = result.to_dense()  # a sparse result: its kept terms, laid out densely
        return verify(self._recording("verify"), result, target, k, sample, seed)

    @check.entry
    def effects(self, target: Any, components: Sequence[Any], *, ablation: str = "zero",
            reference: Optional[Tensor] = None, pos: Any = -1, softcap: Softcap = "post",
            seed: int = 0) -> Effects:  # fmt: skip
        """Each component's direct term next to its total effect when ablated with nothing
        frozen (so later layers, norms and patterns respond, and backups compensate).

        ``target`` as for :meth:`decompose`; ``components``: :class:`Component` records of
        kind ``"head"``, ``"attn"``, ``"neuron"`` or ``"mlp"``; ``ablation``: ``"zero"``, the
        ``"mean"`` over the ``reference`` token rows, or a ``"resample"``-d row (``seed``).
        Returns ``Effects``: ``direct``, ``total``, ``difference``, ``to_frame()``, a scatter.

        >>> import tlprisms as tp
        >>> from tlprisms.demo import load_demo_model
        >>> prism = tp.LogitPrism.run(load_demo_model(), "The capital of France is")
        >>> e = prism.effects(" Paris", [tp.Component("head", layer=0, head=2)])
        >>> round(float(e.direct[0, 0, 0]), 1), round(float(e.total[0, 0, 0]), 1)
        (2.1, 1.3)
        """
        rec = self._recording("effects")
        args = (target, components, ablation, reference, pos, softcap, seed)
        return effects(rec, self.decompose, *args)

    def __repr__(self) -> str:
        v = self.view
        return (
            f"LogitPrism({type(self.model).__name__}, {v.n_layers} layers, batch {self.batch}"
            f" x {self.n_ctx} tokens)"
        )
