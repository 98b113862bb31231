"""The graph prism: the exact attribution graph of one logit (SPEC section 11).

Every norm scale, attention pattern and activation ratio is held at what the forward pass
recorded: a neuron's gate ``act(pre)/pre`` (``act(gate)`` for a gated MLP, whose input is
then the linear ``up``), a dictionary feature's gate (1 when active). The model is then
linear in its node activations, and:

* **Nodes** are writes with an activation: the embedding at each position (``@4 embed``),
  neurons ``L3N17@5`` (or the features of transcoders, ``L3F120@5``, and their error at each
  layer and position, ``L3 error@5``), named constants (``L3 b_O``, ``b_U``, ...) and the
  target logit. A neuron's or feature's **input** is its pre-activation (what it reads).
* **Pull-back.** A node reads its input through a direction at its (layer, position); the
  frozen attention layers below carry writes from earlier positions, so that direction pulls
  back to one direction per earlier (layer, position): with ``G`` the read's gradient on the
  residual stream (``[readers, pos, d_model]``), attention layer ``l`` adds
  ``P(w1 * sum_h W_V[kv(h)] sum_q A[h,q,k] W_O[h] Gp[q]) / s1[k]`` at key ``k`` (``Gp`` = ``G``
  through the frozen ``ln1_post`` and the residual multiplier). MLPs do not pass ``G`` on
  (their writes are nodes), except a skip transcoder's linear skip path.
* **Edges.** ``a -> b`` is ``a``'s activation times ``a``'s write dotted with ``b``'s pulled-
  back direction at ``a``'s (layer, position); ``b``'s input is exactly the sum of its
  incoming edges (constants included). One descent through the layers computes the edges into
  a batch of readers (each joins at its own layer).
* **Influence** of a node on the logit: its total effect with every ratio frozen,
  ``activation * d logit / d activation`` in the frozen model where every node passes its
  input on by its ratio: one descent from the logit with MLPs passing ``G`` on. The sources
  (embeddings, errors, constants) have influences that add up to the logit.
* **Pruning.** Neurons/features are ranked by ``|influence|``; the smallest prefix whose
  ``|influence|`` reaches ``node_threshold`` of the total (at most ``max_nodes``) is kept.
  Embeddings, errors and constants are always kept. An edge's **flow** is its weight times
  the reader's gain ``d logit / d input``: a node's incoming flows add up to its influence.
  Edges are ranked by ``|flow|`` and the smallest set reaching ``edge_threshold`` of the
  total is kept; every pruned edge (and every pruned node's edge) goes into the reader's
  ``remainder``, so each kept node's input = its kept incoming edges + remainder, exactly.
* **Heads.** With ``heads=True`` each kept edge is split by the head that carried ``a``'s
  write first (the earliest attention head on the path from ``a``; ``resid`` for the direct
  path): descending, layer ``l``'s heads take over every path that reaches them, so the parts
  add up to the edge.
"""

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from tlprisms._core import arguments as check
from tlprisms._core.errors import ArgumentError, UnsupportedModelError
from tlprisms._core.graph import AttributionGraph, NodeTable
from tlprisms._core.inputs import str_tokens
from tlprisms._core.readout import Recorded, explain, final_readout, target_labels
from tlprisms._core.request import Request
from tlprisms._prisms import features as features_prism
from tlprisms._prisms.chain import activation, frozen_ratio, limit_at_zero
from tlprisms._seam import CacheView, NormSpec, Site
from tlprisms.dictionary import CrossLayerTranscoder, Dictionary

__all__ = [
    "run",
    "check_args",
    "check_nodes",
    "freeze",
    "logit_reader",
    "GRAPH_DEFAULTS",
    "READER_CHUNK_BYTES",
]

#: defaults of ``LogitPrism.graph``
GRAPH_DEFAULTS = {"max_nodes": 500, "node_threshold": 0.8, "edge_threshold": 0.98}
#: the gradients of one chunk of readers (``[readers, pos, d_model]``) stay below this
READER_CHUNK_BYTES = 2**27
#: readers per descent (chunks by position: each reads only positions up to its last)
READER_CHUNK_ROWS = 128
#: with ``heads=True`` the per-head channels of a chunk stay below this
HEAD_CHUNK_BYTES = 2**28


# ----------------------------------------------------------------------------- node sets
@dataclass
class _Set:
    """The nodes of one MLP layer (neurons, or one dictionary's features), at positions < P.

    ``act``, ``inp``, ``ratio`` ``[P, F]``; ``writes`` per output layer ``L`` the write of
    one unit of activation ``[F, d]`` (a CLT's feature writes to every later layer);
    ``read`` ``[d, F]`` the input's direction before ``norm`` (None: read raw); ``consts``
    the input's constant parts by name (``[F]`` each)."""

    kind: str  # "neuron" | "feature"
    layer: int
    ids: np.ndarray  # [F] neuron / feature index of each column
    act: Tensor
    inp: Tensor
    ratio: Tensor
    writes: dict
    read: Tensor
    norm: Optional[NormSpec]
    inv: Tensor  # [P] 1/scale of ``norm`` (ones when raw)
    consts: list
    post: bool  # the write passes ln2_post and the residual multiplier (neurons)
    skip: Optional[Tensor] = None  # [d, d] a transcoder's skip (x_in @ W_skip)
    #: a constant added to every activation after the gate (HookedTransformer's gated MLP
    #: adds ``b_in`` after the product): a constant write, not part of any node
    out_bias: Optional[Tensor] = None


@dataclass
class _Layer:
    A: Tensor  # [H, P, P]
    W_O: Tensor  # [H, dh, d]
    W_V: Tensor  # [G, d, dh]
    b_O: Tensor
    b_V: Tensor  # [G, dh]
    ln1: NormSpec
    inv1: Tensor  # [P]
    post1: Optional[NormSpec]
    inv_post1: Tensor
    post2: Optional[NormSpec]
    inv_post2: Tensor
    rs: float
    b_out: Optional[Tensor]
    ln2: Optional[NormSpec]
    inv2: Tensor


@dataclass
class _Frozen:
    """Everything the descents read, for one batch row and positions ``0 .. P-1``."""

    cv: CacheView
    P: int
    layers: list
    sets: list  # _Set, in layer order
    errors: dict  # output layer -> [P, d] error, and "b_dec" per output layer
    b_dec: dict
    embed: Tensor  # [P, d]


