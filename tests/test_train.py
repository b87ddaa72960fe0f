"Training (se3nb.train): smoke fit, schedules, time budget, weight averaging, seeds, resume, checkpoints, DDP."

import json
import os
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import se3nb.train
import torch

pytest.importorskip('rdkit')
import importlib.util

if importlib.util.find_spec('qm9pack') is None:
    pytest.skip('needs the qm9pack wheel', allow_module_level=True)

from se3nb.cli import predict
from se3nb.data import GraphDataModule, PointCloudDataset, QM9DataModule, TargetScaler
from se3nb.fiber import Fiber
from se3nb.model import ModelConfig, SE3TransformerPooled
from se3nb.qm9 import load_qm9
from se3nb.recipe import scheduled_lr
from se3nb.runtime import evaluate
from se3nb.train import (
    CheckpointError,
    NonFiniteLossError,
    TrainConfig,
    configs_from_checkpoint,
    fit,
    load_checkpoint,
    model_from_checkpoint,
    presets,
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


def records(out_dir, kind):
    return [r for r in map(json.loads, open(Path(out_dir) / 'metrics.jsonl')) if r['kind'] == kind]


# torchrun --standalone: the rendezvous listens on a free port it picks itself. A fixed --master_port made this file
# flaky: two test runs at the same time on one machine (several checkouts, CI jobs) collided on it (EADDRINUSE).
TORCHRUN = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']


def run_script(text: str, path: Path, *args: str, launcher: list[str] = TORCHRUN) -> None:
    "Write `text` to `path` and run it with `args` (two gloo processes by default, one thread each); fail on an error."
    path.write_text(text)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get('PYTHONPATH', ''), OMP_NUM_THREADS='1')
    r = subprocess.run(launcher + [str(path), *args], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


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
        precompute_geometry=True,
    )  # edge frames built in the loader
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


class SlowPointClouds(PointCloudDataset):
    "Point clouds that take 10 ms each to load: a loader that costs training time."

    def __getitem__(self, i):
        time.sleep(0.01)
        return super().__getitem__(i)


def test_time_waiting_for_batches_is_measured_apart_from_set_up(tmp_path, monkeypatch):
    mc = ModelConfig(
        num_layers=1, num_degrees=2, num_channels=4, num_heads=2, out_channels=8, node_feature_dim=1, edge_feature_dim=1
    )
    sets = [SlowPointClouds(32), PointCloudDataset(8, seed=1), PointCloudDataset(8, seed=2)]
    dm = GraphDataModule(*sets, fiber_node=Fiber({0: 1}), fiber_edge=Fiber({0: 1}), batch_size=8)
    monkeypatch.setattr(se3nb.train, 'backend_report', lambda check: time.sleep(0.3))  # kernels built in 0.3 s
    res = fit(mc, dm, TrainConfig(epochs=2, out_dir=str(tmp_path), progress=False, plots=False))
    assert res['steps'] == 8
    # 64 slow molecules, within training time (train_seconds is rounded to 0.1 s, loading_share is not)
    assert 2 * 32 * 0.01 <= res['loading_seconds'] <= res['train_seconds'] + 0.05 and res['loading_share'] < 1
    assert res['loading_share'] == pytest.approx(res['loading_seconds'] / res['train_seconds'], rel=0.1)
    assert res['setup_seconds'] >= 0.3 and res['data_seconds'] < 0.3  # the kernels' build is set-up, not data
    quick = GraphDataModule(
        PointCloudDataset(32), *sets[1:], fiber_node=Fiber({0: 1}), fiber_edge=Fiber({0: 1}), batch_size=8
    )
    fast = fit(mc, quick, TrainConfig(epochs=2, out_dir=str(tmp_path / 'fast'), progress=False, plots=False))
    assert fast['loading_seconds'] < 0.5 * res['loading_seconds']  # the same molecules without the sleep


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
        params = torch.cat([p.detach().flatten() for p in res['model'].parameters()])
        torch.save({'params': params, 'test_mae': res['test_mae'], 'world_size': res['world_size']}, sys.argv[4])
    if torch.distributed.is_initialized():  # like se3nb-train: exiting with a live gloo group can abort
        torch.distributed.destroy_process_group()
