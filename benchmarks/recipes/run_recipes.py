"""Run named training recipes on QM9 homo for a time budget, several seeds each, and tabulate the test MAE.

Every run is a fresh `python -m se3nb.cli` process with 2 threads (`--num-threads 2`, `OMP_NUM_THREADS=2`), trains on
NVIDIA's training split for `--budgets` seconds of training time (data loading counted, evaluation not; the learning
rate is scheduled over the budget), and is tested on all 13,083 molecules of NVIDIA's test split. Runs go round-robin
over seeds, then recipes, so a drift of the machine's speed hits every recipe alike. Each run leaves one JSON file
(configuration, CPU, results, learning curve) under `--out`; checkpoints and logs stay in `--work-dir`. The table at the
end covers every JSON in `--out`:

    budget (s) | recipe | test MAE (eV), mean ± std over seeds | steps | mol/s | seeds

Examples (the CPU model is recorded in every file: compare only runs made on the same machine):

    python benchmarks/recipes/run_recipes.py --list
    python benchmarks/recipes/run_recipes.py --recipes nvidia-small-constant cosine-ema --budgets 600 --seeds 0 1 2
    python benchmarks/recipes/run_recipes.py --smoke --budgets 30 --seeds 0   # a minute: checks the tooling only
    python benchmarks/recipes/run_recipes.py --recipes cosine-ema-lr4e-3-3layers --budgets 7200 --seeds 0 --val-every 1
                                              # two hours, with the validation MAE after every pass as a curve
    python benchmarks/recipes/run_recipes.py --table-only                       # print the table of what is there
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / 'benchmarks' / 'results' / 'recipes'

# NVIDIA's `small` configuration (2 layers, degrees 0-2, 16 channels, 4 heads, fiber_out {0: 48}: 250,577 parameters),
# batch 64, AdamW (lr 2e-3, weight decay 0.1), as in issue 16's comparison with NVIDIA's implementation. Validation only
# at the end, on 1,000 molecules (it costs wall time, not training time); the test covers NVIDIA's whole test split.
SMALL = ['--preset', 'nvidia', '--num-layers', '2', '--num-degrees', '3', '--num-channels', '16', '--num-heads', '4']
BASE = SMALL + ['--out-channels', '48', '--batch-size', '64', '--lr', '0.002', '--weight-decay', '0.1']
BASE += ['--epochs', '1000', '--max-val', '1000', '--eval-every', '1000']

RECIPES: dict[str, tuple[list[str], str]] = {  # name -> (se3nb-train flags, what it tries)
    'nvidia-small-constant': (BASE + ['--schedule', 'constant', '--warmup', '0'], "issue 16's baseline: constant lr"),
    'cosine': (BASE + ['--schedule', 'cosine'], 'warm-up 5 %, cosine decay to lr/10 over the budget'),
    'cosine-ema': (BASE + ['--schedule', 'cosine', '--ema', '0.999'], '+ moving average of the weights (0.999)'),
    'cosine-ema-lr4e-3': (BASE + ['--schedule', 'cosine', '--ema', '0.999', '--lr', '0.004'], '+ peak lr 4e-3'),
    'cosine-ema-b32': (BASE + ['--schedule', 'cosine', '--ema', '0.999', '--batch-size', '32'], '+ batch 32'),
    'cosine-ema-b128': (BASE + ['--schedule', 'cosine', '--ema', '0.999', '--batch-size', '128'], '+ batch 128'),
    'linear-ema': (BASE + ['--schedule', 'linear', '--ema', '0.999'], 'linear decay instead of cosine'),
    'cosine-ema-min0': (BASE + ['--schedule', 'cosine', '--ema', '0.999', '--min-lr', '0'], 'decay to zero'),
    'cosine-ema-3layers': (BASE + ['--schedule', 'cosine', '--ema', '0.999', '--num-layers', '3'], 'one more layer'),
    'cosine-ema-deg2': (BASE + ['--schedule', 'cosine', '--ema', '0.999', '--num-degrees', '2'], 'degrees 0-1 only'),
    'cosine-ema-32ch': (BASE + ['--schedule', 'cosine', '--ema', '0.999', '--num-channels', '32'], '32 channels'),
    'cosine-ema-lr4e-3-3layers': (
        BASE + ['--schedule', 'cosine', '--ema', '0.999', '--lr', '0.004', '--num-layers', '3'],
        'peak lr 4e-3 and 3 layers',
    ),
    'cosine-ema-lr4e-3-4layers': (
        BASE + ['--schedule', 'cosine', '--ema', '0.999', '--lr', '0.004', '--num-layers', '4'],
        'peak lr 4e-3 and 4 layers',
    ),
}
# The Xeon campaign's best for 600 s, and the recipe the one-change variants below start from.
QUICK_BASE = 'cosine-ema-lr4e-3-3layers'
QUICK_VARIANTS = {  # one change each to QUICK_BASE: batch size, warm-up, decay shape and end, EMA decay
    'b32': (['--batch-size', '32'], 'batch 32'),
    'b128': (['--batch-size', '128'], 'batch 128'),
    'warmup0': (['--warmup', '0'], 'no warm-up'),
    'warmup15': (['--warmup', '0.15'], 'warm-up over 15 % of the budget'),
    'linear': (['--schedule', 'linear'], 'linear decay instead of cosine'),
    'min0': (['--min-lr', '0'], 'decay to zero instead of lr/10'),
    'ema0.998': (['--ema', '0.998'], 'weight average 0.998 (shorter memory)'),
    'ema0.9995': (['--ema', '0.9995'], 'weight average 0.9995 (longer memory)'),
}
for _name, (_flags, _about) in QUICK_VARIANTS.items():  # later flags win: each variant overrides one setting
    RECIPES[f'{QUICK_BASE}-{_name}'] = (RECIPES[QUICK_BASE][0] + _flags, f'{QUICK_BASE}, {_about}')
# The best for 600 s over 3 seeds on the 2-core AMD EPYC (batch 128 beat batch 64 by 0.004 eV): the `quick` preset
# (tests/test_recipe.py pins the two together).
QUICK = f'{QUICK_BASE}-b128'
SMOKE = ['--max-train', '2000', '--max-test', '500', '--max-val', '200']  # --smoke: a few minutes, not a result


def cpu_model() -> str:
    "The CPU's model name, which every result records: another CPU shifts every figure."
    from se3nb.benchmark import machine_info

    return machine_info()['cpu_model']


def git_commit() -> str | None:
    r = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=REPO, capture_output=True, text=True)
    return r.stdout.strip() or None if r.returncode == 0 else None


def backends() -> str:
    "se3nb's backend report, checking every backend: builds the C++ kernels now, so no run's budget pays for it."
    code = 'from se3nb.backends import backend_report; print(backend_report(check=True))'
    r = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else f"backend report failed: {r.stderr.strip()[-500:]}"


def curve(metrics: Path, std: float) -> list[dict]:
    "The learning curve of a run: training MAE (target units) and lr against training time, from its metrics.jsonl."
    points = []
    for line in metrics.read_text().splitlines():
        r = json.loads(line)
        if r.get('kind') == 'step':
            points.append(dict(seconds=r['train_seconds'], step=r['step'], train_mae=r['train_loss'] * std, lr=r['lr']))
        elif r.get('kind') == 'epoch' and 'val_mae' in r:
            points.append(dict(seconds=r['train_seconds'], step=r['step'], val_mae=r['val_mae']))
    return points


def run_one(recipe: str, budget: float, seed: int, args: argparse.Namespace) -> dict:
    "One recipe, budget and seed in a fresh process; returns (and writes) its JSON record."
    flags = RECIPES[recipe][0] + (SMOKE if args.smoke else [])
    work = Path(args.work_dir) / f'{budget:g}s' / recipe / f'seed{seed}'
    log_every = max(1, int(budget // 20))  # about 20 points per run at ~10 batches/s, more when faster
    cmd = [sys.executable, '-m', 'se3nb.cli', *flags, '--time-budget', str(budget), '--seed', str(seed)]
    cmd += ['--num-threads', str(args.threads), '--out-dir', str(work), '--no-progress', '--log-every', str(log_every)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    if args.cache_dir:
        cmd += ['--cache-dir', args.cache_dir]
    if args.val_every:  # after the recipe's flags: the last one counts
        cmd += ['--eval-every', str(args.val_every)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"{recipe} ({budget:g} s, seed {seed}) failed:\n{proc.stderr[-3000:]}")
    results = json.loads((work / 'results.json').read_text())
    record = dict(recipe=recipe, about=RECIPES[recipe][1], budget=budget, seed=seed, flags=flags, smoke=args.smoke)
    record.update(cpu=cpu_model(), threads=args.threads, python=platform.python_version(), se3nb_commit=git_commit())
    record.update(backends=args.backends, val_every=args.val_every)
    record.update(wall_seconds=round(time.perf_counter() - start, 1), results=results)
    record['curve'] = curve(work / 'metrics.jsonl', results['target_std'])
    path = Path(args.out) / f'{budget:g}s' / f'{recipe}-seed{seed}.json'
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1))
    return record


def table(folder: Path) -> str:
    "Budget, recipe, test MAE mean ± std over seeds, steps and mol/s of every record under `folder`."
    groups: dict[tuple[float, str], list[dict]] = {}
    for path in sorted(folder.rglob('*.json')):
        r = json.loads(path.read_text())
        groups.setdefault((r['budget'], r['recipe']), []).append(r)
    lines = [
        '| budget (s) | recipe | test MAE (eV) | steps | mol/s | seeds | CPU |',
        '| --- | --- | --- | --- | --- | --- | --- |',
    ]
    for (budget, recipe), runs in sorted(groups.items()):
        mae = [r['results']['test_mae'] for r in runs]
        spread = f" ± {statistics.stdev(mae):.4f}" if len(mae) > 1 else ''
        steps = statistics.mean(r['results']['steps'] for r in runs)
        speed = statistics.mean(r['results']['molecules_per_second'] for r in runs)
        cpus = ', '.join(sorted({r['cpu'] for r in runs}))
        mae = f"{statistics.mean(mae):.4f}{spread}"
        lines.append(f"| {budget:g} | {recipe} | {mae} | {steps:,.0f} | {speed:,.0f} | {len(runs)} | {cpus} |")
    return '\n'.join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument('--recipes', nargs='+', default=['nvidia-small-constant', 'cosine-ema'], choices=list(RECIPES))
    p.add_argument('--budgets', nargs='+', type=float, default=[600.0], help='seconds of training per run')
    p.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2])
    p.add_argument('--threads', type=int, default=2, help='torch threads per run (default 2)')
    p.add_argument('--out', help='folder of the JSON records (default: benchmarks/results/recipes/<cpu>[-smoke])')
    p.add_argument('--work-dir', default=str(REPO / 'runs_out' / 'recipes'), help='checkpoints and logs of the runs')
    p.add_argument('--cache-dir', help='preprocessed QM9 (default: $SE3NB_CACHE or ~/.cache/se3nb)')
    p.add_argument('--smoke', action='store_true', help='2,000 training and 500 test molecules: checks the tooling')
    p.add_argument('--force', action='store_true', help='run again when a record exists')
    p.add_argument(
        '--val-every',
        type=int,
        default=None,
        help='validate every N epochs: a validation curve (wall time, not training)',
    )
    p.add_argument('--list', action='store_true', help='list the recipes and exit')
    p.add_argument('--table-only', action='store_true', help='print the table of the records in --out and exit')
    args = p.parse_args(argv)
    if args.list:
        for name, (_, about) in RECIPES.items():
            print(f"{name:24s} {about}")
        return
    slug = '-'.join(cpu_model().lower().replace('(r)', '').replace('(tm)', '').replace('@', ' ').split())[:60]
    args.out = Path(args.out or RESULTS / (slug + ('-smoke' if args.smoke else '')))
    if not args.table_only:
        args.backends = backends()
        for budget in args.budgets:
            for seed in args.seeds:
                for recipe in args.recipes:
                    if (args.out / f'{budget:g}s' / f'{recipe}-seed{seed}.json').exists() and not args.force:
                        continue
                    r = run_one(recipe, budget, seed, args)['results']
                    done = f"test MAE {r['test_mae']:.4f} eV, {r['steps']} steps, {r['molecules_per_second']:.0f} mol/s"
                    print(f"{budget:g} s  {recipe}  seed {seed}: {done}", flush=True)
    print(f"CPU: {cpu_model()}; records in {args.out}\n" + table(args.out))


if __name__ == '__main__':
    main()
