"""Test scaffolding for the shared reference fixtures (../shared/fixtures beside the repository, or $SE3NB_FIXTURES):
where they are, and how to run a model on the inputs of one."""

import os
from collections.abc import Mapping
from pathlib import Path

from se3nb.nvidia import nvidia_graph


def find_fixtures(kind: str = "nvidia") -> Path | None:
    """The fixture folder `kind` ('nvidia' or 'rfdiffusion'): `$SE3NB_FIXTURES` names the 'nvidia' one (its siblings are
    the others), else `shared/fixtures/<kind>` in a folder above this file or the working directory."""
    env = os.environ.get("SE3NB_FIXTURES")
    places = [Path(env) if kind == "nvidia" else Path(env).parent / kind] if env else []
    for start in (Path(__file__).resolve(), Path.cwd().resolve()):
        places += [p / "shared" / "fixtures" / kind for p in start.parents]
    return next((p for p in places if (p / "MANIFEST.md").exists()), None)


def run_nvidia_fixture(fx: Mapping, model, *, rotated: bool = False):
    """`model` (one that takes NVIDIA's string keys, e.g. from `se3nb.nvidia.from_nvidia`) on the inputs of an NVIDIA
    fixture."""
    g, suffix = fx["graph"], "_rotated" if rotated else ""
    graph = nvidia_graph(g["src"], g["dst"], g["num_nodes"], fx["rel_pos" + suffix], g["batch_num_nodes"])
    return model(graph, fx["node_feats" + suffix], fx["edge_feats" + suffix] or None)
