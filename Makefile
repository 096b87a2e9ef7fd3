# Airloom — two set-up commands for a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install --disable-pip-version-check -c constraints.txt

.PHONY: demo test test-all airflow settings bench lint lock clean venv venv-dev browser

venv: $(VENV)/.runtime
venv-dev: $(VENV)/.dev

# Everything the pipeline needs, pinned by constraints.txt (torch==2.13.0: the CPU wheel).
$(VENV)/.runtime: requirements.txt constraints.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(PIP) -r requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $@

$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt
	$(PIP) -r requirements-dev.txt
	touch $@

## The demo pipeline on the embedded default (SQLite Airflow, local registry, tiny model).
demo: venv
	$(BIN)/airloom demo

## The test suite: lint, format and type checks first (seconds), then every test but those needing a GPU.
test: venv-dev browser lint
	$(BIN)/python -m pytest -m "not gpu" --durations=15 $(PYTEST_ARGS)

## Debian's chromium for the browser tests (tests/browser), when none is on PATH (needs root or sudo).
## Playwright drives this system browser; it never downloads one of its own. (Debian's launcher
## script warns about the size of /dev/shm on stderr, hence 2>/dev/null.)
browser:
	@command -v chromium >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q --no-install-recommends chromium fonts-liberation; }
	@chromium --version 2>/dev/null

## Airflow's scheduler, triggerer, dag-processor and UI (http://localhost:8080) on the embedded default.
airflow: venv
	$(BIN)/airloom airflow db migrate >/dev/null
	$(BIN)/airloom settings airflow_settings.yaml
	@echo "Airflow UI: http://localhost:8080  — log in as admin/admin (also trainer/trainer, reviewer/reviewer)"
	$(BIN)/airloom airflow standalone

settings: venv
	$(BIN)/airloom settings airflow_settings.yaml

bench: venv
	$(BIN)/python bench/dag_parse.py

## ruff (lint + format) over the tree, Airflow's AIR rules on the DAGs, mypy on the typed packages.
lint: venv-dev
	$(BIN)/ruff check .
	$(BIN)/ruff check --select AIR dags
	$(BIN)/ruff format --check .
	$(BIN)/mypy

## Regenerate constraints.txt from a fresh resolve of requirements*.txt.
lock:
	rm -rf /tmp/airloom-lock && $(PYTHON) -m venv /tmp/airloom-lock
	/tmp/airloom-lock/bin/pip install -q -r requirements.txt -r requirements-dev.txt
	( echo "# Full resolved set for a reproducible install. Regenerate: make lock"; \
	  /tmp/airloom-lock/bin/pip freeze --exclude-editable | sed 's/^torch==2.13.0+cpu/torch==2.13.0/' ) > constraints.txt

clean:
	rm -rf .airflow .airloom .pytest_cache
