#!/usr/bin/env python
"""Scaling sweep: a grid of trainer runs (model size x G x estimator x seed) and its results table.

    python tools/sweep.py --spec examples/sweeps/tiny_cpu.yaml --dry-run      # points and commands
    python tools/sweep.py --spec examples/sweeps/tiny_cpu.yaml --local        # run them here, then collect
    python tools/sweep.py --spec examples/sweeps/tiny_cpu.yaml --sbatch DIR   # one sbatch file per point
    python tools/sweep.py --spec examples/sweeps/tiny_cpu.yaml --collect      # results of finished points

The spec (YAML; relative paths are from the repository root, where the trainer runs)::

    name: tiny_cpu_scaling              # sweep directory: <output_dir>/<name>
    base_config: examples/tiny_cpu.yaml
    output_dir: runs                    # optional (default runs)
    overrides: {run.steps: 60}          # optional: dotted trainer keys set for every point
    model_sizes:                        # named override sets
      xs: {model.hidden_size: 64, model.ffn_hidden_size: 128}
    grid: {size: [xs], G: [2, 4], estimator: [ebpo, grpo], seed: [1]}
    responses_per_step: 128             # optional: data.prompts_per_step = responses_per_step / G
    slurm: {nodes: 1, gpus_per_node: 8, cpus_per_task: 12, time: "04:00:00", extra: [--partition=gpu]}

Every point is one trainer command, ``python -m ebpo_megatron.train --config BASE key=value ...``
(common overrides, then the size's, then ``rollout.n``, ``data.prompts_per_step``,
``algorithm.estimator``, ``run.seed``, ``run.output_dir``, ``run.name``), run in its own run
directory ``<output_dir>/<name>/<size>_G<g>_<estimator>_s<seed>``. All points are validated
with the trainer's own config loader before anything runs. ``--local`` runs the points one after
another (a point whose run directory has ``summary.json`` is skipped, so rerunning resumes the
sweep; an unfinished point resumes from its latest checkpoint), logging to ``<run dir>/sweep.log``.
``--sbatch DIR`` writes ``DIR/<point>.sbatch`` (each sources ``slurm/ebpo_launch.sh``: run name
and root via ``EBPO_RUN_NAME`` / ``EBPO_RUN_ROOT``) and ``DIR/submit_all.sh``.

Results (``<sweep dir>/results.csv`` and ``results.md``), one row per finished point:

- ``params``: parameters of the model, vocabulary as given (``planner.count_parameters``).
- ``pass1_start`` / ``pass1_end``: held-out pass@1 before RL and at the end (``summary.json``).
- ``reward_auc`` = (1/T) Σ_{t=1..T} r̄_t, with r̄_t the step's mean training reward
  (``reward/mean``) and T the number of RL steps: the area under the reward-vs-step curve drawn
  as unit-width bars, divided by T (the same definition as ``tools/compare.py``).
- ``rl_flops`` = Σ_t ``planner.flops_plan(...).model_flops`` at step t's measured lengths: the
  model FLOPs of rollout (prefill + decode), the PPO updates (3x forward per epoch) and the
  old/reference/step-KL forward passes, with forward = (2·N_matmul + 4·L·a·d·s)·tokens. Step t's
  tokens come from metrics.jsonl: the trainer's trained-token count ``perf/tokens_per_s`` x
  ``perf/train_step_s`` (ppo_epochs x Σ of prompt + response lengths over the M·G sequences)
  and ``response/length_mean``; mean prompt length = tokens / (ppo_epochs·M·G) − mean response.
  The supervised warm start is not counted, nor extra DAPO dynamic-sampling rounds.
- ``wall_s``: ``summary.json``'s wall seconds (of the last process, when a point was resumed).

Exit status: 0 done, 1 a point failed (the others still ran), 2 a bad spec or arguments.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ebpo_megatron import planner
from ebpo_megatron.config.schema import Config, load_config
from ebpo_megatron.config.typed import ConfigError, from_dict, load_yaml
from ebpo_megatron.trainer.metrics_log import read_metrics

GRID_KEYS = ("size", "G", "estimator", "seed")
# trainer keys each point sets itself; a spec's overrides may not touch them
POINT_KEYS = ("rollout.n", "data.prompts_per_step", "algorithm.estimator", "run.seed", "run.output_dir",
              "run.name")
SPEC_KEYS = {"name", "base_config", "output_dir", "overrides", "model_sizes", "grid", "responses_per_step", "slurm"}
RESULT_COLUMNS = ("size", "params", "G", "estimator", "seed", "steps", "pass1_start", "pass1_end", "reward_auc",
                  "rl_flops", "wall_s")


class SpecError(ValueError):
    """The sweep spec is invalid; the message names the key, size or point."""


@dataclass(frozen=True)
class SlurmOptions:
    """``#SBATCH`` resources of every point's job (``--ntasks-per-node`` = ``gpus_per_node``)."""

    nodes: int = 1
    gpus_per_node: int = 1
    cpus_per_task: int = 8
    time: str = "04:00:00"
    signal_lead_s: int = 300  # SIGUSR1 this long before the limit: one step plus one checkpoint
    extra: tuple[str, ...] = ()  # further sbatch options, e.g. "--partition=gpu"


