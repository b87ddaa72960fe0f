"""The fused segment-attention kernel (Triton) against the composition of segment operations (`03a_segment_attention`).

On a GPU the compiled kernels run; without one, Triton's interpreter runs them on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1 before Triton's first import)."""

import pytest
import torch

import se3nb.segment_attention as sa
from se3nb.backends import choose, override
from se3nb.fiber import Fiber
from se3nb.graph import DestinationCSR
from se3nb.segment_attention import segment_attention, segment_attention_reference

DEVICE = 'cuda' if torch.cuda.is_available() else 'cpu'
F64 = torch.float64
needs_kernel = pytest.mark.skipif(
    sa._triton() is None or not (torch.cuda.is_available() or sa._interpreting()),
    reason="needs Triton 3 and a GPU, or Triton's interpreter (TRITON_INTERPRET=1 before its import)",
)


def _graph(num_nodes=9, num_edges=40, crowded=0):  # random multigraph; node num_nodes-1 has no incoming edges
    dst = torch.randint(0, num_nodes - 1, (num_edges,))
    dst = torch.cat(
        [dst, torch.zeros(crowded, dtype=torch.long)]
    )  # node 0 gets `crowded` more edges (several kernel blocks)
    return DestinationCSR(dst.to(DEVICE), num_nodes)


def _inputs(csr, H, d_k, d_v, dtype, envelope):
    E, N = csr.num_edges, csr.num_nodes
    k, q, v = torch.randn(E, H, d_k), torch.randn(N, H, d_k), torch.randn(E, H, d_v)
    k[csr.dst == 0] *= torch.linspace(0, 4, int((csr.dst == 0).sum()))[
        :, None, None
    ]  # rising scores: the running maximum moves
    u = torch.rand(E) if envelope else None
    return [t.to(DEVICE, dtype).requires_grad_() for t in (k, q, v)] + (
        [u.to(DEVICE, dtype).requires_grad_()] if envelope else [None]
    )


def _run(inputs, csr, fused, scale=0.37):
    k, q, v, u = inputs
    with override(segment_attention='triton' if fused else 'torch'):
        return segment_attention(k, q, v, csr, scale=scale, envelope=u)


@needs_kernel
@pytest.mark.parametrize("envelope", [False, True])
def test_fused_kernel_matches_the_composition_in_float64(envelope):
    torch.manual_seed(0)
    csr = _graph(crowded=37)  # node 0: ~40 edges, three blocks of 16
    inputs = _inputs(csr, H=3, d_k=5, d_v=7, dtype=F64, envelope=envelope)  # head sizes that are not powers of two
    fused, reference = _run(inputs, csr, True), _run(inputs, csr, False)
    assert fused.shape == (9, 3, 7) and (fused[8] == 0).all()
    torch.testing.assert_close(fused, reference, atol=1e-13, rtol=1e-12)
    grad = torch.randn_like(reference)
    wrt = [t for t in inputs if t is not None]
    for a, b in zip(torch.autograd.grad(fused, wrt, grad), torch.autograd.grad(reference, wrt, grad)):
        torch.testing.assert_close(a, b, atol=1e-13, rtol=1e-11)


@needs_kernel
@pytest.mark.parametrize("envelope", [False, True])
def test_fused_kernel_gradcheck(envelope):
    torch.manual_seed(1)
    csr = _graph(num_nodes=4, num_edges=7)
    inputs = _inputs(csr, H=2, d_k=2, d_v=3, dtype=F64, envelope=envelope)
    wrt = tuple(t for t in inputs if t is not None)
    assert torch.autograd.gradcheck(lambda *t: _run(list(t) + [None] * (4 - len(t)), csr, True), wrt)


