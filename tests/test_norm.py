"""se3nb.norm: the norm nonlinearity keeps directions and is equivariant; graph pooling is max / mean per graph."""

import pytest
import torch
from torch import nn

from se3nb.backends import override
from se3nb.conv import random_features
from se3nb.equivariance import equivariance_error
from se3nb.fiber import Fiber
from se3nb.graph import fully_connected, batch_graphs
from se3nb.norm import GraphPooling, NormNonlinearity, _native_norm

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


needs_native = pytest.mark.skipif(_native_norm()[0] is None, reason="the C++ kernels did not build here")


def _values_and_gradients(norm, x, grads):  # outputs, input gradients, parameter gradients of one pass
    inputs = {l: v.clone().requires_grad_() for l, v in x.items()}
    out = norm(inputs)
    norm.zero_grad()
    torch.autograd.backward([out[l] for l in grads], [grads[l] for l in grads])
    zero = torch.zeros_like  # a part no output used: torch leaves None, the C++ pass zeros
    inputs_grad = {l: zero(v) if v.grad is None else v.grad for l, v in inputs.items()}
    return out, inputs_grad, [zero(p) if p.grad is None else p.grad.clone() for p in norm.parameters()]


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("fiber", [Fiber({0: 16, 1: 16, 2: 16}), Fiber({0: 6, 1: 4, 2: 3, 3: 2})])
def test_native_norm_nonlinearity_equals_torch(fiber, dtype):
    "The C++ pass (nodes 16 at a time: 37 leaves a tail) gives torch's values and gradients, zero vectors included."
    torch.manual_seed(0)
    norm = NormNonlinearity(fiber).to(dtype)
    with torch.no_grad():
        for p in norm.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = random_features(fiber, 37, dtype=dtype)
    x[1][3] = 0  # a node whose degree-1 vectors are all zero, and one zero vector elsewhere
    x[2][5, 1] = 0
    grads = {l: torch.randn_like(v) for l, v in x.items() if l != 0}  # degree 0's output unused: no gradient
    with override(norm_nonlinearity='native'):
        native = _values_and_gradients(norm, x, grads)
    with override(norm_nonlinearity='torch'):
        reference = _values_and_gradients(norm, x, grads)
    # float32: a layer norm over 2 channels (degree 3) amplifies rounding; float64 checks the formulas tightly
    tol = dict(rtol=1e-3, atol=2e-4) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    for a, b in zip(native, reference):
        torch.testing.assert_close(a, b, **tol)
    assert (native[0][1][3] == 0).all() and torch.isfinite(native[1][1]).all()


@needs_native
def test_native_norm_nonlinearity_second_derivatives():
    "Under `create_graph=True` the backward is recorded by torch's operations: finite differences agree."
    torch.manual_seed(0)
    norm = NormNonlinearity(Fiber({0: 3, 1: 2})).double()
    x = {l: v.requires_grad_() for l, v in random_features(Fiber({0: 3, 1: 2}), 4, dtype=F64).items()}
    with override(norm_nonlinearity='native'):
        assert torch.autograd.gradgradcheck(lambda a, b: tuple(norm({0: a, 1: b}).values()), (x[0], x[1]))


def test_norm_nonlinearity_backend_choice():
    "Another nonlinearity than ReLU, or float16 features, run the torch operations."
    fiber = Fiber({0: 4, 1: 4})
    x = random_features(fiber, 5)
    expected = {l: v.clone() for l, v in x.items()}
    gelu = NormNonlinearity(fiber, nn.GELU())
    with override(norm_nonlinearity='torch'):
        reference = gelu(x)
    for l, y in gelu(x).items():  # the automatic choice: torch for GELU
        torch.testing.assert_close(y, reference[l])
    assert all(torch.equal(x[l], expected[l]) for l in x)  # inputs untouched
    half = NormNonlinearity(fiber)(random_features(fiber, 5, dtype=torch.bfloat16))
    assert all(v.dtype == torch.bfloat16 for v in half.values())


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
