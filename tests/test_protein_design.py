"""RFdiffusion's SE(3)-Transformer blocks without DGL: `se3nb.graph.full_graph` / `topk_graph` follow RFdiffusion's
graph rules (random backbones, ties included, and RFdiffusion's own graphs in ../shared/fixtures/rfdiffusion), and
the blocks run through `se3nb.nvidia` on every RFdiffusion fixture; bad input gets clear errors."""

import pytest
import torch

from se3nb.equivariance import equivariance_error
from se3nb.graph import full_graph, topk_graph
from se3nb.nvidia import Fiber, SE3Transformer, nvidia_graph

RFD = ["rfd_full_full_L40", "rfd_topk_topk_L40"]


def load(rfdiffusion_dir, name):
    return torch.load(rfdiffusion_dir / f"{name}.pt", weights_only=True)


def fixture_graph(fx):
    xyz = fx["xyz"][:, :, 1]  # CA, as RFdiffusion's Track_module passes it
    return topk_graph(xyz, fx["idx"], fx["top_k"], fx["kmin"]) if fx["top_k"] else full_graph(xyz, fx["idx"])


def rel_error(out, ref):
    scale = max(v.abs().max().item() for v in ref.values())
    return max((out[k] - ref[k]).abs().max().item() for k in ref) / scale


@pytest.mark.parametrize("name", RFD)
def test_builders_give_rfdiffusions_graph(rfdiffusion_dir, name):
    fx = load(rfdiffusion_dir, name)
    graph, (b, i, j) = fixture_graph(fx)
    assert torch.equal(graph.src, fx["src"]) and torch.equal(graph.dst, fx["dst"])
    assert torch.equal(graph.rel_pos, fx["rel_pos"])  # bit for bit: the same subtraction
    assert torch.equal(fx["pair"][b, i, j][..., None], fx["edge_feats"]["0"])
    if fx["top_k"]:  # L = 40 <= top_k = 64: every residue is its own neighbour
        assert (i == j).sum() == 40 and (graph.rel_pos[i == j] == 0).all()


@pytest.mark.parametrize("name", RFD)
def test_every_fixture_matches_through_se3nb_nvidia(rfdiffusion_dir, name):
    """RFdiffusion's model file with its two imports changed: strict loading, outputs and rotated outputs within 1e-4 of
    the largest output (MANIFEST), string keys out."""
    fx = load(rfdiffusion_dir, name)
    model = SE3Transformer(**{k: (Fiber(v) if k.startswith("fiber") else v) for k, v in fx["kwargs"].items()})
    model.load_state_dict(fx["state_dict"])  # strict
    assert list(model.state_dict()) == list(fx["state_dict"])
    graph, (b, i, j) = fixture_graph(fx)
    with torch.no_grad():
        out = model.eval()(graph, fx["node_feats"], {"0": fx["pair"][b, i, j][..., None]})
        assert list(out) == ["0", "1"] and rel_error(out, fx["output"]) < 1e-4
        rotated = nvidia_graph(fx["src"], fx["dst"], fx["num_nodes"], fx["rel_pos"] @ fx["R"].T)
        feats = {"0": fx["node_feats"]["0"], "1": fx["node_feats"]["1"] @ fx["R"].T}
        assert rel_error(model(rotated, feats, fx["edge_feats"]), fx["output_rotated"]) < 1e-4


