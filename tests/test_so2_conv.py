"""No-grad inference in blocks of destination nodes (op `so2_inference`, backend `native`: `04b_so2_conv`,
`05_attention`) and the C++ segment attention (op `segment_attention`, backend `native`: `03a_segment_attention`), each
against the differentiable torch path it replaces, with float64 as the truth where the kernel computes in float32."""

import pytest
import torch

import se3nb.segment_attention as sa
import se3nb.so2 as so2
import se3nb.so2_conv as so2_conv
from se3nb.backends import choose, override
from se3nb.fiber import Fiber
from se3nb.graph import DestinationCSR, Graph, full_graph
from se3nb.model import SE3Transformer
from se3nb.nvidia import Fiber as NvidiaFiber
from se3nb.nvidia import SE3Transformer as NvidiaSE3Transformer
from se3nb.segment_attention import segment_attention, segment_attention_reference

F64 = torch.float64
needs_conv_kernel = pytest.mark.skipif(
    so2_conv._native_conv()[0] is None, reason=f"the fused SO(2) kernel cannot run here: {so2_conv._native_conv()[1]}"
)
needs_attention_kernel = pytest.mark.skipif(
    sa._native_attention()[0] is None, reason=f"the C++ attention kernel cannot run here: {sa._native_attention()[1]}"
)


def rel_error(out, ref):
    scale = max(v.abs().max().item() for v in ref.values())
    return max((out[k].double() - ref[k].double()).abs().max().item() for k in ref) / scale


# --- segment attention in C++ ---------------------------------------------------------------------------------------


@needs_attention_kernel
@pytest.mark.parametrize('envelope', [False, True])
def test_native_attention_equals_the_composition_with_gradients(envelope):
    N, E, H, d_k, d_v = 12, 90, 3, 5, 4
    dst = torch.cat([torch.randint(0, N - 1, (E - 30,)), torch.zeros(30, dtype=torch.long)])  # node N-1: no edges
    csr = DestinationCSR(dst, N)
    kv = torch.randn(E, H, d_k + d_v, dtype=F64)
    kv[csr.dst == 0] *= torch.linspace(0, 6, 30 + int((dst[: E - 30] == 0).sum()), dtype=F64)[:, None, None]
    kv.requires_grad_()
    q = torch.randn(N, H, d_k, dtype=F64, requires_grad=True)
    u = torch.rand(E, dtype=F64, requires_grad=True) if envelope else None
    inputs = [kv, q] + ([u] if envelope else [])
    results, weights = {}, torch.randn(N, H, d_v, dtype=F64)
    for backend in ('native', 'torch'):
        with override(segment_attention=backend):
            # key and value are column slices of one tensor, as the attention layers pass them
            z = segment_attention(kv[..., :d_k], q, kv[..., d_k:], csr, scale=0.4, envelope=u)
        results[backend] = (z, torch.autograd.grad((z * weights).sum(), inputs))
    z, grads = results['native']
    torch.testing.assert_close(z, results['torch'][0], atol=1e-12, rtol=1e-10)
    assert z[N - 1].abs().max() == 0  # no incoming edges: zero
    for a, b in zip(grads, results['torch'][1]):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
    assert choose('segment_attention', device='cpu', dtype=torch.float32) == 'native'


@needs_attention_kernel
def test_native_attention_float32_and_gradcheck():
    csr = DestinationCSR(torch.tensor([0, 0, 1, 2, 2, 2, 0]), 4)
    k, q, v = torch.randn(7, 2, 3), torch.randn(4, 2, 3), torch.randn(7, 2, 5)
    with override(segment_attention='native'):
        z = segment_attention(k, q, v, csr, scale=0.5)
    torch.testing.assert_close(z, segment_attention_reference(k, q, v, csr, scale=0.5), atol=1e-6, rtol=1e-5)
    args = [t.double().requires_grad_() for t in (k, q, v, torch.rand(7))]

    def f(k, q, v, u):
        with override(segment_attention='native'):
            return segment_attention(k, q, v, csr, scale=0.5, envelope=u)

    assert torch.autograd.gradcheck(f, args)
    with override(segment_attention='native'), pytest.raises(RuntimeError, match="float32 or float64 CPU tensors"):
        segment_attention(k.bfloat16(), q.bfloat16(), v.bfloat16(), csr, scale=0.5)


