"""Forward passes with interventions: how tlprisms edits a TransformerLens forward pass.

Verification (``LogitPrism.verify``) and ablation (``LogitPrism.effects``) run the model
itself. This module knows how to do that on both TransformerLens model classes: which hooks
to patch, what each patch means, and where the two classes differ.

**Batched copies.** The input rows an intervention needs are stacked along the batch axis:
first one *clean* copy of every row used, then one *intervened* copy per intervention. Every
frozen value is the clean copy's value in the same forward pass (not the cache's), so a
frozen quantity is bit-identical to the clean one and a measured difference is only the
intervention's.

**Frozen** in every intervened copy (:func:`run_frozen`): every norm scale (``ln1``, ``ln2``,
their post-norms, SoLU's inner norm, ``ln_final``) and the output of every attention and MLP
layer that is neither the removed writer's nor on the path. A path hop keeps only its own
head's ``z`` (or neuron's activation, with the activation's gate frozen) at the position it
writes; after the hop's layer the residual stream is reset to the clean stream plus that hop's
own write, so the removed write reaches the readout through the path only.

**Attention patterns are never edited.** Some bridges record ``hook_pattern`` but ignore edits
to it (TransformerLens 4.3's GPT-J and OPT with eager attention), so a head's write is removed
and a hop's pattern held fixed through ``hook_z``, which every class honours: a removed source
``j`` subtracts ``A[h, at, j] * v[j, kv(h)]`` (both read in the same pass) from ``z[at, h]``; a
hop's ``z[out, h]`` is recomputed as ``sum_j A_clean[h, out, j] * v[j, kv(h)]`` from the clean
copy's pattern and the copy's own values. Every hook whose edits a run relies on is probed
once per model (:func:`ignored_edits`: edit it, see the logits move) and a run that needs an
ignored one is refused.

**Padding.** A batch recorded with ``attention_mask`` is re-run with the same mask
(``attention_mask=`` of :func:`run_frozen` and :func:`run_ablated`, one row per input row).

TransformerLens warns when a hook edits a norm's ``hook_scale`` on a bridge ("A forward hook
edited hook_scale ..."): the interventions do that on purpose, so exactly that warning is
silenced around their own forward passes.

Where the classes differ: a ``HookedTransformer``'s ``hook_resid_mid`` is the residual stream
itself, a bridge's is only what ``ln2`` reads (the stream is added inside Hugging Face's
block); the reset after a hop's layer is therefore built from the layer's output changes at
``hook_resid_post``, which both classes add to the stream. SoLU's value between the softmax
and its LayerNorm is ``mlp.hook_mid`` (HookedTransformer) or ``mlp.ln.hook_in`` (bridges),
as :class:`~tlprisms._seam._hooks.Site` spells it.
"""

import warnings
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor

from tlprisms._core.errors import UnsupportedModelError
from tlprisms._seam._hooks import Site
from tlprisms._seam._model import ModelView

__all__ = [
    "Removal",
    "Through",
    "Copy",
    "Ablation",
    "run_frozen",
    "run_ablated",
    "record",
    "ignored_edits",
    "score_problem",
    "COPY_TOKENS",
    "PROBE_MOVE",
]

#: about how many tokens (copies x positions) one forward pass of interventions holds
COPY_TOKENS = 8192

#: a probed hook's edit takes effect when it moves the logits by more than this fraction of
#: their size (the edit doubles the activation and adds 0.5: a real edit moves them by O(1))
PROBE_MOVE = 1e-4
#: the warning TransformerLens gives when a hook edits a norm's scale on a bridge; the
#: interventions do that on purpose (a regular expression for ``warnings.filterwarnings``)
_SCALE_EDIT_WARNING = r"A forward hook edited hook_scale"
#: per model: hook name -> whether an edit of it takes effect (probed once)
_PROBED: "weakref.WeakKeyDictionary[Any, dict[str, bool]]" = weakref.WeakKeyDictionary()

_SCALES = (
    Site.LN1_SCALE,
    Site.LN2_SCALE,
    Site.LN1_POST_SCALE,
    Site.LN2_POST_SCALE,
    Site.SOLU_SCALE,
)


#: what :func:`ignored_edits` probes besides :class:`Site` values: a head's ``z``
_Z = "z"


def _z_hook(layer: int) -> str:
    """A head's mixed values ``z [batch, pos, head, d_head]`` (both classes)."""
    return f"blocks.{layer}.attn.hook_z"


#: what :func:`ignored_edits` probes besides :class:`Site` values: the queries and keys
_Q, _K = "q", "k"


