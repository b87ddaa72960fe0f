"""se3nb.conv and the SO(2) convolution (the conv backends): gradients, the radial product, messages by destination."""

import pytest
import torch

from model_helpers import F64, random_multigraph
from se3nb.backends import override
from se3nb.conv import (
    RadialProfile,
    _native_radial,
    edge_invariants,
    radial_kernel_product,
    radial_kernel_product_reference,
    random_features,
)
from se3nb.fiber import Fiber
from se3nb.graph import fully_connected
from se3nb.so2_conv import conv_class
from se3nb.attention import AttentionBlock
from se3nb.norm import NormNonlinearity


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


@pytest.mark.skipif(_native_radial()[0] is None, reason="the C++ kernels did not build here")
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("layer_norm, mid", [(True, 32), (False, 32), (True, 16), (True, 64)])
def test_native_radial_hidden_equals_torch(layer_norm, mid, dtype):
    "The C++ hidden layers (rows 8 at a time: 45 leaves a tail) give torch's values and gradients, inputs' included."
    torch.manual_seed(0)
    profile = RadialProfile(2, 3, 4, edge_dim=5, mid_dim=mid, use_layer_norm=layer_norm).to(dtype)
    with torch.no_grad():
        for p in profile.parameters():
            p.add_(0.3 * torch.randn_like(p))
    rows = torch.randn(45, 5, dtype=dtype)
    grad = torch.randn(45, mid, dtype=dtype)
    results = []
    for backend in ('native', 'torch'):
        x = rows.clone().requires_grad_()
        with override(radial_hidden=backend):
            h = profile.hidden(x)
        params = [p for p in profile.net[:-1].parameters()]
        results.append([h, *torch.autograd.grad(h, [x, *params], grad)])
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, **tol)
    with override(radial_hidden='native'):  # no gradient asked for the rows: none computed, the weights' still are
        h = profile.hidden(rows)
        (g,) = torch.autograd.grad(h, [profile.net[0].weight], grad)
    torch.testing.assert_close(g, results[1][2], **tol)


def test_native_radial_hidden_falls_back_to_torch():
    "Hidden widths the kernels lack, other layers, another dtype than the weights', autocast: torch's layers run."
    profile = RadialProfile(1, 2, 2, edge_dim=3, mid_dim=24, use_layer_norm=True)
    rows = torch.randn(10, 3)
    torch.testing.assert_close(profile.hidden(rows), profile.net[:-1](rows))  # 24 units: torch
    profile = RadialProfile(1, 2, 2, edge_dim=3, use_layer_norm=True)
    profile.net[2] = torch.nn.SiLU()
    torch.testing.assert_close(profile.hidden(rows), profile.net[:-1](rows))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert profile.hidden(rows).dtype == torch.bfloat16


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


@pytest.mark.parametrize("backend", ['so2', 'reference'])
def test_messages_by_destination_are_the_graph_order_permuted(backend):
    from se3nb.attention import SE3Attention

    torch.manual_seed(0)
    graph = random_multigraph()
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
