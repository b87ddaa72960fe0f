"""The SO(2) fast path (`se3nb.so2`) against the reference TFN convolution: values, gradients, edge cases, precision."""

import pytest
import torch

from e3nn import o3

from se3nb.basis import Bases, wigner_D
from se3nb.conv import FUSE_LEVELS, TFNConv, edge_invariants, random_features
from se3nb.fiber import Fiber
from se3nb.graph import Graph, radius_graph
from se3nb.model import SE3Transformer
from se3nb.so2 import EdgeFrames, SO2Plan, _native_frames, _slot_layout, edge_rotations, reverse_edge_pairs
from se3nb.so2_conv import SO2Conv
from se3nb.benchmark import random_molecule_batch
from se3nb.backends import override

F64 = torch.float64


@pytest.mark.skipif(_native_frames()[0] is None, reason="the C++ kernels did not build here")
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-6), (F64, 1e-12)])
def test_native_edge_frames_equal_torch(dtype, tol):
    "The C++ frames: zero-length edges, directions near x (the other helper axis), degrees 0-4, any row order."
    g = torch.Generator().manual_seed(0)
    pos = torch.randn(30, 3, generator=g, dtype=dtype)
    pos[3] = 0  # zero length
    pos[4] = torch.tensor([2.0, 0.1, -0.3], dtype=dtype)  # |u_x| > 0.9
    pos[5] = torch.tensor([-1.0, 0.4, 0.2], dtype=dtype)
    graph = Graph(torch.stack([torch.arange(30), (torch.arange(30) + 1) % 30]), 30, rel_pos=pos)
    frames = {}
    for backend in ('native', 'torch'):
        with override(edge_frames=backend):
            frames[backend] = EdgeFrames(graph, 4, torch.ones(30, 1, dtype=dtype))
    for a, b in zip(frames['native'].D_in + frames['native'].D_out, frames['torch'].D_in + frames['torch'].D_out):
        assert a.shape == b.shape and a.dtype == b.dtype and (a - b).abs().max() < tol
    with override(edge_frames='native'):  # even when asked for: positions that take gradients get torch's frames
        moving = Graph(graph.edge_index, 30, rel_pos=pos.clone().requires_grad_())
        assert all(D.requires_grad for D in EdgeFrames(moving, 2, torch.ones(30, 1, dtype=dtype)).D_in[1:])


