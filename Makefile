# Set-up and everyday commands. Everything installs into .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# torch first, pinned: 2.13.0 is a local CPU wheel here; an unpinned torch pulls GBs of CUDA packages.
TORCH_PIN ?= torch==2.13.0

.PHONY: install test test-fast demo bench lint clean

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q -e ".[dev,bench]"
	touch $@

install: $(VENV)/.installed

lint: install
	$(VENV)/bin/ruff check sparsesolve tests benchmarks

test: lint
	OMP_NUM_THREADS=2 $(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

demo: install
	$(PY) -m sparsesolve.demo

bench: install
	$(PY) -m benchmarks.bench_solvers

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
