#!/usr/bin/env python
"""Paired comparison of recipes ("arms") over seeds: GRPO vs EBPO-naive / -topic / -diff at several G.

    python tools/compare.py --spec examples/compare/tiny_cpu.yaml              # run what is missing, then report
    python tools/compare.py --spec examples/compare/tiny_cpu.yaml --seeds 1 2  # only these seeds
    python tools/compare.py --spec examples/compare/tiny_cpu.yaml --report     # report finished runs only
    python tools/compare.py --spec examples/compare/tiny_cpu.yaml --dry-run    # print the commands
    python tools/compare.py --spec examples/compare/tiny_cpu.yaml --resummarize  # rewrite the result files

Pairing: one seed = one warm start, one held-out set, one prompt pool, shared by every arm of that
seed. Per seed the tool runs, each step skipped when its output exists (so it resumes):

1. the warm start: the base config with ``run.seed=s`` for one RL step; its ``reference/``
   checkpoint (the weights right after the supervised warm start) and its tokenizer are the
   seed's starting point;
2. if an arm uses ``data.order: difficulty``: the warm-start policy's pass rate on every training
   prompt over ``difficulty.samples`` samples at ``difficulty.temperature``
   (``tools/estimate_difficulty.py``), written to ``difficulty.json``;
3. every arm at every G: ``model.checkpoint=<warm start> sft.steps=0 rollout.n=G
   data.prompts_per_step=responses_per_step/G run.seed=s`` plus the arm's overrides, in its own run
   directory (with the warm start's tokenizer copied in when it trained one, as the embedded task
   does; a Hugging Face tokenizer is read from ``data.tokenizer_dir``). An interrupted run resumes
   from its latest checkpoint. Its summary (``evaluation.comparison.run_summary``) is written to
   ``<results_dir>/s<seed>/<arm>_G<g>.json``: commit that folder, and no finished run is lost.

The report (``<results_dir>/report.md``, ``report.json``, ``<name>.png``): per G and arm, final
held-out pass@1 mean and 95% CI over seeds, the paired difference to the baseline arm with its 95%
CI, p-value and verdict, reward AUC, mean entropy, zero-signal fraction, S and μ_glob; and the
paired difference of every pair of arms listed under ``contrasts``.

Spec (YAML; paths relative to the repository root)::

    name: tiny_cpu
    base_config: examples/tiny_cpu.yaml
    work_dir: runs/compare/tiny_cpu         # checkpoints (large, not committed)
    results_dir: results/compare/tiny_cpu   # one JSON per finished run (commit it)
    seeds: [1, 2, 3]
    group_sizes: [2, 4]
    responses_per_step: 128                 # data.prompts_per_step = responses_per_step / G
    overrides: {run.torch_threads: 2}       # every run, warm start included
    baseline: grpo
    arms: {grpo: {algorithm.estimator: grpo}, ebpo_naive: {algorithm.estimator: ebpo, data.order: random}}
    contrasts: [[ebpo_naive, grpo]]         # optional: arm - other, paired, besides the baseline
    difficulty: {samples: 16, temperature: 1.0}

Exit status: 0 done, 1 a run failed (the others still ran), 2 a bad spec or arguments.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ebpo_megatron.atomic_file import write_text_atomic
from ebpo_megatron.config.schema import load_config
from ebpo_megatron.config.typed import ConfigError, load_yaml
from ebpo_megatron.evaluation.comparison import arm_statistics, paired_contrast, run_summary
from ebpo_megatron.trainer.metrics_log import read_metrics

SPEC_KEYS = {"name", "base_config", "work_dir", "results_dir", "seeds", "group_sizes", "responses_per_step",
             "overrides", "baseline", "arms", "difficulty", "contrasts"}
# keys the tool sets for every run; neither the spec's overrides nor an arm may set them
TOOL_KEYS = {"run.seed", "run.name", "run.output_dir", "model.checkpoint", "rollout.n",
             "data.prompts_per_step", "data.difficulty_file", "run.resume"}
# what makes the pairing (warm start, model, held-out set and prompt pool): common to every arm
PAIRED_PREFIXES = ("sft.", "model.", "data.synthetic.", "data.chat_arith.", "data.train_files",
                   "data.eval_files", "data.task", "run.torch_threads")


class SpecError(ValueError):
    """The comparison spec is invalid; the message names the key or arm."""


@dataclass(frozen=True)
class Comparison:
    name: str
    base_config: Path
    work_dir: Path
    results_dir: Path
    seeds: tuple[int, ...]
    group_sizes: tuple[int, ...]
    responses_per_step: int
    overrides: dict[str, Any]
    baseline: str
    arms: dict[str, dict[str, Any]]
    difficulty_samples: int = 16
    difficulty_temperature: float = 1.0
    contrasts: tuple[tuple[str, str], ...] = ()  # (arm, other): arm − other, paired, in the report

    # ----------------------------------------------------------------- where things are
    def seed_dir(self, seed: int) -> Path:
        return self.work_dir / f"s{seed}"

    def warm_dir(self, seed: int) -> Path:
        return self.seed_dir(seed) / "warm"

    def warm_checkpoint(self, seed: int) -> Path:
        return self.warm_dir(seed) / "reference"

    def difficulty_file(self, seed: int) -> Path:
        return self.seed_dir(seed) / "difficulty.json"

    def run_name(self, arm: str, g: int) -> str:
        return f"{arm}_G{g}"

    def result_file(self, seed: int, arm: str, g: int) -> Path:
        return self.results_dir / f"s{seed}" / f"{self.run_name(arm, g)}.json"

    def needs_difficulty(self) -> bool:
        return any(arm.get("data.order") == "difficulty" for arm in self.arms.values())

    # ----------------------------------------------------------------- trainer arguments
    def _common(self, seed: int) -> list[str]:
        return [*(f"{k}={v}" for k, v in self.overrides.items()), f"run.seed={seed}", "run.wandb=disabled"]

    def warm_overrides(self, seed: int) -> list[str]:
        """The base config for one RL step: its ``reference/`` is the supervised warm start."""
        return [*self._common(seed), "run.steps=1", "run.save_every=1", "run.keep_last=1",
                f"run.output_dir={self.seed_dir(seed)}", "run.name=warm"]

    def arm_overrides(self, seed: int, arm: str, g: int) -> list[str]:
        extra = [f"data.difficulty_file={self.difficulty_file(seed)}"] \
            if self.arms[arm].get("data.order") == "difficulty" else []
        return [*self._common(seed), *(f"{k}={v}" for k, v in self.arms[arm].items()), *extra,
                f"model.checkpoint={self.warm_checkpoint(seed)}", "sft.steps=0", f"rollout.n={g}",
                f"data.prompts_per_step={self.responses_per_step // g}",
                f"run.output_dir={self.seed_dir(seed)}", f"run.name={self.run_name(arm, g)}"]


def _resolve(path: Any) -> Path:
    path = Path(str(path))
    return path if path.is_absolute() else ROOT / path


def parse_spec(data: Any) -> Comparison:
    """Check a spec and every trainer config it implies (the trainer's own loader)."""
    if not isinstance(data, dict):
        raise SpecError(f"expected a mapping of {sorted(SPEC_KEYS)}, got {type(data).__name__}")
    unknown = set(data) - SPEC_KEYS
    if unknown:
        raise SpecError(f"unknown key(s) {sorted(unknown)}; expected some of {sorted(SPEC_KEYS)}")
    for key in ("name", "base_config", "work_dir", "results_dir", "seeds", "group_sizes", "responses_per_step",
                "baseline", "arms"):
        if key not in data:
            raise SpecError(f"{key}: missing")
    arms = data["arms"]
    if not isinstance(arms, dict) or not arms or not all(isinstance(v, dict) for v in arms.values()):
        raise SpecError("arms: expected a mapping of arm name -> {dotted.key: value}")
    if data["baseline"] not in arms:
        raise SpecError(f"baseline: {data['baseline']!r} is not one of the arms {sorted(arms)}")
    overrides = data.get("overrides") or {}
    for where, mapping in [("overrides", overrides), *((f"arms.{a}", o) for a, o in arms.items())]:
        clash = TOOL_KEYS & set(mapping)
        if clash:
            raise SpecError(f"{where}: {sorted(clash)} are set by the tool for every run")
    for arm, mapping in arms.items():
        unpaired = sorted(k for k in mapping if k.startswith(PAIRED_PREFIXES))
        if unpaired:
            raise SpecError(f"arms.{arm}: {unpaired} would break the pairing (every arm of a seed shares the "
                            "warm start, model, data and threads); set them in overrides")
    seeds, groups = data["seeds"], data["group_sizes"]
    if not seeds or not all(isinstance(s, int) for s in seeds) or len(set(seeds)) != len(seeds):
        raise SpecError(f"seeds: expected distinct integers, got {seeds}")
    if not groups or not all(isinstance(g, int) and g >= 2 for g in groups):
        raise SpecError(f"group_sizes: expected integers >= 2, got {groups}")
    responses = data["responses_per_step"]
    if not isinstance(responses, int) or any(responses % g for g in groups):
        raise SpecError(f"responses_per_step: expected an integer divisible by every G {groups}, got {responses}")
    contrasts = data.get("contrasts") or []
    if not isinstance(contrasts, list) or not all(
            isinstance(c, list) and len(c) == 2 and c[0] != c[1] and set(c) <= set(arms) for c in contrasts):
        raise SpecError(f"contrasts: expected a list of [arm, other] pairs of two different arms of "
                        f"{sorted(arms)}, got {contrasts!r}")
    difficulty = data.get("difficulty") or {}
    comparison = Comparison(
        name=str(data["name"]), base_config=_resolve(data["base_config"]), work_dir=_resolve(data["work_dir"]),
        results_dir=_resolve(data["results_dir"]), seeds=tuple(seeds), group_sizes=tuple(groups),
        responses_per_step=responses, overrides=dict(overrides), baseline=str(data["baseline"]),
        arms={str(k): dict(v) for k, v in arms.items()},
        difficulty_samples=int(difficulty.get("samples", 16)),
        difficulty_temperature=float(difficulty.get("temperature", 1.0)),
        contrasts=tuple((str(a), str(b)) for a, b in contrasts))
    seed = comparison.seeds[0]
    try:
        load_config(comparison.base_config, comparison.warm_overrides(seed))
        for arm in comparison.arms:
            for g in comparison.group_sizes:
                load_config(comparison.base_config, comparison.arm_overrides(seed, arm, g))
    except ConfigError as err:
        raise SpecError(f"a run's trainer config is invalid: {err}") from None
    return comparison


def load_spec(path: Path) -> Comparison:
    if not path.is_file():
        raise SpecError(f"--spec: file not found: {path}")
    try:
        return parse_spec(load_yaml(path.read_text()))
    except SpecError as err:
        raise SpecError(f"{path}: {err}") from None


# --------------------------------------------------------------------- running
def _train(comparison: Comparison, overrides: list[str], log: Path, python: str) -> bool:
    command = [python, "-m", "ebpo_megatron.train", "--config", str(comparison.base_config), *overrides]
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as out:
        return subprocess.run(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT).returncode == 0


def prepare_seed(comparison: Comparison, seed: int, python: str = sys.executable) -> bool:
    """The seed's warm start and (if needed) its measured difficulties; False when one failed."""
    warm = comparison.warm_checkpoint(seed)
    if not (warm / "COMPLETE").is_file():
        print(f"[compare] s{seed}: warm start", flush=True)
        if not _train(comparison, comparison.warm_overrides(seed), comparison.seed_dir(seed) / "warm.log", python):
            return False
    if comparison.needs_difficulty() and not comparison.difficulty_file(seed).is_file():
        print(f"[compare] s{seed}: difficulty ({comparison.difficulty_samples} samples per training prompt)",
              flush=True)
        command = [python, str(ROOT / "tools/estimate_difficulty.py"), "--checkpoint", str(warm),
                   "--out", str(comparison.difficulty_file(seed)), "--samples", str(comparison.difficulty_samples),
                   "--temperature", str(comparison.difficulty_temperature), "--seed", str(seed),
                   *(f"{k}={v}" for k, v in comparison.overrides.items() if k == "run.torch_threads")]
        log = comparison.seed_dir(seed) / "difficulty.log"
        with log.open("a") as out:
            if subprocess.run(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT).returncode != 0:
                return False
    return True


def run_arm(comparison: Comparison, seed: int, arm: str, g: int, python: str = sys.executable) -> bool:
    """One arm at one G for one seed (skipped when its result file exists); False on failure."""
    result = comparison.result_file(seed, arm, g)
    if result.is_file():
        return True
    run_dir = comparison.seed_dir(seed) / comparison.run_name(arm, g)
    tokenizer, trained = run_dir / "tokenizer", comparison.warm_dir(seed) / "tokenizer"
    if trained.is_dir() and not tokenizer.is_dir():  # a tokenizer trained by the warm start (the
        shutil.copytree(trained, tokenizer)          # embedded task): identical token ids in every arm
    print(f"[compare] s{seed}: {arm} G={g}", flush=True)
    if not _train(comparison, comparison.arm_overrides(seed, arm, g), run_dir / "compare.log", python):
        return False
    write_result(comparison, seed, arm, g)
    return True


def write_result(comparison: Comparison, seed: int, arm: str, g: int) -> None:
    """The result file of a finished run: its summary, from its run directory's metrics.jsonl."""
    run_dir = comparison.seed_dir(seed) / comparison.run_name(arm, g)
    summary = {"seed": seed, "arm": arm, "G": g, **run_summary(read_metrics(run_dir / "metrics.jsonl"))}
    write_text_atomic(comparison.result_file(seed, arm, g), json.dumps(summary, indent=1))


def resummarize(comparison: Comparison, seeds: tuple[int, ...]) -> int:
    """Rewrite the result file of every finished run whose run directory is here (after a change
    to what a summary holds); returns how many were rewritten. Runs nothing."""
    rewritten = 0
    for seed in seeds:
        for g in comparison.group_sizes:
            for arm in comparison.arms:
                metrics = comparison.seed_dir(seed) / comparison.run_name(arm, g) / "metrics.jsonl"
                if comparison.result_file(seed, arm, g).is_file() and metrics.is_file():
                    write_result(comparison, seed, arm, g)
                    rewritten += 1
    return rewritten


def run_all(comparison: Comparison, seeds: tuple[int, ...], python: str = sys.executable) -> list[str]:
    """Every missing run of ``seeds``; returns the names of those that failed."""
    failed = []
    for seed in seeds:
        if not prepare_seed(comparison, seed, python):
            failed.append(f"s{seed}/warm")
            continue
        for g in comparison.group_sizes:
            for arm in comparison.arms:
                if not run_arm(comparison, seed, arm, g, python):
                    failed.append(f"s{seed}/{comparison.run_name(arm, g)}")
    return failed


# --------------------------------------------------------------------- reporting
def load_results(comparison: Comparison) -> dict[int, dict[str, dict[int, dict[str, Any]]]]:
    """``results[G][arm][seed]``: every finished run's summary found in ``results_dir``."""
    results: dict[int, dict[str, dict[int, dict[str, Any]]]] = {}
    for g in comparison.group_sizes:
        results[g] = {}
        for arm in comparison.arms:
            found = {s: json.loads(comparison.result_file(s, arm, g).read_text())
                     for s in comparison.seeds if comparison.result_file(s, arm, g).is_file()}
            if found:
                results[g][arm] = found
    return results


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


def _num(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def _difference(d: dict[str, Any]) -> str:
    """A paired difference in points: mean (95% CI)."""
    return f"{100 * d['mean']:+.1f} ({100 * d['low']:+.1f}, {100 * d['high']:+.1f})"


def _p(d: dict[str, Any]) -> str:
    return "—" if d["p_value"] is None else f"{d['p_value']:.3f}"


def contrast_statistics(comparison: Comparison, results: dict[int, dict[str, dict[int, dict[str, Any]]]]
                        ) -> dict[int, list[dict[str, Any]]]:
    """``contrasts[G]``: per spec contrast whose two arms share a finished seed, arm − other."""
    out: dict[int, list[dict[str, Any]]] = {}
    for g, arms in results.items():
        for arm, other in comparison.contrasts:
            found = paired_contrast(arms.get(arm, {}), arms.get(other, {}))
            if found is not None:
                out.setdefault(g, []).append({"arm": arm, "other": other, **found})
    return out


def report_markdown(comparison: Comparison, stats: dict[int, dict[str, dict[str, Any]]],
                    contrasts: dict[int, list[dict[str, Any]]] | None = None) -> str:
    lines = [f"Held-out pass@1 (%) at the end of RL; 95% CIs over paired seeds; paired difference to "
             f"{comparison.baseline} at the same G.", "",
             "| G | arm | seeds | start | end (95% CI) | Δ vs " + comparison.baseline
             + " (95% CI) | p | verdict | reward AUC | entropy | zero-signal | S | μ_glob end |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for g, arms in stats.items():
        for arm, s in arms.items():
            end = s["pass1_end"]
            vs = s.get("vs_baseline")
            delta = "—" if vs is None else _difference(vs)
            pvalue = "—" if vs is None else _p(vs)
            lines.append(
                f"| {g} | {arm} | {end['n']} | {_pct(s['pass1_start'])} | {100 * end['mean']:.1f} "
                f"({100 * end['low']:.1f}, {100 * end['high']:.1f}) | {delta} | {pvalue} | "
                f"{'—' if vs is None else vs['verdict']} | {_pct(s['reward_auc'])} | "
                f"{_num(s['entropy_mean'])} | {_pct(s['zero_signal_mean'])} | {_num(s['shrinkage_mean'])} | "
                f"{_pct(s['mu_glob_end'])} |")
    if contrasts:
        lines += ["", "Paired contrasts: held-out pass@1 of arm − other at the end (points), over the seeds both "
                  "finished.", "", "| G | arm − other | seeds | Δ (95% CI) | p | verdict |", "|---|---|---|---|---|---|"]
        lines += [f"| {g} | {c['arm']} − {c['other']} | {c['n']} | {_difference(c)} | {_p(c)} | {c['verdict']} |"
                  for g, found in contrasts.items() for c in found]
    return "\n".join(lines) + "\n"


def plot(comparison: Comparison, results: dict[int, dict[str, dict[int, dict[str, Any]]]], out: Path) -> None:
    """One row per G: held-out pass@1, reward, entropy and zero-signal fraction over steps, each
    arm's mean over its seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("pass1_curve", "held-out pass@1"), ("reward/mean", "reward"), ("actor/entropy", "entropy"),
              ("adv/zero_signal_frac", "zero-signal fraction")]
    groups = [g for g in comparison.group_sizes if results.get(g)]
    fig, axes = plt.subplots(len(groups), len(panels), figsize=(4 * len(panels), 3 * len(groups)), squeeze=False)
    for row, g in enumerate(groups):
        for col, (key, label) in enumerate(panels):
            ax = axes[row][col]
            for arm, by_seed in results[g].items():
                curves = [r[key] if key == "pass1_curve" else r["curves"].get(key, []) for r in by_seed.values()]
                curves = [c for c in curves if c]
                if not curves:
                    continue
                length = min(len(c) for c in curves)
                steps = [step for step, _ in curves[0][:length]]
                mean = [sum(c[i][1] for c in curves) / len(curves) for i in range(length)]
                ax.plot(steps, mean, label=f"{arm} (n={len(curves)})")
            ax.set_title(f"G={g}: {label}", fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{comparison.name}: mean over paired seeds")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def write_report(comparison: Comparison) -> Path:
    results = load_results(comparison)
    stats = {g: arm_statistics(arms, comparison.baseline) for g, arms in results.items() if arms}
    contrasts = contrast_statistics(comparison, results)
    comparison.results_dir.mkdir(parents=True, exist_ok=True)
    report = {str(g): s for g, s in stats.items()}
    if contrasts:
        report["contrasts"] = {str(g): found for g, found in contrasts.items()}
    (comparison.results_dir / "report.json").write_text(json.dumps(report, indent=1))
    markdown = report_markdown(comparison, stats, contrasts)
    (comparison.results_dir / "report.md").write_text(markdown)
    if stats:
        plot(comparison, results, comparison.results_dir / f"{comparison.name}.png")
    print(markdown, flush=True)
    return comparison.results_dir / "report.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--spec", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="a subset of the spec's seeds")
    parser.add_argument("--report", action="store_true", help="only report the finished runs")
    parser.add_argument("--dry-run", action="store_true", help="print the trainer overrides of every run")
    parser.add_argument("--resummarize", action="store_true",
                        help="rewrite the finished runs' result files from their metrics.jsonl, then report")
    args = parser.parse_args(argv)
    try:
        comparison = load_spec(args.spec)
        seeds = tuple(args.seeds or comparison.seeds)
        if not set(seeds) <= set(comparison.seeds):
            raise SpecError(f"--seeds: {sorted(set(seeds) - set(comparison.seeds))} not in the spec's seeds")
    except SpecError as err:
        print(f"compare: error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        for seed in seeds:
            print(f"s{seed} warm: " + " ".join(comparison.warm_overrides(seed)))
            for g in comparison.group_sizes:
                for arm in comparison.arms:
                    print(f"s{seed} {arm} G={g}: " + " ".join(comparison.arm_overrides(seed, arm, g)))
        return 0
    if args.resummarize:
        print(f"[compare] rewrote {resummarize(comparison, seeds)} result file(s)", flush=True)
    failed = [] if args.report or args.resummarize else run_all(comparison, seeds)
    write_report(comparison)
    if failed:
        print(f"compare: {len(failed)} run(s) failed: {', '.join(failed)} (logs in {comparison.work_dir})",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