''')


def test_ddp_two_processes_equal_one_process(cache_dir, tmp_path):
    "2 gloo processes with batch 8 each == 1 process with batch 16 (same molecules per step, sums in another order)."
    script = tmp_path / 'ddp_run.py'
    run_script(DDP_SCRIPT, script, cache_dir, '8', str(tmp_path / 'ddp'), str(tmp_path / 'two.pt'))
    one = [cache_dir, '16', str(tmp_path / 'one'), str(tmp_path / 'one.pt')]
    run_script(DDP_SCRIPT, script, *one, launcher=[sys.executable])
    two, one = torch.load(tmp_path / 'two.pt'), torch.load(tmp_path / 'one.pt')
    assert two['world_size'] == 2 and one['world_size'] == 1
    # tolerance: float32 gradients summed in another order (per-rank means, then the DDP average), amplified by 20 AdamW
    # steps
    assert (two['params'] - one['params']).abs().max() < 1e-4
    assert two['test_mae'] == pytest.approx(
        one['test_mae'], abs=1e-4
    )  # test metrics reduced over ranks: same molecules counted once


BATCH_SECONDS = 0.125  # the training time one batch takes on the batch clock (a power of 2: sums are exact)


def batch_clock(monkeypatch) -> None:
    "Training time that moves BATCH_SECONDS per training batch and never else: a time budget becomes a batch count."
    import se3nb.runtime
    import se3nb.train

    now, step = [0.0], getattr(se3nb.train._train_step, '__wrapped__', se3nb.train._train_step)  # installed twice: anew

    def counted(*args, **kwargs):
        loss = step(*args, **kwargs)
        now[0] += BATCH_SECONDS
        return loss

    counted.__wrapped__ = step

    monkeypatch.setattr(se3nb.runtime, 'time', SimpleNamespace(perf_counter=lambda: now[0]))  # TrainClock's time
    monkeypatch.setattr(se3nb.train, '_train_step', counted)


DDP_BUDGET_SCRIPT = textwrap.dedent('''
    import json, os, sys, torch
    from dataclasses import replace
    import pytest
    import se3nb.runtime
    from se3nb.train import fit, presets
    sys.path.insert(0, sys.argv[4])
    from test_train import batch_clock
    with pytest.MonkeyPatch.context() as patch:
        batch_clock(patch)  # rank 0: 2.5 s = 20 batches; rank 1: its own clock says the budget is long spent
        if os.environ['RANK'] == '1':
            patch.setattr(se3nb.runtime.TrainClock, 'seconds', property(lambda self: 1e6))
        m, d, t = presets('smoke')
        t = replace(t, out_dir=sys.argv[2], epochs=1000, time_budget=2.5, num_threads=1, plots=False, eval_every=1000)
        res = fit(m, replace(d, cache_dir=sys.argv[1], batch_size=8), t)
    with open(sys.argv[3] + os.environ['RANK'], 'w') as f:
        json.dump({'steps': res['steps'], 'train_seconds': res['train_seconds']}, f)
    torch.distributed.destroy_process_group()
