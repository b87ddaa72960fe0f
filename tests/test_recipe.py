"The training recipe (se3nb.recipe): NVIDIA's defaults, presets, validation, learning-rate schedules, weight averaging."

import math

import pytest
import torch
from torch import nn

from se3nb.recipe import SCHEDULES, TrainConfig, ema_model, presets, scheduled_lr


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
    assert (
        t.schedule_name == 'cosine_restarts' and t.ema is None and t.time_budget is None
    )  # NVIDIA's schedule by default
    with pytest.raises(ValueError, match='valid presets'):
        presets('fast')
    with pytest.raises(ValueError, match='precision'):
        TrainConfig(precision='fp8')


@pytest.mark.parametrize(
    'options,match',
    [
        ({'schedule': 'step'}, 'schedule must be one of'),
        ({'schedule': 'cosine_restarts', 'time_budget': 60}, "follows epochs"),
        ({'time_budget': 0}, 'time_budget must be > 0'),
        ({'warmup': 1.0}, r'warmup must be in \[0, 1\)'),
        ({'ema': 1.0}, r'ema must be in \(0, 1\)'),
        ({'min_lr': 0.1}, r'min_lr must be in \[0, lr\]'),
        ({'log_every': -1}, 'log_every must be >= 0'),
        ({'epochs': 0}, 'epochs must be >= 1'),
    ],
)
def test_bad_recipes_say_what_is_wrong(options, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**options)


def test_schedule_defaults_follow_the_budget():
    assert TrainConfig(time_budget=600).schedule_name == 'cosine' and TrainConfig().schedule_name == 'cosine_restarts'
    assert TrainConfig(lr=0.004).lowest_lr == pytest.approx(0.0004) and TrainConfig(min_lr=0.0).lowest_lr == 0.0


@pytest.mark.parametrize('schedule', SCHEDULES[1:])
def test_scheduled_lr_warms_up_then_decays(schedule):
    c = TrainConfig(time_budget=100, schedule=schedule, warmup=0.1, lr=0.01, min_lr=0.001)
    assert scheduled_lr(c, 0.0) == pytest.approx(0.001) and scheduled_lr(c, 0.05) == pytest.approx(0.0055)  # warm-up
    assert scheduled_lr(c, 0.1) == pytest.approx(0.01)  # peak at the end of the warm-up
    t = 0.5  # halfway through the decay: progress 0.55
    expect = {'cosine': 0.5 * (1 + math.cos(math.pi * t)), 'linear': 1 - t, 'constant': 1.0}[schedule]
    assert scheduled_lr(c, 0.55) == pytest.approx(0.001 + 0.009 * expect)
    end = {'cosine': 0.001, 'linear': 0.001, 'constant': 0.01}[schedule]
    assert scheduled_lr(c, 1.0) == pytest.approx(end) and scheduled_lr(c, 1.7) == pytest.approx(end)  # clamped
    lrs = [scheduled_lr(c, p / 100) for p in range(10, 101)]
    assert all(a >= b - 1e-15 for a, b in zip(lrs, lrs[1:]))  # never increases after the warm-up
    assert scheduled_lr(TrainConfig(time_budget=1, warmup=0.0, schedule=schedule), 0.0) == pytest.approx(0.002)


def test_ema_follows_the_hand_computed_sequence():
    "e_1 = p_1; e_k = d_k e_(k-1) + (1 - d_k) p_k with d_k = min(decay, k / (9 + k)), for every parameter."
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    decay, average = 0.7, ema_model(model, 0.7)
    expected = None
    for k in range(1, 30):
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn_like(p))
        weights = [p.detach().clone() for p in model.parameters()]
        if expected is None:
            expected = weights
        else:
            d = min(decay, k / (9 + k))
            expected = [d * e + (1 - d) * w for e, w in zip(expected, weights)]
        average.update_parameters(model)
        got = list(average.module.parameters())
        assert all(torch.allclose(g, e, atol=1e-6) for g, e in zip(got, expected)), k
    assert int(average.n_averaged) == 29 and min(decay, 29 / 38) == decay  # warm-up over (k >= 21): d = decay
    # the average is a separate copy: training the model does not move it
    before = [p.clone() for p in average.module.parameters()]
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, average.module.parameters()))


def run_recipes():
    "benchmarks/recipes/run_recipes.py as a module."
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / 'benchmarks' / 'recipes' / 'run_recipes.py'
    spec = importlib.util.spec_from_file_location('run_recipes', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_preset_is_the_best_600s_recipe():
    "The quick preset trains what the recipe campaign (benchmarks/recipes) found best for 600 s of training."
    from se3nb.cli import configs_from_args

    recipes = run_recipes()
    m, d, t = configs_from_args(recipes.RECIPES[recipes.QUICK][0] + ['--time-budget', '600'])
    qm, qd, qt = presets('quick')
    assert qm == m
    assert (qd.task, qd.batch_size, qd.max_train, qd.edges) == (d.task, d.batch_size, d.max_train, d.edges)
    fields = ('time_budget', 'lr', 'betas', 'weight_decay', 'schedule_name', 'warmup', 'lowest_lr', 'ema', 'accumulate')
    assert [getattr(qt, f) for f in fields] == [getattr(t, f) for f in fields]
    assert qt.grad_clip == t.grad_clip and qt.precision == t.precision


def test_each_quick_variant_changes_one_setting():
    "The one-change search around the base recipe: every variant differs from it in exactly the setting it names."
    from dataclasses import asdict

    from se3nb.cli import configs_from_args

    recipes = run_recipes()

    def settings(name):
        m, d, t = configs_from_args(recipes.RECIPES[name][0] + ['--time-budget', '600'])
        flat = {f'model.{k}': v for k, v in asdict(m).items()} | {f'data.{k}': v for k, v in asdict(d).items()}
        return flat | {f'train.{k}': v for k, v in asdict(t).items()}

    quick = settings(recipes.QUICK_BASE)
    changed = {}
    for variant in recipes.QUICK_VARIANTS:
        mine = settings(f'{recipes.QUICK_BASE}-{variant}')
        changed[variant] = {k: v for k, v in mine.items() if quick[k] != v}
    assert changed == {
        'b32': {'data.batch_size': 32},
        'b128': {'data.batch_size': 128},
        'warmup0': {'train.warmup': 0.0},
        'warmup15': {'train.warmup': 0.15},
        'linear': {'train.schedule': 'linear'},
        'min0': {'train.min_lr': 0.0},
        'ema0.998': {'train.ema': 0.998},
        'ema0.9995': {'train.ema': 0.9995},
    }
