"""The code stays readable: short lines, modules and notebook cells of a size a newcomer can hold in mind.

ruff (`make lint`) checks the notebooks, tests, tools and benchmarks; these checks cover what it cannot see: the
generated package (whose `__all__` lines nbdev wraps at 120 characters *after* `__all__ = `, and whose `_modidx.py`
index is nbdev's) and sizes."""

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / 'se3nb'
MAX_LINE = 120
MAX_MODULE_LINES = 450
MAX_CELL_LINES = 60  # "about 50": a signature that documents each argument on its own line may take a few more


def package_sources() -> list[Path]:
    return [p for p in sorted(PKG.glob('*.py')) if p.name != '_modidx.py']


def nbdev_all_block(lines: list[str]) -> set[int]:
    "Indices of the `__all__ = [...]` lines nbdev writes."
    start = next((i for i, line in enumerate(lines) if line.startswith('__all__ = [')), None)
    if start is None:
        return set()
    end = next(i for i in range(start, len(lines)) if lines[i].rstrip().endswith(']'))
    return set(range(start, end + 1))


def test_package_lines_at_most_120_characters():
    long = []
    for path in package_sources() + sorted((PKG / 'csrc').glob('*.cpp')):  # the C++ sources too (no formatter here)
        lines = path.read_text().splitlines()
        skip = nbdev_all_block(lines)
        long += [
            f'{path.name}:{i + 1} ({len(line)})'
            for i, line in enumerate(lines)
            if len(line) > MAX_LINE and i not in skip
        ]
    assert not long, f'{len(long)} lines over {MAX_LINE} characters (fix them in the notebooks): {long[:20]}'


# Named exceptions to the limits (none left): an entry may only shrink, and a module or cell not listed here must stay
# within the limits. Remove an entry once it fits.
KNOWN_LARGE_MODULES: dict[str, int] = {}
KNOWN_LARGE_CELLS: dict[tuple[str, str], int] = {}  # (notebook, first definition of the cell) -> lines


def test_package_modules_at_most_450_lines():
    sizes = {p.name: len(p.read_text().splitlines()) for p in package_sources()}
    big = {name: n for name, n in sizes.items() if n > KNOWN_LARGE_MODULES.get(name, MAX_MODULE_LINES)}
    assert not big, f'modules over {MAX_MODULE_LINES} lines (split them by concern): {big}'


def _first_definition(cell: dict) -> str:  # 'def name' or 'class Name' of the cell's first definition, or ''
    for line in ''.join(cell['source']).splitlines():
        words = line.split()
        if len(words) > 1 and words[0] in ('def', 'class'):
            return f"{words[0]} {words[1].split('(')[0].rstrip(':')}"
    return ''


def test_notebook_code_cells_at_most_about_50_lines():
    big = []
    for nb in sorted((ROOT / 'nbs').rglob('*.ipynb')):
        if '.ipynb_checkpoints' in nb.parts:
            continue
        for i, cell in enumerate(json.loads(nb.read_text())['cells']):
            n = len(''.join(cell['source']).rstrip('\n').splitlines())
            if cell['cell_type'] == 'code' and n > KNOWN_LARGE_CELLS.get(
                (nb.stem, _first_definition(cell)), MAX_CELL_LINES
            ):
                big.append(f'{nb.relative_to(ROOT)} cell {i} ({n} lines)')
    assert not big, f'notebook cells over {MAX_CELL_LINES} lines (move helpers into cells of their own): {big}'
