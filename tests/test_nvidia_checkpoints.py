"""NVIDIA drop-in path without DGL: NVIDIACompatModel (NVIDIA's call signature and key names), NVIDIA training
checkpoints both ways (weights and optimizer state, every fusion layout), clear errors for bad files, and DGL-free graph
conversion."""

import argparse
import subprocess
import sys

import pytest
import torch

from nvidia_fixtures import run_nvidia_fixture
from se3nb.graph import Graph, radius_graph
from se3nb.nvidia import (
    NVIDIACompatModel,
    as_graph,
    from_dgl,
    from_nvidia,
    load_nvidia_checkpoint,
    nvidia_graph,
    nvidia_optimizer_state_to_se3nb,
    save_nvidia_checkpoint,
    se3nb_key_to_nvidia,
    to_dgl,
)
from se3nb.backends import override

MODEL_FIXTURES = [f"{c}_{v}" for c in ("graph2graph", "qm9", "rf_like") for v in ("none", "partial", "full")]


def load(nvidia_dir, name):
    return torch.load(nvidia_dir / f"{name}.pt", weights_only=True)


def fixture_graph(fx, rotated=False):
    g = fx["graph"]
    return nvidia_graph(
        g["src"], g["dst"], g["num_nodes"], fx["rel_pos_rotated" if rotated else "rel_pos"], g["batch_num_nodes"]
    )


def max_diff(a, b):
    if isinstance(b, dict):
        assert list(a) == list(b) or set(a) == set(b), (list(a), list(b))
        return max((a[k] - b[k]).abs().max().item() for k in b)
    return (a - b).abs().max().item()


def total(out):
    return sum(v.sum() for v in out.values()) if isinstance(out, dict) else out.sum()


def nvidia_order_adam_step(fx, lr=1e-3):
    """An Adam step over NVIDIA's parameters in NVIDIA's order with NVIDIA's gradients: the optimizer state NVIDIA's
    script saves."""
    params = [torch.nn.Parameter(v.clone()) for v in fx["state_dict"].values()]
    for p, k in zip(params, fx["state_dict"]):
        p.grad = fx["grads"][k].clone()
    opt = torch.optim.Adam(params, lr=lr)
    opt.step()
    return opt.state_dict()


def nvidia_checkpoint(fx, epoch=5):
    return {
        "state_dict": fx["state_dict"],
        "optimizer_state_dict": nvidia_order_adam_step(fx),
        "epoch": epoch,
        "scheduler_state_dict": {"last_epoch": epoch, "base_lrs": [1e-3]},
    }


@pytest.mark.parametrize("name", MODEL_FIXTURES)
def test_compat_model_matches_nvidia_with_str_keys(nvidia_dir, name):
    fx = load(nvidia_dir, name)
    model = NVIDIACompatModel(fx["model"], fx["kwargs"], fx["state_dict"]).eval()
    plain = from_nvidia(fx["model"], fx["kwargs"], fx["state_dict"]).eval()
    with torch.no_grad():
        out = model(fixture_graph(fx), fx["node_feats"], fx["edge_feats"] or None, None)  # NVIDIA's positional call
        assert type(out) is type(fx["output"])
        if isinstance(out, dict):
            assert all(isinstance(k, str) for k in out)
        ref = run_nvidia_fixture(fx, plain)
    assert max_diff(out, ref) == 0.0  # the wrapper adds nothing to the computation
    atol = max(1e-5 * max(1.0, fx["output_abs_max"]), 20 * fx["equivariance_error"])
    assert max_diff(out, fx["output"]) < atol


@pytest.mark.parametrize("name", MODEL_FIXTURES)
def test_compat_state_dict_is_nvidias(nvidia_dir, name):
    """state_dict() gives NVIDIA's keys in NVIDIA's order; load_state_dict() takes them (any fusion layout)."""
    fx = load(nvidia_dir, name)
    model = NVIDIACompatModel(fx["model"], fx["kwargs"], fx["state_dict"])
    sd = model.state_dict()
    assert list(sd) == list(fx["state_dict"])
    assert all(torch.equal(sd[k], fx["state_dict"][k]) for k in sd)
    fresh = NVIDIACompatModel(fx["model"], fx["kwargs"])
    assert fresh.nvidia_key_order is None
    fresh.load_state_dict(fx["state_dict"])  # NVIDIA's own `model.load_state_dict(checkpoint['state_dict'])`
    assert fresh.nvidia_key_order == list(fx["state_dict"])
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), model.parameters()))
    nested = torch.nn.Sequential(fresh)  # the hooks respect prefixes
    assert list(nested.state_dict()) == ["0." + k for k in fx["state_dict"]]