def _qk_hook(side: str, layer: int) -> str:
    """A layer's queries (``side="q"``) or keys (``"k"``), ``[batch, pos, head, d_head]``,
    as the projection wrote them (before rotary; both classes)."""
    return f"blocks.{layer}.attn.hook_{side}"


class _Stop(Exception):
    """Raised by the measuring hook: nothing after it is needed."""


@dataclass(frozen=True)
class Removal:
    """The write one intervened copy removes.

    Attributes:
        kind: ``"embed"``/``"pos_embed"`` (``vector`` is subtracted from the stream at ``at``
            before layer 0), ``"heads"`` (head ``index``'s ``z``, or every head's when -1, at
            destination ``at`` set to 0, or only the part read from source ``src``
            subtracted), ``"neurons"`` (activations set to 0: neuron ``index``, or all, at
            ``at``), ``"b_O"``/``"b_out"`` (``vector``, the layer's output bias, subtracted
            from the layer's output at ``at``), ``"outputs"`` (each ``(kind, layer,
            vector)`` of ``vectors``, ``kind`` ``"attn"``/``"mlp"``, subtracted at ``at``
            from that layer's output, every such output otherwise held at its clean value:
            a write to several layers at once, as a cross-layer transcoder's feature's),
            ``"none"`` (nothing removed: a copy that only takes its queries or keys from
            other copies).
        layer: the layer of heads/neurons (-1 for the embeddings).
        at: the residual position of the write.
    """

    kind: str
    layer: int
    at: int
    index: int = -1
    src: int = -1
    vector: Optional[Tensor] = None
    vectors: tuple = ()  # of (kind, layer, vector), kind "outputs"

    @property
    def writes(self) -> Optional[tuple[int, str]]:
        """(layer, "attn"/"mlp") whose output the removal changes, or None (embeddings)."""
        if self.kind in ("heads", "b_O"):
            return (self.layer, "attn")
        if self.kind in ("neurons", "b_out"):
            return (self.layer, "mlp")
        return None

    def changes(self, layer: int, kind: str) -> bool:
        """Whether the removal edits the output of ``layer``'s ``kind`` ("attn"/"mlp")."""
        if self.kind == "outputs":
            return any(k == kind and ly == layer for k, ly, _ in self.vectors)
        return self.writes == (layer, kind)


@dataclass(frozen=True)
class Through:
    """A hop of a path: only head/neuron ``index`` of ``layer`` passes the change on, and only
    its write at position ``out``. A head hop carries its recorded pattern row
    ``A[h, out, :]`` (``pattern``, ``[pos]``), held fixed: its ``z`` is recomputed from it."""

    kind: str  # "head" | "neuron"
    layer: int
    index: int
    out: int
    pattern: Optional[Tensor] = None


@dataclass(frozen=True)
class Copy:
    """One intervened copy of input row ``row``.

    ``query_from`` / ``key_from`` (runs that measure a layer's attention scores): where the
    copy's queries / keys of that layer come from: None its own, -1 its clean copy's, ``n``
    copy ``n``'s of the same run (one that takes neither from another copy)."""

    row: int
    removal: Removal
    path: tuple = ()  # of Through
    query_from: Optional[int] = None
    key_from: Optional[int] = None


@dataclass(frozen=True)
class Ablation:
    """One ablated copy of input row ``row``: component ``kind`` (``"head"``, ``"attn"``,
    ``"neuron"``, ``"mlp"``) of ``layer`` replaced at every position by ``value`` (its value
    per position, shaped like the activation without the batch axis), or by 0 when None.
    ``src >= 0`` (a head): only what the head reads from source ``src`` is removed, at every
    destination (its pattern column zeroed, through ``z``). Kind ``"none"``: a clean copy."""

    row: int
    kind: str
    layer: int
    index: int = -1
    value: Optional[Tensor] = None
    src: int = -1


# ----------------------------------------------------------------------------- plumbing
class _Hooks:
    """Hook functions by name, each a list of in-place edits of one cloned activation."""

    def __init__(self) -> None:
        self.edits: dict[str, list[Callable[[Tensor], None]]] = defaultdict(list)

    def add(self, name: str, edit: Callable[[Tensor], None]) -> None:
        self.edits[name].append(edit)

    def as_list(self, batch: int, n_ctx: int) -> list:
        """The hooks of a forward pass of ``batch`` rows of ``n_ctx`` tokens. Each edit sees
        the activation with its batch axis first: a hook recorded with the batch and
        position axes flattened into one (OPT's ``ln2.hook_scale``: ``[batch * pos, 1]``)
        is seen as ``[batch, pos, ...]`` (a view: the edits land in the tensor returned)."""

        def make(edits: list) -> Callable:
            def hook(x: Tensor, hook: Any) -> Tensor:
                x = x.clone()
                y = unflatten(x, batch, n_ctx)
                for edit in edits:
                    edit(y)
                return x

            return hook

        return [(name, make(edits)) for name, edits in self.edits.items()]


