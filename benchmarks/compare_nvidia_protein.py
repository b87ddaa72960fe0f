"""se3nb vs NVIDIA's SE(3)-Transformer on RFdiffusion's blocks (issue 13): fp32, no-grad, B = 1 inference on this CPU.

The blocks of RFdiffusion's `config/inference/base.yaml`, built through `se3nb.nvidia` as RFdiffusion's `SE3_network.py`
builds them: `SE3_param_full` (8 degree-0 in/out channels, 32 edge features) on full graphs of L = 150, 300, 600
residues and `SE3_param_topk` (64 channels, 64 edge features) on top-k graphs (top_k 64, kmin 32) of L = 100, 200, 300,
plus the two L = 40 RFdiffusion fixtures. Graphs come from `se3nb.graph.full_graph` / `topk_graph` on a random compact
backbone; weights, features and pair features are random (seeded), as in NVIDIA_TIMES.md. Each case runs in a fresh
process: one warm-up, then the median of `--repeats` timed forwards (graph built before timing), and that process's
peak RSS.

NVIDIA's figures are stored, not measured (its code needs DGL and torch 2.2): the fixtures' `nvidia_infer_s` and
`nvidia_peak_rss_mb` for L = 40, and ../shared/fixtures/rfdiffusion/NVIDIA_TIMES.md for the rest. That table also holds
se3nb at commit 9afe565 measured beside NVIDIA; `--baseline-commit 9afe565` times that commit again here (from a
temporary git worktree, on the very same inputs) and prints the machine factor (now / then) and NVIDIA's figures scaled
by it.

    python benchmarks/compare_nvidia_protein.py [--cases full150,topk200] [--repeats 5] [--threads 2]
        [--baseline-commit 9afe565] [--out benchmarks/results/compare_nvidia_protein]

Backends follow se3nb's registry (`nbs/00a_backends.ipynb`, override with SE3NB_BACKENDS); the JSON records them, with
the CPU model, thread count and torch version.
"""

import argparse
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = {  # RFdiffusion's SE3_param_full and SE3_param_topk: (l0 in, l0 out, edge features)
    'full': (8, 8, 32),
    'topk': (64, 64, 64),
}
CASES = {  # name: (graph, L); 'fixture' cases run the L = 40 RFdiffusion fixture of that block
    'full150': ('full', 150),
    'full300': ('full', 300),
    'full600': ('full', 600),
    'topk100': ('topk', 100),
    'topk200': ('topk', 200),
    'topk300': ('topk', 300),
    'fixture_full40': ('full', 40),
    'fixture_topk40': ('topk', 40),
}


def fixtures_dir() -> Path | None:
    "../shared/fixtures/rfdiffusion above this checkout (or beside $SE3NB_FIXTURES)."
    env = os.environ.get('SE3NB_FIXTURES')
    places = [Path(env).parent / 'rfdiffusion'] if env else []
    places += [p / 'shared' / 'fixtures' / 'rfdiffusion' for p in ROOT.parents]
    return next((p for p in places if (p / 'MANIFEST.md').exists()), None)


def nvidia_table(path: Path) -> dict[tuple[str, int], dict]:
    "NVIDIA_TIMES.md rows: {(graph, L): {'edges', 'nvidia_ms', 'se3nb_9afe565_ms', 'nvidia_rss_mb'}}."
    rows, graph = {}, None
    for line in path.read_text().splitlines():
        if line.startswith('Full graphs'):
            graph = 'full'
        elif line.startswith('Top-k graphs'):
            graph = 'topk'
        m = re.match(r'\|\s*(\d+)\s*\|\s*([\d,]+)\s*\|\s*([\d,]+)\s*\|\s*([\d,]+)\s*\|[^|]*\|\s*([\d,]+)\s*MB', line)
        if graph and m:
            L, edges, nv, se, rss = (int(g.replace(',', '')) for g in m.groups())
            rows[graph, L] = dict(edges=edges, nvidia_ms=nv, se3nb_9afe565_ms=se, nvidia_rss_mb=rss)
    return rows


def backbone(L: int, seed: int):
    "A random compact CA trace [1, L, 3] (3.8 Å steps, pulled towards its centre) and residue indices [1, L]."
    import torch

    g = torch.Generator().manual_seed(seed)
    xyz = torch.zeros(L, 3)
    for i in range(1, L):
        step = torch.randn(3, generator=g) - xyz[i - 1] / 15.0
        xyz[i] = xyz[i - 1] + 3.8 * step / step.norm()
    return xyz[None], torch.arange(L)[None]


