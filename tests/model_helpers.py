"""Shared helpers of the model-level tests: a small SE3Transformer with every degree up to 3, and random inputs."""

import torch

from se3nb.backends import override
from se3nb.conv import random_features
from se3nb.fiber import Fiber
from se3nb.graph import Graph, radius_graph
from se3nb.model import SE3Transformer

F64 = torch.float64


SMALL_MODEL = dict(
    num_layers=3,
    fiber_in=Fiber({0: 3, 1: 2, 2: 1, 3: 1}),
    fiber_hidden=Fiber({0: 8, 1: 4, 2: 12, 3: 4}),
    fiber_out=Fiber({0: 2, 1: 2, 2: 1, 3: 1}),
    num_heads=2,
    channels_div=2,
    fiber_edge=Fiber({0: 2, 1: 1}),
)  # every degree up to 3, uneven channels, degree-1 edge features: every branch of the model runs


def small_model(dtype=F64, conv=None, **kw):
    torch.manual_seed(0)
    with override(conv=conv):  # None: the registry's choice (`00a_backends`)
        return SE3Transformer(**{**SMALL_MODEL, **kw}).to(dtype)


def random_inputs(model, n=14, cutoff=2.5, dtype=F64, seed=1):
    g = torch.Generator().manual_seed(seed)
    pos = (torch.randn(n, 3, generator=g, dtype=F64) * 1.3).to(dtype)
    graph = radius_graph(pos, cutoff)
    return (
        pos,
        graph,
        random_features(model.fiber_in, n, dtype=dtype, generator=g),
        random_features(model.fiber_edge, graph.num_edges, dtype=dtype, generator=g),
    )


def random_multigraph(num_nodes=9, num_edges=40, seed=0):
    "Random directed edges with duplicates, self loops and nodes without incoming edges (node 0 never receives)."
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(0, num_nodes, (num_edges,), generator=g)
    dst = torch.randint(1, num_nodes, (num_edges,), generator=g)
    return Graph(torch.stack([src, dst]), num_nodes, pos=torch.randn(num_nodes, 3, dtype=torch.float64, generator=g))
