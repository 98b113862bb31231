"""Attribution graphs (SPEC section 11): exact on every family, causally right, equal to the
chained prisms where they compute the same thing, and the same after a JSON round trip."""

import json

import numpy as np
import pytest
import torch

import tlprisms as tp
from tlprisms._core.graph import AttributionGraph
from tlprisms.errors import ArgumentError, CompletenessError, UnsupportedModelError

from conftest import SEQ, build_case

#: causal change vs edge / influence, relative to max(1, |value|, |input|)
CAUSAL_RTOL = 5e-5
#: a graph's edges vs the chained prisms' terms (different float32 contraction orders)
CHAIN_RTOL = 5e-5
#: float64 models: completeness of every node's input
FP64_ATOL = 1e-10
B, I = 0, SEQ - 1
#: nothing pruned (every active neuron kept, every edge kept)
WHOLE = dict(max_nodes=10**6, node_threshold=1.0, edge_threshold=1.0)


def _target(case):
    return 4 + int(case.logits[B, I, 4:].argmax())


def _graph(case, **kw):
    if case.prism.view.act_fn == "solu_ln":
        with pytest.raises(UnsupportedModelError, match="SoLU"):
            case.prism.graph(_target(case), row=B)
        pytest.skip("SoLU graphs are refused (checked above)")
    return case.prism.graph(_target(case), row=B, **kw)


def test_graph_is_exact(case):
    g = _graph(case, max_nodes=60)
    g.check()
    assert g.meta["kept_nodes"] <= 60
    logit = g.nodes.kind == "logit"
    assert g.nodes.input[logit][0] == pytest.approx(
        float(case.logits[B, I, _target(case)]), rel=1e-5
    )
    # every pruned part is in a remainder: nothing pruned leaves (almost) no remainder
    whole = _graph(case, **WHOLE).check()
    readers = np.isin(whole.nodes.kind, ("neuron", "logit"))
    scale = np.maximum(1.0, np.abs(whole.nodes.input[readers]))
    assert (np.abs(whole.nodes.remainder[readers]) <= 1e-5 * scale).all()
    assert whole.completeness_score == pytest.approx(1.0, abs=1e-6)
    assert whole.replacement_score == 1.0


def test_graph_is_exact_in_float64():
    case = build_case("gpt2/bridge", False, torch.float64)  # llama computes rotary in fp32
    g = case.prism.graph(_target(case), row=B, max_nodes=40)
    gap = g.input_gap()
    ok = ~np.isnan(gap)
    assert np.abs(gap[ok]).max() <= FP64_ATOL * max(1.0, np.abs(g.nodes.input[ok]).max())
    g.check()


def _frozen_hooks(case, exclude=()):
    """Hooks that hold every norm scale and attention pattern at the cache."""
    cache = case.cache
    names = [n for n in cache.keys() if n.endswith("hook_scale") or n.endswith("attn.hook_pattern")]
    return [(n, lambda x, hook: cache[hook.name].to(x.dtype)) for n in names if n not in exclude]


def _after_gate(view, layer, x):
    """HookedTransformer's gated MLP adds b_in after the gate's product: what a neuron's
    activation is when its node is removed."""
    if view.gated and not view.is_bridge:
        return view.b_in(layer, x.dtype, x.device)
    return torch.zeros(x.shape[-1], dtype=x.dtype, device=x.device)


def _mlp_in(view):
    return "hook_pre_linear" if view.gated else "hook_pre"


