"""`make test-real`: checks on the fetched SmolLM2-135M-Instruct checkpoint (runs/smollm2/hf,
written by tools/fetch_smollm2.py); not part of the CI suite, which needs no download."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # mp_utils, megatron_forward
HF_DIR = ROOT / "runs" / "smollm2" / "hf"


@pytest.fixture(scope="session")
def hf_dir() -> Path:
    if not (HF_DIR / "config.json").is_file():
        pytest.fail(f"{HF_DIR}: no checkpoint; run `make real` or tools/fetch_smollm2.py --out {HF_DIR} first")
    return HF_DIR