# --- inference in blocks ----------------------------------------------------------------------------------------------


def random_graph(N=26, E=400, seed=0):
    "Random multigraph with two zero-length self-loops, duplicated edges and a node without incoming edges."
    g = torch.Generator().manual_seed(seed)
    pos = 3 * torch.randn(N, 3, generator=g)
    src, dst = torch.randint(0, N, (E,), generator=g), torch.randint(0, N - 1, (E,), generator=g)
    src = torch.cat([src, torch.tensor([3, 5, 7])])
    dst = torch.cat([dst, torch.tensor([3, 5, 8])])  # two self-loops, and 7 -> 8 once more
    return Graph(torch.stack([src, dst]), N, rel_pos=pos[dst] - pos[src])


def counting(monkeypatch):
    calls = []
    original = so2_conv._fused_messages
    monkeypatch.setattr(so2_conv, '_fused_messages', lambda *a: calls.append(a[5].shape[0]) or original(*a))
    import se3nb.attention as attention

    monkeypatch.setattr(attention, '_fused_messages', so2_conv._fused_messages)
    return calls


CONFIGS = {
    # RFdiffusion's SE3_param_full block
    'rfdiffusion': dict(
        num_layers=1, fiber_in=Fiber({0: 8, 1: 3}), fiber_hidden=Fiber({0: 32, 1: 32}), fiber_out=Fiber({0: 8, 1: 2}),
        num_heads=4, channels_div=4, fiber_edge=Fiber({0: 32}), use_layer_norm=True,
    ),
    # degrees 0..2 (frames from Python), degree-1 edge features, no LayerNorm, two layers, a smooth cutoff
    'degree2': dict(
        num_layers=2, fiber_in=Fiber({0: 5, 1: 2}), fiber_hidden=Fiber({0: 8, 1: 4, 2: 4}),
        fiber_out=Fiber({0: 3, 1: 2, 2: 1}), num_heads=2, channels_div=2, fiber_edge=Fiber({0: 3, 1: 2}),
        use_layer_norm=False, cutoff=6.0,
    ),
    # NVIDIA's full fuse level (one radial MLP for all degree pairs)
    'fused_full': dict(
        num_layers=1, fiber_in=Fiber({0: 4, 1: 4}), fiber_hidden=Fiber({0: 4, 1: 4}), fiber_out=Fiber({0: 4, 1: 4}),
        num_heads=2, channels_div=2, fiber_edge=Fiber({0: 2}), use_layer_norm=True, fuse_level='full',
    ),
}  # fmt: skip


@needs_conv_kernel
@pytest.mark.parametrize('config', list(CONFIGS))
@pytest.mark.parametrize('block_edges', [4096, 37])
def test_blocks_equal_the_torch_path_and_float64(monkeypatch, config, block_edges):
    monkeypatch.setattr(so2_conv, '_BLOCK_EDGES', block_edges)  # 37: many blocks, some a single crowded node
    kwargs = CONFIGS[config]
    model = SE3Transformer(**kwargs).eval()
    graph = random_graph()
    node = {l: torch.randn(graph.num_nodes, c, 2 * l + 1) for l, c in kwargs['fiber_in'].items()}
    edge = {l: torch.randn(graph.num_edges, c, 2 * l + 1) for l, c in kwargs['fiber_edge'].items()}
    calls = counting(monkeypatch)
    with torch.no_grad():
        out = model(graph, node, edge)
        with override(so2_inference='torch'):
            ref = model(graph, node, edge)
        truth = model.double()(graph.to(dtype=F64), *({l: x.double() for l, x in d.items()} for d in (node, edge)))
    layers_with_edges = kwargs['num_layers'] + 1
    n_blocks = len(so2_conv._destination_blocks(graph.csr))
    assert len(calls) == layers_with_edges * n_blocks and sum(calls) == layers_with_edges * graph.num_edges
    assert all(torch.isfinite(v).all() for v in out.values())
    assert rel_error(out, ref) < 1e-5  # float32 rounding: the two paths sum in different orders
    assert rel_error(out, truth) < max(1e-5, 3 * rel_error(ref, truth))  # no less accurate than the torch path


