"""``LogitPrism``: exact decompositions of a logit over a TransformerLens cache.

The final norm is frozen at its cached scale ``s = ln_final.hook_scale[b, i]``, so the logit
of target ``t`` at position ``i`` is linear in the final residual stream ``x``:

    logit_t = x . r_t + c_t,   r_t = P(w * W_U[:, t]) / s,   c_t = b . W_U[:, t] + b_U[t]

(``P`` subtracts the mean for LayerNorm-type norms; ``w``/``b`` are the final norm's weight and
bias, absent when folded). The residual, attention and MLP prisms split ``x . r_t`` by every
write into ``x`` (see :mod:`tlprisms._engine`); ``c_t`` appears as the constant components
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

from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from tlprisms._engine import Readout, split_writes
from tlprisms._errors import CacheError, CompletenessError, PrismError
from tlprisms._readout import explained, final_readout
from tlprisms._result import ComponentTable, Decomposition
from tlprisms._seam import ModelView, cache_get, needed_hooks

__all__ = ["LogitPrism"]

#: internal consistency tolerance (relative to the sum of |terms|) before a result is refused
_STRUCTURAL_RTOL = {torch.float32: 1e-4, torch.float64: 1e-6}  # models may norm in float32
_STRUCTURAL_RTOL_LOWP = 3e-2

LayerSel = Union[None, int, Sequence[int]]


class LogitPrism:
    """Exact decompositions of a model's logits, with the cache's non-linear values frozen.

    Args:
        model: a ``HookedTransformer``, or a ``TransformerBridge`` after
            ``enable_compatibility_mode()``.
        cache: the ``ActivationCache`` (or a dict of hook name -> tensor) that
            ``model.run_with_cache(tokens)`` returned.
        tokens: the input tokens ``[batch, pos]`` (optional): enables :class:`NextToken`
            targets, token labels, and a check that the cache belongs to these tokens.
        logits: the logits ``run_with_cache`` returned (optional): results then explain
            the model's own output and :meth:`Decomposition.check` compares against it.

    Nothing is copied from or written to the model or the cache.
    """

    def __init__(self, model: Any, cache: Any, *, tokens: Optional[Tensor] = None,
                 logits: Optional[Tensor] = None) -> None:
        self.view = ModelView(model)
        self.model = model
        self.cache = cache
        embed = cache_get(cache, "hook_embed", "LogitPrism")
        if embed.ndim != 3 or embed.shape[-1] != self.view.d_model:
            raise CacheError(
                f"LogitPrism: the cache's hook_embed has shape {tuple(embed.shape)} but this model "
                f"has d_model={self.view.d_model}; the cache comes from another model. Re-run "
                "model.run_with_cache(tokens) with this model."
            )
        self.batch, self.n_ctx = int(embed.shape[0]), int(embed.shape[1])
        self.device = embed.device
        self.dtype = torch.float64 if embed.dtype == torch.float64 else torch.float32
        self._low_precision = embed.dtype in (torch.float16, torch.bfloat16)
        if f"blocks.{self.view.n_layers}.hook_resid_pre" in cache:
            raise CacheError(
                f"LogitPrism: the cache has more than {self.view.n_layers} layers; it comes from "
                "another model. Re-run model.run_with_cache(tokens) with this model."
            )
        self.tokens = None
        if tokens is not None:
            tokens = torch.as_tensor(tokens)
            if tokens.ndim == 1:
                tokens = tokens[None]
            if tuple(tokens.shape) != (self.batch, self.n_ctx):
                raise CacheError(
                    f"LogitPrism: tokens has shape {tuple(tokens.shape)} but the cache was "
                    f"recorded for inputs of shape ({self.batch}, {self.n_ctx}); pass the tokens "
                    "the cache was recorded with."
                )
            self.tokens = tokens.to(self.device)
        self.logits = None
        if logits is not None:
            if tuple(logits.shape[:2]) != (self.batch, self.n_ctx) or logits.shape[-1] != self.view.d_vocab:
                raise CacheError(
                    f"LogitPrism: logits has shape {tuple(logits.shape)}, expected "
                    f"({self.batch}, {self.n_ctx}, {self.view.d_vocab}) for this cache and model."
                )
            self.logits = logits.detach()
        self._check_same_model()

    # ------------------------------------------------------------------ constructors
    @classmethod
    def run(cls, model: Any, input: Union[str, list, Tensor], *, prepend_bos: Optional[bool] = None
            ) -> "LogitPrism":
        """Run ``model.run_with_cache`` on ``input`` (text or tokens) and wrap the result.

        Records only the hooks the prisms need, and keeps the tokens and the model's logits
        so that results are checked against the model's own output.
        """
        if isinstance(input, (str, list)):
            kw = {} if prepend_bos is None else {"prepend_bos": prepend_bos}
            tokens = model.to_tokens(input, **kw)
        else:
            tokens = torch.as_tensor(input)
            if tokens.ndim == 1:
                tokens = tokens[None]
        with torch.no_grad():
            logits, cache = model.run_with_cache(tokens, names_filter=needed_hooks(model))
        return cls(model, cache, tokens=tokens, logits=logits)

    # ------------------------------------------------------------------ checks
    def _check_same_model(self) -> None:
        """Recompute layer 0's values from the cache with this model's weights."""
        view, cache = self.view, self.cache
        names = ["blocks.0.hook_resid_pre", "blocks.0.attn.hook_v"]
        if view.ln1[0].has_scale:
            names.append(view.ln1[0].scale_hook)
        if not all(n in cache for n in names):
            return
        v = cache["blocks.0.attn.hook_v"]
        if v.ndim != 4 or v.shape[2] != view.n_kv_heads or v.shape[3] != view.d_head:
            raise CacheError(
                f"LogitPrism: blocks.0.attn.hook_v has shape {tuple(v.shape)}, but this model has "
                f"{view.n_kv_heads} key/value heads of size {view.d_head}; the cache comes from "
                "another model. Re-run model.run_with_cache(tokens) with this model."
            )
        norm = view.ln1[0]
        x = norm.apply(cache["blocks.0.hook_resid_pre"].to(self.dtype),
                       cache[norm.scale_hook] if norm.has_scale else None)
        W_V = view.W_V(0, self.dtype).to(self.device)
        v_hat = torch.einsum("bpm,gmd->bpgd", x, W_V) + view.b_V(0, self.dtype, self.device)
        err = float((v_hat - v.to(self.dtype)).abs().max())
        ref = float(v.abs().max()) + 1e-6
        tol = 5e-2 if self._low_precision else 1e-3
        if err > tol * ref:
            raise CacheError(
                "LogitPrism: the cache does not come from this model: its layer-0 values "
                f"(blocks.0.attn.hook_v) differ from ln1(resid_pre) @ W_V + b_V by {err:.3g} "
                f"(|v| up to {ref:.3g}). Re-run model.run_with_cache(tokens) with this model, "
                "and do not change its weights in between."
            )
        if self.tokens is not None:
            W_E = view.embed_matrix()
            emb = W_E[self.tokens.to(W_E.device)].to(self.dtype) * view.embedding_scale()
            got = cache["hook_embed"].to(self.dtype).to(emb.device)
            e_err = float((emb - got).abs().max())
            if e_err > tol * (float(got.abs().max()) + 1e-6):
                raise CacheError(
                    "LogitPrism: the cache was not recorded from these tokens (hook_embed differs "
                    f"from W_E[tokens] by {e_err:.3g}); pass the tokens the cache was recorded with."
                )

    # ------------------------------------------------------------------ readout
    def final_readout(self, target: Any, pos: Any, caller: str) -> tuple[Readout, dict]:
        """The frozen final readout for ``target`` at ``pos`` (see :mod:`tlprisms._readout`)."""
        return final_readout(self, target, pos, caller)

    def _explained(self, readout: Readout, info: dict, softcap: str, caller: str
                   ) -> tuple[Tensor, Tensor, str]:
        return explained(self, readout, info, softcap, caller)


    # ------------------------------------------------------------------ main entry
    def _layers(self, layers: LayerSel, caller: str) -> frozenset:
        L = self.view.n_layers
        if layers is None:
            return frozenset(range(L))
        if isinstance(layers, (int, np.integer)):
            layers = [int(layers)]
        out = set()
        for layer in layers:
            if not -L <= int(layer) < L:
                raise PrismError(f"{caller}: layer {layer} is out of range; the model has "
                                 f"{L} layers (0..{L - 1}).")
            out.add(int(layer) % L)
        return frozenset(out)

    def decompose(self, target: Any, pos: Any = -1, *, heads: LayerSel = (),
                  neurons: LayerSel = (), by_source: bool = True, softcap: str = "post",
                  name: Optional[str] = None) -> Decomposition:
        """The general prism: split the chosen attention layers into heads (x sources) and
        the chosen MLP layers into neurons; every other write stays one term.

        Args:
            target: a token id, a single-token string, :class:`LogitDiff`, :class:`Direction`,
                a list of these (shared by the batch), :class:`PerRow`, an integer tensor
                ``[batch]``/``[batch, k]`` (per row), or with ``pos="all"`` a tensor
                ``[batch, pos]`` or :class:`NextToken`.
            pos: an index (default -1), one index per batch row, or ``"all"``.
            heads: layers to split into heads (``None`` = all).
            neurons: layers to split into neurons (``None`` = all).
            by_source: split heads by source position too.
            softcap: for soft-capped models, explain the ``"post"``-cap logit (default) or the
                ``"pre"``-cap logit.
        """
        caller = name or "LogitPrism.decompose"
        head_layers = self._layers(heads, caller)
        neuron_layers = frozenset() if self.view.attn_only else self._layers(neurons, caller)
        with torch.no_grad():
            readout, info = self.final_readout(target, pos, caller)
            extra = []
            if info["has_b_U"]:
                extra.append((info["bias"], ComponentTable.block("b_U")))
            if info["has_norm_bias"]:
                extra.append((info["norm_bias"], ComponentTable.block("ln_final.b")))
            values, table, layer_gap = split_writes(
                self.view, self.cache, readout, heads=head_layers, neurons=neuron_layers,
                by_source=by_source, caller=caller, extra=extra)
            B, P = readout.positions.shape
            weights, explained, explains = self._explained(readout, info, softcap, caller)
            k, a = weights.shape[2], weights.shape[3]
            if a == 1 and bool((weights == 1).all()):
                values = values.reshape(B, P, k, -1)
            else:
                values = torch.einsum("bpkac,bpka->bpkc", values.reshape(B, P, k, a, -1), weights)
            self._validate(values, explained, layer_gap, caller)
        atoms = info["atoms"]
        labels = np.broadcast_to(atoms.labels, (B, P if atoms.labels.shape[1] != 1 else 1, k))
        return Decomposition(
            values=values, components=table, logits=explained, positions=readout.positions,
            target_labels=np.array(labels), explains=explains, prism=name_of(caller),
            str_tokens=self._str_tokens())

    def _validate(self, values: Tensor, explained: Tensor, layer_gap: Tensor, caller: str) -> None:
        """Refuse a result whose parts do not add up (a structural problem, not rounding)."""
        rtol = _STRUCTURAL_RTOL_LOWP if self._low_precision else _STRUCTURAL_RTOL[self.dtype]
        scale = torch.linalg.vector_norm(values, 1, -1) + explained.abs() + 1.0
        gap = (values.sum(-1) - explained).abs()
        if bool((gap > rtol * scale).any()) or bool((layer_gap.abs().amax(-1) > rtol * scale.amax(-1)).any()):
            raise CompletenessError(
                f"{caller}: the terms do not add up to what they explain (gap up to "
                f"{float(gap.max()):.3g}; split-layer gap up to {float(layer_gap.abs().max()):.3g})."
                " The cache was probably edited by hooks, recorded from another model or input, "
                "or this architecture writes to the residual stream in a way tlprisms does not "
                "know. Nothing was returned; please report the model config."
            )

    def _str_tokens(self) -> Optional[list]:
        tok = self.view.tokenizer()
        if self.tokens is None or tok is None:
            return None
        return [[tok.decode([int(t)]) for t in row] for row in self.tokens.cpu()]

    # ------------------------------------------------------------------ presets
    def residual(self, target: Any, pos: Any = -1, *, softcap: str = "post") -> Decomposition:
        """One term per embedding, attention layer and MLP layer, plus the bias terms."""
        return self.decompose(target, pos, heads=(), neurons=(), softcap=softcap,
                              name="LogitPrism.residual")

    def heads(self, target: Any, pos: Any = -1, layers: LayerSel = None, *,
              by_source: bool = True, softcap: str = "post") -> Decomposition:
        """Attention layers (all, or ``layers``) split into heads x source positions."""
        return self.decompose(target, pos, heads=layers, neurons=(), by_source=by_source,
                              softcap=softcap, name="LogitPrism.heads")

    def neurons(self, target: Any, pos: Any = -1, layers: LayerSel = None, *,
                softcap: str = "post") -> Decomposition:
        """MLP layers (all, or ``layers``) split into neurons."""
        return self.decompose(target, pos, heads=(), neurons=layers, softcap=softcap,
                              name="LogitPrism.neurons")

    def full(self, target: Any, pos: Any = -1, *, softcap: str = "post") -> Decomposition:
        """Every head x source and every neuron at once."""
        return self.decompose(target, pos, heads=None, neurons=None, softcap=softcap,
                              name="LogitPrism.full")

    # ------------------------------------------------------------------ chained prisms
    def chain(self, target: Any, path: Sequence[Any], pos: Any = -1, *, heads: LayerSel = (),
              neurons: LayerSel = (), by_source: bool = False, softcap: str = "post"
              ) -> Decomposition:
        """Follow a path of hops (:class:`Hop`) back from the logit and split the last one.

        ``path=[Hop("head", 5, 1, src=3), Hop("neuron", 2, 40)]`` explains neuron L2N40's
        contribution, at position 3, to head L5H1's term. Each hop's result sums exactly to
        the term it splits; components carry ``pos``, the residual position they wrote at.
        ``heads``/``neurons``/``by_source`` choose how the last hop's sources are split.
        """
        from tlprisms._chain import Hop, run_chain

        hops = [h if isinstance(h, Hop) else Hop(*h) for h in path]
        caller = "LogitPrism.chain"
        return run_chain(self, target, pos, hops, heads=self._layers(heads, caller),
                         neurons=self._neuron_layers(neurons, caller), by_source=by_source,
                         softcap=softcap, caller=caller)

    def through_head(self, layer: int, head: int, target: Any, pos: Any = -1, *,
                     src: Optional[int] = None, heads: LayerSel = (), neurons: LayerSel = (),
                     by_source: bool = False, softcap: str = "post") -> Decomposition:
        """Split head ``(layer, head)``'s term by source position and by what wrote into the
        residual stream there (embed, pos_embed, earlier attention/MLP layers, or their heads
        and neurons when ``heads``/``neurons`` name layers). Totals the head's term in
        :meth:`heads`.
        """
        from tlprisms._chain import Hop

        return self.chain(target, [Hop("head", layer, head, src)], pos, heads=heads,
                          neurons=neurons, by_source=by_source, softcap=softcap)

    def through_neuron(self, layer: int, neuron: int, target: Any, pos: Any = -1, *,
                       heads: LayerSel = (), neurons: LayerSel = (), by_source: bool = False,
                       softcap: str = "post") -> Decomposition:
        """Split neuron ``(layer, neuron)``'s term by what wrote into the residual stream it
        reads, with its activation gate held fixed. Totals the neuron's term in :meth:`neurons`."""
        from tlprisms._chain import Hop

        return self.chain(target, [Hop("neuron", layer, neuron)], pos, heads=heads,
                          neurons=neurons, by_source=by_source, softcap=softcap)

    def readout(self, vector: Tensor, layer: int, pos: Any = -1, *, at: str = "ln1",
                bias: Any = None, heads: LayerSel = (), neurons: LayerSel = (),
                by_source: bool = False) -> Decomposition:
        """Decompose any linear read ``norm(x) . vector + bias`` of the residual stream.

        Args:
            vector: ``[d_model]`` or ``[k, d_model]`` (a probe direction, an SAE encoder row,
                ``W_in[:, n]`` for a neuron's pre-activation, a column of ``W_V``...).
            layer: the block whose stream is read.
            at: ``"ln1"`` / ``"ln2"`` / ``"ln_final"`` to read through that norm (frozen at
                its cached scale), or ``"resid_pre"`` / ``"resid_mid"`` / ``"resid_post"`` to
                read the raw stream.
            bias: a constant added to the read (e.g. ``b_in[n]``).
        """
        from tlprisms._chain import run_readout

        caller = "LogitPrism.readout"
        with torch.no_grad():
            return run_readout(self, vector, layer, pos, at, bias,
                               heads=self._layers(heads, caller),
                               neurons=self._neuron_layers(neurons, caller), by_source=by_source,
                               caller=caller)

    def _neuron_layers(self, layers: LayerSel, caller: str) -> frozenset:
        return frozenset() if self.view.attn_only else self._layers(layers, caller)

    def __repr__(self) -> str:
        v = self.view
        return (f"LogitPrism({type(self.model).__name__}, {v.n_layers} layers, batch {self.batch}"
                f" x {self.n_ctx} tokens)")


def name_of(caller: str) -> str:
    return caller.split(".")[-1] if caller.startswith("LogitPrism.") else caller
