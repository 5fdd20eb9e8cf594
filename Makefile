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

# OpenSSH server for the embedded local cluster (each node is a real sshd), the OpenSSH client for
# `gpuforge ssh` and its tunnels, and Debian's Chromium for the test that loads JupyterLab in a browser.
sysdeps:
	@missing=""; \
	{ command -v sshd >/dev/null 2>&1 || test -x /usr/sbin/sshd; } || missing="$$missing openssh-server"; \
	command -v ssh >/dev/null 2>&1 || missing="$$missing openssh-client"; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	if [ -n "$$missing" ]; then echo "installing$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing >/dev/null; fi

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
