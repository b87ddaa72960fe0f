"""se3nb.model: equivariance, invariances, batching, degenerate graphs, gradients, low memory, precision, bad input."""

import pytest
import torch

from model_helpers import F64, random_inputs, small_model
from se3nb.backends import override
from se3nb.basis import Bases
from se3nb.conv import FUSE_LEVELS, edge_invariants, random_features
from se3nb.equivariance import equivariance_error, translation_error
from se3nb.fiber import Fiber
from se3nb.graph import Graph, batch_graphs, fully_connected, radius_graph, unbatch
from se3nb.model import SE3Transformer, SE3TransformerPooled
from se3nb.so2 import EdgeFrames


@pytest.mark.parametrize("conv", ["so2", "reference"])
@pytest.mark.parametrize("dtype,tol", [(F64, 1e-9), (torch.float32, 1e-4)])
@pytest.mark.parametrize("fuse_level", FUSE_LEVELS)
def test_model_equivariance(dtype, tol, fuse_level, conv):
    model = small_model(dtype, fuse_level=fuse_level, conv=conv)
    pos, graph, nf, ef = random_inputs(model, dtype=dtype)
    err = equivariance_error(
        lambda p, f, e: model(graph.with_positions(p), f, e), pos, nf, edge_feats=ef, num_rotations=4
    )
    assert err.max() < tol, err


def test_even_channels_fully_fused_model_equivariance():
    torch.manual_seed(0)
    model = SE3Transformer(
        2, Fiber.create(4, 4), Fiber.create(4, 4), Fiber.create(4, 2), 2, 2, Fiber({0: 2}), fuse_level='full'
    ).double()
    assert list(model.graph_modules[0].to_key_value.groups) == ['all']
    pos, graph, nf, ef = random_inputs(model)
    assert (
        equivariance_error(
            lambda p, f, e: model(graph.with_positions(p), f, e), pos, nf, edge_feats=ef, num_rotations=3
        ).max()
        < 1e-9
    )


@pytest.mark.parametrize("conv", ["so2", "reference"])
def test_geometry_built_ahead_is_used_as_is(conv):
    "Geometry built before the forward pass (as a data loader does) gives the same output; a mismatched one is refused."
    model = small_model(conv=conv)
    pos, graph, nf, ef = random_inputs(model)
    geometry = model.geometry(graph, edge_invariants(graph.rel_pos, ef))
    out, again = model(graph, nf, ef), model(graph, nf, ef, geometry=geometry)
    assert all(torch.equal(out[l], again[l]) for l in out)
    _, other, other_nf, other_ef = random_inputs(model, n=9, seed=2)
    with pytest.raises(ValueError, match="geometry was built for"):
        model(other, other_nf, other_ef, geometry=geometry)
    wrong_kind = (
        EdgeFrames(graph, 3, edge_invariants(graph.rel_pos, ef)) if conv == "reference" else Bases(graph.rel_pos, 3)
    )
    with pytest.raises(TypeError, match="needs"):
        model(graph, nf, ef, geometry=wrong_kind)


def test_translation_invariance_and_permutation_equivariance():
    model = small_model()
    pos, graph, nf, ef = random_inputs(model)
    assert translation_error(lambda p, f: model(graph.with_positions(p), f, ef), pos, nf) < 1e-12
    perm = torch.randperm(graph.num_nodes)
    inv = torch.argsort(perm)  # new index of each old node
    graph_p = Graph(inv[graph.edge_index], graph.num_nodes, pos=pos[perm])
    out, out_p = model(graph, nf, ef), model(graph_p, {l: x[perm] for l, x in nf.items()}, ef)
    assert all((out_p[l] - out[l][perm]).abs().max() < 1e-12 for l in out)


def test_batch_equals_each_graph_alone():
    model = SE3TransformerPooled(
        Fiber({0: 3}),
        Fiber({0: 8}),
        Fiber({0: 2}),
        num_degrees=3,
        num_channels=8,
        output_dim=2,
        num_layers=2,
        num_heads=2,
    ).double()
    graphs, feats, efeats = [], [], []
    for n in (5, 9, 1, 7):
        pos = torch.randn(n, 3, dtype=F64)
        graphs.append(fully_connected(pos))
        feats.append(torch.randn(n, 3, 1, dtype=F64))
        efeats.append(torch.randn(graphs[-1].num_edges, 2, 1, dtype=F64))
    batched = model(batch_graphs(graphs), {0: torch.cat(feats)}, {0: torch.cat(efeats)})
    alone = torch.cat([model(g, {0: f}, {0: e}) for g, f, e in zip(graphs, feats, efeats)])
    assert batched.shape == (4, 2) and (batched - alone).abs().max() < 1e-12
    assert [g.num_nodes for g in unbatch(batch_graphs(graphs))] == [5, 9, 1, 7]


