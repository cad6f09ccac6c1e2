# Joule's entry points. `make test` works on a fresh machine: it creates the virtualenv,
# builds the local control plane once (cached in ~/.cache/joule) and runs every test.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install binaries demo test unit lint format cluster-up cluster-down clean

$(STAMP): pyproject.toml trainer_image/pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "make: $(PYTHON) not found; Python >= 3.11 is needed" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]' -e trainer_image  # torch: a large download, once
	@touch $@

install: $(STAMP)

# The control plane is built from Go modules; Go itself fetches the toolchain version it needs.
binaries: install
	@command -v go >/dev/null || [ -x /usr/local/go/bin/go ] || { echo "make: Go is needed to build the control plane once (https://go.dev/dl or your package manager)" >&2; exit 1; }
	$(VENV)/bin/joule cluster build

# The whole loop on this machine: control plane, operator, a local node running the example
# jobs' workers as processes, and a live view. Ctrl-C stops everything.
demo: binaries
	PATH="/usr/local/go/bin:$$PATH" $(VENV)/bin/joule demo $(DEMO_ARGS)

test: binaries
	$(PY) -m pytest

unit: install
	$(PY) -m pytest tests/unit

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

cluster-up: binaries
	$(VENV)/bin/joule cluster up

cluster-down: install
	$(VENV)/bin/joule cluster down

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
