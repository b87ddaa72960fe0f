"Graph data (se3nb.data): QM9 features, batches built at once, split, scaling, data modules, loaders, .xyz files."

import math
import random
from dataclasses import replace

import pytest
import torch

pytest.importorskip('rdkit')
import importlib.util

if importlib.util.find_spec('qm9pack') is None:
    pytest.skip('needs the qm9pack wheel', allow_module_level=True)

from se3nb.backends import override
from se3nb.data import (
    QM9_SPLIT_SIZES,
    DataConfig,
    GraphDataModule,
    PointCloudDataset,
    QM9DataModule,
    QM9Dataset,
    collate_graphs,
    qm9_split,
    read_xyz,
    split_sizes,
    xyz_sample,
)
from se3nb.fiber import Fiber
from se3nb.graph import Graph, batch_graphs
from se3nb.model import ModelConfig, SE3TransformerPooled
from se3nb.qm9 import HARTREE_TO_EV, QM9_NUM_MOLECULES, QM9_TASKS, load_qm9, qm9_targets, read_qm9

N_SMALL = 400  # the first molecules of QM9 used by most tests (gdb ids 1..~404, includes the fixtures' 100..187)


@pytest.fixture(scope='module')
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp('qm9cache')


@pytest.fixture(scope='module')
def store(cache_dir):
    return load_qm9(max_molecules=N_SMALL, cache_dir=cache_dir, progress=False)


def tiny_model() -> SE3TransformerPooled:
    return SE3TransformerPooled.from_config(
        ModelConfig(num_layers=1, num_degrees=3, num_channels=4, num_heads=2, out_channels=8)
    )


# ---------------------------------------------------------------- features vs NVIDIA's reference pipeline


@pytest.mark.parametrize('name', ['qm9_batch8.pt', 'qm9_batch64.pt'])
def test_features_identical_to_reference_fixture(store, name, nvidia_dir):
    if not (nvidia_dir / name).exists():
        pytest.skip('reference fixtures not available')
    fx = torch.load(nvidia_dir / name, weights_only=True)
    ds = QM9Dataset(store)
    gdb = store['gdb_index'].tolist()
    b = collate_graphs([ds[gdb.index(int(g))] for g in fx['qm9_index']])
    assert torch.equal(ds.batch([gdb.index(int(g)) for g in fx['qm9_index']]).graph.edge_index, b.graph.edge_index)
    assert torch.equal(b.graph.batch_num_nodes, fx['batch_num_nodes']) and torch.equal(
        b.graph.batch_num_edges, fx['batch_num_edges']
    )
    assert torch.equal(b.graph.src, fx['src']) and torch.equal(b.graph.dst, fx['dst'])
    assert torch.equal(b.graph.pos, fx['pos']) and torch.equal(b.graph.rel_pos, fx['rel_pos'])
    assert torch.equal(b.node_feats[0], fx['node_feats']['0']) and torch.equal(b.edge_feats[0], fx['edge_feats']['0'])
    k = [gdb.index(int(g)) for g in fx['qm9_index']]
    for task, key in (('homo', 'homo_au'), ('lumo', 'lumo_au'), ('gap', 'gap_au')):
        assert torch.allclose(
            store['targets'][k, list(QM9_TASKS).index(task)], fx['targets'][key] * HARTREE_TO_EV, rtol=0, atol=1e-12
        )


def test_radius_graph_edges(store):
    bonds = QM9Dataset(store)[150]
    rad = QM9Dataset(store, edges='radius', cutoff=1.6)[150]
    d = (rad.pos[rad.edge_index[1]] - rad.pos[rad.edge_index[0]]).norm(dim=-1)
    assert (d < 1.6).all() and rad.edge_feats[0].shape == (rad.edge_index.shape[1], 4, 1)
    # bonded pairs keep their bond one-hot; others are zeros
    bonded = {tuple(e) for e in bonds.edge_index.T.tolist()}
    for e, f in zip(rad.edge_index.T.tolist(), rad.edge_feats[0][:, :, 0]):
        assert (f.sum() == 1) == (tuple(e) in bonded)
    big = QM9Dataset(store, edges='radius', cutoff=100.0)[150]
    n = big.pos.shape[0]
    assert big.edge_index.shape[1] == n * (n - 1)


