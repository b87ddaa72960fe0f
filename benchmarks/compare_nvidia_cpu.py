"""se3nb vs NVIDIA's SE(3)-Transformer on this project's CPU machine (NVIDIA figures: ../shared/fixtures/nvidia/BASELINE.md).

Runs NVIDIA's QM9 training configuration (7 layers, degrees 0-3, 32 channels, 8 heads, channels_div 2, fiber_in {0: 6},
fiber_edge {0: 4}, fiber_out {0: 128}, max pooling, norm and layer norm on) on the 64 real QM9 molecules of
`qm9_batch64.pt`, like BASELINE.md: float32, bases computed inside the forward pass, 3 warm-ups, median of N timed iterations,
each case in a fresh process, peak RSS of that process. Prints each figure beside NVIDIA's and the ratio.

    python benchmarks/compare_nvidia_cpu.py [--threads 2] [--iters 10] [--json out.json] [--fuse-level partial] [--low-memory]
                                            [--amp]

Backends follow se3nb's registry (`nbs/00a_backends.ipynb`): e.g. `SE3NB_BACKENDS=conv=reference` times the reference
convolution, `SE3NB_BACKENDS=so2_product=torch` torch's products instead of the C++ kernels.
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

# NVIDIA's best CPU figures (BASELINE.md, 2 threads, batch of 64): {mode: (variant, seconds per batch, molecules/s, peak RSS GB)}
NVIDIA = {'inference': ("low_memory=True", 0.48, 134, 0.78), 'train': ("tensor_cores=False", 2.09, 31, 2.79)}


def run_case(
    mode: str,
    fixture: Path,
    threads: int,
    iters: int,
    fuse_level: str,
    low_memory: bool,
    device: str,
    amp: bool = False,
    batch_kind: str = 'fixture',
) -> dict:
    import torch
    from se3nb.backends import choose
    from se3nb.compat import nvidia_graph
    from se3nb.fiber import Fiber
    from se3nb.model import SE3TransformerPooled

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    batch = torch.load(fixture, weights_only=True)
    model = SE3TransformerPooled(
        Fiber({0: 6}),
        Fiber({0: 128}),
        Fiber({0: 4}),
        num_degrees=4,
        num_channels=32,
        output_dim=1,
        num_layers=7,
        num_heads=8,
        channels_div=2,
        pooling='max',
        norm=True,
        use_layer_norm=True,
        low_memory=low_memory,
        fuse_level=fuse_level,
    ).to(device)
    if batch_kind == 'fixture':
        graph = nvidia_graph(batch['src'], batch['dst'], batch['num_nodes'], batch['rel_pos'], batch['batch_num_nodes'])
        node, edge = {0: batch['node_feats']['0']}, {0: batch['edge_feats']['0']}
    elif batch_kind == 'random':  # synthetic molecules of QM9's average size (se3nb.benchmark.random_molecule_batch)
        from se3nb.benchmark import random_molecule_batch

        graph, node, edge = random_molecule_batch(64)
    else:  # 64 real QM9 molecules drawn at random from NVIDIA's training split
        from se3nb.data import DataConfig, QM9DataModule

        dm = QM9DataModule(DataConfig(batch_size=64, progress=False))
        b = next(iter(dm.dataloader('train', shuffle=True)))
        graph, node, edge = b.graph, b.node_feats, b.edge_feats
    graph, node, edge = graph.to(device), {0: node[0].to(device)}, {0: edge[0].to(device)}
    batch = {'batch_num_nodes': graph.batch_num_nodes, 'num_nodes': graph.num_nodes, 'src': graph.src}
    target = torch.randn(graph.num_graphs, device=device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    sync = torch.cuda.synchronize if device == 'cuda' else (lambda: None)

    def autocast():
        return torch.autocast(device, dtype=torch.bfloat16 if device == 'cpu' else torch.float16, enabled=amp)

    def step():
        if mode == 'inference':
            with torch.no_grad(), autocast():
                model(graph, node, edge)
        else:
            opt.zero_grad(set_to_none=True)
            with autocast():
                out = model(graph, node, edge)
            torch.nn.functional.l1_loss(out.float(), target).backward()  # (fp16 on CUDA would add a GradScaler)
            opt.step()

    model.train(mode == 'train')
    times = []
    for i in range(3 + iters):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    times = times[3:]
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # ru_maxrss is in KiB on Linux
    peak_gpu = torch.cuda.max_memory_allocated() / 1e9 if device == 'cuda' else None
    n = len(batch['batch_num_nodes'])
    return {
        'mode': mode,
        'median_s': statistics.median(times),
        'min_s': min(times),
        'molecules_per_s': n / statistics.median(times),
        'peak_rss_gb': rss_gb,
        'peak_gpu_gb': peak_gpu,
        'batch': n,
        'nodes': int(batch['num_nodes']),
        'edges': int(len(batch['src'])),
        'threads': threads,
        'iters': iters,
        'fuse_level': fuse_level,
        'low_memory': low_memory,
        'conv': model.conv_backend,
        'so2_product': choose('so2_product', device=device, dtype=torch.float32),  # float32 products (not under --amp)
        'amp': amp,
        'batch_kind': batch_kind,
        'device': device,
        'torch': torch.__version__,
        'parameters': sum(p.numel() for p in model.parameters()),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--fixture', type=Path, default=None, help='qm9_batch64.pt (default: found beside the repository)')
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--iters', type=int, default=10)
    p.add_argument('--fuse-level', default='partial', choices=['none', 'partial', 'full'])
    p.add_argument('--low-memory', action='store_true')
    p.add_argument(
        '--batch',
        default='fixture',
        choices=['fixture', 'random', 'qm9'],
        help='fixture: qm9_batch64.pt (small molecules); random: 64 synthetic average-size QM9 molecules; '
        'qm9: 64 random molecules of the QM9 training split',
    )
    p.add_argument(
        '--amp', action='store_true', help='autocast: bfloat16 on CPU, float16 on CUDA (norms and softmax stay float32)'
    )
    p.add_argument('--device', default='cpu')
    p.add_argument('--modes', default='inference,train')
    p.add_argument('--json', type=Path, default=None, help='write the results here')
    p.add_argument('--_case', default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.fixture is None:
        from se3nb.compat import find_nvidia_fixtures

        d = find_nvidia_fixtures()
        if d is None:
            sys.exit("qm9_batch64.pt not found: pass --fixture or set SE3NB_FIXTURES")
        a.fixture = d / 'qm9_batch64.pt'
    if a._case:  # child process: one case, JSON on stdout
        print(
            json.dumps(
                run_case(a._case, a.fixture, a.threads, a.iters, a.fuse_level, a.low_memory, a.device, a.amp, a.batch)
            )
        )
        return
    results = []
    for mode in a.modes.split(','):
        cmd = (
            [
                sys.executable,
                __file__,
                '--_case',
                mode,
                '--fixture',
                str(a.fixture),
                '--threads',
                str(a.threads),
                '--iters',
                str(a.iters),
                '--fuse-level',
                a.fuse_level,
                '--device',
                a.device,
            ]
            + (['--amp'] if a.amp else [])
            + ['--batch', a.batch]
            + (['--low-memory'] if a.low_memory else [])
        )
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        results.append(json.loads(out))
    print(
        f"se3nb vs NVIDIA, QM9 config, batch '{a.batch}': {results[0]['batch']} molecules ({results[0]['nodes']} atoms, {results[0]['edges']} edges), "
        f"{a.threads} threads, {'bf16 autocast' if a.amp else 'float32'}, device {a.device} ({platform.processor() or platform.machine()}), torch {results[0]['torch']}, "
        f"fuse_level={a.fuse_level}, low_memory={a.low_memory}, {results[0]['parameters']:,} parameters; median of {a.iters}; "
        f"backends conv={results[0]['conv']}, so2_product={results[0]['so2_product']} (float32)"
    )
    print(
        f"{'mode':<10} {'se3nb s/batch':>13} {'NVIDIA':>7} {'speed-up':>8} {'se3nb mol/s':>11} {'NVIDIA':>7} "
        f"{'se3nb RSS GB':>12} {'NVIDIA':>7} {'ratio':>6}  NVIDIA variant"
    )
    for r in results:
        variant, t, mps, rss = NVIDIA[r['mode']]
        print(
            f"{r['mode']:<10} {r['median_s']:>13.3f} {t:>7.2f} {t / r['median_s']:>7.2f}x {r['molecules_per_s']:>11.1f} {mps:>7} "
            f"{r['peak_rss_gb']:>12.2f} {rss:>7.2f} {r['peak_rss_gb'] / rss:>6.2f}  {variant}"
        )
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = a.json.with_suffix('.tmp')
        tmp.write_text(
            json.dumps(
                {
                    'results': results,
                    'nvidia_baseline': NVIDIA,
                    'date': time.strftime('%Y-%m-%d %H:%M:%S'),
                    'machine': platform.node(),
                    'cpu_count': os.cpu_count(),
                },
                indent=1,
            )
        )
        tmp.replace(a.json)


if __name__ == '__main__':
    main()