def unflatten(x: Tensor, batch: int, n_ctx: int) -> Tensor:
    """``x`` with its batch axis first: ``[batch * n_ctx, ...]`` (a hook whose module
    flattened the batch and position axes) viewed as ``[batch, n_ctx, ...]``, else ``x``."""
    if x.ndim >= 1 and n_ctx > 1 and x.shape[0] == batch * n_ctx:
        return x.view(batch, n_ctx, *x.shape[1:])
    return x


def _run(model: Any, tokens: Tensor, hooks: _Hooks, mask: Optional[Tensor] = None) -> Any:
    """Run the forward pass until the measuring hook stops it; hooks are removed after. The
    warning TransformerLens gives for edited norm scales is silenced (the edits are ours)."""
    kw = {} if mask is None else {"attention_mask": mask.to(tokens.device)}
    fwd = hooks.as_list(tokens.shape[0], tokens.shape[1])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_SCALE_EDIT_WARNING)
        try:
            return model.run_with_hooks(tokens, fwd_hooks=fwd, **kw)
        except _Stop:
            return None


def _probe_name(view: ModelView, site: Any) -> Optional[str]:
    """The layer-0 hook name a probe of ``site`` edits (None: the model has no such hook)."""
    if site == _Z:
        return _z_hook(0)
    if site in (_Q, _K):
        return _qk_hook(str(site), 0)
    layer = None if site is Site.FINAL_SCALE else 0
    return view.hook(site, layer) if view.has_site(site, layer) else None


def ignored_edits(view: ModelView, tokens: Tensor, sites: Iterable[Any]) -> list[str]:
    """The hooks among ``sites`` (:class:`Site` values, or ``"z"``; probed at layer 0, the
    final norm's scale at the end) whose edits the model ignores: each is edited (``2 x +
    0.5``) in its own copy of a few of ``tokens``' last ids, in one forward pass, and must
    move the logits (the edit: ``2 x`` plus a ramp along the last axis). Probed once per model
    and hook; a hook the model lacks is left out."""
    model = view.model
    try:
        known = _PROBED.setdefault(model, {})
    except TypeError:  # not weakly referenceable: probe every time
        known = {}
    wanted = [n for n in dict.fromkeys(_probe_name(view, s) for s in sites) if n is not None]
    names = [n for n in wanted if n not in known]
    if names:
        row = tokens[:1, -min(4, tokens.shape[1]) :]
        batch = row.expand(len(names) + 1, -1)
        hooks = _Hooks()
        for r, name in enumerate(names):

            def edit(x: Tensor, r: int = r + 1) -> None:
                # not affine along the last axis: a norm after the hook must not undo it
                ramp = torch.linspace(0.5, 1.5, x.shape[-1], device=x.device, dtype=x.dtype)
                x[r] = x[r] * 2 + ramp * (x[r].abs().max() + 1)

            hooks.add(name, edit)
        logits = _run(model, batch, hooks)
        out = logits[:, -1].float()
        size = float(out[0].abs().max()) + 1.0
        for r, name in enumerate(names):
            known[name] = bool(float((out[r + 1] - out[0]).abs().max()) > PROBE_MOVE * size)
    return [n for n in wanted if not known[n]]


#: the hooks a run probes before relying on them: inside the attention, where bridges were
#: seen to record a value and recompute it (hook_pattern of GPT-J/OPT); the residual-stream,
#: MLP and norm hooks are TransformerLens's own and always honoured (and a probe of them can
#: miss on a model whose layer-0 weights are zero)
_PROBED_SITES = (Site.V, _Z, _Q, _K, Site.Q_NORM_SCALE, Site.K_NORM_SCALE)


def _refuse_ignored(view: ModelView, tokens: Tensor, sites: Iterable[Any], what: str) -> None:
    bad = ignored_edits(view, tokens, [s for s in sites if s in _PROBED_SITES])
    if bad:
        raise UnsupportedModelError(
            f"{what}: this model ignores edits to {', '.join(map(repr, bad))} (its forward pass "
            "recomputes the value after the hook), so the intervention cannot be made on it. "
            "The terms themselves do not depend on it; check them with Decomposition.check(), "
            "or use a TransformerLens version whose model honours hook edits."
        )


