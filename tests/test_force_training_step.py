"""benchmarks/force_training_step.py: both cases run (energies; energies and forces) and the JSON records them."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_both_cases_run_and_are_recorded(tmp_path):
    out_json = tmp_path / 'force.json'
    args = ['--config', 'small', '--batch', 'random', '--iters', '1', '--json', str(out_json)]
    out = subprocess.run(
        [sys.executable, str(ROOT / 'benchmarks' / 'force_training_step.py'), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    record = json.loads(out_json.read_text())
    cases = record['cases']
    assert set(cases) == {'energies', 'forces'} and all(c['ms_per_step'] > 0 for c in cases.values())
    assert record['forces_over_energies'] > 1  # the recorded backward does more work than the kernels' first derivative
    assert 'cpu_model' in record['machine'] and 'takes' in out.stdout
