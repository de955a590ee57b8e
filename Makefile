# Each target sets itself up: a local .venv with the package installed in editable mode.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: test demo bench clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	$(BIN)/python experiments/demo.py

# The test extras are installed here, so a broken one fails the run (tests/conftest.py).
# Two pytest-xdist workers: CI's machine has two cores, and one pytest process keeps them
# only ~60% busy (compiles are single-threaded). On a bigger machine: make test
# PYTEST_WORKERS=4 (each worker is a JAX process of its own, with four CPU devices;
# tests/conftest.py also sets the session's XLA flags and compilation cache).
PYTEST_WORKERS ?= 2
test: $(VENV)/.installed
	CALIB_JAX_REQUIRE_TEST_EXTRAS=1 $(BIN)/python -m pytest -n $(PYTEST_WORKERS)

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/metrics_bench.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis *.egg-info
