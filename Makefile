# moelab developer entry points.
#
#   make lab    set up .venv (first time only) and open JupyterLab on notebooks/
#   make test   set up .venv (first time only) and run the test suite (what CI runs)
#   make test-fast  the edit-test loop: the suite without the slow, browser, compile, hf and notebook tiers
#   make setup  just the setup step
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
PIP := $(VENV_PY) -m pip --disable-pip-version-check

LAB_ARGS ?=
PYTEST_ARGS ?=
# Notebooks are executed with nbval as part of `make test` once notebooks/ has any.
NOTEBOOKS := $(wildcard notebooks/*.ipynb)
NBVAL_ARGS ?= $(if $(NOTEBOOKS),notebooks/ --nbval --nbval-sanitize-with tests/sanitize.cfg)

.PHONY: setup lab test test-fast clean

FAST_MARKERS := not slow and not browser and not compile and not hf and not notebooks

setup: $(STAMP)

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
	$(PIP) install -e '.[test,hf]'
	@touch $@

lab: setup
	@mkdir -p notebooks
	$(VENV)/bin/jupyter lab notebooks/ $(LAB_ARGS)

test: setup
	$(VENV_PY) -m pytest tests/ $(NBVAL_ARGS) $(PYTEST_ARGS)

test-fast: setup
	$(VENV_PY) -m pytest tests/ -m "$(FAST_MARKERS)" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build dist .pytest_cache *.egg-info
	find . -path ./.git -prune -o \( -name __pycache__ -o -name .ipynb_checkpoints \) -type d -prune -exec rm -rf {} +
