"QM9 from the CSV files to the preprocessed store (se3nb.qm9): parsing, targets, bond report, cache, workers, CLI."

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip('rdkit')
import importlib.util

if importlib.util.find_spec('qm9pack') is None:
    pytest.skip('needs the qm9pack wheel', allow_module_level=True)

from se3nb.bonds import BOND_PATHS
from se3nb.qm9 import (
    QM9_NUM_MOLECULES,
    QM9_TASKS,
    QM9FormatError,
    _perceived,
    atomic_write_text,
    bond_report,
    check_task,
    load_qm9,
    qm9_files,
    read_qm9,
)

REPO = Path(__file__).resolve().parents[1]
N_SMALL = 400  # the first molecules of QM9 used by most tests (gdb ids 1..~404)


@pytest.fixture(scope='module')
def store(tmp_path_factory):
    return load_qm9(max_molecules=N_SMALL, cache_dir=tmp_path_factory.mktemp('qm9cache'), progress=False)


def raw_rows(n):
    "The first n rows of the qm9pack CSV as dicts (independent of se3nb's parser)."
    csv.field_size_limit(1 << 28)
    out = []
    with open(qm9_files()[0], newline='') as f:
        for row in csv.DictReader(f):
            out.append(row)
            if len(out) == n:
                break
    return out


def write_csv(path, rows, fieldnames):
    with open(path, 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=fieldnames, quoting=csv.QUOTE_MINIMAL)
        w.writeheader()
        w.writerows(rows)


# ---------------------------------------------------------------- parsing


def test_parse_first_molecules_match_raw_csv():
    rows = raw_rows(50)
    mols = list(read_qm9(max_molecules=50))
    assert len(mols) == 50
    for row, m in zip(rows, mols):
        assert m.name == row['XYZ_file'] and m.gdb_index == int(row['Index']) and m.smiles == row['SMILES']
        assert len(m.elements) == int(row['N_atoms']) and m.pos.shape == (int(row['N_atoms']), 3)
    # methane: the dipole is written '0.' and coordinates like '0.0080009958'
    assert rows[0]['Dipole_debye'] == '0.' and mols[0].props['Dipole_debye'] == 0.0
    assert mols[0].pos[0].tolist() == [-0.0126981359, 1.0858041578, 0.0080009958]


def test_parse_accepts_trailing_dot_numbers_and_names_malformed_rows(tmp_path):
    rows = raw_rows(3)
    fields = list(rows[0].keys())
    rows[1]['XYZ_Ang'] = rows[1]['XYZ_Ang'].replace('-0.0404260543', '0.').replace('1.0241077531', '1.')
    write_csv(tmp_path / 'qm9_part1.csv', rows, fields)
    mols = list(read_qm9(tmp_path))
    assert mols[1].pos[0, :2].tolist() == [0.0, 1.0]
    rows[2]['XYZ_Ang'] = rows[2]['XYZ_Ang'].replace('0.9775395708', 'abc')
    write_csv(tmp_path / 'qm9_part1.csv', rows, fields)
    with pytest.raises(QM9FormatError, match='dsgdb9nsd_000003.xyz'):
        list(read_qm9(tmp_path))


@pytest.mark.parametrize(
    'column,value,msg',
    [
        ('N_atoms', '7', 'N_atoms'),
        ('Elements', "['O','H','Xx']", 'unknown elements'),
        ('HOMO_au', '', 'could not convert'),
        ('XYZ_Ang', '[[1,2,3],[4,5]]', 'coordinates'),
    ],
)
def test_malformed_rows_raise_naming_the_molecule(tmp_path, column, value, msg):
    rows = raw_rows(3)
    rows[2][column] = value
    write_csv(tmp_path / 'qm9_part1.csv', rows, list(rows[0].keys()))
    with pytest.raises(QM9FormatError, match=f"dsgdb9nsd_000003.xyz.*{msg}"):
        list(read_qm9(tmp_path))


def test_missing_columns_and_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match='qm9_part'):
        qm9_files(tmp_path)
    rows = raw_rows(2)
    fields = [f for f in rows[0] if f != 'HOMO_au']
    write_csv(tmp_path / 'qm9_part1.csv', [{k: r[k] for k in fields} for r in rows], fields)
    with pytest.raises(QM9FormatError, match='HOMO_au'):
        list(read_qm9(tmp_path))


def test_user_data_dir_gives_same_store(tmp_path, store):
    rows = raw_rows(120)
    write_csv(tmp_path / 'qm9_part1.csv', rows, list(rows[0].keys()))
    own = load_qm9(tmp_path, cache_dir=tmp_path / 'cache', progress=False)
    assert len(own['num_atoms']) == 120
    n_atoms = int(own['num_atoms'].sum())
    assert torch.equal(own['pos'], store['pos'][:n_atoms]) and torch.equal(own['targets'], store['targets'][:120])


def test_full_qm9_row_count_and_order():
    count, last = 0, 0
    for m in read_qm9():
        assert m.gdb_index > last
        last = m.gdb_index
        count += 1
    assert count == QM9_NUM_MOLECULES and last == 133885


# ---------------------------------------------------------------- bond report


def test_bond_paths_and_fallbacks(store):
    rep = bond_report(store)
    assert rep['molecules'] == N_SMALL and sum(rep['paths'].values()) == N_SMALL
    assert (
        rep['paths']['determine_bonds'] > 0.9 * N_SMALL and rep['paths']['hueckel'] > 0
    )  # the bicyclo cages (105, 106)

    def path_of(gdb):
        return BOND_PATHS[int(store['bond_path'][store['gdb_index'].tolist().index(gdb)])]

    assert path_of(105) == 'hueckel' and path_of(106) == 'hueckel' and path_of(100) == 'determine_bonds'
    assert rep['graph_matches_smiles'] > 0.99


