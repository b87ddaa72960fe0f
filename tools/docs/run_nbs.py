"""`make run-nbs`: re-execute the tutorial notebooks (nbs/*.ipynb) in place so their committed outputs are current.

Each notebook runs top to bottom in a fresh Jupyter kernel (nbclient + ipykernel, the same machinery as papermill, so
plots come out as inline image/png exactly as in Jupyter), with the notebook's folder as working directory. Cells that
nbdev_test skips are skipped here too and keep the outputs they already have: `#| notest` / `#| gpu` (settings.ini
`tst_flags`, unless named in --flags), `#| eval: false`, and the `nbdev_export()` cell. Every executed cell gets the
output stamp tag described in nbtools.py. The notebook is then written back in `nbdev_clean` form (so `make check-sync`
sees no diff); a notebook with a failing cell is left untouched and the command exits non-zero naming the notebook, the
cell and its traceback.

    python tools/docs/run_nbs.py                      # all nbs/*.ipynb, in file-name order
    python tools/docs/run_nbs.py nbs/04_conv.ipynb    # some of them
    python tools/docs/run_nbs.py --flags "notest gpu" # also the slow/GPU cells (on a machine that can run them)
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import nbtools  # noqa: E402

_ANSI = re.compile(r'\x1b\[[0-9;]*[A-Za-z]')


def run_notebook(
    path: Path, run_flags: set[str] = frozenset(), timeout: int = 600, kernel: str = 'python3', write: bool = True
) -> tuple[bool, str, float]:
    "Execute one notebook in place. Returns (ok, message, seconds)."
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

    path, start = Path(path).resolve(), time.time()
    nb = nbtools.read(path)
    skip_flags = nbtools.test_flags() - set(run_flags)
    stamps = nbtools.cell_stamps(nb)
    env = dict(
        os.environ, MPLBACKEND='module://matplotlib_inline.backend_inline'
    )  # plots as inline image/png, as in Jupyter
    # like nbdev_test's basepath: the repository's own se3nb is importable even when it is not pip-installed
    env['PYTHONPATH'] = os.pathsep.join([str(nbtools.ROOT)] + [p for p in [os.environ.get('PYTHONPATH')] if p])
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name=kernel,
        allow_errors=False,
        record_timing=False,
        resources={'metadata': {'path': str(path.parent)}},
    )
    done, current = 0, None
    klog = tempfile.TemporaryFile('w+')  # the kernel's own stderr: shown only when something fails
    try:
        with client.setup_kernel(env=env, cwd=str(path.parent), stderr=klog):
            for i, cell in enumerate(nb.cells):
                if cell.cell_type != 'code' or nbtools.skip_reason(cell, skip_flags):
                    continue
                current = i
                client.execute_cell(cell, i)
                nbtools.set_stamp(cell, stamps[i])
                done += 1
    except (
        CellExecutionError,
        CellTimeoutError,
        DeadKernelError,
        RuntimeError,
    ) as e:  # RuntimeError: kernel did not start
        src = nb.cells[current].source if current is not None else ''
        msg = (
            f'FAILED {nbtools.rel(path)} cell {current} (notebook left unchanged)\n'
            + ''.join(f'    | {l}\n' for l in src.splitlines()[:15])
            + _ANSI.sub('', str(e))
        )
        klog.seek(0)
        log = [l for l in klog.read().splitlines() if 'without encryption' not in l]
        if log:
            msg += '\n--- kernel stderr ---\n' + '\n'.join(log[-30:])
        return False, msg, time.time() - start
    finally:
        klog.close()
    if write:
        nbformat.write(nb, str(path))
        _nbdev_clean(path)
    return True, f'ok {nbtools.rel(path)}: {done} cells in {time.time() - start:.1f}s', time.time() - start


def _nbdev_clean(path: Path) -> None:
    "Write the notebook the way `nbdev_clean` does (same settings), so check-sync sees no diff."
    from execnb.nbio import read_nb, write_nb
    from nbdev.clean import clean_nb

    cfg = nbtools.settings()
    nb = read_nb(path)
    clean_nb(
        nb,
        clear_all=cfg.get('clear_all', 'False').lower() == 'true',
        allowed_metadata_keys=cfg.get('allowed_metadata_keys', '').split(),
        allowed_cell_metadata_keys=cfg.get('allowed_cell_metadata_keys', '').split(),
        clean_ids=cfg.get('clean_ids', 'True').lower() == 'true',
    )
    write_nb(nb, path)


def _job(args):
    path, flags, timeout = args
    return run_notebook(path, flags, timeout)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('notebooks', nargs='*', help='notebooks to run (default: every nbs/*.ipynb)')
    ap.add_argument(
        '--flags', default=os.environ.get('FLAGS', ''), help='test flags whose cells run anyway, e.g. "notest gpu"'
    )
    ap.add_argument('--timeout', type=int, default=600, help='seconds per cell')
    ap.add_argument('-j', '--jobs', type=int, default=1, help='notebooks run in parallel (each in its own kernel)')
    a = ap.parse_args(argv)
    paths = [Path(p) for p in a.notebooks] or nbtools.tutorial_notebooks()
    jobs = [(p, set(a.flags.split()), a.timeout) for p in paths]
    failed = []
    with ProcessPoolExecutor(max_workers=max(1, a.jobs)) as ex:
        for (path, *_), (ok, msg, _) in zip(jobs, ex.map(_job, jobs)):
            print(msg, flush=True)
            if not ok:
                failed.append(path)
    if failed:
        print(f'\n{len(failed)} notebook(s) failed: ' + ', '.join(str(p) for p in failed), file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
