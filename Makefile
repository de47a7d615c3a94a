# Two commands matter: `make demo` and `make test`. Both build .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch first, pinned to the version this platform ships as a CPU wheel; the
# project's own range (torch>=2.11) is then already satisfied and pip pulls no
# CUDA build. Override on machines with another torch: make setup TORCH_SPEC=... (pip arguments,
# e.g. TORCH_SPEC="torch==2.11.0 --index-url https://download.pytorch.org/whl/cu130").
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast bench gpu-check gpu-check-prepare clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) tools/demo.py

# The slowest tests are listed at the end, so that every CI log shows where the time goes.
test: $(STAMP)
	$(PY) -m pytest -q --durations=30

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

bench: $(STAMP)
	$(PY) tools/bench_preprocess.py

# On a GPU machine with no package index: its own python3 and torch, wheels from wheels-gpu/ (no venv).
gpu-check:
	bash tools/gpu_check.sh

# Once, on a development machine: fills wheels-gpu/ (wheels and real text) for the GPU machine.
gpu-check-prepare: $(STAMP)
	PYTHON_PREPARE=$(PY) bash tools/gpu_check.sh --prepare

clean:
	rm -rf $(VENV) build *.egg-info
