"""The attribution graph of one logit: nodes, weighted edges, exact by construction.

An :class:`AttributionGraph` holds what :func:`tlprisms._prisms.graph.run` found: the node
table (one row per node: kind, layer, position, index, label, activation, input, influence,
gain, remainder) and the kept edges (source row, target row, weight, flow). Its identities
(``check()``): every kept neuron's or feature's input, and the logit, equal the sum of its
kept incoming edges plus its ``remainder`` (what pruning left out); and the sources'
influences (embeddings, errors, constants) add up to the logit.

Vocabulary (the one of every result): ``L3N17@5`` (neuron 17 of layer 3 at position 5),
``L3F120@5`` (feature 120 of the dictionary at layer 3), ``L3 error@5``, ``@4 embed``,
``L3 b_O`` (a constant), ``logit " Paris"@5``.
"""

import heapq
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import Tensor

from tlprisms._core import views
from tlprisms._core.errors import ArgumentError, CompletenessError, NonFiniteError

__all__ = ["AttributionGraph", "NodeTable", "KINDS", "GRAPH_ATOL", "SCHEMA"]

#: node kinds, in the order nodes are laid out
KINDS = ("embed", "error", "const", "neuron", "feature", "logit")
#: the sources (no inputs): their influences add up to the logit
SOURCES = ("embed", "error", "const")
#: completeness tolerance of ``check()`` by precision (relative to ``max(1, |input|,
#: sum of |edges|)``), as for every result
GRAPH_ATOL = {"float64": 1e-10, "float32": 1e-5, "bfloat16": 2e-2, "float16": 5e-3}
#: the circuit-tracer / Neuronpedia graph JSON schema version written
SCHEMA = 1
#: circuit-tracer's feature types of each kind (what its viewer draws)
_FEATURE_TYPE = {
    "embed": "embedding",
    "error": "mlp reconstruction error",
    "neuron": "cross layer transcoder",
    "feature": "cross layer transcoder",
    "logit": "logit",
    "const": "bias",
}
_COLUMNS = (
    "kind",
    "layer",
    "pos",
    "index",
    "label",
    "activation",
    "input",
    "influence",
    "gain",
    "remainder",
)


@dataclass
class NodeTable:
    """Column-wise nodes (numpy arrays of one length)."""

    kind: np.ndarray
    layer: np.ndarray
    pos: np.ndarray
    index: np.ndarray
    label: np.ndarray
    activation: np.ndarray
    input: np.ndarray
    influence: np.ndarray
    gain: np.ndarray
    remainder: np.ndarray

    def __len__(self) -> int:
        return len(self.kind)

    def take(self, rows: np.ndarray) -> "NodeTable":
        return NodeTable(**{c: getattr(self, c)[rows] for c in _COLUMNS})

    def as_dict(self) -> dict:
        return {c: getattr(self, c) for c in _COLUMNS}


def _f(x: Any) -> Optional[float]:
    x = float(x)
    return None if math.isnan(x) else x