def _batch(tokens: Tensor, rows: Sequence[int]) -> tuple[Tensor, dict[int, int]]:
    """The clean copies first, one per distinct row: (``[R, T]``, row -> its index)."""
    distinct = list(dict.fromkeys(rows))
    index = {r: i for i, r in enumerate(distinct)}
    return tokens[torch.as_tensor(distinct, device=tokens.device)], index


# ----------------------------------------------------------------------------- frozen runs
@dataclass
class _Plan:
    view: ModelView
    copies: Sequence[Copy]
    R: int
    clean: Tensor  # [N] batch index of each copy's clean copy
    mine: Tensor  # [N] batch index of each copy
    hops: dict = field(default_factory=dict)  # layer -> [(copy, Through)]
    stash: dict = field(default_factory=dict)
    edited: set = field(default_factory=set)  # the sites whose edits the run relies on


def _freeze(idx: Tensor, src: Tensor) -> Callable[[Tensor], None]:
    def edit(x: Tensor) -> None:
        x[idx] = x[src]

    return edit


def run_frozen(
    view: ModelView,
    tokens: Tensor,
    copies: Sequence[Copy],
    measure: Site,
    layer: Optional[int],
    gate_limit: Callable[[Tensor], Tensor],
    attention_mask: Optional[Tensor] = None,
    head: Optional[int] = None,
) -> tuple[Tensor, Tensor]:
    """Run every copy with its removal and path, everything else frozen (module docstring).

    Args:
        tokens: the input rows ``[batch, pos]``.
        attention_mask: the mask the rows were recorded with ``[batch, pos]`` (None: none).
        measure: the residual-stream site measured (``FINAL_RESID``, ``RESID_PRE`` ...), at
            ``layer``; the forward pass stops there. ``ATTN_SCORES``: head ``head``'s
            pre-softmax scores of ``layer`` (check :func:`score_problem` first), with the
            layer's query/key norm scales frozen and each copy's queries and keys taken as
            its ``query_from`` / ``key_from`` say.
        gate_limit: ``act(pre)/pre`` where ``pre`` is 0 (plain MLPs).

    Returns:
        The measured stream of each intervened copy and of its clean copy, ``[N, pos, d]``
        (scores: ``[N, query, key]``).
    """
    N = len(copies)
    tok, index = _batch(tokens, [c.row for c in copies])
    R = tok.shape[0]
    rows = torch.as_tensor([c.row for c in copies], device=tokens.device)
    batch = torch.cat([tok, tokens[rows]], 0)
    dev = torch.device("cpu")
    clean = torch.as_tensor([index[c.row] for c in copies], device=dev)
    mine = torch.arange(R, R + N, device=dev)
    plan = _Plan(view, copies, R, clean, mine)
    for c, copy in enumerate(copies):
        for hop in copy.path:
            plan.hops.setdefault(hop.layer, []).append((c, hop))
    hooks = _Hooks()
    _freeze_scales(plan, hooks)
    _removals(plan, hooks)
    _outputs(plan, hooks)
    for layer_, hops in plan.hops.items():
        _hop_layer(plan, hooks, layer_, hops, gate_limit)
    if measure is Site.ATTN_SCORES:
        if layer is None or head is None:
            raise ValueError("run_frozen: scores are measured at a layer and head")
        _queries_keys(plan, hooks, layer)
    _refuse_ignored(view, tokens, plan.edited, "verify")
    out: dict[str, Tensor] = {}
    name = view.hook(measure, layer)

    def grab(x: Tensor) -> None:
        out["x"] = (x[:, head] if measure is Site.ATTN_SCORES else x).detach().clone()
        raise _Stop()

    hooks.add(name, grab)
    mask = None
    if attention_mask is not None:
        rows_all = torch.cat([torch.as_tensor(list(index), device=tokens.device), rows])
        mask = attention_mask.to(tokens.device)[rows_all]
    _run(view.model, batch, hooks, mask)
    x = out["x"]
    return x[mine.to(x.device)], x[clean.to(x.device)]


def _queries_keys(plan: _Plan, hooks: _Hooks, layer: int) -> None:
    """The measured layer's query/key norm scales frozen, and each copy's queries and keys
    taken from where its ``query_from`` / ``key_from`` say."""
    view = plan.view
    freeze = _freeze(plan.mine, plan.clean)
    for site in (Site.Q_NORM_SCALE, Site.K_NORM_SCALE):
        if view.has_site(site, layer):
            hooks.add(view.hook(site, layer), freeze)
            plan.edited.add(site)
    for side, probe in (("q", _Q), ("k", _K)):
        dst, src = [], []
        for c, copy in enumerate(plan.copies):
            f = copy.query_from if side == "q" else copy.key_from
            if f is None:
                continue
            dst.append(int(plan.mine[c]))
            src.append(int(plan.clean[c]) if f < 0 else int(plan.mine[f]))
        if dst:
            hooks.add(_qk_hook(side, layer), _freeze(torch.as_tensor(dst), torch.as_tensor(src)))
            plan.edited.add(probe)


