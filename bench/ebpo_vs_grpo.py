"""EBPO vs GRPO on the embedded task, same data order and compute, G = 2 and 4, several seeds.

For each seed one warm start is trained (the EBPO G=4 run's own supervised phase, saved as its
frozen reference); every other run of that seed starts from that same checkpoint. Per run:
held-out pass@1 over steps, the area under the reward curve (mean reward over steps) and the
first step at which held-out pass@1 reaches ``--target``. Prints a table, writes
``<out>/ebpo_vs_grpo.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def train(out: Path, name: str, *overrides: str) -> Path:
    """One run; a run whose summary.json exists already is reused (the bench can be resumed)."""
    if (out / name / "summary.json").is_file():
        return out / name
    cmd = [sys.executable, "-m", "ebpo_megatron.train", "--config", str(ROOT / "examples/tiny_cpu.yaml"),
           f"run.output_dir={out}", f"run.name={name}", "run.wandb=disabled", "run.resume=false", *overrides]
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return out / name


def summarize(run_dir: Path, target: float) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["step"], r["eval/pass@1"]) for r in rows if "eval/pass@1" in r]
    rewards = [r["reward/mean"] for r in rows if "reward/mean" in r]
    reached = next((s for s, v in evals if v >= target), None)
    return {"pass@1": evals, "start": evals[0][1], "end": evals[-1][1],
            "reward_auc": sum(rewards) / len(rewards), "steps_to_target": reached}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--groups", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--target", type=float, default=0.55)
    parser.add_argument("--out", type=Path, default=ROOT / "runs/ebpo_vs_grpo")
    args = parser.parse_args()
    results: dict[str, dict] = {}
    for seed in args.seeds:
        common = [f"run.seed={seed}", f"run.steps={args.steps}", "run.eval_every=10",
                  f"run.save_every={args.steps}"]
        warm = train(args.out, f"ebpo_G4_s{seed}", *common, "algorithm.estimator=ebpo", "rollout.n=4")
        results[f"ebpo_G4_s{seed}"] = summarize(warm, args.target)
        print(f"seed {seed}: ebpo G=4 done: {results[f'ebpo_G4_s{seed}']['start']:.3f} -> "
              f"{results[f'ebpo_G4_s{seed}']['end']:.3f}", flush=True)
        for estimator in ("ebpo", "grpo"):
            for g in args.groups:
                name = f"{estimator}_G{g}_s{seed}"
                if name in results:
                    continue
                # same prompts per step and the same number of responses per step for every G
                run = train(args.out, name, *common, f"algorithm.estimator={estimator}", f"rollout.n={g}",
                            f"data.prompts_per_step={128 // g}", "sft.steps=0",
                            f"model.checkpoint={warm / 'reference'}")
                results[name] = summarize(run, args.target)
                print(f"seed {seed}: {estimator} G={g}: {results[name]['start']:.3f} -> {results[name]['end']:.3f}",
                      flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ebpo_vs_grpo.json").write_text(json.dumps(results, indent=1))
    print(f"\n{'method':>10} {'G':>2} | {'pass@1 start':>12} {'pass@1 end':>18} {'reward AUC':>16} | steps to {args.target}")
    for estimator in ("ebpo", "grpo"):
        for g in args.groups:
            runs = [results[f"{estimator}_G{g}_s{s}"] for s in args.seeds]
            end = [r["end"] for r in runs]
            auc = [r["reward_auc"] for r in runs]
            reach = [r["steps_to_target"] for r in runs]
            sd = statistics.stdev(end) if len(end) > 1 else 0.0
            sd_auc = statistics.stdev(auc) if len(auc) > 1 else 0.0
            print(f"{estimator:>10} {g:>2} | {statistics.mean(r['start'] for r in runs):12.3f} "
                  f"{statistics.mean(end):10.3f} ± {sd:.3f} {statistics.mean(auc):9.3f} ± {sd_auc:.3f} | {reach}")
    plot(results, args)


def plot(results: dict, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.groups), figsize=(5 * len(args.groups), 3.6), sharey=True)
    for ax, g in zip(list(axes) if len(args.groups) > 1 else [axes], args.groups):
        for estimator, color in (("ebpo", "tab:blue"), ("grpo", "tab:orange")):
            for i, seed in enumerate(args.seeds):
                steps, values = zip(*results[f"{estimator}_G{g}_s{seed}"]["pass@1"])
                ax.plot(steps, values, color=color, alpha=0.8, label=estimator.upper() if i == 0 else None)
        ax.set_title(f"G = {g}")
        ax.set_xlabel("RL step")
    axes[0].set_ylabel("held-out pass@1")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(args.out / "ebpo_vs_grpo.png", dpi=110)
    print(f"wrote {args.out / 'ebpo_vs_grpo.png'}")


if __name__ == "__main__":
    main()
