import os
from importlib import metadata

import pytest
import torch


def _triton_major() -> int:  # without importing triton
    try:
        return int(metadata.version('triton').split('.')[0])
    except (metadata.PackageNotFoundError, ValueError):
        return 0


# Without a GPU, the fused attention kernels (tests/test_segment_attention.py) run under Triton's interpreter on CPU
# tensors.
# Triton reads TRITON_INTERPRET once, at its first import, and importing se3nb (torch._dynamo) imports it: so set it
# first.
if not torch.cuda.is_available() and _triton_major() >= 3:
    os.environ.setdefault('TRITON_INTERPRET', '1')

from nvidia_fixtures import find_fixtures  # noqa: E402 (after TRITON_INTERPRET)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CUDA")
    config.addinivalue_line("markers", "slow: over ~10 s on the 2-core CPU")
    config.addinivalue_line("markers", "dgl: needs DGL (dgl==2.1.0 with torch==2.2.1); run by .ci/legacy_dgl.sh")


@pytest.fixture(scope="session")
def nvidia_dir():
    path = find_fixtures("nvidia")
    if path is None:
        pytest.skip("shared NVIDIA fixtures not found (set SE3NB_FIXTURES or keep ../shared beside the repository)")
    return path


@pytest.fixture(scope="session")
def rfdiffusion_dir():
    path = find_fixtures("rfdiffusion")
    if path is None:
        pytest.skip("shared RFdiffusion fixtures not found (keep ../shared beside the repository)")
    return path


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
