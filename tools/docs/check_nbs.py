"""`make check-nbs`: fail when a tutorial notebook's committed outputs are stale, missing or broken.

An executed cell (one that nbdev_test and `make run-nbs` run) fails the check when
  - its output stamp (a tag written by `make run-nbs`) does not match the chained hash of the code up to that cell,
  i.e. the
    cell or a cell above it changed since the outputs were produced, or it was never run by `make run-nbs`;
  - it draws a plot (plt.*, ax.plot/semilogy/..., plot_*(...) at the cell's top level) but has no image/png output;
  - its stored output is an error.
Cells skipped by `make run-nbs` (`#| notest`, `#| gpu`: outputs made elsewhere) only warn. See nbtools.py for why a
stamp tag and not execution counts (nbdev_clean erases those).

    python tools/docs/check_nbs.py [notebooks...] [--strict]   # --strict: warnings fail too
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import nbtools  # noqa: E402


MAX_SHOWN = 3


def check(paths: list[Path]) -> list[nbtools.Finding]:
    flags = nbtools.test_flags()
    return [f for p in paths for f in nbtools.check_notebook(Path(p), flags)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('notebooks', nargs='*', help='default: every nbs/*.ipynb')
    ap.add_argument('--strict', action='store_true', help='warnings (skipped cells) fail too')
    ap.add_argument('-v', '--verbose', action='store_true', help='list every finding')
    a = ap.parse_args(argv)
    paths = [Path(p).resolve() for p in a.notebooks] or nbtools.tutorial_notebooks()
    found = check(paths)
    for path in paths:  # per notebook: a summary line, then the first findings (all with --verbose)
        mine = [f for f in found if f.path == Path(path)]
        if not mine:
            continue
        kinds = {}
        for f in mine:
            kinds[f.message] = kinds.get(f.message, 0) + 1
        print(f'{nbtools.rel(path)}: ' + '; '.join(f'{n} cell(s) {m}' for m, n in kinds.items()))
        for f in mine if a.verbose else mine[:MAX_SHOWN]:
            print('  ' + str(f).replace('\n', '\n  '))
        if len(mine) > MAX_SHOWN and not a.verbose:
            print(f'  ... {len(mine) - MAX_SHOWN} more (--verbose lists them)')
    errors = [f for f in found if f.level == 'error' or a.strict]
    bad = sorted({str(f.path.name) for f in errors})
    if errors:
        print(
            f'\ncheck-nbs: {len(errors)} problem(s) in {", ".join(bad)}. Re-run them with `make run-nbs` '
            f'(or `python tools/docs/run_nbs.py nbs/NAME.ipynb`) and commit the outputs.',
            file=sys.stderr,
        )
        return 1
    print(
        f'check-nbs: {len(paths)} notebook(s) have current outputs' + (f' ({len(found)} warning(s))' if found else '')
    )
    return 0


if __name__ == '__main__':
    sys.exit(main())