def _largest(g, kind, to_logit=False):
    rows = np.nonzero(g.nodes.kind == kind)[0]
    return int(rows[np.argmax(np.abs(g.nodes.influence[rows]))])


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_removing_a_neuron_moves_each_reader_by_its_edge(case):
    """Everything else frozen (scales, patterns, every other neuron's activation): zeroing
    neuron a's activation moves each later kept neuron's input by minus the edge."""
    g = _graph(case, **WHOLE)
    view, cache, model = case.prism.view, case.cache, case.model
    if view.n_layers < 2:
        pytest.skip("one layer: no neuron reads another")
    a = next(
        (
            int(r)
            for r in np.argsort(-np.abs(g.nodes.influence))
            if g.nodes.kind[r] == "neuron" and g.nodes.layer[r] == 0
        ),
        None,
    )
    assert a is not None
    la, ja, na = int(g.nodes.layer[a]), int(g.nodes.pos[a]), int(g.nodes.index[a])
    captured = {}

    def hold_post(x, hook):
        x = cache[hook.name].to(x.dtype).clone()
        if hook.name == f"blocks.{la}.mlp.hook_post":
            x[B, ja, na] = _after_gate(view, la, x)[na]
        return x

    def grab(x, hook):
        captured[hook.name] = x.detach().clone()

    lin = _mlp_in(view)
    hooks = _frozen_hooks(case)
    hooks += [(f"blocks.{l}.mlp.hook_post", hold_post) for l in range(view.n_layers)]
    hooks += [(f"blocks.{l}.mlp.{lin}", grab) for l in range(view.n_layers)]
    with torch.no_grad():
        model.run_with_hooks(case.tokens, fwd_hooks=hooks)
    edges = {int(d): float(w) for s, d, w in zip(g.src, g.dst, g.weight) if s == a}
    readers = np.nonzero((g.nodes.kind == "neuron") & (g.nodes.layer > la))[0]
    assert len(readers)
    for b in readers:
        lb, jb, nb = int(g.nodes.layer[b]), int(g.nodes.pos[b]), int(g.nodes.index[b])
        name = f"blocks.{lb}.mlp.{lin}"
        moved = float(captured[name][B, jb, nb] - cache[name][B, jb, nb])
        tol = CAUSAL_RTOL * max(1.0, abs(float(g.nodes.input[b])))
        assert abs(moved + edges.get(int(b), 0.0)) <= tol, (
            g.nodes.label[b],
            moved,
            edges.get(int(b)),
        )


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_removing_a_node_moves_the_logit_by_its_influence(case):
    """Ratios held, downstream neurons free to pass the change on: zeroing a's activation
    moves the (pre-soft-cap) logit by minus a's influence."""
    g = _graph(case, max_nodes=30, softcap="pre")
    view, cache, model = case.prism.view, case.cache, case.model
    a = _largest(g, "neuron")
    la, ja, na = int(g.nodes.layer[a]), int(g.nodes.pos[a]), int(g.nodes.index[a])
    lin = _mlp_in(view)
    current = {}

    def grab(x, hook):
        current[hook.layer()] = x

    def ratio_post(x, hook):
        l = hook.layer()
        bias = _after_gate(view, l, x)
        post_c = cache[hook.name].to(x.dtype) - bias
        in_c = cache[f"blocks.{l}.mlp.{lin}"].to(x.dtype)
        tiny = in_c.abs() <= 1e-12
        ratio = torch.where(tiny, torch.zeros_like(in_c), post_c / torch.where(tiny, 1.0, in_c))
        out = torch.where(tiny, post_c, ratio * current[l]) + bias
        if l == la:
            out = out.clone()
            out[B, ja, na] = bias[na]
        return out

    norm_out = {}

    def grab_final(x, hook):
        norm_out["x"] = x.detach().clone()

    hooks = _frozen_hooks(case)
    hooks += [(f"blocks.{l}.mlp.{lin}", grab) for l in range(view.n_layers)]
    hooks += [(f"blocks.{l}.mlp.hook_post", ratio_post) for l in range(view.n_layers)]
    hooks += [("ln_final.hook_normalized", grab_final)]
    with torch.no_grad():
        model.run_with_hooks(case.tokens, fwd_hooks=hooks)
    t = _target(case)
    w = view.final_norm.weight
    W_U = view.unembed_matrix()[:, t].to(norm_out["x"].dtype)
    if w is not None:
        W_U = W_U * w.to(W_U)
    d = norm_out["x"][B, I] - cache["ln_final.hook_normalized"][B, I].to(W_U)
    if view.final_norm.weight is None and view.final_norm.bias is not None:
        pass
    moved = float(d @ W_U)
    infl = float(g.nodes.influence[a])
    tol = CAUSAL_RTOL * max(1.0, abs(g.logit), abs(infl))
    assert abs(moved + infl) <= tol, (moved, infl)


