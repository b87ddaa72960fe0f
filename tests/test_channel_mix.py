"""se3nb.channel_mix: the C++ channel mixing equals torch's product in values and gradients; bad shapes are refused."""

import pytest
import torch

from se3nb.backends import choose, override
from se3nb.channel_mix import EquivariantLinear, _native_mix, channel_mix, channel_mixes
from se3nb.conv import random_features
from se3nb.fiber import Fiber

F64 = torch.float64
needs_native = pytest.mark.skipif(_native_mix()[0] is None, reason="the C++ kernels did not build here")


def _mix_and_grads(backend, weights, inputs, grads):  # outputs, weight gradients, input gradients of one pass
    weights = [W.clone().requires_grad_() for W in weights]
    inputs = [[x.clone().requires_grad_() for x in parts] for parts in inputs]
    with override(channel_mix=backend):
        ys = channel_mixes(weights, inputs)
    torch.autograd.backward(ys, grads)
    return ys, [W.grad for W in weights], [x.grad for parts in inputs for x in parts]


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("N", [1, 37, 300])  # one node, a tail after the blocks of nodes, several blocks per thread
def test_native_channel_mix_equals_torch(dtype, N):
    torch.manual_seed(N)
    parts = {0: (6, 8), 1: (8, 16), 2: (14,), 3: (24,), 4: (5, 3)}  # per degree: its parts' channels (concatenated)
    weights = [torch.randn(o, sum(c), dtype=dtype) for o, c in zip((16, 40, 8, 3, 17), parts.values())]
    inputs = [[torch.randn(N, c, 2 * l + 1, dtype=dtype) for c in cs] for l, cs in parts.items()]
    grads = [torch.randn(N, W.shape[0], 2 * l + 1, dtype=dtype) for l, W in zip(parts, weights)]
    native = _mix_and_grads('native', weights, inputs, grads)
    reference = _mix_and_grads('torch', weights, inputs, grads)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    for got, want in zip(native, reference):
        for a, b in zip(got, want):
            assert a.shape == b.shape and a.is_contiguous()
            torch.testing.assert_close(a, b, **tol)


@needs_native
def test_native_channel_mix_gradients_only_where_needed():
    "Frozen weights get no gradient, inputs that need none get none; an unused output counts as a zero gradient."
    W = [torch.randn(4, 6, requires_grad=True), torch.randn(3, 5)]
    x = [torch.randn(9, 6, 3), torch.randn(9, 5, 1, requires_grad=True)]
    with override(channel_mix='native'):
        y0, y1 = channel_mixes(W, [[x[0]], [x[1]]])
    y1.sum().backward()
    assert torch.equal(W[0].grad, torch.zeros(4, 6)) and W[1].grad is None and x[0].grad is None
    torch.testing.assert_close(x[1].grad, W[1].sum(0)[None, :, None].expand(9, 5, 1))


def test_channel_mixes_concatenates_like_torch_cat_on_either_backend():
    torch.manual_seed(0)
    W = torch.randn(7, 10, dtype=F64)
    a, b = torch.randn(5, 4, 3, dtype=F64), torch.randn(5, 6, 3, dtype=F64)
    for backend in ('native', 'torch') if _native_mix()[0] is not None else ('torch',):
        with override(channel_mix=backend):
            (y,) = channel_mixes([W], [[a, b]])
        torch.testing.assert_close(y, torch.einsum('oc,ncd->nod', W, torch.cat([a, b], 1)))


def test_channel_mix_outside_the_native_limits_runs_torch():
    "Degree 5 (11 components), or weights of another dtype than the features, take torch's product."
    assert choose('channel_mix', device='cpu', dtype=torch.float32, shape_ok=False) == 'torch'
    torch.manual_seed(0)
    for W, x in [(torch.randn(4, 3), torch.randn(6, 3, 11)), (torch.randn(4, 3), torch.randn(6, 3, 5, dtype=F64))]:
        (y,) = channel_mixes([W], [[x]])
        torch.testing.assert_close(y, channel_mix(W, x))


@pytest.mark.parametrize(
    "weights,inputs,message",
    [
        ([torch.randn(8, 10)], [[torch.randn(5, 6, 3), torch.randn(5, 6, 3)]], r"add up to its 10 columns"),
        ([torch.randn(8, 6)], [[torch.randn(5, 3, 3), torch.randn(5, 3, 5)]], r"one D"),
        ([torch.randn(8, 3), torch.randn(2, 3)], [[torch.randn(5, 3, 1)], [torch.randn(4, 3, 3)]], r"one N \(5\)"),
        ([torch.randn(8, 3)], [], r"one list of inputs per weight"),
    ],
)
def test_channel_mixes_refuses_inconsistent_shapes(weights, inputs, message):
    with pytest.raises(ValueError, match=message):
        channel_mixes(weights, inputs)


def test_equivariant_linear_with_appended_channels_equals_the_concatenation():
    "`EquivariantLinear(f + g)(x, extra)` is the layer applied to x and extra concatenated per degree."
    torch.manual_seed(0)
    f, g = Fiber({0: 3, 1: 4, 2: 2}), Fiber({0: 5, 1: 2})  # g: no degree 2, so degree 2 takes x alone
    layer = EquivariantLinear(f + g, Fiber({0: 6, 1: 6, 2: 6})).double()
    x, extra = random_features(f, 11, dtype=F64), random_features(g, 11, dtype=F64)
    joined = {l: torch.cat([x[l], extra[l]], 1) if l in extra else x[l] for l in x}
    for backend in ('native', 'torch') if _native_mix()[0] is not None else ('torch',):
        with override(channel_mix=backend):
            got = layer(x, extra)
        with override(channel_mix='torch'):
            want = layer(joined)
        for l in want:
            torch.testing.assert_close(got[l], want[l])


@needs_native
def test_native_channel_mix_second_derivatives():
    "Under `create_graph=True` the backward is recorded by torch's operations: finite differences agree."
    torch.manual_seed(0)
    W = torch.randn(3, 5, dtype=F64, requires_grad=True)
    a, b = torch.randn(4, 2, 3, dtype=F64, requires_grad=True), torch.randn(4, 3, 3, dtype=F64, requires_grad=True)
    with override(channel_mix='native'):
        assert torch.autograd.gradgradcheck(lambda W, a, b: channel_mixes([W], [[a, b]])[0], (W, a, b))
