# The two README commands: `make demo` and `make test`. Both create .venv when missing and are idempotent.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export DS_ACCELERATOR ?= cpu
export DS_BUILD_OPS ?= 0
export WANDB_MODE ?= offline
export WANDB_SILENT ?= true
export HF_HUB_OFFLINE ?= 1
export RAY_USAGE_STATS_ENABLED ?= 0
export RAY_AUTH_MODE ?= token
export RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S ?= 60
export RAY_CHDIR_TO_TRIAL_DIR ?= 0
export OMP_NUM_THREADS ?= 1
# Tests without Ray run this many at a time (pytest-xdist); the Ray tests start local clusters on fixed
# loopback addresses and run one at a time after them.
TEST_PROCESSES ?= 2

.PHONY: install demo test lint clean

install: $(STAMP)

# Order matters: torch first (local CPU wheel), then DeepSpeed with DS_BUILD_OPS=0, then the rest.
$(STAMP): pyproject.toml requirements.txt requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	DS_BUILD_OPS=0 $(BIN)/pip install --quiet -r requirements.txt -r requirements-dev.txt
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

demo: install
	$(BIN)/pertadapt demo

# pytest exits 5 when no test ran; that must fail too (it does: make stops on any non-zero exit).
# Two runs: the tests without Ray in parallel, then the Ray tests alone (they would compete for the cores).
test: install
	$(BIN)/ruff check platform tests
	$(BIN)/lint-imports
	bash scripts/ensure-chromium.sh
	$(BIN)/python -m pytest -m "not ray" -n $(TEST_PROCESSES) --dist worksteal
	$(BIN)/python -m pytest -m ray

lint: install
	$(BIN)/ruff check platform tests
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) runs .pytest_cache .cache
