# moelab developer entry points.
#
#   make lab    set up .venv (first time only) and open JupyterLab on notebooks/
#   make test   set up .venv (first time only) and run the test suite (what CI runs)
#   make test-fast  the edit-test loop: the suite without the slow, browser, compile, hf and notebook tiers
#   make setup  just the lab's setup step (moelab, torch, JupyterLab, transformers for notebook 11)
#   make clean  remove .venv and build/test caches
#
# Pass extra arguments with LAB_ARGS / PYTEST_ARGS, e.g.
#   make lab LAB_ARGS="--no-browser --port 8899"
#   make test PYTEST_ARGS="-k router -x"

SHELL := /bin/bash

# Interpreter used only to create .venv; prefer 3.11.
BOOTSTRAP_PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3 2>/dev/null)
VENV := .venv
VENV_PY := $(VENV)/bin/python
# CPU torch pin installed first so pip never resolves `torch>=2.9` to a CUDA build.
TORCH_PIN ?= torch==2.13.0
STAMP := $(VENV)/.moelab-installed
TEST_STAMP := $(VENV)/.moelab-test-installed
# JupyterLab settings for the lab: no news pop-up or update check on first open (they also need the network)
LAB_SETTINGS := $(VENV)/share/jupyter/lab/settings/overrides.json
PIP := $(VENV_PY) -m pip --disable-pip-version-check

LAB_ARGS ?=
PYTEST_ARGS ?=
# Notebooks are executed with nbval as part of `make test` once notebooks/ has any.
NOTEBOOKS := $(wildcard notebooks/*.ipynb)
NBVAL_ARGS ?= $(if $(NOTEBOOKS),notebooks/ --nbval --nbval-sanitize-with tests/sanitize.cfg)

.PHONY: setup setup-test lab test test-fast clean

FAST_MARKERS := not slow and not browser and not compile and not hf and not notebooks

setup: $(STAMP)

setup-test: $(TEST_STAMP)

$(STAMP): pyproject.toml
	@if [ -z "$(BOOTSTRAP_PYTHON)" ]; then echo "error: neither python3.11 nor python3 found on PATH" >&2; exit 1; fi
	@if [ ! -x $(VENV_PY) ]; then \
		echo "Creating $(VENV) with $(BOOTSTRAP_PYTHON)"; \
		$(BOOTSTRAP_PYTHON) -m venv $(VENV); \
	fi
	@if ! $(VENV_PY) -c "import torch" >/dev/null 2>&1; then \
		echo "Installing $(TORCH_PIN)"; \
		$(PIP) install "$(TORCH_PIN)"; \
	fi
	$(PIP) install -e '.[hf]'
	@mkdir -p $(dir $(LAB_SETTINGS))
	@echo '{"@jupyterlab/apputils-extension:notification": {"fetchNews": "false", "checkForUpdates": false}}' \
		> $(LAB_SETTINGS)
	@touch $@

# the test tools (pytest, nbval, playwright, import-linter, hypothesis) on top of the lab's setup
$(TEST_STAMP): $(STAMP)
	$(PIP) install -e '.[test,hf]'
	@touch $@

lab: setup
	@mkdir -p notebooks
	$(VENV)/bin/jupyter lab notebooks/ $(LAB_ARGS)

test: setup-test
	$(VENV_PY) -m pytest tests/ $(NBVAL_ARGS) $(PYTEST_ARGS)

test-fast: setup-test
	$(VENV_PY) -m pytest tests/ -m "$(FAST_MARKERS)" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build dist .pytest_cache *.egg-info
	find . -path ./.git -prune -o \( -name __pycache__ -o -name .ipynb_checkpoints \) -type d -prune -exec rm -rf {} +
