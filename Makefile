# se3nb developer commands. The README's two set-up commands are `make qm9` (main job) and `make test`; both install first.
PY ?= python3
TORCH ?= torch==2.13.0

.PHONY: install qm9 lab test test-nbs test-py export clean-nbs check-sync lint format

install:  ## torch first (the CPU wheel is on this machine; `make install TORCH=torch` elsewhere), then se3nb with its dev tools
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"

qm9: install  ## the main job: train on the embedded QM9 (quick CPU preset: 10 min of training, 13-14 min on a fresh 2-core machine, per phase in the README) and print the test MAE
	se3nb-train --preset quick

lab: install  ## open the tutorial notebooks in JupyterLab (on a server: make lab LAB_ARGS="--no-browser --ip=0.0.0.0")
	jupyter lab nbs/index.ipynb $(if $(filter 0,$(shell id -u)),--allow-root) $(LAB_ARGS)

test: install  ## every test: ruff lint and format check, pytest, and the notebooks
	$(MAKE) lint test-py test-nbs

# ruff from the active environment, else from a small tool venv made on first use (a fresh machine needs no set-up for lint)
RUFF ?= $(or $(shell command -v ruff 2>/dev/null),.venv-lint/bin/ruff)

lint:  ## ruff lint (notebooks, package, tests, tools, benchmarks) and ruff format check (everything but the generated package)
	@[ -x "$(RUFF)" ] || { echo "ruff not found: installing it into .venv-lint"; $(PY) -m venv .venv-lint && .venv-lint/bin/pip install -q "ruff>=0.6"; }
	$(RUFF) check .
	$(RUFF) format --check .

format:  ## ruff format the notebooks, tests, tools and benchmarks, then export: the package follows its notebooks
	$(RUFF) format .
	nbdev_export

test-py:
	$(PY) -m pytest -q tests

test-nbs:
	nbdev_test --n_workers 2

export:
	nbdev_export

check-sync:  ## fail when nbdev_export or nbdev_clean would change tracked files
	nbdev_export && nbdev_clean && git diff --exit-code --stat -- se3nb nbs

# --- docs site and notebook outputs (tools/docs/) ---
.PHONY: docs run-nbs check-nbs
FLAGS ?=

docs:  ## build the documentation site into site/ from the notebooks' stored outputs, offline (run `make run-nbs` first)
	$(PY) tools/docs/build_docs.py

run-nbs:  ## re-execute nbs/*.ipynb in place (skips #| notest, #| gpu, #| eval: false unless FLAGS="notest gpu") and stamp their outputs
	$(PY) tools/docs/run_nbs.py --flags "$(FLAGS)" $(NBS)

check-nbs:  ## fail when a notebook's committed outputs are stale (source changed since run-nbs), missing a plot, or an error
	$(PY) tools/docs/check_nbs.py $(NBS)

# --- GPU check (tools/gpu_check.sh, issue 15) ---
.PHONY: gpu-check
ARGS ?=

gpu-check:  ## on a CUDA machine: install (TORCH=torch keeps an installed torch), run every GPU check, write benchmarks/results/<gpu-name>/gpu_check.{json,md}; CPU smoke: make gpu-check ARGS="--device cpu --smoke"
	PY=$(PY) bash tools/gpu_check.sh $(ARGS)
