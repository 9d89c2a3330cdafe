# `make train` and `make test` each set up a virtual environment in the checkout
# (editable install with the test and gpu-aot extras) and then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# Simulated CPU devices for the 2x4 mesh demo and the multi-device tests.
export XLA_FLAGS ?= --xla_force_host_platform_device_count=8

.PHONY: setup train test demo gpu-check

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test,gpu-aot]"
	touch $(STAMP)

setup: $(STAMP)

train: $(STAMP)
	$(PY) scripts/train.py --config configs/tiny.yaml --mesh 2x4 --run-dir runs/tiny

demo: $(STAMP)
	$(PY) scripts/demo.py

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --durations=15 tests

# On a machine with a GPU (about 5 minutes): kernels, ragged MoE paths, 20 training steps.
gpu-check: $(STAMP)
	$(PY) scripts/gpu_check.py --json gpu_check.json