def check_nodes(view: Any, nodes: Any, caller: str) -> list:
    """``nodes`` as a list of dictionaries (empty: neurons), checked against the model."""
    if isinstance(nodes, str):
        check.choice(nodes, "nodes", ("neurons",), caller)
        return []  # an attention-only model has no neurons: its graph is embeddings only
    dicts = features_prism.check_dictionaries(view, nodes, caller)
    for d in dicts:
        if isinstance(d, Dictionary) and not d.transcoder:
            raise ArgumentError(
                f"{caller}: dictionary {d.name} at {d.hook!r} is an SAE: it re-expresses a "
                "site, so its features' inputs are not linear in earlier nodes. An "
                "attribution graph needs transcoders (they replace the MLPs) or "
                "nodes='neurons'."
            )
    return dicts


def check_args(
    view: Any,
    batch: int,
    pos: Any,
    nodes: Any,
    max_nodes: Any,
    node_threshold: Any,
    edge_threshold: Any,
    heads: Any,
    qk: Any,
    row: Any,
    caller: str,
) -> tuple[int, list, int, float, float, bool, int]:
    """The checked arguments of ``LogitPrism.graph`` after the target and position: ``(row,
    dictionaries, max_nodes, node_threshold, edge_threshold, heads, qk)``."""
    dictionaries = check_nodes(view, nodes, caller)
    if not check.is_index(pos):
        raise ArgumentError(
            f"{caller}: pos={pos!r}; a graph explains one position: pass an int (e.g. -1, "
            "the last), and call graph once per position."
        )
    max_nodes = check.count(max_nodes, "max_nodes", caller)
    thresholds = []
    for value, what in ((node_threshold, "node_threshold"), (edge_threshold, "edge_threshold")):
        x = check.real(value, what, caller)
        if not 0.0 < x <= 1.0:
            raise ArgumentError(
                f"{caller}: {what}={value!r}; pass a fraction in (0, 1] (the share of the "
                "total |influence| or |flow| the kept set must reach)."
            )
        thresholds.append(x)
    if not isinstance(heads, bool):
        raise ArgumentError(f"{caller}: heads={heads!r}; pass True or False.")
    qk = check.count(qk, "qk", caller, minimum=0)
    if row is None:
        if batch != 1:
            raise ArgumentError(
                f"{caller}: this prism holds {batch} prompts and a graph explains one; pass "
                "row=i (the batch row)."
            )
        row = 0
    else:
        row = check.in_range(
            row, batch, "row", caller, ArgumentError, negative=True, of=f" for a batch of {batch}"
        )
    return row, dictionaries, max_nodes, thresholds[0], thresholds[1], heads, qk


def _inv(cv: CacheView, norm: Optional[NormSpec], b: int, P: int) -> Tensor:
    pos = torch.arange(P, device=cv.device)[None]
    inv = cv.inv_scale(norm, pos.expand(cv.batch, P))
    if inv is None:
        return torch.ones(P, dtype=cv.dtype, device=cv.device)
    return inv[b]


def _neurons(cv: CacheView, layer: int, b: int, P: int, ln2: Any, inv2: Tensor) -> _Set:
    view, dtype = cv.view, cv.dtype
    if str(view.act_fn) == "solu_ln":
        raise UnsupportedModelError(
            "LogitPrism.graph: SoLU mixes every neuron's pre-activation through a softmax, so "
            "a neuron's input is not one read of the stream; graphs of SoLU models are not "
            "supported (use chains: through_neuron)."
        )
    post = cv.get(Site.MLP_POST, layer)[b, :P].to(dtype)
    pre = cv.get(Site.MLP_PRE, layer)[b, :P].to(dtype)
    name = str(view.act_fn)
    b_in = view.b_in(layer, dtype, cv.device)
    out_bias = None
    if view.gated_bias_after_product:  # act(gate) * up + b_in: b_in is a constant write
        out_bias = b_in
        post = post - b_in
        b_in = torch.zeros_like(b_in)
    if view.gated:
        inp = cv.get(Site.MLP_PRE_LINEAR, layer)[b, :P].to(dtype)
        # where the input is ~0 the gate is act(gate), read from the gate itself
        ratio = frozen_ratio(post, inp, lambda: activation(name, pre))
    else:
        inp = pre
        ratio = frozen_ratio(post, pre, lambda: limit_at_zero(name, pre))
    W_in = view.W_in(layer, dtype).to(cv.device)
    consts = [(("b_in", layer), b_in)]
    if ln2.bias is not None:
        consts.append((("ln2.b", layer), ln2.bias.to(cv.device, dtype) @ W_in))
    return _Set(
        kind="neuron",
        layer=layer,
        ids=np.arange(post.shape[1]),
        act=post,
        inp=inp,
        ratio=ratio,
        writes={layer: view.W_out(layer, dtype).to(cv.device)},
        read=W_in,
        norm=ln2,
        inv=inv2,
        consts=consts,
        post=True,
        out_bias=out_bias,
    )


def _dictionary_set(cv: CacheView, d: Dictionary, b: int, P: int, ln2: Any, inv2: Tensor) -> tuple:
    """(the features of transcoder ``d`` active at positions < P, its error ``[P, d]``)."""
    dtype, dev = cv.dtype, cv.device
    pos = torch.arange(P, device=dev)[None].expand(cv.batch, P)
    x_in = features_prism.dictionary_input(cv, d, pos, dtype)[b]  # [P, d_in]
    pre = d.pre_activations(x_in.to(d.W_enc.device)).to(dev)
    acts = d.activate(pre)
    active = (acts != 0).any(0).nonzero()[:, 0]
    W_enc = d.W_enc.to(dev, dtype)[:, active] * d.input_scale
    W_dec = d.W_dec.to(dev, dtype)[active] / d.input_scale
    b_dec = d.b_dec.to(dev, dtype) / d.input_scale
    recon = acts[:, active] @ W_dec + b_dec
    skip = None
    if d.W_skip is not None:
        skip = d.W_skip.to(dev, dtype)
        recon = recon + x_in @ skip
    out = cv.get(Site.MLP_OUT, d.layer)[b, :P].to(dtype)
    normed = d.input_site is Site.LN2_NORMALIZED
    enc_const = d.b_enc.to(dev, dtype)[active]
    if d.subtract_b_dec:
        enc_const = enc_const - (d.b_dec.to(dev, dtype) @ d.W_enc.to(dev, dtype))[active]
    consts = [(("b_enc", d.layer), enc_const)]
    if normed and ln2.bias is not None:
        consts.append((("ln2.b", d.layer), ln2.bias.to(dev, dtype) @ W_enc))
    a = acts[:, active]
    s = _Set(
        kind="feature",
        layer=d.layer,
        ids=active.cpu().numpy(),
        act=a,
        inp=pre[:, active],
        ratio=(a != 0).to(dtype),
        writes={d.layer: W_dec},
        read=W_enc,
        norm=ln2 if normed else None,
        inv=inv2 if normed else torch.ones_like(inv2),
        consts=consts,
        post=False,
        skip=skip,
    )
    return s, out - recon, b_dec


