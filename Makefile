PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip install --quiet -c constraints.txt

.PHONY: demo test lint bench clean

$(BIN)/gradfit: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) -e .
	touch $@

$(VENV)/.dev: $(BIN)/gradfit
	$(PIP) -e '.[dev]'
	touch $@

demo: $(BIN)/gradfit
	$(BIN)/gradfit demo --out gradfit-demo --overwrite

test: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest

bench: $(VENV)/.dev
	$(BIN)/python benchmarks/bench_demo_loop.py

clean:
	rm -rf $(VENV) gradfit-demo
