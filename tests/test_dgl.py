"""se3nb fed real DGL graphs (NVIDIA's input type) gives the same results as fed its own graphs, on the shared NVIDIA
fixtures.

Needs DGL (only dgl==2.1.0 exists for Python 3.11, with torch==2.2.1): run by the legacy CI leg `.ci/legacy_dgl.sh`;
skipped elsewhere. The DGL-free parts of the drop-in path are tested in test_nvidia_checkpoints.py."""

import pytest
import torch

from se3nb.graph import batch_graphs, radius_graph
from se3nb.model import SE3Transformer
from se3nb.nvidia import NVIDIACompatModel, as_graph, from_dgl, from_nvidia, is_dgl_graph, nvidia_graph, to_dgl

pytestmark = pytest.mark.dgl

MODEL_FIXTURES = [f"{c}_{v}" for c in ("graph2graph", "qm9", "rf_like") for v in ("none", "partial", "full")]


@pytest.fixture(scope="module")
def dgl():
    return pytest.importorskip("dgl")


def load(nvidia_dir, name):
    return torch.load(nvidia_dir / f"{name}.pt", weights_only=True)


def dgl_graph(dgl, g, rel_pos):
    """The DGL graph NVIDIA's code would feed: one `dgl.graph` per molecule, `dgl.batch`ed, as its QM9 data loader
    does."""
    bnn, bne = g["batch_num_nodes"].tolist(), g["batch_num_edges"].tolist()
    node_offsets = torch.tensor([0] + bnn[:-1]).cumsum(0).tolist()
    graphs, e0 = [], 0
    for n, e, o in zip(bnn, bne, node_offsets):
        part = dgl.graph((g["src"][e0 : e0 + e] - o, g["dst"][e0 : e0 + e] - o), num_nodes=n)
        part.edata["rel_pos"] = rel_pos[e0 : e0 + e]
        graphs.append(part)
        e0 += e
    return dgl.batch(graphs) if len(graphs) > 1 else graphs[0]


def fixture_inputs(dgl, fx, rotated=False):
    s = "_rotated" if rotated else ""
    g = fx["graph"]
    return (
        dgl_graph(dgl, g, fx["rel_pos" + s]),
        nvidia_graph(g["src"], g["dst"], g["num_nodes"], fx["rel_pos" + s], g["batch_num_nodes"]),
        fx["node_feats" + s],
        fx["edge_feats" + s] or None,
    )


def flat(out):
    return torch.cat([v.flatten() for v in out.values()]) if isinstance(out, dict) else out.flatten()


def test_is_dgl_graph(dgl):
    g = dgl.graph(([0, 1], [1, 0]))
    g.edata["rel_pos"] = torch.randn(2, 3)
    assert is_dgl_graph(g) and not is_dgl_graph(from_dgl(g)) and not is_dgl_graph(object())


@pytest.mark.parametrize("name", MODEL_FIXTURES)
def test_dgl_graph_gives_same_outputs_as_se3nb_graph(dgl, nvidia_dir, name):
    fx = load(nvidia_dir, name)
    model = NVIDIACompatModel(fx["model"], fx["kwargs"], fx["state_dict"]).eval()
    atol = max(1e-5 * max(1.0, fx["output_abs_max"]), 20 * fx["equivariance_error"])
    for rotated in (False, True):
        g, graph, nf, ef = fixture_inputs(dgl, fx, rotated)
        assert g.batch_size == len(fx["graph"]["batch_num_nodes"])
        with torch.no_grad():
            out_dgl, out_se3nb = model(g, nf, ef), model(graph, nf, ef)
        assert torch.equal(flat(out_dgl), flat(out_se3nb))
        ref = fx["output_rotated" if rotated else "output"]
        assert (flat(out_dgl) - flat(ref)).abs().max().item() < atol  # and both are NVIDIA's


@pytest.mark.parametrize(
    "name,position_grad",
    [
        ("rf_like_none", True),
        ("graph2graph_partial", True),
        ("qm9_full", True),
        ("rf_like_partial", True),
        ("graph2graph_none", False),
    ],
)
def test_dgl_graph_gives_same_gradients(dgl, nvidia_dir, name, position_grad):
    """Parameter, feature and position gradients (forces flow through edata['rel_pos']). Not positions with
    low_memory=True (the `_none` fixtures): see test_nvidia_checkpoints.py::test_low_memory_position_gradients, an se3nb
    bug."""
    fx = load(nvidia_dir, name)
    model = NVIDIACompatModel(fx["model"], fx["kwargs"], fx["state_dict"]).eval()
    grads = []
    for use_dgl in (True, False):
        g, graph, nf, ef = fixture_inputs(dgl, fx)
        rel_pos = fx["rel_pos"].clone().requires_grad_(position_grad)
        if use_dgl:
            g.edata["rel_pos"] = rel_pos
        else:
            graph.rel_pos = rel_pos
        nf = {k: v.clone().requires_grad_() for k, v in nf.items()}
        model.zero_grad()
        flat(model(g if use_dgl else graph, nf, ef)).sum().backward()
        grads.append(
            ([rel_pos.grad] if position_grad else [])
            + [v.grad for v in nf.values()]
            + [p.grad for p in model.parameters()]
        )
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * max(1.0, b.abs().max().item()))


