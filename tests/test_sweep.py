"""tools/sweep.py and tools/plot_scaling.py: grid expansion, commands the trainer's own parser
accepts, sbatch files, the results table from fabricated run directories, resume, spec errors."""

from __future__ import annotations

import csv
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ebpo_megatron.config.schema import load_config
from ebpo_megatron.config.typed import apply_overrides, load_yaml

from tool_import import load_tool

ROOT = Path(__file__).resolve().parents[1]


sweep = load_tool("sweep")
plot_scaling = load_tool("plot_scaling")

# xs: L=1, h=64, f=128, a=4 heads, kv=2, d=16, vocab 32 (the base config's)
SIZES = {
    "xs": {"model.num_layers": 1, "model.hidden_size": 64, "model.ffn_hidden_size": 128},
    "s": {"model.num_layers": 2, "model.hidden_size": 128, "model.ffn_hidden_size": 256,
          "data.synthetic.levels": [0, 1]},
}


def _spec(tmp_path: Path, **changes) -> dict:
    spec = {
        "name": "demo",
        "base_config": "examples/tiny_cpu.yaml",
        "output_dir": str(tmp_path / "runs"),
        "overrides": {"run.steps": 3, "run.wandb": "disabled", "train.optim.lr": 1e-4},
        "model_sizes": SIZES,
        "grid": {"size": ["xs", "s"], "G": [2, 4], "estimator": ["ebpo", "grpo"], "seed": [1, 2]},
    }
    spec.update(changes)
    return spec


def _write(tmp_path: Path, spec: dict) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_grid_expansion_and_run_dirs(tmp_path):
    s = sweep.load_spec(_write(tmp_path, _spec(tmp_path)))
    points = s.points()
    assert len(points) == 2 * 2 * 2 * 2
    assert [p.name for p in points[:4]] == ["xs_G2_ebpo_s1", "xs_G2_ebpo_s2", "xs_G2_grpo_s1", "xs_G2_grpo_s2"]
    assert points[-1].name == "s_G4_grpo_s2"
    assert len({p.name for p in points}) == len(points)
    for p in points:
        assert p.run_dir == tmp_path / "runs" / "demo" / f"{p.size}_G{p.group_size}_{p.estimator}_s{p.seed}"
    # relative paths are from the repository root, and commands (run there) keep them relative
    spec = _spec(tmp_path)
    del spec["output_dir"]
    relative = sweep.load_spec(_write(tmp_path, spec))
    first = relative.points()[0]
    assert first.run_dir == ROOT / "runs" / "demo" / "xs_G2_ebpo_s1"
    assert first.overrides[-2:] == ("run.output_dir=runs/demo", "run.name=xs_G2_ebpo_s1")
    assert sweep.train_command(first, relative)[3:5] == ["--config", "examples/tiny_cpu.yaml"]


