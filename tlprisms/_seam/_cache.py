"""A cache seen through its model: typed reads, frozen scales and provenance.

:class:`CacheView` is how every prism reads an ``ActivationCache``: by :class:`Site` (never by
hook name), with errors that say truthfully why a value is missing (the model never records it
vs. a ``names_filter`` dropped it), the frozen ``1/scale`` of any norm at any positions, and
the checks that the cache belongs to this model and these tokens. It records which hooks were
read, so that non-finite values can be traced back to the hook and position they came from.
"""

from typing import Any, Optional

import torch
from torch import Tensor

from tlprisms._core.errors import ArgumentError, CacheError, NonFiniteError, UnsupportedModelError
from tlprisms._core.ops import gather_pos
from tlprisms._seam._hooks import Site
from tlprisms._seam._model import ModelView
from tlprisms._seam._norms import NormSpec

__all__ = ["CacheView"]

#: provenance: recomputed layer-0 values must match the cache to this fraction of their size
PROVENANCE_RTOL = 1e-3
#: the same for bf16/fp16 caches
PROVENANCE_RTOL_LOWP = 5e-2
LOW_PRECISION = (torch.float16, torch.bfloat16)
#: hook_embed (+ hook_pos_embed) is the residual stream's start when it matches resid_pre[0]
#: to this fraction of its size; otherwise something transformed it in between
EMBED_RTOL = 1e-5


def _dropout_active(model: Any) -> float:
    """The largest dropout probability active in ``model`` (0 when in eval mode)."""
    if not getattr(model, "training", False):
        return 0.0
    return max(
        (float(m.p) for m in model.modules() if isinstance(m, torch.nn.Dropout) and m.training),
        default=0.0,
    )


#: elements per slice of the finiteness check (64 MiB of float32)
FINITE_CHUNK = 2**24


def all_finite(t: Tensor) -> bool:
    """Whether every element of ``t`` is finite.

    First the sum (one pass, no copy, 25-200x cheaper than a mask): a NaN or an infinity
    anywhere makes the sum non-finite, so a finite sum proves every element finite. A
    non-finite sum is either a bad value or a float overflow of the sum itself; then the
    elements are checked, in slices of :data:`FINITE_CHUNK` (``torch.isfinite(t).all()`` on
    a whole cached tensor allocates its size again, e.g. 4 GiB for one layer's attention
    pattern at 8,192 tokens)."""
    acc = torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else None
    if bool(torch.isfinite(t.sum(dtype=acc))):
        return True
    if t.numel() <= FINITE_CHUNK or not t.is_contiguous():
        return bool(torch.isfinite(t).all())
    return all(bool(torch.isfinite(c).all()) for c in t.view(-1).split(FINITE_CHUNK))


