"""Paired comparison of training recipes ("arms") over seeds: per-run summaries and statistics.

One seed fixes the warm-start weights, the held-out set and the prompt pool that every arm of
that seed trains and is evaluated on, so arm differences are *paired*: for arm a and the
baseline b, d_s = y_{a,s} − y_{b,s} over seeds s = 1..n removes the seed-to-seed spread of the
warm start from the comparison. Reported per arm (``arm_statistics``):

* mean of y over seeds with its 95% confidence interval, ȳ ± t_{0.975, n−1} · sd(y)/√n;
* the paired difference to the baseline, d̄ ± t_{0.975, n−1} · sd(d)/√n (``scipy.stats.ttest_rel``),
  its p-value, and a verdict: "better" / "worse" when the interval excludes 0, else "inconclusive".

``paired_contrast`` gives the same paired difference between any two arms (e.g. EBPO-topic vs
GRPO-topic, which isolates the estimator under one data order).

``run_summary`` reduces one run's ``metrics.jsonl`` to the numbers compared: held-out pass@1 at
the start and the end (and every other held-out metric of those two evaluations, e.g. the
chat-arithmetic task's strict accuracy), reward AUC = (1/T) Σ_t r̄_t, and the means over steps of
the policy entropy, the zero-signal fraction, S and μ_glob (the last two only for EBPO), with
their curves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

CONFIDENCE = 0.95


def _series(rows: Sequence[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    return [(int(r["step"]), float(r[key])) for r in rows if key in r and r[key] is not None]


def _mean(values: Sequence[float]) -> float | None:
    return math.fsum(values) / len(values) if values else None


def run_summary(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The compared numbers of one run (rows of its metrics.jsonl, in step order)."""
    evals = _series(rows, "eval/pass@1")
    if not evals:
        raise ValueError("metrics.jsonl has no eval/pass@1 row: the run never evaluated")
    evaluated = [r for r in rows if "eval/pass@1" in r]
    curves = {key: _series(rows, key) for key in
              ("reward/mean", "actor/entropy", "adv/zero_signal_frac", "ebpo/shrinkage", "ebpo/mu_glob")}
    return {
        "steps": max(int(r["step"]) for r in rows),
        "pass1_start": evals[0][1],
        "pass1_end": evals[-1][1],
        "pass1_curve": evals,
        "heldout_start": {k: v for k, v in evaluated[0].items() if k.startswith("eval/")},
        "heldout_end": {k: v for k, v in evaluated[-1].items() if k.startswith("eval/")},
        "reward_auc": _mean([v for _, v in curves["reward/mean"]]),
        "entropy_mean": _mean([v for _, v in curves["actor/entropy"]]),
        "zero_signal_mean": _mean([v for _, v in curves["adv/zero_signal_frac"]]),
        "shrinkage_mean": _mean([v for _, v in curves["ebpo/shrinkage"]]),
        "mu_glob_end": curves["ebpo/mu_glob"][-1][1] if curves["ebpo/mu_glob"] else None,
        "curves": {key: values for key, values in curves.items() if values},
    }


@dataclass(frozen=True)
class Interval:
    """A mean with its two-sided 95% confidence interval (``low == high == mean`` for n = 1)."""

    mean: float
    low: float
    high: float
    n: int

    def excludes_zero(self) -> bool:
        return self.low > 0.0 or self.high < 0.0

    def as_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "low": self.low, "high": self.high, "n": self.n}


def mean_interval(values: Sequence[float]) -> Interval:
    """ȳ and the t-interval ȳ ± t_{0.975, n−1} · sd/√n (``scipy.stats.ttest_1samp``)."""
    from scipy import stats

    if not values:
        raise ValueError("mean_interval: no values")
    mean = math.fsum(values) / len(values)
    if len(values) < 2:
        return Interval(mean, mean, mean, len(values))
    if max(values) == min(values):  # zero spread: scipy's interval is undefined (nan)
        return Interval(mean, mean, mean, len(values))
    ci = stats.ttest_1samp(values, 0.0).confidence_interval(CONFIDENCE)
    return Interval(mean, float(ci.low), float(ci.high), len(values))


def paired_difference(arm: Sequence[float], baseline: Sequence[float]) -> tuple[Interval, float | None]:
    """d̄ = mean(arm − baseline) over paired seeds with its 95% t-interval and the paired
    t-test's two-sided p-value (``scipy.stats.ttest_rel``; None when it is undefined)."""
    from scipy import stats

    if len(arm) != len(baseline):
        raise ValueError(f"paired_difference: {len(arm)} arm values vs {len(baseline)} baseline values")
    diffs = [a - b for a, b in zip(arm, baseline)]
    interval = mean_interval(diffs)
    if len(diffs) < 2 or max(diffs) == min(diffs):
        return interval, None
    return interval, float(stats.ttest_rel(arm, baseline).pvalue)


def verdict(difference: Interval) -> str:
    """"better" / "worse" when the 95% interval of the paired difference excludes 0, else
    "inconclusive" (also for fewer than two seeds)."""
    if difference.n < 2 or not difference.excludes_zero():
        return "inconclusive"
    return "better" if difference.mean > 0 else "worse"


def arm_statistics(results: dict[str, dict[int, dict[str, Any]]], baseline: str,
                   metric: str = "pass1_end") -> dict[str, dict[str, Any]]:
    """Per arm: the metric's mean and CI over its seeds, and (other arms) the paired difference
    to ``baseline`` over the seeds both finished. ``results[arm][seed]`` is a run summary."""
    out: dict[str, dict[str, Any]] = {}
    base = results.get(baseline, {})
    for arm, by_seed in results.items():
        seeds = sorted(by_seed)
        entry: dict[str, Any] = {"seeds": seeds, metric: mean_interval([by_seed[s][metric] for s in seeds]).as_dict()}
        for key in ("pass1_start", "reward_auc", "entropy_mean", "zero_signal_mean", "shrinkage_mean", "mu_glob_end"):
            values = [by_seed[s][key] for s in seeds if by_seed[s].get(key) is not None]
            entry[key] = _mean(values)
        contrast = paired_contrast(by_seed, base, metric) if arm != baseline else None
        if contrast is not None:
            entry["vs_baseline"] = contrast
        out[arm] = entry
    return out


def paired_contrast(arm: dict[int, dict[str, Any]], other: dict[int, dict[str, Any]],
                    metric: str = "pass1_end") -> dict[str, Any] | None:
    """d_s = y_{arm,s} − y_{other,s} over the seeds both finished: d̄ with its 95% interval
    (``Interval.as_dict``), the paired t-test's p-value and the verdict; None without a shared
    seed. ``arm[seed]`` and ``other[seed]`` are run summaries."""
    paired = sorted(set(arm) & set(other))
    if not paired:
        return None
    diff, pvalue = paired_difference([arm[s][metric] for s in paired], [other[s][metric] for s in paired])
    return {**diff.as_dict(), "p_value": pvalue, "verdict": verdict(diff)}
