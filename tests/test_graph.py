"""se3nb.graph: the graph's checks, segment operations and the destination CSR."""

import pytest
import torch

from model_helpers import random_multigraph
from se3nb.graph import Graph, batch_graphs, fully_connected, radius_graph, unbatch


def test_destination_csr_matches_scatter_segment_operations():
    from se3nb.graph import DestinationCSR, segment_max, segment_sum

    graph = random_multigraph()
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


def test_graph_arguments_are_checked_with_clear_errors():
    pos = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"edge_index must be a \[2, E\] tensor, got torch.Size\(\[3, 2\]\)"):
        Graph(torch.zeros(3, 2, dtype=torch.long), 4, pos=pos)
    with pytest.raises(TypeError, match="must hold integers"):
        Graph(torch.zeros(2, 2), 4, pos=pos)
    with pytest.raises(ValueError, match="needs pos"):
        Graph(torch.zeros(2, 2, dtype=torch.long), 4)
    with pytest.raises(ValueError, match=r"pos must have shape \[4, 3\], got \[3, 3\]"):
        Graph(torch.zeros(2, 2, dtype=torch.long), 4, pos=pos[:3])
    with pytest.raises(TypeError, match="floating point"):
        Graph(torch.zeros(2, 2, dtype=torch.long), 4, pos=pos.long())
    with pytest.raises(ValueError, match="one entry per graph"):
        Graph(torch.zeros(2, 2, dtype=torch.long), 4, pos=pos, batch_num_nodes=torch.tensor([2, 2]))
    with pytest.raises(ValueError, match="batch_num_nodes sums to 3"):
        Graph(torch.zeros(2, 2, dtype=torch.long), 4, pos=pos, batch_num_nodes=torch.tensor([3]))
    crossing = torch.tensor([[0, 3], [1, 0]])  # edge 1 joins graph 1's node 3 to graph 0's node 0
    with pytest.raises(ValueError, match="edge 1 joins nodes of graphs 1 and 0"):
        Graph(crossing, 4, pos=pos, batch_num_nodes=torch.tensor([2, 2]), batch_num_edges=torch.tensor([1, 1]))


def test_rel_pos_views_moves_and_new_positions():
    g = torch.Generator().manual_seed(0)
    pos = torch.randn(5, 3, generator=g, dtype=torch.float64)
    graph = fully_connected(pos)
    assert graph.num_edges == 20 and torch.equal(graph.rel_pos, pos[graph.dst] - pos[graph.src])
    moved = graph.with_positions(pos + 1.0)
    torch.testing.assert_close(moved.rel_pos, graph.rel_pos, atol=1e-12, rtol=0)  # translation leaves rel_pos
    assert torch.equal(moved.edge_index, graph.edge_index) and moved.pos is not graph.pos
    cast = graph.to('cpu', torch.float32)
    assert cast.pos.dtype == cast.rel_pos.dtype == torch.float32 and cast.edge_index.dtype == torch.long
    assert repr(graph) == "Graph(num_graphs=1, num_nodes=5, num_edges=20, device=cpu)"


def test_radius_graph_is_the_brute_force_neighbour_set_and_batches_round_trip():
    g = torch.Generator().manual_seed(1)
    sizes = [6, 1, 9]
    pos = torch.randn(sum(sizes), 3, generator=g, dtype=torch.float64) * 1.5
    graph = radius_graph(pos, 1.7, torch.tensor(sizes))
    found = set(map(tuple, graph.edge_index.T.tolist()))
    expected, start = set(), 0
    for n in sizes:
        for i in range(start, start + n):
            for j in range(start, start + n):
                if i != j and (pos[i] - pos[j]).norm() < 1.7:
                    expected.add((j, i))
        start += n
    assert found == expected and graph.batch_num_edges.sum() == len(expected)
    parts = unbatch(graph)
    assert [p.num_nodes for p in parts] == sizes
    again = batch_graphs(parts)
    assert torch.equal(again.edge_index, graph.edge_index) and torch.equal(again.batch_num_edges, graph.batch_num_edges)
    with pytest.raises(ValueError, match="cutoff must be > 0"):
        radius_graph(pos, 0.0)