@needs_kernel
def test_envelope_without_gradient_and_constant_inputs():
    torch.manual_seed(2)
    csr = _graph()
    k, q, v, u = _inputs(csr, H=2, d_k=4, d_v=4, dtype=F64, envelope=True)
    u = u.detach()
    q = q.detach()  # a constant query: only keys and values get gradients
    for fused in (True, False):
        with override(segment_attention='triton' if fused else 'torch'):
            z = segment_attention(k, q, v, csr, scale=0.5, envelope=u)
        grads = torch.autograd.grad(z.square().sum(), (k, v))
        if fused:
            first = (z, grads)
    torch.testing.assert_close(first[0], z, atol=1e-13, rtol=1e-12)
    for a, b in zip(first[1], grads):
        torch.testing.assert_close(a, b, atol=1e-13, rtol=1e-11)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_kernel_in_low_precision(dtype):
    # statistics in float32 inside the kernel; the reference gets the same rounded inputs and runs in float64
    torch.manual_seed(3)
    csr = _graph(crowded=20)
    inputs = _inputs(csr, H=2, d_k=8, d_v=6, dtype=dtype, envelope=True)
    fused = _run(inputs, csr, True)
    exact = _run([t.detach().double() for t in inputs], csr, False)
    assert fused.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(fused.double(), exact, atol=tol, rtol=tol)
    grads = torch.autograd.grad(fused.float().sum(), [t for t in inputs])
    assert all(g.dtype == dtype and g.isfinite().all() for g in grads)


@needs_kernel
def test_empty_graph_and_nodes_without_edges():
    csr = DestinationCSR(torch.zeros(0, dtype=torch.long, device=DEVICE), 3)
    k, q, v = (torch.zeros(s, device=DEVICE, dtype=F64, requires_grad=True) for s in ((0, 2, 3), (3, 2, 3), (0, 2, 4)))
    with override(segment_attention='triton'):
        z = segment_attention(k, q, v, csr, scale=1.0)
    assert z.shape == (3, 2, 4) and (z == 0).all()
    (gq,) = torch.autograd.grad(z.sum(), q)
    assert (gq == 0).all()


@needs_kernel
def test_attention_block_with_the_kernel_equals_the_composition():
    from se3nb.attention import AttentionBlock
    from se3nb.conv import edge_invariants, random_features
    from se3nb.graph import radius_graph

    torch.manual_seed(4)
    fin, fout, fedge = Fiber({0: 4, 1: 2, 2: 2}), Fiber({0: 4, 1: 4, 2: 4}), Fiber({0: 2})
    pos = torch.randn(12, 3, dtype=F64) * 1.2
    graph = radius_graph(pos, 2.2).to(DEVICE)
    block = AttentionBlock(fin, fout, fedge, num_heads=2).double().to(DEVICE)
    x = {l: t.to(DEVICE).requires_grad_() for l, t in random_features(fin, 12, dtype=F64).items()}
    e = {l: t.to(DEVICE) for l, t in random_features(fedge, graph.num_edges, dtype=F64).items()}
    inv = edge_invariants(graph.rel_pos, e)
    geometry = block.to_key_value.geometry(graph, inv, 2, list(block.to_key_value.groups.values()))
    u = torch.rand(graph.num_edges, dtype=F64, device=DEVICE)
    results = {}
    for fused in (True, False):
        with override(segment_attention='triton' if fused else 'torch'):
            out = block(x, e, inv, graph, geometry, u)
        loss = sum(
            (o * torch.sin(torch.arange(o.numel(), device=DEVICE, dtype=F64)).view_as(o)).sum() for o in out.values()
        )
        results[fused] = (out, torch.autograd.grad(loss, [x[l] for l in sorted(x)] + list(block.parameters())))
    for l in fout.degrees:
        torch.testing.assert_close(results[True][0][l], results[False][0][l], atol=1e-12, rtol=1e-10)
    for a, b in zip(results[True][1], results[False][1]):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