def score_problem(view: ModelView, tokens: Tensor, layer: int) -> Optional[str]:
    """Why head scores of ``layer`` cannot be measured in a frozen run, or None: the model
    records no pre-softmax scores there, or edits of its queries/keys do not reach the
    scores it records (probed once per model and layer: each edited in its own copy of a
    few of ``tokens``' ids)."""
    name = view.hook(Site.ATTN_SCORES, layer)
    if not view.has_site(Site.ATTN_SCORES, layer):
        return (
            f"its layer {layer} records no pre-softmax attention scores (on this "
            f"TransformerLens bridge '{name}' holds the softmaxed weights its attention "
            "function returns, and no other hook holds the scores), so no hook shows the "
            "score a term is part of"
        )
    try:
        known = _PROBED.setdefault(view.model, {})
    except TypeError:  # not weakly referenceable: probe every time
        known = {}
    key = f"scores:{layer}"
    if key not in known:
        row = tokens[:1, -min(4, tokens.shape[1]) :]
        hooks = _Hooks()
        for r, side in ((1, "q"), (2, "k")):

            def edit(x: Tensor, r: int = r) -> None:
                ramp = torch.linspace(0.5, 1.5, x.shape[-1], device=x.device, dtype=x.dtype)
                x[r] = x[r] * 2 + ramp * (x[r].abs().max() + 1)

            hooks.add(_qk_hook(side, layer), edit)
        out: dict[str, Tensor] = {}

        def grab(x: Tensor) -> None:
            out["x"] = x.detach().float().clone()
            raise _Stop()

        hooks.add(name, grab)
        _run(view.model, row.expand(3, -1), hooks)
        x = out.get("x")
        moved = []
        if x is not None:
            x = torch.where(torch.isfinite(x), x, torch.zeros_like(x))
            size = float(x[0].abs().max()) + 1.0
            moved = [float((x[r] - x[0]).abs().max()) > PROBE_MOVE * size for r in (1, 2)]
        known[key] = x is not None and all(moved)
    if not known[key]:
        return (
            f"edits of its layer-{layer} queries or keys ('{_qk_hook('q', layer)}', "
            f"'{_qk_hook('k', layer)}') do not reach the scores it records at '{name}' (the "
            "attention recomputes them after the hooks), so a query or key side cannot be "
            "held fixed"
        )
    return None


def _freeze_scales(plan: _Plan, hooks: _Hooks) -> None:
    """Freeze every norm scale. The run relies on (and probes) only the scales a removal can
    change before the readout: the final norm's, the post-norms', and the norms a hop reads
    through (a hook the forward pass does not use, as ``ln2`` of a parallel block, is
    harmless to freeze)."""
    view = plan.view
    freeze = _freeze(plan.mine, plan.clean)
    if view.final_norm.has_scale:
        hooks.add(view.hook(Site.FINAL_SCALE), freeze)
        plan.edited.add(Site.FINAL_SCALE)
    for layer in range(view.n_layers):
        for site in _SCALES:
            if view.has_site(site, layer):
                hooks.add(view.hook(site, layer), freeze)
                if site in (Site.LN1_POST_SCALE, Site.LN2_POST_SCALE):
                    plan.edited.add(site)
    for layer, hops in plan.hops.items():
        for _, hop in hops:
            norm = view.ln1[layer] if hop.kind == "head" else view.ln2[layer]
            if norm.has_scale:
                plan.edited.add(norm.site)
            if hop.kind == "neuron" and view.act_fn == "solu_ln":
                plan.edited.add(Site.SOLU_SCALE)


def _stash(plan: _Plan, hooks: _Hooks, site: Site, layer: int) -> None:
    """Keep ``site``'s value of ``layer`` (every copy) for the ``z`` edits (read only)."""
    key = (site, layer)
    if key in plan.stash or ("hooked", key) in plan.stash:
        return
    plan.stash[("hooked", key)] = True

    def keep(x: Tensor) -> None:
        plan.stash[key] = x.detach()

    hooks.add(plan.view.hook(site, layer), keep)


