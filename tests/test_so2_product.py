"""The SO(2) products (`se3nb.so2_product`, `03b_so2_product`) and the frame rotations (`se3nb.frame_rotation`, `03c`):
the C++ kernels against the torch products, the build from the package's sources, the switch to torch, scratch buffers
under threads.

The whole install path is checked by hand (about 3 minutes on 2 cores, so it is not part of the suite):

    pip wheel . --no-deps -w /tmp/whl && python3 -m venv /tmp/v
    /tmp/v/bin/pip install torch==2.13.0 /tmp/whl/se3nb-*.whl pytest
    cd /tmp && TORCH_EXTENSIONS_DIR=$(mktemp -d) /tmp/v/bin/python -m pytest -q <repo>/tests/test_so2_product.py

(run from outside the repository, so the installed package, not the checkout, is imported).
`test_the_wheel_ships_the_kernel_sources` checks the packaging part of it in the suite.
"""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import se3nb.backends as backends
import se3nb.extensions as extensions
import se3nb.frame_rotation as fr
import se3nb.so2_product as sp
from se3nb.backends import backend_report, choose, override
from se3nb.extensions import cpu_isa, extension_name
from se3nb.benchmark import random_molecule_batch
from se3nb.conv import edge_invariants, random_features
from se3nb.fiber import Fiber
from se3nb.model import SE3Transformer
from se3nb.so2 import EdgeFrames
from se3nb.so2_conv import SO2Conv

F64 = torch.float64
REPO = Path(__file__).resolve().parents[1]


