#!/usr/bin/env python
"""Does a recipe learn on every seed and thread count? Runs a config over seeds x torch threads.

    python tools/seed_check.py --config examples/tiny_cpu.yaml --seeds 1 2 3 --threads 1 2 \\
        --results results/seed_check/tiny_cpu [--min-gain 0.10 --min-median 0.5] [key=value ...]

Each run is the whole config (warm start + RL) with ``run.seed`` and ``run.torch_threads`` set,
in ``<work>/[<kernels>_]t<threads>_s<seed>``; its summary (held-out pass@1 at the start and the
end of RL, wall seconds, reward AUC, ...) is written to ``<results>/[<kernels>_]t<threads>_s<seed>.json``
(commit it). A run whose result exists is skipped, so the check resumes. Another CPU reduces in
another order: ``--kernels avx2`` (torch's ``ATEN_CPU_CAPABILITY``) runs torch's kernels of
another SIMD width, which does that here. (A different thread count may not: the tiny model's
ops are too small for torch to split, and its 1- and 2-thread runs are bit-identical.)

Printed: one row per run (start, end, gain = end − start, wall seconds), then the criteria
(every gain >= ``--min-gain``, median end >= ``--min-median``). Exit status: 0 all runs met
them, 1 a run failed or a criterion was missed, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ebpo_megatron.atomic_file import write_text_atomic
from ebpo_megatron.config.schema import load_config
from ebpo_megatron.config.typed import ConfigError
from ebpo_megatron.evaluation.comparison import run_summary
from ebpo_megatron.trainer.metrics_log import read_metrics


def run_name(seed: int, threads: int, kernels: str | None) -> str:
    return f"{kernels + '_' if kernels else ''}t{threads}_s{seed}"


def run_one(config: Path, seed: int, threads: int, work: Path, results: Path, overrides: list[str],
            kernels: str | None = None) -> bool:
    """One run (skipped when its result exists); False when the trainer failed. ``kernels``:
    torch's CPU kernel set (``ATEN_CPU_CAPABILITY``, e.g. "avx2")."""
    name = run_name(seed, threads, kernels)
    result = results / f"{name}.json"
    if result.is_file():
        return True
    print(f"[seed_check] {name}", flush=True)
    command = [sys.executable, "-m", "ebpo_megatron.train", "--config", str(config), *overrides,
               f"run.seed={seed}", f"run.torch_threads={threads}", f"run.output_dir={work}", f"run.name={name}",
               "run.wandb=disabled"]
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **({"ATEN_CPU_CAPABILITY": kernels} if kernels else {})}
    with (work / f"{name}.log").open("a") as log:
        if subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode != 0:
            return False
    run_dir = work / name
    summary = json.loads((run_dir / "summary.json").read_text())
    record = {"seed": seed, "threads": threads, "kernels": kernels or "default", "wall_seconds": summary["wall_seconds"],
              **run_summary(read_metrics(run_dir / "metrics.jsonl"))}
    write_text_atomic(result, json.dumps(record, indent=1))
    return True


def table(records: list[dict[str, Any]], min_gain: float, min_median: float) -> tuple[str, bool]:
    """Markdown rows per run and the verdict of the two criteria."""
    lines = ["| kernels | threads | seed | start | end | gain | wall s |", "|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r.get('kernels', 'default')} | {r['threads']} | {r['seed']} | {r['pass1_start']:.3f} | "
                     f"{r['pass1_end']:.3f} | "
                     f"{r['pass1_end'] - r['pass1_start']:+.3f} | {r['wall_seconds']:.0f} |")
    gains = [r["pass1_end"] - r["pass1_start"] for r in records]
    median_end = statistics.median(r["pass1_end"] for r in records)
    every = all(g >= min_gain - 1e-9 for g in gains)
    lines += ["", f"runs: {len(records)}; gain min {min(gains):+.3f}, median {statistics.median(gains):+.3f}, "
                  f"max {max(gains):+.3f}; end median {median_end:.3f}; wall max {max(r['wall_seconds'] for r in records):.0f} s",
              f"every gain >= {min_gain}: {'yes' if every else 'NO'}; "
              f"median end >= {min_median}: {'yes' if median_end >= min_median else 'NO'}"]
    return "\n".join(lines), every and median_end >= min_median


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", required=True)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--results", type=Path, required=True, help="folder of per-run JSON results (commit it)")
    parser.add_argument("--work", type=Path, default=None, help="run directories (default runs/seed_check/<name>)")
    parser.add_argument("--kernels", default=None,
                        help="torch's CPU kernel set, ATEN_CPU_CAPABILITY (e.g. avx2): other SIMD widths "
                             "reduce in another order, as another CPU does")
    parser.add_argument("--min-gain", type=float, default=0.10)
    parser.add_argument("--min-median", type=float, default=0.5)
    parser.add_argument("--report", action="store_true", help="only print the finished runs")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value config overrides")
    args = parser.parse_args(argv)
    try:
        load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"seed_check: error: {err}", file=sys.stderr)
        return 2
    work = args.work or ROOT / "runs/seed_check" / args.results.name
    failed = []
    for threads in args.threads:
        for seed in args.seeds:
            if not args.report and not run_one(args.config, seed, threads, work, args.results, args.overrides,
                                               args.kernels):
                failed.append(run_name(seed, threads, args.kernels))
    files = [args.results / f"{run_name(s, t, args.kernels)}.json" for t in args.threads for s in args.seeds]
    records = [json.loads(f.read_text()) for f in files if f.is_file()]
    if not records:
        print("seed_check: no finished run", file=sys.stderr)
        return 1
    text, met = table(records, args.min_gain, args.min_median)
    print(text)
    if failed:
        print(f"seed_check: failed runs: {', '.join(failed)} (logs in {work})", file=sys.stderr)
    return 0 if met and not failed else 1


if __name__ == "__main__":
    sys.exit(main())
