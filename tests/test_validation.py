"""Periodic validation in the trainer: maj@m / pass@m / pass@k of ``evaluate_held_out`` (the trainer's evaluation) on scripted
responses against values worked out by hand, and ``run.best_metric`` keeping the best checkpoint
of a real tiny run."""

from __future__ import annotations

import json
import subprocess
from fractions import Fraction

import pytest
import torch

from mp_utils import run_ranks
from test_train_e2e import ROOT, command, env, last_rows

# two held-out problems, k = 4 scripted responses each (answers as the reward sees them)
SCRIPT = {0: ["5", "7", "5", "3"], 1: ["9", "8", "8", "2"]}
ANSWERS = {0: "5", 1: "9"}
TOPICS = {0: "sums", 1: "products"}


def _evaluate(rank, world):
    from ebpo_megatron.config.schema import Config
    from ebpo_megatron.models import ModelConfig
    from ebpo_megatron.parallel import ParallelConfig, initialize
    from ebpo_megatron.data.task import Task, TaskPrompt
    from ebpo_megatron.evaluation.runner import evaluate_held_out
    from ebpo_megatron.rollout.base import RolloutBatch, RolloutEngine

    class Scripted(RolloutEngine):
        def generate(self, prompt_token_ids, params):
            ids = [[100 * p[0] + j] for p in prompt_token_ids for j in range(params.n)]
            return RolloutBatch(prompt_ids=[p for p in prompt_token_ids for _ in range(params.n)],
                                response_ids=ids, logprobs=[[0.0]] * len(ids),
                                finish_reasons=["stop"] * len(ids),
                                group_ids=torch.arange(len(prompt_token_ids)).repeat_interleave(params.n))

        def update_weights(self, named_tensors):
            pass

    class Tokenizer:
        eos_id = pad_id = 0
        vocab_size = 1000

        def decode(self, ids):
            return f"The answer is {SCRIPT[ids[0] // 100][ids[0] % 100]}."

    def reward(texts, answers):
        return [1.0 if t == f"The answer is {a}." else 0.0 for t, a in zip(texts, answers)], {}

    initialize(ParallelConfig(), ModelConfig())
    held_out = [TaskPrompt(uid, (uid,), ANSWERS[uid], topic=TOPICS[uid]) for uid in SCRIPT]
    task = Task(train=held_out, held_out=held_out, tokenizer=Tokenizer(), reward=reward, stop_token_ids=(0,))
    config = Config()
    config.rollout.eval_samples, config.rollout.eval_maj = 4, 2
    return evaluate_held_out(Scripted(), task, config)


@pytest.mark.parametrize("world", [1, 2])
def test_validation_metrics_equal_hand_computed_values(world):
    [metrics, *others] = run_ranks(_evaluate, world)
    assert all(other == metrics for other in others)  # every DP rank logs the same values
    # problem 0: correct [1, 0, 1, 0]; problem 1: correct [1, 0, 0, 0]
    # maj@2: first two answers tie (5 vs 7 -> 5, right; 9 vs 8 -> 9, right)
    # pass@2 = 1 - C(4-c, 2) / C(4, 2): c=2 -> 5/6, c=1 -> 1/2;  pass@4 = 1 for c >= 1
    expected = {"eval/pass@1": (Fraction(2, 4) + Fraction(1, 4)) / 2, "eval/maj@2": 1,
                "eval/pass@2": (Fraction(5, 6) + Fraction(1, 2)) / 2, "eval/pass@4": 1,
                "eval/pass@1/sums": Fraction(2, 4), "eval/pass@1/products": Fraction(1, 4)}
    assert set(metrics) == set(expected)
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(float(value), abs=1e-12), key


def test_best_metric_keeps_the_best_checkpoint(tmp_path):
    extra = ["run.steps=4", "run.eval_every=1", "run.save_every=4", "run.keep_last=1",
             "rollout.eval_samples=4", "rollout.eval_maj=2", "rollout.eval_temperature=1.0",
             "run.best_metric=eval/pass@4"]
    done = subprocess.run(command(tmp_path, *extra), cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = last_rows(tmp_path / "e2e" / "metrics.jsonl")
    evals = {step: rows[step] for step in (1, 2, 3, 4)}
    for row in evals.values():
        assert 0 <= row["eval/pass@1"] <= row["eval/pass@2"] <= row["eval/pass@4"] <= 1
        assert 0 <= row["eval/maj@2"] <= 1
    best_step = max(evals, key=lambda s: (evals[s]["eval/pass@4"], -s))  # the first of the maxima
    best = json.loads((tmp_path / "e2e" / "checkpoints" / "BEST").read_text())
    assert best["step"] == best_step and best["value"] == evals[best_step]["eval/pass@4"]
    kept = sorted(p.name for p in (tmp_path / "e2e" / "checkpoints").glob("step_*"))
    assert kept == sorted({f"step_{best_step:06d}", "step_000004"})  # keep_last=1 plus the best
    summary = json.loads((tmp_path / "e2e" / "summary.json").read_text())
    assert summary["best"]["step"] == best_step


def _ebpo_eval(rank, world, checkpoint):
    from pathlib import Path

    from ebpo_megatron.evaluate import resolve_config, run_evaluation
    from ebpo_megatron.evaluation.results import EvalSettings

    config, run_dir = resolve_config(Path(checkpoint), None)
    r = config.rollout
    settings = EvalSettings(k=r.eval_samples, maj=r.eval_maj, temperature=r.eval_temperature,
                            max_new_tokens=r.max_new_tokens, seed=config.run.seed)
    return run_evaluation(config, Path(checkpoint), run_dir, [], settings).results[0].metrics


def test_the_training_evaluation_equals_ebpo_eval_of_its_checkpoint(tmp_path):
    """One evaluation path: the held-out evaluation the trainer logs at step 2 (4 samples at
    temperature 1, so the seeds matter) and ebpo-eval's of the step-2 checkpoint with the same
    settings draw the same samples: every metric is identical."""
    extra = ["run.steps=2", "run.eval_every=2", "run.save_every=2", "rollout.eval_samples=4",
             "rollout.eval_maj=2", "rollout.eval_temperature=1.0"]
    done = subprocess.run(command(tmp_path, *extra), cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    logged = {k.removeprefix("eval/"): v for k, v in last_rows(tmp_path / "e2e" / "metrics.jsonl")[2].items()
              if k.startswith("eval/")}
    [evaluated] = run_ranks(_ebpo_eval, 1, str(tmp_path / "e2e" / "checkpoints" / "step_000002"))
    assert {"pass@1", "maj@2", "pass@2", "pass@4"} <= set(logged)
    assert evaluated == logged
