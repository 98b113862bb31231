"""``explain_task``'s per-batch decomposition, with the model-level facts read once per task.

``explain_task`` decomposes, batch after batch, each prompt's answer logit at its own last
token, every split attention layer's heads summed over sources. The general pipeline
(:meth:`LogitPrism.decompose`) resolves and labels the targets and positions, builds and
type-checks a ``FinalReadout``, ``Explained``, ``Writes`` and ``Decomposition``, plans the
writes and builds their component table, and reads every weight again, on every call: for a
small model that is as much Python per batch as the forward pass itself.

:class:`TaskKernel` does the same tensor operations in the same order, on the same inputs, so
its values are those of ``decompose`` bit for bit, with what does not change between batches
read once per task: the plan of writes (and its component table, taken from the task's first
``decompose`` result), the per-layer output weights and biases, the norms. It covers what a
streamed task mostly is: token-id answers, explained at one position per prompt, on caches of
float32, bfloat16 or float16. ``explain_task`` falls back to ``decompose`` for other answers
(``LogitDiff``, ``Direction``) and float64 caches, runs both on the task's first batch and
uses the kernel only when they agree bit for bit (``meta["kernel"]`` says which ran).
"""

from typing import Any, Optional

import torch
from torch import Tensor

from tlprisms._core.engine import (
    Readout,
    Split,
    head_block,
    layer_device,
    neuron_block,
    whole_write,
    write_plan,
)
from tlprisms._core.ops import dot
from tlprisms._core.readout import Recorded, softcap_ratio, weigh
from tlprisms._core.table import ComponentTable
from tlprisms._seam import CacheView, ModelView, Site

__all__ = ["TaskKernel"]