def make_inputs(case: str, path: Path) -> None:
    "The inputs of one case, saved for the timing process: NVIDIA kwargs and state_dict, graph tensors, features."
    import torch

    from se3nb.graph import full_graph, topk_graph
    from se3nb.nvidia import SE3Transformer

    graph_kind, L = CASES[case]
    l0_in, l0_out, edge = BLOCKS[graph_kind]
    kwargs = dict(
        num_layers=1,
        fiber_in={0: l0_in, 1: 3},
        fiber_hidden={0: 32, 1: 32},
        fiber_out={0: l0_out, 1: 2},
        num_heads=4,
        channels_div=4,
        fiber_edge={0: edge},
        use_layer_norm=True,
    )
    if case.startswith('fixture'):
        fx = torch.load(fixtures_dir() / f'rfd_{graph_kind}_{graph_kind}_L40.pt', weights_only=True)
        src, dst, rel_pos = fx['src'], fx['dst'], fx['rel_pos']
        node_feats, edge_feats, state_dict = fx['node_feats'], fx['edge_feats'], fx['state_dict']
    else:
        torch.manual_seed(L)
        xyz, idx = backbone(L, seed=L)
        graph, (b, i, j) = topk_graph(xyz, idx) if graph_kind == 'topk' else full_graph(xyz, idx)
        src, dst, rel_pos = graph.src, graph.dst, graph.rel_pos
        pair = torch.randn(1, L, L, edge)
        edge_feats = {'0': pair[b, i, j][..., None]}  # [E, C_edge, 1]
        node_feats = {'0': torch.randn(L, l0_in, 1), '1': torch.randn(L, 3, 3)}  # l1: backbone atoms minus CA
        model = SE3Transformer(**kwargs)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(
                    torch.randn_like(p) / max(1, p.shape[-1]) ** 0.5 if p.dim() > 1 else 1 + 0.1 * torch.randn_like(p)
                )
        state_dict = model.state_dict()
    torch.save(
        dict(
            kwargs=kwargs,
            state_dict=state_dict,
            src=src,
            dst=dst,
            num_nodes=L,
            rel_pos=rel_pos,
            node_feats=node_feats,
            edge_feats=edge_feats,
        ),
        path,
    )


def time_case(path: Path, threads: int, repeats: int, warmup: int, baseline: bool) -> dict:
    "Child process: build the block, time no-grad forwards, report the median and this process's peak RSS."
    import torch

    torch.set_num_threads(threads)
    x = torch.load(path, weights_only=True)
    if baseline:  # se3nb before se3nb.nvidia (commit 9afe565): the models of se3nb.compat take NVIDIA's inputs
        from se3nb.compat import from_nvidia, nvidia_graph

        model, backends = from_nvidia('SE3Transformer', x['kwargs'], x['state_dict']), 'commit default'
    else:
        from se3nb.backends import backend_report
        from se3nb.nvidia import SE3Transformer, nvidia_graph

        model = SE3Transformer(**x['kwargs'])
        model.load_state_dict(x['state_dict'])
    graph = nvidia_graph(x['src'], x['dst'], x['num_nodes'], x['rel_pos'])
    model.eval()
    times = []
    with torch.no_grad():
        for k in range(warmup + repeats):
            t0 = time.perf_counter()
            out = model(graph, x['node_feats'], x['edge_feats'])
            if k >= warmup:
                times.append(time.perf_counter() - t0)
    if not baseline:
        backends = backend_report()
    assert all(torch.isfinite(v).all() for v in out.values())
    return dict(
        ms=1000 * statistics.median(times),
        times_ms=[1000 * t for t in times],
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        edges=int(graph.num_edges),
        backends=backends,
    )