''')


def test_ddp_ranks_stop_at_the_same_step_when_rank_0_says_so(cache_dir, tmp_path):
    "With a time budget, rank 0's clock decides for all: rank 1's clock, which says stop at once, would hang rank 0."
    out, ranks = str(tmp_path / 'out'), str(tmp_path / 'rank')
    run_script(DDP_BUDGET_SCRIPT, tmp_path / 'ddp_budget.py', cache_dir, out, ranks, str(Path(__file__).parent))
    ranks = [json.loads((tmp_path / f'rank{k}').read_text()) for k in (0, 1)]
    assert ranks[0]['steps'] == ranks[1]['steps'] == 21  # batch 21 is the first to see 20 * 0.125 s >= 2.5 s
    assert ranks[0]['train_seconds'] == pytest.approx(21 * BATCH_SECONDS, abs=0.05)  # rounded to 0.1 s


def test_time_budget_stops_and_schedules_over_training_time(smoke, tmp_path, monkeypatch):
    m, d, t = smoke
    c = replace(t, out_dir=str(tmp_path), epochs=1000, time_budget=2.5, log_every=1, warmup=0.2, eval_every=1)
    batch_clock(monkeypatch)
    res = fit(m, d, c)
    steps = records(tmp_path, 'step')
    assert c.schedule_name == 'cosine' and res['steps'] == len(steps) == 21  # 20 * 0.125 s = 2.5 s
    assert [r['train_seconds'] for r in steps] == [BATCH_SECONDS * k for k in range(21)]  # at each batch's lr choice
    for r in steps:  # the lr of each batch follows the training time at that batch
        assert r['lr'] == pytest.approx(scheduled_lr(c, r['train_seconds'] / 2.5), rel=1e-12)
    assert steps[0]['lr'] == c.lowest_lr and max(r['lr'] for r in steps) == pytest.approx(c.lr, rel=0.02)
    assert steps[-1]['lr'] == pytest.approx(c.lowest_lr)  # the end of the decay
    epochs = records(tmp_path, 'epoch')
    assert [r['epoch'] for r in epochs] == [1, 2, 3] and all('val_mae' in r for r in epochs)  # the last one cut short
    assert res['train_seconds'] == pytest.approx(21 * BATCH_SECONDS, abs=0.05)  # 3 validations took no training time
    assert res['eval_seconds'] > 0
    assert res['epochs_done'] == 2.1 and res['time_budget'] == 2.5


def test_time_budget_on_the_real_clock(smoke, tmp_path):
    m, d, t = smoke
    res = fit(m, d, replace(t, out_dir=str(tmp_path), epochs=1000, time_budget=1.0, log_every=1, eval_every=1000))
    steps = records(tmp_path, 'step')
    assert all(r['train_seconds'] < 1.0 for r in steps[:-1]) and steps[-1]['train_seconds'] >= 1.0  # stops right after
    assert res['train_seconds'] >= 1.0 and res['steps'] == len(steps)


def test_resume_continues_the_budget_schedule(smoke, tmp_path, monkeypatch):
    m, d, t = smoke
    c = replace(t, epochs=1000, time_budget=2.5, log_every=1, warmup=0.1, num_threads=1)
    batch_clock(monkeypatch)
    whole = fit(m, d, replace(c, out_dir=str(tmp_path / 'a')))
    batch_clock(monkeypatch)  # the clock starts again from 0
    fit(m, d, replace(c, out_dir=str(tmp_path / 'b'), stop_after=1))  # "interrupted" after one epoch
    first = load_checkpoint(tmp_path / 'b' / 'checkpoint.pt')
    assert first['epoch'] == 1 and first['step'] == 10 and first['train_seconds'] == 10 * BATCH_SECONDS
    resumed = fit(m, d, replace(c, out_dir=str(tmp_path / 'b'), resume=True))
    assert records(tmp_path / 'b', 'step') == records(tmp_path / 'a', 'step')  # the same lr at every batch
    assert resumed['steps'] == whole['steps'] == 21 and torch.equal(params(resumed['model']), params(whole['model']))
    again = fit(m, d, replace(c, out_dir=str(tmp_path / 'b'), resume=True))  # the budget is spent: nothing to train
    assert again['steps'] == 21 and again['test_mae'] == pytest.approx(resumed['test_mae'])


def test_seed_controls_initialisation_and_data_order(smoke, tmp_path):
    m, d, t = smoke
    losses = {}
    for name, seed in (('a', 1), ('b', 1), ('c', 2)):
        fit(m, d, replace(t, out_dir=str(tmp_path / name), epochs=1, log_every=1, seed=seed))
        losses[name] = [r['train_loss'] for r in records(tmp_path / name, 'step')][:5]
    assert losses['a'] == losses['b']  # same seed: identical first losses
    assert all(a != c for a, c in zip(losses['a'], losses['c']))  # another seed: other weights and batches
    order = {}
    for seed in (1, 2):
        torch.manual_seed(123)  # the global state before fit does not matter
        dm = QM9DataModule(d)
        sampler = torch.utils.data.DistributedSampler(dm.train_set, 1, 0, shuffle=True, seed=seed)
        order[seed] = list(sampler)
    assert order[1] != order[2] and sorted(order[1]) == sorted(order[2])


def test_weight_average_is_evaluated_saved_and_predicted(smoke, tmp_path):
    m, d, t = smoke
    res = fit(m, d, replace(t, out_dir=str(tmp_path), epochs=2, ema=0.9))
    ckpt = load_checkpoint(tmp_path / 'checkpoint.pt')
    assert ckpt['ema']['decay'] == 0.9 and ckpt['ema']['updates'] == ckpt['step'] == 20
    raw, averaged = model_from_checkpoint(ckpt, raw=True), model_from_checkpoint(ckpt)
    assert not torch.equal(params(raw), params(averaged)) and torch.equal(params(averaged), params(res['model']))
    dm = QM9DataModule(d)
    assert res['test_mae'] == pytest.approx(evaluate(averaged, dm, 'test')['mae'], rel=1e-6)
    assert records(tmp_path, 'epoch')[-1]['val_mae'] == pytest.approx(evaluate(averaged, dm, 'val')['mae'], rel=1e-6)
    default, trained = predict(tmp_path / 'checkpoint.pt'), predict(tmp_path / 'checkpoint.pt', raw_weights=True)
    assert default['averaged_weights'] and not trained['averaged_weights']
    assert default['test_mae'] == pytest.approx(res['test_mae'], rel=1e-6)
    assert trained['test_mae'] == pytest.approx(evaluate(raw, dm, 'test')['mae'], rel=1e-6)


def test_learning_curve_every_n_batches(smoke, tmp_path):
    m, d, t = smoke
    res = fit(m, d, replace(t, out_dir=str(tmp_path), epochs=3, log_every=4, plots=True))
    steps = records(tmp_path, 'step')
    assert [r['step'] for r in steps] == [4, 8, 12, 16, 20, 24, 28] and res['steps'] == 30
    assert all(r['train_loss'] > 0 and r['lr'] > 0 for r in steps) and (tmp_path / 'learning_curve.png').exists()
    assert [r['epoch'] for r in records(tmp_path, 'epoch')] == [1, 2, 3]


def test_checkpoints_of_the_previous_version_still_load(smoke, tmp_path):
    m, d, t = smoke
    fit(m, d, replace(t, out_dir=str(tmp_path), epochs=1))
    ckpt = load_checkpoint(tmp_path / 'checkpoint.pt')
    old = dict(ckpt['config']['data'], max_degree=3, precompute_bases=True)  # DataConfig fields before the rename
    del old['precompute_geometry']
    ckpt['config'] = dict(ckpt['config'], data=old)
    assert configs_from_checkpoint(ckpt)[1] == replace(d, precompute_geometry=True)
    ckpt['config']['data']['made_up'] = 1
    with pytest.raises(CheckpointError, match="unknown fields \\['made_up'\\]"):
        configs_from_checkpoint(ckpt)


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


def test_geometry_precomputed_in_the_loader_gives_the_same_output(cache_dir):
    m, d, _ = presets('smoke')
    dm = QM9DataModule(replace(d, cache_dir=cache_dir, precompute_geometry=True))
    torch.manual_seed(0)
    model = SE3TransformerPooled.from_config(m).eval()
    dm.use_geometry_of(model)  # the degrees come from the model: nothing to keep in step by hand
    b = next(iter(dm.dataloader('val')))
    assert b.geometry is not None and b.geometry.num_edges == b.graph.num_edges
    assert b.geometry.max_degree == m.num_degrees - 1
    with torch.no_grad():
        assert torch.equal(
            model(b.graph, b.node_feats, b.edge_feats, b.geometry), model(b.graph, b.node_feats, b.edge_feats)
        )