class TaskKernel:
    """The decomposition of one batch's answer logits, as ``decompose(PerRow(ids), pos,
    heads=..., neurons=..., by_source=False, softcap=...)`` computes it.

    Args:
        view: the model's :class:`ModelView` (read once per task).
        cv: the first batch's :class:`CacheView`: the dtype and device every later batch
            must have for the kernel to apply (:meth:`fits`).
        split: the layers split into heads (summed over sources) and neurons.
        softcap: ``"post"`` or ``"pre"`` (soft-capped models only).
        table: the component table of the first batch's ``decompose`` result.
    """

    def __init__(
        self, view: ModelView, cv: CacheView, split: Split, softcap: str, table: ComponentTable
    ) -> None:
        if split.by_source:
            raise ValueError("TaskKernel: heads are summed over sources in a task")
        self.view, self.split, self.softcap, self.table = view, split, softcap, table
        self.dtype, self.device = cv.dtype, cv.device
        n = view.n_layers
        shape = Readout(
            u=torch.zeros(1, 1, 1, view.d_model),
            inv_s=torch.ones(1, 1),
            positions=torch.zeros(1, 1, dtype=torch.long),
            attn_layers=n,
            mlp_layers=n,
        )
        plan = write_plan(cv, shape, split)
        self.plan = [(len(tab), what) for tab, what in plan]
        self.extra = int(view.has_b_U) + int(view.final_norm.bias is not None)
        if sum(size for size, _ in self.plan) + self.extra != len(table):
            raise ValueError("TaskKernel: the planned writes do not match the table")
        self.has_b_U = view.has_b_U
        #: (kind, layer) -> (post-norm, bias, residual scale, W_O or W_out) in dtype; the
        #: weight where the layer's activations live (a split model: the layer's device)
        self.layers: dict = {}
        for _, what in self.plan:
            if len(what) == 3 and (what[0], what[1]) not in self.layers:
                kind, layer = what[0], what[1]
                post = view.ln1_post[layer] if kind == "attn" else view.ln2_post[layer]
                bias = (view.b_O if kind == "attn" else view.b_out)(layer, self.dtype, self.device)
                weight = (view.W_O if kind == "attn" else view.W_out)(layer, self.dtype)
                split_layer = layer in (split.heads if kind == "attn" else split.neurons)
                at = layer_device(cv, kind, layer) if split_layer else self.device
                weight = weight.to(at)
                self.layers[(kind, layer)] = (post, bias, view.residual_scale(layer), weight)
        #: whether hook_embed (+ hook_pos_embed) starts the residual stream: the model's
        #: property, read off the first batch's cache (``CacheView.embed_write``)
        cv.embed_write(torch.zeros(cv.batch, 1, dtype=torch.long, device=self.device), self.dtype)
        self.embed_is_hooked = cv.embed_is_hooked

    def fits(self, cv: CacheView) -> bool:
        """Whether a batch's cache has the dtype and device the kernel was set up for."""
        return cv.dtype == self.dtype and cv.device == self.device

    def __call__(
        self, rec: Recorded, targets: list, pos: list
    ) -> tuple[Tensor, Tensor, Tensor, str]:
        """``(values [B, 1, 1, C], explained [B, 1, 1], layer_gap [B, 1, 1], explains)`` of
        one batch: ``targets`` one token id per row, ``pos`` one position per row.

        ``layer_gap`` is zeros: whether a split layer's parts add up to its whole write is
        a property of the architecture, checked on the task's first batch by ``decompose``
        (every prompt's terms are still checked against its logit by ``_refuse_broken``).
        """
        cv = rec.cache
        cv.trust_finite()  # the caller refuses non-finite terms (and says which hook)
        if cv.embed_is_hooked is None:
            cv.embed_is_hooked = self.embed_is_hooked
        with torch.no_grad():
            return self._terms(rec, targets, pos)

    def _terms(self, rec: Recorded, targets: list, pos: list) -> tuple[Tensor, Tensor, Tensor, str]:
        cv, view = rec.cache, self.view
        dev, dtype = cv.device, cv.dtype
        B, P, k, a = len(pos), 1, 1, 1
        # ---- the final readout (final_readout: positions, token atoms, norm pulled back)
        index = torch.tensor(pos, dtype=torch.long)[:, None].to(dev)
        ids = torch.tensor(targets, dtype=torch.long).reshape(B, P, k, a)
        cols, bias = view.unembed_columns(ids.clamp(min=0).to(dev), dtype)
        cols, bias = cols.to(dev), bias.to(dev)  # token atoms: no direction replaces them
        vec, bias = cols.reshape(B, P, k * a, -1), bias.reshape(B, P, k * a)
        norm = view.final_norm
        u = norm.pull_back(vec)
        inv_s = cv.inv_scale_or_one(norm, index)
        norm_bias = norm.constant(vec)
        # ---- what the terms add up to (explain: the model's own logits, rho frozen)
        coef = torch.ones(B, P, k, a).to(dev, dtype)
        cap = view.softcap
        if rec.logits is not None and (cap is None or self.softcap == "post"):
            rows = torch.arange(B, device=dev)[:, None, None]
            at = rec.logits.device
            flat = ids.to(dev).clamp(min=0).expand(B, P, k, a).reshape(B, P, -1)
            model_val = rec.logits[rows.to(at), index[:, :, None].to(at), flat.to(at)]
            atom_val = model_val.to(dev, dtype).reshape(B, P, k, a)
        if cap is not None or rec.logits is None:
            x = cv.at(Site.FINAL_RESID, None, index, native=True)  # where it lives
            z = cv.home(dot(x, u.to(x.device)) * inv_s.to(x.device)[:, :, None])
            z = (z + (bias + norm_bias)).reshape(B, P, k, a)
        if cap is None:  # the weights are coef (ones): the terms are the atom terms
            weights, explains = None, "logit"
            if rec.logits is None:
                atom_val = z
        else:
            if self.softcap == "pre":
                weights, atom_val, explains = coef, z, "pre-softcap logit"
            else:
                weights = coef * softcap_ratio(z, cap)
                explains = "post-softcap logit (rho frozen)"
                if rec.logits is None:
                    atom_val = cap * torch.tanh(z / cap)
            if bool((weights == 1).all()):
                weights = None
        explained = (coef * atom_val).sum(-1)
        # ---- every write (split_writes, with the plan and the layers' facts read once)
        K = u.shape[2]
        out = torch.empty(B, P, K, len(self.table), dtype=u.dtype, device=u.device)
        s = inv_s[:, :, None]
        start = 0
        parts: Optional[tuple] = None
        for n, what in self.plan:
            dst = out[..., start : start + n]
            start += n
            if what[0] == "embed":
                dst[..., 0] = dot(cv.embed_write(index, u.dtype), u) * s
                continue
            if what[0] == "pos_embed":
                dst[..., 0] = dot(cv.at(Site.POS_EMBED, None, index, u.dtype), u) * s
                continue
            kind, layer, part = what
            if parts is None or parts[0] != (kind, layer):
                parts = ((kind, layer), *self._layer(cv, kind, layer, part, u, inv_s, s, index))
            _, ul, sl, bias_term, post_b, whole = parts
            if part == "whole":
                dst[..., 0] = whole
            elif part == "bias":
                dst[..., 0] = bias_term
            elif part == "post_b":
                dst[..., 0] = post_b.expand(B, P, K) * s
            elif kind == "attn":  # W_O read once
                W_O = self.layers[("attn", layer)][3]
                head_block(cv, layer, ul, index, False, sl, dst.view(B, P, K, n), W_O)
            else:  # W_out read once
                neuron_block(cv, layer, ul, index, sl, dst, self.layers[("mlp", layer)][3])
        for values in ([bias] if self.has_b_U else []) + (
            [norm_bias] if norm.bias is not None else []
        ):
            out[..., start : start + 1] = values.expand(B, P, K)[..., None]
            start += 1
        values = out.reshape(B, P, k, -1) if weights is None else weigh(out, weights)
        gap = torch.zeros(B, P, k, dtype=u.dtype, device=u.device)
        return values, explained, gap, explains

    def _layer(
        self,
        cv: CacheView,
        kind: str,
        layer: int,
        part: str,
        u: Tensor,
        inv_s: Tensor,
        s: Tensor,
        index: Tensor,
    ) -> tuple:
        """``(ul, sl, bias_term, post_b, whole)`` of one layer's attention or MLP write
        (``split_writes``' ``layer_parts``; ``whole`` only for a layer not split)."""
        post, bias, scale, _ = self.layers[(kind, layer)]
        B, P = index.shape
        K = u.shape[2]
        ul = u if post is None else post.pull_back(u)
        inv = cv.inv_scale(post, index)
        inv = inv_s if inv is None else inv_s * inv
        inv = inv if scale is None else inv * scale
        sl = inv[:, :, None]
        bias_term = (ul @ bias).expand(B, P, K) * sl
        post_b: Any = None if post is None else post.constant(u)  # read only with a post-norm
        whole = None
        if part != "split":
            whole = whole_write(cv, kind, layer, index, u, s)
            whole = whole - bias_term - (post_b.expand(B, P, K) * s if post is not None else 0)
        return ul, sl, bias_term, post_b, whole