def test_compat_load_state_dict_refuses_wrong_configuration(nvidia_dir):
    fx = load(nvidia_dir, "qm9_partial")
    other = NVIDIACompatModel(fx["model"], {**fx["kwargs"], "num_channels": 32})
    with pytest.raises(RuntimeError, match="size mismatch"):
        other.load_state_dict(fx["state_dict"])
    assert other.nvidia_key_order is None


@pytest.mark.parametrize("name", MODEL_FIXTURES)
def test_checkpoint_file_loads_weights_and_optimizer_state(nvidia_dir, tmp_path, name):
    """A checkpoint as NVIDIA's training script writes it (saved from the GPU would only change map_location) loads with
    the optimizer moments attached to the right se3nb parameters, although the two libraries order parameters
    differently."""
    fx = load(nvidia_dir, name)
    torch.save(nvidia_checkpoint(fx), tmp_path / "ckpt.pt")
    ckpt = load_nvidia_checkpoint(tmp_path / "ckpt.pt", fx["model"], fx["kwargs"])
    assert ckpt.epoch == 5 and ckpt.extra == {"scheduler_state_dict": {"last_epoch": 5, "base_lrs": [1e-3]}}
    opt = torch.optim.Adam(ckpt.model.parameters(), lr=1e-3)
    opt.load_state_dict(ckpt.optimizer_state_dict)
    names = [k for k in ckpt.model.state_dict()]  # NVIDIA names; map each se3nb parameter to its NVIDIA name
    inner = dict(ckpt.model.model.named_parameters())
    for se3nb_name, p in inner.items():
        nv = se3nb_key_to_nvidia(se3nb_name)
        assert nv in names
        torch.testing.assert_close(opt.state[p]["exp_avg"], 0.1 * fx["grads"][nv], rtol=1e-6, atol=0)
        assert torch.equal(p.detach(), fx["state_dict"][nv])
    with torch.no_grad():
        out = run_nvidia_fixture(fx, ckpt.model.model.eval())
    atol = max(1e-5 * max(1.0, fx["output_abs_max"]), 20 * fx["equivariance_error"])
    assert max_diff(out, fx["output"]) < atol


@pytest.mark.parametrize("name", ["qm9_none", "rf_like_full", "graph2graph_partial"])
def test_checkpoint_round_trip_resumes_identically(nvidia_dir, tmp_path, name):
    """se3nb -> NVIDIA file -> se3nb: weights and optimizer state unchanged, NVIDIA's order kept; two more Adam steps
    agree."""
    fx = load(nvidia_dir, name)
    torch.save(nvidia_checkpoint(fx), tmp_path / "a.pt")
    first = load_nvidia_checkpoint(tmp_path / "a.pt", fx["model"], fx["kwargs"])
    opt = torch.optim.Adam(first.model.parameters(), lr=1e-3)
    opt.load_state_dict(first.optimizer_state_dict)
    written = save_nvidia_checkpoint(first.model, tmp_path / "b.pt", optimizer=opt, epoch=6, extra=first.extra)
    assert list(written["state_dict"]) == list(fx["state_dict"])
    assert list(written) == ["state_dict", "optimizer_state_dict", "epoch", "scheduler_state_dict"]
    original = nvidia_checkpoint(fx)["optimizer_state_dict"]  # NVIDIA's numbering must come back exactly
    for i, s in original["state"].items():
        assert all(torch.equal(s[k], written["optimizer_state_dict"]["state"][i][k]) for k in s)
    assert written["optimizer_state_dict"]["param_groups"] == original["param_groups"]
    second = load_nvidia_checkpoint(tmp_path / "b.pt", fx["model"], fx["kwargs"])
    opt2 = torch.optim.Adam(second.model.parameters(), lr=1e-3)
    opt2.load_state_dict(second.optimizer_state_dict)
    assert second.epoch == 6
    graph = fixture_graph(fx)
    for model, o in ((first.model, opt), (second.model, opt2)):
        for _ in range(2):
            o.zero_grad()
            total(model(graph, fx["node_feats"], fx["edge_feats"] or None)).backward()
            o.step()
    for p, q in zip(
        first.model.parameters(), second.model.parameters()
    ):  # a misplaced moment would differ by ~lr = 1e-3
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


