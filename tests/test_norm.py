"""se3nb.norm: the norm nonlinearity keeps directions and is equivariant; graph pooling is max / mean per graph."""

import pytest
import torch

from se3nb.conv import random_features
from se3nb.equivariance import equivariance_error
from se3nb.fiber import Fiber
from se3nb.graph import fully_connected, batch_graphs
from se3nb.norm import GraphPooling, NormNonlinearity

F64 = torch.float64


@pytest.mark.parametrize("fiber", [Fiber({0: 4, 1: 4, 2: 4}), Fiber({0: 2, 1: 3, 2: 5})])  # GroupNorm / LayerNorms
def test_norm_nonlinearity_keeps_directions_is_equivariant_and_has_gradients(fiber):
    torch.manual_seed(0)
    norm = NormNonlinearity(fiber).double()
    x = random_features(fiber, 7, dtype=F64)
    out = norm(x)
    for l in fiber.degrees:  # each channel is rescaled, never turned: the cosine is 1 where the new norm is > 0
        cos = torch.nn.functional.cosine_similarity(out[l], x[l], dim=-1)
        assert ((cos - 1).abs() < 1e-12)[out[l].norm(dim=-1) > 0].all()
    assert equivariance_error(lambda p, f: norm(f), torch.zeros(7, 3, dtype=F64), x, num_rotations=3).max() < 1e-12
    keys = fiber.degrees
    inputs = tuple(x[l].clone().requires_grad_() for l in keys)
    assert torch.autograd.gradcheck(lambda *xs: tuple(norm(dict(zip(keys, xs))).values()), inputs)


def test_graph_pooling_is_the_max_or_mean_of_each_graph():
    sizes = [3, 1, 4]
    graph = batch_graphs([fully_connected(torch.randn(n, 3, dtype=F64)) for n in sizes])
    x = torch.randn(sum(sizes), 5, 1, dtype=F64)
    parts = torch.split(x[..., 0], sizes)
    torch.testing.assert_close(GraphPooling('max')({0: x}, graph), torch.stack([p.max(0).values for p in parts]))
    torch.testing.assert_close(GraphPooling('mean')({0: x}, graph), torch.stack([p.mean(0) for p in parts]))
    v = torch.randn(sum(sizes), 2, 3, dtype=F64)
    mean1 = GraphPooling('mean', degree=1)({1: v}, graph)
    torch.testing.assert_close(mean1, torch.stack([p.mean(0) for p in torch.split(v, sizes)]))
    with pytest.raises(ValueError, match="NVIDIA's 'avg' is 'mean' here"):
        GraphPooling('avg')
    with pytest.raises(ValueError, match="breaks equivariance"):
        GraphPooling('max', degree=1)
