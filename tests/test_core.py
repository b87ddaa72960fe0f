"""Properties of the se3nb core: equivariance, invariances, gradients, batching, degenerate graphs, bad input, precision."""

import pytest
import torch

from se3nb.basis import Bases
from se3nb.conv import (
    FUSE_LEVELS,
    edge_invariants,
    radial_kernel_product,
    radial_kernel_product_reference,
    random_features,
)
from se3nb.attention import AttentionBlock
from se3nb.so2 import conv_class
from se3nb.backends import override
from se3nb.equivariance import equivariance_error, translation_error
from se3nb.fiber import Fiber
from se3nb.graph import Graph, batch_graphs, fully_connected, radius_graph, unbatch
from se3nb.model import SE3Transformer, SE3TransformerPooled
from se3nb.norm import NormNonlinearity

F64 = torch.float64


def small_model(dtype=F64, conv=None, **kw):
    torch.manual_seed(0)
    args = dict(
        num_layers=3,
        fiber_in=Fiber({0: 3, 1: 2, 2: 1, 3: 1}),
        fiber_hidden=Fiber({0: 8, 1: 4, 2: 12, 3: 4}),
        fiber_out=Fiber({0: 2, 1: 2, 2: 1, 3: 1}),
        num_heads=2,
        channels_div=2,
        fiber_edge=Fiber({0: 2, 1: 1}),
    )
    args.update(kw)
    with override(conv=conv):  # None: the registry's choice (`00a_backends`)
        return SE3Transformer(**args).to(dtype)


def random_inputs(model, n=14, cutoff=2.5, dtype=F64, seed=1):
    g = torch.Generator().manual_seed(seed)
    pos = (torch.randn(n, 3, generator=g, dtype=F64) * 1.3).to(dtype)
    graph = radius_graph(pos, cutoff)
    return (
        pos,
        graph,
        random_features(model.fiber_in, n, dtype=dtype, generator=g),
        random_features(model.fiber_edge, graph.num_edges, dtype=dtype, generator=g),
    )


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


@pytest.mark.parametrize("backend", ["so2", "reference"])
def test_gradcheck_conv_attention_norm(backend):
    torch.manual_seed(0)
    fin, fout, fedge = Fiber({0: 2, 1: 2, 2: 1}), Fiber({0: 2, 1: 2, 2: 2}), Fiber({0: 1, 1: 1})
    pos = torch.randn(5, 3, dtype=F64)
    graph = fully_connected(pos)
    ef = random_features(fedge, graph.num_edges, dtype=F64)
    inv = edge_invariants(graph.rel_pos, ef)
    with override(conv=backend):
        conv = conv_class()(fin, fout, fedge, self_interaction=True).double()
        block = AttentionBlock(fin, fout, fedge, num_heads=1).double()
    bases = conv.geometry(graph, inv, 2, list(conv.groups.values()) + list(block.to_key_value.groups.values()))
    norm = NormNonlinearity(Fiber({0: 2, 1: 3, 2: 2})).double()
    x = random_features(fin, 5, dtype=F64)

    def as_fn(module_call, feats):
        keys = sorted(feats)

        def f(*xs):
            out = module_call(dict(zip(keys, xs)))
            return tuple(out[l] for l in sorted(out))

        return f, tuple(feats[l].clone().requires_grad_() for l in keys)

    for call, feats in (
        (lambda f: conv(f, ef, inv, graph, bases), x),
        (lambda f: block(f, ef, inv, graph, bases), x),
        (norm, random_features(norm.fiber, 5, dtype=F64)),
    ):
        f, inputs = as_fn(call, feats)
        assert torch.autograd.gradcheck(f, inputs)


def test_fast_radial_product_matches_reference():
    g = torch.Generator().manual_seed(0)
    h, w, t = (
        torch.randn(300, 7, dtype=F64, generator=g),
        torch.randn(4 * 30, 7, dtype=F64, generator=g),
        torch.randn(300, 5, 30, dtype=F64, generator=g),
    )
    args = [a.requires_grad_() for a in (h, w, t)]
    y, y_ref = radial_kernel_product(*args), radial_kernel_product_reference(*args)
    assert (y - y_ref).abs().max() < 1e-10
    gy = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, args, gy), torch.autograd.grad(y_ref, args, gy)):
        assert (a - b).abs().max() < 1e-10


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