@dataclass(frozen=True)
class Point:
    """One grid point: its trainer overrides (without run name and directory) and where it runs."""

    size: str
    group_size: int
    estimator: str
    seed: int
    train_overrides: tuple[str, ...]
    sweep_dir: Path

    @property
    def name(self) -> str:
        return f"{self.size}_G{self.group_size}_{self.estimator}_s{self.seed}"

    @property
    def run_dir(self) -> Path:
        return self.sweep_dir / self.name

    @property
    def overrides(self) -> tuple[str, ...]:
        """Everything passed to the trainer, run directory included."""
        return (*self.train_overrides, f"run.output_dir={_shown(self.sweep_dir)}", f"run.name={self.name}")

    @property
    def finished(self) -> bool:
        return (self.run_dir / "summary.json").is_file()


@dataclass(frozen=True)
class Sweep:
    """A parsed spec: base config, named model sizes (in spec order) and the grid's axes."""

    name: str
    base_config: Path
    sweep_dir: Path
    common: dict[str, Any]
    sizes: dict[str, dict[str, Any]]
    grid_sizes: tuple[str, ...]
    group_sizes: tuple[int, ...]
    estimators: tuple[str, ...]
    seeds: tuple[int, ...]
    responses_per_step: int | None = None
    slurm: SlurmOptions = field(default_factory=SlurmOptions)

    def points(self) -> list[Point]:
        """The grid in order size, G, estimator, seed."""
        return [self._point(size, g, est, seed) for size in self.grid_sizes for g in self.group_sizes
                for est in self.estimators for seed in self.seeds]

    def _point(self, size: str, g: int, estimator: str, seed: int) -> Point:
        values = {**self.common, **self.sizes[size], "rollout.n": g}
        if self.responses_per_step is not None:
            values["data.prompts_per_step"] = self.responses_per_step // g
        values.update({"algorithm.estimator": estimator, "run.seed": seed})
        return Point(size, g, estimator, seed, tuple(f"{k}={format_value(v)}" for k, v in values.items()),
                     self.sweep_dir)

    def config(self, point: Point) -> Config:
        """The point's resolved trainer config (the trainer's own loader and override parser)."""
        try:
            return load_config(self.base_config, list(point.overrides))
        except ConfigError as err:
            raise SpecError(f"point {point.name}: {err}") from err


def format_value(value: Any) -> str:
    """A value as the trainer's override parser (a YAML scalar) reads it back: plain strings stay
    bare when they round-trip, everything else is written as JSON (valid YAML flow)."""
    if isinstance(value, str) and load_yaml(value) == value:
        return value
    return json.dumps(value)


def _resolve(path: str | Path) -> Path:
    path = Path(path)
    return path if path.is_absolute() else ROOT / path