def test_last_layer_head_loadings_equal_through_head_terms():
    """Paths whose earliest head is a last-layer head pass no other head: the loading of
    head (n-1, h) on an edge into the logit is that writer's term of ``through_head``."""
    case = build_case("gpt2/bridge", True)
    prism = case.prism
    t = _target(case)
    g = prism.graph(t, row=B, heads=True, **WHOLE)
    n = prism.view.n_layers
    h = 1
    col = g.head_names.index(f"L{n - 1}H{h}")
    th = prism.through_head(n - 1, h, t, neurons="all")
    into_logit = g.dst == np.nonzero(g.nodes.kind == "logit")[0][0]
    checked = 0
    for e in np.nonzero(into_logit)[0]:
        s = int(g.src[e])
        kind, j = g.nodes.kind[s], int(g.nodes.pos[s])
        if kind == "embed":
            sel = th.select(kind="embed", at=j)
            term = float(sel.values[B, 0, 0].sum())
            pe = th.select(kind="pos_embed", at=j)
            term += float(pe.values[B, 0, 0].sum()) if pe.values.shape[-1] else 0.0
        elif kind == "neuron":
            sel = th.select(
                kind="neuron", layer=int(g.nodes.layer[s]), neuron=int(g.nodes.index[s]), at=j
            )
            term = float(sel.values[B, 0, 0].sum())
        else:
            continue
        tol = CHAIN_RTOL * max(1.0, abs(g.logit))
        assert abs(g.loadings[e, col] - term) <= tol, (g.nodes.label[s], g.loadings[e, col], term)
        checked += 1
    assert checked > 5


def test_head_loadings_add_up_to_the_edges():
    case = build_case("llama/bridge", False)
    g = case.prism.graph(_target(case), row=B, heads=True, max_nodes=40)
    node = ~np.isnan(g.loadings).any(1)
    assert node.sum() > 10
    np.testing.assert_allclose(g.loadings[node].sum(1), g.weight[node], rtol=1e-5, atol=1e-5)
    assert np.isnan(g.loadings[~node]).all()  # edges from constants are not split
    assert (g.nodes.kind[g.src[~node]] == "const").all()


def test_neuron_edges_equal_through_neuron_terms():
    """The direct path of an edge into neuron b (its 'resid' loading) times b's direct logit
    term per unit of input is the writer's term of ``through_neuron``."""
    case = build_case("gpt2/bridge", False)
    prism = case.prism
    t = _target(case)
    g = prism.graph(t, row=B, heads=True, **WHOLE)
    b = next(
        int(r)
        for r in np.argsort(-np.abs(g.nodes.influence))
        if g.nodes.kind[r] == "neuron" and g.nodes.layer[r] == 1 and g.nodes.pos[r] == I
    )
    lb, nb = int(g.nodes.layer[b]), int(g.nodes.index[b])
    tn = prism.through_neuron(lb, nb, t, neurons=[0])
    direct = float(prism.neurons(t, layers=[lb]).select(neuron=nb).values[B, 0, 0].sum())
    per_input = direct / float(g.nodes.input[b])
    checked = 0
    for e in np.nonzero(g.dst == b)[0]:
        s = int(g.src[e])
        if g.nodes.kind[s] != "neuron" or g.nodes.pos[s] != I:
            continue
        term = float(
            tn.select(kind="neuron", layer=0, neuron=int(g.nodes.index[s])).values[B, 0, 0].sum()
        )
        assert g.loadings[e, 0] * per_input == pytest.approx(term, rel=1e-4, abs=1e-5)
        checked += 1
    assert checked > 5


def test_qk_explains_the_top_head_loadings():
    case = build_case("gpt2/bridge", True)
    g = case.prism.graph(_target(case), row=B, heads=True, qk=2, max_nodes=40)
    assert len(g.qk) == 2
    for rec in g.qk:
        assert rec["refused"] is None
        r = rec["result"].check()
        assert r.request.prism == "qk" and r.request.head == rec["head_index"]
        assert rec["key"] <= rec["query"] <= I
        assert rec["contrast_key"] is None or rec["contrast_key"] != rec["key"]