def test_dry_run_commands_parse_with_the_trainers_parser(tmp_path, capsys):
    spec = _write(tmp_path, _spec(tmp_path, responses_per_step=64))
    assert sweep.main(["--spec", str(spec), "--dry-run"]) == 0
    commands = [shlex.split(line) for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
    assert len(commands) == 16
    seen = set()
    for cmd in commands:
        assert cmd[1:4] == ["-m", "ebpo_megatron.train", "--config"]
        base, overrides = cmd[4], cmd[5:]
        config = load_config(base, overrides)
        raw = apply_overrides(load_yaml(Path(base).read_text()), overrides)
        size = "xs" if config.model.hidden_size == 64 else "s"
        for key, value in SIZES[size].items():
            section, *rest = key.split(".")
            node = raw[section]
            for part in rest:
                node = node[part]
            assert node == value
        g = config.rollout.n
        assert config.data.prompts_per_step == 64 // g
        assert config.run.steps == 3 and config.run.wandb == "disabled" and config.train.optim.lr == 1e-4
        name = f"{size}_G{g}_{config.algorithm.estimator}_s{config.run.seed}"
        assert config.run.name == name
        assert Path(config.run.output_dir) == tmp_path / "runs" / "demo"
        seen.add(name)
    assert seen == {p.name for p in sweep.load_spec(spec).points()}
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing


def _ebpo_main_args(text: str) -> list[str]:
    lines = text.splitlines()
    start = lines.index("ebpo_main \\")
    return shlex.split(" ".join(line.rstrip("\\") for line in lines[start + 1:]))


def test_sbatch_files(tmp_path):
    spec = _write(tmp_path, _spec(tmp_path, slurm={"nodes": 2, "gpus_per_node": 8, "extra": ["--partition=gpu"]}))
    out = tmp_path / "sbatch"
    assert sweep.main(["--spec", str(spec), "--sbatch", str(out)]) == 0
    s = sweep.load_spec(spec)
    for point in s.points():
        path = out / f"{point.name}.sbatch"
        text = path.read_text()
        assert _ebpo_main_args(text) == [*point.train_overrides, "$@"]
        assert f"export EBPO_RUN_NAME={point.name}\n" in text
        assert f"export EBPO_RUN_ROOT={tmp_path / 'runs' / 'demo'}\n" in text
        for line in ("#SBATCH --nodes=2", "#SBATCH --gpus-per-node=8", "#SBATCH --ntasks-per-node=8",
                     "#SBATCH --partition=gpu", 'source "$EBPO_ROOT/slurm/ebpo_launch.sh"'):
            assert line in text.splitlines()
        load_config(s.base_config, list(point.train_overrides))
        assert subprocess.run(["bash", "-n", str(path)], check=False).returncode == 0
    submit = (out / "submit_all.sh").read_text()
    assert subprocess.run(["bash", "-n", str(out / "submit_all.sh")], check=False).returncode == 0
    assert all(p.name in submit for p in s.points())


def test_sbatch_file_dry_run_through_the_launcher(tmp_path):
    """The generated job runs slurm/ebpo_launch.sh's --dry-run (planner check) with its overrides."""
    spec = _write(tmp_path, _spec(tmp_path, grid={"size": ["xs"], "G": [4], "estimator": ["grpo"], "seed": [3]}))
    out = tmp_path / "sbatch"
    assert sweep.main(["--spec", str(spec), "--sbatch", str(out)]) == 0
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["EBPO_PYTHON"] = sys.executable
    done = subprocess.run(["bash", str(out / "xs_G4_grpo_s3.sbatch"), "--dry-run"], capture_output=True, text=True,
                          env=env, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    overrides = next(line for line in done.stdout.splitlines() if line.startswith("overrides"))
    assert f"run.name=xs_G4_grpo_s3 run.output_dir={tmp_path / 'runs' / 'demo'}" in overrides
    assert "model.hidden_size=64" in overrides and "rollout.n=4" in overrides and "run.seed=3" in overrides


def _fabricate(run_dir: Path, rewards: list[float], tokens: list[int], responses: list[float],
               pass1: tuple[float, float], wall: float) -> None:
    """A finished run: summary.json and metrics.jsonl as trainer/run.py and rl_loop.py write them."""
    run_dir.mkdir(parents=True)
    rows = [{"step": 0, "time_s": 0.5, "eval/pass@1": pass1[0]}]
    for step, (reward, n_tok, resp) in enumerate(zip(rewards, tokens, responses), 1):
        seconds = 0.25 * step
        rows.append({"step": step, "time_s": float(step), "reward/mean": reward, "response/length_mean": resp,
                     "perf/tokens_per_s": n_tok / seconds, "perf/train_step_s": seconds})
    rows[-1]["eval/pass@1"] = pass1[1]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 9, "trunc')
    (run_dir / "summary.json").write_text(json.dumps({
        "estimator": "x", "steps": len(rewards), "heldout_pass@1_start": pass1[0],
        "heldout_pass@1_end": pass1[1], "wall_seconds": wall, "checkpoint": "none"}))


def _hand_flops(prompts: int, g: int, tokens: int, response: float) -> float:
    """Planner model FLOPs of one step of size xs, written out by hand.

    xs: L=1, h=64, f=128, a=4, kv=2, d=16; Megatron pads vocab 32 -> 128.
    N_matmul = L*(q + k,v + o + mlp) + embedding = (64*64 + 2*64*2*16 + 64*64 + 3*64*128) + 128*64 = 45056;
    attention per token per context position = 4*L*a*d = 256. Base config: ppo_epochs 1,
    kl_coef 0.001 > 0 and step_kl -> 3 extra forward passes (old, reference, step KL).
    """
    n, attn = 45056, 256.0
    seqs = prompts * g
    s = tokens / seqs
    r = response
    p = s - r
    forward = (2 * n + attn * s) * tokens
    train = 3 * forward
    logprob = 3 * forward
    rollout = 2 * n * (prompts * p + seqs * r) + attn * (prompts * p * p + seqs * r * (p + r / 2))
    return train + logprob + rollout


def test_collect_builds_the_table(tmp_path, capsys):
    spec = _write(tmp_path, _spec(tmp_path, grid={"size": ["xs"], "G": [2, 4], "estimator": ["ebpo"], "seed": [1]},
                                  responses_per_step=64))
    runs = tmp_path / "runs" / "demo"
    # responses_per_step 64 -> data.prompts_per_step 32, 64 sequences per step at G=2
    _fabricate(runs / "xs_G2_ebpo_s1", rewards=[0.1, 0.3, 0.8], tokens=[640, 704, 768], responses=[3.0, 4.0, 5.0],
               pass1=(0.2, 0.35), wall=12.5)
    assert sweep.main(["--spec", str(spec), "--collect"]) == 0
    printed = capsys.readouterr().out
    assert "not finished: xs_G4_ebpo_s1" in printed
    with (runs / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1
    row = rows[0]
    # params, vocab as given: embedding 32*64 + output 32*64 + q 4096 + k,v 4096 + o 4096 + mlp 24576
    # + 2 norms 128 + final norm 64
    assert int(row["params"]) == 2048 + 2048 + 4096 + 4096 + 4096 + 24576 + 128 + 64 == 41152
    assert (row["size"], row["G"], row["estimator"], row["seed"], row["steps"]) == ("xs", "2", "ebpo", "1", "3")
    assert float(row["pass1_start"]) == 0.2 and float(row["pass1_end"]) == 0.35
    assert float(row["reward_auc"]) == pytest.approx((0.1 + 0.3 + 0.8) / 3)
    expected = sum(_hand_flops(32, 2, t, r) for t, r in [(640, 3.0), (704, 4.0), (768, 5.0)])
    assert float(row["rl_flops"]) == pytest.approx(expected, rel=1e-12)
    assert float(row["wall_s"]) == 12.5
    md = (runs / "results.md").read_text()
    assert "| xs | 41,152 | 2 | ebpo | 1 | 3 | 0.200 | 0.350 | 0.400 |" in md
    assert "Not finished: xs_G4_ebpo_s1" in md

    out = tmp_path / "scaling.png"
    assert plot_scaling.main(["--results", str(runs / "results.csv"), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_local_resume_skips_finished_points(tmp_path, monkeypatch, capsys):
    spec = _write(tmp_path, _spec(tmp_path, grid={"size": ["xs"], "G": [2, 4], "estimator": ["ebpo"], "seed": [1]}))
    s = sweep.load_spec(spec)
    done, todo = s.points()
    _fabricate(done.run_dir, [0.5], [640], [3.0], (0.1, 0.2), 1.0)
    launched = []

    def fake_run(cmd, cwd, stdout, stderr, check):
        name = next(a.split("=", 1)[1] for a in cmd if a.startswith("run.name="))
        launched.append(name)
        (s.sweep_dir / name / "summary.json").write_text(
            json.dumps({"heldout_pass@1_start": 0.1, "heldout_pass@1_end": 0.2}))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(sweep.subprocess, "run", fake_run)
    assert sweep.run_local(s) == []
    assert launched == [todo.name]
    assert "xs_G2_ebpo_s1: finished earlier, skipped" in capsys.readouterr().out
    assert sweep.run_local(s) == [] and launched == [todo.name]  # everything finished now


def test_failed_point_is_reported_and_the_rest_still_run(tmp_path, monkeypatch):
    spec = _write(tmp_path, _spec(tmp_path, grid={"size": ["xs"], "G": [2, 4], "estimator": ["ebpo"], "seed": [1]}))
    s = sweep.load_spec(spec)
    calls = []
    monkeypatch.setattr(sweep.subprocess, "run",
                        lambda cmd, **_: calls.append(cmd) or subprocess.CompletedProcess(cmd, 1))
    assert [p.name for p in sweep.run_local(s)] == ["xs_G2_ebpo_s1", "xs_G4_ebpo_s1"]
    assert len(calls) == 2


@pytest.mark.parametrize("change, message", [
    ({"grid": {"size": ["xs", "huge"], "G": [2], "estimator": ["ebpo"], "seed": [1]}}, "unknown model size 'huge'"),
    ({"model_sizes": {**SIZES, "xs": {"model.hidden_sise": 64}}}, "model.hidden_sise: unknown key"),
    ({"overrides": {"run.stepz": 3}}, "run.stepz: unknown key"),
    ({"overrides": {"rollout.n": 8}}, "['rollout.n'] are set by the grid"),
    ({"grid": {"size": ["xs"], "G": [2], "estimator": ["ebpoo"], "seed": [1]}}, "algorithm.estimator"),
    ({"responses_per_step": 6}, "not a multiple of G = [4]"),
    ({"grids": {}}, "unknown key(s) ['grids']"),
    ({"slurm": {"nodez": 2}}, "slurm.nodez: unknown key"),
    ({"slurm": {"time": 14400}}, "slurm.time: got 14400, expected a string"),
    ({"model_sizes": {**SIZES, "x_l": {}}}, "names ['x_l'] may use only"),
])
def test_bad_spec_is_a_clear_error(tmp_path, capsys, change, message):
    spec = _write(tmp_path, _spec(tmp_path, **change))
    with pytest.raises(sweep.SpecError) as err:
        sweep.load_spec(spec)
    assert message in str(err.value)
    assert sweep.main(["--spec", str(spec), "--dry-run"]) == 2
    assert message in capsys.readouterr().err
