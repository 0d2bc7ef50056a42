"""Chat arithmetic (data/chat_arithmetic.py): the generator, the hash-fixed held-out split, the
lenient / strict rewards and the task built from a config with an offline chat tokenizer."""

from __future__ import annotations

import socket
from collections import Counter
from pathlib import Path

import pytest

from ebpo_megatron.config.schema import load_config
from ebpo_megatron.config.typed import ConfigError
from ebpo_megatron.data.arithmetic import is_held_out
from ebpo_megatron.data.chat_arithmetic import (
    LEVEL_TOPICS,
    make_reward,
    make_split,
    user_message,
)
from ebpo_megatron.data.sampler import CurriculumSampler

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_split_is_deterministic_and_seeded():
    first = make_split([0, 1, 2, 3], 300, 200, seed=7)
    assert first == make_split([0, 1, 2, 3], 300, 200, seed=7)
    assert first != make_split([0, 1, 2, 3], 300, 200, seed=8)


def test_held_out_is_hash_fixed_and_never_trained_on():
    held_expressions = set()
    for seed in (1, 2, 3):
        train, held = make_split([0, 1, 2, 3], 100_000, 100_000, seed)
        assert all(is_held_out(p.expression) for p in held)
        assert not any(is_held_out(p.expression) for p in train)
        assert not {p.expression for p in train} & {p.expression for p in held}
        held_expressions.add(frozenset(p.expression for p in held))
    assert len(held_expressions) == 1  # the same held-out set whatever the seed
    assert len(next(iter(held_expressions))) >= 200
    # the split of a question does not depend on which levels are asked for
    _, held_2 = make_split([2], 100_000, 100_000, 1)
    assert {p.expression for p in held_2} == {p.expression for p in held if p.level == 2}


def test_levels_topics_answers_and_balance():
    train, held = make_split([0, 1, 2, 3], 400, 200, seed=0)
    assert len(train) == 400 and len(held) == 200
    for p in train + held:
        assert p.topic == LEVEL_TOPICS[p.level]
        assert p.difficulty == 1.0 - 0.25 * p.level
        assert int(p.answer) == eval(p.expression) >= 0  # our own generated digits
    counts = Counter(p.level for p in train)
    assert min(counts.values()) >= 80  # round robin: small levels are not swamped by level 2
    assert any(" * " in p.expression and (" + " in p.expression or " - " in p.expression) for p in train)
    assert user_message(held[0], "Box it.") == f"What is {held[0].expression}? Box it."
    with pytest.raises(ValueError, match="levels"):
        make_split([4], 10, 10, 0)


def test_curriculum_orders_work_on_the_tags():
    train, _ = make_split([0, 1, 2, 3], 200, 200, seed=0)
    by_difficulty = CurriculumSampler(train, "difficulty", 200, 0).next_batch()
    assert [p.level for p in by_difficulty] == sorted(p.level for p in train)
    by_topic = CurriculumSampler(train, "topic", 200, 0).next_batch()
    runs = [t for i, t in enumerate(p.topic for p in by_topic) if i == 0 or by_topic[i - 1].topic != t]
    assert len(runs) == len(LEVEL_TOPICS)  # one contiguous cluster per topic


@pytest.mark.parametrize(
    "reply, lenient, strict, boxed",
    [
        ("7 + 5 = 12, so the answer is \\boxed{12}.", 1.1, 1.0, True),
        ("\\boxed{13}", 0.0, 0.0, True),  # the format reward needs the right answer
        ("7 + 5 = 12", 1.0, 0.0, False),  # last number right: lenient yes, strict no
        ("The answer is 12.", 1.0, 0.0, False),
        ("7 + 5 = 12\n\nThe answer is \\boxed{}.", 1.0, 0.0, False),  # empty box: not boxed
        ("\\boxed{12} wait, \\boxed{11}", 0.0, 0.0, True),  # the last box decides
        ("I do not know.", 0.0, 0.0, False),
        # math-verify evaluates expressions: the question copied into the box must not pay,
        # neither as an answer nor as a format
        ("\\boxed{7 + 5}", 0.0, 0.0, True),
        ("\\boxed{3 * 4}", 0.0, 0.0, True),
        ("\\boxed{twelve}", 0.0, 0.0, True),
        ("The answer is 7+5", 0.0, 0.0, False),
        ("\\boxed{-12}", 0.0, 0.0, True),
    ],
)
def test_lenient_and_strict_rewards(reply, lenient, strict, boxed):
    reward = make_reward(0.1)
    result = reward.score(reply, "12")
    assert result.score == pytest.approx(lenient) and result.boxed == boxed
    assert float(result.correct and result.boxed) == strict  # what tools/smollm2_baseline.py counts
    assert make_reward(0.0, require_box=True).score(reply, "12").score == strict  # reward: boxed