def test_json_round_trip_keeps_every_node_and_edge(tmp_path):
    case = build_case("gemma2/bridge", True)
    g = case.prism.graph(_target(case), row=B, heads=True, max_nodes=30)
    path = tmp_path / "graph.json"
    data = g.to_json(path)
    assert set(data) == {"metadata", "qParams", "nodes", "links"}
    assert {"node_id", "feature", "layer", "ctx_idx", "feature_type", "jsNodeId"} <= set(
        data["nodes"][0]
    )
    back = AttributionGraph.from_json(path)
    assert list(back.nodes.label) == list(g.nodes.label)
    np.testing.assert_array_equal(back.src, g.src)
    np.testing.assert_array_equal(back.dst, g.dst)
    np.testing.assert_array_equal(back.weight, g.weight)
    np.testing.assert_array_equal(back.nodes.remainder, g.nodes.remainder)
    np.testing.assert_allclose(back.loadings, g.loadings)
    back.check()


def test_a_circuit_tracer_graph_is_read():
    nodes = [
        {
            "node_id": "E_5_0",
            "feature": 0,
            "layer": "E",
            "ctx_idx": 0,
            "feature_type": "embedding",
            "jsNodeId": "E_5-0",
        },
        {
            "node_id": "0_123_1",
            "feature": 7,
            "layer": "0",
            "ctx_idx": 1,
            "feature_type": "cross layer transcoder",
            "jsNodeId": "0_123-0",
            "influence": 0.5,
            "activation": 2.0,
        },
        {
            "node_id": "0_-1_1",
            "feature": -1,
            "layer": "0",
            "ctx_idx": 1,
            "feature_type": "mlp reconstruction error",
            "jsNodeId": "0_-1-1",
        },
        {
            "node_id": "3_42_1",
            "feature": 42,
            "layer": "3",
            "ctx_idx": 1,
            "feature_type": "logit",
            "jsNodeId": "L_42-1",
            "is_target_logit": True,
            "clerp": 'Output " x" (p=0.5)',
        },
    ]
    links = [
        {"source": "E_5_0", "target": "0_123_1", "weight": 1.5},
        {"source": "0_123_1", "target": "3_42_1", "weight": 0.25},
        {"source": "0_-1_1", "target": "3_42_1", "weight": -0.1},
    ]
    g = AttributionGraph.from_json(
        json.dumps({"metadata": {"prompt_tokens": ["a", "b"]}, "nodes": nodes, "links": links})
    )
    assert list(g.nodes.kind) == ["embed", "feature", "error", "logit"]
    assert g.nodes.label[1] == "L0F123@1" and g.nodes.index[0] == 5
    assert g.n_edges == 3 and g.weight.tolist() == [1.5, 0.25, -0.1]
    with pytest.raises(CompletenessError, match="circuit-tracer"):
        g.check()
    with pytest.raises(ArgumentError, match="not among the nodes"):
        AttributionGraph.from_json(
            {"nodes": nodes, "links": links + [{"source": "x", "target": "3_42_1", "weight": 1}]}
        )


def test_paths_subgraph_and_tables():
    case = build_case("gpt2/bridge", True)
    g = case.prism.graph(_target(case), row=B, max_nodes=40).check()
    top = g.top_nodes(3)
    assert len(top) == 3 and (top.kind != "logit").all()
    paths = g.paths(k=3)
    assert 1 <= len(paths) <= 3
    assert all(p[1][-1].startswith("logit") for p in paths)
    assert abs(paths[0][0]) >= abs(paths[-1][0])
    neuron = str(g.top_nodes(1, kinds=("neuron",)).label.iloc[0])
    via = g.paths(neuron, k=2)
    assert len(via) == 2 and all(neuron in p[1] for p in via)
    sub = g.subgraph(list(top.label))
    sub.check()  # moved edges went into remainders
    assert len(sub) == 4
    edges = g.to_frame("edges")
    assert len(edges) == g.n_edges and {"source", "target", "weight", "flow"} <= set(edges)
    m = g.edge_matrix
    assert m.shape == (len(g), len(g)) and m._nnz() == g.n_edges


