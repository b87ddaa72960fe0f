"""benchmarks/compare_nvidia_cpu.py: one case runs and records what it timed; baselines keep torch's optimizer.

- a training case on synthetic molecules reports its speed, peak RSS and the optimizer's kernels: fused by default
  (se3nb's trainer), torch's default with `--optimizer torch`;
- a baseline case is started with `--optimizer=torch` whatever the current cases use (se3nb at 9afe565 had no fused
  optimizer), and a current case with the option given.
"""

import importlib.util
import json
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / 'benchmarks' / 'compare_nvidia_cpu.py'


def _module():
    spec = importlib.util.spec_from_file_location('compare_nvidia_cpu', SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize('choice', ['trainer', 'torch'])
def test_a_training_case_records_its_optimizer(choice):
    args = ['--case', 'train', '--config', 'small', '--batch', 'random', '--iters', '1', '--warmup', '0']
    out = subprocess.run(
        [sys.executable, str(SCRIPT), *args, f'--optimizer={choice}'],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    case = json.loads(out.stdout.strip().splitlines()[-1])
    assert case['mode'] == 'train' and case['molecules_per_s'] > 0 and case['peak_rss_gb'] > 0
    fused = choice == 'trainer' and tuple(int(v) for v in torch.__version__.split('.')[:2]) >= (2, 4)
    kernels = 'fused' if fused else "torch's default"
    assert case['optimizer'] == f'AdamW ({kernels})'


def test_baselines_run_torchs_optimizer(monkeypatch, tmp_path):
    module, commands = _module(), []

    def fake_run(cmd, **kwargs):
        commands.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, stdout='{"ok": 1}\n', stderr='')

    monkeypatch.setattr(module.subprocess, 'run', fake_run)
    a = Namespace(
        config='small', batch='random', threads=2, iters=1, warmup=0, fuse_level='partial', amp=False,
        low_memory=False, optimizer='trainer',
    )  # fmt: skip
    module.run_in_process(a, 'train', None)
    module.run_in_process(a, 'train', tmp_path)
    assert '--optimizer=trainer' in commands[0] and '--optimizer=torch' in commands[1]