def _removals(plan: _Plan, hooks: _Hooks) -> None:
    view = plan.view
    for c, copy in enumerate(plan.copies):
        r, b = copy.removal, int(plan.mine[c])
        vec = r.vector if r.vector is not None else torch.zeros(0)
        if r.kind in ("embed", "pos_embed", "b_O", "b_out") and r.vector is None:
            raise ValueError(f"run_frozen: a {r.kind!r} removal needs the vector it removes")
        if r.kind in ("embed", "pos_embed"):

            def sub(x: Tensor, b: int = b, at: int = r.at, vec: Tensor = vec) -> None:
                x[b, at] -= vec.to(x.device, x.dtype)

            hooks.add(view.hook(Site.RESID_PRE, 0), sub)
            plan.edited.add(Site.RESID_PRE)
        elif r.kind in ("b_O", "b_out"):
            site = Site.ATTN_OUT if r.kind == "b_O" else Site.MLP_OUT

            def sub_bias(x: Tensor, b: int = b, at: int = r.at, vec: Tensor = vec) -> None:
                x[b, at] -= vec.to(x.device, x.dtype)

            hooks.add(view.hook(site, r.layer), sub_bias)
            plan.edited.add(site)
        elif r.kind == "heads":
            head = slice(None) if r.index < 0 else r.index
            if r.src >= 0:  # v[src, kv(h)] zeroed; z kept only for head h at ``at``

                def zero_v(
                    x: Tensor, b: int = b, src: int = r.src, g: int = view.kv_group(r.index)
                ) -> None:
                    x[b, src, g] = 0.0

                hooks.add(view.hook(Site.V, r.layer), zero_v)
                plan.edited.add(Site.V)

            def remove_z(
                x: Tensor,
                b: int = b,
                cl: int = int(plan.clean[c]),
                head: Any = head,
                at: int = r.at,
                src: int = r.src,
            ) -> None:
                if src < 0:
                    x[b, at, head] = 0.0
                    return
                new = x[b, at, head].clone()
                x[b] = x[cl]
                x[b, at, head] = new

            hooks.add(_z_hook(r.layer), remove_z)
            plan.edited.add(_Z)
        elif r.kind == "neurons":
            n = slice(None) if r.index < 0 else r.index

            def zero_post(x: Tensor, b: int = b, at: int = r.at, n: Any = n) -> None:
                x[b, at, n] = 0.0

            hooks.add(view.hook(Site.MLP_POST, r.layer), zero_post)
            plan.edited.add(Site.MLP_POST)
        elif r.kind == "outputs":
            for kind, layer, vec in r.vectors:
                site = Site.ATTN_OUT if kind == "attn" else Site.MLP_OUT

                def sub_out(
                    x: Tensor,
                    b: int = b,
                    cl: int = int(plan.clean[c]),
                    at: int = r.at,
                    vec: Tensor = vec,
                ) -> None:
                    x[b] = x[cl]
                    x[b, at] -= vec.to(x.device, x.dtype)

                hooks.add(view.hook(site, layer), sub_out)
                plan.edited.add(site)
        elif r.kind != "none":
            raise ValueError(f"unknown removal {r.kind}")


def _hop_kind(kind: str) -> str:
    return "head" if kind == "attn" else "neuron"


def _on_path(plan: _Plan, layer: int, kind: str) -> list[int]:
    """The copies whose path runs through a head (``kind="attn"``) or neuron of ``layer``."""
    return [
        c
        for c, copy in enumerate(plan.copies)
        if any(h.layer == layer and h.kind == _hop_kind(kind) for h in copy.path)
    ]


def _outputs(plan: _Plan, hooks: _Hooks) -> None:
    """Freeze every layer output that neither the removal nor the path changes, and record
    the output changes of the path's layers (for the reset after them)."""
    view = plan.view
    for layer in range(view.n_layers):
        for kind, site in (("attn", Site.ATTN_OUT), ("mlp", Site.MLP_OUT)):
            if kind == "mlp" and view.attn_only:
                continue
            on_path = _on_path(plan, layer, kind)
            frozen = [
                c
                for c, copy in enumerate(plan.copies)
                if not copy.removal.changes(layer, kind) and c not in on_path
            ]
            if frozen:
                idx = torch.as_tensor(frozen)
                hooks.add(view.hook(site, layer), _freeze(plan.mine[idx], plan.clean[idx]))
                plan.edited.add(site)
            if on_path:
                idx = torch.as_tensor(on_path)

                def grab_delta(x: Tensor, idx: Tensor = idx, key: tuple = (layer, kind)) -> None:
                    plan.stash[key] = x[plan.mine[idx]] - x[plan.clean[idx]]

                hooks.add(view.hook(site, layer), grab_delta)


