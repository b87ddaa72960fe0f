"""se3nb.extensions: build names, reasons a kernel cannot build, and recovery from a build killed half way."""

import os
import select
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import se3nb.extensions as extensions


def test_extension_names_follow_the_source_the_isa_and_the_versions(tmp_path):
    source = tmp_path / 'kernel.cpp'
    source.write_text('int f() { return 1; }\n')
    name = extensions.extension_name(source, 'avx512')
    tag = f"py{sys.version_info[0]}{sys.version_info[1]}_torch{torch.__version__}".replace('.', '_').replace('+', '_')
    assert name.startswith(f'se3nb_kernel_avx512_{tag}_') and name == extensions.extension_name(source, 'avx512')
    assert extensions.extension_name(source, 'avx2') != name  # another instruction set: another build
    source.write_text('int f() { return 2; }\n')
    assert extensions.extension_name(source, 'avx512') != name  # an edited kernel: never the stale binary


def test_build_problems_are_reasons(monkeypatch, tmp_path):
    so2 = extensions._source_path('so2_product.cpp')
    assert so2.is_file() and so2.parent.name == 'csrc'
    monkeypatch.setattr(torch.backends.cpu, 'get_cpu_capability', lambda: 'DEFAULT')  # e.g. ARM
    assert extensions.cpu_isa() is None
    assert extensions._build_problem(so2, None) is None  # portable C++ builds on any CPU
    assert extensions._build_problem(so2, 'avx2') == (
        "no AVX2 or AVX-512 (torch reports CPU capability DEFAULT); the C++ kernels are for x86 CPUs"
    )
    monkeypatch.setattr(torch.backends.cpu, 'get_cpu_capability', lambda: 'AVX2')
    assert extensions.cpu_isa() == 'avx2'
    assert extensions._build_problem(so2, 'avx512') == (
        "this CPU does not run avx512 code (torch reports CPU capability AVX2)"
    )
    assert (
        extensions._build_problem(tmp_path / 'gone.cpp', 'avx2')
        == f"source missing: {tmp_path / 'gone.cpp'} (reinstall se3nb)"
    )
    monkeypatch.setattr(torch.backends.cpu, 'get_cpu_capability', lambda: 'AVX512_BF16')
    assert (
        extensions.cpu_isa() == 'avx512' and extensions._build_problem(so2, 'avx2') is None
    )  # AVX-512 CPUs run AVX2 code
    monkeypatch.setenv('CXX', 'no-such-compiler-xyz')
    assert (
        extensions._build_problem(so2, 'avx2')
        == "compiler missing: no no-such-compiler-xyz on PATH (install g++, or set CXX)"
    )
    with pytest.raises(
        ValueError, match=r"unknown instruction set 'sse'; expected one of avx512, avx2, or None \(portable\)"
    ):
        extensions.load_extension(so2, 'sse')


_HOLD_BUILD = """
import sys, time
from pathlib import Path
from se3nb.extensions import _build_lock
directory = Path(sys.argv[1])
with _build_lock(directory):
    (directory / 'lock').touch()  # torch's lock of a build in progress
    print('building', flush=True)
    time.sleep(600)
"""

_LOAD = """
import sys
from se3nb.extensions import load_extension
module, why = load_extension('so2_product.cpp', sys.argv[1])
assert module is not None, why
print(module.__file__)
"""


def _line_within(stream, seconds: float) -> str:  # the next line a child process writes, or '' after `seconds`
    ready, _, _ = select.select([stream], [], [], seconds)
    return stream.readline() if ready else ''


