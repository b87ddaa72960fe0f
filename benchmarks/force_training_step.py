"""A training step on energies and forces (second derivatives) against one on energies alone, on this machine's CPU.

Training on forces needs the derivative of the backward pass (`create_graph=True`); the C++ kernels then hand their
backward to torch's operations (`differentiable_backward`, nbs/00a_backends.ipynb), which is slower. This script says
how much slower, for NVIDIA's `small` or QM9 configuration on a stored batch of 64 QM9 molecules (or `random`):

    python benchmarks/force_training_step.py --config small --batch random64 --iters 15 --json out.json

A step: forward, L1 loss on the energies (plus the mean absolute force, dE/d(edge vector), with `--case forces`),
backward, AdamW step. Each case runs in a fresh process (3 warm-ups, median of the timed steps, peak RSS of that
process). The edge vectors take gradients, so the frames are built by torch's differentiable operations in both cases.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_nvidia_cpu import BATCHES, CONFIGS, build_model, load_batch, optimizer  # noqa: E402


def run_case(a: argparse.Namespace) -> dict:
    "One case in this process: `--iters` timed steps after 3 warm-ups."
    import resource

    import torch
    from se3nb.graph import Graph

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = build_model(a.config)
    batch, node_feats, edge_feats = load_batch(a.batch)  # Graph, {0: [N, 6, 1]}, {0: [E, 4, 1]}
    opt, kernels = optimizer('AdamW', model.parameters(), fused=True)
    target, forces = torch.randn(batch.num_graphs), a.case == 'forces'

    def step():
        rel_pos = batch.rel_pos.detach().clone().requires_grad_()  # [E, 3]: the forces act on the edge vectors
        graph = Graph(
            batch.edge_index, batch.num_nodes, rel_pos=rel_pos,
            batch_num_nodes=batch.batch_num_nodes, batch_num_edges=batch.batch_num_edges,
        )  # fmt: skip
        energy = model(graph, node_feats, edge_feats).squeeze(-1)  # [B]
        loss = torch.nn.functional.l1_loss(energy, target)
        if forces:
            (grad,) = torch.autograd.grad(energy.sum(), rel_pos, create_graph=True)  # [E, 3]
            loss = loss + grad.abs().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    times = []
    for _ in range(a.iters):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    ms = statistics.median(times) * 1e3
    molecules = batch.num_graphs
    return dict(
        case=a.case, ms_per_step=ms, molecules_per_second=molecules / ms * 1e3, optimizer=kernels,
        peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
    )  # fmt: skip


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--config', choices=sorted(CONFIGS), default='small')
    p.add_argument('--batch', choices=sorted(BATCHES), default='random64')  # random: synthetic molecules
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--iters', type=int, default=15)
    p.add_argument('--case', choices=['energies', 'forces'], help=argparse.SUPPRESS)  # one case, in this process
    p.add_argument('--json', type=Path)
    a = p.parse_args(argv)
    if a.case:
        print(json.dumps(run_case(a)))
        return {}
    from se3nb.benchmark import machine_info

    results = {'machine': machine_info(), 'config': a.config, 'batch': a.batch, 'threads': a.threads, 'cases': {}}
    for case in ('energies', 'forces'):
        args = [f'--config={a.config}', f'--batch={a.batch}', f'--threads={a.threads}', f'--iters={a.iters}']
        out = subprocess.run([sys.executable, __file__, *args, f'--case={case}'], capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(f"the {case} case failed:\n{out.stderr[-3000:]}")
        r = results['cases'][case] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{case:>8}: {r['ms_per_step']:7.1f} ms per step, {r['molecules_per_second']:6.0f} mol/s, "
              f"peak RSS {r['peak_rss_gb']:.2f} GB", flush=True)  # fmt: skip
    ratio = results['cases']['forces']['ms_per_step'] / results['cases']['energies']['ms_per_step']
    results['forces_over_energies'] = ratio
    print(f"a step on energies and forces takes {ratio:.1f}x one on energies alone")
    if a.json:  # written whole or not at all
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.with_suffix('.tmp').write_text(json.dumps(results, indent=1) + '\n')
        a.json.with_suffix('.tmp').replace(a.json)
    return results


if __name__ == '__main__':
    main()