@dataclass
class AttributionGraph:
    """The exact attribution graph of one logit (see :mod:`tlprisms._prisms.graph`).

    Attributes:
        nodes: the :class:`NodeTable` (sources first, then neurons/features by layer, the
            logit last).
        src, dst: ``[E]`` node rows of each kept edge (``src -> dst``).
        weight: ``[E]`` the edge: ``src``'s contribution to ``dst``'s input.
        flow: ``[E]`` ``weight * gain[dst]``: the edge's share of the logit; a node's
            incoming flows (and its remainder's) add up to its influence.
        loadings: with ``heads=True``, ``[E, 1 + n_layers * n_heads]``: each edge split by
            the earliest head on its paths (column 0 the direct path; ``head_names``); NaN
            for edges from constants.
        qk: with ``qk=N``: why the heads of the largest loadings attended (see
            :meth:`LogitPrism.graph`).
        meta: target, position, logit value, thresholds, tokens, precision, ...
    """

    nodes: NodeTable
    src: np.ndarray
    dst: np.ndarray
    weight: np.ndarray
    flow: np.ndarray
    meta: dict
    loadings: Optional[np.ndarray] = None
    head_names: Optional[list] = None
    qk: list = field(default_factory=list)
    #: the dictionaries whose features are nodes (what ``LogitPrism.verify`` reruns)
    dictionaries: list = field(default_factory=list, repr=False)

    # ------------------------------------------------------------------ basics
    def __len__(self) -> int:
        return len(self.nodes)

    @property
    def n_edges(self) -> int:
        return len(self.src)

    @property
    def logit(self) -> float:
        """The explained value (the logit, or what ``meta["explains"]`` says)."""
        return float(self.meta["logit"])

    def __repr__(self) -> str:
        kinds = {k: int((self.nodes.kind == k).sum()) for k in KINDS}
        parts = ", ".join(f"{v} {k}" for k, v in kinds.items() if v)
        return (
            f"AttributionGraph({self.meta.get('target_label', '?')} at position "
            f"{self.meta.get('pos', '?')} = {self.logit:.4g}: {len(self)} nodes ({parts}), "
            f"{self.n_edges} edges)"
        )

    def row(self, node: Union[int, str]) -> int:
        """The row of a node given by its label (or its row)."""
        if isinstance(node, (int, np.integer)) and not isinstance(node, bool):
            if not 0 <= int(node) < len(self):
                raise ArgumentError(f"graph: node row {node} is out of range 0..{len(self) - 1}.")
            return int(node)
        if not isinstance(node, str):
            raise ArgumentError(f"graph: node={node!r}; pass a node label (str) or row (int).")
        hits = np.nonzero(self.nodes.label == node)[0]
        if not len(hits):
            close = [str(x) for x in self.nodes.label if node.split("@")[0] in str(x)][:5]
            raise ArgumentError(
                f"graph: no node labelled {node!r}"
                + (f"; similar: {', '.join(close)}" if close else "")
                + ". See graph.to_frame() for the labels."
            )
        return int(hits[0])

    @property
    def edge_matrix(self) -> Tensor:
        """The kept edges as a sparse ``[n_nodes, n_nodes]`` tensor ``A[dst, src] = weight``."""
        idx = torch.as_tensor(np.stack([self.dst, self.src]), dtype=torch.long)
        n = len(self)
        with warnings.catch_warnings():  # torch calls its sparse layouts beta
            warnings.simplefilter("ignore", UserWarning)
            return torch.sparse_coo_tensor(idx, torch.as_tensor(self.weight), (n, n)).coalesce()

    # ------------------------------------------------------------------ identities
    def input_gap(self) -> np.ndarray:
        """Per node: ``input - (sum of kept incoming edges + remainder)`` (NaN for sources)."""
        total = np.zeros(len(self))
        np.add.at(total, self.dst, self.weight)
        gap = self.nodes.input - (total + self.nodes.remainder)
        gap[np.isin(self.nodes.kind, SOURCES)] = np.nan
        return gap

    def _bound(self) -> np.ndarray:
        l1 = np.zeros(len(self))
        np.add.at(l1, self.dst, np.abs(self.weight))
        l1 = l1 + np.abs(self.nodes.remainder)
        tol = GRAPH_ATOL.get(self.meta.get("precision", "float32"), 1e-5)
        return tol * np.maximum(1.0, np.maximum(np.abs(self.nodes.input), l1))

    def check(self) -> "AttributionGraph":
        """Raise :class:`CompletenessError` unless every kept node's input (and the logit)
        equals its kept incoming edges plus its remainder, and the sources' influences add
        up to the logit, within the tolerance of the precision (:data:`GRAPH_ATOL`)."""
        if not self.meta.get("exact", True):
            raise CompletenessError(
                "check: this graph was read from a circuit-tracer JSON file, which records no "
                "node inputs or remainders, so its exactness cannot be checked; make it with "
                "LogitPrism.graph to check it."
            )
        for name, arr in (("edges", self.weight), ("influences", self.nodes.influence)):
            if not np.isfinite(arr).all():
                raise NonFiniteError(
                    f"check: the graph's {name} hold NaN or infinity; re-run "
                    "model.run_with_cache(tokens) in float32 if the model overflowed."
                )
        gap = self.input_gap()
        readers = ~np.isin(self.nodes.kind, SOURCES)
        bad = readers & ~(np.abs(gap) <= self._bound())
        if bad.any():
            i = int(np.nonzero(bad)[0][np.argmax(np.abs(gap[bad]))])
            raise CompletenessError(
                f"check: node {self.nodes.label[i]}'s input {self.nodes.input[i]:+.6g} differs "
                f"from its kept edges plus remainder by {gap[i]:+.3g} ({int(bad.sum())} nodes "
                "off). Please report this with the model's config."
            )
        if not self.meta.get("all_sources", True):
            return self  # a subgraph: some sources are gone (their edges are remainders)
        src = np.isin(self.nodes.kind, SOURCES)
        total = float(self.nodes.influence[src].sum())
        l1 = float(np.abs(self.nodes.influence[src]).sum())
        tol = GRAPH_ATOL.get(self.meta.get("precision", "float32"), 1e-5)
        if abs(total - self.logit) > tol * max(1.0, abs(self.logit), l1):
            raise CompletenessError(
                f"check: the sources' influences add up to {total:+.6g}, not the "
                f"{self.meta.get('explains', 'logit')} {self.logit:+.6g}. Please report this."
            )
        return self

    # ------------------------------------------------------------------ scores
    @property
    def replacement_score(self) -> float:
        """The share of the sources' ``|influence|`` that does not come from error nodes
        (1.0 for neurons, which have none)."""
        src = np.isin(self.nodes.kind, SOURCES)
        l1 = float(np.abs(self.nodes.influence[src]).sum())
        err = float(np.abs(self.nodes.influence[self.nodes.kind == "error"]).sum())
        return 1.0 if l1 == 0 else 1.0 - err / l1

    @property
    def completeness_score(self) -> float:
        """The share of the ``|flow|`` into the kept neurons/features and the logit that the
        kept edges carry (the rest is in the remainders, i.e. pruned)."""
        kept = float(np.abs(self.flow).sum())
        rest = float(
            np.abs(self.nodes.remainder * self.nodes.gain)[~np.isnan(self.nodes.gain)].sum()
        )
        return 1.0 if kept + rest == 0 else kept / (kept + rest)

    # ------------------------------------------------------------------ tables
    def to_frame(self, what: str = "nodes") -> Any:
        """A pandas DataFrame of the ``"nodes"`` or the ``"edges"`` (with source and target
        labels, weight, flow and, with ``heads=True``, one column per head)."""
        import pandas as pd

        if what == "nodes":
            return pd.DataFrame(self.nodes.as_dict())
        if what != "edges":
            raise ArgumentError(f"to_frame: what={what!r}; pass 'nodes' or 'edges'.")
        frame = pd.DataFrame(
            {
                "source": self.nodes.label[self.src],
                "target": self.nodes.label[self.dst],
                "weight": self.weight,
                "flow": self.flow,
            }
        )
        if self.loadings is not None and self.head_names is not None:
            for j, name in enumerate(self.head_names):
                frame[name] = self.loadings[:, j]
        return frame

    def top_nodes(self, k: int = 10, kinds: Optional[tuple] = None) -> Any:
        """The ``k`` nodes of largest ``|influence|`` (of ``kinds``, default all but the
        logit) as a DataFrame."""
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ArgumentError(f"top_nodes: k={k!r}; pass an int >= 1.")
        frame = self.to_frame("nodes")
        keep = frame.kind != "logit" if kinds is None else frame.kind.isin(kinds)
        frame = frame[keep]
        return frame.reindex(frame.influence.abs().sort_values(ascending=False).index).head(k)

    def subgraph(self, nodes: Any) -> "AttributionGraph":
        """The graph restricted to ``nodes`` (labels or rows; the logit is always kept):
        edges between kept nodes stay, every other edge into a kept node moves into its
        remainder, so the identities still hold."""
        rows = {self.row(n) for n in nodes} | set(np.nonzero(self.nodes.kind == "logit")[0])
        keep = np.zeros(len(self), dtype=bool)
        keep[np.asarray(sorted(rows), dtype=np.int64)] = True
        new_index = -np.ones(len(self), dtype=np.int64)
        new_index[keep] = np.arange(int(keep.sum()))
        stays = keep[self.src] & keep[self.dst]
        moved = keep[self.dst] & ~keep[self.src]
        table = self.nodes.take(np.nonzero(keep)[0])
        rem = self.nodes.remainder.copy()
        np.add.at(rem, self.dst[moved], self.weight[moved])
        table.remainder = rem[keep]
        meta = dict(self.meta)
        meta["all_sources"] = bool(keep[np.isin(self.nodes.kind, SOURCES)].all())
        return AttributionGraph(
            nodes=table,
            src=new_index[self.src[stays]],
            dst=new_index[self.dst[stays]],
            weight=self.weight[stays],
            flow=self.flow[stays],
            meta=meta,
            loadings=None if self.loadings is None else self.loadings[stays],
            head_names=self.head_names,
            qk=list(self.qk),
            dictionaries=list(self.dictionaries),
        )

    def _transfer(self) -> np.ndarray:
        """Per edge: its weight divided by its source's input for neurons/features (what a
        unit change at the source's input carries), the weight itself for sources."""
        inp = self.nodes.input[self.src]
        mid = np.isin(self.nodes.kind[self.src], ("neuron", "feature"))
        out = self.weight.copy()
        with np.errstate(divide="ignore", invalid="ignore"):
            out[mid] = np.where(inp[mid] != 0, self.weight[mid] / inp[mid], 0.0)
        return out

    def paths(self, node: Union[int, str, None] = None, k: int = 5) -> list:
        """The ``k`` strongest paths from a source to the logit through ``node`` (any node
        when None), as ``(value, [labels])``: ``value`` is the path's contribution to the
        logit (the first edge times each later edge per unit of its source's input),
        largest ``|value|`` first."""
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ArgumentError(f"paths: k={k!r}; pass an int >= 1.")
        through = None if node is None else self.row(node)
        t = self._transfer()
        rank = self._rank()
        order = np.argsort(rank, kind="stable")
        incoming: dict = {}
        for e in range(self.n_edges):
            incoming.setdefault(int(self.dst[e]), []).append(e)
        # best[v]: the k largest |value| prefixes ending at v's input: (|v|, v, path)
        best: dict = {}
        for v in order:
            v = int(v)
            cands = []
            for e in incoming.get(v, []):
                s = int(self.src[e])
                if self.nodes.kind[s] in SOURCES:
                    cands.append((abs(t[e]), float(t[e]), (s, v)))
                else:
                    for _, val, path in best.get(s, []):
                        x = val * t[e]
                        cands.append((abs(x), x, path + (v,)))
            if through is not None and v != through and rank[v] > rank[through]:
                # past ``through``'s layer, only prefixes that pass it are kept
                cands = [c for c in cands if through in c[2]]
            best[v] = heapq.nlargest(k, cands, key=lambda c: c[0])
        logit = int(np.nonzero(self.nodes.kind == "logit")[0][0])
        out = best.get(logit, [])
        if through is not None:
            out = [c for c in out if through in c[2]]
        return [(c[1], [str(self.nodes.label[i]) for i in c[2]]) for c in out[:k]]

    def _rank(self) -> np.ndarray:
        kind = self.nodes.kind
        rank = self.nodes.layer.astype(np.float64).copy()
        rank[np.isin(kind, SOURCES)] = -1
        rank[kind == "logit"] = np.inf
        return rank

    # ------------------------------------------------------------------ interop
    def _node_ids(self) -> list:
        """circuit-tracer node ids: ``{layer}_{feature}_{pos}``, ``E_{token}_{pos}``,
        ``{layer}_-1_{pos}`` for errors, ``{n_layers + 1}_{token}_{pos}`` for the logit; the
        constants (which circuit-tracer has not) ``B_{label}``."""
        n = int(self.meta.get("n_layers", 0))
        ids = []
        for i in range(len(self)):
            kind, layer, pos = self.nodes.kind[i], int(self.nodes.layer[i]), int(self.nodes.pos[i])
            index = int(self.nodes.index[i])
            if kind == "embed":
                ids.append(f"E_{index}_{pos}")
            elif kind == "error":
                ids.append(f"{layer}_-1_{pos}")
            elif kind == "logit":
                ids.append(f"{n + 1}_{index}_{pos}")
            elif kind == "const":
                ids.append("B_" + str(self.nodes.label[i]).replace(" ", "_"))
            else:
                ids.append(f"{layer}_{index}_{pos}")
        return ids

    def to_json(self, path: Any = None, *, slug: str = "tlprisms-graph") -> dict:
        """The graph in the JSON layout circuit-tracer writes and the Neuronpedia graph viewer
        reads (``metadata``, ``qParams``, ``nodes``, ``links``), written to ``path`` when
        given. Neurons are feature nodes (their ``clerp`` says neuron); constants are nodes
        of feature type ``"bias"``. Everything this class holds (inputs, gains,
        remainders, flows) is kept under ``metadata["tlprisms"]``, so
        :meth:`from_json` gives back the same graph."""
        ids = self._node_ids()
        n = int(self.meta.get("n_layers", 0))
        nodes = []
        for i, nid in enumerate(ids):
            kind = str(self.nodes.kind[i])
            layer = (
                "E"
                if kind == "embed"
                else str(n + 1)
                if kind == "logit"
                else str(int(self.nodes.layer[i]))
            )
            entry = {
                "node_id": nid,
                "feature": int(self.nodes.index[i]),
                "layer": layer,
                "ctx_idx": int(self.nodes.pos[i]),
                "feature_type": _FEATURE_TYPE[kind],
                "token_prob": float(self.meta.get("prob", 0.0)) if kind == "logit" else 0.0,
                "is_target_logit": kind == "logit",
                "run_idx": 0,
                "reverse_ctx_idx": 0,
                "jsNodeId": nid,
                "clerp": str(self.nodes.label[i]),
                "influence": _f(self.nodes.influence[i]),
                "activation": _f(self.nodes.activation[i]),
            }
            nodes.append(entry)
        links = [
            {"source": ids[s], "target": ids[d], "weight": float(w)}
            for s, d, w in zip(self.src, self.dst, self.weight)
        ]
        own = {
            "columns": {
                c: [
                    v if not isinstance(v, float) or not math.isnan(v) else None
                    for v in getattr(self.nodes, c).tolist()
                ]
                for c in _COLUMNS
            },
            "flow": self.flow.tolist(),
            "meta": {k: v for k, v in self.meta.items() if _jsonable(v)},
        }
        if self.loadings is not None:
            own["loadings"] = [[_f(x) for x in row] for row in self.loadings]
            own["head_names"] = list(self.head_names or [])
        data = {
            "metadata": {
                "slug": slug,
                "scan": str(self.meta.get("model", "tlprisms")),
                "transcoder_list": list(self.meta.get("dictionaries", [])),
                "prompt_tokens": list(self.meta.get("tokens") or []),
                "prompt": "".join(self.meta.get("tokens") or []),
                "node_threshold": self.meta.get("node_threshold"),
                "schema_version": SCHEMA,
                "tlprisms": own,
            },
            "qParams": {
                "pinnedIds": [],
                "supernodes": [],
                "linkType": "both",
                "clickedId": "",
                "sg_pos": "",
            },
            "nodes": nodes,
            "links": links,
        }
        if path is not None:
            Path(path).write_text(json.dumps(data))
        return data

    @classmethod
    def from_json(cls, source: Any) -> "AttributionGraph":
        """A graph from :meth:`to_json`'s output or a circuit-tracer graph JSON (a path, a
        JSON string or the parsed dict). A circuit-tracer graph has no inputs or remainders:
        its nodes, edges, influences and activations are read, ``check()`` refuses it."""
        data = _load_json(source)
        try:
            nodes, links, meta = data["nodes"], data["links"], data.get("metadata", {})
        except (KeyError, TypeError):
            raise ArgumentError(
                "AttributionGraph.from_json: this JSON has no 'nodes' and 'links'; pass a "
                "graph file written by circuit-tracer or by AttributionGraph.to_json."
            ) from None
        ids = {str(nd.get("node_id")): i for i, nd in enumerate(nodes)}
        try:
            src = np.asarray([ids[str(lk["source"])] for lk in links], dtype=np.int64)
            dst = np.asarray([ids[str(lk["target"])] for lk in links], dtype=np.int64)
            weight = np.asarray([float(lk["weight"]) for lk in links], dtype=np.float64)
        except KeyError as e:
            raise ArgumentError(
                f"AttributionGraph.from_json: a link names node {e.args[0]!r}, which is not "
                "among the nodes (or a link lacks source/target/weight); the file is not a "
                "complete graph."
            ) from None
        own = meta.get("tlprisms") if isinstance(meta, dict) else None
        if own:
            cols = own["columns"]
            table = NodeTable(
                **{
                    c: np.asarray(
                        [np.nan if v is None else v for v in cols[c]],
                        dtype=object
                        if c in ("kind", "label")
                        else np.float64
                        if c in ("activation", "input", "influence", "gain", "remainder")
                        else np.int64,
                    )
                    for c in _COLUMNS
                }
            )
            table.kind = table.kind.astype(str)
            table.label = table.label.astype(str)
            loadings = own.get("loadings")
            return cls(
                nodes=table,
                src=src,
                dst=dst,
                weight=weight,
                flow=np.asarray(own["flow"], dtype=np.float64),
                meta=dict(own["meta"]),
                loadings=None
                if loadings is None
                else np.asarray(
                    [[np.nan if x is None else x for x in r] for r in loadings], dtype=np.float64
                ).reshape(len(src), -1),
                head_names=own.get("head_names"),
            )
        return cls._from_circuit_tracer(nodes, src, dst, weight, meta)

    @classmethod
    def _from_circuit_tracer(
        cls, nodes: list, src: Any, dst: Any, weight: Any, meta: dict
    ) -> "AttributionGraph":
        kinds = {v: k for k, v in _FEATURE_TYPE.items() if k not in ("neuron",)}
        n = len(nodes)
        cols: dict = {c: [] for c in _COLUMNS}
        for nd in nodes:
            ftype = str(nd.get("feature_type", ""))
            kind = kinds.get(ftype, "feature" if "transcoder" in ftype else "feature")
            nid = str(nd.get("node_id", ""))
            parts = nid.split("_")
            layer = -1 if kind in ("embed", "const", "logit") else int(str(nd.get("layer", "-1")))
            pos = int(nd.get("ctx_idx", -1))
            if kind == "feature":
                index = int(parts[1]) if len(parts) == 3 else int(nd.get("feature", -1))
            elif kind == "embed":
                index = int(parts[1]) if len(parts) == 3 else -1
            else:
                index = int(nd.get("feature", -1))
            if kind == "feature":
                label = f"L{layer}F{index}@{pos}"
            elif kind == "embed":
                label = f"@{pos} embed"
            elif kind == "error":
                label = f"L{layer} error@{pos}"
            elif kind == "logit":
                label = str(nd.get("clerp") or f"logit {index}@{pos}")
            else:
                label = str(nd.get("clerp") or nid)
            cols["kind"].append(kind)
            cols["layer"].append(layer)
            cols["pos"].append(pos)
            cols["index"].append(index)
            cols["label"].append(label)
            cols["activation"].append(nd.get("activation"))
            cols["input"].append(None)
            cols["influence"].append(nd.get("influence"))
            cols["gain"].append(None)
            cols["remainder"].append(0.0)
        table = NodeTable(
            kind=np.asarray(cols["kind"], dtype=str),
            layer=np.asarray(cols["layer"], dtype=np.int64),
            pos=np.asarray(cols["pos"], dtype=np.int64),
            index=np.asarray(cols["index"], dtype=np.int64),
            label=np.asarray(cols["label"], dtype=str),
            **{
                c: np.asarray(
                    [np.nan if v is None else float(v) for v in cols[c]], dtype=np.float64
                )
                for c in ("activation", "input", "influence", "gain", "remainder")
            },
        )
        logits = [
            i for i in range(n) if table.kind[i] == "logit" and nodes[i].get("is_target_logit")
        ]
        m = {
            "exact": False,
            "logit": float("nan"),
            "tokens": list(meta.get("prompt_tokens", [])) if isinstance(meta, dict) else [],
            "source": "circuit-tracer",
            "node_threshold": meta.get("node_threshold") if isinstance(meta, dict) else None,
            "target_label": str(table.label[logits[0]]) if logits else "?",
        }
        return cls(
            nodes=table, src=src, dst=dst, weight=weight, flow=np.full(len(src), np.nan), meta=m
        )

    # ------------------------------------------------------------------ display
    def _repr_html_(self) -> str:
        return views.html(self)

    def show(self, **options: Any) -> Any:
        """Display the interactive graph view in Jupyter."""
        return views.show(self, **options)


def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


def _load_json(source: Any) -> dict:
    if isinstance(source, dict):
        return source
    if isinstance(source, (str, Path)):
        text = str(source)
        if isinstance(source, Path) or not text.lstrip().startswith("{"):
            p = Path(source)
            if not p.is_file():
                raise ArgumentError(f"AttributionGraph.from_json: no file {str(p)!r}.")
            text = p.read_text()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ArgumentError(
                f"AttributionGraph.from_json: not valid JSON ({e.msg} at line {e.lineno}); "
                "pass a graph file written by circuit-tracer or AttributionGraph.to_json."
            ) from None
        if isinstance(data, dict):
            return data
    raise ArgumentError(
        f"AttributionGraph.from_json: source={type(source).__name__}; pass a path, a JSON "
        "string or a dict."
    )
