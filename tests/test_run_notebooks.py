"""Notebook outputs and run notebooks.

- every papermill run notebook (nbs/runs/*.ipynb, found by glob) runs in smoke mode (smoke=True, out_dir=a tmp dir); a
  failing cell fails the test with the notebook's name and the cell's traceback;
- `make check-nbs` on the committed tutorial notebooks: outputs current (stamped by `make run-nbs`), plots present;
- the tooling itself (tools/docs/run_nbs.py, check_nbs.py) on small notebooks made here.
"""

import copy
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'tools' / 'docs'))
import nbtools  # noqa: E402
import run_nbs  # noqa: E402

RUN_NBS = nbtools.run_notebooks()


def _parameters(nb) -> str | None:
    return next((c.source for c in nb.cells if 'parameters' in c.get('metadata', {}).get('tags', [])), None)


@pytest.mark.parametrize(
    'path',
    RUN_NBS or [pytest.param(None, marks=pytest.mark.skip(reason='no run notebooks in nbs/runs/ yet'))],
    ids=[p.name for p in RUN_NBS] or ['none'],
)
def test_run_notebook_smoke(path, tmp_path, monkeypatch):
    "Each run notebook finishes in smoke mode; its parameters cell follows STYLE.md §7."
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    nb = nbtools.read(path)
    params = _parameters(nb)
    assert params is not None, f'{path.name}: no cell tagged `parameters` (STYLE.md §7)'
    for name in ('smoke', 'out_dir'):
        assert any(line.split('=')[0].strip() == name for line in params.splitlines()), (
            f'{path.name}: the parameters cell has no `{name}`'
        )
    monkeypatch.setenv('PYTHONPATH', os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]).rstrip(os.pathsep))
    monkeypatch.setenv('MPLBACKEND', 'module://matplotlib_inline.backend_inline')
    out_dir = tmp_path / 'out'
    try:
        pm.execute_notebook(
            str(path),
            str(tmp_path / path.name),
            parameters={'smoke': True, 'out_dir': str(out_dir)},
            cwd=str(path.parent),
            kernel_name='python3',
            language='python',
            progress_bar=False,
            log_output=False,
            execution_timeout=600,
        )
    except PapermillExecutionError as e:
        tb = '\n'.join(e.traceback) if isinstance(e.traceback, list) else str(e.traceback)
        pytest.fail(
            f'{path.relative_to(ROOT)}: cell {e.cell_index} (execution {e.exec_count}) failed\n'
            f'{e.ename}: {e.evalue}\n{run_nbs._ANSI.sub("", tb)}',
            pytrace=False,
        )


def test_committed_notebooks_have_current_outputs():
    "`make check-nbs`: every tutorial notebook was re-run (`make run-nbs`) after its last code change; plots stored."
    r = subprocess.run(
        [sys.executable, str(ROOT / 'tools' / 'docs' / 'check_nbs.py')],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, f'make check-nbs failed:\n{r.stdout[-6000:]}\n{r.stderr[-2000:]}'


# --- the tooling on notebooks made here ---


def _nb(*cells):
    nb = nbformat.v4.new_notebook()
    for c in cells:
        nb.cells.append(nbformat.v4.new_markdown_cell(c[3:]) if c.startswith('md:') else nbformat.v4.new_code_cell(c))
    return nb


PLOT = (
    "import matplotlib.pyplot as plt\nfig, ax = plt.subplots()\nax.semilogy([1, 2], [1e-3, 1e-9]); ax.set_title('err')"
)


def test_plot_detection():
    assert nbtools.plots(PLOT)
    assert nbtools.plots("plot_errors({'a': errs}, title='x')")
    assert nbtools.plots("%matplotlib inline\nplt.plot([1, 2])")
    assert not nbtools.plots('#| export\ndef plot_errors(errors):\n    fig, ax = plt.subplots()\n    ax.plot(errors)')
    assert not nbtools.plots('optimizer.step(); loss.backward()')
    assert not nbtools.plots('plt.close("all")')


def test_stamps_chain_and_survive_nbdev_clean():
    from nbdev.clean import clean_nb

    nb = _nb('x = 1', 'md:text', 'y = x + 1')
    s = nbtools.cell_stamps(nb)
    assert set(s) == {0, 2} and s[0] != s[2]
    nb.cells[0].source = 'x = 2'
    s2 = nbtools.cell_stamps(nb)
    assert s2[0] != s[0] and s2[2] != s[2], 'editing a cell must invalidate the cells below it'
    nb.cells[0].source = 'x = 1  \n\n'
    assert nbtools.cell_stamps(nb) == s, 'trailing whitespace does not matter'
    for i, st in s.items():
        nbtools.set_stamp(nb.cells[i], st)
    nb.cells[2].metadata['tags'].insert(0, 'parameters')
    d = copy.deepcopy(nb)
    clean_nb(d, allowed_cell_metadata_keys=nbtools.settings().get('allowed_cell_metadata_keys', '').split())
    assert [nbtools.stored_stamp(c) for c in d.cells] == [s[0], None, s[2]]
    assert 'parameters' in d.cells[2].metadata['tags']


def test_run_nbs_then_check(tmp_path):
    "run_nbs executes a notebook in place, skips flagged cells (keeping their outputs), stamps the rest; check agrees."
    path = tmp_path / 'demo.ipynb'
    nb = _nb(
        '#| default_exp demo',
        'import math',
        PLOT,
        '#| notest\nraise RuntimeError("slow cell must not run")',
        '#| eval: false\nraise RuntimeError("eval false must not run")',
        'print(math.pi)',
        '#| hide\nimport nbdev; nbdev.nbdev_export()',
    )
    nb.cells[3].outputs = [nbformat.v4.new_output('stream', name='stdout', text='made on a GPU\n')]
    nbformat.write(nb, str(path))
    before = nbtools.check_notebook(path)
    assert any('never executed' in f.message for f in before) and any('no image/png' in f.message for f in before)

    ok, msg, _ = run_nbs.run_notebook(path)
    assert ok, msg
    nb = nbtools.read(path)
    assert nbtools.has_image(nb.cells[2])
    assert nb.cells[3].outputs[0]['text'] == 'made on a GPU\n', 'a skipped cell keeps its outputs'
    assert nb.cells[5].outputs[0]['text'].startswith('3.14159')
    assert nb.cells[6].outputs == [], 'the nbdev_export cell is not run'
    assert all(c.get('execution_count') is None for c in nb.cells if c.cell_type == 'code'), (
        'written in nbdev_clean form'
    )
    assert [f for f in nbtools.check_notebook(path) if f.level == 'error'] == []

    nb.cells[1].source = 'import math, os'  # edit an early cell: everything below is stale
    nbformat.write(nb, str(path))
    stale = [f.cell for f in nbtools.check_notebook(path) if f.level == 'error']
    assert stale == [1, 2, 5]
    assert [f.cell for f in nbtools.check_notebook(path) if f.level == 'warning'] == [3], 'skipped cells only warn'


def test_run_nbs_reports_failing_cell(tmp_path):
    path = tmp_path / 'bad.ipynb'
    nbformat.write(_nb('x = 1', 'def f():\n    return 1 / 0\nf()'), str(path))
    original = path.read_text()
    ok, msg, _ = run_nbs.run_notebook(path)
    assert not ok
    assert 'bad.ipynb cell 1' in msg and 'ZeroDivisionError' in msg and 'return 1 / 0' in msg
    assert path.read_text() == original, 'a failing notebook is left untouched'