@pytest.mark.parametrize('options', [{}, {'edges': 'radius', 'cutoff': 2.5}, {'edges': 'radius', 'max_neighbours': 4}])
def test_batch_at_once_equals_collated_samples(store, options):
    ds, rng = QM9Dataset(store, **options), random.Random(0)
    for size in (1, 7, 64):
        items = rng.sample(range(len(ds)), size)
        b, ref = ds.batch(items), collate_graphs([ds[i] for i in items])
        for name in ('edge_index', 'pos', 'rel_pos', 'batch_num_nodes', 'batch_num_edges'):
            assert torch.equal(getattr(b.graph, name), getattr(ref.graph, name)), name
        assert torch.equal(b.node_feats[0], ref.node_feats[0]) and torch.equal(b.edge_feats[0], ref.edge_feats[0])
        assert torch.equal(b.targets, ref.targets) and b.graph.validate() is None
    with pytest.raises(ValueError, match='one molecule'):
        from se3nb.data import molecule_sample

        molecule_sample(ds.batch([0, 1]))


def test_xyz_files(tmp_path, store):
    mol = next(m for m in read_qm9(max_molecules=170) if m.gdb_index == 165)
    lines = [str(len(mol.elements)), mol.name] + [
        f"{e} {float(x)!r} {float(y)!r} {float(z)!r}" for e, (x, y, z) in zip(mol.elements, mol.pos)
    ]
    (tmp_path / 'm.xyz').write_text('\n'.join(lines) + '\n')
    sample, ref = xyz_sample(tmp_path / 'm.xyz'), QM9Dataset(store)[store['gdb_index'].tolist().index(165)]
    assert torch.equal(sample.edge_index, ref.edge_index) and torch.equal(sample.edge_feats[0], ref.edge_feats[0])
    assert torch.equal(sample.pos, ref.pos) and torch.isnan(sample.target)
    (tmp_path / 'bad.xyz').write_text('3\n\nC 0 0 0\nH 1 0\n')
    with pytest.raises(ValueError, match='bad.xyz'):
        read_xyz(tmp_path / 'bad.xyz')
    (tmp_path / 'si.xyz').write_text('1\n\nSi 0 0 0\n')
    with pytest.raises(ValueError, match='not in QM9'):
        read_xyz(tmp_path / 'si.xyz')


# ---------------------------------------------------------------- split


def test_split_sizes_and_determinism():
    tr, va, te = qm9_split()
    assert (len(tr), len(va), len(te)) == QM9_SPLIT_SIZES == (100_000, 17_748, 13_083)
    assert sorted(tr + va + te) == list(range(QM9_NUM_MOLECULES))
    perm = torch.randperm(
        QM9_NUM_MOLECULES, generator=torch.Generator().manual_seed(0)
    ).tolist()  # random_split's definition
    assert tr == perm[:100_000] and te == perm[-13_083:]
    assert qm9_split() == (tr, va, te) and qm9_split(seed=1)[0] != tr
    assert split_sizes(1000) == (764, 136, 100)


def test_unknown_task_is_an_error():
    with pytest.raises(ValueError, match='unknown QM9 task'):
        DataConfig(task='HOMO')
    with pytest.raises(ValueError, match='batch_size must be >= 1, got 0'):
        DataConfig(batch_size=0)


def test_data_module_scaling_and_subsets(cache_dir):
    dm = QM9DataModule(
        DataConfig(
            max_molecules=N_SMALL, cache_dir=str(cache_dir), progress=False, max_train=50, max_val=20, max_test=10
        )
    )
    assert len(dm.train_set) == 50 and len(dm.val_set) == 20 and len(dm.test_set) == 10
    full = QM9DataModule(DataConfig(max_molecules=N_SMALL, cache_dir=str(cache_dir), progress=False))
    assert len(full.train_set) + len(full.val_set) + len(full.test_set) == N_SMALL
    y = full.train_set.targets
    assert math.isclose(full.scaler.mean, y.mean().item()) and math.isclose(full.scaler.std, y.std().item())
    z = full.scaler.standardize(y)
    assert abs(z.mean().item()) < 1e-9 and abs(z.std().item() - 1) < 1e-9
    assert torch.allclose(full.scaler.unstandardize(z), y)
    assert full.target_unit == 'eV' and full.mean_predictor_mae() > 0


