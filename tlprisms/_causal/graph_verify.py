"""Verify an attribution graph by intervention (SPEC section 11, causal checks).

For each checked node ``a`` (the ``k`` of largest ``|influence|`` and ``sample`` drawn at
random among neurons, features, embeddings and errors) two forward passes of the frozen
model run, batched over nodes, each next to an unedited copy:

* **edges**: every norm scale, query and key held (so every pattern is the recorded one),
  every MLP activation held at the cache (a transcoder's output at its recorded value plus
  its skip path); ``a``'s write removed. Each kept reader ``b`` of an edge from ``a`` must
  move by minus the edge (``b``'s input, or the logit).
* **influence**: the same scales, queries and keys held, but every neuron passing its
  current input on by its recorded ratio (every feature by its gate, the errors held); the
  logit must move by minus ``a``'s influence.

Constants (biases) are not intervened on: the graph's completeness (``check()``) covers them,
and the certificate says so.
"""

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import Tensor

from tlprisms._core.errors import ArgumentError, UnsupportedModelError, VerificationError
from tlprisms._core.graph import AttributionGraph
from tlprisms._core.readout import Recorded
from tlprisms._core.request import Request
from tlprisms._prisms import graph as graph_prism
from tlprisms._seam import Site
from tlprisms._seam._graph_runs import mlp_input_site, rerun_frozen
from tlprisms.dictionary import CrossLayerTranscoder

__all__ = ["GraphVerification", "verify_graph", "GRAPH_VERIFY_RTOL"]

#: intervention vs edge / influence, relative to ``max(1, |reader's input|, sum of |its
#: edges|)`` (float32 reruns add in another order than the descents); float64: 1e-9
GRAPH_VERIFY_RTOL = {"float64": 1e-9, "float32": 1e-4}
#: bf16 / fp16 models
GRAPH_VERIFY_RTOL_LOW = 3e-2
#: the unedited rerun must give back the recorded values within this (relative)
REPRODUCE_RTOL = 1e-4
#: nodes whose removal a rerun checks
CHECKABLE = ("neuron", "feature", "embed", "error")


@dataclass
class GraphVerification:
    """The outcome of ``LogitPrism.verify(graph)``: each checked edge and influence next to
    the change its node's removal caused."""

    ok: bool
    rows: list
    nodes_checked: int
    forward_passes: int
    skipped: dict = field(default_factory=dict)

    @property
    def max_error(self) -> float:
        return max((r["error"] for r in self.rows), default=0.0)

    def to_frame(self) -> Any:
        import pandas as pd

        return pd.DataFrame(self.rows)

    def __str__(self) -> str:
        edges = sum(r["what"] == "edge" for r in self.rows)
        infl = sum(r["what"] == "influence" for r in self.rows)
        worst = max(self.rows, key=lambda r: r["error"] / r["bound"], default=None)
        skip = "; ".join(f"{v} {k}" for k, v in self.skipped.items())
        return (
            f"{self.nodes_checked} nodes removed in {self.forward_passes} forward passes: "
            f"{edges} edges and {infl} influences verified by intervention"
            + (f", max error {worst['error']:.2g} (bound {worst['bound']:.2g})" if worst else "")
            + (f"; not intervened on: {skip}" if skip else "")
            + (": OK" if self.ok else ": FAILED")
        )

    def __repr__(self) -> str:
        return f"GraphVerification({self})"

    def check(self) -> "GraphVerification":
        if not self.ok:
            bad = [r for r in self.rows if r["error"] > r["bound"]]
            r = bad[0]
            raise VerificationError(
                f"verify: removing {r['node']} moved {r['reader']} by {r['change']:+.6g}, not "
                f"by minus its {r['what']} {r['value']:+.6g} ({len(bad)} checks off)."
            )
        return self


