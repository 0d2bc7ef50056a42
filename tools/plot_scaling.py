#!/usr/bin/env python
"""Plot a sweep's results table (``tools/sweep.py``): two panels.

    python tools/plot_scaling.py --results runs/tiny_cpu_scaling/results.csv --out docs/scaling.png

Left: final held-out pass@1 against RL training compute (``rl_flops``, log x), one line per
estimator and G through the model sizes; each marker is the mean over seeds, bars span the
seeds' min and max; grey crosses mark each size's pass@1 before RL. Right: reward AUC against
G, one line per estimator and model size, mean over seeds with min/max bars.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

NUMERIC = {"params": int, "G": int, "seed": int, "steps": int, "pass1_start": float, "pass1_end": float,
           "reward_auc": float, "rl_flops": float, "wall_s": float}


def read_results(path: str | Path) -> list[dict]:
    """Rows of results.csv with numeric columns parsed."""
    with Path(path).open(newline="") as f:
        return [{k: NUMERIC[k](v) if k in NUMERIC else v for k, v in row.items()} for row in csv.DictReader(f)]


def seed_stats(rows: list[dict], key: str) -> tuple[float, float, float]:
    """Mean, min and max of ``key`` over rows (the seeds of one configuration)."""
    values = [r[key] for r in rows]
    return statistics.fmean(values), min(values), max(values)


def _errorbar(ax, xs: list[float], stats: list[tuple[float, float, float]], **style) -> None:
    means = [s[0] for s in stats]
    low = [s[0] - s[1] for s in stats]
    high = [s[2] - s[0] for s in stats]
    ax.errorbar(xs, means, yerr=[low, high], capsize=3, **style)


def plot(rows: list[dict], out: Path) -> Path:
    """Draw both panels into ``out``: colour = estimator, line style = G (left) or size (right)."""
    sizes = sorted({r["size"] for r in rows}, key=lambda s: next(r["params"] for r in rows if r["size"] == s))
    estimators = sorted({r["estimator"] for r in rows})
    groups = sorted({r["G"] for r in rows})
    colour = {e: f"C{i}" for i, e in enumerate(estimators)}
    styles = ["-", "--", ":", "-."]
    markers = ["o", "s", "^", "D", "v"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6))

    lines: dict[tuple[str, int], dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        lines[(r["estimator"], r["G"])][r["size"]].append(r)
    for (estimator, g), by_size in sorted(lines.items()):
        present = [s for s in sizes if s in by_size]
        flops = [statistics.fmean(r["rl_flops"] for r in by_size[s]) for s in present]
        _errorbar(left, flops, [seed_stats(by_size[s], "pass1_end") for s in present], label=f"{estimator} G={g}",
                  color=colour[estimator], linestyle=styles[groups.index(g) % len(styles)], marker="o")
    by_size_all: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_size_all[r["size"]].append(r)
    starts = [(statistics.fmean(r["rl_flops"] for r in by_size_all[s]), seed_stats(by_size_all[s], "pass1_start"))
              for s in sizes]
    left.scatter([x for x, _ in starts], [st[0] for _, st in starts], marker="x", color="grey",
                 label="before RL (warm start)")
    for size, (x, st) in zip(sizes, starts):
        left.annotate(size, (x, st[0]), textcoords="offset points", xytext=(5, 4), color="grey")
    left.set_xscale("log")
    left.set_xlabel("RL training compute (FLOPs)")
    left.set_ylabel("final held-out pass@1")
    left.set_title("final pass@1 vs RL compute (mean over seeds, min/max bars)")
    left.legend(fontsize=8)

    curves: dict[tuple[str, str], dict[int, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        curves[(r["estimator"], r["size"])][r["G"]].append(r)
    for (estimator, size), by_g in sorted(curves.items(), key=lambda kv: (kv[0][0], sizes.index(kv[0][1]))):
        gs = sorted(by_g)
        i = sizes.index(size)
        _errorbar(right, gs, [seed_stats(by_g[g], "reward_auc") for g in gs], label=f"{estimator}, {size}",
                  color=colour[estimator], linestyle=styles[i % len(styles)], marker=markers[i % len(markers)])
    right.set_xlabel("G (responses per prompt)")
    right.set_xticks(groups)
    right.set_ylabel("reward AUC (mean training reward over steps)")
    right.set_title("reward AUC vs G (mean over seeds, min/max bars)")
    right.legend(fontsize=8, ncol=2)

    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", required=True, type=Path, help="results.csv written by tools/sweep.py")
    parser.add_argument("--out", required=True, type=Path, help="PNG to write")
    args = parser.parse_args(argv)
    rows = read_results(args.results)
    if not rows:
        print(f"plot_scaling: {args.results} has no rows", file=sys.stderr)
        return 1
    print(f"wrote {plot(rows, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
