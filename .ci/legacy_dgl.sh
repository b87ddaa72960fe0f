#!/usr/bin/env bash
# Legacy CI leg: se3nb next to NVIDIA's stack (torch 2.2.1 + dgl 2.1.0, the only DGL build for Python 3.11) in its own
# virtual environment `.venv-legacy` (git-ignored), created on first use and reused while its pins are unchanged.
# Runs the DGL tests (se3nb fed real DGLGraphs == se3nb fed its own graphs, on the shared NVIDIA fixtures) and the core
# suite on torch 2.2.1 (torch>=2.2 is se3nb's floor). The main leg (.ci/run) keeps the newest torch and never sees DGL.
# Usage: bash .ci/legacy_dgl.sh [extra pytest args]   (env: PYTHON=python3.11, SE3NB_LEGACY_VENV=.venv-legacy)
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
venv=${SE3NB_LEGACY_VENV:-.venv-legacy}
python=${PYTHON:-python3}
export DGLBACKEND=pytorch  # silences DGL's backend notice

# The pins of settings.ini's `extra_dgl` (se3nb[dgl]): dgl 2.1.0 imports only with torch 2.2.x, numpy<2 and
# torchdata 0.7.1 (whose import needs pkg_resources, hence setuptools<70), and `import dgl` also needs pandas, pyyaml and
# pydantic, which its wheel does not declare. PyPI's torch 2.2.1 is the CUDA build (~2.5 GB with its nvidia-* wheels;
# it runs on CPU). A fresh install took 173 s here; a reuse checks the stamp file only.
pins=("torch==2.2.1" "dgl==2.1.0" "numpy<2" "setuptools<70" "torchdata==0.7.1" "pandas<3" "pyyaml" "pydantic")
# Test-time dependencies of the tests below (se3nb itself needs torch, e3nn, numpy; wheel for the editable install).
test_deps=("e3nn>=0.5.1" "pytest" "tqdm" "wheel")

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
# shellcheck disable=SC1091
. "$venv/bin/activate"
stamp="$venv/.se3nb-legacy-pins"
want="${pins[*]} ${test_deps[*]}"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "== installing the legacy stack into $venv: $want"
  t0=$(date +%s)
  constraints="$venv/constraints.txt"
  printf '%s\n' "${pins[@]}" > "$constraints"
  python -m pip install -q -c "$constraints" "${pins[@]}" "${test_deps[@]}" 2>&1 | { grep -v "is ignored: it is neither" || true; }
  echo "$want" > "$stamp"
  echo "== install took $(( $(date +%s) - t0 )) s"
fi
# se3nb from this checkout, without its requirements (they would pull the newest torch over the pinned one).
python -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | { grep -v "is ignored: it is neither" || true; }

python - <<'PY'
import sys
import se3nb, se3nb.nvidia, se3nb.compat, se3nb.dgl_interop
assert 'dgl' not in sys.modules, 'se3nb imported dgl at import time'
import dgl, e3nn, numpy, torch
assert torch.__version__.split('+')[0] == '2.2.1', torch.__version__
print(f"== torch {torch.__version__}, dgl {dgl.__version__}, numpy {numpy.__version__}, e3nn {e3nn.__version__}, se3nb {se3nb.__version__}")
PY

echo "== pytest (DGL interop, checkpoints, core suite, NVIDIA fixtures) on the legacy stack"
status=0
python -m pytest -q -rs -p no:cacheprovider tests/test_dgl.py tests/test_nvidia_checkpoints.py tests/test_model.py tests/test_conv.py \
  tests/test_nvidia.py tests/test_nvidia_deprecated.py tests/test_protein_design.py "$@" || status=$?
echo "== legacy leg finished in $(( $(date +%s) - start )) s (pytest exit $status)"
exit $status
