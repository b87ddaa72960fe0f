"""The benchmark harness works and writes valid JSON (timings are never asserted: machines are noisy)."""

import json

from se3nb.benchmark import Case, loglog_slope, main, random_molecule_batch, run_case


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