# ---------------------------------------------------------------- targets


def test_targets_units_spot_check_against_raw_csv(store):
    rows = raw_rows(N_SMALL)
    refs = {
        'H': -0.500273,
        'C': -37.846772,
        'N': -54.583861,
        'O': -75.064579,
        'F': -99.718730,
    }  # QM9 atomref U0, Hartree
    for k in (0, 1, 57, 123, 399):
        r, y = rows[k], dict(zip(QM9_TASKS, store['targets'][k].tolist()))
        assert y['mu'] == float(r['Dipole_debye']) and y['alpha'] == float(r['Polarizability_bohr3'])
        assert math.isclose(y['homo'], float(r['HOMO_au']) * 27.211386246, rel_tol=1e-12)
        assert math.isclose(y['gap'], float(r['HOMO_LUMO_gap_au']) * 27.211386246, rel_tol=1e-12)
        assert math.isclose(y['U0'], float(r['InternalEnergy_0K_au']) * 27.211386246, rel_tol=1e-12)
        assert (
            y['Cv'] == float(r['Heatcapacity_Cv_cal_mol_K'])
            and y['A'] == float(r['RotA_GHz'])
            and y['C'] == float(r['RotC_GHz'])
        )
        elements = [e.strip("' ") for e in r['Elements'].strip('[]').split(',')]
        u0_atom = (float(r['InternalEnergy_0K_au']) - sum(refs[e] for e in elements)) * 27.211386246
        assert math.isclose(y['U0_atom'], u0_atom, rel_tol=1e-10)
    # PyG's published atomization energy of methane (U0_atom, eV): -17.1722
    assert abs(store['targets'][0, list(QM9_TASKS).index('U0_atom')].item() + 17.1722) < 1e-3


def test_unknown_task_lists_valid_ones():
    with pytest.raises(ValueError, match='valid tasks: mu, alpha, homo'):
        check_task('energy')
    with pytest.raises(ValueError, match='unknown QM9 task'):
        check_task('HOMO')


# ---------------------------------------------------------------- cache


def test_cache_atomic_stale_and_corrupt(tmp_path, capsys):
    s1 = load_qm9(max_molecules=30, cache_dir=tmp_path, progress=False)
    files = list(tmp_path.glob('qm9_*.pt'))
    assert len(files) == 1 and not list(tmp_path.glob('*.tmp'))
    mtime = files[0].stat().st_mtime_ns
    s2 = load_qm9(max_molecules=30, cache_dir=tmp_path, progress=False)
    assert files[0].stat().st_mtime_ns == mtime and torch.equal(s1['pos'], s2['pos'])  # loaded, not rebuilt
    files[0].write_bytes(b'not a torch file')
    s3 = load_qm9(max_molecules=30, cache_dir=tmp_path, progress=False)
    assert 'unreadable' in capsys.readouterr().err and torch.equal(s3['pos'], s1['pos'])
    bad = dict(s3)
    bad['key'] = dict(bad['key'], se3nb='0.0.0')
    torch.save(bad, files[0])
    load_qm9(max_molecules=30, cache_dir=tmp_path, progress=False)
    assert 'stale' in capsys.readouterr().err
    assert torch.load(files[0], weights_only=True)['key']['se3nb'] != '0.0.0'
    load_qm9(max_molecules=31, cache_dir=tmp_path, progress=False)  # other options: another file
    assert len(list(tmp_path.glob('qm9_*.pt'))) == 2


def test_read_stops_at_max_molecules_and_positions():
    assert [m.position for m in read_qm9(max_molecules=3)] == [0, 1, 2]
    assert [m.position for m in read_qm9(positions={5, 2, 9})] == [2, 5, 9]
    assert list(read_qm9(positions=set())) == []


def test_bond_perception_in_worker_processes_equals_serial():
    mols = list(read_qm9(max_molecules=120))
    serial = list(_perceived(mols, workers=1))
    parallel = list(_perceived(mols, workers=2, chunk_size=25))  # 5 chunks over 2 spawned processes, in order
    assert [m.position for m, _ in parallel] == list(range(120))
    for (_, a), (_, b) in zip(serial, parallel):
        assert (a.bonds == b.bonds).all() and (a.path, a.graph_matches_smiles) == (b.path, b.graph_matches_smiles)


def test_cli_preprocesses_and_reports(tmp_path):
    r = subprocess.run(
        [sys.executable, '-m', 'se3nb.qm9', '--max-molecules', '30', '--cache-dir', str(tmp_path), '--workers', '1'],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(r.stdout)
    assert report['molecules'] == 30 and sum(report['paths'].values()) == 30 and list(tmp_path.glob('qm9_*.pt'))


def test_atomic_write_text_leaves_the_old_file_or_the_new_one(tmp_path, monkeypatch):
    "results.json and predictions go through `atomic_write_text`: a failure mid-write keeps the old file, no temp left."
    path = tmp_path / 'results.json'
    atomic_write_text(path, '{"old": 1}')
    assert path.read_text() == '{"old": 1}'

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, 'replace', crash)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(path, '{"new": 2}')
    assert path.read_text() == '{"old": 1}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['results.json']
    monkeypatch.undo()
    atomic_write_text(path, '{"new": 2}')
    assert path.read_text() == '{"new": 2}'
