# se3nb developer commands. The README's two set-up commands are `make install` and `make test`.
PY ?= python3

.PHONY: install test test-nbs test-py export clean-nbs check-sync

install:  ## torch first (the CPU wheel is on this machine), then se3nb with its dev tools
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e ".[dev]"

test: test-py test-nbs  ## every test: pytest and the notebooks

test-py:
	$(PY) -m pytest -q tests

test-nbs:
	nbdev_test --n_workers 2

export:
	nbdev_export

check-sync:  ## fail when nbdev_export or nbdev_clean would change tracked files
	nbdev_export && nbdev_clean && git diff --exit-code --stat -- se3nb nbs
