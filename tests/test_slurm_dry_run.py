"""The Slurm launch scripts: `--dry-run` with a faked Slurm environment prints the planner's layout
and memory; a launch with fake `srun`/`scontrol` forwards SIGUSR1 to the step and requeues."""

from __future__ import annotations

import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ebpo_megatron.config.schema import load_config
from ebpo_megatron.planner import make_plan, plan_inputs_from_config

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = [ROOT / "slurm/ebpo_70b.sh", ROOT / "slurm/ebpo_8b_single_node.sh", ROOT / "slurm/ebpo_launch.sh"]


def slurm_env(tmp_path: Path, nodes: int | None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "EBPO_", "MASTER_", "NCCL_"))}
    env.update(EBPO_PYTHON=sys.executable, EBPO_RUN_ROOT=str(tmp_path / "runs"), EBPO_LOG_ROOT=str(tmp_path / "logs"))
    if nodes is not None:
        env.update(
            SLURM_NNODES=str(nodes), SLURM_JOB_NUM_NODES=str(nodes), SLURM_JOB_NODELIST=f"gpu[001-{nodes:03d}]",
            SLURM_GPUS_PER_NODE="8", SLURM_NTASKS_PER_NODE="8", SLURM_NTASKS=str(8 * nodes),
            SLURM_JOB_ID="4242", SLURM_JOB_NAME="ebpo-test", SLURM_CPUS_PER_TASK="12",
        )
    env.update(extra)
    return env


def dry_run(script: str, env: dict[str, str], *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / script), "--dry-run", *overrides], env=env, cwd="/",
                          capture_output=True, text=True, timeout=300)


def expected_plan(config: str, nodes: int, overrides: list[str]):
    cfg = load_config(ROOT / config, overrides)
    return make_plan(plan_inputs_from_config(cfg, nodes=nodes, gpus_per_node=8))


def parse(out: str) -> dict[str, str]:
    line = next(x for x in out.splitlines() if x.startswith("summary: "))
    return dict(item.split("=", 1) for item in line[len("summary: "):].split())