def test_degenerate_graphs_are_finite():
    model = small_model()
    no_edges = Graph(torch.zeros(2, 0, dtype=torch.long), 3, pos=torch.randn(3, 3, dtype=F64))
    single = Graph(torch.zeros(2, 0, dtype=torch.long), 1, pos=torch.zeros(1, 3, dtype=F64))
    isolated = Graph(torch.tensor([[0, 1], [1, 0]]), 3, pos=torch.randn(3, 3, dtype=F64))
    for graph in (no_edges, single, isolated, batch_graphs([no_edges, single, isolated])):
        nf = random_features(model.fiber_in, graph.num_nodes, dtype=F64)
        ef = random_features(model.fiber_edge, graph.num_edges, dtype=F64)
        out = model(graph, nf, ef)
        assert all(torch.isfinite(v).all() for v in out.values())


def test_backward_finite_for_coincident_points_and_cutoff_edges():
    model = small_model(cutoff=2.0)
    pos = torch.tensor([[0.0, 0, 0], [0, 0, 0], [2, 0, 0], [0, 2 + 1e-9, 0]], dtype=F64, requires_grad=True)
    graph = Graph(torch.tensor([[0, 1, 0, 2, 0, 3], [1, 0, 2, 0, 3, 0]]), 4, pos=pos)
    nf = {l: x.requires_grad_() for l, x in random_features(model.fiber_in, 4, dtype=F64).items()}
    ef = random_features(model.fiber_edge, graph.num_edges, dtype=F64)
    out = model(graph, nf, ef)
    sum(v.sum() for v in out.values()).backward()
    assert torch.isfinite(pos.grad).all() and all(torch.isfinite(x.grad).all() for x in nf.values())
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


def test_smooth_cutoff_is_continuous_and_default_is_not():
    torch.manual_seed(0)
    kw = dict(
        num_layers=2,
        fiber_in=Fiber({0: 2}),
        fiber_hidden=Fiber.create(3, 4),
        fiber_out=Fiber({0: 2, 1: 1}),
        num_heads=2,
        channels_div=2,
    )
    plain, smooth = SE3Transformer(**kw).double(), SE3Transformer(**kw, cutoff=2.0).double()
    smooth.load_state_dict(plain.state_dict())
    feats = {0: torch.randn(3, 2, 1, dtype=F64)}

    def run(model, d):
        pos = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0.5, d, 0]], dtype=F64)
        out = model(radius_graph(pos, 2.0), feats)
        return torch.cat([v.flatten() for v in out.values()])

    ds = torch.linspace(1.92, 1.95, 121, dtype=F64)  # the third node's edges cross r_c at d = sqrt(3.75) ~ 1.9365
    smooth_steps = torch.stack([run(smooth, d.item()) for d in ds]).diff(dim=0).abs().max()
    plain_steps = torch.stack([run(plain, d.item()) for d in ds]).diff(dim=0).abs().max()
    assert plain_steps > 1e-2  # NVIDIA's behaviour: a jump when edges appear
    assert smooth_steps < 1e-3


def test_low_memory_gradients_equal_default():
    model = small_model()
    lm = small_model(low_memory=True)
    lm.load_state_dict(model.state_dict())
    pos, graph, nf, ef = random_inputs(model)
    grads = []
    for m in (model, lm):
        m.zero_grad()
        sum(v.square().sum() for v in m(graph, nf, ef).values()).backward()
        grads.append([p.grad.clone() for p in m.parameters()])
    assert all(a is not None and (a - b).abs().max() < 1e-12 for a, b in zip(*grads))


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_cpu_autocast_forward_backward_finite(dtype):
    model = small_model(torch.float32)
    pos, graph, nf, ef = random_inputs(model, dtype=torch.float32)
    with torch.autocast('cpu', dtype=dtype):
        out = model(graph, nf, ef)
        loss = sum(v.float().square().mean() for v in out.values())
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    with torch.no_grad():
        ref = model(graph, nf, ef)
    assert all(((out[l].float() - ref[l]).abs().max() / ref[l].abs().max()) < 0.1 for l in ref)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast_and_equivariance(dtype):
    model = small_model(torch.float32).cuda()
    pos, graph, nf, ef = random_inputs(model, dtype=torch.float32)
    graph, nf, ef = graph.to('cuda'), {l: x.cuda() for l, x in nf.items()}, {l: x.cuda() for l, x in ef.items()}
    err = equivariance_error(
        lambda p, f, e: model(graph.with_positions(p), f, e), pos.cuda(), nf, edge_feats=ef, num_rotations=3
    )
    assert err.max() < 1e-4
    with torch.autocast('cuda', dtype=dtype):
        loss = sum(v.float().square().mean() for v in model(graph, nf, ef).values())
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


