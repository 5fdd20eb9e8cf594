# gpuforge: `make demo` and `make test` do all their own set-up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test unit integration bench bench-peer sysdeps venv clean

venv: $(STAMP)

# The virtualenv, rebuilt when pyproject.toml changes.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[train,cloud,dev]'
	touch $(STAMP)

# OpenSSH server for the embedded local cluster (each node is a real sshd); sudo, python3-venv and unshare for
# its VM-like nodes (a sudo login user, a fresh venv from the system python3, namespaces per node); the OpenSSH
# client for `gpuforge ssh` and its tunnels; Debian's Chromium for the test that loads JupyterLab in a browser.
SYSPKGS := openssh-server openssh-client sudo python3-venv util-linux chromium rsync
sysdeps:
	@missing=$$(for p in $(SYSPKGS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then echo "installing $$missing (the local cluster's nodes and their clients)"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq \
	    -o DPkg::Lock::Timeout=600 $$missing >/dev/null; fi

demo: $(STAMP) sysdeps
	$(BIN)/python -m provision.cli.demo

test: $(STAMP) sysdeps
	$(BIN)/python -m pytest -q tests

unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

integration: $(STAMP) sysdeps
	$(BIN)/python -m pytest -q tests/integration

bench: $(STAMP) sysdeps
	for b in bench/[!_]*.py; do [ $$b = bench/peer_ray.py ] && continue; echo "== $$b"; $(BIN)/python $$b || exit 1; done

# gpuforge against the Ray cluster launcher on the same two machines (bench/peer_ray.py). Ray goes into
# an environment of its own, never the project's: it is big (~1.6 GB with torch), and only this needs it.
# Its Python is the system one, which the benchmark's non-root node user can run (root's pyenv it cannot).
RAY_VENV    := .venv-ray
RAY_PYTHON  ?= /usr/bin/python3
RAY_VERSION := 2.60.0
RAY_STAMP   := $(RAY_VENV)/.installed-$(RAY_VERSION)

$(RAY_STAMP):
	rm -rf $(RAY_VENV)
	$(RAY_PYTHON) -m venv $(RAY_VENV)
	$(RAY_VENV)/bin/python -m pip install --quiet 'ray[default,train]==$(RAY_VERSION)' torch==2.13.0 numpy
	touch $(RAY_STAMP)

bench-peer: $(STAMP) sysdeps $(RAY_STAMP)
	@command -v rsync >/dev/null && command -v sudo >/dev/null || { \
	  echo "installing rsync and sudo (Ray's cluster launcher copies files with rsync; the nodes' user has sudo)"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq rsync sudo >/dev/null; }
	$(BIN)/python bench/peer_ray.py

clean:
	rm -rf $(VENV) $(RAY_VENV) build dist *.egg-info