class CacheView:
    """Read-only access to a cache by :class:`Site`, for one model.

    Args:
        view: the model's :class:`ModelView`.
        cache: an ``ActivationCache`` or a dict of hook name -> tensor.
        caller: the public call, named in error messages.
    """

    def __init__(self, view: ModelView, cache: Any, caller: str = "LogitPrism") -> None:
        self.view = view
        self.cache = cache
        self.caller = caller
        if (
            cache is None
            or isinstance(cache, (Tensor, list, tuple, str, bytes))
            or not hasattr(cache, "__getitem__")
        ):
            raise ArgumentError(
                f"{caller}: cache must be the ActivationCache that model.run_with_cache(tokens) "
                f"returned (or a dict of hook name -> tensor); got a {type(cache).__name__}. "
                "run_with_cache returns (logits, cache): pass the second."
            )
        self.read_names: list[str] = []
        self._finite: set[str] = set()  # hooks checked to hold finite values (shared by copies)
        #: what prisms derive from this cache's shape alone (component tables, the embedding
        #: check), kept for the next call: shared by every :meth:`for_call` copy
        self.memo: dict = {}
        self.embed_is_hooked: Optional[bool] = None
        self._home: Optional[torch.device] = None  # where prisms compute: set from hook_embed
        embed = self.get(Site.EMBED)
        if embed.ndim == 2:
            raise CacheError(
                f"{caller}: the cache's hook_embed has shape {tuple(embed.shape)}, with no batch "
                "axis (ActivationCache.remove_batch_dim() was called on it). Pass the cache "
                "that model.run_with_cache(tokens) returned, before remove_batch_dim()."
            )
        if embed.ndim != 3 or embed.shape[-1] != view.d_model:
            raise CacheError(
                f"{caller}: the cache's hook_embed has shape {tuple(embed.shape)} but this model "
                f"has d_model={view.d_model}; the cache comes from another model. Re-run "
                "model.run_with_cache(tokens) with this model."
            )
        if embed.shape[1] == 0:
            raise CacheError(
                f"{caller}: the cache was recorded from an empty input (0 tokens); "
                "record it from at least one token."
            )
        self.batch, self.n_ctx = int(embed.shape[0]), int(embed.shape[1])
        self.device = self._home = embed.device
        self.cache_dtype = embed.dtype
        self.low_precision = embed.dtype in LOW_PRECISION
        self.dtype = torch.float64 if embed.dtype == torch.float64 else torch.float32
        beyond = view.hook(Site.RESID_PRE, view.n_layers)
        if self._present(beyond):
            raise CacheError(
                f"{caller}: the cache has more than {view.n_layers} layers; it comes from "
                "another model. Re-run model.run_with_cache(tokens) with this model."
            )

    def for_call(self, caller: str) -> "CacheView":
        """The same view, naming ``caller`` in its errors."""
        other = object.__new__(CacheView)
        other.__dict__.update(self.__dict__)
        other.caller = caller
        return other

    def trust_finite(self) -> None:
        """Read hooks without checking each for NaN/inf (a pass over the whole tensor), for
        a caller that refuses a non-finite result itself (``explain_task``'s kernel, via
        ``_refuse_broken``): a non-finite term is then traced through every hook the cache
        holds, in the order recorded."""
        names = [name for name in self.cache.keys() if name not in self._finite]
        self._finite.update(names)
        self.read_names.extend(names)

    # ------------------------------------------------------------------ reads
    def _present(self, name: str) -> bool:
        try:
            return name in self.cache
        except TypeError:
            return False

    def has(self, site: Site, layer: Optional[int] = None) -> bool:
        return self.view.has_site(site, layer) and self._present(self.view.hook(site, layer))

    def get(self, site: Site, layer: Optional[int] = None, *, native: bool = False) -> Tensor:
        """The cached tensor of ``site``, or a CacheError that says why it is missing.

        In a model split across devices the tensor is moved to the device where the residual
        stream starts (the embedding's) unless ``native``: then it stays where its layer
        lives, for a prism that computes that layer's terms there (and moves only them)."""
        name = self.view.hook(site, layer)
        if not self._present(name):
            reason = self.view.missing_reason(site, layer)
            if reason:
                raise CacheError(f"{self.caller}: the cache has no '{name}': {reason}.")
            if not self.view.records(name):
                raise CacheError(
                    f"{self.caller}: this model ({self.view.describe()}) has no hook '{name}', "
                    "so no cache of it can hold that value and this prism cannot be computed "
                    "for it. The residual prism needs only layer outputs; docs/architectures.md "
                    "says what each family supports."
                )
            raise CacheError(
                f"{self.caller}: the cache has no '{name}'. It was recorded with a names_filter "
                "that dropped it (this model does record it); run model.run_with_cache(tokens) "
                "without a names_filter, or with names_filter=tlprisms.needed_hooks(model)."
            )
        t = self.cache[name]
        if not isinstance(t, Tensor) or (site is not Site.TOKENS and not t.dtype.is_floating_point):
            what = f"dtype {t.dtype}" if isinstance(t, Tensor) else f"a {type(t).__name__}"
            raise CacheError(
                f"{self.caller}: the cache's '{name}' is {what}, not a float tensor of "
                "activations; the cache was edited. Re-run model.run_with_cache(tokens)."
            )
        if (
            site is not Site.EMBED
            and t.ndim >= 2
            and t.shape[0] != self.batch
            and t.shape[0] == self.batch * self.n_ctx
        ):
            t = t.reshape(self.batch, self.n_ctx, *t.shape[1:])  # hooks recorded flattened (OPT)
        if name not in self._finite:
            if t.dtype.is_floating_point and not all_finite(t):
                self.read_names.append(name)
                self.refuse_nonfinite("the cache")
            self._finite.add(name)
            self.read_names.append(name)
        if not native and self._home is not None and t.device != self._home:  # a split model
            t = t.to(self._home)
        return t

    def device_of(self, site: Site, layer: Optional[int] = None) -> torch.device:
        """Where the cached tensor of ``site`` lives: its layer's device in a model split
        across devices, else the cache's."""
        return self.get(site, layer, native=True).device

    def home(self, t: Tensor) -> Tensor:
        """``t`` (a result computed where its layer lives) on the prism's device."""
        return t if self._home is None or t.device == self._home else t.to(self._home)

    def at(
        self,
        site: Site,
        layer: Optional[int],
        positions: Tensor,
        dtype: Optional[torch.dtype] = None,
        *,
        native: bool = False,
    ) -> Tensor:
        """``site`` gathered at ``positions [B, P]``: ``[B, P, ...]`` in the compute dtype.
        Gathered where the tensor lives; then moved to the prism's device unless ``native``
        (see :meth:`get`)."""
        x = self.get(site, layer, native=True)
        if site is Site.POS_EMBED and x.shape[0] != positions.shape[0]:
            x = x.expand(positions.shape[0], *x.shape[1:])
        out = gather_pos(x, positions, dtype or self.dtype)
        return out if native else self.home(out)

    def embed_write(self, positions: Tensor, dtype: torch.dtype) -> Tensor:
        """What the embedding writes into the residual stream at ``positions``: ``hook_embed``
        where the stream starts from it (plus ``hook_pos_embed``), else
        ``resid_pre[0] - hook_pos_embed``: a norm or a scale after ``hook_embed`` (Bloom's
        embedding LayerNorm, Granite's multiplier) or positions added without a hook (XGLM)."""
        if self.embed_is_hooked is None:
            self.embed_is_hooked = self.memo.get("embed_is_hooked")
        if self.embed_is_hooked is None:
            x = self.get(Site.EMBED)
            if self.view.pos_embed_in_resid:
                x = x + self.get(Site.POS_EMBED)
            start = self.get(Site.RESID_PRE, 0)
            tol = EMBED_RTOL * (float(start.abs().max()) + 1e-6)
            self.embed_is_hooked = bool(((x - start).abs() <= tol).all())
            self.memo["embed_is_hooked"] = self.embed_is_hooked
        if self.embed_is_hooked:
            return self.at(Site.EMBED, None, positions, dtype)
        start = self.at(Site.RESID_PRE, 0, positions, dtype)
        if self.view.pos_embed_in_resid:
            start = start - self.at(Site.POS_EMBED, None, positions, dtype)
        return start

    def scale(self, norm: NormSpec, positions: Tensor) -> Tensor:
        """The frozen scale ``s`` of ``norm`` at ``positions``: ``[B, P]``."""
        x = self.get(norm.site, norm.layer, native=True)[..., 0]
        return self.home(gather_pos(x, positions, self.dtype))

    def inv_scale(self, norm: Optional[NormSpec], positions: Tensor) -> Optional[Tensor]:
        """The frozen ``1 / s`` of ``norm`` at ``positions`` (``[B, P]``), or None when the
        norm divides by nothing (absent, or a model without normalisation)."""
        if norm is None or not norm.has_scale:
            return None
        return 1.0 / self.scale(norm, positions)

    def inv_scale_or_one(self, norm: Optional[NormSpec], positions: Tensor) -> Tensor:
        inv = self.inv_scale(norm, positions)
        if inv is None:
            return torch.ones(positions.shape, dtype=self.dtype, device=positions.device)
        return inv

    # ------------------------------------------------------------------ checks
    def precision(self) -> str:
        """The dtype the model computed in: the cache's, except a float32 computation cast to
        float64 afterwards (every value of its final residual stream is a float32 number,
        which a float64 forward pass practically never gives)."""
        name = str(self.cache_dtype).replace("torch.", "")
        if name == "float64" and self.has(Site.FINAL_RESID):
            x = self.cache[self.view.hook(Site.FINAL_RESID)][:, -1]
            if bool((x == x.float().double()).all()):
                return "float32"
        return name

    def locate_nonfinite(self) -> str:
        """Where the first NaN/inf among the hooks read so far is: 'hook at batch b, pos p'."""
        for name in dict.fromkeys(self.read_names):
            t = self.cache[name]
            bad = ~torch.isfinite(t)
            if bool(bad.any()):
                idx = [int(i) for i in torch.nonzero(bad)[0]]
                where = f"batch {idx[0]}, position {idx[1]}" if len(idx) >= 2 else f"index {idx}"
                return f"'{name}' ({'NaN' if bool(torch.isnan(t).any()) else 'inf'} at {where})"
        return ""

    def refuse_nonfinite(self, what: str) -> None:
        where = self.locate_nonfinite()
        src = (
            f"the cache holds a non-finite value in {where}"
            if where
            else "a weight of the model or an argument is non-finite"
        )
        raise NonFiniteError(
            f"{self.caller}: {what} is not finite: {src}. A forward pass that overflowed (try "
            "float32), or a hook that wrote NaN/inf, cannot be decomposed; re-run "
            "model.run_with_cache(tokens) without it."
        )

    def verify(self, tokens: Optional[Tensor]) -> None:
        """Check that the cache comes from this model (and from ``tokens``, when given).

        Recomputes layer 0's value vectors from the cached ``resid_pre`` and ln1 scale with
        this model's weights, and the embeddings from the tokens. ``needed_hooks`` always
        records what this needs; a cache without it is refused rather than trusted.
        """
        view, caller = self.view, self.caller
        rtol = PROVENANCE_RTOL_LOWP if self.low_precision else PROVENANCE_RTOL
        p = _dropout_active(view.model)
        if p > 0:
            raise UnsupportedModelError(
                f"{caller}: the model is in training mode with dropout (p={p:g}) active, so the "
                "cache records one random forward pass that the frozen prisms cannot reproduce. "
                "Call model.eval() and re-run model.run_with_cache(tokens)."
            )
        need = [Site.RESID_PRE, Site.V] + ([Site.LN1_SCALE] if view.ln1[0].has_scale else [])
        missing = [view.hook(s, 0) for s in need if not self._present(view.hook(s, 0))]
        if missing:
            raise CacheError(
                f"{caller}: cannot check that this cache comes from this model: it lacks "
                f"{', '.join(repr(m) for m in missing)}. Record it with "
                "names_filter=tlprisms.needed_hooks(model) (which always keeps them) or with no "
                "names_filter."
            )
        v = self.get(Site.V, 0)
        if v.ndim != 4 or v.shape[2] != view.n_kv_heads or v.shape[3] != view.d_head:
            raise CacheError(
                f"{caller}: the cache's layer-0 value vectors have shape {tuple(v.shape)}, but "
                "this "
                f"model has {view.n_kv_heads} key/value heads of size {view.d_head}; the cache "
                "comes from another model. Re-run model.run_with_cache(tokens) with this model."
            )
        norm = view.ln1[0]
        scale = self.get(norm.site, 0) if norm.has_scale else None
        x = norm.apply(self.get(Site.RESID_PRE, 0).to(self.dtype), scale)
        W_V = view.W_V(0, self.dtype).to(self.device)
        v_hat = torch.einsum("bpm,gmd->bpgd", x, W_V) + view.b_V(0, self.dtype, self.device)
        err = float((v_hat - v.to(self.dtype)).abs().max())
        ref = float(v.abs().max()) + 1e-6
        if not err <= rtol * ref:  # also catches NaN
            if not (torch.isfinite(v).all() and torch.isfinite(x).all()):
                self.refuse_nonfinite("the cache's layer-0 input")
            raise CacheError(
                f"{caller}: the cache does not come from this model: its layer-0 value vectors "
                f"differ from ln1(resid_pre) @ W_V + b_V by {err:.3g} (|v| up to {ref:.3g}). "
                "Re-run model.run_with_cache(tokens) with this model, and do not change its "
                "weights in between."
            )
        if tokens is not None and self.has(Site.TOKENS):
            got_ids = self.get(Site.TOKENS)
            if tuple(got_ids.shape) != tuple(tokens.shape) or not torch.equal(
                got_ids.to(tokens.device).long(), tokens.long()
            ):
                raise CacheError(
                    f"{caller}: the cache was not recorded from these tokens: the token ids it "
                    "recorded at the embedding (embed.hook_in) differ from the tokens given. "
                    "Pass the tokens the cache was recorded with."
                )
        elif tokens is not None:
            emb = view.embed_rows(tokens.to(self.device), self.dtype)
            got = self.get(Site.EMBED).to(self.dtype)
            e_err = float((emb - got).abs().max())
            if not e_err <= rtol * (float(got.abs().max()) + 1e-6):
                raise CacheError(
                    f"{caller}: the cache was not recorded from these tokens: its embeddings "
                    f"(hook_embed) differ from the model's embeddings of the given tokens by "
                    f"{e_err:.3g}. Pass the tokens the cache was recorded with."
                )
