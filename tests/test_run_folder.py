"""What a resume does to the run folder (trainer/run.py): a resume that fails (here: a model of
another size than the checkpoint's) leaves every file byte-identical, config.yaml included; a
resume with nothing left to do adds its time to summary.json's wall_seconds instead of
replacing the run's total."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ["run.name=r", "run.steps=2", "run.eval_every=2", "run.save_every=2", "run.keep_last=1", "run.wandb=disabled",
        "run.torch_threads=1", "sft.steps=0", "data.prompts_per_step=4", "data.synthetic.num_train=40",
        "data.synthetic.num_eval=8", "model.hidden_size=32", "model.ffn_hidden_size=64",
        "train.step.micro_batch_size=16"]


def train(out: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "ebpo_megatron.train", "--config", str(ROOT / "examples/tiny_cpu.yaml"),
               f"run.output_dir={out}", *TINY, *extra]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"})


def snapshot(directory: Path) -> dict[str, bytes | None]:
    """Every path under ``directory``: file bytes, None for a directory."""
    return {str(p.relative_to(directory)): p.read_bytes() if p.is_file() else None
            for p in sorted(directory.rglob("*"))}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """The output folder of a finished 2-step run (its run folder: ``r``)."""
    out = tmp_path_factory.mktemp("finished")
    done = train(out)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.fixture
def copy(finished, tmp_path) -> Path:
    shutil.copytree(finished, tmp_path / "out")
    return tmp_path / "out"


def test_a_failed_resume_leaves_the_run_folder_as_it_was(copy):
    before = snapshot(copy / "r")
    done = train(copy, "model.hidden_size=48")  # the checkpoints hold a hidden size of 32
    assert done.returncode == 2, done.stderr[-3000:]
    assert "ebpo-train: error:" in done.stderr
    after = snapshot(copy / "r")
    assert sorted(after) == sorted(before)
    assert [name for name in before if after[name] != before[name]] == []


def test_a_no_op_resume_adds_its_time_to_wall_seconds(copy):
    summary_file = copy / "r" / "summary.json"
    summary = json.loads(summary_file.read_text())
    summary_file.write_text(json.dumps({**summary, "wall_seconds": 2292.5}))  # as after a long first run
    done = train(copy)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = json.loads(summary_file.read_text())
    assert resumed["wall_seconds"] > 2292.5
    assert resumed["steps"] == summary["steps"] == 2


def _stored_weights(checkpoint: Path) -> dict:
    from ebpo_megatron.conversion.dcp_stream import read_slices, stored_tensors

    stored = stored_tensors(checkpoint)
    return read_slices(checkpoint, {k: ((0,) * len(shape), shape, dtype) for k, (shape, dtype) in stored.items()})


def test_reference_holds_the_warm_started_policy_also_without_a_kl_term(tmp_path):
    """``reference/`` is the policy as RL starts: written after a warm start even with
    ``kl_coef: 0`` (tools/compare.py starts every arm from it), and not at all without either.
    The first RL step of a linear warm-up runs at learning rate 0, so the step-1 checkpoint still
    holds those weights."""
    warm = train(tmp_path / "warm", "sft.steps=5", "algorithm.loss.kl_coef=0", "run.steps=1", "run.save_every=1",
                 "train.optim.warmup_steps=5")
    assert warm.returncode == 0, warm.stderr[-3000:]
    plain = train(tmp_path / "plain", "algorithm.loss.kl_coef=0", "run.steps=1", "run.save_every=1")
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert not (tmp_path / "plain/r/reference").exists()
    reference = _stored_weights(tmp_path / "warm/r/reference")
    step_one = _stored_weights(tmp_path / "warm/r/checkpoints/step_000001")
    assert reference and all(torch.equal(reference[k], step_one[k]) for k in reference)
    initial = _stored_weights(tmp_path / "plain/r/checkpoints/step_000001")
    assert any(not torch.equal(reference[k], initial[k]) for k in reference)  # the warm start moved them
