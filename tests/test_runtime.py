"Runtime (se3nb.runtime): the training clock, RNG state, shard sampling, evaluation, metrics file."

import json
import time
from types import SimpleNamespace

import torch

from se3nb.data import GraphDataModule, PointCloudDataset
from se3nb.fiber import Fiber
from se3nb.model import ModelConfig, SE3TransformerPooled
from se3nb.runtime import JsonlLogger, LoaderTimer, ShardSampler, TrainClock, evaluate, rng_state, seed_everything
from se3nb.runtime import set_rng_state


def test_clock_counts_only_unpaused_time(monkeypatch):
    import se3nb.runtime

    now = [100.0]  # a fake perf_counter: the test does not depend on the machine's load
    monkeypatch.setattr(se3nb.runtime, 'time', SimpleNamespace(perf_counter=lambda: now[0]))
    clock = TrainClock(5.0)  # a resumed run: 5 s already spent
    now[0] += 2.0
    assert clock.seconds == 7.0
    with clock.paused():
        now[0] += 30.0
        assert clock.seconds == 7.0  # stopped while paused
    now[0] += 1.0
    assert clock.seconds == 8.0
    monkeypatch.undo()
    real = TrainClock()  # and the real clock runs
    time.sleep(0.01)
    assert real.seconds >= 0.01


def test_loader_timer_counts_the_waits_and_keeps_every_batch():
    def slow_loader():
        for k in range(4):
            time.sleep(0.05)  # a collate that takes 50 ms
            yield k

    timer = LoaderTimer(1.0)  # a resumed run: 1 s already spent waiting
    seen = []
    for batch in timer.batches(slow_loader()):
        time.sleep(0.05)  # a training step: not waiting
        seen.append(batch)
    assert seen == [0, 1, 2, 3]
    assert 1.0 + 4 * 0.05 <= timer.seconds < 1.0 + 4 * 0.05 + 0.15  # the waits, not the steps


def test_rng_state_round_trip():
    seed_everything(7)
    state = json.loads(json.dumps({k: v for k, v in rng_state().items() if k != 'torch'}))  # plain values
    state['torch'] = torch.get_rng_state()
    first = (torch.rand(4), __import__('random').random())
    set_rng_state(state)
    assert torch.equal(torch.rand(4), first[0]) and __import__('random').random() == first[1]


def test_shards_cover_every_item_once():
    for n, world in ((10, 3), (2, 4), (0, 2)):
        items = sorted(i for r in range(world) for i in ShardSampler(n, r, world))
        assert items == list(range(n)) and sum(len(ShardSampler(n, r, world)) for r in range(world)) == n


def test_evaluate_mae_and_predictions(tmp_path):
    dm = GraphDataModule(
        PointCloudDataset(8),
        PointCloudDataset(10, seed=1),
        PointCloudDataset(10, seed=2),
        fiber_node=Fiber({0: 1}),
        fiber_edge=Fiber({0: 1}),
        batch_size=3,
    )
    config = ModelConfig(1, 2, 4, 2, node_feature_dim=1, edge_feature_dim=1, out_channels=8)
    model = SE3TransformerPooled.from_config(config).eval()
    res = evaluate(model, dm, 'test', return_predictions=True)
    y = dm.test_set.targets.double()
    assert res['count'] == 10 and torch.allclose(res['targets'], y)
    assert abs(res['mae'] - (res['predictions'] - y).abs().mean().item()) < 1e-9
    log = JsonlLogger(tmp_path, enabled=True, tensorboard=False, resume=False)
    log.log({'kind': 'step', 'step': 1, 'train_loss': 0.5})
    log.close()
    assert json.loads((tmp_path / 'metrics.jsonl').read_text()) == {'kind': 'step', 'step': 1, 'train_loss': 0.5}