# ---------------------------------------------------------------- batching


def test_collate_equals_batch_graphs_and_loader_geometry(store, cache_dir):
    ds = QM9Dataset(store)
    samples = [ds[i] for i in range(5, 12)]
    b = collate_graphs(samples)
    ref = batch_graphs([Graph(s.edge_index, s.pos.shape[0], pos=s.pos) for s in samples])
    assert torch.equal(b.graph.edge_index, ref.edge_index) and torch.equal(b.graph.rel_pos, ref.rel_pos)
    assert torch.equal(b.graph.batch_num_nodes, ref.batch_num_nodes) and b.graph.validate() is None
    assert b.targets.shape == (7,) and b.node_feats[0].shape == (b.graph.num_nodes, 6, 1)
    b2 = b.to('cpu')
    assert torch.equal(b2.graph.edge_index, b.graph.edge_index)
    # the geometry the loader adds is the model's: edge frames (SO(2) convolutions, bonds paired) or the reference bases
    config = DataConfig(max_molecules=N_SMALL, cache_dir=str(cache_dir), progress=False, batch_size=7)
    dm = QM9DataModule(replace(config, precompute_geometry=True))
    with pytest.raises(RuntimeError, match='use_geometry_of'):
        dm.dataloader('val')
    dm.use_geometry_of(tiny_model())
    frames = next(iter(dm.dataloader('val'))).geometry
    assert type(frames).__name__ == 'EdgeFrames' and frames.num_edges == 2 * frames.num_slots and frames.max_degree == 2
    with override(conv='reference'):  # the reference convolutions (04_conv) work from bases
        model = tiny_model()
    dm.use_geometry_of(model)
    batch = next(iter(dm.dataloader('val')))
    bases = batch.geometry
    assert type(bases).__name__ == 'Bases' and bases.num_edges == batch.graph.num_edges and bases.max_degree == 2
    assert len(bases._cache) == len(model.transformer.basis_keys)
    assert batch.to('cpu').geometry.num_edges == bases.num_edges


def test_dataloader_with_workers_and_sampler(cache_dir):
    dm = QM9DataModule(
        DataConfig(
            max_molecules=N_SMALL,
            cache_dir=str(cache_dir),
            progress=False,
            batch_size=32,
            num_workers=2,
            precompute_geometry=True,
        )
    )
    dm.use_geometry_of(tiny_model())
    sampler = torch.utils.data.distributed.DistributedSampler(
        dm.train_set, num_replicas=2, rank=1, shuffle=True, seed=0
    )
    seen = 0
    for batch in dm.dataloader('train', sampler=sampler):
        assert batch.geometry is not None and batch.geometry.num_edges == batch.graph.num_edges
        seen += batch.num_graphs
    assert seen == math.ceil(len(dm.train_set) / 2)


def test_custom_dataset_module():
    dm = GraphDataModule(
        PointCloudDataset(20),
        PointCloudDataset(8, seed=1),
        PointCloudDataset(8, seed=2),
        fiber_node=Fiber({0: 1}),
        fiber_edge=Fiber({0: 1}),
        batch_size=4,
    )
    b = next(iter(dm.dataloader('val')))
    assert b.num_graphs == 4 and b.targets.shape == (4,)
    dm.fiber_node.check(b.node_feats)
    dm.fiber_edge.check(b.edge_feats)
    with pytest.raises(ValueError, match='split must be one of'):
        dm.dataset('validation')


def test_subset_of_nvidia_split_preprocesses_only_what_it_uses(tmp_path):
    dm = QM9DataModule(DataConfig(cache_dir=str(tmp_path), progress=False, max_train=40, max_val=5, max_test=5))
    tr, va, te = qm9_split()
    assert dm.train_set.positions.tolist() == tr[:40] and dm.test_set.positions.tolist() == te[:5]
    assert sorted(dm.store['position'].tolist()) == sorted(tr[:40] + va[:5] + te[:5])
    p = te[3]
    raw = next(read_qm9(positions={p}))
    assert raw.position == p and dm.test_set.targets[3].item() == qm9_targets(raw)[2]
    assert torch.equal(dm.test_set[3].pos, torch.from_numpy(raw.pos).float())
    with pytest.raises(IndexError, match='not in this preprocessed store'):
        QM9Dataset(dm.store, [te[10]])