def test_bare_and_ddp_state_dicts_load(nvidia_dir, tmp_path):
    fx = load(nvidia_dir, "qm9_partial")
    torch.save(fx["state_dict"], tmp_path / "bare.pt")
    ckpt = load_nvidia_checkpoint(tmp_path / "bare.pt", fx["model"], fx["kwargs"])
    assert ckpt.epoch is None and ckpt.optimizer_state_dict is None
    ddp = {"state_dict": {"module." + k: v for k, v in fx["state_dict"].items()}, "epoch": 1}
    ckpt = load_nvidia_checkpoint(ddp, fx["model"], fx["kwargs"])  # a dict works as well as a path
    assert list(ckpt.model.state_dict()) == list(fx["state_dict"])


def test_plain_se3nb_model_exports_weights_but_needs_nvidia_order_for_optimizer(nvidia_dir, tmp_path):
    fx = load(nvidia_dir, "qm9_full")
    plain = from_nvidia(fx["model"], fx["kwargs"], fx["state_dict"])
    written = save_nvidia_checkpoint(plain, tmp_path / "w.pt", epoch=2)
    assert "optimizer_state_dict" not in written and set(written["state_dict"]) == set(fx["state_dict"])
    opt = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    total(run_nvidia_fixture(fx, plain)).backward()
    opt.step()
    with pytest.raises(ValueError, match="nvidia_key_order"):
        save_nvidia_checkpoint(plain, tmp_path / "o.pt", optimizer=opt)
    written = save_nvidia_checkpoint(plain, tmp_path / "o.pt", optimizer=opt, nvidia_key_order=list(fx["state_dict"]))
    assert list(written["state_dict"]) == list(fx["state_dict"])
    nv = written["optimizer_state_dict"]
    for i, k in enumerate(fx["state_dict"]):  # NVIDIA's i-th parameter gets its own momentum buffer
        assert nv["state"][i]["momentum_buffer"].shape == fx["state_dict"][k].shape
    back = nvidia_optimizer_state_to_se3nb(nv, written["state_dict"], plain)
    assert all(
        torch.equal(back["state"][j]["momentum_buffer"], s["momentum_buffer"])
        for j, s in opt.state_dict()["state"].items()
    )


