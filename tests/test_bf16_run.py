"""``ebpo-train`` with ``model.precision: bf16`` on the embedded task: warm start (fp32 main
parameters), bf16 native rollouts, a bf16 reference, truncated importance sampling switched on
by ``tis_cap: auto``, finite metrics; and a resume from a bf16 checkpoint that reproduces the
uninterrupted run (fp32 main parameters and Adam state restored, not rebuilt from bf16)."""

from __future__ import annotations

import math
import shutil
import subprocess

import pytest
import yaml

from test_train_e2e import ROOT, command, comparable, env, last_rows

BF16 = ["model.precision=bf16", "run.steps=2", "run.save_every=1", "run.eval_every=2", "sft.steps=10",
        "sft.warmup_steps=0", "sft.batch_size=64"]


def train(out) -> subprocess.CompletedProcess:
    done = subprocess.run(command(out, *BF16), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("bf16")
    done = train(out)
    return out / "e2e", done.stdout + done.stderr


def test_bf16_run_is_finite_and_engages_tis(straight):
    run_dir, output = straight
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["model"]["precision"] == "bf16"
    assert config["algorithm"]["loss"]["tis_cap"] == 2.0  # "auto" resolved and recorded
    assert "[precision] algorithm.loss.tis_cap auto -> 2.0" in output
    rows = last_rows(run_dir / "metrics.jsonl")
    assert sorted(rows) == [0, 1, 2]
    for step in (1, 2):
        assert "actor/tis_weight_mean" in rows[step]
        for key in ("actor/loss", "actor/grad_norm", "actor/kl_ref", "actor/param_norm", "rollout/logp_diff_max"):
            assert math.isfinite(rows[step][key]), (step, key)
    assert "[sft] warm start: loss" in output


def test_bf16_resume_reproduces_the_uninterrupted_run(straight, tmp_path):
    run_dir, _ = straight
    resumed_dir = tmp_path / "e2e"
    shutil.copytree(run_dir, resumed_dir)
    shutil.rmtree(resumed_dir / "checkpoints/step_000002")  # as if killed during step 2
    done = train(tmp_path)
    assert "[resume] continuing from step 1" in done.stdout + done.stderr
    want, got = last_rows(run_dir / "metrics.jsonl"), last_rows(resumed_dir / "metrics.jsonl")
    assert comparable(got[2]) == pytest.approx(comparable(want[2]), rel=1e-6, abs=1e-9)
    assert got[2]["actor/param_norm"] == pytest.approx(want[2]["actor/param_norm"], rel=1e-9)