def test_batched_dgl_graph_equals_se3nb_graph(dgl, nvidia_dir):
    fx = load(nvidia_dir, "qm9_batch64")
    g = dgl_graph(dgl, fx, fx["rel_pos"])
    graph = from_dgl(g)
    assert graph.num_graphs == 64 and graph.num_nodes == fx["num_nodes"]
    assert torch.equal(graph.edge_index, torch.stack([fx["src"], fx["dst"]]))
    assert torch.equal(graph.batch_num_nodes, fx["batch_num_nodes"]) and torch.equal(
        graph.batch_num_edges, fx["batch_num_edges"]
    )
    assert torch.equal(graph.rel_pos, fx["rel_pos"])


@pytest.mark.parametrize("idtype", [torch.int64, torch.int32])
def test_to_dgl_round_trip(dgl, idtype):
    gen = torch.Generator().manual_seed(0)
    graphs = [radius_graph(torch.randn(n, 3, generator=gen), 1.8) for n in (7, 1, 12)]
    graph = batch_graphs(graphs)
    g = to_dgl(graph, idtype=idtype)
    assert g.idtype == idtype and g.batch_size == 3
    assert torch.equal(g.ndata["pos"], graph.pos) and torch.equal(g.edata["rel_pos"], graph.rel_pos)
    for part, ours in zip(dgl.unbatch(g), graphs):  # DGL sees the same per-graph structure
        assert part.num_nodes() == ours.num_nodes and part.num_edges() == ours.num_edges
    back = from_dgl(g)
    assert torch.equal(back.edge_index, graph.edge_index) and torch.equal(back.rel_pos, graph.rel_pos)
    assert torch.equal(back.batch_num_nodes, graph.batch_num_nodes) and torch.equal(
        back.batch_num_edges, graph.batch_num_edges
    )
    assert as_graph(g).num_graphs == 3


def test_from_nvidia_model_accepts_dgl_graph_and_core_refuses_it(dgl, nvidia_dir):
    """The model from_nvidia builds takes a DGL graph as it takes the se3nb graph (was: the core model took it); the
    core model itself takes se3nb graphs only and says where DGL graphs go."""
    fx = load(nvidia_dir, "rf_like_partial")
    model = from_nvidia(fx["model"], fx["kwargs"], fx["state_dict"]).eval()  # an se3nb SE3Transformer
    g, graph, nf, ef = fixture_inputs(dgl, fx)
    with torch.no_grad():
        assert torch.equal(flat(model(g, nf, ef)), flat(model(graph, nf, ef)))
    core = SE3Transformer.forward
    int_nf, int_ef = {int(k): v for k, v in nf.items()}, {int(k): v for k, v in ef.items()}
    with pytest.raises(TypeError, match="se3nb.nvidia.from_dgl"):
        core(model, g, int_nf, int_ef)


def test_missing_rel_pos_says_what_to_set(dgl):
    g = dgl.graph(([0, 1, 2], [1, 2, 0]))
    with pytest.raises(
        KeyError, match=r"set g.edata\['rel_pos'\] to the \[E, 3\] edge vectors pos\[dst\] - pos\[src\]"
    ):
        as_graph(g)
    g.ndata["pos"] = torch.randn(3, 3)
    with pytest.raises(KeyError, match=r"g.edata\['rel_pos'\] = g.ndata\['pos'\]\[dst\] - g.ndata\['pos'\]\[src\]"):
        as_graph(g)
    src, dst = g.edges()
    g.edata["rel_pos"] = g.ndata["pos"][dst] - g.ndata["pos"][src]
    assert torch.equal(as_graph(g).rel_pos, g.edata["rel_pos"])


def test_heterograph_is_refused(dgl):
    g = dgl.heterograph({("atom", "bond", "atom"): ([0], [1]), ("atom", "near", "atom"): ([1], [0])})
    with pytest.raises(ValueError, match="to_homogeneous"):
        from_dgl(g)


def test_features_on_another_device_say_what_to_move(dgl, nvidia_dir):
    fx = load(nvidia_dir, "graph2graph_none")
    model = NVIDIACompatModel(fx["model"], fx["kwargs"], fx["state_dict"])
    g, _, nf, ef = fixture_inputs(dgl, fx)
    with pytest.raises(
        ValueError, match=r"node_feats\['0'\] is on meta but the DGL graph is on cpu.*graph = graph.to\(device\)"
    ):
        model(g, {k: v.to("meta") for k, v in nf.items()}, ef)
    with pytest.raises(ValueError, match=r"edge_feats\['0'\] is on meta but the DGL graph is on cpu"):
        model(g, nf, {k: v.to("meta") for k, v in ef.items()})


@pytest.mark.parametrize("name", ["rf_like_partial", "qm9_full"])
def test_nvidia_named_classes_take_dgl_graphs(dgl, nvidia_dir, name):
    """se3nb.nvidia's SE3Transformer / SE3TransformerPooled (NVIDIA's names) on a real DGL graph: the outputs of the
    se3nb graph, bit for bit."""
    from se3nb.nvidia import SE3Transformer as NVSE3Transformer, SE3TransformerPooled as NVPooled

    fx = load(nvidia_dir, name)
    model = (NVSE3Transformer if fx["model"] == "SE3Transformer" else NVPooled)(**fx["kwargs"])
    model.load_state_dict(fx["state_dict"])
    g, graph, nf, ef = fixture_inputs(dgl, fx)
    with torch.no_grad():
        assert torch.equal(flat(model.eval()(g, nf, ef)), flat(model(graph, nf, ef)))
