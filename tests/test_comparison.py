"""Paired statistics and run summaries of ``evaluation.comparison`` against independent float64
references (numpy, and scipy's t quantile rather than its t-test helpers)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from ebpo_megatron.evaluation.comparison import (
    Interval,
    arm_statistics,
    mean_interval,
    paired_difference,
    run_summary,
    verdict,
)

ARM = [0.61, 0.55, 0.72, 0.48, 0.66, 0.59, 0.70, 0.52, 0.63, 0.57]
BASE = [0.58, 0.50, 0.71, 0.41, 0.60, 0.60, 0.62, 0.49, 0.55, 0.56]


def reference_interval(values: list[float]) -> tuple[float, float, float]:
    """ȳ ± t_{0.975, n−1} · sd / √n in float64 from the definition."""
    x = np.asarray(values, dtype=np.float64)
    n = len(x)
    half = stats.t.ppf(0.975, n - 1) * x.std(ddof=1) / math.sqrt(n)
    return float(x.mean()), float(x.mean() - half), float(x.mean() + half)


def test_mean_interval_is_the_t_interval():
    got = mean_interval(ARM)
    mean, low, high = reference_interval(ARM)
    assert got.n == len(ARM)
    assert got.mean == pytest.approx(mean, abs=1e-12)
    assert got.low == pytest.approx(low, abs=1e-12)
    assert got.high == pytest.approx(high, abs=1e-12)


def test_paired_difference_is_the_interval_of_the_differences_with_the_paired_t_test():
    diff, pvalue = paired_difference(ARM, BASE)
    mean, low, high = reference_interval([a - b for a, b in zip(ARM, BASE)])
    assert (diff.mean, diff.low, diff.high) == pytest.approx((mean, low, high), abs=1e-12)
    # p-value from the t statistic d̄ / (sd/√n) with n − 1 degrees of freedom
    d = np.asarray(ARM) - np.asarray(BASE)
    t = d.mean() / (d.std(ddof=1) / math.sqrt(len(d)))
    assert pvalue == pytest.approx(2 * stats.t.sf(abs(t), len(d) - 1), rel=1e-9)
    # pairing matters: the unpaired spread is much wider than the paired one here
    unpaired_half = reference_interval(ARM)[2] - reference_interval(ARM)[0]
    assert diff.high - diff.mean < unpaired_half


def test_verdicts():
    assert verdict(paired_difference(ARM, BASE)[0]) == "better"
    assert verdict(paired_difference(BASE, ARM)[0]) == "worse"
    noisy = [b + e for b, e in zip(BASE, [0.05, -0.04, 0.03, -0.05, 0.02, -0.03, 0.04, -0.02, 0.01, -0.01])]
    assert verdict(paired_difference(noisy, BASE)[0]) == "inconclusive"
    assert verdict(Interval(0.1, 0.1, 0.1, 1)) == "inconclusive"  # one seed is never a verdict


def test_degenerate_inputs():
    assert mean_interval([0.4]) == Interval(0.4, 0.4, 0.4, 1)
    same = mean_interval([0.3, 0.3, 0.3])
    assert (same.low, same.high) == pytest.approx((0.3, 0.3))
    assert paired_difference([0.5, 0.6], [0.4, 0.5])[1] is None  # constant difference: no t-test
    with pytest.raises(ValueError, match="2 arm values vs 3"):
        paired_difference([0.1, 0.2], [0.1, 0.2, 0.3])


def _rows(pass1: list[float], rewards: list[float], ebpo: bool) -> list[dict]:
    rows = [{"step": 0, "eval/pass@1": pass1[0]}]
    for step, r in enumerate(rewards, start=1):
        row = {"step": step, "reward/mean": r, "actor/entropy": 0.5 - 0.01 * step, "adv/zero_signal_frac": 0.25}
        if ebpo:
            row.update({"ebpo/shrinkage": 0.3 + 0.01 * step, "ebpo/mu_glob": r / 2})
        if step == len(rewards):
            row.update({"eval/pass@1": pass1[1], "eval/strict_pass@1": pass1[1] / 2})
        rows.append(row)
    return rows


def test_run_summary_reduces_the_metrics():
    rewards = [0.2, 0.4, 0.6, 0.8]
    summary = run_summary(_rows([0.3, 0.5], rewards, ebpo=True))
    assert summary["steps"] == 4
    assert (summary["pass1_start"], summary["pass1_end"]) == (0.3, 0.5)
    assert summary["reward_auc"] == pytest.approx(sum(rewards) / 4)
    assert summary["entropy_mean"] == pytest.approx(np.mean([0.5 - 0.01 * s for s in range(1, 5)]))
    assert summary["zero_signal_mean"] == pytest.approx(0.25)
    assert summary["shrinkage_mean"] == pytest.approx(np.mean([0.3 + 0.01 * s for s in range(1, 5)]))
    assert summary["mu_glob_end"] == pytest.approx(0.4)
    assert summary["pass1_curve"] == [(0, 0.3), (4, 0.5)]
    assert summary["heldout_start"] == {"eval/pass@1": 0.3}
    assert summary["heldout_end"] == {"eval/pass@1": 0.5, "eval/strict_pass@1": 0.25}
    grpo = run_summary(_rows([0.3, 0.4], rewards, ebpo=False))
    assert grpo["shrinkage_mean"] is None and "ebpo/shrinkage" not in grpo["curves"]
    with pytest.raises(ValueError, match="never evaluated"):
        run_summary([{"step": 1, "reward/mean": 0.1}])


def test_arm_statistics_pairs_only_the_seeds_both_arms_finished():
    def summary(end: float) -> dict:
        return {"pass1_end": end, "pass1_start": 0.2, "reward_auc": 0.3, "entropy_mean": 0.4,
                "zero_signal_mean": 0.5, "shrinkage_mean": None, "mu_glob_end": None}

    results = {
        "grpo": {s: summary(b) for s, b in enumerate(BASE, start=1)},
        "ebpo": {s: summary(a) for s, a in enumerate(ARM, start=1) if s != 3} | {11: summary(0.9)},
    }
    out = arm_statistics(results, baseline="grpo")
    assert "vs_baseline" not in out["grpo"]
    paired = [s for s in range(1, 11) if s != 3]
    expected, _ = paired_difference([ARM[s - 1] for s in paired], [BASE[s - 1] for s in paired])
    assert out["ebpo"]["vs_baseline"]["n"] == len(paired)
    assert out["ebpo"]["vs_baseline"]["mean"] == pytest.approx(expected.mean)
    assert out["ebpo"]["pass1_end"]["n"] == 10  # its own mean uses all of its seeds (11 included)
    assert out["ebpo"]["shrinkage_mean"] is None
