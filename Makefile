# Two commands set everything up on a fresh machine:
#   make run   create .venv, install haina, run the main job (haina quickstart)
#   make test  create .venv, install haina with test extras, run the test suite
# Both reuse .venv and reinstall only when pyproject.toml (where every pin lives) or setup.py (the package
# layout) changes.

PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?= -m "not slow and not gpu"

.PHONY: run test test-all test-gpu install install-test browser lint clean

run: $(VENV)/.installed
	$(BIN)/haina quickstart

test: $(VENV)/.installed-test browser
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Everything, slow tests included (the full quickstart among them).
test-all: PYTEST_ARGS :=
test-all: test

# GPU-only tests (run on a machine with CUDA).
test-gpu: PYTEST_ARGS := -m gpu
test-gpu: test

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# torch is pinned to 2.13.0 in pyproject.toml: pip takes the CPU build from the local wheel
# directory, never a multi-GB CUDA build from the index.
$(VENV)/.installed: pyproject.toml setup.py | $(VENV)/bin/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml setup.py | $(VENV)/bin/python
	$(BIN)/python -m pip install --quiet -e '.[hf,eval,export,tune,rag,embed,test]'
	touch $@ $(VENV)/.installed

# The serving playground's test drives Debian's headless Chromium. Install it when missing and
# we may (root with apt); otherwise that one test skips and says why.
browser:
	@command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) || \
	    echo "chromium not installed: the browser test will be skipped"; }

lint: $(VENV)/.installed-test
	$(BIN)/ruff check haina tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