def _clt_sets(cv: CacheView, clt: CrossLayerTranscoder, b: int, P: int, fz_layers: list) -> tuple:
    dtype, dev = cv.dtype, cv.device
    n = clt.n_layers
    pos = torch.arange(P, device=dev)[None].expand(cv.batch, P)
    sets, rest = [], {L: cv.get(Site.MLP_OUT, L)[b, :P].to(dtype) for L in range(n)}
    b_dec = {L: clt.b_dec[L].to(dev, dtype) for L in range(n)}
    normed = clt.input_site is Site.LN2_NORMALIZED
    for l in range(n):
        x_in = features_prism.site_input(cv, clt.input_site, l, pos, dtype)[b]
        acts = clt.encode(l, x_in)
        active = (acts != 0).any(0).nonzero()[:, 0]
        W_dec = clt.decoder(l, n - l, active.cpu()).to(dev, dtype)  # [F, n - l, d]
        W = clt.W_enc[l].to(dev, dtype)[active].T  # [d, F]
        a = acts[:, active]
        writes = {l + j: W_dec[:, j] for j in range(n - l)}
        for L, Wj in writes.items():
            rest[L] = rest[L] - a @ Wj
        ln2 = fz_layers[l].ln2
        consts = [(("b_enc", l), clt.b_enc[l].to(dev, dtype)[active])]
        if normed and ln2 is not None and ln2.bias is not None:
            consts.append((("ln2.b", l), ln2.bias.to(dev, dtype) @ W))
        pre = x_in @ W + clt.b_enc[l].to(dev, dtype)[active]
        sets.append(
            _Set(
                kind="feature",
                layer=l,
                ids=active.cpu().numpy(),
                act=a,
                inp=pre,
                ratio=(a != 0).to(dtype),
                writes=writes,
                read=W,
                norm=ln2 if normed else None,
                inv=fz_layers[l].inv2 if normed else torch.ones(P, dtype=dtype, device=dev),
                consts=consts,
                post=False,
            )
        )
    errors = {L: rest[L] - b_dec[L] for L in range(n)}
    return sets, errors, b_dec


def freeze(rec: Recorded, b: int, P: int, dictionaries: list) -> _Frozen:
    """Read everything the descents need for batch row ``b`` at positions < ``P``."""
    cv = rec.cache
    view, dtype, dev = cv.view, cv.dtype, cv.device
    layers = []
    for l in range(view.n_layers):
        A = cv.get(Site.PATTERN, l)[b, :, :P, :P].to(dtype)
        post1, post2 = view.ln1_post[l], view.ln2_post[l]
        mlp = not view.attn_only
        rs = view.residual_scale(l)
        layers.append(
            _Layer(
                A=A,
                W_O=view.W_O(l, dtype).to(dev),
                W_V=view.W_V(l, dtype).to(dev),
                b_O=view.b_O(l, dtype, dev),
                b_V=view.b_V(l, dtype, dev),
                ln1=view.ln1[l],
                inv1=_inv(cv, view.ln1[l], b, P),
                post1=post1,
                inv_post1=_inv(cv, post1, b, P),
                post2=post2,
                inv_post2=_inv(cv, post2, b, P),
                rs=1.0 if rs is None else rs,
                b_out=view.b_out(l, dtype, dev) if mlp else None,
                ln2=view.ln2[l] if mlp else None,
                inv2=_inv(cv, view.ln2[l], b, P) if mlp else torch.ones(P, dtype=dtype),
            )
        )
    sets: list = []
    errors: dict = {}
    b_dec: dict = {}
    if dictionaries and isinstance(dictionaries[0], CrossLayerTranscoder):
        sets, errors, b_dec = _clt_sets(cv, dictionaries[0], b, P, layers)
    else:
        by_layer = {d.layer: d for d in dictionaries}
        for l in range(view.n_layers if not view.attn_only else 0):
            L = layers[l]
            if l in by_layer:
                s, err, bd = _dictionary_set(cv, by_layer[l], b, P, L.ln2, L.inv2)
                sets.append(s)
                errors[l], b_dec[l] = err, bd
            else:
                sets.append(_neurons(cv, l, b, P, L.ln2, L.inv2))
    pos = torch.arange(P, device=dev)[None].expand(cv.batch, P)
    embed = cv.embed_write(pos, dtype)[b]
    if view.pos_embed_in_resid:
        embed = embed + cv.at(Site.POS_EMBED, None, pos, dtype)[b]
    return _Frozen(cv, P, layers, sets, errors, b_dec, embed)


# ----------------------------------------------------------------------------- descents
@dataclass
class _Readers:
    """Reads to pull back: each joins the descent at ``key`` (``2l + 1``: the stream after
    block ``l``; ``2l``: block ``l``'s attention output added, its MLP not; -1: the
    embeddings) at position ``pos`` with direction ``G0 [R, d]``; ``consts`` the constant
    parts of each read by name (``[R]``)."""

    key: np.ndarray
    pos: np.ndarray
    G0: Tensor
    consts: dict

    def __len__(self) -> int:
        return len(self.key)

    def take(self, rows: np.ndarray) -> "_Readers":
        t = torch.as_tensor(rows, device=self.G0.device)
        return _Readers(
            self.key[rows], self.pos[rows], self.G0[t], {k: v[t] for k, v in self.consts.items()}
        )


@dataclass
class _Out:
    """What one descent found, per reader row: the edges from the embeddings ``[R, P]``, the
    errors (per output layer ``[R, P]``), the constants (by name ``[R]``), the MLP nodes
    (per set: ``[R, P, F]`` gradients, or ``[R, K]`` kept edges) and the MLP nodes' total."""

    embed: Tensor
    errors: dict
    consts: dict
    nodes: dict
    mlp_total: Tensor