def _hop_layer(
    plan: _Plan, hooks: _Hooks, layer: int, hops: list, gate_limit: Callable[[Tensor], Tensor]
) -> None:
    view = plan.view
    heads = [(c, h) for c, h in hops if h.kind == "head"]
    neurons = [(c, h) for c, h in hops if h.kind == "neuron"]
    if heads:
        _stash(plan, hooks, Site.V, layer)

        def keep_head(x: Tensor) -> None:
            # the pattern held at the recorded one: z = A[h, out, :] @ v_copy[:, kv(h)]
            v = plan.stash[(Site.V, layer)]
            for c, h in heads:
                b, cl = int(plan.mine[c]), int(plan.clean[c])
                a = h.pattern.to(v.device, v.dtype)
                new = (a @ v[b, :, view.kv_group(h.index)]).to(x.device, x.dtype)
                x[b] = x[cl]
                x[b, h.out, h.index] = new

        hooks.add(_z_hook(layer), keep_head)
        plan.edited.add(_Z)
    if neurons:
        _neuron_hops(plan, hooks, layer, neurons, gate_limit)
    both = {c for c, _ in heads} & {c for c, _ in neurons}
    if both and not view.parallel:
        # the neuron reads resid_mid: the head hop's change, not what the head read
        idx = torch.as_tensor(sorted(both))

        def record_in(x: Tensor) -> None:
            plan.stash[("in", layer)] = x[plan.mine[idx]] - x[plan.clean[idx]]

        def drop_in(x: Tensor) -> None:
            x[plan.mine[idx]] -= plan.stash[("in", layer)]

        hooks.add(view.hook(Site.RESID_PRE, layer), record_in)
        hooks.add(view.hook(Site.RESID_MID, layer), drop_in)
        plan.edited.add(Site.RESID_MID)
    # after the layer: the clean stream plus the writes of the hops whose reader comes later
    # (a head's write that a neuron of the same layer read is not passed on)
    keep: dict[int, list] = {}
    for c in sorted({c for c, _ in hops}):
        path = plan.copies[c].path
        keep[c] = [
            (layer, "attn" if h.kind == "head" else "mlp")
            for n, h in enumerate(path)
            if h.layer == layer and (n == 0 or path[n - 1].layer > layer)
        ]
    rows = {key: _on_path(plan, layer, key[1]) for key in ((layer, "attn"), (layer, "mlp"))}

    def reset(x: Tensor) -> None:
        for c, keys in keep.items():
            b, cl = int(plan.mine[c]), int(plan.clean[c])
            new = x[cl].clone()
            for key in keys:
                new += plan.stash[key][rows[key].index(c)]
            x[b] = new

    hooks.add(view.hook(Site.RESID_POST, layer), reset)
    plan.edited.add(Site.RESID_POST)


def _neuron_hops(
    plan: _Plan, hooks: _Hooks, layer: int, neurons: list, gate_limit: Callable[[Tensor], Tensor]
) -> None:
    """Neuron hops: the activation's gate held at its clean value, one neuron kept."""
    view = plan.view
    idx = torch.as_tensor([c for c, _ in neurons])
    solu = view.act_fn == "solu_ln"
    if view.gated:  # act(gate) * up: the gate's input frozen
        hooks.add(view.hook(Site.MLP_PRE, layer), _freeze(plan.mine[idx], plan.clean[idx]))
        plan.edited.add(Site.MLP_PRE)
    else:

        def record_pre(x: Tensor) -> None:
            plan.stash[("pre", layer)] = x.clone()

        hooks.add(view.hook(Site.MLP_PRE, layer), record_pre)
    if solu:  # mid = pre * softmax(pre): the softmax weights frozen (the inner LN's scale too)

        def linear_mid(x: Tensor) -> None:
            pre = plan.stash[("pre", layer)]
            for c, h in neurons:
                b, cl = int(plan.mine[c]), int(plan.clean[c])
                p_new, p_old, m_old = pre[b, h.out], pre[cl, h.out], x[cl, h.out]
                g = _ratio(m_old, p_old, _softmax)
                x[b] = x[cl]
                x[b, h.out] = m_old + g * (p_new - p_old)

        hooks.add(view.hook(Site.SOLU_MID, layer), linear_mid)
        plan.edited.add(Site.SOLU_MID)

    def keep_neuron(x: Tensor) -> None:
        for c, h in neurons:
            b, cl = int(plan.mine[c]), int(plan.clean[c])
            if view.gated or solu:
                new = x[b, h.out, h.index].clone()
            else:  # post = g * pre with g = act(pre)/pre of the clean pass
                pre = plan.stash[("pre", layer)]
                p_new, p_old = pre[b, h.out, h.index], pre[cl, h.out, h.index]
                post = x[cl, h.out, h.index]
                g = _ratio(post, p_old, gate_limit)
                new = post + g * (p_new - p_old)
            x[b] = x[cl]
            x[b, h.out, h.index] = new

    hooks.add(view.hook(Site.MLP_POST, layer), keep_neuron)
    plan.edited.add(Site.MLP_POST)


