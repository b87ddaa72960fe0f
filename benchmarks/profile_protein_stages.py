"""Stage profile of no-grad inference on RFdiffusion's blocks (issue 13 item 3): wall-clock self time per stage of one
forward pass, the median of `--repeats` forwards after a warm-up, without the torch profiler (whose per-op overhead
distorts a forward of tens of milliseconds).

Stages are the callables named in `STAGES` below; a call nested in another stage's call counts for the inner stage
only, and `other` is the rest of the forward. It runs on any se3nb commit that has `se3nb.nvidia` and graph builders,
so an older commit can be profiled by putting its checkout first on PYTHONPATH; callables a commit lacks are skipped.
Inputs are those of `compare_nvidia_protein.py` (a random compact backbone, random weights and pair features).

    python benchmarks/profile_protein_stages.py full 300 [--threads 2] [--repeats 5]   # one JSON line on stdout
"""

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_nvidia_protein import BLOCKS, backbone  # noqa: E402 (the benchmark's inputs)

STAGES = {
    'geometry': ['se3nb.model:SE3Transformer.geometry', 'se3nb.basis:Bases.get'],
    'radial_mlp': ['se3nb.conv:RadialProfile.hidden', 'se3nb.conv:RadialProfile.forward'],
    'kernel': ['se3nb.conv:TFNConv.messages', 'se3nb.so2_conv:so2_messages'],
    'fused_conv_pass': ['se3nb.so2_conv:_fused_messages'],  # gather, frames, radial MLP, SO(2) product, rotate back
    'aggregation': ['se3nb.graph:DestinationCSR.sum'],
    'attention': ['se3nb.attention:SE3Attention.forward', 'se3nb.attention:segment_attention'],
    'norm': ['se3nb.norm:NormNonlinearity.forward'],
}  # stage -> callables ('module:qualified.name')
_totals: dict[str, float] = {}
_stack: list[list] = []  # [stage, time spent in nested stage calls]


def _timed(function, stage: str):
    def timed(*args, **kwargs):
        start = time.perf_counter()
        _stack.append([stage, 0.0])
        try:
            return function(*args, **kwargs)
        finally:
            _, nested = _stack.pop()
            spent = time.perf_counter() - start
            _totals[stage] = _totals.get(stage, 0.0) + spent - nested
            if _stack:
                _stack[-1][1] += spent

    return timed


def patch_stages() -> list[str]:
    "Wrap every callable of `STAGES` that this se3nb has; returns the ones found."
    found = []
    for stage, targets in STAGES.items():
        for target in targets:
            module_name, qualname = target.split(':')
            *path, name = qualname.split('.')
            owner = importlib.import_module(module_name)
            for part in path:
                owner = getattr(owner, part)
            original = owner.__dict__.get(name) if isinstance(owner, type) else getattr(owner, name, None)
            if original is None:
                continue
            if isinstance(original, staticmethod):
                setattr(owner, name, staticmethod(_timed(original.__func__, stage)))
            else:
                setattr(owner, name, _timed(original, stage))
            found.append(target)
    attention = importlib.import_module('se3nb.attention')
    if hasattr(attention, '_fused_messages'):  # imported by name there
        attention._fused_messages = importlib.import_module('se3nb.so2_conv')._fused_messages
    return found


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('graph', choices=list(BLOCKS))
    p.add_argument('L', type=int)
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--repeats', type=int, default=5)
    a = p.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    found = patch_stages()
    from se3nb.graph import Graph, full_graph, topk_graph
    from se3nb.nvidia import SE3Transformer

    l0_in, l0_out, edge = BLOCKS[a.graph]
    torch.manual_seed(a.L)
    model = SE3Transformer(
        num_layers=1, fiber_in={0: l0_in, 1: 3}, fiber_hidden={0: 32, 1: 32}, fiber_out={0: l0_out, 1: 2},
        num_heads=4, channels_div=4, fiber_edge={0: edge}, use_layer_norm=True,
    ).eval()  # fmt: skip
    xyz, idx = backbone(a.L, seed=a.L)
    graph, (b, i, j) = (topk_graph if a.graph == 'topk' else full_graph)(xyz, idx)
    node_feats = {'0': torch.randn(a.L, l0_in, 1), '1': torch.randn(a.L, 3, 3)}
    edge_feats = {'0': torch.randn(1, a.L, a.L, edge)[b, i, j][..., None]}
    runs = []
    with torch.no_grad():
        for k in range(a.repeats + 1):  # the first is a warm-up
            fresh = Graph(graph.edge_index, graph.num_nodes, rel_pos=graph.rel_pos, validate=False)  # CSR included
            _totals.clear()
            start = time.perf_counter()
            model(fresh, node_feats, edge_feats)
            if k:
                runs.append((time.perf_counter() - start, dict(_totals)))
    wall, stages = sorted(runs, key=lambda run: run[0])[len(runs) // 2]
    stages_ms = {s: round(1000 * t, 1) for s, t in sorted(stages.items(), key=lambda kv: -kv[1])}
    stages_ms['other'] = round(1000 * wall - sum(stages_ms.values()), 1)
    print(json.dumps(dict(
        graph=a.graph, L=a.L, edges=graph.num_edges, threads=a.threads, wall_ms=round(1000 * wall, 1),
        stages_ms=stages_ms, timed=found, torch=torch.__version__,
    )))  # fmt: skip


if __name__ == '__main__':
    main()
