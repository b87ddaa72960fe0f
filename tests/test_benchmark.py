"""The benchmark harness and suite work and write valid JSON (timings are never asserted: machines are noisy)."""

import json

import pytest

from se3nb.benchmark import (
    STAGES,
    Case,
    loglog_slope,
    _stage_of,
    machine_info,
    profile_training_step,
    random_molecule_batch,
    run_case,
    run_case_in_subprocess,
    stage_scopes,
)
from se3nb.benchmark_suite import main


def test_smoke_suite_writes_results(tmp_path, capsys):
    main(['--smoke', '--out-dir', str(tmp_path)])
    report = json.loads((tmp_path / 'results.json').read_text())
    for key in (
        'se3nb',
        'torch',
        'e3nn',
        'device',
        'device_name',
        'threads',
        'date',
        'results',
        'stage_profile_ms',
        'loglog_slopes',
        'machine',
    ):
        assert key in report, key
    for kind in ('train', 'inference', 'memory', 'scale_atoms', 'scale_max_degree', 'scale_channels'):
        for r in report['results'][kind]:
            assert r['mean_ms'] > 0 and r['molecules_per_ms'] > 0 and r['peak_memory_gb'] > 0
            assert {'mode', 'batch_size', 'precision', 'device'} <= set(r['case'])
    assert {'kernel', 'radial_mlp', 'optimizer'} <= set(report['stage_profile_ms'])
    assert sorted(p.name for p in tmp_path.glob('*.png')) == [
        'scale_atoms.png',
        'scale_channels.png',
        'scale_max_degree.png',
        'scale_radius_atoms.png',
        'stage_profile.png',
    ]
    assert 'mol/ms' in capsys.readouterr().out


def test_random_molecules_have_qm9_statistics():
    graph, node, edge = random_molecule_batch(200, atoms=18)
    assert 16 < graph.num_nodes / 200 < 20 and abs(graph.num_edges / graph.num_nodes - 2) < 0.2
    assert node[0][:, :5].sum(1).eq(1).all() and edge[0][:, :, 0].sum(1).eq(1).all()


def test_fixture_case_and_slope(nvidia_dir):
    r = run_case(Case(mode='inference', fixture=str(nvidia_dir / 'qm9_batch8.pt'), steps=1, warmup=0, num_layers=1))
    assert r['molecules'] == 8 and r['atoms'] == 93 and r['edges'] == 182
    assert abs(loglog_slope([1, 10, 100], [2, 20, 200]) - 1) < 1e-9


def test_case_in_a_fresh_process_reports_its_own_memory():
    r = run_case_in_subprocess(Case(mode='inference', batch_size=2, steps=1, warmup=0, num_layers=1, num_channels=4))
    assert r['molecules'] == 2 and r['peak_memory_gb'] > 0 and r['memory_kind'] == 'peak RSS of the process'


def test_machine_info_names_the_cpu_and_the_backends():
    info = machine_info()
    assert info['cpu_model'] and info['cpu_capability'] and info['threads'] >= 1
    assert 'so2_product' in info['backends'] and 'conv' in info['backends']


def test_stage_scopes_wrap_every_stage_and_restore_the_model():
    from se3nb.attention import SE3Attention
    from se3nb.conv import TFNConv

    forward, geometry = SE3Attention.forward, TFNConv.__dict__['geometry']
    with stage_scopes({**STAGES, 'geometry': ['se3nb.conv:TFNConv.geometry']}):
        assert SE3Attention.forward is not forward
        assert isinstance(TFNConv.__dict__['geometry'], staticmethod) and TFNConv.__dict__['geometry'] is not geometry
    assert SE3Attention.forward is forward and TFNConv.__dict__['geometry'] is geometry
    assert set(STAGES) == {'geometry', 'radial_mlp', 'kernel', 'aggregation', 'attention', 'norm', 'channel_mix'}


def test_stage_scopes_name_a_missing_target():
    with pytest.raises(LookupError, match="stage 'kernel': se3nb.conv:TFNConv.no_such_method"):
        with stage_scopes({'kernel': ['se3nb.conv:TFNConv.no_such_method']}):
            pass


def _autograd_functions() -> list[type]:  # every torch.autograd.Function that se3nb's modules define
    import importlib
    import pkgutil

    import torch

    import se3nb

    for module in pkgutil.iter_modules(se3nb.__path__):
        try:
            importlib.import_module(f"se3nb.{module.name}")
        except ImportError:  # an optional dependency this environment lacks
            pass
    found, todo = [], [torch.autograd.Function]
    while todo:
        for sub in todo.pop().__subclasses__():
            todo.append(sub)
            found += [sub] if sub.__module__.startswith("se3nb.") else []
    return sorted(set(found), key=lambda f: f"{f.__module__}.{f.__name__}")


def test_every_autograd_function_of_se3nb_has_a_backward_stage():
    """The C++ and Triton passes are autograd Functions; without a rule in `_BACKWARD_STAGES` their backward counts as
    'other backward' and the stage profile hides where the time goes."""
    functions = _autograd_functions()
    assert len(functions) >= 10, [f.__name__ for f in functions]
    for function in functions:
        stage = _stage_of([f"autograd::engine::evaluate_function: {function.__name__}Backward"])
        assert stage in STAGES, f"{function.__module__}.{function.__name__}: backward counted as {stage!r}"


def test_stage_profile_of_a_training_step_names_attention_and_channel_mixing():
    case = Case(batch_size=2, num_layers=1, num_degrees=2, num_channels=4)  # threads=None: torch's threads unchanged
    prof = profile_training_step(case)
    assert prof["attention"] > 0 and prof["channel_mix"] > 0 and prof["kernel"] > 0, prof