class _Descent:
    """One descent of the frozen linear model for a batch of readers.

    ``mode``: ``"influence"`` (MLP nodes pass the gradient on by their ratio; ``nodes``
    holds ``d read / d activation`` of every node) or ``"edges"`` (MLP nodes stop it;
    ``nodes`` holds the edges from the kept nodes ``keep[set] = (pos, col)``).
    ``channels``: with C > 1 every reader row is split into C channels (1 + n_layers *
    n_heads): the direct path and each head as the earliest on the path (``heads=True``).

    Readers join at their own layer: they are sorted by where they join (latest first), so
    the rows a layer works on are a prefix that grows; and only positions up to the last
    reader's are read (causal attention: nothing later reaches them).
    """

    def __init__(self, fz: _Frozen, mode: str, keep: Optional[dict] = None, channels: int = 1):
        self.fz, self.mode, self.keep, self.C = fz, mode, keep or {}, channels
        #: with a layer here, :meth:`run` keeps the stream's gradient entering that layer's
        #: attention step in ``captured``
        self.capture: Optional[int] = None
        self.captured: Optional[Tensor] = None
        view = fz.cv.view
        self.parallel = bool(view.parallel)
        self.H = view.n_heads
        self.rep = view.n_heads // view.n_kv_heads
        self.sets_at = {s.layer: i for i, s in enumerate(fz.sets)}
        self.writers_to: dict = {}
        for i, s in enumerate(fz.sets):
            for L in s.writes:
                self.writers_to.setdefault(L, []).append(i)
        self.Pe = fz.P

    def run(self, readers: _Readers) -> _Out:
        """The descent for ``readers`` (their rows' results in their order)."""
        fz, C = self.fz, self.C
        order = np.argsort(-readers.key, kind="stable")
        back = np.empty_like(order)
        back[order] = np.arange(len(order))
        readers = readers.take(order)
        self.Pe = Pe = int(readers.pos.max()) + 1
        dev, dtype = fz.cv.device, fz.cv.dtype
        d = fz.embed.shape[-1]
        R = len(readers)
        G = torch.zeros(R * C, Pe, d, dtype=dtype, device=dev)
        consts: dict = {}
        for name, v in readers.consts.items():  # a read's own constants
            consts[name] = self._rows(v)
        errors: dict = {}
        nodes: dict = {}
        mlp_total = torch.zeros(R * C, dtype=dtype, device=dev)
        self.n = 0  # rows joined so far (a prefix: readers are sorted by where they join)

        def join(key: int) -> None:
            stop = self.n + int((readers.key[self.n :] == key).sum())
            if stop > self.n:
                t = torch.arange(self.n, stop, device=dev)
                p = torch.as_tensor(readers.pos[self.n : stop], device=dev)
                G[t * C, p] += readers.G0[self.n : stop]  # the direct channel (0)
                self.n = stop

        def add(name: tuple, v: Tensor) -> None:
            full = torch.zeros(R * C, dtype=v.dtype, device=v.device)
            full[: v.shape[0]] = v
            consts[name] = consts[name] + full if name in consts else full

        for l in range(len(fz.layers) - 1, -1, -1):
            join(2 * l + 1)
            if self.n:
                Ga = G[: self.n * C]
                if self.writers_to.get(l):
                    mlp_total[: self.n * C] += self._writes(l, Ga, errors, nodes, add, R * C)
                passed = self._passthrough(l, Ga, nodes, add)
                if not self.parallel and passed is not None:
                    Ga += passed
                    passed = None
            else:
                passed = None
            if not self.parallel:
                join(2 * l)
            if self.capture == l:
                self.captured = G[: self.n * C].clone()
            if self.n:
                Ga = G[: self.n * C]
                attn = self._attention(l, fz.layers[l], Ga, add)
                Ga += attn
                if passed is not None:
                    Ga += passed
        join(-1)
        embed = torch.einsum("rpd,pd->rp", G, fz.embed[:Pe])
        out = _Out(embed, errors, consts, nodes, mlp_total)
        return self._reorder(out, back, Pe)

    def _reorder(self, out: _Out, back: np.ndarray, Pe: int) -> _Out:
        """The results in the readers' own order, positions padded back to ``P``."""
        C, P = self.C, self.fz.P
        rows = torch.as_tensor((back[:, None] * C + np.arange(C)[None]).reshape(-1))

        def pad(t: Tensor) -> Tensor:
            if t.shape[-1] == P:
                return t
            z = torch.zeros(*t.shape[:-1], P, dtype=t.dtype, device=t.device)
            z[..., : t.shape[-1]] = t
            return z

        rows = rows.to(out.embed.device)
        nodes = {}
        for i, v in out.nodes.items():
            if self.mode == "influence":  # [R, Pe, F] -> [R, P, F]
                z = torch.zeros(v.shape[0], P, v.shape[2], dtype=v.dtype, device=v.device)
                z[:, : v.shape[1]] = v
                v = z
            nodes[i] = v[rows]
        return _Out(
            pad(out.embed)[rows],
            {L: pad(v)[rows] for L, v in out.errors.items()},
            {k: v[rows] for k, v in out.consts.items()},
            nodes,
            out.mlp_total[rows],
        )

    def _rows(self, v: Tensor) -> Tensor:
        """A per-reader value on the direct channel of each reader row."""
        if self.C == 1:
            return v
        out = torch.zeros(v.shape[0] * self.C, *v.shape[1:], dtype=v.dtype, device=v.device)
        out[:: self.C] = v
        return out

    def _writes(
        self, L: int, G: Tensor, errors: dict, nodes: dict, add: Any, n_rows: int
    ) -> Tensor:
        """The MLP writes into the stream after block ``L`` (``G``: the joined rows): node
        edges / gradients, the biases, the errors; returns each row's total over the nodes."""
        fz, Pe = self.fz, self.Pe
        lay = fz.layers[L]
        n = G.shape[0]
        total = torch.zeros(n, dtype=G.dtype, device=G.device)
        Gpost = None
        for i in self.writers_to[L]:
            s = fz.sets[i]
            if s.post:
                if Gpost is None:
                    Gpost = G if lay.post2 is None else lay.post2.pull_back(G)
                    Gpost = Gpost * (lay.inv_post2[:Pe, None] * lay.rs)
                Gw = Gpost
            else:
                Gw = G
            W = s.writes[L]  # [F, d]
            act = s.act[:Pe]
            recon = act @ W  # [Pe, d]
            total += Gw.reshape(n, -1) @ recon.reshape(-1)
            if s.out_bias is not None:
                add(("b_in", L), Gw.sum(1) @ (s.out_bias @ W))
            if self.mode == "influence":
                g = (Gw.reshape(-1, Gw.shape[-1]) @ W.T).view(n, Pe, -1)
                if i in nodes:
                    nodes[i][:n] += g
                else:
                    nodes[i] = torch.zeros(n_rows, Pe, W.shape[0], dtype=g.dtype, device=g.device)
                    nodes[i][:n] = g
            elif i in self.keep:
                pos, col = self.keep[i]
                if i not in nodes:
                    nodes[i] = torch.zeros(n_rows, len(pos), dtype=G.dtype, device=G.device)
                inside = (pos < Pe).nonzero()[:, 0]
                if len(inside):
                    p, c = pos[inside], col[inside]
                    e = torch.einsum("rkd,kd->rk", Gw[:, p], W[c]) * s.act[p, c]
                    nodes[i][:n, inside] += e
        if L in self.sets_at and fz.sets[self.sets_at[L]].post:
            if Gpost is None:
                Gpost = G if lay.post2 is None else lay.post2.pull_back(G)
                Gpost = Gpost * (lay.inv_post2[:Pe, None] * lay.rs)
            add(("b_out", L), Gpost.sum(1) @ lay.b_out)
            if lay.post2 is not None and lay.post2.bias is not None:
                add(("ln2_post.b", L), lay.rs * (G.sum(1) @ lay.post2.bias.to(G)))
        if L in fz.b_dec:
            add(("b_dec", L), G.sum(1) @ fz.b_dec[L])
            err = torch.einsum("rpd,pd->rp", G, fz.errors[L][:Pe])
            full = torch.zeros(n_rows, Pe, dtype=G.dtype, device=G.device)
            full[:n] = err
            errors[L] = errors[L] + full if L in errors else full
        return total

    def _passthrough(self, l: int, G: Tensor, nodes: dict, add: Any) -> Optional[Tensor]:
        """What the MLP of block ``l`` passes back on: every node by its ratio (influence
        mode), a transcoder's linear skip (both modes); None when nothing."""
        if l not in self.sets_at:
            return None
        Pe, n = self.Pe, G.shape[0]
        s = self.fz.sets[self.sets_at[l]]
        x = None
        if self.mode == "influence" and self.sets_at[l] in nodes:
            gin = s.ratio[:Pe] * nodes[self.sets_at[l]][:n]  # d read / d input
            for name, vec in s.consts:
                add(name, gin.sum(1) @ vec)
            x = gin @ s.read.T  # [R, Pe, d]
        if s.skip is not None:
            y = G @ s.skip.T
            x = y if x is None else x + y
            if s.norm is not None and s.norm.bias is not None:
                add(("ln2.b", l), y.sum(1) @ s.norm.bias.to(y))
        if x is None:
            return None
        if s.norm is not None:
            x = s.norm.pull_back(x)
        return x * s.inv[:Pe, None]

    def _attention(self, l: int, lay: _Layer, G: Tensor, add: Any) -> Tensor:
        """What attention layer ``l`` (patterns and scales frozen) passes back to the stream
        it reads, from ``G`` on the stream it writes; its constants recorded."""
        C, Pe = self.C, self.Pe
        Gt = G if C == 1 else G.view(-1, C, *G.shape[1:]).sum(1)  # the total per reader
        R = Gt.shape[0]
        Gp = Gt if lay.post1 is None else lay.post1.pull_back(Gt)
        Gp = Gp * (lay.inv_post1[:Pe, None] * lay.rs)
        rows = torch.arange(R, device=G.device) * C
        add(("b_O", l), self._spread(Gp.sum(1) @ lay.b_O, rows))
        if lay.post1 is not None and lay.post1.bias is not None:
            add(("ln1_post.b", l), self._spread(lay.rs * (Gt.sum(1) @ lay.post1.bias.to(Gt)), rows))
        H, dh, d = lay.W_O.shape
        # [R*Pe, d] @ [d, H*dh]: every head's W_O at once
        gz = (Gp.reshape(-1, d) @ lay.W_O.permute(2, 0, 1).reshape(d, H * dh)).view(R, Pe, H, dh)
        # sum over queries with each head's pattern: one batched matmul over heads
        A = lay.A[:, :Pe, :Pe]  # [H, q, k]
        gq = gz.permute(2, 1, 0, 3).reshape(H, Pe, R * dh)  # [H, q, R*dh]
        gv = torch.bmm(A.transpose(1, 2), gq).view(H, Pe, R, dh)  # [H, k, R, dh]
        G_kv = H // self.rep
        gvg = gv.view(G_kv, self.rep, Pe, R, dh).sum(1)  # [G, k, R, dh]
        add(("b_V", l), self._spread(torch.einsum("gkre,ge->r", gvg, lay.b_V), rows))
        # [R*k, G*dh] @ [G*dh, d]
        flat = gvg.permute(2, 1, 0, 3).reshape(R * Pe, G_kv * dh)
        gx = (flat @ lay.W_V.permute(0, 2, 1).reshape(G_kv * dh, d)).view(R, Pe, d)
        if lay.ln1.bias is not None:
            add(("ln1.b", l), self._spread(gx.sum(1) @ lay.ln1.bias.to(gx), rows))
        if C == 1:
            return lay.ln1.pull_back(gx) * lay.inv1[:Pe, None]
        W_Vh = lay.W_V.repeat_interleave(self.rep, 0)  # [H, d, dh]
        per = torch.einsum("hkre,hde->rhkd", gv, W_Vh)
        per = lay.ln1.pull_back(per) * lay.inv1[:Pe, None]
        out = torch.zeros_like(G).view(R, C, Pe, -1)
        out[:, 1 + l * H : 1 + (l + 1) * H] = per
        return out.view(R * C, Pe, -1)

    def _spread(self, v: Tensor, rows: Tensor) -> Tensor:
        """A per-reader constant (``[R]``) on the direct channel of each row."""
        if self.C == 1:
            return v
        out = torch.zeros(v.shape[0] * self.C, dtype=v.dtype, device=v.device)
        out[rows] = v
        return out