def mixed_graph(seed=0, dtype=F64, symmetric=True):
    """Radius graph whose reverse edges share degree-0 features (so they pair), plus a zero-length edge, a lone edge and
    a duplicated edge; degree-1 edge features differ per direction."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.randn(24, 3, generator=g, dtype=dtype) * 1.6
    pos[23] = pos[22]
    base = radius_graph(pos, 2.4)
    src = base.src.tolist() + [22, 0, base.src[0].item()]
    dst = base.dst.tolist() + [23, 5, base.dst[0].item()]
    graph = Graph(torch.tensor([src, dst]), 24, pos=pos)
    key = torch.minimum(graph.src, graph.dst) * 24 + torch.maximum(graph.src, graph.dst)
    _, pair = torch.unique(key, return_inverse=True)
    e0 = (
        torch.randn(int(pair.max()) + 1, 2, 1, generator=g, dtype=dtype)[pair]
        if symmetric
        else torch.randn(graph.num_edges, 2, 1, generator=g, dtype=dtype)
    )
    return graph, {0: e0, 1: torch.randn(graph.num_edges, 1, 3, generator=g, dtype=dtype)}


def conv_pair(fin, fout, fedge, **kw):
    torch.manual_seed(1)
    ref = TFNConv(fin, fout, fedge, **kw).double()
    fast = SO2Conv(fin, fout, fedge, **kw).double()
    fast.load_state_dict(ref.state_dict())
    return ref, fast


UNEVEN = (Fiber({0: 3, 1: 5, 2: 2, 3: 4, 4: 2}), Fiber({0: 2, 1: 3, 2: 4, 3: 1, 4: 2}))
EVEN = (Fiber.create(5, 3), Fiber.create(5, 3))


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("pool", [False, True])
@pytest.mark.parametrize("fuse_level", FUSE_LEVELS)
@pytest.mark.parametrize("fibers", [UNEVEN, EVEN], ids=["uneven", "even"])
def test_fast_path_equals_reference_degrees_0_to_4(fibers, fuse_level, pool, symmetric):
    graph, ef = mixed_graph(symmetric=symmetric)
    fedge = Fiber({0: 2, 1: 1})
    ref, fast = conv_pair(*fibers, fedge, pool=pool, self_interaction=pool, fuse_level=fuse_level)
    x = random_features(fibers[0], graph.num_nodes, dtype=F64)
    x_ref = {l: v.clone().requires_grad_() for l, v in x.items()}
    x_fast = {l: v.clone().requires_grad_() for l, v in x.items()}
    inv = edge_invariants(graph.rel_pos, ef)
    frames = EdgeFrames(graph, 4, inv)
    assert frames.num_zero == 3 and (frames.num_slots < graph.num_edges) == symmetric
    y_ref = ref(x_ref, ef, inv, graph, Bases(graph.rel_pos, 4))
    y_fast = fast(x_fast, ef, inv, graph, frames)
    for l in y_ref:
        assert ((y_ref[l] - y_fast[l]).abs().max() / y_ref[l].abs().max()) < 1e-10, l
    # gradients of inputs and of every parameter
    cot = {l: torch.randn_like(v) for l, v in y_ref.items()}
    sum((y_ref[l] * cot[l]).sum() for l in cot).backward()
    sum((y_fast[l] * cot[l]).sum() for l in cot).backward()
    for l in x:
        assert (x_ref[l].grad - x_fast[l].grad).abs().max() < 1e-10 * x_ref[l].grad.abs().max()
    for (name, p), q in zip(ref.named_parameters(), fast.parameters()):
        assert (p.grad - q.grad).abs().max() <= 1e-10 * p.grad.abs().max() + 1e-14, name


def test_gradients_reach_each_edges_own_features_and_positions():
    """Reverse edges share one radial evaluation; gradients for edge features and positions must still be each edge's
    own."""
    graph, ef = mixed_graph()
    fin, fout = UNEVEN
    ref, fast = conv_pair(fin, fout, Fiber({0: 2, 1: 1}), fuse_level='partial')
    x = random_features(fin, graph.num_nodes, dtype=F64)
    grads = []
    for conv, make in ((ref, lambda g, inv: Bases(g.rel_pos, 4)), (fast, lambda g, inv: EdgeFrames(g, 4, inv))):
        pos = graph.pos.clone().requires_grad_()
        e = {l: v.clone().requires_grad_() for l, v in ef.items()}
        g = graph.with_positions(pos)
        inv = edge_invariants(g.rel_pos, e)
        out = conv(x, e, inv, g, make(g, inv))
        sum(v.square().sum() for v in out.values()).backward()
        grads.append([pos.grad, e[0].grad, e[1].grad])
    # the coincident nodes 22 and 23 are left out: there the reference's gradient is e3nn's normalization at |r| = 0
    # (~1e11)
    keep_nodes = torch.arange(graph.num_nodes) < 22
    keep_edges = graph.rel_pos.norm(dim=-1) > 0
    for (a, b), keep in zip(zip(*grads), (keep_nodes, keep_edges, keep_edges)):
        assert torch.isfinite(b).all() and (a - b)[keep].abs().max() < 1e-9 * a[keep].abs().max()


def test_model_paths_agree_and_share_state_dicts():
    torch.manual_seed(0)
    kw = dict(
        num_layers=2,
        fiber_in=Fiber({0: 3, 1: 2}),
        fiber_hidden=Fiber({0: 8, 1: 4, 2: 4, 3: 4}),
        fiber_out=Fiber({0: 2, 1: 1}),
        num_heads=2,
        channels_div=2,
        fiber_edge=Fiber({0: 2}),
    )
    fast = SE3Transformer(**kw).double()
    with override(conv='reference'):
        ref = SE3Transformer(**kw).double()
    ref.load_state_dict(fast.state_dict())
    graph, ef = mixed_graph()
    x = random_features(fast.fiber_in, graph.num_nodes, dtype=F64)
    a, b = fast(graph, x, {0: ef[0]}), ref(graph, x, {0: ef[0]})
    assert all((a[l] - b[l]).abs().max() < 1e-10 * b[l].abs().max() for l in b)
    assert isinstance(fast.graph_modules[0].to_key_value, SO2Conv) and type(ref.graph_modules[-1]) is TFNConv


def _wigner_D_least_squares(l, R):  # [2l+1, 2l+1] an independent oracle: Y_l(R r) = D_l(R) Y_l(r) solved on points
    points = torch.randn(4 * (2 * l + 1), 3, dtype=F64, generator=torch.Generator().manual_seed(l))  # [4(2l+1), 3]
    Y, Y_rot = (
        o3.spherical_harmonics(l, points, normalize=True),
        o3.spherical_harmonics(l, points @ R.T, normalize=True),
    )
    return torch.linalg.lstsq(Y, Y_rot).solution.T


def test_wigner_D_batch_and_edge_frames():
    g = torch.Generator().manual_seed(0)
    r = torch.randn(40, 3, generator=g, dtype=F64)
    r[0] = torch.tensor([1e-3, 0, 0], dtype=F64)  # along x: the helper axis switches to z
    r[1] = torch.tensor([0, -2.0, 0], dtype=F64)  # the south pole of e3nn's y axis
    R, zero = edge_rotations(r)
    assert not zero.any()
    assert torch.allclose(R @ R.transpose(1, 2), torch.eye(3, dtype=F64).expand(40, 3, 3), atol=1e-14)
    assert torch.allclose(torch.linalg.det(R), torch.ones(40, dtype=F64))
    assert torch.allclose(
        (R @ (r / r.norm(dim=-1, keepdim=True))[..., None])[..., 0],
        torch.tensor([0, 1.0, 0], dtype=F64).expand(40, 3),
        atol=1e-14,
    )
    Ds = wigner_D(R, 4)
    for l in range(5):
        assert max((Ds[l][i] - _wigner_D_least_squares(l, R[i])).abs().max().item() for i in range(4)) < 1e-12


def test_reverse_edge_pairing_handles_duplicates_self_loops_and_one_way_edges():
    src = torch.tensor([0, 1, 0, 1, 0, 2, 3, 3])
    dst = torch.tensor(
        [1, 0, 1, 0, 1, 0, 3, 1]
    )  # 0->1 three times, 1->0 twice, 2->0 one way, a self loop, 3->1 one way
    pos = torch.randn(4, 3, dtype=F64)
    graph = Graph(torch.stack([src, dst]), 4, pos=pos)
    a, b = reverse_edge_pairs(graph, torch.ones(8, dtype=torch.bool))
    assert sorted(zip(a.tolist(), b.tolist())) == [(0, 1), (2, 3)]
    frames = EdgeFrames(graph, 2, edge_invariants(graph.rel_pos, {}))
    assert frames.num_slots == 6 and frames.num_zero == 1  # 2 pairs, 3 lone edges, the self loop
    assert sorted(frames.first.tolist()) == [0, 2, 4, 5, 6, 7] and frames.num_pairs == 2
    assert sorted(frames.slot_edges.tolist()) == list(range(8))  # one row per edge: a lone edge is not duplicated
    assert torch.equal(frames.slot_edges[frames.position], torch.arange(8))


@pytest.mark.skipif(_native_frames()[0] is None, reason="the C++ kernels did not build here")
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_native_slot_layout_equals_torch(dtype):
    """The C++ slots are torch's, tensor for tensor and in the same order: random multigraphs with duplicated edges,
    one-way edges, self loops, zero-length edges and reverse edges whose invariants differ (or are NaN)."""
    for seed in range(6):
        g = torch.Generator().manual_seed(seed)
        N, E = 12, 90
        src, dst = torch.randint(0, N, (E,), generator=g), torch.randint(0, N, (E,), generator=g)
        pos = torch.randn(N, 3, generator=g, dtype=dtype)
        pos[1] = pos[0]  # edges between nodes 0 and 1 have length 0
        graph = Graph(torch.stack([src, dst]), N, pos=pos)
        feats = torch.randint(0, 2, (E, 1), generator=g).to(dtype)  # reverse edges with other features: no pair
        feats[:3] = float('nan')
        invariants = edge_invariants(graph.rel_pos, {0: feats[:, :, None]})
        layouts = []
        for backend in ('native', 'torch'):
            with override(edge_frames=backend):
                layouts.append(_slot_layout(graph, invariants))
        for native, reference in zip(*layouts):
            assert native == reference if isinstance(reference, int) else torch.equal(native, reference), seed
        assert 0 < layouts[0][4] < E // 2 and layouts[0][5] > 0  # pairs and zero-length slots were there to find


@pytest.mark.parametrize("l_in,l_out", [(l_in, l_out) for l_in in range(5) for l_out in range(5)])
def test_fold_is_invertible_per_degree_pair(l_in, l_out):
    """The aligned TFN kernels of a degree pair span exactly the SO(2)-equivariant maps: the fold T is square and
    invertible."""
    plan = SO2Plan((l_in,), (l_out,), 1, 1)
    T = plan.T  # [SO(2) weights, frequencies] of the one channel pair
    assert T.shape == (plan.num_weights, 2 * min(l_in, l_out) + 1) and torch.linalg.matrix_rank(T) == T.shape[0]


@pytest.mark.skipif(_native_frames()[0] is None, reason="the C++ kernels did not build here")
@pytest.mark.parametrize("ins, outs", [((0, 1, 2), (0, 1, 2)), ((1,), (2,)), ((0,), (0,)), ((0, 1), (1, 2))])
@pytest.mark.parametrize("zero_length", [False, True])
def test_native_fold_equals_torch_at_every_order(ins, outs, zero_length):
    """The C++ fold (rows as sums of the nonzero terms of T) gives torch's fold and gradient, float32 and float64, and
    differentiates twice (its gradient is the same pass with the transposed table)."""
    g = torch.Generator().manual_seed(0)
    plan = SO2Plan(ins, outs, 3, 2)
    for dtype, tol in [(torch.float32, 1e-6), (F64, 1e-14)]:
        w = torch.randn(2 * 3 * plan.T.shape[0], 16, generator=g, dtype=dtype, requires_grad=True)
        gy = torch.randn(plan.num_weights, 16, generator=g, dtype=dtype)
        folds = {}
        for backend in ('native', 'torch'):
            with override(so2_fold=backend):
                y = plan.fold(w, zero_length)
                folds[backend] = (y, *torch.autograd.grad(y, w, gy))
        for a, b in zip(folds['native'], folds['torch']):
            assert torch.allclose(a, b, atol=tol, rtol=0)
    with override(so2_fold='native'):
        w = torch.randn(2 * 3 * plan.T.shape[0], 4, generator=g, dtype=F64, requires_grad=True)
        assert torch.autograd.gradgradcheck(lambda w: plan.fold(w, zero_length), (w,))


def test_fast_path_equivariance_and_gradcheck():
    from se3nb.equivariance import equivariance_error

    torch.manual_seed(0)
    fin, fout, fedge = Fiber({0: 2, 1: 2, 2: 1}), Fiber({0: 2, 1: 2, 2: 2}), Fiber({0: 1, 1: 1})
    conv = SO2Conv(fin, fout, fedge, self_interaction=True, fuse_level='none').double()
    pos = torch.randn(6, 3, dtype=F64)
    graph = radius_graph(pos, 10.0)
    ef = random_features(fedge, graph.num_edges, dtype=F64)

    def run(p, f, e):
        g = graph.with_positions(p)
        inv = edge_invariants(g.rel_pos, e)
        return conv(f, e, inv, g, EdgeFrames(g, 2, inv))

    x = random_features(fin, 6, dtype=F64)
    assert equivariance_error(run, pos, x, edge_feats=ef, num_rotations=4).max() < 1e-12
    keys = sorted(x)

    def f(p, *xs):
        out = run(p, dict(zip(keys, xs)), ef)
        return tuple(out[l] for l in sorted(out))

    assert torch.autograd.gradcheck(f, (pos.clone().requires_grad_(), *[x[l].clone().requires_grad_() for l in keys]))


def test_empty_and_single_edge_graphs():
    fin, fout = Fiber({0: 2, 1: 2}), Fiber({0: 2, 1: 1})
    ref, fast = conv_pair(fin, fout, Fiber({}), self_interaction=True)
    for src, dst in (([], []), ([0], [1])):
        pos = torch.randn(3, 3, dtype=F64)
        graph = Graph(torch.tensor([src, dst], dtype=torch.long).view(2, -1), 3, pos=pos)
        x = random_features(fin, 3, dtype=F64)
        inv = edge_invariants(graph.rel_pos, {})
        a, b = ref(x, {}, inv, graph, Bases(graph.rel_pos, 1)), fast(x, {}, inv, graph, EdgeFrames(graph, 1, inv))
        assert all(torch.allclose(a[l], b[l], atol=1e-12) for l in a)


def test_bf16_autocast_keeps_float32_sums_and_stays_close():
    torch.manual_seed(0)
    f = Fiber.create(3, 8)
    conv = SO2Conv(f, f, Fiber({0: 4}), pool=True)
    graph, node, edge = random_molecule_batch(4, atoms=10)
    x = random_features(f, graph.num_nodes)
    inv = edge_invariants(graph.rel_pos, edge)
    frames = EdgeFrames(graph, 2, inv)
    with torch.no_grad():
        ref = conv(x, edge, inv, graph, frames)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        frames_amp = EdgeFrames(graph, 2, inv)  # frames stay float32 under autocast
        out = conv(x, edge, inv, graph, frames)
    assert all(
        a.dtype == torch.float32 and torch.allclose(a, b, atol=1e-6) for a, b in zip(frames_amp.D_in, frames.D_in)
    )
    sum(v.float().square().sum() for v in out.values()).backward()
    assert all(
        p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in conv.parameters() if p.grad is not None
    )
    assert all((out[l].float() - ref[l]).abs().max() < 0.05 * ref[l].abs().max() for l in ref)


def test_full_precision_switches_autocast_off_inside_only_where_it_is_on():
    from se3nb.frame_rotation import _autocast_enabled, _full_precision

    a = torch.randn(4, 4)
    with _full_precision('cpu'):  # autocast off already: nothing to switch
        assert not _autocast_enabled('cpu') and torch.mm(a, a).dtype == torch.float32
    with torch.autocast('cpu', dtype=torch.bfloat16):
        with _full_precision('cpu'):
            assert not _autocast_enabled('cpu') and torch.mm(a, a).dtype == torch.float32
        assert _autocast_enabled('cpu') and torch.mm(a, a).dtype == torch.bfloat16


def test_wrong_geometry_gives_clear_error():
    fin, fout = Fiber({0: 2, 1: 2}), Fiber({0: 2})
    conv = SO2Conv(fin, fout)
    graph = radius_graph(torch.randn(5, 3), 3.0)
    x = random_features(fin, 5)
    inv = edge_invariants(graph.rel_pos, {})
    with pytest.raises(ValueError, match="SO2Conv needs EdgeFrames"):
        conv(x, {}, inv, graph, Bases(graph.rel_pos, 1))
    with pytest.raises(ValueError, match="max_degree >= 1"):
        conv(x, {}, inv, graph, EdgeFrames(graph, 0, inv))


def test_torch_compile_runs_the_model():
    """torch.compile traces the model (the SO(2) product is a custom autograd Function, EdgeFrames has data-dependent
    shapes); aot_eager checks the traced forward and backward without a C++ toolchain."""
    from se3nb.model import SE3TransformerPooled

    torch.manual_seed(0)
    model = SE3TransformerPooled(
        Fiber({0: 6}),
        Fiber({0: 16}),
        Fiber({0: 4}),
        num_degrees=2,
        num_channels=8,
        output_dim=1,
        num_layers=1,
        num_heads=2,
        channels_div=2,
    )
    graph, node, edge = random_molecule_batch(3, atoms=6)
    ref = model(graph, node, edge)
    compiled = torch.compile(model, backend="aot_eager", dynamic=True)
    out = compiled(graph, node, edge)
    assert torch.allclose(out, ref, atol=1e-6)
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("edit", ["fused_adamw", "data"])
def test_inference_folds_follow_weight_edits_that_keep_the_version(edit):
    """Inference folds each radial weight once and reuses the fold: an update that does not bump `weight._version`
    (fused AdamW, an edit through `.data`) must still reach the next prediction."""
    torch.manual_seed(0)
    graph, node, edge = random_molecule_batch(4)
    model = SE3Transformer(1, Fiber({0: 6}), Fiber({0: 8, 1: 8, 2: 8}), Fiber({0: 4}), 2, 2, Fiber({0: 4}), 0)
    with torch.no_grad():
        model(graph, node, edge)  # folds cached
    if edit == "data":
        for p in model.parameters():
            p.data.mul_(1.5)  # .data: no version bump
    else:
        try:
            opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
        except RuntimeError:
            pytest.skip("this torch has no fused AdamW on CPU (torch < 2.4)")
        model(graph, node, edge).square().sum().backward()
        opt.step()
    with torch.no_grad():
        cached = model(graph, node, edge)
        for m in model.modules():
            if isinstance(m, SO2Conv):
                [plan._folded.clear() for plan in m.plans.values()]
        fresh = model(graph, node, edge)
    torch.testing.assert_close(cached, fresh, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ['native', 'torch'])
def test_the_fold_cache_compares_weights_value_for_value(backend):
    "The comparison behind the fold cache: any changed bit is a change; the C++ one compares bits (NaN payloads too)."
    import se3nb.so2_product as sp
    from se3nb.backends import override
    from se3nb.so2 import _same_values

    if backend == 'native' and sp._native_so2()[0] is None:
        pytest.skip(f"no fused SO(2) kernels here: {sp._native_so2()[1]}")
    weight = torch.randn(300_000)  # several of the kernel's 64 KB chunks
    with override(so2_product=backend):
        assert _same_values(weight.clone(), weight)
        for at in (0, 123_457, 299_999):  # in the first, a middle and the last chunk
            changed = weight.clone()
            changed[at] = torch.nextafter(changed[at], torch.tensor(float('inf')))  # the smallest change
            assert not _same_values(changed, weight)
        assert not _same_values(weight[:-1].clone(), weight[:-1].clone().add_(1))
        assert not _same_values(weight.view(1000, 300), weight.view(1000, 300).neg())
        zeros = torch.zeros(4)
        assert _same_values(zeros, -zeros) == (backend == 'torch')  # equal values, other bits: a refold at most
    if backend == 'native':
        with pytest.raises(RuntimeError, match="contiguous CPU tensors"):
            sp._native_so2()[0].same_bits(weight[::2], weight[::2])
        assert not sp._native_so2()[0].same_bits(weight, weight.view(1000, 300))  # another shape


def test_inference_keeps_the_transposed_weight_blocks_of_cached_folds_only():
    """No-grad inference reuses the kernels' transposed weight blocks with the cached fold (the same tensors at the next
    call); weights passed to `so2_product` directly keep nothing."""
    import se3nb.so2_product as sp
    from se3nb.backends import override

    if sp._native_so2()[0] is None:
        pytest.skip(f"no fused SO(2) kernels here: {sp._native_so2()[1]}")
    torch.manual_seed(0)
    graph, node, edge = random_molecule_batch(4)
    model = SE3Transformer(1, Fiber({0: 6}), Fiber({0: 16, 1: 16}), Fiber({0: 4}), 2, 2, Fiber({0: 4}), 0)
    with torch.no_grad(), override(so2_product='native'):
        first = model(graph, node, edge)
        folds = [
            f
            for m in model.modules()
            if isinstance(m, SO2Conv)
            for p in m.plans.values()
            for _, f in p._folded.values()
        ]
        kept = [dict(f._se3nb_thetas) for f in folds]
        again = model(graph, node, edge)
    assert any(kept) and all(f._se3nb_thetas.keys() == k.keys() for f, k in zip(folds, kept))
    assert all(f._se3nb_thetas[key] is theta for f, k in zip(folds, kept) for key, theta in k.items())
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    w = torch.randn(32 * 16, 16)
    sp._kept_theta(w, 0, 32, 16)
    assert not hasattr(w, '_se3nb_thetas')


@pytest.mark.parametrize("index", [[2, 0, 3, 1], [1, 1, 3, 0], [3, 0]])
def test_permuted_rows_values_and_gradients(index):
    "Rows in another order: a permutation's backward is a gather; repeated or missing rows still sum their gradients."
    from se3nb.so2 import _permuted_rows, _row_order

    x = torch.randn(4, 3, dtype=F64, requires_grad=True)
    idx = torch.tensor(index)
    _, inverse = _row_order(idx, 4)
    assert (inverse is not None) == (sorted(index) == [0, 1, 2, 3])  # only a permutation takes the gather path
    y = _permuted_rows(x, idx, inverse)
    torch.testing.assert_close(y, x.detach()[idx])
    gy = torch.randn(len(index), 3, dtype=F64)
    (gx,) = torch.autograd.grad(y, x, gy)
    torch.testing.assert_close(gx, torch.zeros(4, 3, dtype=F64).index_add_(0, idx, gy))
