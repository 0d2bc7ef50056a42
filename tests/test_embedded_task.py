"""The embedded arithmetic task, its tokenizer, the curriculum sampler and the safe reward."""

from __future__ import annotations

import math
import re
import time
from pathlib import Path

import pytest

from ebpo_megatron.data.arithmetic import is_held_out, make_split, score_response
from ebpo_megatron.data.sampler import CurriculumSampler
from ebpo_megatron.data.sp_tokenizer import train_tokenizer
from ebpo_megatron.rewards.safe import SafeReward

ROOT = Path(__file__).resolve().parents[1]


def independent_answer(prompt: str) -> int:
    equation = re.fullmatch(r"x\+(\d+)=(\d+);x=", prompt)
    if equation:
        return int(equation.group(2)) - int(equation.group(1))
    a, op, b = re.fullmatch(r"(\d+)([-+*])(\d+)=", prompt).groups()
    return {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]


def test_every_answer_is_right_and_splits_are_disjoint():
    train, held = make_split([0, 1, 2, 3], 100_000, 100_000, seed=3)
    assert len(train) > 9000 and len(held) > 900
    for p in train + held:
        assert int(p.answer) == independent_answer(p.prompt)
    assert not {p.prompt for p in train} & {p.prompt for p in held}
    assert all(is_held_out(p.prompt) for p in held) and not any(is_held_out(p.prompt) for p in train)
    assert {p.topic for p in train} == {"addition", "multiplication", "subtraction", "equation"}
    assert {p.level for p in train} == {0, 1, 2, 3}


def test_tokenizer_round_trip_and_special_ids(tmp_path):
    train, _ = make_split([0, 1, 2], 3000, 10, seed=0)
    tok = train_tokenizer([p.prompt + p.answer for p in train], tmp_path, 32)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    for p in train[:500]:
        assert tok.decode(tok.encode(p.prompt)) == p.prompt
        assert tok.decode(tok.encode(p.answer) + [tok.eos_id]) == p.answer
    assert len(tok.encode("47")) == 2  # digits are split
    assert tok.decode([tok.eos_id, 999]) == ""  # special and out-of-vocabulary ids are dropped


def test_score_response_is_exact():
    assert score_response(" 12 ", "12") == 1.0
    assert score_response("120", "12") == 0.0 and score_response("", "0") == 0.0


def examples(n):
    train, _ = make_split([0, 1, 2], n, 1, seed=1)
    return train


def test_random_order_sees_every_example_once_per_epoch():
    data = examples(50)
    sampler = CurriculumSampler(data, "random", 7, seed=0)
    seen = [e.uid for _ in range(50 // 7 + 1) for e in sampler.next_batch()][:50]
    assert sorted(seen) == sorted(e.uid for e in data)


def test_topic_order_streams_cluster_by_cluster():
    data = examples(300)
    sampler = CurriculumSampler(data, "topic", 10, seed=0)
    stream = [e.topic for _ in range(30) for e in sampler.next_batch()]
    changes = sum(a != b for a, b in zip(stream, stream[1:]))
    assert changes == len(set(stream)) - 1  # each topic is one contiguous block


def test_difficulty_order_is_easy_to_hard():
    data = examples(200)
    sampler = CurriculumSampler(data, "difficulty", 20, seed=0)
    stream = [e.difficulty for _ in range(10) for e in sampler.next_batch()]
    assert stream == sorted(stream, reverse=True)


@pytest.mark.parametrize("order", ["random", "topic", "difficulty"])
def test_resume_continues_the_identical_stream(order):
    data = examples(60)
    straight = CurriculumSampler(data, order, 8, seed=5)
    first = [straight.next_batch() for _ in range(12)]
    interrupted = CurriculumSampler(data, order, 8, seed=5)
    for _ in range(5):
        interrupted.next_batch()
    resumed = CurriculumSampler(data, order, 8, seed=5)
    resumed.load_state_dict(interrupted.state_dict())
    assert [[e.uid for e in b] for b in first[5:]] == [[e.uid for e in resumed.next_batch()] for _ in range(7)]


def flaky_reward(response: str, answer: str) -> float:
    if response == "raise":
        raise RuntimeError("boom")
    if response == "nan":
        return math.nan
    if response == "text":
        return "1.0"  # type: ignore[return-value]
    if response == "hang":
        time.sleep(3.0)
    return 1.0 if response == answer else 0.0


def test_safe_reward_counts_failures_and_never_raises():
    reward = SafeReward(flaky_reward, timeout_s=0.5, workers=2)
    reward.pool()  # the worker processes start on first use
    start = time.monotonic()
    scores, stats = reward(["1", "raise", "nan", "hang", "2", "text"], ["1"] * 6)
    assert time.monotonic() - start < 2.5
    assert scores == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert stats == {"reward/errors": 1.0, "reward/timeouts": 1.0, "reward/over_budget": 0.0, "reward/nan": 2.0}
    assert "boom" in reward.last_error
    assert reward(["2"], ["2"])[0] == [1.0]
    reward.close()


def test_sft_levels_limit_the_warm_start_pairs_to_those_levels(tmp_path):
    from ebpo_megatron.config.schema import load_config
    from ebpo_megatron.config.typed import ConfigError
    from ebpo_megatron.data.tasks import build_synthetic_task

    overrides = [f"run.output_dir={tmp_path}", "data.synthetic.sft_levels=[0]", "data.synthetic.num_train=300"]
    config = load_config(ROOT / "examples/tiny_cpu.yaml", overrides)
    task = build_synthetic_task(config, tmp_path)
    train, _ = make_split(config.data.synthetic.levels, 300, 10, config.run.seed)
    level0 = [p for p in train if p.level == 0]
    assert 0 < len(task.sft_pairs) == len(level0) < len(task.train) == len(train)
    decoded = [task.tokenizer.decode(prompt[1:]) for prompt, _ in task.sft_pairs]
    assert decoded == [p.prompt for p in level0]
    with pytest.raises(ConfigError, match="sft_levels: expected a subset of levels"):
        load_config(ROOT / "examples/tiny_cpu.yaml", ["data.synthetic.sft_levels=[3]"])
