"""se3nb.attention: attention weights form a distribution over each node's incoming edges; heads split channels."""

import pytest
import torch

from se3nb.attention import SE3Attention
from se3nb.conv import random_features
from se3nb.fiber import Fiber
from se3nb.graph import Graph

F64 = torch.float64


def test_attention_averages_values_with_weights_that_sum_to_one():
    torch.manual_seed(0)
    edge_index = torch.tensor([[1, 2, 3, 0, 0], [0, 0, 0, 1, 2]])  # node 3 receives nothing
    graph = Graph(edge_index, 4, pos=torch.randn(4, 3, dtype=F64))
    fv, fk = Fiber({0: 4, 1: 2}), Fiber({0: 4, 1: 2})
    attention = SE3Attention(2, fk, fv)
    keys = random_features(fk, graph.num_edges, dtype=F64)
    query = random_features(fk, graph.num_nodes, dtype=F64)
    same = random_features(fv, graph.num_nodes, dtype=F64)  # every incoming edge of a node carries its node's value
    values = {l: x[graph.dst] for l, x in same.items()}
    out = attention(values, keys, query, graph)
    for l in fv.degrees:  # a convex combination of equal values is that value
        torch.testing.assert_close(out[l][:3], same[l][:3], atol=1e-12, rtol=0)
        assert (out[l][3] == 0).all()  # no incoming edges: nothing
    scaled = attention({l: 2 * x for l, x in values.items()}, keys, query, graph)
    torch.testing.assert_close(scaled[0], 2 * out[0], atol=1e-12, rtol=0)  # linear in the values


def test_heads_must_divide_the_channels():
    with pytest.raises(ValueError, match=r"key channels \{0: 3\} must be divisible by num_heads=2 \(not degrees \[0\]"):
        SE3Attention(2, Fiber({0: 3}), Fiber({0: 2}))


def test_keys_and_values_written_into_heads_equal_the_per_degree_messages():
    """An AttentionBlock whose SO2Conv writes keys and values straight into the head layout (`_attend_in_heads`, the C++
    rotation) gives the outputs and gradients of the per-degree messages and `_to_heads`; with torch's rotations (one
    pass more for the heads) and with frames that take gradients the block keeps the per-degree path."""
    from se3nb.attention import AttentionBlock, _writes_heads
    from se3nb.backends import override
    from se3nb.benchmark import random_molecule_batch
    from se3nb.conv import edge_invariants
    from se3nb.so2 import EdgeFrames
    from se3nb.so2_product import _native_so2

    if _native_so2()[0] is None:
        pytest.skip(f"no C++ rotation kernel here: {_native_so2()[1]}")
    torch.manual_seed(0)
    graph, _, edge = random_molecule_batch(5)
    block = AttentionBlock(Fiber({0: 16, 1: 16, 2: 16}), Fiber({0: 32, 1: 32, 2: 32}), Fiber({0: 4}), num_heads=4)
    feats = random_features(Fiber({0: 16, 1: 16, 2: 16}), graph.num_nodes)
    invariants = edge_invariants(graph.rel_pos, edge)
    with override(frame_rotation='native'):
        assert _writes_heads(block, invariants, graph)
    with override(frame_rotation='torch'):
        assert not _writes_heads(block, invariants, graph)
    results = {}
    for heads in (True, False):
        block.blocks_possible = heads  # False: the per-degree path (`_to_heads`)
        x = {l: f.clone().requires_grad_() for l, f in feats.items()}
        with override(frame_rotation='native'):
            out = block(x, edge, invariants, graph, EdgeFrames(graph, 2, invariants))
        loss = sum((o * torch.linspace(-1, 1, o.numel()).view_as(o)).sum() for o in out.values())
        grads = torch.autograd.grad(loss, [*x.values(), *block.parameters()], allow_unused=True)
        results[heads] = [*out.values(), *(g for g in grads if g is not None)]
    for a, b in zip(results[True], results[False], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    moving = Graph(graph.edge_index, graph.num_nodes, rel_pos=graph.rel_pos.clone().requires_grad_())
    assert not _writes_heads(block.train(), invariants, moving)  # forces: the frames take gradients