def test_a_designed_two_node_path_carries_the_answer():
    """Neuron 0 of layer 0 fires on token 3 and writes a direction that neuron 1 of layer 1
    reads; neuron 1 writes token 7's unembedding: the graph's strongest path is embed ->
    L0N0 -> L1N1 -> logit and carries (almost) the whole logit."""
    import transformers as tf
    from transformer_lens.model_bridge.sources import build_bridge_from_module

    V, D, M = 12, 16, 8
    cfg = tf.GPT2Config(
        vocab_size=V,
        n_embd=D,
        n_layer=2,
        n_head=2,
        n_positions=8,
        n_inner=M,
        activation_function="relu",
    )
    hf = tf.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.zero_()
        tr = hf.transformer
        for ln in (tr.h[0].ln_1, tr.h[0].ln_2, tr.h[1].ln_1, tr.h[1].ln_2, tr.ln_f):
            ln.weight.fill_(1.0)
        tr.wte.weight[torch.arange(V), torch.arange(V)] = 1.0
        tr.h[0].mlp.c_fc.weight[3, 0] = 4.0  # L0N0 reads token 3
        tr.h[0].mlp.c_proj.weight[0, 13] = 3.0  # and writes dimension 13
        tr.h[1].mlp.c_fc.weight[13, 1] = 2.0  # L1N1 reads dimension 13
        tr.h[1].mlp.c_proj.weight[1, 7] = 5.0  # and writes token 7
    bridge = build_bridge_from_module(hf, "GPT2LMHeadModel", hf_config=cfg)
    bridge.enable_compatibility_mode(disable_warnings=True)
    prism = tp.LogitPrism.run(bridge, torch.tensor([[1, 2, 3]]))
    g = prism.graph(7).check()
    value, path = g.paths(k=1)[0]
    assert path == ["@2 embed", "L0N0@2", "L1N1@2", "logit '7'@2"] or path[1:3] == [
        "L0N0@2",
        "L1N1@2",
    ]
    assert value == pytest.approx(g.logit, rel=0.05)


def test_graph_arguments_are_checked():
    case = build_case("gpt2/bridge", True)
    prism = case.prism
    with pytest.raises(ArgumentError, match="row="):
        prism.graph(5)
    for kw, match in (
        (dict(node_threshold=0), "node_threshold"),
        (dict(edge_threshold=1.5), "edge_threshold"),
        (dict(max_nodes=0), "max_nodes"),
        (dict(heads="yes"), "heads"),
        (dict(qk=-1), "qk"),
        (dict(row=9), "row"),
        (dict(nodes="features"), "nodes"),
        (dict(pos="all"), "one position"),
        (dict(pos=[1, 2]), "one position"),
    ):
        with pytest.raises(ArgumentError, match=match):
            prism.graph(5, **{"row": 0, **kw})
    with pytest.raises(Exception, match="one"):
        prism.graph([5, 6], row=0)


# ----------------------------------------------------------------------------- dictionaries
def _transcoders(model, skip_layer=None):
    from test_features import random_dictionary

    d = model.cfg.d_model
    return [
        random_dictionary(
            d,
            f"blocks.{l}.hook_mlp_out",
            10 + l,
            input_hook=f"blocks.{l}.ln2.hook_normalized",
            skip=l == skip_layer,
        )
        for l in range(model.cfg.n_layers)
    ]


