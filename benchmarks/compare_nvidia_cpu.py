"""se3nb against NVIDIA's SE(3)-Transformer on this project's CPU machine, measured the only honest way available here.

NVIDIA's code cannot run on this machine (it is not installable here), so its figures come from
`../shared/fixtures/nvidia/BASELINE_SIDE_BY_SIDE.md`: NVIDIA and se3nb at commit 9afe565 measured in the same minutes on
one 2-core Intel Xeon machine of this project's kind, two rounds. This script times the current se3nb and, with
`--baseline-commit 9afe565` (the default), that same old se3nb, alternating fresh processes in the same minutes. Then

    current / NVIDIA  =  (current / se3nb@9afe565, measured here)  x  (se3nb@9afe565 / NVIDIA, measured there)

which cancels the speed of the machine. It also prints the plain ratio to NVIDIA's stored figures, which only means
something on a machine as fast as theirs. Any other `--baseline-commit` (e.g. the last release) gives a plain A/B: the
speed-up over that commit, measured the same way, and no estimate.

    python benchmarks/compare_nvidia_cpu.py --config qm9 --batch fixture      # NVIDIA's QM9 model, qm9_batch64.pt
    python benchmarks/compare_nvidia_cpu.py --config qm9 --batch random64     # 64 random QM9 training molecules
    python benchmarks/compare_nvidia_cpu.py --config small --batch random64   # NVIDIA's `small` configuration
    options: --modes inference,train --rounds 2 --threads 2 --iters 10 --warmup 3 --amp --low-memory
             --fuse-level partial --optimizer torch --baseline-commit none --json out.json

Each case runs in a fresh process (3 warm-ups, median of the timed steps, peak RSS of that process); the rounds
alternate current and baseline. Backends follow se3nb's registry (`nbs/00a_backends.ipynb`): `SE3NB_BACKENDS=torch`
times the torch products everywhere (the baseline gets `SE3NB_NATIVE=0` to match). The JSON names the CPU (model,
ISA, caches), and each current case records `backend_report()` after its steps: the backends that ran, the instruction
set of the C++ kernels and the parameters they measured on this CPU.

A training step is forward, L1 loss, backward, optimizer step, then `zero_grad(set_to_none=True)`, in the order of
se3nb's trainer (no gradients are held through the forward). The current code's optimizer runs fused kernels where
torch has them (CPUs: torch >= 2.4), as se3nb's trainer does (`se3nb.recipe.adamw`); baselines take torch's default,
as se3nb at 9afe565 did, and so does NVIDIA's code, whose DGL pins torch <= 2.2.1 (no fused CPU optimizers).
`--optimizer torch` gives the current code torch's default too: the model code alone.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {  # NVIDIA's QM9 configuration and its `small` one (BASELINE_SIDE_BY_SIDE.md)
    'qm9': dict(num_layers=7, num_degrees=4, num_channels=32, num_heads=8, out_channels=128, optimizer='Adam'),
    'small': dict(num_layers=2, num_degrees=3, num_channels=16, num_heads=4, out_channels=48, optimizer='AdamW'),
}
BATCHES = {'fixture': 'qm9_batch64.pt', 'random64': 'qm9_random64.pt', 'random': None}  # random: synthetic molecules
# BASELINE_SIDE_BY_SIDE.md, molecules/s in two rounds: NVIDIA's best variant of the round, and se3nb at 9afe565
SIDE_BY_SIDE = {
    ('qm9', 'fixture', 'inference'): {'nvidia': (72.9, 106.6), 'se3nb_9afe565': (145.5, 240.5)},
    ('qm9', 'fixture', 'train'): {'nvidia': (21.5, 26.3), 'se3nb_9afe565': (64.4, 69.6)},
    ('qm9', 'random64', 'inference'): {'nvidia': (50.0, 37.3), 'se3nb_9afe565': (171.6, 122.5)},
    ('qm9', 'random64', 'train'): {'nvidia': (12.8, 12.7), 'se3nb_9afe565': (32.7, 30.2)},
    ('small', 'random64', 'train'): {'nvidia': (314, 274), 'se3nb_9afe565': (427, 432)},
    ('small', 'random64', 'inference'): {'nvidia': (845, 895), 'se3nb_9afe565': (1153, 1235)},
}
NVIDIA_PEAK_RSS_GB = {  # NVIDIA's lower peak RSS of its two variants (BASELINE_SIDE_BY_SIDE.md), qm9 configuration
    ('qm9', 'fixture', 'inference'): 0.786, ('qm9', 'fixture', 'train'): 1.502,
    ('qm9', 'random64', 'inference'): 0.856, ('qm9', 'random64', 'train'): 1.719,
}  # fmt: skip


def fixture_dir() -> Path:
    "`$SE3NB_FIXTURES`, or `shared/fixtures/nvidia` beside the working tree or one of its parents."
    here = Path.cwd()
    folders = [os.environ.get('SE3NB_FIXTURES')] + [
        str(b / 'shared/fixtures/nvidia') for b in (ROOT, *ROOT.parents, here)
    ]
    for f in folders:
        if f and (Path(f) / 'qm9_batch64.pt').exists():
            return Path(f)
    sys.exit("NVIDIA's fixtures not found: set SE3NB_FIXTURES to the folder holding qm9_batch64.pt")


def load_batch(kind: str):
    "Graph, node and edge features of a batch kind (only APIs that se3nb at 9afe565 has too)."
    import torch
    from se3nb.graph import Graph

    if BATCHES[kind] is None:
        from se3nb.benchmark import random_molecule_batch

        return random_molecule_batch(64)
    b = torch.load(fixture_dir() / BATCHES[kind], weights_only=True)
    graph = Graph(
        torch.stack([b['src'], b['dst']]), int(b['num_nodes']), rel_pos=b['rel_pos'],
        batch_num_nodes=b['batch_num_nodes'], batch_num_edges=b['batch_num_edges'],
    )  # fmt: skip
    return graph, {0: b['node_feats']['0']}, {0: b['edge_feats']['0']}


def build_model(config: str, **options):
    "NVIDIA's configuration `config` as se3nb's pooled model (arguments se3nb at 9afe565 has too, and `options`)."
    from se3nb.fiber import Fiber
    from se3nb.model import SE3TransformerPooled

    c = CONFIGS[config]
    return SE3TransformerPooled(
        Fiber({0: 6}), Fiber({0: c['out_channels']}), Fiber({0: 4}), num_degrees=c['num_degrees'],
        num_channels=c['num_channels'], output_dim=1, num_layers=c['num_layers'], num_heads=c['num_heads'],
        channels_div=2, pooling='max', norm=True, use_layer_norm=True, **options,
    )  # fmt: skip


def optimizer(name: str, params, fused: bool):
    "(torch's `name` optimizer, its kernels): fused as se3nb's trainer (`se3nb.recipe.adamw`) where torch has it."
    import torch

    params = list(params)
    if fused:
        try:
            return getattr(torch.optim, name)(params, lr=1e-4, fused=True), 'fused'
        except RuntimeError:  # torch < 2.4 on CPU: no fused kernel
            pass
    return getattr(torch.optim, name)(params, lr=1e-4), "torch's default"


def run_case(a: argparse.Namespace, mode: str) -> dict:
    "One case in this process: the model of `--config`, a batch of `--batch`, warm-ups, then the timed steps."
    import resource

    import torch

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    c = CONFIGS[a.config]
    model = build_model(a.config, low_memory=a.low_memory, fuse_level=a.fuse_level)
    graph, node, edge = load_batch(a.batch)
    target = torch.randn(graph.num_graphs)
    opt, kernels = optimizer(c['optimizer'], model.parameters(), fused=a.optimizer == 'trainer')
    model.train(mode == 'train')

    def step():
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=a.amp):
            if mode == 'inference':
                with torch.no_grad():
                    return model(graph, node, edge)
            loss = torch.nn.functional.l1_loss(model(graph, node, edge).float(), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)  # as se3nb's trainer: no gradients held through the next forward

    times = []
    for _ in range(a.warmup + a.iters):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    median = statistics.median(times[a.warmup :])
    try:  # what ran, and the kernels' ISA and measured parameters (se3nb at 9afe565 has no registry)
        from se3nb.backends import backend_report

        backends = backend_report()
    except ImportError:
        backends = None
    return {
        'backends': backends, 'optimizer': f"{c['optimizer']} ({kernels})",
        'mode': mode, 'median_s': median, 'molecules_per_s': graph.num_graphs / median,
        'peak_rss_gb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,  # KiB on Linux
        'molecules': graph.num_graphs, 'atoms': graph.num_nodes, 'edges': graph.num_edges,
        'parameters': sum(p.numel() for p in model.parameters()), 'torch': torch.__version__,
    }  # fmt: skip


def baseline_tree(commit: str) -> Path:
    "A detached worktree of `commit` (made once, kept under /tmp) whose se3nb the baseline cases import."
    sha = subprocess.run(
        ['git', 'rev-parse', commit], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.strip()
    path = Path('/tmp') / f'se3nb-baseline-{sha[:12]}'
    if not (path / 'se3nb').exists():
        subprocess.run(['git', 'worktree', 'prune'], cwd=ROOT, check=True)  # a tree /tmp lost stays registered
        subprocess.run(
            ['git', 'worktree', 'add', '--detach', str(path), sha], cwd=ROOT, check=True, capture_output=True
        )
    return path


def run_in_process(a: argparse.Namespace, mode: str, tree: Path | None) -> dict:
    "A case in a fresh process, importing se3nb from this checkout or from the baseline worktree `tree`."
    env = dict(os.environ, PYTHONPATH=str(tree or ROOT))
    if tree is not None:  # its own builds: older trees pass their path to the compiler, and torch rebuilds on a change
        env['TORCH_EXTENSIONS_DIR'] = str(tree.parent / f'{tree.name}-extensions')
    if tree is not None and env.get('SE3NB_BACKENDS', '').strip() == 'torch':
        env['SE3NB_NATIVE'] = '0'  # the same choice under the old override
    args = [f'--{k.replace("_", "-")}={v}' for k, v in vars(a).items() if k in ('config', 'batch', 'threads', 'iters')]
    args += [f'--optimizer={a.optimizer if tree is None else "torch"}']  # se3nb at 9afe565 trained with the default
    args += (
        [f'--warmup={a.warmup}', f'--fuse-level={a.fuse_level}'] + ['--amp'] * a.amp + ['--low-memory'] * a.low_memory
    )
    cmd = [sys.executable, __file__, '--case', mode, *args]
    out = subprocess.run(cmd, cwd=str(tree or ROOT), env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"case {mode} ({'baseline' if tree else 'current'}) failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def estimate(key: tuple, current: list[float], baseline: list[float], baseline_commit: str) -> dict:
    "Ratios to NVIDIA: stored, and through the baseline measured here when it is 9afe565 (see the module docstring)."
    stored = SIDE_BY_SIDE.get(key)
    out = {'current_mol_s': current, 'baseline_mol_s': baseline}
    if baseline:
        out['speedup_over_baseline_here'] = statistics.median(current) / statistics.median(baseline)
    if stored is None:
        return out
    old_over_nvidia = statistics.mean(s / n for s, n in zip(stored['se3nb_9afe565'], stored['nvidia']))
    out['stored'] = stored
    out['ratio_to_stored_nvidia'] = statistics.median(current) / max(stored['nvidia'])
    if baseline and _is_9afe565(baseline_commit):
        out['speedup_over_9afe565_here'] = out['speedup_over_baseline_here']
        out['estimated_ratio_to_nvidia'] = out['speedup_over_9afe565_here'] * old_over_nvidia
    return out


def _is_9afe565(commit: str) -> bool:  # the se3nb commit of the stored side-by-side figures
    sha = subprocess.run(['git', 'rev-parse', commit], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return sha.startswith('9afe565')


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--config', default='qm9', choices=list(CONFIGS))
    p.add_argument('--batch', default='fixture', choices=list(BATCHES))
    p.add_argument('--modes', default='inference,train')
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--iters', type=int, default=10)
    p.add_argument('--warmup', type=int, default=3)
    p.add_argument('--rounds', type=int, default=2)
    p.add_argument('--fuse-level', default='partial', choices=['none', 'partial', 'full'])
    p.add_argument('--low-memory', action='store_true')
    p.add_argument(
        '--optimizer', default='trainer', choices=['trainer', 'torch'],
        help="current cases: 'trainer' = fused kernels as se3nb's trainer where torch has them; baselines: torch's",
    )  # fmt: skip
    p.add_argument('--amp', action='store_true', help='bfloat16 autocast (norms and softmax statistics stay float32)')
    p.add_argument('--baseline-commit', default='9afe565', help="'none' to time only the current code")
    p.add_argument('--json', type=Path, default=None, help='write the results here')
    p.add_argument('--case', default=None, help=argparse.SUPPRESS)  # child process: one case, JSON on stdout
    a = p.parse_args()
    if a.case:
        print(json.dumps(run_case(a, a.case)))
        return
    from se3nb.benchmark import machine_info

    tree = None if a.baseline_commit == 'none' else baseline_tree(a.baseline_commit)
    runs = {}
    for r in range(a.rounds):
        for mode in a.modes.split(','):
            for label, where in (('current', None), ('baseline', tree)) if tree else (('current', None),):
                res = run_in_process(a, mode, where)
                runs.setdefault((mode, label), []).append(res)
                print(f"round {r + 1} {mode:<9} {label:<8} {res['molecules_per_s']:8.1f} mol/s  "
                      f"peak RSS {res['peak_rss_gb']:.2f} GB", flush=True)  # fmt: skip
    machine = machine_info()
    first = runs[next(iter(runs))][0]
    size = f"{first['molecules']} molecules, {first['atoms']} atoms, {first['edges']} edges"
    print(f"\nse3nb vs NVIDIA, config {a.config}, batch {a.batch} ({size}), "
          f"{a.threads} threads, {'bf16 autocast' if a.amp else 'float32'}, "
          f"{machine['cpu_model']} ({machine['cpu_capability']}), baseline {a.baseline_commit}")  # fmt: skip
    summary = {}
    for mode in a.modes.split(','):
        current = [x['molecules_per_s'] for x in runs[mode, 'current']]
        baseline = [x['molecules_per_s'] for x in runs.get((mode, 'baseline'), [])]
        est = estimate((a.config, a.batch, mode), current, baseline, a.baseline_commit)
        est['peak_rss_gb'] = max(x['peak_rss_gb'] for x in runs[mode, 'current'])
        est['nvidia_peak_rss_gb'] = NVIDIA_PEAK_RSS_GB.get((a.config, a.batch, mode))
        summary[mode] = est
        line = f"{mode:<9} current {' / '.join(f'{v:.1f}' for v in current)} mol/s"
        if baseline:
            line += f", {a.baseline_commit} here {' / '.join(f'{v:.1f}' for v in baseline)}"
            line += f", speed-up over {a.baseline_commit} {est['speedup_over_baseline_here']:.2f}x"
        if 'estimated_ratio_to_nvidia' in est:
            line += f" -> estimated {est['estimated_ratio_to_nvidia']:.2f}x NVIDIA's best"
        if 'ratio_to_stored_nvidia' in est:
            line += f" (stored figures: {est['ratio_to_stored_nvidia']:.2f}x)"
        line += f"; peak RSS {est['peak_rss_gb']:.2f} GB"
        if est['nvidia_peak_rss_gb']:
            line += f" (NVIDIA's leaner variant {est['nvidia_peak_rss_gb']:.2f} GB)"
        print(line)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = a.json.with_suffix('.tmp')
        args = {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()}
        runs_out = {f'{m}/{label}': v for (m, label), v in runs.items()}
        record = {
            'args': args,
            'summary': summary,
            'runs': runs_out,
            'machine': machine,
            'date': time.strftime('%F %T'),
        }
        tmp.write_text(json.dumps(record, indent=1))
        tmp.replace(a.json)  # atomic


if __name__ == '__main__':
    main()
