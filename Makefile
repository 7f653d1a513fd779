# Set-up paths for a fresh machine with only Python 3.11: a local virtualenv, the CPU torch wheel first
# (torch==2.13.0 comes from local disk; any other version would pull a multi-GB CUDA build), then the project.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo demo-dna test lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[plot]'
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/pip install -q -e '.[dev,plot,triton]'
	touch $@

# The main job: prepare -> train -> forecast -> eval on the bundled ETTh1 (a few minutes on 2 CPU cores).
demo: $(VENV)/.installed
	PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/demo_forecast.sh

# The DNA job: prepare -> train -> classify -> eval on the bundled GUE prom_300_tata.
demo-dna: $(VENV)/.installed
	PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/demo_dna.sh

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .

# The test command (CI runs it): lint, then the whole suite on the CPU (Triton kernels in interpreter mode).
test: lint
	$(BIN)/pytest -q

bench: $(VENV)/.installed-dev
	$(BIN)/pip install -q -c bench/constraints.txt -e '.[bench]'
	$(BIN)/python bench/memory.py

clean:
	rm -rf $(VENV) runs
