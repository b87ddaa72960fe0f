"""The old module names `se3nb.compat` and `se3nb.dgl_interop` (before `se3nb.nvidia`): every old name still works, is
the object `se3nb.nvidia` has, and warns with a DeprecationWarning naming the replacement; old code runs unchanged."""

import subprocess
import sys
import warnings

import pytest
import torch

import se3nb.compat
import se3nb.dgl_interop
import se3nb.nvidia

COMPAT = """MODEL_CLASSES nvidia_key_to_se3nb se3nb_key_to_nvidia nvidia_fuse_level build_from_nvidia_kwargs
load_nvidia_state_dict from_nvidia to_nvidia_state_dict nvidia_graph""".split()
DGL_INTEROP = """is_dgl_graph from_dgl to_dgl as_graph NVIDIACompatModel nvidia_optimizer_state_to_se3nb
se3nb_optimizer_state_to_nvidia NVIDIACheckpoint load_nvidia_checkpoint save_nvidia_checkpoint""".split()


@pytest.mark.parametrize(
    "module,name", [(se3nb.compat, n) for n in COMPAT] + [(se3nb.dgl_interop, n) for n in DGL_INTEROP]
)
def test_old_name_warns_and_is_the_new_object(module, name):
    with pytest.warns(DeprecationWarning, match=rf"{module.__name__}\.{name} is deprecated: use se3nb\.nvidia\.{name}"):
        old = getattr(module, name)
    assert old is getattr(se3nb.nvidia, name)


def test_from_import_warns_at_the_callers_line():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from se3nb.compat import from_nvidia  # noqa: F401
    assert len(caught) == 1 and caught[0].category is DeprecationWarning and caught[0].filename == __file__


def test_unknown_names_are_attribute_errors():
    with pytest.raises(AttributeError, match="module 'se3nb.compat' has no attribute 'SE3Transformer'"):
        se3nb.compat.SE3Transformer
    with pytest.raises(AttributeError, match="module 'se3nb.dgl_interop' has no attribute 'nope'"):
        se3nb.dgl_interop.nope


def test_importing_the_old_modules_is_silent_and_lazy():
    """Importing the old modules warns about nothing and imports neither se3nb.nvidia nor DGL; only a name does."""
    code = (
        "import sys, warnings; warnings.simplefilter('error'); import se3nb.compat, se3nb.dgl_interop; "
        "assert 'se3nb.nvidia' not in sys.modules and 'dgl' not in sys.modules, sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_old_user_code_runs_unchanged(nvidia_dir):
    """The README's and migration notebook's old calls: from_nvidia with NVIDIA's string keys, then with integer keys,
    the state_dict back in NVIDIA's names, NVIDIACompatModel and the fixture helpers that were in the library."""
    with pytest.warns(DeprecationWarning):
        from se3nb.compat import (
            find_nvidia_fixtures,
            from_nvidia,
            nvidia_graph,
            run_nvidia_fixture,
            to_nvidia_state_dict,
        )
        from se3nb.dgl_interop import NVIDIACompatModel
    assert find_nvidia_fixtures().resolve() == nvidia_dir.resolve()
    fx = torch.load(nvidia_dir / "rf_like_partial.pt", weights_only=True)
    model = from_nvidia(fx["model"], fx["kwargs"], fx["state_dict"]).eval()
    g = fx["graph"]
    graph = nvidia_graph(g["src"], g["dst"], g["num_nodes"], fx["rel_pos"], g["batch_num_nodes"])
    with torch.no_grad():
        out_str = model(graph, fx["node_feats"], fx["edge_feats"])
        out_int = model(graph, {int(k): v for k, v in fx["node_feats"].items()}, {0: fx["edge_feats"]["0"]})
        assert list(out_str) == ["0", "1"] and list(out_int) == [0, 1]
        assert all(torch.equal(out_str[str(l)], out_int[l]) for l in out_int)
        assert max((out_str[k] - fx["output"][k]).abs().max().item() for k in fx["output"]) < 3.8e-4
        assert torch.equal(run_nvidia_fixture(fx, model)["1"], out_str["1"])
        compat = NVIDIACompatModel(fx["model"], fx["kwargs"], fx["state_dict"]).eval()
        assert all(torch.equal(compat(graph, fx["node_feats"], fx["edge_feats"])[k], out_str[k]) for k in out_str)
    assert set(to_nvidia_state_dict(model)) == set(fx["state_dict"])
