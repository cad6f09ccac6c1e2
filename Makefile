# Joule's entry points. `make test` works on a fresh machine: it creates the virtualenv,
# builds the local control plane once (cached in ~/.cache/joule) and runs every test.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install host-packages binaries images demo test unit lint format cluster-up cluster-down clean

$(STAMP): pyproject.toml trainer_image/pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "make: $(PYTHON) not found; Python >= 3.11 is needed" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]' -e trainer_image  # torch: a large download, once
	@touch $@

install: $(STAMP)

# The real node and the image builder come from Debian (.ci/debian-packages): installed when
# missing and this is a root Debian/Ubuntu machine; elsewhere `joule cluster up` says why it
# starts no node, and what to do instead.
HOST_PACKAGES := $(shell cat .ci/debian-packages)
host-packages:
	@missing=$$(for p in $(HOST_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "make: installing Debian packages for the local node and image builds: $$missing"; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null \
		|| { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; }; \
	else \
		echo "make: not installing $$missing (needs root and apt-get); the local node will not start"; \
	fi

# The control plane is built from Go modules; Go itself fetches the toolchain version it needs.
binaries: install host-packages
	@command -v go >/dev/null || [ -x /usr/local/go/bin/go ] || { echo "make: Go is needed to build the control plane once (https://go.dev/dl or your package manager)" >&2; exit 1; }
	$(VENV)/bin/joule cluster build

# The whole loop on this machine: control plane, operator, a real node (kubelet + containerd;
# needs root on Linux) running the example jobs' workers in containers from the trainer image
# (built here), and a live view. Ctrl-C stops everything.
demo: binaries
	PATH="/usr/local/go/bin:$$PATH" $(VENV)/bin/joule demo $(DEMO_ARGS)

# The trainer and operator images, built by buildah from trainer_image/Dockerfile and
# operator/Dockerfile and cached by content (the trainer's first build installs torch from PyPI
# into it: minutes, with progress). Root only, as the node.
images: binaries
	@if [ "$$(id -u)" = 0 ] && [ "$$(uname -s)" = Linux ]; then \
		$(VENV)/bin/joule image build trainer && $(VENV)/bin/joule image build operator; fi

test: binaries images
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