def test_a_build_killed_half_way_does_not_block_later_builds(tmp_path):
    "A process killed while building leaves torch's `lock`; the next process must build, not wait forever (it did)."
    isa = extensions.cpu_isa()
    module, why = extensions.load_extension('so2_product.cpp', isa or 'avx2')
    if module is None:
        pytest.skip(f"the C++ kernels do not build here: {why}")
    # a private copy of the built extension: other processes using the shared build directory (a second test run,
    # a benchmark) must not take or clear the lock this test stages
    built = Path(module.__file__)
    directory = tmp_path / built.parent.name
    shutil.copytree(built.parent, directory)
    (directory / 'lock').unlink(missing_ok=True)
    env = {**os.environ, 'TORCH_EXTENSIONS_DIR': str(tmp_path)}
    holder = subprocess.Popen(
        [sys.executable, '-c', _HOLD_BUILD, str(directory)], stdout=subprocess.PIPE, text=True, env=env
    )
    loader = None
    try:
        assert _line_within(holder.stdout, 120) == 'building\n'
        loader = subprocess.Popen(
            [sys.executable, '-c', _LOAD, isa], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        assert 'waiting for another process to build' in _line_within(loader.stderr, 120)  # the build is alive: wait
        holder.kill()  # SIGKILL in the middle of the "build": torch's lock stays behind
        holder.wait(30)  # (the loader may already have found the stale lock: no assert on it here)
        out, err = loader.communicate(timeout=180)
        assert loader.returncode == 0, err[-3000:]
        assert 'removed' in err and 'left behind by an interrupted build' in err
        assert Path(out.strip()) == directory / built.name
    finally:
        for process in (holder, loader):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait(30)


# Two CPU forward passes of a two-layer model on 400 random points, then the minor page faults of three more passes
# (steady state) and the allocator line of backend_report, as JSON.
_FAULTS = """
import json, resource, sys
import torch
from se3nb.backends import backend_report
from se3nb.fiber import Fiber
from se3nb.graph import radius_graph
from se3nb.model import SE3Transformer
torch.manual_seed(0)
torch.set_num_threads(1)
pos = torch.randn(400, 3) * 3.0
graph = radius_graph(pos, 2.5)
model = SE3Transformer(2, Fiber({0: 8}), Fiber({0: 16, 1: 16, 2: 16}), Fiber({0: 8}), num_heads=4, channels_div=2,
                       return_type=0)
def memory_line():
    return next(line for line in backend_report().splitlines() if line.startswith('CPU memory:'))
before = memory_line()
with torch.no_grad():
    for _ in range(2):  # the heap grows to what a pass needs
        model(graph, {0: torch.randn(400, 8, 1)})
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        model(graph, {0: torch.randn(400, 8, 1)})
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start) / 3
print(json.dumps({'before': before, 'after': memory_line(), 'faults': faults}))
"""


def _faults_run(**env) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ('SE3NB_MALLOC', 'GLIBC_TUNABLES', 'LD_PRELOAD')}
    return subprocess.run([sys.executable, '-c', _FAULTS], capture_output=True, text=True, env=clean | env, timeout=300)


@pytest.mark.skipif(sys.platform != 'linux', reason="glibc's malloc policy: Linux only")
def test_the_first_cpu_pass_keeps_freed_memory_and_the_page_faults_stop():
    import json

    # glibc raises its mmap threshold after each free of a mapped block, so whether its default faults depends on the
    # order of a pass's allocations (since stop 27's fewer temporaries: 0-4,600 faults per pass, run to run); its fixed
    # starting threshold (128 KB, as GLIBC_TUNABLES sets it) shows what every block above it costs when nothing is kept
    runs = {
        'retain': _faults_run(SE3NB_MALLOC='retain'),
        'default': _faults_run(SE3NB_MALLOC='default', GLIBC_TUNABLES='glibc.malloc.mmap_threshold=131072'),
    }
    for run in runs.values():
        assert run.returncode == 0, run.stderr[-3000:]
    kept, default = (json.loads(runs[c].stdout.splitlines()[-1]) for c in ('retain', 'default'))
    assert kept['before'] == 'CPU memory: not set yet (set on the first CPU forward pass)'
    assert kept['after'] == 'CPU memory: kept: mmap threshold 32 MB, trim threshold 64 MB'
    assert default['after'] == "CPU memory: glibc's default (SE3NB_MALLOC=default)"
    # the fixed threshold maps fresh pages for the large blocks of every pass (7,600-7,900 faults here); kept blocks are
    # reused (0-380 faults: Python's own arenas, the heap's growth)
    assert default['faults'] > 2000 and kept['faults'] < default['faults'] / 5, (kept, default)
    bad = _faults_run(SE3NB_MALLOC='jemalloc')
    assert bad.returncode != 0 and "SE3NB_MALLOC='jemalloc': expected 'retain'" in bad.stderr