def test_format_reward_is_configurable():
    assert make_reward(0.0).score("\\boxed{12}", "12").score == 1.0
    assert make_reward(0.25).score("\\boxed{12}", "12").score == 1.25
    assert make_reward(0.25).score("\\boxed{3}", "12").score == 0.0


@pytest.fixture()
def chat_tokenizer_dir(tmp_path: Path, monkeypatch) -> Path:
    """A byte-level BPE with a ChatML template, built and saved offline (network refused)."""
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    monkeypatch.setattr(socket.socket, "connect", lambda *a, **k: pytest.fail("network access attempted"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["What is 7 + 5? Put the final answer in \\boxed{}.", "user assistant"] * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", unk_token="<unk>")
    fast.chat_template = CHATML
    fast.save_pretrained(tmp_path)
    return tmp_path


def test_task_from_config(chat_tokenizer_dir, tmp_path):
    from ebpo_megatron.data.tasks import build_task

    overrides = [
        "data.task=chat_arith", f"data.tokenizer_dir={chat_tokenizer_dir}", "model.vocab_size=512",
        "data.chat_arith.num_train=50", "data.chat_arith.num_eval=20", "data.chat_arith.levels=[0, 3]",
        "data.chat_arith.format_reward=0.2",
    ]
    config = load_config(None, overrides)
    task = build_task(config, tmp_path)
    assert len(task.train) == 50 and len(task.held_out) == 20
    assert {p.topic for p in task.train} == {LEVEL_TOPICS[0], LEVEL_TOPICS[3]}
    assert not {p.uid for p in task.train} & {p.uid for p in task.held_out}
    eos = task.tokenizer.eos_id
    assert task.stop_token_ids == (eos,)
    text = task.tokenizer.tokenizer.decode(list(task.held_out[0].token_ids))
    assert text.startswith("<|im_start|>user\nWhat is ") and text.endswith(
        "? Put the final answer in \\boxed{}.<|im_end|>\n<|im_start|>assistant\n")

    # warm-start pairs: every training prompt, target "<expression> = \\boxed{<answer>}" + end of turn
    assert len(task.sft_pairs) == len(task.train)
    for prompt, (sft_prompt, target) in zip(task.train, task.sft_pairs):
        assert sft_prompt == list(prompt.token_ids) and target[-1] == eos
        expression = task.tokenizer.tokenizer.decode(list(prompt.token_ids)).split("What is ")[1].split("?")[0]
        reply = task.tokenizer.decode(target[:-1])
        assert reply == f"{expression} = \\boxed{{{prompt.answer}}}"
        assert task.eval_rewards["strict"]([reply], [prompt.answer])[0] == [1.0]
    only_three = build_task(load_config(None, [*overrides, "data.chat_arith.sft_levels=[3]"]), tmp_path)
    level_three = [p for p in only_three.train if p.topic == LEVEL_TOPICS[3]]
    assert [prompt for prompt, _ in only_three.sft_pairs] == [list(p.token_ids) for p in level_three]

    replies = ["\\boxed{12}", "so 12", "\\boxed{3}"]
    scores, stats = task.reward(replies, ["12"] * 3)
    assert scores == pytest.approx([1.2, 1.0, 0.0]) and stats["reward/boxed_frac"] == pytest.approx(2 / 3)
    assert task.eval_rewards["strict"](replies, ["12"] * 3)[0] == [1.0, 0.0, 0.0]
    assert task.eval_rewards["lenient"](replies, ["12"] * 3)[0] == [1.0, 1.0, 0.0]


def test_config_validation(tmp_path):
    with pytest.raises(ConfigError, match="tokenizer_dir"):
        load_config(None, ["data.task=chat_arith"])
    base = ["data.task=chat_arith", f"data.tokenizer_dir={tmp_path}"]
    with pytest.raises(ConfigError, match="format_reward"):
        load_config(None, [*base, "data.chat_arith.format_reward=1.0"])
    with pytest.raises(ConfigError, match="levels"):
        load_config(None, [*base, "data.chat_arith.levels=[5]"])
    with pytest.raises(ConfigError, match="sft_levels"):
        load_config(None, [*base, "data.chat_arith.levels=[0, 3]", "data.chat_arith.sft_levels=[2]"])
    with pytest.raises(ConfigError, match="sft: expected steps >= 0"):
        load_config(None, [*base, "sft.steps=-1"])
