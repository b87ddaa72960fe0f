"Prediction and the command line (se3nb.cli): .xyz files, the QM9 test split, flags, console scripts."

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

pytest.importorskip('rdkit')
import importlib.util

if importlib.util.find_spec('qm9pack') is None:
    pytest.skip('needs the qm9pack wheel', allow_module_level=True)

from se3nb.cli import cli_predict, configs_from_args, predict
from se3nb.data import QM9Dataset, collate_graphs
from se3nb.qm9 import load_qm9, read_qm9
from se3nb.recipe import presets
from se3nb.train import fit, load_checkpoint

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def cache_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp('qm9cache')
    load_qm9(max_molecules=200, cache_dir=d, progress=False)
    return str(d)


@pytest.fixture(scope='module')
def smoke(cache_dir):
    m, d, t = presets('smoke')
    return m, replace(d, cache_dir=cache_dir), replace(t, plots=False)


def _write_xyz(path, mol):
    lines = [str(len(mol.elements)), mol.name] + [
        f"{e} {x:.10f} {y:.10f} {z:.10f}" for e, (x, y, z) in zip(mol.elements, mol.pos)
    ]
    path.write_text('\n'.join(lines) + '\n')


def test_predict_xyz_matches_dataset_and_cli(smoke, tmp_path, capsys):
    m, d, t = smoke
    res = fit(m, d, replace(t, out_dir=str(tmp_path), epochs=1))
    model, ck = res['model'].eval(), tmp_path / 'checkpoint.pt'
    mols = list(read_qm9(max_molecules=200))[150:153]
    files = []
    for k, mol in enumerate(mols):
        files.append(tmp_path / f'm{k}.xyz')
        _write_xyz(files[-1], mol)
    out = predict(ck, files)
    store = load_qm9(max_molecules=200, cache_dir=d.cache_dir, progress=False)
    ds = QM9Dataset(store)
    b = collate_graphs([ds[150], ds[151], ds[152]])
    target = load_checkpoint(ck)['target']
    with torch.no_grad():
        ref = model(b.graph, b.node_feats, b.edge_feats).double() * target['std'] + target['mean']
    assert out['predictions'] == pytest.approx(ref.tolist(), abs=1e-5)
    cli_predict([str(ck), *map(str, files), '--output', str(tmp_path / 'pred.json')])
    assert 'eV' in capsys.readouterr().out and json.loads((tmp_path / 'pred.json').read_text())['unit'] == 'eV'
    test = predict(ck)
    assert test['count'] == 20 and test['test_mae'] == pytest.approx(res['test_mae'], rel=1e-6)
    (tmp_path / 'si.xyz').write_text('1\n\nSi 0 0 0\n')  # read_xyz's errors: tests/test_data.py::test_xyz_files
    with pytest.raises(ValueError, match='not in QM9'):
        predict(ck, [tmp_path / 'si.xyz'])


def test_cli_flags_fill_configs():
    m, d, t = configs_from_args(
        [
            '--preset',
            'quick',
            '--task',
            'gap',
            '--epochs',
            '3',
            '--amp',
            '--max-train',
            '100',
            '--num-layers',
            '3',
            '--precompute-bases',
            '--grad-clip',
            '5',
            '--time-budget',
            '600',
            '--ema',
            '0.999',
            '--seed',
            '4',
            '--schedule',
            'linear',
            '--log-every',
            '50',
        ]
    )
    assert (d.task, t.epochs, t.precision, d.max_train, m.num_layers, t.grad_clip) == ('gap', 3, 'amp', 100, 3, 5.0)
    assert d.precompute_geometry  # --precompute-bases is the old name of --precompute-geometry
    assert (t.time_budget, t.ema, t.seed, t.schedule_name, t.log_every) == (600.0, 0.999, 4, 'linear', 50)
    assert configs_from_args(['--preset', 'quick']) == presets('quick')  # no flag changes nothing
    with pytest.raises(SystemExit):
        configs_from_args(['--schedule', 'stepwise'])
    r = subprocess.run(
        [sys.executable, '-m', 'se3nb.train', '--help'],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    assert r.returncode == 0 and '--preset' in r.stdout


def test_main_cli_smoke(cache_dir, tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            '-m',
            'se3nb.train',
            '--preset',
            'smoke',
            '--cache-dir',
            cache_dir,
            '--out-dir',
            str(tmp_path),
            '--num-threads',
            '1',
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'test MAE' in r.stdout and 'mean predictor' in r.stdout
    r = subprocess.run(
        [sys.executable, '-m', 'se3nb.train', 'predict', str(tmp_path / 'checkpoint.pt')],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        env=dict(os.environ, PYTHONPATH=str(REPO), SE3NB_CACHE=cache_dir),
    )
    assert r.returncode == 0 and 'test MAE' in r.stdout, r.stderr[-2000:]


def test_console_scripts_installed():
    import shutil

    exe = shutil.which('se3nb-train')
    if exe is None:
        pytest.skip('se3nb is not pip-installed here (console scripts come from settings.ini)')
    for name in ('se3nb-train', 'se3nb-predict'):
        r = subprocess.run([shutil.which(name), '--help'], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and 'usage' in r.stdout


def test_console_entry_points_exit_zero(cache_dir, tmp_path, capsys):
    "setuptools wrappers call sys.exit(entry()): a returned dict would be printed and exit with status 1."
    from se3nb.cli import cli_train

    assert (
        cli_train(['--preset', 'smoke', '--cache-dir', cache_dir, '--out-dir', str(tmp_path), '--epochs', '1']) is None
    )
    assert cli_predict([str(tmp_path / 'checkpoint.pt')]) is None
    assert 'test MAE' in capsys.readouterr().out