def _random_multigraph(num_nodes=9, num_edges=40, seed=0):
    "Random directed edges with duplicates, self loops and nodes without incoming edges (node 0 never receives)."
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(0, num_nodes, (num_edges,), generator=g)
    dst = torch.randint(1, num_nodes, (num_edges,), generator=g)
    return Graph(torch.stack([src, dst]), num_nodes, pos=torch.randn(num_nodes, 3, dtype=torch.float64, generator=g))


def test_destination_csr_matches_scatter_segment_operations():
    from se3nb.graph import DestinationCSR, segment_max, segment_sum

    graph = _random_multigraph()
    csr = graph.csr
    order, dst, N = csr.edge_order, graph.dst, graph.num_nodes
    assert torch.equal(torch.sort(order).values, torch.arange(graph.num_edges))  # a permutation
    assert torch.equal(csr.dst, dst[order]) and (csr.dst[1:] >= csr.dst[:-1]).all()
    x = torch.randn(graph.num_edges, 3, 2, dtype=torch.float64, requires_grad=True)
    s = (torch.randn(graph.num_edges, 4, dtype=torch.float64) * 30).requires_grad_()
    u = torch.rand(graph.num_edges, dtype=torch.float64)
    torch.testing.assert_close(csr.sum(x[order]), segment_sum(x, dst, N), atol=1e-12, rtol=0)
    assert (csr.sum(x[order])[0] == 0).all()  # no incoming edges
    plain = torch.exp(s - segment_max(s, dst, N)[dst])  # the softmax by its definition, in the graph's edge order
    torch.testing.assert_close(
        csr.softmax(s[order]), (plain / segment_sum(plain, dst, N)[dst])[order], atol=1e-12, rtol=0
    )
    e = u[:, None] * torch.exp(s - segment_max(s, dst, N)[dst])
    enveloped = u[:, None] * e / (segment_sum(e, dst, N)[dst] + 1e-12)  # the formula of 05_attention, shifted per node
    torch.testing.assert_close(csr.softmax(s[order], u[order]), enveloped[order], atol=1e-12, rtol=1e-10)
    assert torch.autograd.gradcheck(lambda s: csr.softmax(s, u[order]), (s[order].detach().requires_grad_(),))
    assert torch.autograd.gradcheck(csr.sum, (x[order].detach().requires_grad_(),))
    # the GPU branch (segment_reduce, no atomics) computes the same on CPU tensors
    from se3nb.graph import _csr_reduce

    torch.testing.assert_close(_csr_reduce(x[order], csr.in_degree, 'sum'), segment_sum(x, dst, N), atol=1e-12, rtol=0)
    torch.testing.assert_close(_csr_reduce(s[order], csr.in_degree, 'max'), segment_max(s, dst, N), atol=0, rtol=0)
    assert torch.autograd.gradcheck(
        lambda x: _csr_reduce(x, csr.in_degree, 'sum'), (x[order].detach().requires_grad_(),)
    )
    empty = DestinationCSR(torch.zeros(0, dtype=torch.long), 3)
    assert empty.sum(torch.zeros(0, 2)).shape == (3, 2) and empty.softmax(torch.zeros(0, 2)).shape == (0, 2)


@pytest.mark.parametrize("backend", ['so2', 'reference'])
def test_messages_by_destination_are_the_graph_order_permuted(backend):
    from se3nb.attention import SE3Attention

    torch.manual_seed(0)
    graph = _random_multigraph()
    fin, fout, fedge = Fiber({0: 3, 1: 2}), Fiber({0: 4, 1: 4}), Fiber({0: 2})
    with override(conv=backend):
        conv = conv_class()(fin, fout, fedge, pool=False, self_interaction=True).double()
    x, e = (
        random_features(fin, graph.num_nodes, dtype=torch.float64),
        random_features(fedge, graph.num_edges, dtype=torch.float64),
    )
    inv = edge_invariants(graph.rel_pos, e)
    geometry = conv.geometry(graph, inv, 1, list(conv.groups.values()))
    order = graph.csr.edge_order
    plain, sorted_ = conv(x, e, inv, graph, geometry), conv(x, e, inv, graph, geometry, by_destination=True)
    for l in fout.degrees:
        torch.testing.assert_close(sorted_[l], plain[l][order], atol=1e-12, rtol=0)
    attention = SE3Attention(2, fout, fout)
    u = torch.rand(graph.num_edges, dtype=torch.float64)
    q = random_features(fout, graph.num_nodes, dtype=torch.float64)
    a = attention(plain, plain, q, graph, u)
    b = attention(sorted_, sorted_, q, graph, u[order], edges_by_destination=True)
    for l in fout.degrees:
        torch.testing.assert_close(a[l], b[l], atol=1e-12, rtol=0)