@needs_conv_kernel
def test_blocks_run_only_for_float32_inference(monkeypatch):
    kwargs = CONFIGS['rfdiffusion']
    model = SE3Transformer(**kwargs)
    graph = random_graph(N=12, E=60)
    node = {l: torch.randn(graph.num_nodes, c, 2 * l + 1) for l, c in kwargs['fiber_in'].items()}
    edge = {0: torch.randn(graph.num_edges, 32, 1)}
    calls = counting(monkeypatch)
    out = model(graph, node, edge)  # gradients on: the differentiable path
    sum(v.sum() for v in out.values()).backward()
    assert not calls and all(p.grad is not None for p in model.parameters())
    with torch.no_grad(), override(so2_inference='torch'):
        model(graph, node, edge)
    assert not calls
    with torch.inference_mode():
        model(graph, node, edge)
    assert len(calls) == 2
    with torch.no_grad():
        model.double()(graph.to(dtype=F64), {l: x.double() for l, x in node.items()}, {0: edge[0].double()})
    assert len(calls) == 2  # float64: the torch path (the kernel is float32)
    with override(so2_inference='native'), pytest.raises(RuntimeError, match="float32 on CPU only"):
        choose('so2_inference', device='cpu', dtype=F64)


@needs_conv_kernel
def test_rfdiffusion_topk_fixture_with_self_loops_in_blocks(rfdiffusion_dir, monkeypatch):
    "L = 40 <= top_k: zero-length self-loops; finite outputs equal to NVIDIA's through the blocked path."
    fx = torch.load(rfdiffusion_dir / 'rfd_topk_topk_L40.pt', weights_only=True)
    model = NvidiaSE3Transformer(**{k: NvidiaFiber(v) if k.startswith('fiber') else v for k, v in fx['kwargs'].items()})
    model.load_state_dict(fx['state_dict'])
    graph = Graph(torch.stack([fx['src'], fx['dst']]), int(fx['num_nodes']), rel_pos=fx['rel_pos'])
    assert (graph.rel_pos.norm(dim=-1) == 0).sum() == 40
    calls = counting(monkeypatch)
    with torch.no_grad():
        out = model.eval()(graph, fx['node_feats'], fx['edge_feats'])
    assert calls and all(torch.isfinite(v).all() for v in out.values())
    assert rel_error(out, fx['output']) < 1e-4


@needs_conv_kernel
def test_full_graph_blocks_are_whole_nodes():
    xyz = torch.randn(1, 50, 3)
    graph, _ = full_graph(xyz, torch.arange(50)[None])
    blocks = so2_conv._destination_blocks(graph.csr)
    assert blocks[0][0] == 0 and blocks[-1][1] == 50 and blocks[-1][3] == graph.num_edges
    assert all(a[1] == b[0] and a[3] == b[2] for a, b in zip(blocks[:-1], blocks[1:]))
    offsets = graph.csr.offsets.tolist()
    assert all(offsets[n0] == e0 and offsets[n1] == e1 for n0, n1, e0, e1 in blocks)


# --- when the blocks run automatically --------------------------------------------------------------------------------


