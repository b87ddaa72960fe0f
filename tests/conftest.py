import pytest
import torch

from se3nb.compat import find_nvidia_fixtures


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CUDA")
    config.addinivalue_line("markers", "slow: over ~10 s on the 2-core CPU")
    config.addinivalue_line("markers", "dgl: needs DGL (dgl==2.1.0 with torch==2.2.1); run by .ci/legacy_dgl.sh")


@pytest.fixture(scope="session")
def nvidia_dir():
    path = find_nvidia_fixtures()
    if path is None:
        pytest.skip("shared NVIDIA fixtures not found (set SE3NB_FIXTURES or keep ../shared beside the repository)")
    return path


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