def _choose(graph: AttributionGraph, k: int, sample: int, seed: int) -> np.ndarray:
    rows = np.nonzero(np.isin(graph.nodes.kind, CHECKABLE))[0]
    order = rows[np.argsort(-np.abs(graph.nodes.influence[rows]), kind="stable")]
    top = order[:k]
    rest = order[k:]
    rng = np.random.default_rng(seed)
    extra = rng.choice(rest, size=min(sample, len(rest)), replace=False) if len(rest) else rest
    return np.concatenate([top, np.sort(extra)]).astype(np.int64)


class _Edits:
    """The MLP edits of one rerun: copy ``c`` removes node ``chosen[c]`` (the last copy
    removes nothing)."""

    def __init__(self, rec: Recorded, graph: AttributionGraph, fz: Any, chosen: np.ndarray,
                 mode: str) -> None:  # fmt: skip
        self.rec, self.graph, self.fz, self.chosen, self.mode = rec, graph, fz, chosen, mode
        self.view = rec.cache.view
        self.n = len(chosen) + 1
        self.P = fz.P
        self.state: dict = {}
        self.clt = bool(graph.dictionaries) and isinstance(
            graph.dictionaries[0], CrossLayerTranscoder
        )
        by = {}
        for i, s in enumerate(fz.sets):
            by[s.layer] = i
        self.set_at = by

    def removed(self, kind: str, layer: int) -> list:
        """``(copy, pos, column-or-index)`` of the removals of ``kind`` at ``layer``."""
        out = []
        nodes = self.graph.nodes
        for c, r in enumerate(self.chosen):
            if nodes.kind[r] == kind and int(nodes.layer[r]) == layer:
                out.append((c, int(nodes.pos[r]), int(nodes.index[r])))
        return out

    def build(self) -> dict:
        _view, fz = self.view, self.fz
        edits: dict = {}
        embeds = [(c, int(self.graph.nodes.pos[r])) for c, r in enumerate(self.chosen)
                  if self.graph.nodes.kind[r] == "embed"]  # fmt: skip
        if embeds:

            def no_embed(x: Tensor, value: Tensor) -> Tensor:
                for c, j in embeds:
                    x[c, j] = x[c, j] - fz.embed[j].to(x)
                return x

            edits[(Site.RESID_PRE, 0)] = no_embed
        for i, s in enumerate(fz.sets):
            if s.kind == "neuron":
                self._neurons(edits, i, s)
            else:
                self._features(edits, i, s)
        return edits

    def _neurons(self, edits: dict, i: int, s: Any) -> None:
        _view, P, layer = self.view, self.P, s.layer
        gone = self.removed("neuron", layer)
        if self.mode == "influence":
            site = mlp_input_site(self.view)

            def grab(x: Tensor, value: Tensor, layer: int = layer) -> Tensor:
                self.state[layer] = x.clone()
                return x

            edits[(site, layer)] = grab

        def post(x: Tensor, value: Tensor, s: Any = s, gone: list = gone) -> Tensor:
            bias = 0.0 if s.out_bias is None else s.out_bias.to(x)
            if self.mode == "influence":
                x[:, :P] = s.ratio.to(x) * self.state[s.layer][:, :P] + bias
            else:
                x = value.expand_as(x).clone()
            for c, j, n in gone:  # what is left of the neuron: its constant, if any
                x[c, j, n] = 0.0 if s.out_bias is None else s.out_bias[n].to(x)
            return x

        edits[(Site.MLP_POST, layer)] = post

    def _features(self, edits: dict, i: int, s: Any) -> None:
        """A transcoder (or a CLT layer): its output is held at the cache (edges) or made of
        its features' gated pre-activations (influence), plus its skip path and error."""
        fz, P, layer = self.fz, self.P, s.layer
        site = Site.LN2_NORMALIZED if s.norm is not None else Site.RESID_MID
        norm = s.norm
        ids = {int(f): col for col, f in enumerate(s.ids)}
        gone = [(c, j, ids[f]) for c, j, f in self.removed("feature", layer) if f in ids]

        def grab(x: Tensor, value: Tensor, layer: int = layer) -> Tensor:
            xin = x[:, :P]
            if norm is not None:  # TransformerLens records ln2's output before w and b
                if norm.weight is not None:
                    xin = xin * norm.weight.to(xin)
                if norm.bias is not None:
                    xin = xin + norm.bias.to(xin)
            self.state[("in", layer)] = xin
            if norm is not None:
                v = value[:, :P]
                if norm.weight is not None:
                    v = v * norm.weight.to(v)
                if norm.bias is not None:
                    v = v + norm.bias.to(v)
                self.state[("in0", layer)] = v
            else:
                self.state[("in0", layer)] = value[:, :P]
            pre = xin @ s.read + self._enc_const(s)
            acts = s.ratio.to(pre) * pre
            for c, j, col in gone:
                acts[c, j, col] = 0.0
            if self.mode == "edges":  # held: only the removed features change
                acts = s.act.to(pre).expand_as(acts).clone()
                for c, j, col in gone:
                    acts[c, j, col] = 0.0
            self.state[("acts", layer)] = acts
            return x

        edits[(site, layer)] = grab
        for L in s.writes:
            if (Site.MLP_OUT, L) in edits:
                continue

            def out(x: Tensor, value: Tensor, L: int = L) -> Tensor:
                total = fz.b_dec[L].to(x).expand(x.shape[0], P, -1).clone() + fz.errors[L].to(x)
                for t in fz.sets:
                    if L in t.writes and ("acts", t.layer) in self.state:
                        total = total + self.state[("acts", t.layer)] @ t.writes[L].to(x)
                    if t.layer == L and t.skip is not None:
                        total = total + self.state[("in", L)] @ t.skip.to(x)
                for c, j in [(c, j) for c, j in self._errors(L)]:
                    total[c, j] = total[c, j] - fz.errors[L][j].to(x)
                x[:, :P] = total
                return x

            edits[(Site.MLP_OUT, L)] = out

    def _errors(self, L: int) -> list:
        graph = self.graph
        return [(c, int(graph.nodes.pos[r])) for c, r in enumerate(self.chosen)
                if graph.nodes.kind[r] == "error" and int(graph.nodes.layer[r]) == L]  # fmt: skip

    @staticmethod
    def _enc_const(s: Any) -> Tensor:
        """The part of a feature's pre-activation that its read of the (normed) input leaves
        out: ``b_enc`` (less ``b_dec``'s read where subtracted). The norm's bias is already
        in the input here."""
        return dict((name[0], v) for name, v in s.consts)["b_enc"]