def _shown(path: Path) -> str:
    """``path`` as commands write it: relative to the repository root (their working directory)
    when inside it, so sbatch files work from any checkout (``EBPO_ROOT``)."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SpecError(f"{where}: expected a mapping of dotted.key: value, got {value!r}")
    bad = [k for k in value if k in POINT_KEYS]
    if bad:
        raise SpecError(f"{where}: {bad} are set by the grid for each point; remove them")
    return {str(k): v for k, v in value.items()}


def _axis(grid: dict[str, Any], key: str, kind: type) -> tuple:
    values = grid.get(key)
    if not isinstance(values, list) or not values:
        raise SpecError(f"grid.{key}: expected a non-empty list, got {values!r}")
    for v in values:
        if not isinstance(v, kind) or isinstance(v, bool):
            raise SpecError(f"grid.{key}: {v!r} is not a {kind.__name__}")
    if len(set(values)) != len(values):
        raise SpecError(f"grid.{key}: repeated values in {values}")
    return tuple(values)


def parse_spec(data: Any) -> Sweep:
    """Build and check a Sweep from the spec's parsed YAML; every point's config is validated."""
    if not isinstance(data, dict):
        raise SpecError(f"spec: expected a mapping, got {data!r}")
    unknown = sorted(set(data) - SPEC_KEYS)
    if unknown:
        raise SpecError(f"spec: unknown key(s) {unknown}; valid keys: {sorted(SPEC_KEYS)}")
    for key in ("name", "base_config", "model_sizes", "grid"):
        if key not in data:
            raise SpecError(f"spec: missing required key {key!r}")
    name = data["name"]
    if not isinstance(name, str) or not name or "/" in name:
        raise SpecError(f"name: expected a directory name, got {name!r}")
    base = _resolve(data["base_config"])
    if not base.is_file():
        raise SpecError(f"base_config: {base} not found")
    sizes_raw = data["model_sizes"]
    if not isinstance(sizes_raw, dict) or not sizes_raw:
        raise SpecError("model_sizes: expected a mapping of size name -> overrides")
    sizes = {str(k): _mapping(v, f"model_sizes.{k}") for k, v in sizes_raw.items()}
    bad_names = [k for k in sizes if not re.fullmatch(r"[A-Za-z0-9.-]+", k)]
    if bad_names:
        raise SpecError(f"model_sizes: names {bad_names} may use only letters, digits, '.' and '-' (run dir names)")
    grid = data["grid"]
    if not isinstance(grid, dict) or set(grid) != set(GRID_KEYS):
        raise SpecError(f"grid: expected exactly the keys {list(GRID_KEYS)}, got {grid!r}")
    grid_sizes = _axis(grid, "size", str)
    for size in grid_sizes:
        if size not in sizes:
            raise SpecError(f"grid.size: unknown model size {size!r}; model_sizes defines {sorted(sizes)}")
    group_sizes = _axis(grid, "G", int)
    responses = data.get("responses_per_step")
    if responses is not None:
        bad = [g for g in group_sizes if not isinstance(responses, int) or responses % g]
        if bad:
            raise SpecError(f"responses_per_step: {responses!r} is not a multiple of G = {bad}")
    try:
        slurm = from_dict(SlurmOptions, data.get("slurm"), prefix="slurm")  # e.g. time: quote "04:00:00"
    except ConfigError as err:
        raise SpecError(str(err)) from err
    sweep = Sweep(
        name=name, base_config=base, sweep_dir=_resolve(data.get("output_dir", "runs")) / name,
        common=_mapping(data.get("overrides"), "overrides"), sizes=sizes, grid_sizes=grid_sizes,
        group_sizes=group_sizes, estimators=_axis(grid, "estimator", str), seeds=_axis(grid, "seed", int),
        responses_per_step=responses, slurm=slurm,
    )
    for point in sweep.points():
        sweep.config(point)
    return sweep


def load_spec(path: str | Path) -> Sweep:
    """Read and check a spec file."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: spec file not found")
    try:
        return parse_spec(load_yaml(path.read_text()))
    except SpecError as err:
        raise SpecError(f"{path}: {err}") from err


# ----------------------------------------------------------------------------------- running
def train_command(point: Point, sweep: Sweep, python: str = sys.executable) -> list[str]:
    """The trainer command of a point (run from the repository root)."""
    return [python, "-m", "ebpo_megatron.train", "--config", _shown(sweep.base_config), *point.overrides]


def run_local(sweep: Sweep, python: str = sys.executable) -> list[Point]:
    """Run the unfinished points one after another; returns those that failed."""
    points = sweep.points()
    failed = []
    for i, point in enumerate(points, 1):
        head = f"[{i}/{len(points)}] {point.name}"
        if point.finished:
            print(f"{head}: finished earlier, skipped", flush=True)
            continue
        point.run_dir.mkdir(parents=True, exist_ok=True)
        log_path = point.run_dir / "sweep.log"
        print(f"{head}: running (log {log_path})", flush=True)
        started = time.time()
        with log_path.open("a") as log:
            rc = subprocess.run(train_command(point, sweep, python), cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT, check=False).returncode
        if rc != 0 or not point.finished:
            print(f"{head}: FAILED (exit status {rc}); see {log_path}", flush=True)
            failed.append(point)
            continue
        summary = json.loads((point.run_dir / "summary.json").read_text())
        print(f"{head}: held-out pass@1 {summary['heldout_pass@1_start']:.3f} -> {summary['heldout_pass@1_end']:.3f} "
              f"in {time.time() - started:.0f} s", flush=True)
    return failed