def test_pairing_sample_tells_molecules_from_asymmetric_pair_features():
    "Reverse edges with equal invariants share work on the torch path: the fused pass is only automatic without them."
    torch.manual_seed(0)
    graph = full_graph(torch.cumsum(torch.randn(1, 40, 3), 1), torch.arange(40)[None])[0]
    symmetric = graph.rel_pos.norm(dim=-1, keepdim=True)  # [E, 1] distance only: every edge pairs
    assert not so2_conv._mostly_unpaired(graph, symmetric)
    assert so2_conv._mostly_unpaired(graph, torch.cat([symmetric, torch.randn(graph.num_edges, 4)], 1))
    half = symmetric.repeat(1, 2)
    half[::2, 1] = torch.randn(len(half[::2]))  # every other edge differs from its reverse: about half the edges pair
    one_way = Graph(graph.edge_index[:, graph.src < graph.dst], graph.num_nodes, pos=graph.pos)  # no reverse edges
    assert so2_conv._mostly_unpaired(one_way, one_way.rel_pos.norm(dim=-1, keepdim=True))
    empty = Graph(torch.zeros(2, 0, dtype=torch.long), 3, pos=torch.randn(3, 3))
    assert not so2_conv._mostly_unpaired(empty, torch.zeros(0, 1))  # no edges: the torch path
    so2_conv._mostly_unpaired(graph, half)  # a mixed graph decides either way, without error


@needs_conv_kernel
def test_geometry_decides_the_blocks_once_per_forward():
    torch.manual_seed(0)
    graph = full_graph(torch.cumsum(torch.randn(1, 30, 3), 1), torch.arange(30)[None])[0]
    paired = graph.rel_pos.norm(dim=-1, keepdim=True)
    unpaired = torch.cat([paired, torch.randn(graph.num_edges, 2)], 1)
    with torch.no_grad():
        assert so2_conv.SO2Conv.geometry(graph, unpaired, 1, []).deferred  # blocks: nothing per edge is built
        assert not so2_conv.SO2Conv.geometry(graph, paired, 1, []).deferred  # the torch path shares pairs
        with override(so2_inference='native'):  # asked for: blocks even where edges pair
            assert so2_conv.SO2Conv.geometry(graph, paired, 1, []).deferred
    assert not so2_conv.SO2Conv.geometry(graph, unpaired, 1, []).deferred  # gradients on: never blocks


def test_the_slot_layout_that_decides_is_the_one_the_frames_keep(monkeypatch):
    "No-grad geometry makes the slot layout once: it counts the pairs for the choice, and the frames take it over."
    torch.manual_seed(0)
    graph = full_graph(torch.cumsum(torch.randn(1, 30, 3), 1), torch.arange(30)[None])[0]
    paired = graph.rel_pos.norm(dim=-1, keepdim=True)
    real, made = so2._slot_layout, {'to decide': 0, 'in the frames': 0}

    def counted(where):
        def layout(*args):
            made[where] += 1
            return real(*args)

        return layout

    monkeypatch.setattr(so2_conv, '_slot_layout', counted('to decide'))
    monkeypatch.setattr(so2, '_slot_layout', counted('in the frames'))
    with torch.no_grad():
        frames = so2_conv.SO2Conv.geometry(graph, paired, 2, [])
    assert not frames.deferred and made == {'to decide': 1, 'in the frames': 0}
    fresh = so2.EdgeFrames(graph, 2, paired)  # made anew: the same slots and frames
    assert made['in the frames'] == 1 and (frames.num_pairs, frames.num_zero) == (fresh.num_pairs, fresh.num_zero)
    assert frames.num_pairs == graph.num_edges // 2
    for name in ('first', 'second', 'slot_edges', 'position', 'src'):
        assert torch.equal(getattr(frames, name), getattr(fresh, name)), name
    assert all(torch.equal(a, b) for a, b in zip(frames.D_in + frames.D_out, fresh.D_in + fresh.D_out))
