# Two set-up commands for a fresh machine: `make run` and `make test`.
# torch==2.13.0 is installed before anything that depends on it, so pip takes the local CPU
# build instead of pulling gigabytes of CUDA wheels.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test bench clean

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,math]'
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m ebpo_megatron.train --config examples/tiny_cpu.yaml

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) bench/estimator_mse.py --out runs/estimator_study
	$(PY) bench/estimator_speed.py

clean:
	rm -rf $(VENV) runs