def verify_graph(rec: Recorded, graph: AttributionGraph, k: int, sample: int, seed: int,
                 caller: str = "LogitPrism.verify") -> GraphVerification:  # fmt: skip
    """Check ``graph``'s largest and sampled nodes' edges and influences by intervention."""
    if not graph.meta.get("exact", True):
        raise ArgumentError(
            f"{caller}: this graph was read from a circuit-tracer file; there is nothing of "
            "this model to rerun it against. Make it with LogitPrism.graph."
        )
    if rec.tokens is None:
        raise ArgumentError(
            f"{caller}: this prism has no tokens to rerun; make it with LogitPrism.run(model, "
            "text) or pass tokens= to LogitPrism(...)."
        )
    view = rec.cache.view
    if view.training:
        raise ArgumentError(
            f"{caller}: the model is in training mode (dropout on), so reruns differ from the "
            "recorded pass at random; call model.eval() first."
        )
    if graph.meta.get("n_layers") != view.n_layers:
        raise ArgumentError(
            f"{caller}: this graph has {graph.meta.get('n_layers')} layers but the prism's "
            f"model has {view.n_layers}; verify it with the prism that made it."
        )
    row, p = int(graph.meta["row"]), int(graph.meta["pos"])
    fz = graph_prism.freeze(rec, row, p + 1, list(graph.dictionaries))
    request = Request("graph", graph.meta.get("target"), p, graph.meta.get("softcap", "post"))
    readers, _, _, _, _ = graph_prism.logit_reader(rec, request, row)
    G0 = readers.G0[0]
    chosen = _choose(graph, k, sample, seed)
    rows: list = []
    passes = 0
    nodes = graph.nodes
    precision = graph.meta.get("precision", "float32")
    rtol = GRAPH_VERIFY_RTOL.get(precision, GRAPH_VERIFY_RTOL_LOW)
    in_l1 = np.zeros(len(nodes))
    np.add.at(in_l1, graph.dst, np.abs(graph.weight))
    logit_row = int(np.nonzero(nodes.kind == "logit")[0][0])
    for mode in ("edges", "influence"):
        if not len(chosen):
            break
        edits = _Edits(rec, graph, fz, chosen, mode)
        grab = [(Site.FINAL_RESID, None)]
        if mode == "edges":
            grab += [(mlp_input_site(view), s.layer) for s in fz.sets if s.kind == "neuron"]
        got = rerun_frozen(view, rec.cache.cache, rec.tokens, row, len(chosen) + 1,
                           edits.build(), grab, caller)  # fmt: skip
        passes += 1
        _reproduces(rec, got, row, p, caller)
        final = got[(Site.FINAL_RESID, None)][:, p].to(G0)
        dlogit = (final[:-1] - final[-1]) @ G0
        for c, a in enumerate(chosen):
            label = str(nodes.label[a])
            if mode == "influence":
                value = float(nodes.influence[a])
                change = float(dlogit[c])
                bound = rtol * max(1.0, abs(graph.logit), abs(value))
                rows.append(_row(label, "influence", "logit", value, change, bound))
                continue
            for e in np.nonzero(graph.src == a)[0]:
                b = int(graph.dst[e])
                value = float(graph.weight[e])
                if b == logit_row:
                    change = float(dlogit[c])
                elif nodes.kind[b] == "neuron":
                    x = got[(mlp_input_site(view), int(nodes.layer[b]))]
                    j, n = int(nodes.pos[b]), int(nodes.index[b])
                    change = float(x[c, j, n] - x[-1, j, n])
                else:
                    change = _feature_change(edits, fz, nodes, b, c)
                bound = rtol * max(1.0, abs(float(nodes.input[b])), in_l1[b])
                rows.append(_row(label, "edge", str(nodes.label[b]), value, change, bound))
    ok = all(r["error"] <= r["bound"] for r in rows)
    skipped = {"constants": int((nodes.kind == "const").sum())}
    return GraphVerification(ok, rows, len(chosen), passes, skipped)