def run_child(case_file: Path, a, baseline_root: Path | None = None) -> dict:
    env = dict(os.environ)
    if baseline_root is not None:
        env['PYTHONPATH'] = str(baseline_root)  # before the editable install of this checkout
        env['TORCH_EXTENSIONS_DIR'] = str(baseline_root / '.torch_ext')  # that commit's kernels, built apart
    cmd = [
        sys.executable,
        __file__,
        '--_case',
        str(case_file),
        '--threads',
        str(a.threads),
        '--repeats',
        str(a.repeats),
    ]
    cmd += ['--warmup', str(a.warmup)] + (['--_baseline'] if baseline_root is not None else [])
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=baseline_root or ROOT)
    if r.returncode:
        raise RuntimeError(f"case {case_file.name} failed:\n{r.stdout}\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def cpu_model() -> str:
    for line in Path('/proc/cpuinfo').read_text().splitlines():
        if line.startswith('model name'):
            return line.split(':', 1)[1].strip()
    return platform.processor()


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--cases', default=','.join(CASES), help=f"comma-separated, of: {', '.join(CASES)}")
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--repeats', type=int, default=5)
    p.add_argument('--warmup', type=int, default=1)
    p.add_argument(
        '--baseline-commit', default=None, help="also time this se3nb commit (9afe565 is in NVIDIA_TIMES.md)"
    )
    p.add_argument('--out', type=Path, default=ROOT / 'benchmarks' / 'results' / 'compare_nvidia_protein')
    p.add_argument('--_case', type=Path, help=argparse.SUPPRESS)
    p.add_argument('--_baseline', action='store_true', help=argparse.SUPPRESS)
    a = p.parse_args()
    if a._case:  # child process: one case, JSON on stdout
        print(json.dumps(time_case(a._case, a.threads, a.repeats, a.warmup, a._baseline)))
        return
    fx_dir = fixtures_dir()
    if fx_dir is None:
        sys.exit("../shared/fixtures/rfdiffusion not found: keep ../shared beside the repository or set SE3NB_FIXTURES")
    table = nvidia_table(fx_dir / 'NVIDIA_TIMES.md')
    cases = [c for c in a.cases.split(',') if c]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        sys.exit(f"unknown cases {unknown}; the cases are {', '.join(CASES)}")
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        baseline_root = None
        if a.baseline_commit:
            baseline_root = tmp / 'baseline'
            git = ['git', '-C', str(ROOT), 'worktree']
            subprocess.run(
                git + ['add', '--detach', str(baseline_root), a.baseline_commit], check=True, capture_output=True
            )
        try:
            rows = []
            for case in cases:
                graph_kind, L = CASES[case]
                make_inputs(case, tmp / f'{case}.pt')
                row = dict(case=case, graph=graph_kind, L=L, **run_child(tmp / f'{case}.pt', a))
                if case.startswith('fixture'):
                    fx = torch.load(fx_dir / f'rfd_{graph_kind}_{graph_kind}_L40.pt', weights_only=True)
                    row.update(nvidia_ms=1000 * fx['nvidia_infer_s'], nvidia_rss_mb=fx['nvidia_peak_rss_mb'])
                else:
                    ref = table[graph_kind, L]  # full graphs: the same edges; top-k: another backbone, similar count
                    assert graph_kind == 'topk' or ref['edges'] == row['edges'], (case, ref['edges'], row['edges'])
                    row.update(
                        nvidia_ms=ref['nvidia_ms'], nvidia_rss_mb=ref['nvidia_rss_mb'], nvidia_edges=ref['edges']
                    )
                    row['se3nb_9afe565_table_ms'] = ref['se3nb_9afe565_ms']
                if baseline_root is not None:
                    row['baseline_ms'] = run_child(tmp / f'{case}.pt', a, baseline_root)['ms']
                row['ratio'] = row['nvidia_ms'] / row['ms']  # > 1: se3nb faster
                rows.append(row)
                print(f"{case}: {row['ms']:.0f} ms, peak {row['peak_rss_mb']:.0f} MB", file=sys.stderr, flush=True)
        finally:
            if baseline_root is not None:
                subprocess.run(
                    ['git', '-C', str(ROOT), 'worktree', 'remove', '--force', str(baseline_root)], check=False
                )
    factors = [
        r['baseline_ms'] / r['se3nb_9afe565_table_ms']
        for r in rows
        if 'baseline_ms' in r and 'se3nb_9afe565_table_ms' in r
    ]
    factor = statistics.median(factors) if factors else None
    print(f"\n{cpu_model()}, {a.threads} threads, torch {torch.__version__}; NVIDIA: stored figures")
    head = f"{'case':<15}{'L':>5}{'edges':>9}{'NVIDIA ms':>11}{'se3nb ms':>10}{'ratio':>7}"
    head += f"{'NVIDIA MB':>11}{'se3nb MB':>10}"
    if factor:
        head += f"{'9afe565 ms':>12}{'NVIDIA ms x f':>15}{'ratio x f':>11}"
    print(head)
    for r in rows:
        line = (
            f"{r['case']:<15}{r['L']:>5}{r['edges']:>9,}{r['nvidia_ms']:>11.0f}{r['ms']:>10.0f}{r['ratio']:>6.2f}x"
            f"{r['nvidia_rss_mb']:>11.0f}{r['peak_rss_mb']:>10.0f}"
        )
        if factor:
            scaled = r['nvidia_ms'] * factor
            line += f"{r.get('baseline_ms', float('nan')):>12.0f}{scaled:>15.0f}{scaled / r['ms']:>10.2f}x"
        print(line)
    if factor:
        print(
            f"machine factor f = median over cases of (9afe565 now / 9afe565 in NVIDIA_TIMES.md) = {factor:.2f} "
            f"(per case: {', '.join(f'{f:.2f}' for f in factors)})"
        )
    commit = subprocess.run(['git', '-C', str(ROOT), 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True)
    result = dict(
        cpu=cpu_model(),
        threads=a.threads,
        torch=torch.__version__,
        se3nb_commit=commit.stdout.strip(),
        repeats=a.repeats,
        warmup=a.warmup,
        baseline_commit=a.baseline_commit,
        machine_factor=factor,
        backends=rows[0]['backends'] if rows else None,
        cases=[{k: v for k, v in r.items() if k != 'backends'} for r in rows],
        created=time.strftime('%Y-%m-%d %H:%M:%S'),
    )
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / f"{time.strftime('%Y%m%d-%H%M%S')}.json"
    tmp_path = path.with_suffix('.tmp')
    tmp_path.write_text(json.dumps(result, indent=1))
    tmp_path.replace(path)  # atomic
    print(f"written {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")


if __name__ == '__main__':
    main()
