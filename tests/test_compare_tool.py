"""tools/compare.py: spec checks, and one real paired seed end to end — two arms of one seed share
the warm-start weights, the tokenizer, the held-out set and the prompt pool; the ebpo-diff arm
trains on the warm start's measured pass rates; a second call runs nothing and reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tool_import import load_tool

ROOT = Path(__file__).resolve().parents[1]


compare = load_tool("compare")

TINY = {
    "run.steps": 2, "run.eval_every": 2, "run.save_every": 2, "run.torch_threads": 1, "sft.steps": 30,
    "sft.batch_size": 32, "sft.warmup_steps": 0, "data.synthetic.num_train": 200, "data.synthetic.num_eval": 24,
    "model.num_layers": 1, "model.hidden_size": 32, "model.ffn_hidden_size": 64,
    "train.step.micro_batch_size": 16,
}


def spec(tmp_path: Path, **changes) -> dict:
    data = {
        "name": "tiny", "base_config": "examples/tiny_cpu.yaml", "work_dir": str(tmp_path / "work"),
        "results_dir": str(tmp_path / "results"), "seeds": [3], "group_sizes": [2], "responses_per_step": 16,
        "overrides": dict(TINY), "baseline": "grpo",
        "arms": {"grpo": {"algorithm.estimator": "grpo"},
                 "ebpo_diff": {"algorithm.estimator": "ebpo", "data.order": "difficulty"}},
        "difficulty": {"samples": 4, "temperature": 1.0},
    }
    data.update(changes)
    return data


@pytest.mark.parametrize("changes, message", [
    ({"baseline": "dapo"}, "baseline: 'dapo' is not one of the arms"),
    ({"overrides": {"rollout.n": 4}}, r"overrides: \['rollout.n'\] are set by the tool"),
    ({"arms": {"grpo": {"run.seed": 1}}}, r"arms.grpo: \['run.seed'\] are set by the tool"),
    ({"responses_per_step": 15}, "divisible by every G"),
    ({"seeds": [1, 1]}, "distinct integers"),
    ({"arms": {"grpo": {"sft.lr": 0.1}}}, r"arms.grpo: \['sft.lr'\] would break the pairing"),
    ({"colour": "red"}, r"unknown key\(s\) \['colour'\]"),
    ({"arms": {"grpo": {"algorithm.estimator": "nope"}}}, "a run's trainer config is invalid"),
    ({"contrasts": [["ebpo_diff", "dapo"]]}, r"contrasts: expected a list of \[arm, other\] pairs"),
    ({"contrasts": [["grpo", "grpo"]]}, r"contrasts: expected a list of \[arm, other\] pairs"),
])
def test_bad_specs_name_the_key(tmp_path, changes, message):
    with pytest.raises(compare.SpecError, match=message):
        compare.parse_spec(spec(tmp_path, **changes))


def test_contrasts_report_the_paired_difference_of_two_arms(tmp_path):
    """A spec contrast arm − other: scipy's paired t-test on the seeds both arms finished."""
    from scipy import stats

    comparison = compare.parse_spec(spec(tmp_path, seeds=[1, 2, 3, 4, 5], contrasts=[["ebpo_diff", "grpo"]]))
    ends = {"grpo": [0.40, 0.53, 0.40, 0.33, 0.48], "ebpo_diff": [0.41, 0.47, 0.43, 0.49]}  # seed 5 unfinished
    results = {2: {arm: {s: {"pass1_end": y} for s, y in enumerate(values, start=1)} for arm, values in ends.items()}}
    (found,) = compare.contrast_statistics(comparison, results)[2]
    test = stats.ttest_rel(ends["ebpo_diff"], ends["grpo"][:4])
    interval = test.confidence_interval(0.95)
    assert (found["arm"], found["other"], found["n"]) == ("ebpo_diff", "grpo", 4)
    assert found["mean"] == pytest.approx(sum(ends["ebpo_diff"]) / 4 - sum(ends["grpo"][:4]) / 4)
    assert (found["low"], found["high"]) == pytest.approx((interval.low, interval.high))
    assert found["p_value"] == pytest.approx(test.pvalue) and found["verdict"] == "inconclusive"
    line = f"| 2 | ebpo_diff − grpo | 4 | {100 * found['mean']:+.1f} ({100 * interval.low:+.1f}, " \
           f"{100 * interval.high:+.1f}) | {test.pvalue:.3f} | inconclusive |"
    assert line in compare.report_markdown(comparison, {}, compare.contrast_statistics(comparison, results))