def _ratio(num: Tensor, den: Tensor, fallback: Callable[[Tensor], Tensor]) -> Tensor:
    """``num / den``, and ``fallback(den)`` where ``den`` is ~0 (as the chained prism does)."""
    tiny = den.abs() <= 1e-12 * (1.0 + num.abs())
    if not bool(tiny.any()):
        return num / den
    return torch.where(
        tiny, fallback(den).to(num.dtype), num / torch.where(tiny, torch.ones_like(den), den)
    )


def _softmax(pre: Tensor) -> Tensor:
    """SoLU's gate ``mid / pre`` where ``pre`` is 0: the softmax weights themselves."""
    return torch.softmax(pre, -1)


# ----------------------------------------------------------------------------- ablations
def _ablation_site(view: ModelView, a: Ablation) -> str:
    return _z_hook(a.layer) if a.kind in ("head", "attn") else view.hook(Site.MLP_POST, a.layer)


def run_ablated(
    view: ModelView,
    tokens: Tensor,
    ablations: Sequence[Ablation],
    attention_mask: Optional[Tensor] = None,
) -> tuple[Tensor, Optional[Tensor]]:
    """Run each ablated copy with nothing frozen (``attention_mask``: the rows' recorded mask).

    Returns:
        The final residual stream ``[N, pos, d]`` and the final norm's scale ``[N, pos]``
        (None when the model has no final norm) of each copy.
    """
    rows = torch.as_tensor([a.row for a in ablations], device=tokens.device)
    hooks = _Hooks()
    edited: set = set()
    for c, a in enumerate(ablations):
        if a.kind == "none":
            continue
        if a.src >= 0:  # one source of a head: v[src, kv(h)] zeroed for head h only
            if view.n_kv_heads != view.n_heads:
                raise UnsupportedModelError(
                    "effects: ablating one source of a head needs the head's own value "
                    "vectors, and this model shares them between heads (grouped-query "
                    "attention); ablate the whole head instead (a Component without src)."
                )

            def zero_v(x: Tensor, c: int = c, a: Ablation = a) -> None:
                x[c, a.src, a.index] = 0.0

            hooks.add(view.hook(Site.V, a.layer), zero_v)
            edited.add(Site.V)
            continue

        def ablate(x: Tensor, c: int = c, a: Ablation = a) -> None:
            sel: Any = (c, slice(None)) if a.index < 0 else (c, slice(None), a.index)
            x[sel] = 0.0 if a.value is None else a.value.to(x.device, x.dtype)

        hooks.add(_ablation_site(view, a), ablate)
        edited.add(_Z if a.kind in ("head", "attn") else Site.MLP_POST)
    _refuse_ignored(view, tokens, edited, "effects")
    out: dict[str, Tensor] = {}
    has_scale = view.final_norm.has_scale
    if has_scale:

        def grab_scale(x: Tensor) -> None:
            out["s"] = x.detach()[..., 0].clone()
            raise _Stop()

        hooks.add(view.hook(Site.FINAL_SCALE), grab_scale)

    def grab(x: Tensor) -> None:
        out["x"] = x.detach().clone()
        if not has_scale:
            raise _Stop()

    hooks.add(view.hook(Site.FINAL_RESID), grab)
    mask = None if attention_mask is None else attention_mask.to(tokens.device)[rows]
    _run(view.model, tokens[rows], hooks, mask)
    return out["x"], out.get("s")


def record(view: ModelView, tokens: Tensor, wanted: Sequence[tuple[str, int]]) -> dict:
    """The activations ablations replace, on ``tokens``: ``(kind, layer) -> [batch, pos, ...]``
    for kinds ``"head"``/``"attn"`` (``z``) and ``"neuron"``/``"mlp"`` (the MLP activation)."""
    names = {
        (kind, layer): _ablation_site(view, Ablation(0, kind, layer)) for kind, layer in wanted
    }
    keep = set(names.values())
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_SCALE_EDIT_WARNING)
        _, cache = view.model.run_with_cache(tokens, names_filter=lambda n: n in keep)
    return {key: cache[name] for key, name in names.items()}