# ------------------------------------------------------------------------------------ sbatch
def sbatch_script(point: Point, sweep: Sweep, spec_path: Path) -> str:
    """A job script for one point: Slurm resources, then ``slurm/ebpo_launch.sh``'s ``ebpo_main``
    with the point's overrides (arguments given to the script come last and win)."""
    s = sweep.slurm
    job = f"{sweep.name}-{point.name}"
    lines = [
        "#!/bin/bash",
        f"# Sweep {sweep.name}, point {point.name}; written by tools/sweep.py --spec {spec_path}.",
        f"#   sbatch {point.name}.sbatch [key=value ...]     bash {point.name}.sbatch --dry-run",
        f"#SBATCH --job-name={job}",
        f"#SBATCH --nodes={s.nodes}",
        f"#SBATCH --ntasks-per-node={s.gpus_per_node}",
        f"#SBATCH --gpus-per-node={s.gpus_per_node}",
        f"#SBATCH --cpus-per-task={s.cpus_per_task}",
        f"#SBATCH --time={s.time}",
        "#SBATCH --requeue",
        f"#SBATCH --signal=B:USR1@{s.signal_lead_s}",
        "#SBATCH --open-mode=append",
        f"#SBATCH --output={sweep.sweep_dir / 'logs'}/{point.name}-%j.out",
        *(f"#SBATCH {opt}" for opt in s.extra),
        "",
        "set -euo pipefail",
        f"export EBPO_ROOT=${{EBPO_ROOT:-{shlex.quote(str(ROOT))}}}",
        f"export EBPO_RUN_NAME={shlex.quote(point.name)}",
        f"export EBPO_RUN_ROOT={shlex.quote(_shown(sweep.sweep_dir))}",
        f"EBPO_DEFAULT_CONFIG={shlex.quote(_shown(sweep.base_config))}",
        f"EBPO_DEFAULT_NODES={s.nodes}",
        f"EBPO_DEFAULT_GPUS_PER_NODE={s.gpus_per_node}",
        f"EBPO_DEFAULT_CPUS_PER_TASK={s.cpus_per_task}",
        f"EBPO_DEFAULT_JOB_NAME={shlex.quote(job)}",
        "",
        "# shellcheck source=slurm/ebpo_launch.sh",
        'source "$EBPO_ROOT/slurm/ebpo_launch.sh"',
        "ebpo_main \\",
        *(f"    {shlex.quote(o)} \\" for o in point.train_overrides),
        '    "$@"',
    ]
    return "\n".join(lines) + "\n"


def submit_script(sweep: Sweep, points: list[Point]) -> str:
    """``submit_all.sh``: sbatch every point that has no summary.json yet."""
    names = " ".join(shlex.quote(p.name) for p in points)
    root = shlex.quote(str(sweep.sweep_dir))
    return "\n".join([
        "#!/bin/bash",
        f"# Submit every unfinished point of sweep {sweep.name} (written by tools/sweep.py).",
        "set -euo pipefail",
        'here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)',
        f"mkdir -p {root}/logs",
        f"for point in {names}; do",
        f'    if [[ -f {root}/"$point"/summary.json ]]; then',
        '        echo "$point: finished, not submitted"',
        "    else",
        '        sbatch "$here/$point.sbatch"',
        "    fi",
        "done",
    ]) + "\n"


def write_sbatch(sweep: Sweep, out_dir: Path, spec_path: Path) -> list[Path]:
    """Write one ``<point>.sbatch`` per point and ``submit_all.sh`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    points = sweep.points()
    written = []
    for point in points:
        path = out_dir / f"{point.name}.sbatch"
        path.write_text(sbatch_script(point, sweep, spec_path))
        path.chmod(0o755)
        written.append(path)
    submit = out_dir / "submit_all.sh"
    submit.write_text(submit_script(sweep, points))
    submit.chmod(0o755)
    return [*written, submit]


# ------------------------------------------------------------------------------------ results
def reward_auc(rows: list[dict[str, Any]]) -> float:
    """(1/T) Σ_t r̄_t over the RL steps (rows with ``reward/mean``)."""
    rewards = [r["reward/mean"] for r in rows if "reward/mean" in r]
    if not rewards:
        raise ValueError("no RL step logged reward/mean")
    return sum(rewards) / len(rewards)


def rl_flops(config: Config, rows: list[dict[str, Any]]) -> float:
    """Σ over RL steps of the planner's model FLOPs at the step's measured lengths (module doc)."""
    inp = planner.plan_inputs_from_config(
        config, nodes=1, gpus_per_node=config.parallel.tensor_parallel * config.parallel.pipeline_parallel)
    rollout = planner.rollout_plan(inp)
    sequences = inp.prompts_per_step * inp.group_size
    total = 0.0
    for row in (r for r in rows if "reward/mean" in r):
        tokens = round(row["perf/tokens_per_s"] * row["perf/train_step_s"]) / inp.ppo_epochs
        response = row["response/length_mean"]
        step = dataclasses.replace(inp, mean_prompt_tokens=tokens / sequences - response,
                                   mean_response_tokens=response)
        total += planner.flops_plan(step, rollout).model_flops
    return total


def point_result(sweep: Sweep, point: Point) -> dict[str, Any]:
    """One table row from a finished point's summary.json and metrics.jsonl."""
    config = sweep.config(point)
    summary = json.loads((point.run_dir / "summary.json").read_text())
    rows = read_metrics(point.run_dir / "metrics.jsonl")
    params = planner.count_parameters(planner.plan_inputs_from_config(config, nodes=1, gpus_per_node=1)).total
    return {
        "size": point.size, "params": params, "G": point.group_size, "estimator": point.estimator,
        "seed": point.seed, "steps": summary["steps"], "pass1_start": summary["heldout_pass@1_start"],
        "pass1_end": summary["heldout_pass@1_end"], "reward_auc": reward_auc(rows),
        "rl_flops": rl_flops(config, rows), "wall_s": summary["wall_seconds"],
    }