def random_backbones(B=3, L=37, seed=0, grid=False):
    g = torch.Generator().manual_seed(seed)
    if grid:  # integer coordinates and residue indices in blocks of 6: many exactly equal keys (ties)
        return torch.randint(-3, 4, (B, L, 3), generator=g).float(), (torch.arange(L) // 6).repeat(B, 1)
    xyz = torch.cumsum(torch.randn(B, L, 3, generator=g) * 2.0, dim=1)
    idx = torch.arange(L).repeat(B, 1)
    idx[:, L // 2 :] += 100  # a chain break
    idx[-1, 5] = idx[-1, 4]  # a repeated residue index: no edge between the two in the full graph
    return xyz, idx


def test_full_graph_rule_and_order():
    xyz, idx = random_backbones()
    graph, (b, i, j) = full_graph(xyz, idx)
    B, L = idx.shape
    expected = [(bb, ii, jj) for bb in range(B) for ii in range(L) for jj in range(L) if idx[bb, ii] != idx[bb, jj]]
    assert list(zip(b.tolist(), i.tolist(), j.tolist())) == expected  # the set and the (b, i, j) order
    assert torch.equal(graph.edge_index, torch.stack([b * L + i, b * L + j]))
    assert torch.equal(graph.rel_pos, xyz[b, j] - xyz[b, i]) and graph.batch_num_edges.tolist() == [
        sum(1 for e in expected if e[0] == bb) for bb in range(B)
    ]


def topk_rule_holds(xyz, idx, top_k, kmin, eps=1e-6):
    """Check every residue's neighbours against the rule, one residue at a time: all residues closer than kmin in
    sequence, plus a set T of K = min(top_k, L) residues with the smallest keys (distance + eps * separation, the
    residue itself at 999.9); where keys tie at the K-th place, any choice among the tied residues is the rule's."""
    graph, (b, i, j) = topk_graph(xyz, idx, top_k, kmin)
    B, L = idx.shape
    pairs = list(zip(b.tolist(), i.tolist(), j.tolist()))
    assert pairs == sorted(pairs) and len(set(pairs)) == len(pairs)
    neighbours = {}
    for bb, ii, jj in pairs:
        neighbours.setdefault((bb, ii), set()).add(jj)
    K, ties = min(top_k, L), 0
    for bb in range(B):
        for ii in range(L):
            d = (xyz[bb] - xyz[bb, ii]).norm(dim=-1)  # [L] float32, exact for integer coordinates
            sep = (idx[bb] - idx[bb, ii]).abs().float()
            sep[ii] += 999.9
            d[ii] += 999.9
            key = d + sep * eps  # [L]
            kth = key.sort().values[K - 1]
            must, may = set((key < kth).nonzero().flatten().tolist()), set((key == kth).nonzero().flatten().tolist())
            local = set((sep < kmin).nonzero().flatten().tolist())
            got = neighbours.get((bb, ii), set())
            assert local <= got and must <= got and got - local <= must | may, (bb, ii)
            assert len(must | (got - local)) <= K <= len(got & (must | may)), (bb, ii)
            ties += len(must | may) > K
    return ties


@pytest.mark.parametrize("top_k,kmin", [(8, 3), (64, 32), (1, 0), (5, 1)])
def test_topk_graph_rule_on_random_backbones(top_k, kmin):
    assert topk_rule_holds(*random_backbones(), top_k, kmin) == 0  # continuous coordinates: no ties


@pytest.mark.parametrize("top_k,kmin", [(8, 3), (4, 0), (64, 32)])
def test_topk_graph_rule_with_ties(top_k, kmin):
    ties = topk_rule_holds(*random_backbones(L=30, grid=True, seed=1), top_k, kmin)
    assert top_k >= 30 or ties > 0  # the integer grid does make ties at the K-th place


def test_topk_self_loops_only_when_the_structure_is_small():
    xyz, idx = random_backbones(L=20)
    _, (b, i, j) = topk_graph(xyz, idx, top_k=20, kmin=0)
    assert (i == j).sum() == 3 * 20  # L <= top_k: every residue is among its own top_k
    _, (b, i, j) = topk_graph(xyz, idx, top_k=19, kmin=0)
    assert (i == j).sum() == 0


def test_builders_at_protein_size_and_gradients_on_request():
    xyz, idx = random_backbones(L=300, B=1)
    graph, _ = topk_graph(xyz, idx)
    assert (torch.bincount(graph.src, minlength=300) >= 64).all() and graph.num_nodes == 300
    xyz = xyz.requires_grad_()
    assert not full_graph(xyz, idx)[0].rel_pos.requires_grad  # RFdiffusion: no gradient through the basis
    assert full_graph(xyz, idx, detach=False)[0].rel_pos.requires_grad


def test_bad_backbones_give_clear_errors():
    xyz, idx = random_backbones(B=2, L=10)
    bad = xyz.clone()
    bad[1, 4, 2] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite coordinates \(first: structure 1, residue 4"):
        topk_graph(bad, idx)
    with pytest.raises(ValueError, match=r"non-finite"):
        full_graph(bad.clone().index_fill_(1, torch.tensor([0]), float("inf")), idx)
    with pytest.raises(ValueError, match=r"idx must be the \[B, L\] = \[2, 10\] residue indices .* got \[2, 9\]"):
        full_graph(xyz, idx[:, :9])
    with pytest.raises(ValueError, match=r"idx must be .* got \[10\]"):
        topk_graph(xyz, idx[0])
    with pytest.raises(ValueError, match=r"xyz must be \[B, L, 3\] coordinates, got \[2, 10, 3, 3\].*xyz\[:, :, 1\]"):
        topk_graph(xyz[:, :, None].expand(2, 10, 3, 3), idx)
    for top_k in (0, -3, 2.5):
        with pytest.raises(ValueError, match=rf"top_k must be an integer >= 1, got {top_k}"):
            topk_graph(xyz, idx, top_k=top_k)


@pytest.fixture(scope="module")
def full_block(rfdiffusion_dir):
    fx = load(rfdiffusion_dir, "rfd_full_full_L40")
    model = SE3Transformer(**fx["kwargs"])
    model.load_state_dict(fx["state_dict"])
    return fx, model.eval()


def test_bad_model_inputs_give_clear_errors(rfdiffusion_dir, full_block):
    fx, model = full_block
    graph, (b, i, j) = fixture_graph(fx)
    edge = {"0": fx["pair"][b, i, j][..., None]}
    with pytest.raises(ValueError, match=r"edge_feats\[0\]: expected shape \[1560, 32, 1\], got \[1560, 31, 1\]"):
        model(graph, fx["node_feats"], {"0": edge["0"][:, :31]})
    with pytest.raises(ValueError, match=r"node_feats\[1\]: expected shape \[40, 3, 3\], got \[40, 9\]"):
        model(graph, {**fx["node_feats"], "1": fx["node_feats"]["1"].reshape(40, 9)}, edge)
    with pytest.raises(ValueError, match=r"node_feats\[1\]: expected shape \[40, 3, 3\], got \[40, 3, 1\]"):
        model(graph, {**fx["node_feats"], "1": fx["node_feats"]["1"][..., :1]}, edge)
    topk = load(rfdiffusion_dir, "rfd_topk_topk_L40")
    with pytest.raises(RuntimeError, match=r"saved from another block configuration.*shape mismatches, first: \["):
        model.load_state_dict(topk["state_dict"])
    with pytest.raises(RuntimeError, match=r"graph_modules.0.to_key_value.conv_in.1.radial_func.net.0.weight: "
                       r"expected \[32, 33\], got \[32, 65\]"):  # fmt: skip
        model.load_state_dict(topk["state_dict"])


def test_block_equivariance(full_block):
    """The full-graph block in float64 on a random 60-residue backbone (the notebook checks L = 150 in both
    precisions)."""
    fx, model = full_block
    model = SE3Transformer(**fx["kwargs"]).double().eval()
    model.load_state_dict(fx["state_dict"])
    xyz, idx = random_backbones(B=1, L=60)
    graph, (b, i, j) = full_graph(xyz.double(), idx)
    g = torch.Generator().manual_seed(0)
    nf = {0: torch.randn(60, 8, 1, generator=g, dtype=torch.float64), 1: torch.randn(60, 3, 3, generator=g).double()}
    ef = {0: torch.randn(graph.num_edges, 32, 1, generator=g, dtype=torch.float64)}
    with torch.no_grad():
        err = equivariance_error(
            lambda p, f, e: model(graph.with_positions(p), f, e), graph.pos, nf, edge_feats=ef, num_rotations=3
        )
    assert err.max() < 1e-9