def _reproduces(rec: Recorded, got: dict, row: int, p: int, caller: str) -> None:
    """Refuse unless the unedited copy (the last) reproduces what the cache recorded: the
    held scales, queries and keys must give back the recorded forward pass."""
    cv = rec.cache
    for (site, layer), x in got.items():
        want = cv.get(site, layer)[row, : p + 1].to(x)
        have = x[-1, : p + 1]
        scale = float(want.abs().max()) + 1.0
        if float((have - want).abs().max()) > REPRODUCE_RTOL * scale:
            raise UnsupportedModelError(
                f"{caller}: rerunning this model with its recorded norm scales, queries and "
                f"keys held does not reproduce its recorded {cv.view.hook(site, layer)} (off "
                f"by {float((have - want).abs().max()):.3g}): its forward pass computes "
                "something the hooks do not hold, so the graph cannot be checked by "
                "intervention on it. Its exactness is checked by graph.check()."
            )


def _feature_change(edits: _Edits, fz: Any, nodes: Any, b: int, c: int) -> float:
    """How much feature ``b``'s pre-activation moved in copy ``c`` (from its layer's input
    as the edges rerun saw it)."""
    layer, j, f = int(nodes.layer[b]), int(nodes.pos[b]), int(nodes.index[b])
    s = fz.sets[edits.set_at[layer]]
    col = int(np.nonzero(s.ids == f)[0][0])
    xin = edits.state[("in", layer)]
    pre = xin[:, j] @ s.read[:, col]
    return float(pre[c] - pre[-1])


def _row(node: str, what: str, reader: str, value: float, change: float, bound: float) -> dict:
    return {
        "node": node,
        "what": what,
        "reader": reader,
        "value": value,
        "change": change,
        "error": abs(value + change),
        "bound": bound,
    }
