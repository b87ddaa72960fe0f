"""The package's import structure: notebooks import only from lower numbers (so no cycles), and the core
(fiber .. model) never imports what is NVIDIA-, DGL-, data- or training-shaped."""

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / 'se3nb'
NOT_CORE = (
    'nvidia',
    'nvidia_inputs',
    'nvidia_modules',
    'compat',
    'dgl_interop',
    'dgl',
    'data',
    'qm9',
    'train',
    'benchmark',
)


def notebook_order() -> dict[str, tuple[int, str]]:
    "Module name -> (notebook number, letter suffix) from `#| default_exp` of nbs/NN[x]_name.ipynb."
    order = {}
    for nb in sorted((ROOT / 'nbs').glob('[0-9][0-9]*.ipynb')):
        number, letter = re.match(r'(\d\d)([a-z]?)_', nb.name).groups()
        for cell in json.loads(nb.read_text())['cells']:
            source = ''.join(cell['source'])
            for module in re.findall(r'^#\|\s*default_exp\s+(\S+)', source, flags=re.M):
                order[module] = (int(number), letter)
    return order


def se3nb_imports(path: Path) -> set[str]:
    "Names of the se3nb modules a module imports anywhere in its code (function-local imports included)."
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level == 1:  # from .x import y  /  from . import x
                found |= {base.split('.')[0]} if base else {a.name for a in node.names}
            elif base == 'se3nb':  # from se3nb import x (a submodule, or a name of __init__)
                found |= {a.name for a in node.names if (PKG / f'{a.name}.py').exists()}
            elif base.startswith('se3nb.'):
                found.add(base.split('.')[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split('.')[1] for a in node.names if a.name.startswith('se3nb.')}
            found |= {a.name for a in node.names if a.name == 'dgl'}
    return found - {''}


def test_notebooks_import_only_from_lower_numbers():
    "A notebook imports only from lower numbers, except a module that gathers its parts (`nvidia` from `nvidia_*`)."
    order = notebook_order()
    assert order, 'no notebooks with #| default_exp found'
    problems = []
    for module, rank in order.items():
        path = PKG / f'{module}.py'
        if not path.exists():
            continue
        for dep in se3nb_imports(path) - {module}:
            if dep.startswith(f'{module}_'):  # its own parts (se3nb.nvidia re-exports se3nb.nvidia_inputs, ...)
                continue
            if dep in order and order[dep] >= rank:
                problems.append(
                    f'se3nb.{module} ({rank[0]:02d}{rank[1]}) imports se3nb.{dep} ({order[dep][0]:02d}{order[dep][1]})'
                )
    assert not problems, 'a notebook may import only from lower numbers:\n' + '\n'.join(problems)


def test_no_import_cycles():
    graph = {p.stem: se3nb_imports(p) - {p.stem} for p in PKG.glob('*.py') if p.stem not in ('__init__', '_modidx')}
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(module: str, path: list[str]):
        state[module] = 1
        for dep in sorted(graph.get(module, ())):
            if state.get(dep) == 1:
                pytest.fail('import cycle: ' + ' -> '.join(path[path.index(dep) :] + [dep]))
            if dep in graph and not state.get(dep):
                visit(dep, path + [dep])
        state[module] = 2

    for module in sorted(graph):
        if not state.get(module):
            visit(module, [module])


def test_core_modules_never_import_nvidia_dgl_data_or_training():
    order = notebook_order()
    core = [m for m, (number, letter) in order.items() if number < 7 or (number, letter) == (7, '')]
    assert 'model' in core and 'fiber' in core
    problems = {m: sorted(se3nb_imports(PKG / f'{m}.py') & set(NOT_CORE)) for m in core}
    assert not any(problems.values()), (
        f'core modules importing non-core ones: { {m: p for m, p in problems.items() if p} }'
    )


def test_importing_the_model_loads_no_nvidia_or_dgl_module():
    names = ('se3nb.nvidia', 'se3nb.nvidia_inputs', 'se3nb.nvidia_modules', 'se3nb.compat', 'se3nb.dgl_interop', 'dgl')
    code = f"import se3nb.model, sys; bad = [m for m in {names!r} if m in sys.modules]; assert not bad, bad"
    run = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]


def test_the_public_names_load_on_first_use():
    "`import se3nb` loads no training or data code; each public name then resolves to the object of its module."
    code = (
        "import sys, se3nb; heavy = [m for m in ('se3nb.train', 'se3nb.data', 'se3nb.cli', 'se3nb.model') "
        "if m in sys.modules]; assert not heavy, heavy\n"
        "import importlib\n"
        "for name, module in se3nb._PUBLIC.items():\n"
        "    assert getattr(se3nb, name) is getattr(importlib.import_module(module), name), name\n"
        "ns = {}; exec('from se3nb import *', ns); assert set(se3nb.__all__) <= set(ns), set(se3nb.__all__) - set(ns)\n"
        "assert set(se3nb.__all__) <= set(dir(se3nb))\n"
        "assert se3nb.recipe.scheduled_lr, 'submodules load on attribute access too'\n"
        "try:\n    se3nb.no_such_name\nexcept AttributeError as e:\n    assert 'public names' in str(e), e\n"
        "else:\n    raise AssertionError('no AttributeError')"
    )
    run = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]


@pytest.mark.parametrize('module', ['se3nb.train', 'se3nb.qm9'])
def test_python_m_runs_the_module_without_runpy_warning(module):
    "The README's `python -m se3nb.train` / `-m se3nb.qm9`: a RuntimeWarning (module imported twice) fails the run."
    run = subprocess.run(
        [sys.executable, '-W', 'error::RuntimeWarning', '-m', module, '--help'],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert 'usage' in run.stdout.lower(), run.stdout[-1000:]