# ----------------------------------------------------------------------------- the graph
def _chunks(n: int, per: int) -> list:
    per = max(1, per)
    return [np.arange(a, min(n, a + per)) for a in range(0, n, per)]


def _predicted(rec: Recorded, pos: int, row: int) -> int:
    """The token the model predicts at ``pos`` of ``row`` (from its logits)."""
    if rec.logits is None:
        raise ArgumentError(
            "LogitPrism.graph: no target given and this prism has no logits to read the "
            "prediction from; pass target= (a token), or make the prism with "
            "LogitPrism.run(model, text) / LogitPrism(model, cache, logits=...)."
        )
    return int(rec.logits[row, pos].argmax())


def logit_reader(rec: Recorded, request: Request, row: int) -> tuple:
    """(readers of the target's logit, its position, its value, explains, label)."""
    cv = rec.cache
    if request.target is None:  # the model's own prediction at that position
        request = request.with_(target=_predicted(rec, request.pos, row))
    fr = final_readout(rec, request.target, request.pos)
    ex = explain(rec, fr, request.softcap)
    if ex.weights.shape[2] != 1:
        raise ArgumentError(
            f"LogitPrism.graph: target={request.target!r} names {ex.weights.shape[2]} targets; "
            "a graph explains one (a token, a LogitDiff or a Direction): call graph once per "
            "target."
        )
    r = fr.readout
    w = ex.weights[row, 0, 0]  # [a]
    u = r.u[min(row, r.u.shape[0] - 1), 0]  # [a, d]
    G0 = (w[:, None] * u).sum(0) * r.inv_s[row, 0]
    bias = fr.bias[min(row, fr.bias.shape[0] - 1), 0]
    nbias = fr.norm_bias[min(row, fr.norm_bias.shape[0] - 1), 0]
    consts = {("b_U",): (w * bias).sum()[None], ("ln_final.b",): (w * nbias).sum()[None]}
    p = int(r.positions[row, 0])
    n = cv.view.n_layers
    readers = _Readers(np.asarray([2 * n - 1]), np.asarray([p]), G0[None], consts)
    labels = target_labels(fr, cv.batch, 1, 1)
    label = str(labels[min(row, labels.shape[0] - 1), 0, 0])
    return readers, p, float(ex.values[row, 0, 0]), ex.explains, label