def test_bad_inputs_give_clear_errors():
    model = small_model()
    pos, graph, nf, ef = random_inputs(model)
    with pytest.raises(ValueError, match=r"node_feats\[1\]: expected shape \[14, 2, 3\], got \[14, 2, 5\]"):
        model(graph, {**nf, 1: torch.zeros(14, 2, 5, dtype=F64)}, ef)
    with pytest.raises(ValueError, match=r"expected degrees \[0, 1, 2, 3\]"):
        model(graph, {l: x for l, x in nf.items() if l != 2}, ef)
    with pytest.raises(ValueError, match="edge_feats"):
        model(graph, nf, {0: ef[0]})
    with pytest.raises(TypeError, match="dtype torch.float32"):
        model(graph, {l: x.float() for l, x in nf.items()}, ef)
    with pytest.raises(ValueError, match="out of range"):
        Graph(torch.tensor([[0, 20], [1, 0]]), 14, pos=pos)
    with pytest.raises(ValueError, match="non-finite"):
        Graph(graph.edge_index, 14, pos=pos.clone().index_fill_(0, torch.tensor([3]), float('nan')))
    with pytest.raises(ValueError, match="divisible by num_heads"):
        small_model(num_heads=3)
    with pytest.raises(ValueError, match="fuse_level"):
        small_model(fuse_level='fast')
    with pytest.raises(TypeError, match="conv backend 'so2' needs EdgeFrames"):
        model(graph, nf, ef, Bases(graph.rel_pos, 3))
    with pytest.raises(ValueError, match="built for 5 edges"):
        small_model(conv='reference')(graph, nf, ef, Bases(graph.rel_pos[:5], 3))
    with pytest.raises(ValueError, match="unknown conv backend 'fast'; the conv backends are so2, reference"):
        small_model(conv='fast')


ALL_TORCH = {  # every op with a C++ or Triton backend on torch's
    op: 'torch'
    for op in ('so2_product', 'radial_hidden', 'norm_nonlinearity', 'channel_mix', 'segment_attention', 'so2_fold')
}


def _force_model(dtype):
    torch.manual_seed(0)
    return SE3Transformer(1, Fiber({0: 4}), Fiber({0: 8, 1: 8}), Fiber({0: 1}), 2, 2, return_type=0).to(dtype)


def _force_loss_gradients(dtype, **backends) -> torch.Tensor:  # parameter gradients of a loss on the forces, joined
    pos = torch.randn(6, 3, generator=torch.Generator().manual_seed(1)).to(dtype).requires_grad_()
    with override(**backends):  # conv is chosen when the model is built
        model = _force_model(dtype)
        energy = model(fully_connected(pos), {0: torch.ones(6, 4, 1, dtype=dtype)}).sum()
        (forces,) = torch.autograd.grad(energy, pos, create_graph=True)
        forces.square().sum().backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def test_second_derivatives_train_on_forces():
    """Training on forces (dE/dpos with create_graph=True, then a loss on the forces) needs second derivatives: each C++
    kernel's backward hands over to torch's operations while autograd records it. The Hessian matches finite
    differences; the SO(2) path matches the reference convolution; float32 (the C++ SO(2) products) matches float64."""
    model, feats = _force_model(F64), {0: torch.ones(5, 4, 1, dtype=F64)}
    pos = torch.randn(5, 3, dtype=F64, generator=torch.Generator().manual_seed(2), requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda p: model(fully_connected(p), feats).sum(), (pos,))
    reference = _force_loss_gradients(F64, conv='reference', **ALL_TORCH)
    assert reference.abs().max() > 0
    for backends in ({}, {'conv': 'reference'}, ALL_TORCH):
        torch.testing.assert_close(_force_loss_gradients(F64, **backends), reference, rtol=1e-9, atol=1e-12)
    single = _force_loss_gradients(torch.float32)
    assert (single.double() - reference).norm() < 1e-4 * reference.norm()


def test_second_derivatives_through_the_frame_rotation_kernels():
    "Fixed positions, second derivatives in the features: the float32 C++ rotations' recorded backward equals torch's."
    results = []
    for backend in ('native', 'torch'):
        model = _force_model(torch.float32)
        pos = torch.randn(6, 3, generator=torch.Generator().manual_seed(1))
        x = torch.randn(6, 4, 1, generator=torch.Generator().manual_seed(3), requires_grad=True)
        with override(frame_rotation=backend):
            energy = model(fully_connected(pos), {0: x}).sum()
            (grad_x,) = torch.autograd.grad(energy, x, create_graph=True)
            grad_x.square().sum().backward()
        results.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert results[0].abs().max() > 0
    torch.testing.assert_close(results[0], results[1], rtol=1e-4, atol=1e-6)