def test_default_choice_and_errors(monkeypatch):
    csr = DestinationCSR(torch.tensor([0, 0, 1]), 3)
    k, q, v = torch.randn(3, 2, 4), torch.randn(3, 2, 4), torch.randn(3, 2, 5)
    # on CPU tensors the C++ kernel (or, without a compiler, the composition) runs by default, the Triton kernel never
    monkeypatch.setattr(
        sa._FusedSegmentAttention, 'apply', lambda *a: pytest.fail("the Triton kernel ran on CPU tensors by default")
    )
    torch.testing.assert_close(
        segment_attention(k, q, v, csr, scale=0.5), segment_attention_reference(k, q, v, csr, scale=0.5)
    )
    cpu_default = 'native' if sa._native_attention()[0] is not None else 'torch'
    assert choose('segment_attention', device=k.device, dtype=k.dtype) == cpu_default
    with pytest.raises(
        ValueError, match=r"value \[E, H, d_v\].*got key \[3, 2, 4\], query \[3, 2, 4\], value \[2, 2, 5\]"
    ):
        segment_attention(k, q, v[:2], csr, scale=0.5)
    with pytest.raises(ValueError, match="envelope"):
        segment_attention(k, q, v, csr, scale=0.5, envelope=torch.ones(4))
    with pytest.raises(ValueError, match="N = 3"):
        segment_attention(k, q[:2], v, csr, scale=0.5)
    monkeypatch.setattr(sa, '_interpreting', lambda: False)
    if sa._triton() is not None:
        with override(segment_attention='triton'), pytest.raises(RuntimeError, match="needs CUDA tensors"):
            segment_attention(k, q, v, csr, scale=0.5)
    monkeypatch.setattr(sa, '_triton', lambda: None)
    with override(segment_attention='triton'), pytest.raises(RuntimeError, match="needs Triton 3"):
        segment_attention(k, q, v, csr, scale=0.5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_attention_uses_the_kernel_on_cuda(monkeypatch):
    if sa._triton() is None:
        pytest.skip("needs Triton 3")
    calls = []
    original = sa._fused
    monkeypatch.setattr(sa, '_fused', lambda *a: calls.append(1) or original(*a))
    csr = _graph()
    k, q, v, u = _inputs(csr, H=8, d_k=32, d_v=32, dtype=torch.float16, envelope=True)
    z = segment_attention(k, q, v, csr, scale=0.2, envelope=u)
    assert calls and z.dtype == torch.float16


@pytest.mark.skipif(sa._native_attention()[0] is None, reason="the C++ kernels did not build here")
@pytest.mark.parametrize("envelope", [False, True])
def test_native_kernel_takes_keys_and_values_as_one_tensor(envelope):
    """Keys and values as column slices of one [E, H, d_v + d_k] tensor (how `_attend_in_heads` gets them): the C++
    backward writes both gradients into one buffer, and the tensor's gradient equals the composition's."""
    from se3nb.attention import _KeyValueViews

    torch.manual_seed(0)
    csr = DestinationCSR(torch.randint(0, 8, (50,)), 9)
    kv = torch.randn(50, 2, 5 + 3, dtype=F64, requires_grad=True)  # values (5), then keys (3)
    query, u = torch.randn(9, 2, 3, dtype=F64, requires_grad=True), torch.rand(50, dtype=F64) if envelope else None
    grads = {}
    for backend in ('native', 'torch'):
        key, value = _KeyValueViews.apply(kv, 5)
        with override(segment_attention=backend):
            z = segment_attention(key, query, value, csr, scale=0.5, envelope=u)
        grads[backend] = torch.autograd.grad((z * torch.linspace(-1, 1, z.numel()).view_as(z)).sum(), (kv, query))
    for a, b in zip(grads['native'], grads['torch']):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    key, value = _KeyValueViews.apply(kv, 5)
    assert sa._side_by_side(value, key) and not sa._side_by_side(key, value)  # the buffer is found, in its order


@pytest.mark.parametrize("backend", ['triton', 'native', 'torch'])
def test_second_derivatives_of_every_backend(backend):
    "Under `create_graph=True` the kernels' backward is recorded by torch's operations: finite differences agree."
    if backend == 'triton' and (sa._triton() is None or not (torch.cuda.is_available() or sa._interpreting())):
        pytest.skip("needs Triton 3 and a GPU, or Triton's interpreter")
    if backend == 'native' and (DEVICE != 'cpu' or sa._native_attention()[0] is None):
        pytest.skip("the C++ kernels run on CPU tensors, and need to have built")
    torch.manual_seed(0)
    csr = _graph(num_nodes=5, num_edges=12)
    k, q, v, u = _inputs(csr, 2, 3, 4, F64, envelope=True)
    with override(segment_attention=backend):
        assert torch.autograd.gradgradcheck(
            lambda k, q, v, u: segment_attention(k, q, v, csr, scale=0.5, envelope=u), (k, q, v, u)
        )
