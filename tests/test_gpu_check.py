"""`make gpu-check` (tools/gpu_check.sh, tools/gpu_check.py) on CPU, so the script a GPU run depends on cannot rot.

- the CPU smoke run (`--device cpu --smoke`): every step runs and passes, the JSON has its schema and every step's
  figures, the Markdown summary names every step;
- a failing step (a time limit of 1 s) is recorded with its reason, the other steps still run, the exit code says so;
- bad options are refused with the valid choices; the H100/H200 targets are judged only on those GPUs.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = ['environment', 'gpu_tests', 'equivariance', 'training', 'throughput', 'ddp']


def _gpu_check():
    spec = importlib.util.spec_from_file_location('gpu_check', ROOT / 'tools' / 'gpu_check.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    env = dict(os.environ, PY=sys.executable)
    env.pop('TRITON_INTERPRET', None)  # as on a fresh shell: the script decides
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_cpu_smoke_runs_every_step(tmp_path):
    "`tools/gpu_check.sh --device cpu --smoke`: all steps pass on CPU; the JSON holds each step's figures."
    # generous time limits: the machine's speed varies, and this test checks what the run does, not how fast (the whole
    # run took 153 s on the idle 2-core Xeon machine, about 190 s while other jobs shared its cores)
    limits = ['--budget', '1500'] + [f'--timeout={name}=600' for name in STEPS]
    args = ['--no-install', '--device', 'cpu', '--smoke', '--out-dir', str(tmp_path)]
    r = _run(['bash', 'tools/gpu_check.sh', *args, *limits], timeout=1800)
    report = json.loads((tmp_path / 'gpu_check.json').read_text())
    assert r.returncode == 0, f"exit code {r.returncode}; failed steps {report['failed_steps']}\n{r.stdout[-6000:]}"

    assert report['schema'] == 'se3nb-gpu-check/1' and report['device'] == 'cpu' and report['smoke'] is True
    assert report['passed'] is True and report['failed_steps'] == [] and report['finished']
    assert list(report['steps']) == ['install'] + STEPS
    assert report['steps']['install']['status'] == 'skip' and report['steps']['install']['reason'] == '--no-install'
    for name in STEPS:
        step = report['steps'][name]
        assert step['status'] == 'pass', (name, step['reason'])
        assert step['reason'] and 0 < step['seconds'] <= step['time_limit_s'], (name, step)
    d = {name: report['steps'][name]['details'] for name in STEPS}

    assert d['environment']['torch'] and d['environment']['e3nn'] and len(d['environment']['se3nb_commit']) == 40
    assert d['environment']['gpus'] == [] and 'nvidia_smi' in d['environment']

    gpu_marked, kernels = d['gpu_tests']['runs']
    assert gpu_marked['tests'] > 0 and gpu_marked['skipped'], 'on CPU the gpu-marked tests are collected and skipped'
    assert kernels['passed'] > 0 and kernels['failed'] == [] and d['gpu_tests']['triton'].startswith('interpreted')

    results = {r['precision']: r for r in d['equivariance']['results']}
    assert list(results) == ['fp32', 'bf16', 'fp32, torch backends']
    assert results['fp32, torch backends']['deviation_from_fp32'] < 1e-5, 'the backends compute the same function'
    assert results['fp32']['max_relative_error'] < 1e-4 < results['bf16']['max_relative_error']  # bf16: rounding shows
    assert all(r['passed'] and r['max_relative_error'] <= r['tolerance'] for r in results.values())

    train = d['training']
    losses = [e['train_loss'] for e in train['epochs']]
    assert train['precision'] == 'bf16' and train['device'] == 'cpu' and train['steps'] >= 20
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]

    cases = d['throughput']['cases']
    assert [(c['mode'], c['precision']) for c in cases] == [
        ('train', 'fp32'), ('train', 'amp'), ('inference', 'fp32'), ('inference', 'amp')
    ]  # fmt: skip
    assert all(c['molecules'] == 2 and c['molecules_per_ms'] > 0 and c['peak_memory_gb'] > 0 for c in cases)
    assert all(c['p99_ms'] >= c['median_ms'] > 0 for c in cases)

    assert d['ddp']['world_size'] == 2 and d['ddp']['backend'] == 'gloo' and len(d['ddp']['losses']) == 2

    assert [t['status'].startswith('not applicable') for t in report['targets']] == [True] * 3

    summary = (tmp_path / 'gpu_check.md').read_text()
    assert 'all steps passed' in summary
    for name in STEPS + ['## Equivariance', '## Training', '## Throughput', '## DDP', '## Targets']:
        assert name in summary, name


def test_a_failing_step_is_recorded_and_sets_the_exit_code(tmp_path):
    "A step over its time limit fails with the reason; the steps after it still run; exit code 1."
    r = _run([sys.executable, 'tools/gpu_check.py', '--device', 'cpu', '--smoke', '--only', 'equivariance,environment',
              '--timeout', 'environment=1', '--timeout', 'equivariance=600', '--out-dir', str(tmp_path)],
             timeout=900)  # fmt: skip
    assert r.returncode == 1, r.stdout[-3000:]
    report = json.loads((tmp_path / 'gpu_check.json').read_text())
    steps = report['steps']
    assert list(steps) == STEPS, 'every step is listed, in order'
    assert steps['environment']['status'] == 'fail'
    assert steps['environment']['reason'].startswith('timed out after 1 s'), steps['environment']['reason']
    assert steps['equivariance']['status'] == 'pass', steps['equivariance']['reason']
    assert {steps[n]['status'] for n in ('gpu_tests', 'training', 'throughput', 'ddp')} == {'skip'}
    assert steps['training']['reason'] == 'not selected (--only)'
    assert report['failed_steps'] == ['environment'] and report['passed'] is False
    assert 'FAILED: environment' in (tmp_path / 'gpu_check.md').read_text()


@pytest.mark.parametrize(
    'args, message',
    [
        (['--only', 'equivariance,speed'], "unknown steps ['speed']; the steps are environment, gpu_tests"),
        (['--timeout', 'training:60'], "expected STEP=SECONDS with STEP one of environment"),
        (['--timeout', 'training=soon'], "expected STEP=SECONDS"),
        (['--device', 'tpu'], "invalid choice: 'tpu'"),
    ],
)
def test_bad_options_are_refused_with_the_choices(args, message, tmp_path):
    r = _run([sys.executable, 'tools/gpu_check.py', *args, '--out-dir', str(tmp_path)], timeout=60)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert not (tmp_path / 'gpu_check.json').exists()


def _report(gpu: str | None, train_amp: float, inference_amp: float, peak_gb: float) -> dict:
    def case(mode, batch, value):
        return dict(mode=mode, batch=batch, precision='amp', low_memory=False, molecules_per_ms=value) | dict(
            peak_memory_gb=peak_gb
        )

    gpus = [dict(index=0, name=gpu)] if gpu else []
    return dict(
        device='cuda' if gpu else 'cpu',
        steps={
            'environment': dict(details=dict(gpus=gpus)),
            'throughput': dict(
                details=dict(cases=[case('train', 240, train_amp), case('inference', 1600, inference_amp)])
            ),
        },
    )


def test_targets_are_judged_on_h100_and_h200_only():
    gpu_check = _gpu_check()
    met = gpu_check.targets(_report('NVIDIA H200', train_amp=40.0, inference_amp=55.0, peak_gb=3.0))
    assert [t['status'] for t in met] == ['met', 'met', 'no published figure to compare with']
    assert [t['measured'] for t in met] == [40.0, 55.0, 3.0]
    missed = gpu_check.targets(_report('NVIDIA H100 80GB HBM3', train_amp=31.9, inference_amp=50.0, peak_gb=3.0))
    assert [t['status'] for t in missed][:2] == ['missed', 'met']
    other = gpu_check.targets(_report('NVIDIA A100-SXM4-80GB', train_amp=99.0, inference_amp=99.0, peak_gb=1.0))
    assert all(t['status'].startswith('not applicable (NVIDIA A100') for t in other)


def test_results_go_to_a_folder_named_after_the_gpu():
    gpu_check = _gpu_check()
    report = _report('NVIDIA H200', 1.0, 1.0, 1.0) | dict(smoke=False)
    assert gpu_check.default_out_dir(report) == ROOT / 'benchmarks' / 'results' / 'nvidia-h200'
    report = dict(device='cpu', smoke=True, steps={'environment': dict(details=dict(cpu='Intel(R) Xeon(R) Processor'))})
    assert gpu_check.default_out_dir(report).name == 'cpu-intel-r-xeon-r-processor-smoke'