def test_transcoder_graphs_are_exact(case):
    view = case.prism.view
    if view.attn_only or view.act_fn == "solu_ln" or view.parallel:
        pytest.skip("no MLP input stream for transcoders (attention-only or parallel blocks)")
    tcs = _transcoders(case.model, skip_layer=view.n_layers - 1)
    g = case.prism.graph(_target(case), row=B, nodes=tcs, max_nodes=50).check()
    kinds = set(g.nodes.kind)
    assert {"feature", "error", "embed", "logit"} <= kinds and "neuron" not in kinds
    assert 0.0 <= g.replacement_score <= 1.0
    whole = case.prism.graph(_target(case), row=B, nodes=tcs, **WHOLE).check()
    readers = np.isin(whole.nodes.kind, ("feature", "logit"))
    assert (
        np.abs(whole.nodes.remainder[readers])
        <= 1e-5 * np.maximum(1, np.abs(whole.nodes.input[readers]))
    ).all()


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_removing_a_transcoder_feature_moves_the_logit_by_its_influence():
    """In the replacement model (patterns and scales frozen, every transcoder's output its
    reconstruction plus the recorded error, feature gates held), removing feature a moves
    the logit by minus its influence."""
    case = build_case("gpt2/bridge", False)
    view, cache, model = case.prism.view, case.cache, case.model
    tcs = _transcoders(model)
    g = case.prism.graph(_target(case), row=B, nodes=tcs, max_nodes=30, softcap="pre")
    a = _largest(g, "feature")
    la, ja, fa = int(g.nodes.layer[a]), int(g.nodes.pos[a]), int(g.nodes.index[a])
    err = {}
    for d in tcs:
        x = cache[d.input_hook]
        # TransformerLens records ln2.hook_normalized before the weight and bias: apply them
        ln2 = view.ln2[d.layer]
        x_in = x * ln2.weight.to(x) + ln2.bias.to(x) if ln2.weight is not None else x
        acts = d.encode(x_in)
        err[d.layer] = cache[d.hook] - d.decode(acts)
    gates = {d.layer: (d.encode(_ln2_in(view, cache, d)) != 0).to(torch.float32) for d in tcs}
    state = {}

    def grab_in(x, hook):
        state[hook.layer()] = x

    def replace(x, hook):
        l = hook.layer()
        d = tcs[l]
        ln2 = view.ln2[l]
        x_in = state[l] * ln2.weight.to(x) + ln2.bias.to(x) if ln2.weight is not None else state[l]
        acts = d.pre_activations(x_in) * gates[l]
        if l == la:
            acts[B, ja, fa] = 0.0
        return d.decode(acts) + err[l]

    out = {}
    hooks = _frozen_hooks(case)
    hooks += [(f"blocks.{l}.ln2.hook_normalized", grab_in) for l in range(view.n_layers)]
    hooks += [(f"blocks.{l}.hook_mlp_out", replace) for l in range(view.n_layers)]
    hooks += [("ln_final.hook_normalized", lambda x, hook: out.setdefault("x", x.detach().clone()))]
    with torch.no_grad():
        model.run_with_hooks(case.tokens, fwd_hooks=hooks)
    t = _target(case)
    W_U = view.unembed_matrix()[:, t].to(out["x"])
    if view.final_norm.weight is not None:
        W_U = W_U * view.final_norm.weight.to(W_U)
    moved = float((out["x"][B, I] - cache["ln_final.hook_normalized"][B, I]) @ W_U)
    infl = float(g.nodes.influence[a])
    assert abs(moved + infl) <= CAUSAL_RTOL * max(1.0, abs(g.logit), abs(infl)), (moved, infl)


def _ln2_in(view, cache, d):
    x = cache[d.input_hook]
    ln2 = view.ln2[d.layer]
    return x * ln2.weight.to(x) + ln2.bias.to(x) if ln2.weight is not None else x


def _relu_gpt2(seed: int = 0):
    import transformers as tf
    from transformer_lens.model_bridge.sources import build_bridge_from_module

    torch.manual_seed(seed)
    cfg = tf.GPT2Config(
        vocab_size=30,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=16,
        n_inner=64,
        activation_function="relu",
    )
    hf = tf.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.mul_(8.0)
    bridge = build_bridge_from_module(hf, "GPT2LMHeadModel", hf_config=cfg)
    bridge.enable_compatibility_mode(disable_warnings=True)
    return bridge


def test_a_lossless_transcoder_has_zero_errors():
    """A transcoder whose features are the neurons of a ReLU model (W_enc = W_in, W_dec =
    W_out) reconstructs exactly: every error is 0 and the features are the neurons."""
    model = _relu_gpt2()
    prism = tp.LogitPrism.run(model, torch.tensor([[1, 5, 9, 2, 7]]))
    tcs = []
    for l in range(model.cfg.n_layers):
        mlp = model.blocks[l].mlp
        tcs.append(
            tp.Dictionary(
                mlp.W_in.detach(),
                mlp.b_in.detach(),
                mlp.W_out.detach(),
                mlp.b_out.detach(),
                f"blocks.{l}.hook_mlp_out",
                input_hook=f"blocks.{l}.ln2.hook_normalized",
            )
        )
    g = prism.graph(3, nodes=tcs, **WHOLE).check()
    n = prism.graph(3, **WHOLE).check()
    errs = g.nodes.influence[g.nodes.kind == "error"]
    assert np.abs(errs).max() < 1e-4 * max(1.0, abs(g.logit))
    assert sorted(g.nodes.label[g.nodes.kind == "feature"]) == sorted(
        str(x).replace("N", "F") for x in n.nodes.label[n.nodes.kind == "neuron"]
    )


