PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip install --quiet -c constraints.txt

.PHONY: demo test docs lint bench clean

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

# the behaviour tests once more on the PyTorch LM kernel alone (test_lm_compiled and test_mgh
# compare the two kernels directly); first-order and LBFGS fits do not use an LM kernel
KERNEL_TESTS := tests/test_nist_fit.py tests/test_robust_vs_scipy.py tests/test_fit.py tests/test_warnings.py
NOT_LM := -k "not (gd or sgd or adam or lbfgs)"

# Numba compiles the kernels (tests/warm_kernels.py) while ruff and mypy run; pytest then
# loads them from its disk cache
test: $(VENV)/.dev
	$(BIN)/python tests/warm_kernels.py & warm=$$!; \
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/mypy; lint=$$?; \
	wait $$warm && exit $$lint
	$(BIN)/python -m pytest
	GRADFIT_COMPILED=0 $(BIN)/python -m pytest $(KERNEL_TESTS) $(NOT_LM)
	$(MAKE) docs

# the documentation site, built into site/ (ignored by git); --strict: a broken reference,
# link or docstring fails the build (and so make test)
docs: $(VENV)/.dev
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet -d site

bench: $(VENV)/.dev
	$(BIN)/python benchmarks/bench_demo_loop.py

clean:
	rm -rf $(VENV) gradfit-demo site