def collect(sweep: Sweep) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows of the finished points (grid order) and the names of the unfinished ones."""
    rows, missing = [], []
    for point in sweep.points():
        if point.finished:
            rows.append(point_result(sweep, point))
        else:
            missing.append(point.name)
    return rows, missing


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key == "rl_flops":
        return f"{value:.3e}"
    if key in ("pass1_start", "pass1_end", "reward_auc"):
        return f"{value:.3f}"
    if key == "params":
        return f"{value:,}"
    return str(value)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The results as a Markdown table."""
    lines = ["| " + " | ".join(RESULT_COLUMNS) + " |", "|" + "---|" * len(RESULT_COLUMNS)]
    lines += ["| " + " | ".join(_cell(k, row[k]) for k in RESULT_COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def write_results(sweep: Sweep, rows: list[dict[str, Any]], missing: list[str]) -> tuple[Path, Path]:
    """Write ``results.csv`` (full precision) and ``results.md`` into the sweep directory."""
    sweep.sweep_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = sweep.sweep_dir / "results.csv", sweep.sweep_dir / "results.md"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=RESULT_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    text = [f"# Sweep {sweep.name}", "", f"Base config: `{_shown(sweep.base_config)}`; {len(rows)} finished point(s).",
            ("reward_auc = (1/T) Σ_t mean reward of step t; rl_flops = planner model FLOPs of the RL steps "
             "(tools/sweep.py)."), "", markdown_table(rows)]
    if missing:
        text += ["", f"Not finished: {', '.join(missing)}"]
    md_path.write_text("\n".join(text) + "\n")
    return csv_path, md_path


# ---------------------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--spec", required=True, type=Path, help="sweep spec YAML (e.g. examples/sweeps/tiny_cpu.yaml)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--local", action="store_true", help="run the points here, one after another, then collect")
    mode.add_argument("--sbatch", type=Path, metavar="DIR", help="write one sbatch file per point and submit_all.sh")
    mode.add_argument("--collect", action="store_true", help="only collect the finished points' results")
    p.add_argument("--dry-run", action="store_true", help="print the points and their commands; run/write nothing")
    return p


def _dry_run(sweep: Sweep, sbatch_dir: Path | None) -> None:
    for point in sweep.points():
        state = "finished" if point.finished else "pending"
        print(f"{point.name}  [{state}]  {point.run_dir}")
        if sbatch_dir is None:
            print("  " + shlex.join(train_command(point, sweep)))
        else:
            print(f"  sbatch {sbatch_dir / (point.name + '.sbatch')}  (overrides: {' '.join(point.train_overrides)})")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not (args.local or args.sbatch or args.collect or args.dry_run):
        _parser().error("choose --local, --sbatch DIR, --collect or --dry-run")
    try:
        sweep = load_spec(args.spec)
    except SpecError as err:
        print(f"sweep: spec error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        _dry_run(sweep, args.sbatch)
        return 0
    if args.sbatch:
        written = write_sbatch(sweep, args.sbatch, args.spec)
        print(f"wrote {len(written) - 1} sbatch files and {written[-1]}")
        return 0
    failed = run_local(sweep) if args.local else []
    rows, missing = collect(sweep)
    csv_path, md_path = write_results(sweep, rows, missing)
    print(markdown_table(rows))
    print(f"wrote {csv_path} and {md_path}" + (f"; not finished: {', '.join(missing)}" if missing else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