def test_cross_layer_transcoder_graph_is_exact(tmp_path):
    from test_dictionary_formats import write_clt

    from tlprisms.demo import load_demo_model

    model = load_demo_model()
    prism = tp.LogitPrism.run(model, "The capital of France is")
    folder, _, _ = write_clt(tmp_path / "clt", n=model.cfg.n_layers, d=model.cfg.d_model, f=24)
    clt = tp.Dictionary.from_circuit_tracer_clt(folder)
    g = prism.graph(" Paris", nodes=clt, **WHOLE).check()
    feats = g.nodes.kind == "feature"
    assert feats.any() and (g.nodes.kind == "error").sum() == model.cfg.n_layers * 6
    # a layer-0 feature writes into layer 1's MLP output too: its edge into the logit is
    # the sum of both writes (checked through completeness above); and it has one
    l0 = np.nonzero(feats & (g.nodes.layer == 0))[0]
    logit = np.nonzero(g.nodes.kind == "logit")[0][0]
    assert any(int(d) == logit for s, d in zip(g.src, g.dst) if s in set(l0.tolist()))


def test_saes_are_refused_in_graphs():
    from test_features import random_dictionary

    case = build_case("gpt2/bridge", True)
    sae = random_dictionary(case.model.cfg.d_model, "blocks.0.hook_resid_post", 1)
    with pytest.raises(ArgumentError, match="SAE.*transcoders"):
        case.prism.graph(_target(case), row=B, nodes=[sae])


# ----------------------------------------------------------------------------- verify
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_verify_passes_genuine_graphs(case):
    g = _graph(case, max_nodes=40)
    v = case.prism.verify(g, k=8, sample=8)
    assert v.ok, str(v)
    assert v.nodes_checked == 16 and "constants" in str(v)
    assert sum(r["what"] == "edge" for r in v.rows) > 16


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_verify_passes_transcoder_graphs():
    case = build_case("gemma2/bridge", False)
    tcs = _transcoders(case.model, skip_layer=1)
    g = case.prism.graph(_target(case), row=B, nodes=tcs, max_nodes=40)
    v = case.prism.verify(g, k=8, sample=8)
    assert v.ok, str(v)
    checked = {r["node"] for r in v.rows}
    assert any("F" in n for n in checked) and any("error" in n for n in checked | {"error"})


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_verify_fails_tampered_graphs():
    case = build_case("llama/bridge", True)
    g = case.prism.graph(_target(case), row=B, max_nodes=40)
    top = int(np.argmax(np.abs(np.where(g.nodes.kind == "neuron", g.nodes.influence, 0))))
    bad = AttributionGraph(**{**g.__dict__, "weight": g.weight.copy()})
    e = int(np.nonzero(bad.src == top)[0][0])
    bad.weight[e] *= 1.5
    bad.nodes.remainder[bad.dst[e]] -= bad.weight[e] / 3  # sums still hold
    bad.check()
    v = case.prism.verify(bad, k=3, sample=0)
    assert not v.ok and "FAILED" in str(v)
    with pytest.raises(tp.errors.VerificationError, match="moved"):
        v.check()
    g2 = case.prism.graph(_target(case), row=B, max_nodes=40)
    g2.nodes.influence[top] *= 2
    assert not case.prism.verify(g2, k=3, sample=0).ok


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_verify_refuses_a_model_in_train_mode():
    from tlprisms.demo import load_demo_model

    model = load_demo_model()
    prism = tp.LogitPrism.run(model, "The capital of France is")
    g = prism.graph(" Paris", max_nodes=10)
    model.train()
    try:
        with pytest.raises(ArgumentError, match="model.eval"):
            prism.verify(g)
    finally:
        model.eval()


def test_a_graph_of_the_predicted_token():
    from tlprisms.demo import load_demo_model

    prism = tp.LogitPrism.run(load_demo_model(), "The capital of France is")
    assert (
        prism.graph(max_nodes=10).check().meta["target_label"]
        == prism.graph(" Paris", max_nodes=10).meta["target_label"]
    )


def test_verify_refuses_imported_graphs():
    case = build_case("gpt2/bridge", True)
    g = case.prism.graph(_target(case), row=B, max_nodes=10)
    data = g.to_json()
    del data["metadata"]["tlprisms"]
    with pytest.raises(ArgumentError, match="circuit-tracer"):
        case.prism.verify(AttributionGraph.from_json(data))