def _const_label(name: tuple) -> str:
    if len(name) == 1:
        return name[0]
    return f"L{name[1]} {name[0]}"


def _reader_of(fz: _Frozen, i: int, pos: np.ndarray, col: np.ndarray, parallel: bool) -> _Readers:
    s = fz.sets[i]
    d = s.read.T[col]  # [K, d]
    if s.norm is not None:
        d = s.norm.pull_back(d)
    G0 = d * s.inv[torch.as_tensor(pos, device=d.device)][:, None]
    key = (2 * s.layer - 1) if parallel else 2 * s.layer
    consts = {name: vec[col] for name, vec in s.consts}
    return _Readers(np.full(len(pos), key), pos, G0, consts)


def _cat_readers(parts: list) -> _Readers:
    names = sorted({k for p in parts for k in p.consts}, key=str)
    consts = {}
    for nme in names:
        consts[nme] = torch.cat(
            [
                p.consts.get(nme, torch.zeros(len(p), dtype=p.G0.dtype, device=p.G0.device))
                for p in parts
            ]
        )
    return _Readers(
        np.concatenate([p.key for p in parts]),
        np.concatenate([p.pos for p in parts]),
        torch.cat([p.G0 for p in parts]),
        consts,
    )


def run(
    rec: Recorded,
    request: Request,
    row: int,
    dictionaries: list,
    max_nodes: int,
    node_threshold: float,
    edge_threshold: float,
    heads: bool,
    qk_n: int,
    qk_explain: Any,
) -> AttributionGraph:
    """The attribution graph of ``request.target`` at ``request.pos`` of batch row ``row``
    (the model's prediction there when the target is None)."""
    if request.target is None:
        request = request.with_(target=_predicted(rec, request.pos, row))
    cv = rec.cache
    view = cv.view
    logit_r, p, logit, explains, target_label = logit_reader(rec, request, row)
    P = p + 1
    fz = freeze(rec, row, P, dictionaries)
    dev, dtype = cv.device, cv.dtype
    parallel = bool(view.parallel)
    # 1. influence: one descent from the logit, every node passing its input on
    inf = _Descent(fz, "influence").run(logit_r)
    grads = {
        i: inf.nodes.get(i, torch.zeros(1, P, s.act.shape[1], dtype=dtype, device=dev))[0]
        for i, s in enumerate(fz.sets)
    }
    # 2. node selection by |influence|
    cand_set, cand_pos, cand_col, cand_inf = [], [], [], []
    for i, s in enumerate(fz.sets):
        infl = s.act * grads[i]
        nz = (s.act != 0).nonzero()
        cand_set.append(np.full(len(nz), i))
        cand_pos.append(nz[:, 0].cpu().numpy())
        cand_col.append(nz[:, 1].cpu().numpy())
        cand_inf.append(infl[nz[:, 0], nz[:, 1]].double().cpu().numpy())
    cs = np.concatenate(cand_set) if cand_set else np.zeros(0, np.int64)
    cp = np.concatenate(cand_pos) if cand_pos else np.zeros(0, np.int64)
    cc = np.concatenate(cand_col) if cand_col else np.zeros(0, np.int64)
    ci = np.concatenate(cand_inf) if cand_inf else np.zeros(0)
    order = np.argsort(-np.abs(ci), kind="stable")
    mass = np.cumsum(np.abs(ci[order]))
    total = mass[-1] if len(mass) else 0.0
    n_keep = (
        0 if total == 0 else int(np.searchsorted(mass, node_threshold * total, side="left")) + 1
    )
    n_keep = min(n_keep, max_nodes, len(order))
    kept = np.sort(order[:n_keep])  # in set, position, column order
    keep: dict = {}
    for i in range(len(fz.sets)):
        sel = kept[cs[kept] == i]
        keep[i] = (torch.as_tensor(cp[sel], device=dev), torch.as_tensor(cc[sel], device=dev))
    # 3. edges into the kept nodes and the logit
    parts = [
        _reader_of(fz, i, cp[kept[cs[kept] == i]], cc[kept[cs[kept] == i]], parallel)
        for i in range(len(fz.sets))
        if int((cs[kept] == i).sum())
    ]
    readers = _cat_readers(parts + [logit_r])
    d = fz.embed.shape[-1]
    per = min(READER_CHUNK_ROWS, READER_CHUNK_BYTES // max(1, P * d * fz.embed.element_size()))
    # chunks of readers by position: a chunk reads only the positions up to its last one
    by_pos = np.argsort(readers.pos, kind="stable")
    chunks = [by_pos[c] for c in _chunks(len(readers), per)]
    outs = [_Descent(fz, "edges", keep).run(readers.take(rows)) for rows in chunks]
    # the first descent's constants fix the constants' order (the logit's come last)
    const_names: list = []
    for o in [inf] + outs:
        for name in o.consts:
            if name not in const_names:
                const_names.append(name)
    err_layers = sorted(fz.errors)
    R = len(readers)
    W_embed, W_err, W_const = P, P * len(err_layers), len(const_names)
    set_sizes = [len(keep[i][0]) for i in range(len(fz.sets))]
    W = W_embed + W_err + W_const + sum(set_sizes)
    E = torch.zeros(R, W, dtype=torch.float64)
    mlp_total = torch.zeros(R, dtype=torch.float64)
    for rows, o in zip(chunks, outs):
        sl = torch.as_tensor(rows)
        E[sl, :P] = o.embed.double().cpu()
        for k, L in enumerate(err_layers):
            if L in o.errors:
                E[sl, P + k * P : P + (k + 1) * P] = o.errors[L].double().cpu()
        sl = sl[:, None]
        for k, name in enumerate(const_names):
            if name in o.consts:
                E[sl[:, 0], W_embed + W_err + k] = o.consts[name].double().cpu()
        off = W_embed + W_err + W_const
        for i, size in enumerate(set_sizes):
            if size and i in o.nodes:
                E[sl, torch.arange(off, off + size)] = o.nodes[i].double().cpu()
            off += size
        mlp_total[sl[:, 0]] = o.mlp_total.double().cpu()
    kept_mlp = E[:, W_embed + W_err + W_const :].sum(1)
    remainder = (mlp_total - kept_mlp).numpy()
    # 4. the node table
    n_kept = int(sum(set_sizes))
    N = W + 1
    kinds = ["embed"] * P + ["error"] * W_err + ["const"] * W_const
    layer = (
        [-1] * P
        + [L for L in err_layers for _ in range(P)]
        + [(n[1] if len(n) > 1 else -1) for n in const_names]
    )
    pos = list(range(P)) + [j for _ in err_layers for j in range(P)] + [-1] * W_const
    tokens = rec.tokens[row, :P].tolist() if rec.tokens is not None else [-1] * P
    index = tokens + [-1] * (W_err + W_const)
    labels = [f"@{j} embed" for j in range(P)] + [
        f"L{L} error@{j}" for L in err_layers for j in range(P)
    ]
    labels += [_const_label(nm) for nm in const_names]
    act = [np.nan] * (P + W_err + W_const)
    inp = [np.nan] * (P + W_err + W_const)
    infl = list(inf.embed[0].double().cpu().numpy())
    for L in err_layers:
        infl += list(inf.errors[L][0].double().cpu().numpy()) if L in inf.errors else [0.0] * P
    infl += [float(inf.consts[nm][0]) if nm in inf.consts else 0.0 for nm in const_names]
    gain = [np.nan] * (P + W_err + W_const)
    reader_gain = []
    for i, s in enumerate(fz.sets):
        pp, col = keep[i]
        if not len(pp):
            continue
        kinds += [s.kind] * len(pp)
        layer += [s.layer] * len(pp)
        pn, cn = pp.cpu().numpy(), col.cpu().numpy()
        pos += list(pn)
        ids = s.ids[cn]
        index += list(ids)
        letter = "N" if s.kind == "neuron" else "F"
        labels += [f"L{s.layer}{letter}{int(f)}@{int(j)}" for f, j in zip(ids, pn)]
        act += list(s.act[pp, col].double().cpu().numpy())
        inp += list(s.inp[pp, col].double().cpu().numpy())
        infl += list((s.act * grads[i])[pp, col].double().cpu().numpy())
        g = (s.ratio * grads[i])[pp, col].double().cpu().numpy()
        gain += list(g)
        reader_gain += list(g)
    kinds.append("logit")
    layer.append(view.n_layers)
    pos.append(p)
    index.append(int(request_token(rec, request, row)))
    labels.append(f"logit {target_label}@{p}")
    act.append(np.nan)
    inp.append(logit)
    infl.append(logit)
    gain.append(1.0)
    reader_gain.append(1.0)
    rem_all = np.zeros(N)
    reader_rows = np.arange(W_embed + W_err + W_const, N)  # kept MLP nodes, then the logit
    # 5. edge pruning by |flow|
    Ed = E.numpy()
    rg = np.asarray(reader_gain)
    nzr, nzc = np.nonzero(Ed)
    wts = Ed[nzr, nzc]
    flows = wts * rg[nzr]
    order = np.argsort(-np.abs(flows), kind="stable")
    fmass = np.cumsum(np.abs(flows[order]))
    ftot = fmass[-1] if len(fmass) else 0.0
    n_e = (
        0
        if ftot == 0
        else min(len(order), int(np.searchsorted(fmass, edge_threshold * ftot, side="left")) + 1)
    )
    keep_e = np.zeros(len(order), dtype=bool)
    keep_e[order[:n_e]] = True
    pruned = np.zeros(R)
    np.add.at(pruned, nzr[~keep_e], wts[~keep_e])
    rem_all[reader_rows] = remainder + pruned
    src = nzc[keep_e]
    dst = reader_rows[nzr[keep_e]]
    table = NodeTable(
        kind=np.asarray(kinds, dtype=str),
        layer=np.asarray(layer, dtype=np.int64),
        pos=np.asarray(pos, dtype=np.int64),
        index=np.asarray(index, dtype=np.int64),
        label=np.asarray(labels, dtype=str),
        activation=np.asarray(act, dtype=np.float64),
        input=np.asarray(inp, dtype=np.float64),
        influence=np.asarray(infl, dtype=np.float64),
        gain=np.asarray(gain, dtype=np.float64),
        remainder=rem_all,
    )
    graph_order = np.lexsort((dst, src))
    src, dst = src[graph_order], dst[graph_order]
    wsel = wts[keep_e][graph_order]
    fsel = flows[keep_e][graph_order]
    toks = str_tokens(view, rec.tokens)
    meta = {
        "target_label": target_label,
        "target": request.target,
        "softcap": request.softcap,
        "explains": explains,
        "logit": logit,
        "pos": p,
        "row": row,
        "n_layers": view.n_layers,
        "n_heads": view.n_heads,
        "precision": rec.cache.precision(),
        "tokens": None if toks is None else [str(x) for x in toks[row][:P]],
        "node_threshold": node_threshold,
        "edge_threshold": edge_threshold,
        "max_nodes": max_nodes,
        "candidates": int(len(ci)),
        "kept_nodes": n_kept,
        "model": view.architecture,
        "dictionaries": [getattr(dd, "name", "") for dd in dictionaries],
        "exact": True,
        "nodes": "neurons" if not dictionaries else "dictionaries",
    }
    graph = AttributionGraph(
        nodes=table, src=src, dst=dst, weight=wsel, flow=fsel, meta=meta, dictionaries=dictionaries
    )
    if heads or qk_n:
        _head_loadings(fz, graph, readers, keep, W_embed, W_err, W_const, reader_rows)
    if qk_n:
        graph.qk = _why_attended(fz, graph, readers, reader_rows, qk_n, qk_explain)
    return graph


def request_token(rec: Recorded, request: Request, row: int) -> int:
    """The target's token id (-1 for a difference or a direction)."""
    atoms = final_readout(rec, request.target, request.pos).atoms
    ids = atoms.ids[min(row, atoms.ids.shape[0] - 1), 0, 0]
    if ids.numel() == 1 and bool(atoms.token_atom.reshape(-1)[0]):
        return int(ids.reshape(-1)[0])
    return -1


def _head_loadings(
    fz: _Frozen,
    graph: AttributionGraph,
    readers: _Readers,
    keep: dict,
    W_embed: int,
    W_err: int,
    W_const: int,
    reader_rows: np.ndarray,
) -> None:
    """Fill ``graph.loadings``: each kept edge split by the earliest head on its paths."""
    view = fz.cv.view
    n, H = view.n_layers, view.n_heads
    C = 1 + n * H
    P, d = fz.P, fz.embed.shape[-1]
    base = int(reader_rows[0])
    which = np.unique(graph.dst - base)
    per = HEAD_CHUNK_BYTES // max(1, C * P * d * fz.embed.element_size())
    loadings = np.full((graph.n_edges, C), np.nan)
    err_layers = sorted(fz.errors)
    const0 = W_embed + W_err
    for rows in _chunks(len(which), per):
        rr = which[rows]
        o = _Descent(fz, "edges", keep, channels=C).run(readers.take(rr))
        R = len(rr)
        parts = [o.embed.view(R, C, P)]
        for L in err_layers:
            parts.append(o.errors[L].view(R, C, P) if L in o.errors else torch.zeros(R, C, P))
        parts.append(torch.full((R, C, W_const), float("nan"), dtype=o.embed.dtype))
        for i in range(len(fz.sets)):
            k = len(keep[i][0])
            if k:
                v = o.nodes.get(i)
                parts.append(v.view(R, C, k) if v is not None else torch.zeros(R, C, k))
        dense = torch.cat([x.to(torch.float64).cpu() for x in parts], -1).numpy()  # [R, C, W]
        pos_of = {int(r): j for j, r in enumerate(rr)}
        for e in np.nonzero(np.isin(graph.dst - base, rr))[0]:
            j = pos_of[int(graph.dst[e] - base)]
            s = int(graph.src[e])
            if const0 <= s < const0 + W_const:
                continue
            loadings[e] = dense[j, :, s]
    graph.loadings = loadings
    graph.head_names = ["resid"] + [f"L{l}H{h}" for l in range(n) for h in range(H)]


def _why_attended(
    fz: _Frozen,
    graph: AttributionGraph,
    readers: _Readers,
    reader_rows: np.ndarray,
    n: int,
    qk_explain: Any,
) -> list:
    """For the ``n`` largest head loadings: the head, the query position where its attention
    to the key (the edge's source position) carries most of the reader's pulled-back
    direction, and the QK prism's split of its score there (against the next most attended
    key)."""
    if graph.loadings is None or not graph.n_edges:
        return []
    view = fz.cv.view
    H = view.n_heads
    L = np.abs(np.nan_to_num(graph.loadings[:, 1:], nan=0.0))
    flat = np.argsort(-L, axis=None, kind="stable")[:n]
    out = []
    base = int(reader_rows[0])
    for f in flat:
        e, c = divmod(int(f), L.shape[1])
        if L[e, c] == 0:
            break
        layer, head = divmod(c, H)
        key = int(graph.nodes.pos[graph.src[e]])
        desc = _Descent(fz, "edges")
        desc.capture = layer
        desc.run(readers.take(np.asarray([int(graph.dst[e]) - base])))
        G = desc.captured
        assert G is not None  # the descent passed the layer
        lay = fz.layers[layer]
        Gp = G if lay.post1 is None else lay.post1.pull_back(G)
        Pe = G.shape[1]
        Gp = Gp[0] * (lay.inv_post1[:Pe, None] * lay.rs)  # [Pe, d]
        strength = lay.A[head, :Pe, key] * (Gp @ lay.W_O[head].T).norm(dim=-1)
        strength[:key] = 0
        q = int(strength.argmax())
        row = lay.A[head, q, : q + 1].clone()
        row[key] = -1
        other = int(row.argmax()) if q >= 1 else None
        keys = [key] if other is None else [key, other]
        record = {
            "edge": (str(graph.nodes.label[graph.src[e]]), str(graph.nodes.label[graph.dst[e]])),
            "head": f"L{layer}H{head}",
            "layer": layer,
            "head_index": head,
            "loading": float(graph.loadings[e, 1 + c]),
            "query": q,
            "key": key,
            "contrast_key": other,
            "attention": float(lay.A[head, q, key]),
            "result": None,
            "refused": None,
        }
        try:
            record["result"] = qk_explain(layer, head, q, keys, contrast=other is not None)
        except (UnsupportedModelError, ArgumentError) as err:
            record["refused"] = str(err)
        out.append(record)
    return out
