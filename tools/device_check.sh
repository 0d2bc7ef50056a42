#!/usr/bin/env bash
# The GPU checks of issue 4 in one run on a lent GPU machine (the `device` tool; see
# docs/performance.md, "GPU checks"): the GPU-only tests and the bf16 MFU bench of a ~1.2B model.
# That machine has torch but not Megatron-Core: carry its wheel in .whl/ (megatron-core 0.16.1,
# cp312, manylinux; the command is in docs/performance.md). Logs go to $OUT (the device tool's
# folder that comes back), else runs/device. MFU_ARGS replaces bench/mfu.py's default flags.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs/device}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
status=0
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
fi
python3 -m pytest -q -rs tests/test_gpu_only.py 2>&1 | tee "$out/gpu_tests.log" || status=1
# shellcheck disable=SC2086  # MFU_ARGS is a list of flags
python3 bench/mfu.py ${MFU_ARGS:-} 2>&1 | tee "$out/mfu_local_bf16.log" || status=1
exit $status