def test_threads_running_the_product_at_once_do_not_share_scratch_buffers():
    import threading

    torch.manual_seed(0)
    f = Fiber.create(3, 8)
    conv = SO2Conv(f, f, Fiber({0: 4}))

    def run(i, out):
        graph, _, edge = random_molecule_batch(8, seed=i)
        x = random_features(f, graph.num_nodes, generator=torch.Generator().manual_seed(i))
        inv = edge_invariants(graph.rel_pos, edge)
        with torch.no_grad():
            for _ in range(10):
                out[i] = conv(x, edge, inv, graph, EdgeFrames(graph, 2, inv))

    together, alone = {}, {}
    threads = [threading.Thread(target=run, args=(i, together)) for i in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    for i in range(2):
        run(i, alone)
    assert all(torch.equal(together[i][l], alone[i][l]) for i in range(2) for l in alone[i])


def _native_kernels():
    "The fused float32 CPU kernels; a machine that can build them must (a failed build is a failure, not a skip)."
    from torch.utils.cpp_extension import is_ninja_available

    native, why_not = sp._native_so2()
    if native is None:
        can_build = (
            cpu_isa() is not None and is_ninja_available() and shutil.which(os.environ.get('CXX', 'c++')) is not None
        )
        if can_build:
            pytest.fail(
                f"the fused SO(2) CPU kernels did not build on an x86 machine with a compiler and ninja: {why_not}"
            )
        pytest.skip(f"fused SO(2) CPU kernels need AVX2 or AVX-512, a C++ compiler and ninja ({why_not})")
    return native


@pytest.fixture(params=['avx512', 'avx2'])
def isa(request, monkeypatch):
    "Each instruction set of the kernels this CPU runs (an AVX-512 CPU runs both builds), as the one `cpu_isa` reports."
    capability = {'avx512': 'AVX512', 'avx2': 'AVX2'}[request.param]
    if request.param == 'avx512' and cpu_isa() != 'avx512':
        pytest.skip(f"this CPU does not run AVX-512 code (torch reports {torch.backends.cpu.get_cpu_capability()})")
    monkeypatch.setattr(torch.backends.cpu, 'get_cpu_capability', lambda: capability)
    backends._clear()
    native = _native_kernels()
    assert native.isa() == request.param and native.vector_width() == {'avx512': 16, 'avx2': 8}[request.param]
    yield request.param
    backends._clear()


def _backends(h, xs, split=False):  # (forward, backward) backend of each block, for blocks with 4 outputs
    return [c[:2] for c in sp._choose_products(h, xs, [4 * x.shape[2] for x in xs], split, False)]


@pytest.mark.parametrize("forward", ['measured', 'transposed'])
@pytest.mark.parametrize("torch_block", [False, True])
@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("P", [0, 1, 7, 130])
def test_fused_cpu_kernels_equal_the_torch_products(P, split, torch_block, forward, isa, monkeypatch):
    """All blocks native (one C++ call each way), or one block past the kernels' limits (torch, the others one by one).
    `transposed`: every block with O % VW == 0 forced to the forward as the input gradient of W^T, with backward too,
    all forwards in one C++ call and the backwards one by one (a block's backward measured faster in torch)."""
    if forward == 'transposed':
        measured = sp._plan

        def transposed_plan(native, R, O, I, H, split):
            plan = measured(native, R, O, I, H, split)
            chosen = [3, 16, 1] if O % native.vector_width() == 0 else plan['forward']
            ms = {'forward': [1.0, 2.0], 'backward': [2.0, 1.0] if (R, O, I) == (4, 32, 128) else [1.0, 2.0]}
            return {**plan, 'forward': chosen, 'forward_trained': chosen, 'ms': ms}  # one block's backward in torch

        monkeypatch.setattr(sp, '_plan', transposed_plan)
        backends._clear()  # a new choice epoch: the choices kept per shapes are made again
    torch.manual_seed(P)
    H = 32
    blocks = [
        (2, 48, 64),
        (4, 96, 192),
        (4, 32, 128),
        (2, 8, 24),
        (2, 16, 6),
    ] + [(5, 8, 16)] * torch_block  # (rows, O, I): the kernels pad I = 24 and 6; 5 rows are past their limit (torch)
    sizes = tuple(O * I for _, O, I in blocks)
    h = torch.relu(torch.randn(P, H, dtype=F64))
    inputs = [h, h.clone() if split else None, torch.randn(sum(sizes), H, dtype=F64) / 6] + [
        torch.randn(P, R, I, dtype=F64) for R, _, I in blocks
    ]
    results = {}
    for name, dtype, backend in (
        ('truth', F64, 'torch'),
        ('torch', torch.float32, 'torch'),
        ('fused', torch.float32, 'native'),
    ):
        args = [None if t is None else t.to(dtype).requires_grad_() for t in inputs]
        with override(so2_product=backend):  # native: the last block (5 rows) falls back to torch
            ys = sp.so2_product(args[0], args[2], args[3:], sizes=sizes, h_second=args[1])
        cotangents = [
            torch.randn(y.shape, generator=torch.Generator().manual_seed(i), dtype=F64).to(dtype)
            for i, y in enumerate(ys)
        ]
        grads = torch.autograd.grad(ys, [t for t in args if t is not None], cotangents, allow_unused=True)
        results[name] = [t.double() for t in ys] + [g.double() for g in grads]
        with (
            torch.no_grad(),
            override(so2_product=backend),
        ):  # inference: the plans' `forward` (may sum in another order)
            for y, y_inferred in zip(ys, sp.so2_product(args[0], args[2], args[3:], sizes=sizes)):
                assert y.shape == y_inferred.shape
                assert not y.numel() or (y - y_inferred).abs().max() <= 1e-5 * y.abs().max()
    # the fused kernels sum in another order: as close to the float64 truth as the float32 torch products are
    for truth, torch_f32, fused in zip(results['truth'], results['torch'], results['fused']):
        assert fused.shape == truth.shape
        if truth.numel() == 0:
            continue
        if not truth.any():  # the weight gradient of zero slots
            assert not fused.any()
            continue
        scale = truth.abs().max()
        assert (fused - truth).abs().max() / scale < max(4 * ((torch_f32 - truth).abs().max() / scale).item(), 1e-6)
        assert (fused - torch_f32).abs().max() / scale < 1e-5


@pytest.mark.parametrize("R", [1, 2, 4])
def test_every_register_tile_computes_the_same_products(R, isa):
    "Every compiled tile (the autotune may pick any) and output tile, against W(h) built in float64."
    native, (P, O, I, H) = _native_kernels(), (37, 20, 48, 32)  # 37 slots: no tile divides them, tails run too
    g = torch.Generator().manual_seed(R)
    h, w = torch.rand(P, H, generator=g), torch.randn(O * I, H, generator=g) / H**0.5  # [P, H], [O*I, H]
    x, gy = torch.randn(P, R, I, generator=g), torch.randn(P, R, O, generator=g)  # [P, R, I], [P, R, O]
    W = (h.double() @ w.double().T).view(P, O, I)  # [P, O, I] the weights of each slot
    y, gx = x.double() @ W.transpose(1, 2), gy.double() @ W  # [P, R, O], [P, R, I]
    theta = sp._theta(w, O, I)  # [O, H, I]
    for variant in range(native.variants()):
        for tile in (1, 3, O):
            for got, want in (
                (native.so2_forward(h, theta, x, variant, tile, 16), y),
                (native.so2_grad_x(h, theta, gy, variant, tile, 16), gx),
            ):
                assert (got.double() - want).abs().max() < 1e-4 * want.abs().max(), (variant, tile)


@pytest.mark.parametrize("R", [1, 2, 4])
def test_the_forward_as_the_input_gradient_of_the_transposed_weights(R, isa):
    "y = x W^T computed by the input-gradient kernel on theta [I', H, O], every tile, against float64; O % VW only."
    native, (P, O, I, H) = _native_kernels(), (37, 32, 40, 32)  # I = 40: theta's rows and the inputs padded to I'
    g = torch.Generator().manual_seed(R)
    h, w = torch.rand(P, H, generator=g), torch.randn(O * I, H, generator=g) / H**0.5  # [P, H], [O*I, H]
    x = torch.randn(P, R, I, generator=g)  # [P, R, I]
    y = x.double() @ (h.double() @ w.double().T).view(P, O, I).transpose(1, 2)  # [P, R, O]
    theta_t, xp = sp._theta(w, O, I, transposed=True), sp._pad_inputs(x)  # [I', H, O], [P, R, I']
    assert theta_t.shape == (xp.shape[2], H, O) and not theta_t[I:].any()
    for variant in range(native.variants()):
        for tile in (1, 3, xp.shape[2]):
            got = native.so2_forward_planned(h, theta_t, xp, variant, tile, True)
            assert (got.double() - y).abs().max() < 1e-4 * y.abs().max(), (variant, tile)
    assert torch.equal(
        native.so2_forward_planned(h, sp._theta(w, O, I), xp, 0, 4, False),
        native.so2_forward(h, sp._theta(w, O, I), xp, 0, 4, 64),
    )
    with pytest.raises(RuntimeError, match="a transposed forward needs theta \\[I, K, O\\] with O %"):
        native.so2_forward_planned(h, theta_t[:, :, :20].contiguous(), xp, 0, 4, True)


@pytest.mark.parametrize("split", [False, True])
def test_gradient_kernels_write_into_and_add_to_given_tensors(split, isa):
    "dh added to the previous blocks' sum (`accumulate`), dTheta written into a block of the weight's gradient."
    native, (P, O, I, H) = _native_kernels(), (37, 20, 48, 32)
    g = torch.Generator().manual_seed(1)
    h, w3 = torch.rand(P, H, generator=g), torch.randn(O, I, H, generator=g)  # [P, H], [O, I, H]
    x, gy = torch.randn(P, 2, I, generator=g), torch.randn(P, 2, O, generator=g)  # [P, R, I], [P, R, O]
    fresh = native.so2_grad_h(w3, x, gy, split, 8)  # [P or 2P, H]
    before = torch.randn(fresh.shape, generator=g)
    out = before.clone()
    assert native.so2_grad_h(w3, x, gy, split, 8, out, True) is not None
    assert torch.allclose(out, before + fresh, atol=1e-5)
    assert torch.equal(native.so2_grad_h(w3, x, gy, split, 8, out, False), fresh) and torch.equal(out, fresh)
    grad_w = torch.full((2 * O * I, H), float('nan'))  # two blocks; the kernel writes the second
    native.so2_grad_w(h, x, gy, 64, grad_w[O * I :].view(O, I, H))
    assert torch.equal(grad_w[O * I :].view(O, I, H), native.so2_grad_w(h, x, gy, 64)) and grad_w[: O * I].isnan().all()
    with pytest.raises(RuntimeError, match="out must be contiguous float32"):
        native.so2_grad_h(w3, x, gy, split, 8, torch.zeros(P + 1, H), True)
    with pytest.raises(RuntimeError, match="accumulate needs out"):
        native.so2_grad_h(w3, x, gy, split, 8, None, True)
    with pytest.raises(RuntimeError, match="out must be contiguous float32"):
        native.so2_grad_w(h, x, gy, 64, torch.zeros(O, I, H).transpose(0, 1))


def test_all_blocks_in_one_call_equal_the_calls_per_block_and_check_their_layout(isa):
    native, (P, H) = _native_kernels(), (37, 32)
    g = torch.Generator().manual_seed(3)
    # (R, O, I, transposed forward): the second block's inputs and weights padded to the vector width
    shapes = [(2, 20, 48, 0), (2, 8, 6, 0), (4, 16, 24, 1)]
    sizes = [O * I for _, O, I, _ in shapes]
    h, weight = torch.rand(P, H, generator=g), torch.randn(sum(sizes), H, generator=g) / H**0.5
    xs = [torch.randn(P, R, I, generator=g) for R, _, I, _ in shapes]
    gys = [torch.randn(P, R, O, generator=g) for R, O, _, _ in shapes]
    ys, thetas, inputs = native.so2_forward_blocks(h, weight, xs, sizes, [0, 4, 0, 0, 4, 0, 3, 16, 1], [])
    assert thetas[2].numel() == 0  # after a transposed forward backward builds its own
    grad_w, plans, widths = torch.empty_like(weight), [0, 8, 8, 64] * 3, [I for _, _, I, _ in shapes]
    *gxs, dh = native.so2_backward_blocks(h, weight, thetas, inputs, widths, gys, sizes, plans, False, True, grad_w)
    dh_sum = torch.zeros(P, H)
    for (off, n), x, gy, y, gx, (R, O, I, t) in zip(sp._blocks(sizes), xs, gys, ys, gxs, shapes):
        w = weight[off : off + n]
        theta, xp = sp._theta(w, O, I), sp._pad_inputs(x)
        forward = (3, 16, 1) if t else (0, 4, 0)
        assert torch.equal(y, native.so2_forward_planned(h, sp._theta(w, O, I, t), xp, *forward))
        assert torch.equal(gx, native.so2_grad_x(h, theta, gy, 0, 8, 64)[..., :I]) and gx.shape == x.shape
        w3 = torch.nn.functional.pad(w.view(O, I, H), (0, 0, 0, xp.shape[2] - I))
        dh_sum += native.so2_grad_h(w3, xp, gy, False, 8)
        assert torch.equal(grad_w[off : off + n].view(O, I, H), native.so2_grad_w(h, xp, gy, 64)[:, :I])
    assert torch.allclose(dh, dh_sum, atol=1e-5)
    with pytest.raises(RuntimeError, match="padded to a multiple"):
        native.so2_backward_blocks(h, weight, thetas, xs, widths, gys, sizes, plans, False, True, grad_w)
    xs, sizes, weight = xs[:2], sizes[:2], weight[: sizes[0] + sizes[1]]
    with pytest.raises(RuntimeError, match="weights are not O \\* I"):
        native.so2_forward_blocks(h, weight, xs, [sizes[0] + 1, sizes[1]], [0, 4, 0] * 2, [])
    with pytest.raises(RuntimeError, match="weight must be"):
        native.so2_forward_blocks(h, weight[1:], xs, sizes, [0, 4, 0] * 2, [])
    with pytest.raises(RuntimeError, match="plan entries per block"):
        native.so2_forward_blocks(h, weight, xs, sizes, [0, 4] * 2, [])


@pytest.mark.parametrize("E", [0, 1, 300])
@pytest.mark.parametrize("A,B,C,transpose", [(9, 5, 16, False), (5, 5, 16, True), (13, 7, 21, False), (3, 3, 6, True)])
def test_native_frame_rotation_equals_the_batched_product(E, A, B, C, transpose, isa):
    """`frame_rotation` in the C++ kernel against torch's batched product in float64: forward and input gradient, with
    channel counts that leave a partial vector (21, 6)."""
    g = torch.Generator().manual_seed(E + A)
    D = torch.randn(E, B, A, generator=g, dtype=F64) if transpose else torch.randn(E, A, B, generator=g, dtype=F64)
    x = torch.randn(E, B, C, generator=g, dtype=F64)
    gy = torch.randn(E, A, C, generator=g, dtype=F64)
    truth = (D.transpose(1, 2) if transpose else D) @ x  # [E, A, C]
    x32 = x.float().requires_grad_()
    with override(frame_rotation='native'):
        assert choose('frame_rotation', device='cpu', dtype=torch.float32) == 'native'
        y = fr.frame_rotation(D.float(), x32, transpose)
    assert y.grad_fn is not None and 'FrameRotation' in type(y.grad_fn).__name__  # the kernel ran, not torch
    (gx,) = torch.autograd.grad(y, x32, gy.float())
    torch.testing.assert_close(y.double(), truth, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx.double(), (D if transpose else D.transpose(1, 2)) @ gy, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("E", [0, 1, 300])
@pytest.mark.parametrize("A,B,C,transpose", [(5, 9, 16, True), (7, 7, 21, True), (3, 5, 6, False)])
@pytest.mark.parametrize("backend", ['native', 'torch'])
def test_frame_rotation_to_rows_moves_and_transposes_in_the_same_pass(E, A, B, C, transpose, backend, isa):
    """With `rows` (a permutation and its inverse) the product comes out channels first, row k from edge index[k], as
    `(D x).transpose(1, 2)[index]` in float64; its input gradient is that of the same expression."""
    g = torch.Generator().manual_seed(E + A)
    D = torch.randn(E, B, A, generator=g, dtype=F64) if transpose else torch.randn(E, A, B, generator=g, dtype=F64)
    x = torch.randn(E, B, C, generator=g, dtype=F64, requires_grad=True)
    index = torch.randperm(E, generator=g)
    inverse = torch.empty_like(index).index_copy_(0, index, torch.arange(E))
    truth = ((D.transpose(1, 2) if transpose else D) @ x).transpose(1, 2)[index]  # [E, C, A]
    gy = torch.randn(truth.shape, generator=g, dtype=F64)
    (g_truth,) = torch.autograd.grad(truth, x, gy)
    x32 = x.detach().float().requires_grad_()
    with override(frame_rotation=backend):
        y = fr.frame_rotation(D.float(), x32, transpose, rows=(index, inverse))
    if backend == 'native':
        assert 'FrameRotationToRows' in type(y.grad_fn).__name__  # the kernel ran, not torch
    (gx,) = torch.autograd.grad(y, x32, gy.float())
    assert y.shape == (E, C, A) and y.is_contiguous()
    torch.testing.assert_close(y.double(), truth, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx.double(), g_truth, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("E", [0, 1, 300])
@pytest.mark.parametrize("backend", ['native', 'torch'])
def test_frame_rotation_into_blocks_against_a_float64_truth(E, backend, isa):
    "Every block: its degrees' rows of order m of D x[sources] side by side; gradients add up over edges and blocks."
    g, N = torch.Generator().manual_seed(E), 40
    degrees, channels = (0, 1, 3), (5, 17, 3)  # 17: a tail past the vector width
    Ds = [
        torch.randn(E, 4 * l + 1, 2 * l + 1, generator=g, dtype=F64) if l else torch.ones(E, 1, 1, dtype=F64)
        for l in degrees
    ]  # D_0 = 1
    xs = [torch.randn(N, C, 2 * l + 1, generator=g, dtype=F64, requires_grad=True) for l, C in zip(degrees, channels)]
    sources = torch.randint(0, N, (E,), generator=g)
    blocks = [(0, [0, 1, 2]), (1, [1, 2]), (3, [2]), (1, [2, 1])]  # (m, positions): one degree in several blocks

    def truth(m, positions):  # [E, s, s * C]
        s, r0 = (1, 0) if m == 0 else (2, 1 + 4 * (m - 1))
        parts = [
            (Ds[d][:, r0 : r0 + s * s] @ xs[d][sources].transpose(1, 2)).view(E, s, s, channels[d]) for d in positions
        ]
        return torch.cat(parts, -1).view(E, s, s * sum(channels[d] for d in positions))

    want = [truth(m, positions) for m, positions in blocks]
    cotangents = [torch.randn(w.shape, generator=g, dtype=F64) for w in want]
    g_want = torch.autograd.grad(want, xs, cotangents)
    x32 = [x.detach().float().requires_grad_() for x in xs]
    with override(frame_rotation=backend):
        got = fr.frame_rotation_into_blocks([D.float() for D in Ds], x32, sources, blocks)
    if backend == 'native':
        assert 'FrameRotationIntoBlocks' in type(got[0].grad_fn).__name__  # the kernel ran, not torch
    g_got = torch.autograd.grad(got, x32, [c.float() for c in cotangents])
    for a, b in zip([*got, *g_got], [*want, *g_want]):
        assert a.shape == b.shape
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)


def test_frame_rotation_into_blocks_refuses_what_does_not_fit(isa):
    native, E = _native_kernels(), 6
    D1, x1 = torch.randn(E, 5, 3), torch.randn(4, 3, 2)  # degree 1: [E, 5, 3] and 4 nodes [4, 3, 2]
    with pytest.raises(RuntimeError, match=r"index out of range \[0, 4\)"):
        native.frame_rotate_into_blocks([D1], [x1], torch.tensor([0, 1, 2, 3, 4, 0]), [1], [[0]])
    with pytest.raises(RuntimeError, match="order 2 exceeds degree position 0"):
        native.frame_rotate_into_blocks([D1], [x1], torch.zeros(E, dtype=torch.long), [2], [[0]])
    with pytest.raises(RuntimeError, match="one source row per edge"):
        native.frame_rotate_into_blocks([D1], [x1], torch.empty(0, dtype=torch.long), [1], [[0]])
    with pytest.raises(RuntimeError, match=r"x must be contiguous float32 \[N, 2l\+1, C\]"):
        native.frame_rotate_into_blocks([D1], [torch.randn(4, 2, 3)], torch.zeros(E, dtype=torch.long), [1], [[0]])
    no_index = torch.empty(0, dtype=torch.long)
    with pytest.raises(RuntimeError, match="gradient must be contiguous float32"):
        native.frame_rotate_from_blocks([D1], [torch.randn(E, 2, 5)], [2], [1], [[0]], no_index, E)
    g1 = torch.randn(E, 2, 4)
    with pytest.raises(RuntimeError, match="one source row per edge"):
        native.frame_rotate_from_blocks([D1], [g1], [2], [1], [[0]], no_index, E + 1)
    with pytest.raises(RuntimeError, match=r"index out of range \[0, 3\)"):
        native.frame_rotate_from_blocks([D1], [g1], [2], [1], [[0]], torch.full((E,), 3), 3)


def test_frame_rotate_rows_refuses_indices_out_of_range(isa):
    D, x = torch.randn(4, 3, 3), torch.randn(4, 3, 8)
    with pytest.raises(RuntimeError, match="x_index out of range"):
        fr._rotate_rows(D, x, True, d_index=torch.arange(4), x_index=torch.tensor([0, 1, 2, 4]))
    with pytest.raises(RuntimeError, match="d_index out of range"):
        fr._rotate_rows(D, x, True, d_index=torch.tensor([-1, 1, 2, 3]), x_index=torch.arange(4))
    index = torch.tensor([0, 1, 2, 3])  # one tensor for both: in range of D's 4 rows, not of x's 3
    with pytest.raises(RuntimeError, match="x_index out of range"):
        fr._rotate_rows(D, x[:3], True, d_index=index, x_index=index)
    out = torch.empty(4, 30)
    with pytest.raises(RuntimeError, match="out_columns out of range"):  # channel 7's 3 components past column 29
        fr._rotate_rows(D, x, True, layout=fr._COLUMNS, out=out, columns=torch.tensor([0, 3, 6, 9, 12, 15, 18, 28]))


def test_frame_rotation_to_columns_refuses_columns_that_do_not_tile_the_row():
    Ds, ys = [torch.ones(3, 1, 1), torch.randn(3, 3, 3)], [torch.randn(3, 1, 2), torch.randn(3, 3, 2)]  # 2 + 6 columns
    rows = (torch.arange(3), torch.arange(3))
    good = [torch.tensor([0, 4]), torch.tensor([1, 5])]
    torch.testing.assert_close(fr.frame_rotation_to_columns(Ds, ys, rows, good, 8)[:, 0], ys[0][:, 0, 0])
    with pytest.raises(ValueError, match="must cover a row of 8 once"):  # degree 1's channels overlap
        fr.frame_rotation_to_columns(Ds, ys, rows, [torch.tensor([0, 4]), torch.tensor([1, 3])], 8)
    with pytest.raises(ValueError, match="must cover a row of 9 once"):  # one column short
        fr.frame_rotation_to_columns(Ds, ys, rows, good, 9)
    fr.frame_rotation_to_columns(Ds, ys, rows, good, 8)  # checked once per set of columns...
    good[1][1] = 3  # ...until they change in place
    with pytest.raises(ValueError, match="must cover a row of 8 once"):
        fr.frame_rotation_to_columns(Ds, ys, rows, good, 8)


@pytest.mark.parametrize("E", [0, 1, 300])
@pytest.mark.parametrize("backend", ['native', 'torch'])
def test_frame_rotation_to_columns_writes_every_degree_into_its_columns(E, backend, isa):
    """Degrees 0-2 (6, 4 and 3 channels, one partial vector) rotated back, moved to another edge order and written into
    interleaved columns of one row per edge, as `frame_rotation(D, y, True, rows)` per degree placed by hand (float64
    truth); the gradients of every degree's input against that expression."""
    g = torch.Generator().manual_seed(E)
    channels = {0: 6, 1: 4, 2: 3}
    Ds = [torch.randn(E, 2 * l + 1, 2 * l + 1, generator=g, dtype=F64) for l in channels]
    ys = [torch.randn(E, 2 * l + 1, c, generator=g, dtype=F64, requires_grad=True) for l, c in channels.items()]
    width = sum(c * (2 * l + 1) for l, c in channels.items())
    slots = torch.randperm(sum(channels.values()), generator=g)  # the channels of all degrees in a shuffled order
    sizes = torch.tensor([2 * l + 1 for l, c in channels.items() for _ in range(c)])  # each channel 2l+1 wide
    begin = torch.cumsum(sizes[slots], 0) - sizes[slots]  # where each slot starts
    where = torch.empty_like(begin).index_copy_(0, slots, begin)  # where each channel starts, channels in order
    columns = list(torch.split(where, list(channels.values())))
    index = torch.randperm(E, generator=g)
    inverse = torch.empty_like(index).index_copy_(0, index, torch.arange(E))
    truth = torch.zeros(E, width, dtype=F64)
    for D, y, cols in zip(Ds, ys, columns):
        part = (D.transpose(1, 2) @ y).transpose(1, 2)[index]  # [E, C, 2l+1]
        for c, start in enumerate(cols.tolist()):
            truth = truth.index_copy(1, torch.arange(start, start + part.shape[2]), part[:, c])
    gy = torch.randn(E, width, generator=g, dtype=F64)
    g_truth = torch.autograd.grad(truth, ys, gy)
    y32 = [y.detach().float().requires_grad_() for y in ys]
    with override(frame_rotation=backend):
        out = fr.frame_rotation_to_columns([D.float() for D in Ds], y32, (index, inverse), columns, width)
    if backend == 'native' and E:
        assert 'FrameRotationToColumns' in type(out.grad_fn).__name__  # the kernel ran, not torch
    torch.testing.assert_close(out.double(), truth, rtol=1e-5, atol=1e-5)
    for got, want in zip(torch.autograd.grad(out, y32, gy.float()), g_truth):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("E", [0, 1, 300])
@pytest.mark.parametrize("backend", ['native', 'torch'])
def test_frame_rotation_blocks_to_columns_assembles_rotates_and_writes(E, backend, isa):
    """Degrees 0-2 assembled from parts of three blocks (degree 1's m = 1 from two blocks, added; degree 2's m = 1 from
    none: zeros; block 2 has a column no part reads: zero gradient), rotated back, moved to another edge order and
    written into interleaved columns, against the same built by hand in float64; gradients of every block too."""
    g = torch.Generator().manual_seed(E)
    channels = {0: 6, 1: 4, 2: 3}
    Ds = [torch.randn(E, 2 * l + 1, 2 * l + 1, generator=g, dtype=F64) for l in channels]
    widths = [(1, 6 + 4 + 3), (2, 4 + 3), (2, 4 + 3 + 1)]  # (s, W): m = 0 | m = 1 | m = 1 and m = 2, one spare column
    ys = [torch.randn(E, s, W, generator=g, dtype=F64, requires_grad=True) for s, W in widths]
    parts = [(0, 0, 0, 0), (1, 0, 0, 6), (2, 0, 0, 10), (1, 1, 1, 0), (2, 2, 1, 4), (1, 1, 2, 1), (2, 2, 2, 5)]
    width = sum(c * (2 * l + 1) for l, c in channels.items())
    starts = torch.randperm(sum(channels.values()), generator=g)  # channels in a shuffled order, each 2l+1 wide
    sizes = torch.tensor([2 * l + 1 for l, c in channels.items() for _ in range(c)])
    begin = torch.cumsum(sizes[starts], 0) - sizes[starts]
    columns = list(torch.split(torch.empty_like(begin).index_copy_(0, starts, begin), list(channels.values())))
    index = torch.randperm(E, generator=g)
    inverse = torch.empty_like(index).index_copy_(0, index, torch.arange(E))
    truth = torch.zeros(E, width, dtype=F64)
    for d, (l, C) in enumerate(channels.items()):
        y = torch.zeros(E, 2 * l + 1, C, dtype=F64)  # rows by m: 0, then +m, -m
        for dp, m, j, first in parts:
            if dp == d:
                rows = [0] if m == 0 else [2 * m - 1, 2 * m]
                y = y.index_add(1, torch.tensor(rows), ys[j][:, :, first : first + C])
        part = (Ds[d].transpose(1, 2) @ y).transpose(1, 2)[index]  # [E, C, 2l+1]
        for c, start in enumerate(columns[d].tolist()):
            truth = truth.index_copy(1, torch.arange(start, start + 2 * l + 1), part[:, c])
    gy = torch.randn(E, width, generator=g, dtype=F64)
    g_truth = torch.autograd.grad(truth, ys, gy)
    assert not g_truth[2][:, :, 0].any()  # the spare column of block 2 (its first) reaches nothing
    y32 = [y.detach().float().requires_grad_() for y in ys]
    with override(frame_rotation=backend):
        out = fr.frame_rotation_blocks_to_columns([D.float() for D in Ds], y32, parts, (index, inverse), columns, width)
    if backend == 'native':
        assert 'BlocksToColumns' in type(out.grad_fn).__name__  # the kernel ran, not torch
    torch.testing.assert_close(out.double(), truth, rtol=1e-5, atol=1e-5)
    for got, want in zip(torch.autograd.grad(out, y32, gy.float()), g_truth):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_frame_rotation_blocks_to_columns_refuses_parts_that_do_not_fit(isa):
    native, E = _native_kernels(), 4
    Ds, ys, cols = [torch.randn(E, 3, 3)], [torch.randn(E, 2, 4)], [torch.tensor([0, 3])]  # degree 1, 2 channels
    index, fit = torch.arange(E), ([0], [1], [0], [0])
    assert native.frame_rotate_blocks_to_columns(Ds, ys, *fit, cols, index, 6).shape == (E, 6)
    with pytest.raises(RuntimeError, match="order 2 exceeds its degree's 3 rows"):
        native.frame_rotate_blocks_to_columns(Ds, ys, [0], [2], [0], [0], cols, index, 6)
    with pytest.raises(RuntimeError, match="2 channels from column 3 exceed its block's 4"):
        native.frame_rotate_blocks_to_columns(Ds, ys, [0], [1], [0], [3], cols, index, 6)
    with pytest.raises(RuntimeError, match="order 0 needs a block of 1 rows"):
        native.frame_rotate_blocks_to_columns(Ds, ys, [0], [0], [0], [0], cols, index, 6)
    with pytest.raises(RuntimeError, match=r"columns out of range \[0, 4\)"):
        native.frame_rotate_blocks_to_columns(Ds, ys, *fit, [torch.tensor([0, 4])], index, 6)
    with pytest.raises(RuntimeError, match=r"inverse out of range \[0, 4\)"):
        native.frame_rotate_blocks_to_columns(Ds, ys, *fit, cols, torch.tensor([0, 1, 2, 4]), 6)
    with pytest.raises(RuntimeError, match="one row per edge"):
        native.frame_rotate_blocks_to_columns(Ds, ys, *fit, cols, torch.arange(E - 1), 6)


def test_frames_that_take_gradients_rotate_in_torch():
    "Frames with `requires_grad` (forces: positions with gradients) take torch's product, so their gradient exists."
    D = torch.randn(10, 5, 3, requires_grad=True)
    x = torch.randn(10, 3, 8, requires_grad=True)
    gD, gx = torch.autograd.grad(fr.frame_rotation(D, x).sum(), [D, x])
    torch.testing.assert_close(gD, torch.ones(10, 5, 8) @ x.detach().transpose(1, 2))
    torch.testing.assert_close(gx, D.detach().transpose(1, 2) @ torch.ones(10, 5, 8))


def test_fused_cpu_kernels_in_a_float32_model(isa):
    torch.manual_seed(0)
    kw = dict(
        num_layers=2,
        fiber_in=Fiber({0: 16}),
        fiber_hidden=Fiber.create(4, 16),
        fiber_out=Fiber({0: 16, 1: 16}),
        num_heads=2,
        channels_div=1,
        fiber_edge=Fiber({0: 4}),
    )
    model = SE3Transformer(**kw)
    graph, _, edge = random_molecule_batch(6)
    x = {0: torch.randn(graph.num_nodes, 16, 1)}
    results = []
    for backend in ('native', 'torch'):
        model.zero_grad()
        with override(so2_product=backend):  # native: the blocks outside the kernels' limits run torch's products
            out = model(graph, x, edge)
            sum(
                (v * torch.sin(torch.arange(v.numel(), dtype=v.dtype)).view_as(v)).sum() for v in out.values()
            ).backward()
        results.append(([out[l].detach() for l in sorted(out)], [p.grad.clone() for p in model.parameters()]))
    for a, b in zip(results[0][0] + results[0][1], results[1][0] + results[1][1]):
        assert (a - b).abs().max() <= 1e-4 * b.abs().max() + 1e-7


def test_fused_cpu_kernels_can_be_switched_off(monkeypatch):
    monkeypatch.setenv('SE3NB_BACKENDS', 'so2_product=torch')
    h, xs = torch.zeros(1, 32), (torch.zeros(1, 4, 32),)  # a block within the kernels' limits
    assert _backends(h, xs) == [('torch', 'torch')]
    monkeypatch.setenv('SE3NB_BACKENDS', 'torch')  # torch for every op that has it
    assert _backends(h, xs) == [('torch', 'torch')]
    monkeypatch.delenv('SE3NB_BACKENDS')
    # float64 and bfloat16 always run the torch products, and so do blocks outside the kernels' limits
    assert _backends(h.double(), tuple(x.double() for x in xs)) == [('torch', 'torch')]
    assert _backends(h.bfloat16(), tuple(x.bfloat16() for x in xs)) == [('torch', 'torch')]
    assert _backends(h, (torch.zeros(1, 5, 32),)) == [('torch', 'torch')]  # 5 rows per slot
    with override(so2_product='native'), pytest.raises(RuntimeError, match="float32 on CPU only"):
        choose('so2_product', device='cpu', dtype=F64)


@pytest.mark.slow
def test_kernels_build_from_the_package_sources_in_an_empty_extension_dir(tmp_path):
    "A fresh clone or install: nothing cached, the kernels compile from se3nb/csrc and load (a minute on 2 cores)."
    _native_kernels()  # skips where they cannot build
    code = (
        "import se3nb.so2_product as sp, se3nb.extensions as b; m, why = sp._native_so2(); assert m is not None, why; "
        "print(m.__file__); print(b._source_path('so2_product.cpp'))"
    )
    env = {**os.environ, 'TORCH_EXTENSIONS_DIR': str(tmp_path)}
    out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    built, source = (Path(line) for line in out.stdout.split())
    assert built.is_relative_to(tmp_path) and built.name.startswith(extension_name(source, 'avx512'))
    assert source == REPO / 'se3nb' / 'csrc' / 'so2_product.cpp' or source.parent.name == 'csrc'


@pytest.mark.slow
def test_the_wheel_ships_the_kernel_sources(tmp_path):
    if shutil.which('pip') is None and not (Path(sys.executable).parent / 'pip').exists():
        pytest.skip('pip is not installed')
    cmd = [
        sys.executable,
        '-m',
        'pip',
        'wheel',
        str(REPO),
        '--no-deps',
        '--no-build-isolation',
        '-q',
        '-w',
        str(tmp_path),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    (wheel,) = tmp_path.glob('se3nb-*.whl')
    names = zipfile.ZipFile(wheel).namelist()
    assert 'se3nb/csrc/so2_product.cpp' in names, [n for n in names if 'csrc' in n]


def test_so2_product_checks_its_inputs():
    h, w = torch.zeros(3, 16), torch.zeros(2 * 16 + 4, 16)
    with pytest.raises(
        ValueError, match=r"one input \[P, R, I\] per block of `sizes` \[32, 4\].*got inputs \[\[3, 2, 16\]\]"
    ):
        sp.so2_product(h, w, [torch.zeros(3, 2, 16)], sizes=[32, 4])
    with pytest.raises(ValueError, match="P = 3"):
        sp.so2_product(h, w, [torch.zeros(3, 2, 16), torch.zeros(4, 2, 2)], sizes=[32, 4])


def test_the_automatic_choice_follows_the_measurements_per_shape_and_requests_do_not(isa):
    "Where torch's products measured faster for a block shape, they run it, unless the kernels are asked for."
    h, x = torch.zeros(3, 32), torch.zeros(3, 2, 64)  # R=2, O=4, I=64, H=32
    plan = sp._plan(sp._native_so2()[0], 2, 4, 64, 32, False)  # measured (or read from the record)
    assert set(plan) == {'version', 'forward', 'forward_trained', 'grad_x', 'grad_w', 'grad_h', 'ms'} and plan[
        'forward'
    ][0] in range(sp._native_so2()[0].variants())
    assert all(ms > 0 for pair in plan['ms'].values() for ms in pair)
    key = next(k for k, v in sp._PLANS.items() if v is plan)
    assert key == f"{isa} R=2 O=4 I=64 H=32 split=0"
    try:
        sp._PLANS[key] = {**plan, 'ms': {'forward': [2.0, 1.0], 'backward': [1.0, 2.0]}}  # torch wins forward only
        sp._CHOICES.clear()  # choices are kept per shapes: the measurement was edited behind their back
        assert _backends(h, [x]) == [('torch', 'native')]
        report = backend_report()
        assert 'cpu, float32, kernel measured slower: torch (not native: measured slower than torch' in report
        assert f"compiled for {isa}" in report and key in report
        with override(so2_product='native'):  # a request gets the kernels
            assert _backends(h, [x]) == [('native', 'native')]
    finally:
        sp._PLANS[key] = plan
        sp._CHOICES.clear()
        backends._clear()


def test_measured_parameters_are_recorded_beside_the_extension(tmp_path, isa):
    native = sp._native_so2()[0]
    stored = extensions.read_tuning(native)
    assert any(key.startswith(f"{isa} R=") for key in stored)  # the plans the tests above measured
    fake = type(sys)('fake_extension')
    fake.__file__ = str(tmp_path / 'fake_extension.so')
    assert extensions.read_tuning(fake) == {}
    path = extensions.record_tuning(fake, {'a': 1})
    assert path.parent == tmp_path and extensions.record_tuning(fake, {'b': [2, 3]}) == path
    assert extensions.read_tuning(fake) == {'a': 1, 'b': [2, 3]} and list(tmp_path.glob('*.tmp')) == []
    path.write_text(path.read_text().replace(extensions.cpu_id(), 'another CPU'))
    assert extensions.read_tuning(fake) == {}  # measured on another CPU: not used
    path.write_text('{"cpu": "torn')
    assert extensions.read_tuning(fake) == {}


@pytest.mark.parametrize('trained', [False, True])
def test_a_plan_recorded_by_older_rules_is_measured_again(isa, monkeypatch, trained):
    "Plans of older records (before the transposed forward, or judging the training forward at 256 slots) are redone."
    key, native = f"{isa} R=4 O=16 I=32 H=32 split=0", sp._native_so2()[0]
    saved = sp._PLANS.pop(key, None)
    old = {
        'forward': [0, 4],
        'grad_x': [0, 8],
        'grad_w': 64,
        'grad_h': 8,
        'ms': {'forward': [1, 2], 'backward': [1, 2]},
    }
    if trained:  # recorded with the transposed forward, its training forward judged at 256 slots (no version)
        old = {**old, 'forward': [0, 4, 0], 'forward_trained': [0, 4, 0]}
    monkeypatch.setattr(sp, 'read_tuning', lambda module: {key: old})
    monkeypatch.setattr(sp, 'record_tuning', lambda module, entries: None)
    try:
        plan = sp._plan(native, 4, 16, 32, 32, False)
        assert (
            plan is not old
            and len(plan['forward']) == len(plan['forward_trained']) == 3
            and plan['forward'][2] in (0, 1)
            and plan['version'] == sp._PLAN_VERSION
        )
        assert plan['forward'][0] in range(native.variants()) and plan['ms']['forward'][0] != 1
    finally:
        sp._PLANS.pop(key, None)
        if saved is not None:
            sp._PLANS[key] = saved


@pytest.mark.parametrize('burst', range(40))
def test_a_slow_spell_during_the_tuning_does_not_change_its_choice(burst, monkeypatch):
    "The candidates are timed in turn, round by round: a spell of slowness shorter than a round hits each one once."
    clock, calls = [0.0], [0]

    def candidate(seconds):
        def run():  # one call on a clock that runs twice as fast during the 6 calls from `burst` on
            calls[0] += 1
            clock[0] += seconds * (2 if burst <= calls[0] < burst + 6 else 1)

        return run

    monkeypatch.setattr(sp.time, 'thread_time', lambda: clock[0])
    candidates = {k: candidate(1.0) for k in range(6)} | {'fastest': candidate(0.9)}
    key, seconds = sp._fastest(candidates)
    assert key == 'fastest' and seconds == pytest.approx(0.9)


def test_a_read_only_extension_cache_does_not_stop_the_product(isa, monkeypatch):
    def refuse(module, entries):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(sp, 'record_tuning', refuse)
    monkeypatch.setattr(sp, 'read_tuning', lambda module: {})
    key = f"{isa} R=2 O=4 I=32 H=16 split=0"
    saved = sp._PLANS.pop(key, None)
    try:
        with pytest.warns(UserWarning, match="could not record the SO\\(2\\) kernel measurements .*read-only"):
            plan = sp._plan(sp._native_so2()[0], 2, 4, 32, 16, False)  # measured, used, not recorded
        assert sp._PLANS[key] is plan and plan['ms']['forward'][0] > 0
    finally:
        sp._PLANS.pop(key, None)
        if saved is not None:
            sp._PLANS[key] = saved


def test_so2_product_second_derivatives():
    "Under `create_graph=True` the backward is recorded by torch's operations: finite differences agree."
    torch.manual_seed(0)
    sizes = [3 * 4, 2 * 8]  # O * I of two m-blocks
    h, w = torch.randn(5, 16, dtype=torch.float64), torch.randn(sum(sizes), 16, dtype=torch.float64)
    xs = [torch.randn(5, 2, 4, dtype=torch.float64), torch.randn(5, 4, 8, dtype=torch.float64)]
    inputs = [t.requires_grad_() for t in (h, w, *xs)]
    assert torch.autograd.gradgradcheck(lambda h, w, *xs: sp.so2_product(h, w, xs, sizes=sizes), inputs)
