# gpuforge: `make demo` and `make test` do all their own set-up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test unit integration bench sysdeps venv clean

venv: $(STAMP)

# The virtualenv, rebuilt when pyproject.toml changes.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[train,cloud,dev]'
	touch $(STAMP)

# OpenSSH server for the embedded local cluster (each node is a real sshd); sudo, python3-venv and unshare for
# its VM-like nodes (a sudo login user, a fresh venv from the system python3, namespaces per node).
SYSPKGS := openssh-server sudo python3-venv util-linux
sysdeps:
	@missing=$$(for p in $(SYSPKGS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then echo "installing $$missing (the local cluster's nodes)"; \
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
	for b in bench/[!_]*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) build dist *.egg-info