def check_against_planner(out: str, plan) -> None:
    summary = parse(out)
    inp = plan.inputs
    assert int(summary["world"]) == plan.world_size
    assert (int(summary["tp"]), int(summary["pp"]), int(summary["dp"])) == (
        inp.tensor_parallel, inp.pipeline_parallel, plan.data_parallel)
    assert float(summary["peak_gib"]) == round(plan.peak_gib, 2)
    assert summary["fits"] == "True"
    assert f"TP x PP x DP     {inp.tensor_parallel} x {inp.pipeline_parallel} x {plan.data_parallel}" in out
    peak_row = next(x for x in out.splitlines() if x.strip().startswith("PEAK"))
    assert max(float(v) for v in peak_row.split()[1:]) == pytest.approx(round(plan.peak_gib, 2))


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_scripts_parse(script):
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    if shutil.which("shellcheck"):
        proc = subprocess.run(["shellcheck", "-x", "-S", "warning", str(script)], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout
    text = script.read_text()
    if script.name != "ebpo_launch.sh":
        assert os.access(script, os.X_OK)
        for directive in ("--ntasks-per-node=8", "--gpus-per-node=8", "--exclusive", "--time=", "--requeue",
                          "--signal=B:USR1@"):
            assert f"#SBATCH {directive}" in text, directive


def test_70b_dry_run_matches_planner(tmp_path):
    proc = dry_run("slurm/ebpo_70b.sh", slurm_env(tmp_path, 8))
    assert proc.returncode == 0, proc.stderr + proc.stdout
    out = proc.stdout
    overrides = ["run.name=ebpo-test", f"run.output_dir={tmp_path / 'runs'}", "run.resume=true"]
    plan = expected_plan("examples/llama3.1_70b_ebpo.yaml", 8, overrides)
    check_against_planner(out, plan)
    assert (plan.inputs.tensor_parallel, plan.inputs.pipeline_parallel, plan.data_parallel) == (8, 8, 1)
    assert "nodes        8 x 8 GPUs = 64 ranks (gpu[001-008])" in out
    assert "MASTER_ADDR=gpu001 MASTER_PORT=24242" in out
    assert f"run dir      {tmp_path / 'runs'}/ebpo-test" in out
    assert f"log dir      {tmp_path / 'logs'}/ebpo-test/4242_restart0" in out
    command = next(x for x in out.splitlines() if x.startswith("command"))
    assert "srun --nodes=8 --ntasks-per-node=8 --cpus-per-task=12" in command
    assert "-m ebpo_megatron.train --config examples/llama3.1_70b_ebpo.yaml run.name=ebpo-test" in command
    assert not (tmp_path / "logs").exists()  # a dry run creates nothing


def test_70b_dry_run_on_4_nodes(tmp_path):
    env = slurm_env(tmp_path, 4)
    proc = dry_run("slurm/ebpo_70b.sh", env)  # TP 8 x PP 8 needs 64 GPUs
    assert proc.returncode == 2
    assert "world size 32 (4 nodes x 8 GPUs) is not divisible by tensor_parallel x pipeline_parallel = 8 x 8 = 64" in proc.stderr
    # the 4-node fallback of the config header: PP 4, vLLM at 0.30 of the GPU
    extra = ["parallel.pipeline_parallel=4", "rollout.vllm.gpu_memory_utilization=0.3"]
    proc = dry_run("slurm/ebpo_70b.sh", env, *extra)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    overrides = ["run.name=ebpo-test", f"run.output_dir={tmp_path / 'runs'}", "run.resume=true", *extra]
    plan = expected_plan("examples/llama3.1_70b_ebpo.yaml", 4, overrides)
    check_against_planner(proc.stdout, plan)
    assert parse(proc.stdout)["world"] == "32" and plan.data_parallel == 1
    # a layout that is legal but does not fit: exit 3 with the verdict
    proc = dry_run("slurm/ebpo_70b.sh", env, "parallel.pipeline_parallel=4")
    assert proc.returncode == 3 and "DOES NOT FIT" in proc.stdout


def test_8b_dry_run_without_any_slurm_variables(tmp_path):
    proc = dry_run("slurm/ebpo_8b_single_node.sh", slurm_env(tmp_path, None))
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "nodes        1 x 8 GPUs = 8 ranks (localhost)" in proc.stdout
    plan = expected_plan("examples/llama3.1_8b_ebpo.yaml", 1,
                         ["run.name=ebpo-llama8b", f"run.output_dir={tmp_path / 'runs'}", "run.resume=true"])
    check_against_planner(proc.stdout, plan)
    assert (plan.inputs.tensor_parallel, plan.data_parallel) == (4, 2)


def test_dry_run_env_overrides_and_bad_arguments(tmp_path):
    env = slurm_env(tmp_path, 8, EBPO_TRAIN_FILES="/d/a.parquet,/d/b.jsonl", EBPO_MODEL_CKPT="/ckpt/70b",
                    EBPO_RUN_NAME="stable", SLURM_GPUS_PER_NODE="h100:8", SLURM_RESTART_COUNT="3")
    proc = dry_run("slurm/ebpo_70b.sh", env)
    assert proc.returncode == 0, proc.stderr
    assert "data.train_files=[/d/a.parquet, /d/b.jsonl]" in proc.stdout
    assert "model.checkpoint=/ckpt/70b" in proc.stdout and "run.name=stable" in proc.stdout
    assert "/stable/4242_restart3" in proc.stdout
    bad = dry_run("slurm/ebpo_70b.sh", env, "--nodes=3")  # not passed on to the planner's own options
    assert bad.returncode == 2 and "unknown argument '--nodes=3'" in bad.stderr
    bad = dry_run("slurm/ebpo_70b.sh", env, "parallel.tensor_paralel=4")
    assert bad.returncode == 2 and "Did you mean 'parallel.tensor_parallel'" in bad.stderr
    bad = subprocess.run(["bash", str(ROOT / "slurm/ebpo_70b.sh"), "--bogus"], env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown argument '--bogus'" in bad.stderr
    mismatch = slurm_env(tmp_path, 8, SLURM_NTASKS_PER_NODE="4")
    bad = dry_run("slurm/ebpo_70b.sh", mismatch)
    assert bad.returncode == 2 and "must equal --gpus-per-node" in bad.stderr


FAKE_SRUN = """#!/bin/bash
printf '%s\\n' "$@" > "$FAKE_DIR/srun_args"
env > "$FAKE_DIR/srun_env"
if [[ ${FAKE_SRUN_MODE:-} == exit ]]; then exit 0; fi
trap 'echo usr1 > "$FAKE_DIR/got_usr1"; exit 0' USR1
touch "$FAKE_DIR/srun_started"
while :; do sleep 0.1; done
"""
FAKE_SCONTROL = """#!/bin/bash
if [[ $1 == show && $2 == hostnames ]]; then echo node-a; echo node-b; exit 0; fi
echo "$@" >> "$FAKE_DIR/scontrol_calls"
"""


@pytest.mark.parametrize("mode", ["signal", "exit"])
def test_launch_forwards_usr1_to_srun_and_requeues(tmp_path, mode):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        path = bin_dir / name
        path.write_text(body)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    env = slurm_env(tmp_path, 8, FAKE_DIR=str(tmp_path), PATH=f"{bin_dir}:{os.environ['PATH']}",
                    FAKE_SRUN_MODE=mode)
    proc = subprocess.Popen(["bash", str(ROOT / "slurm/ebpo_70b.sh")], env=env, cwd="/",
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        if mode == "signal":
            deadline = time.time() + 240
            while not (tmp_path / "srun_started").exists():
                assert proc.poll() is None, proc.stdout.read()
                assert time.time() < deadline
                time.sleep(0.2)
            proc.send_signal(signal.SIGUSR1)  # what Slurm does with --signal=B:USR1@...
        out, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    args = (tmp_path / "srun_args").read_text().splitlines()
    assert args[:3] == ["--nodes=8", "--ntasks-per-node=8", "--cpus-per-task=12"]
    assert args[args.index("-m") + 1] == "ebpo_megatron.train"
    srun_env = dict(line.split("=", 1) for line in (tmp_path / "srun_env").read_text().splitlines() if "=" in line)
    assert srun_env["MASTER_ADDR"] == "node-a" and srun_env["MASTER_PORT"] == "24242"
    assert srun_env["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    assert "RANK" not in srun_env and "WORLD_SIZE" not in srun_env  # ranks come from SLURM_PROCID per task
    assert (tmp_path / "logs/ebpo-test/4242_restart0/launch_env.txt").is_file()
    calls = (tmp_path / "scontrol_calls").read_text() if (tmp_path / "scontrol_calls").exists() else ""
    if mode == "signal":
        assert (tmp_path / "got_usr1").read_text().strip() == "usr1"
        assert "requeue 4242" in calls
        assert re.search(r"SIGUSR1: the time limit is near", out)
    else:
        assert "requeue" not in calls
