"""The ebpo-diff difficulty: measured pass rates (evaluation.runner.pass_rates over the training
split) from a policy whose pass rates are known, the pass-rate file, and the stream it orders."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from ebpo_megatron.data.difficulty import load_pass_rates, with_pass_rates, write_pass_rates
from ebpo_megatron.data.sampler import CurriculumSampler
from ebpo_megatron.data.task import TaskPrompt
from ebpo_megatron.evaluation.results import EvalSettings, pass_rates
from ebpo_megatron.evaluation.runner import EvalTask, evaluate_benchmarks, load_benchmarks
from ebpo_megatron.rollout.base import RolloutBatch, RolloutEngine, SamplingParams
from mp_utils import run_ranks

# prompt uid -> the probability that the policy answers it correctly
TRUE_RATES = {10: 0.0, 11: 0.125, 12: 0.5, 13: 0.875, 14: 1.0}


class KnownRatePolicy(RolloutEngine):
    """Answers prompt [uid] with token 1 ("right") with probability TRUE_RATES[uid], else token 2,
    from a generator seeded by ``params.seed`` (so a seed gives the same samples)."""

    def generate(self, prompt_token_ids: list[list[int]], params: SamplingParams) -> RolloutBatch:
        rng = random.Random(params.seed)
        responses = [[1 if rng.random() < TRUE_RATES[prompt[0]] else 2]
                     for prompt in prompt_token_ids for _ in range(params.n)]
        return RolloutBatch(
            prompt_ids=[list(p) for p in prompt_token_ids for _ in range(params.n)], response_ids=responses,
            logprobs=[[0.0] for _ in responses], finish_reasons=["stop"] * len(responses),
            group_ids=torch.arange(len(prompt_token_ids)).repeat_interleave(params.n))

    def update_weights(self, named_tensors) -> None:
        pass

    def sleep(self) -> None:
        pass

    def wake(self) -> None:
        pass


class Tokens:
    eos_id, pad_id, vocab_size = 0, 0, 3

    def encode(self, text: str) -> list[int]:
        return [1 if text == "right" else 2]

    def decode(self, ids: list[int]) -> str:
        return "right" if ids == [1] else "wrong"


def _task() -> EvalTask:
    def scorer(texts: list[str], answers: list[str]):
        return [t == a for t, a in zip(texts, answers)], list(texts)

    train = [TaskPrompt(uid, (uid,), "right", topic="t") for uid in TRUE_RATES]
    return EvalTask(Tokens(), (0,), scorer, train=train, held_out=train[:1])


def _measure(rank: int, world: int, samples: int) -> dict[int, float]:
    from ebpo_megatron.models import ModelConfig
    from ebpo_megatron.parallel import ParallelConfig, initialize

    initialize(ParallelConfig(), ModelConfig(num_layers=1, hidden_size=8, ffn_hidden_size=8, num_attention_heads=2,
                                             vocab_size=3, max_position_embeddings=4))
    task = _task()
    benchmarks = load_benchmarks(task, [], split="train")
    assert [p.uid for p in benchmarks[0].prompts] == list(TRUE_RATES)
    settings = EvalSettings(k=samples, maj=1, temperature=1.0, max_new_tokens=1, seed=7)
    return pass_rates(evaluate_benchmarks(KnownRatePolicy(), task, benchmarks, settings)[0])


@pytest.mark.parametrize("samples", [16, 2000])
def test_pass_rates_of_a_policy_with_known_rates(samples):
    """Two data-parallel ranks share the prompts; both hold every prompt's rate."""
    first, second = run_ranks(_measure, 2, samples)
    assert first == second
    rates = first
    assert set(rates) == set(TRUE_RATES)
    for uid, p in TRUE_RATES.items():
        assert rates[uid] * samples == int(rates[uid] * samples)  # a count of k samples
        if p in (0.0, 1.0):
            assert rates[uid] == p  # never / always right: exact whatever k
        else:  # a binomial proportion: within 4.5 standard errors
            assert abs(rates[uid] - p) <= 4.5 * math.sqrt(p * (1 - p) / samples)


def test_the_pass_rate_file_round_trips_and_orders_the_stream(tmp_path):
    path = tmp_path / "difficulty.json"
    write_pass_rates(path, {3: 0.25, 1: 1.0, 2: 0.0625})
    assert list(json.loads(path.read_text())) == ["1", "2", "3"]
    rates = load_pass_rates(path)
    assert rates == {1: 1.0, 2: 0.0625, 3: 0.25}
    prompts = [TaskPrompt(uid, (uid,), "a", difficulty=0.5) for uid in (1, 2, 3)]
    measured = with_pass_rates(prompts, rates, path)
    assert [p.difficulty for p in measured] == [1.0, 0.0625, 0.25]
    order = CurriculumSampler(measured, "difficulty", 3, seed=0).next_batch()
    assert [p.uid for p in order] == [1, 3, 2]  # easy (high pass rate) -> hard


@pytest.mark.parametrize("content, message", [
    ("[0.5]", "expected a JSON object"),
    ('{"a": 0.5}', "is not an integer prompt uid"),
    ('{"1": 1.5}', r"expected a pass rate in \[0, 1\]"),
    ('{"1": true}', r"expected a pass rate in \[0, 1\]"),
    ("{", "not a JSON object of pass rates"),
])
def test_a_bad_pass_rate_file_names_the_file(tmp_path, content, message):
    path = tmp_path / "rates.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as err:
        load_pass_rates(path)
    assert str(path) in str(err.value)


def test_a_prompt_without_a_measured_rate_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no pass rate for 1 of 2 training prompts"):
        with_pass_rates([TaskPrompt(1, (1,), "a"), TaskPrompt(2, (2,), "a")], {1: 0.5}, tmp_path / "r.json")
    with pytest.raises(ValueError, match="file not found"):
        load_pass_rates(tmp_path / "missing.json")
