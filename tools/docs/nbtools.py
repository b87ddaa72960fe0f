"""Shared helpers for the notebook tooling: which notebooks, which cells run, which cells plot, and the output stamps.

Output freshness, and why it works this way
-------------------------------------------
`nbdev_clean` (part of `make check-sync`) sets every `execution_count` to None and drops all cell metadata except `tags`
(`allowed_cell_metadata_keys = tags` in settings.ini). So neither execution counts nor a custom metadata key survive a
commit. `make run-nbs` therefore stamps every cell it executes with one tag, ``src-<12 hex>``, the chained SHA-256 of
the
sources of all code cells up to and including that cell:

    H_0 = sha256(b"se3nb-run-nbs-v1"),   H_i = sha256(H_{i-1} || normalised source of code cell i)

`make check-nbs` recomputes the chain and fails on any executed cell whose tag differs. Because the hash is chained,
editing
a cell also marks every code cell below it stale (their outputs may depend on it), which matches "re-run top to bottom".
The stamp lives in the cell it describes, so it survives `nbdev_clean`, jupytext `--update` round trips and merges, and
it
never depends on timestamps or on the order in which the notebooks were last run.
"""

from __future__ import annotations

import ast
import configparser
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[2]
STAMP_PREFIX = 'src-'
_SEED = b'se3nb-run-nbs-v1'

# Methods whose call draws something on a matplotlib Figure/Axes (or a pandas/seaborn object); `plt.<anything>` except
# the state helpers below also counts. A function whose name starts with `plot` (e.g. `plot_errors`) counts too.
PLOT_CALLS = {
    'plot',
    'scatter',
    'imshow',
    'matshow',
    'hist',
    'hist2d',
    'bar',
    'barh',
    'semilogx',
    'semilogy',
    'loglog',
    'errorbar',
    # never `step`: that is optimizer.step()
    'fill_between',
    'fill_betweenx',
    'contour',
    'contourf',
    'pcolormesh',
    'pcolor',
    'quiver',
    'stem',
    'boxplot',
    'violinplot',
    'pie',
    'stackplot',
    'heatmap',
    'lineplot',
    'scatterplot',
    'axhline',
    'axvline',
    'spy',
    'plot_surface',
    'plot_wireframe',
    'subplots',
    'figure',
    'show',
}
PLT_NON_DRAWING = {
    'close',
    'rc',
    'rcParams',
    'rcdefaults',
    'style',
    'ioff',
    'ion',
    'switch_backend',
    'get_cmap',
    'colormaps',
    'get_fignums',
    'isinteractive',
    'set_cmap',
    'savefig',
}


def rel(path: Path) -> str:
    "`path` relative to the repository when it is inside it (for messages)."
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def settings() -> configparser.SectionProxy:
    cp = configparser.ConfigParser(delimiters=['='])
    cp.read(ROOT / 'settings.ini', encoding='utf-8')
    return cp['DEFAULT']


def test_flags() -> set[str]:
    "The `tst_flags` of settings.ini (cells carrying one are skipped unless asked for)."
    return set(settings().get('tst_flags', '').split())


def tutorial_notebooks(nbs_dir: Path | None = None) -> list[Path]:
    "Every nbs/*.ipynb (not nbs/runs/), in file-name order."
    nbs_dir = Path(nbs_dir or ROOT / settings().get('nbs_path', 'nbs'))
    return sorted(p for p in nbs_dir.glob('*.ipynb') if not p.name.startswith(('.', '_')))


def run_notebooks(nbs_dir: Path | None = None) -> list[Path]:
    "Every papermill run notebook nbs/runs/*.ipynb, in file-name order."
    nbs_dir = Path(nbs_dir or ROOT / settings().get('nbs_path', 'nbs'))
    return sorted(p for p in (nbs_dir / 'runs').glob('*.ipynb') if not p.name.startswith(('.', '_')))


_DIRECTIVE = re.compile(r'^\s*#\|\s*([\w-]+)\s*:?\s*(.*?)\s*$')


def directives(source: str) -> dict[str, str]:
    "nbdev/quarto `#|` directives of a cell: {'notest': '', 'eval': 'false', 'export': '', ...}."
    out = {}
    for line in source.splitlines():
        if not line.strip():
            continue
        m = _DIRECTIVE.match(line)
        if not m:
            break
        out[m.group(1).lower()] = m.group(2)
    return out


def skip_reason(cell, flags: set[str]) -> str | None:
    "Why `make run-nbs`/nbdev_test do not run this code cell (None: it runs). Same rules as nbdev_test."
    if cell.cell_type != 'code' or not cell.source.strip():
        return 'empty'
    if 'nbdev_export' + '(' in cell.source:
        return 'nbdev_export'
    d = directives(cell.source)
    if d.get('eval', '').lower() == 'false':
        return 'eval: false'
    hit = sorted(flags & d.keys())
    if hit:
        return '#| ' + ' '.join(hit)
    return None


def _normalise(source: str) -> str:
    return '\n'.join(line.rstrip() for line in source.strip('\n').splitlines())


