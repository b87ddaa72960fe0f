#!/usr/bin/env bash
# `make gpu-check` (issue 15): install se3nb, then run every GPU check in one go and write
# benchmarks/results/<gpu-name>/gpu_check.json and gpu_check.md. Exit code 0 when no check failed.
#
#   bash tools/gpu_check.sh                          # CUDA machine: install (make install TORCH=torch), then the checks
#   bash tools/gpu_check.sh --no-install             # the current Python already has se3nb's dependencies
#   bash tools/gpu_check.sh --device cpu --smoke     # every step on CPU at tiny sizes (< 3 min; tests/test_gpu_check.py)
#
# Other options go to tools/gpu_check.py (--only STEPS, --timeout STEP=SECONDS, --budget SECONDS, --out-dir DIR; see
# `python tools/gpu_check.py --help`). PY picks the Python (default python3; use a venv, e.g. one made with
# --system-site-packages to keep a CUDA torch that the machine already has).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}

install=1
args=()
for a in "$@"; do
  if [ "$a" = "--no-install" ]; then install=0; else args+=("$a"); fi
done

status=skipped
start=$(date +%s)
if [ "$install" = 1 ]; then
  # `pip install torch` keeps an installed torch (e.g. a container's CUDA build); without one it fetches PyPI's (CUDA on Linux)
  echo "== install: make install PY=$PY TORCH=torch (torch, then se3nb with its dev tools)"
  if make install PY="$PY" TORCH=torch; then status=ok; else status="exit code $?"; fi
fi
seconds=$(( $(date +%s) - start ))

exec "$PY" tools/gpu_check.py --install-status "$status" --install-seconds "$seconds" \
  --command "tools/gpu_check.sh $*" ${args[@]+"${args[@]}"}