def test_arms_of_one_seed_get_the_same_start_and_stream(tmp_path):
    comparison = compare.parse_spec(spec(tmp_path, group_sizes=[2, 4]))
    grpo, diff = (comparison.arm_overrides(3, arm, 4) for arm in ("grpo", "ebpo_diff"))
    shared = [o for o in grpo if not o.startswith(("algorithm.", "data.order", "run.name"))]
    assert shared == [o for o in diff if not o.startswith(("algorithm.", "data.order", "data.difficulty_file",
                                                           "run.name"))]
    assert f"model.checkpoint={comparison.warm_checkpoint(3)}" in shared and "run.seed=3" in shared
    assert "data.prompts_per_step=4" in grpo and "data.prompts_per_step=8" in comparison.arm_overrides(3, "grpo", 2)
    assert f"data.difficulty_file={comparison.difficulty_file(3)}" in diff


def _held_out_and_pool(run_dir: Path) -> tuple[list[int], list[int], dict[int, float]]:
    from ebpo_megatron.config.schema import load_config
    from ebpo_megatron.data.tasks import build_task

    task = build_task(load_config(run_dir / "config.yaml"), run_dir)
    return [p.uid for p in task.held_out], [p.uid for p in task.train], {p.uid: p.difficulty for p in task.train}


def test_one_paired_seed_end_to_end(tmp_path):
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec(tmp_path)))
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(ROOT / "tools/compare.py"), "--spec", str(spec_path)]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    comparison = compare.load_spec(spec_path)
    warm = comparison.warm_dir(3)
    runs = {arm: comparison.seed_dir(3) / comparison.run_name(arm, 2) for arm in ("grpo", "ebpo_diff")}

    # the same tokenizer, held-out set and prompt pool in both arms
    for run in runs.values():
        assert (run / "tokenizer/tokenizer.model").read_bytes() == (warm / "tokenizer/tokenizer.model").read_bytes()
    (held_g, pool_g, nominal), (held_d, pool_d, measured) = (_held_out_and_pool(r) for r in runs.values())
    assert held_g == held_d and pool_g == pool_d
    # the diff arm's difficulties are the warm start's measured pass rates (multiples of 1/4)
    rates = json.loads(comparison.difficulty_file(3).read_text())
    assert measured == {int(uid): rate for uid, rate in rates.items()} and set(measured) == set(pool_g)
    assert all(4 * r == int(4 * r) for r in measured.values()) and measured != nominal

    # the same starting weights: both arms' frozen references equal the warm start's
    from ebpo_megatron.conversion.dcp_stream import read_slices, stored_tensors

    def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
        stored = stored_tensors(checkpoint)
        return read_slices(checkpoint, {k: ((0,) * len(shape), shape, dtype) for k, (shape, dtype) in stored.items()})

    warm_weights = weights(comparison.warm_checkpoint(3))
    for run in runs.values():
        reference = weights(run / "reference")
        assert reference.keys() == warm_weights.keys()
        assert all(torch.equal(reference[k], warm_weights[k]) for k in reference)
    # ... so their step-0 greedy evaluations agree
    results = {arm: json.loads(comparison.result_file(3, arm, 2).read_text()) for arm in runs}
    assert results["grpo"]["pass1_start"] == results["ebpo_diff"]["pass1_start"]
    assert results["grpo"]["steps"] == 2 and results["ebpo_diff"]["shrinkage_mean"] is not None
    report = (comparison.results_dir / "report.md").read_text()
    assert "| 2 | ebpo_diff | 1 |" in report and "inconclusive" in report  # one seed: no verdict

    # a second call finds every result and runs nothing
    mtimes = {arm: comparison.result_file(3, arm, 2).stat().st_mtime_ns for arm in runs}
    again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "[compare]" not in again.stdout
    assert mtimes == {arm: comparison.result_file(3, arm, 2).stat().st_mtime_ns for arm in runs}
    # --resummarize rewrites each result file from its run's metrics.jsonl, running nothing
    stale = json.loads(comparison.result_file(3, "grpo", 2).read_text())
    comparison.result_file(3, "grpo", 2).write_text(json.dumps({k: v for k, v in stale.items() if k != "heldout_end"}))
    redo = subprocess.run(command + ["--resummarize"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert redo.returncode == 0 and "[compare] rewrote 2 result file(s)" in redo.stdout, redo.stderr[-2000:]
    assert json.loads(comparison.result_file(3, "grpo", 2).read_text()) == stale
    assert stale["heldout_end"]["eval/pass@1"] == stale["pass1_end"]


@pytest.mark.parametrize("path", sorted((ROOT / "examples/compare").glob("*.yaml")), ids=lambda p: p.name)
def test_example_specs_are_valid(path):
    """Every examples/compare spec passes the spec checks and every trainer config it implies loads."""
    comparison = compare.load_spec(path)
    assert comparison.baseline in comparison.arms and comparison.seeds