def cell_stamps(nb) -> dict[int, str]:
    "Expected stamp tag of every non-empty code cell, by cell index (chained hash, see module docstring)."
    h, out = hashlib.sha256(_SEED).digest(), {}
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != 'code' or not cell.source.strip():
            continue
        h = hashlib.sha256(h + _normalise(cell.source).encode('utf-8')).digest()
        out[i] = STAMP_PREFIX + h.hex()[:12]
    return out


def stored_stamp(cell) -> str | None:
    tags = cell.get('metadata', {}).get('tags', [])
    return next((t for t in tags if t.startswith(STAMP_PREFIX)), None)


def set_stamp(cell, stamp: str | None) -> None:
    "Replace the cell's stamp tag (None: remove it), keeping its other tags."
    tags = [t for t in cell.metadata.get('tags', []) if not t.startswith(STAMP_PREFIX)]
    if stamp:
        tags.append(stamp)
    if tags:
        cell.metadata['tags'] = tags
    else:
        cell.metadata.pop('tags', None)


def _python_only(source: str) -> str:
    "Drop IPython magics / shell escapes so the cell parses as Python."
    return '\n'.join('' if line.lstrip().startswith(('%', '!')) else line for line in source.splitlines())


def _call_name(node: ast.Call) -> tuple[str | None, str | None]:
    "(receiver, name) of a call: plt.plot -> ('plt', 'plot'), plot_errors -> (None, 'plot_errors')."
    f = node.func
    if isinstance(f, ast.Name):
        return None, f.id
    if isinstance(f, ast.Attribute):
        recv = f.value
        while isinstance(recv, (ast.Attribute, ast.Subscript, ast.Call)):
            recv = recv.value if not isinstance(recv, ast.Call) else recv.func
        return (recv.id if isinstance(recv, ast.Name) else None), f.attr
    return None, None


def plots(source: str) -> bool:
    """Does running this cell draw a figure? Looks only at statements run at the top level of the cell (calls inside a
    `def` or `class` body do not draw when the cell runs): any `plt.<drawing call>`, any drawing method
    (`ax.plot`, `ax.semilogy`, `df.plot`, ...), any function whose name starts with `plot` (`plot_errors(...)`)."""
    try:
        tree = ast.parse(_python_only(source))
    except SyntaxError:
        return bool(re.search(r'\bplt\.(?!close)\w+\(|\bplot\w*\(', source))
    todo = [n for n in tree.body if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    for top in todo:
        for node in ast.walk(top):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
                continue
            if not isinstance(node, ast.Call):
                continue
            recv, name = _call_name(node)
            if name is None:
                continue
            if recv == 'plt' and name not in PLT_NON_DRAWING:
                return True
            if name.startswith('plot') or name in PLOT_CALLS - {'subplots', 'figure', 'show'}:
                return True
    return False


def has_image(cell) -> bool:
    return any(
        o.get('output_type') in ('display_data', 'execute_result') and 'image/png' in o.get('data', {})
        for o in cell.get('outputs', [])
    )


def read(path: Path):
    return nbformat.read(str(path), as_version=4)


@dataclass
class Finding:
    path: Path
    cell: int  # index in nb.cells
    level: str  # 'error' or 'warning'
    message: str
    source: str = ''

    def __str__(self):
        first = next((l for l in self.source.splitlines() if l.strip() and not l.lstrip().startswith('#|')), '')
        return f'{rel(self.path)}: cell {self.cell} [{self.level}] {self.message}' + (
            f'\n    > {first[:100]}' if first else ''
        )


def check_notebook(path: Path, flags: set[str] | None = None) -> list[Finding]:
    """Findings for one tutorial notebook. Errors: an executed cell whose stamp does not match its (chained) source, an
    `error` output, or a plotting cell without an image/png output. Warnings: the same for cells `make run-nbs` skips
    (`#| notest`/`#| gpu` cells keep outputs produced elsewhere, e.g. on a GPU, which CPU CI cannot refresh)."""
    flags = test_flags() if flags is None else flags
    nb, found = read(path), []
    expected = cell_stamps(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != 'code' or not cell.source.strip():
            continue
        why = skip_reason(cell, flags)
        if why == 'nbdev_export':
            continue
        level = 'warning' if why else 'error'

        def add(msg, lvl=level):
            return found.append(Finding(path, i, lvl, msg, cell.source))

        got = stored_stamp(cell)
        if why:
            if cell.get('outputs') and got != expected[i]:
                run = f'make run-nbs FLAGS="{" ".join(sorted(flags))}"'
                add(f'outputs of a skipped ({why}) cell may be stale: run `{run}` where it can run')
        elif got is None:
            add('never executed by `make run-nbs` (no output stamp)')
        elif got != expected[i]:
            add('stale outputs: this cell or one above it changed since the last `make run-nbs`')
        if any(o.get('output_type') == 'error' for o in cell.get('outputs', [])):
            add('stored output is an error traceback', 'error')
        if plots(cell.source) and not has_image(cell) and why != 'eval: false':
            add('draws a plot but has no image/png output')
    return found