def test_bad_files_give_clear_errors(nvidia_dir, tmp_path):
    fx = load(nvidia_dir, "qm9_partial")
    args = (fx["model"], fx["kwargs"])
    with pytest.raises(FileNotFoundError, match="no checkpoint file"):
        load_nvidia_checkpoint(tmp_path / "missing.pt", *args)
    (tmp_path / "junk.pt").write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match="not a readable torch.save file"):
        load_nvidia_checkpoint(tmp_path / "junk.pt", *args)
    torch.save(nvidia_checkpoint(fx), tmp_path / "full.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "full.pt").read_bytes()[:5000])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_nvidia_checkpoint(tmp_path / "cut.pt", *args)
    torch.save({"state_dict": fx["state_dict"], "args": argparse.Namespace(lr=1)}, tmp_path / "pickled.pt")
    with pytest.raises(ValueError, match="weights_only=False"):
        load_nvidia_checkpoint(tmp_path / "pickled.pt", *args)
    torch.save({"model": fx["state_dict"], "epoch": 1}, tmp_path / "nokey.pt")
    with pytest.raises(KeyError, match="no 'state_dict' entry"):
        load_nvidia_checkpoint(tmp_path / "nokey.pt", *args)
    with pytest.raises(ValueError, match="shape mismatches"):  # load_nvidia_state_dict's message
        load_nvidia_checkpoint(tmp_path / "full.pt", fx["model"], {**fx["kwargs"], "num_channels": 32})
    broken = nvidia_checkpoint(fx)
    broken["optimizer_state_dict"]["param_groups"][0]["params"] = broken["optimizer_state_dict"]["param_groups"][0][
        "params"
    ][:-1]
    with pytest.raises(ValueError, match="covers 148 parameters but the model has 149"):
        load_nvidia_checkpoint(broken, *args)
    shuffled = nvidia_checkpoint(fx)  # optimizer state saved in another order than the state_dict's: caught by shapes
    shuffled["state_dict"] = dict(reversed(list(fx["state_dict"].items())))
    with pytest.raises(ValueError, match="does not belong to this parameter order"):
        load_nvidia_checkpoint(shuffled, *args)


def test_forward_arguments_like_nvidia(nvidia_dir):
    fx = load(nvidia_dir, "graph2graph_partial")
    model = NVIDIACompatModel(fx["model"], fx["kwargs"], fx["state_dict"]).eval()
    graph = fixture_graph(fx)
    with torch.no_grad():
        ref = model(graph, fx["node_feats"], fx["edge_feats"])
        with pytest.warns(UserWarning, match="get_basis are not used"):
            out = model(graph, fx["node_feats"], fx["edge_feats"], {"0,0": torch.zeros(1)})
        assert max_diff(out, ref) == 0.0
        from se3nb.basis import Bases
        from se3nb.conv import edge_invariants
        from se3nb.so2 import EdgeFrames

        inv = edge_invariants(graph.rel_pos, {int(k): v for k, v in fx["edge_feats"].items()})
        out = model(graph, fx["node_feats"], fx["edge_feats"], basis=EdgeFrames(graph, 2, inv))
        scale = max(v.abs().max().item() for v in ref.values())  # built frames run the torch path, ref the fused one
        assert max_diff(out, ref) < 1e-5 * scale
        with pytest.raises(TypeError, match="needs EdgeFrames"):
            model(graph, fx["node_feats"], fx["edge_feats"], basis=Bases(graph.rel_pos, 2))
        with pytest.raises(TypeError, match="basis must be"):
            model(graph, fx["node_feats"], fx["edge_feats"], basis=torch.zeros(3))
        with pytest.raises(ValueError, match="graph = graph.to"):
            model(graph, {k: v.to("meta") for k, v in fx["node_feats"].items()}, fx["edge_feats"])
        with pytest.raises(TypeError, match="se3nb Graph or a dgl.DGLGraph"):
            model({"src": graph.src}, fx["node_feats"], fx["edge_feats"])


class FakeDGLGraph:
    """The few DGLGraph methods from_dgl reads (edges, num_nodes, edata, ndata, batch sizes), to test it without DGL."""

    def __init__(self, graph, edata=None, ndata=None, homogeneous=True):
        self.graph, self.edata, self.ndata, self.is_homogeneous = graph, edata or {}, ndata or {}, homogeneous
        self.canonical_etypes = [("_N", "_E", "_N")] if homogeneous else [("a", "x", "b"), ("b", "y", "a")]

    def edges(self):
        return self.graph.src, self.graph.dst

    def num_nodes(self):
        return self.graph.num_nodes

    def batch_num_nodes(self):
        return self.graph.batch_num_nodes

    def batch_num_edges(self):
        return self.graph.batch_num_edges


def test_from_dgl_reads_edges_rel_pos_and_batch_sizes(nvidia_dir):
    fx = load(nvidia_dir, "qm9_batch8")
    pos = fx["pos"]
    graph = Graph(
        torch.stack([fx["src"], fx["dst"]]),
        fx["num_nodes"],
        rel_pos=fx["rel_pos"],
        batch_num_nodes=fx["batch_num_nodes"],
        batch_num_edges=fx["batch_num_edges"],
    )
    back = from_dgl(FakeDGLGraph(graph, edata={"rel_pos": fx["rel_pos"]}))
    assert torch.equal(back.edge_index, graph.edge_index) and torch.equal(back.rel_pos, fx["rel_pos"])
    assert torch.equal(back.batch_num_nodes, fx["batch_num_nodes"]) and torch.equal(
        back.batch_num_edges, fx["batch_num_edges"]
    )
    with pytest.raises(KeyError, match=r"g.edata\['rel_pos'\] = g.ndata\['pos'\]\[dst\] - g.ndata\['pos'\]\[src\]"):
        from_dgl(FakeDGLGraph(graph, ndata={"pos": pos}))
    with pytest.raises(KeyError, match=r"no edata\['rel_pos'\].*pos\[dst\] - pos\[src\]"):
        from_dgl(FakeDGLGraph(graph, edata={"x": fx["rel_pos"]}))
    with pytest.raises(ValueError, match=r"must be a \[E, 3\]"):
        from_dgl(FakeDGLGraph(graph, edata={"rel_pos": pos}))
    with pytest.raises(ValueError, match="to_homogeneous"):
        from_dgl(FakeDGLGraph(graph, edata={"rel_pos": fx["rel_pos"]}, homogeneous=False))
    assert as_graph(graph) is graph
    with pytest.raises(TypeError, match="se3nb Graph or a dgl.DGLGraph"):
        as_graph(FakeDGLGraph(graph, edata={"rel_pos": fx["rel_pos"]}))  # only real DGL graphs are converted implicitly


def test_se3nb_never_imports_dgl():
    code = (
        "import sys, se3nb, se3nb.nvidia, se3nb.compat, se3nb.dgl_interop, se3nb.model; "
        "from se3nb.nvidia import as_graph; from se3nb.graph import radius_graph; import torch; "
        "as_graph(radius_graph(torch.randn(5, 3), 2.0)); assert 'dgl' not in sys.modules, 'dgl imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_to_dgl_without_dgl_names_the_extra():
    try:
        import dgl  # noqa: F401

        pytest.skip("DGL is installed here")
    except ImportError:
        pass
    with pytest.raises(ImportError, match=r"se3nb\[dgl\]"):
        to_dgl(radius_graph(torch.randn(5, 3), 2.0))


def test_low_memory_position_gradients(nvidia_dir):
    fx = load(nvidia_dir, "rf_like_none")
    model = from_nvidia(fx["model"], fx["kwargs"], fx["state_dict"])
    assert model.low_memory
    g = fx["graph"]
    rel_pos = fx["rel_pos"].clone().requires_grad_()
    total(
        model(nvidia_graph(g["src"], g["dst"], g["num_nodes"], rel_pos), fx["node_feats"], fx["edge_feats"] or None)
    ).backward()
    reference = fx["rel_pos"].clone().requires_grad_()
    model.low_memory = False
    total(
        model(nvidia_graph(g["src"], g["dst"], g["num_nodes"], reference), fx["node_feats"], fx["edge_feats"] or None)
    ).backward()
    torch.testing.assert_close(rel_pos.grad, reference.grad, rtol=0, atol=1e-5 * reference.grad.abs().max().item())


@pytest.mark.parametrize("conv", ["so2", "reference"])
def test_position_gradients_include_the_basis(conv):
    """NVIDIA difference: its forward builds the basis with get_basis(compute_gradients=False), so
    d(output)/d(positions) (forces) sees only the edge lengths. se3nb's gradient is the true one: it matches central
    finite differences in float64, and detaching the basis (NVIDIA's behaviour) does not."""
    from se3nb.conv import edge_invariants

    torch.manual_seed(0)
    with override(conv=conv):
        model = from_nvidia(
            "SE3Transformer",
            dict(
                num_layers=1,
                fiber_in={0: 2, 1: 1},
                fiber_hidden={0: 4, 1: 4},
                fiber_out={0: 1, 1: 1},
                num_heads=2,
                channels_div=2,
                fiber_edge={},
                return_type=None,
                pooling=None,
            ),
        ).double()
    pos = torch.randn(6, 3, dtype=torch.float64)
    graph = radius_graph(pos, 10.0)
    feats = {0: torch.randn(6, 2, 1, dtype=torch.float64), 1: torch.randn(6, 1, 3, dtype=torch.float64)}
    direction = torch.randn(graph.num_edges, 3, dtype=torch.float64)

    def energy(rel_pos, detach_basis=False):
        g = Graph(graph.edge_index, graph.num_nodes, rel_pos=rel_pos)
        fixed = Graph(
            graph.edge_index, graph.num_nodes, rel_pos=rel_pos.detach()
        )  # basis / edge frames without gradients
        bases = model.geometry(fixed, edge_invariants(fixed.rel_pos, {})) if detach_basis else None
        return total(model(g, feats, None, bases))

    h = 1e-5
    finite = (energy(graph.rel_pos + h * direction) - energy(graph.rel_pos - h * direction)) / (2 * h)
    slopes = {}
    for detach in (False, True):
        rel_pos = graph.rel_pos.clone().requires_grad_()
        energy(rel_pos, detach).backward()
        slopes[detach] = (rel_pos.grad * direction).sum()
    assert abs(slopes[False] - finite) < 1e-6 * max(1.0, abs(finite))
    assert abs(slopes[True] - finite) > 1e-3 * abs(finite)
