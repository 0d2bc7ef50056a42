"""Arithmetic in chat form for an instruction-tuned model: "What is 7 + 5? Put the final answer
in \\boxed{}." rendered with the tokenizer's chat template, graded by the math reward.

Levels (``difficulty`` = 1 − 0.25·level, the pass-rate proxy the curriculum sorts by), one
topic each so that ``data.order: topic`` clusters by kind:

    level 0  single_digit_addition   a + b        a, b in 0..9
    level 1  times_table             a * b        a, b in 1..10
    level 2  two_digit_addition      a + b        a, b in 10..99
    level 3  three_term              a + b * c    a, b, c in 1..9
                                     a * b - c    a, b, c in 1..9, c ≤ a·b

The held-out split is fixed by a hash of the question (``arithmetic.is_held_out``, ≈10% of
every level): no held-out question is ever trained on, whatever the seed or the levels. Both
splits are drawn level by level in turn (round robin over shuffled levels), so a small level
such as level 0 (100 questions, ≈10 held out) is fully represented rather than swamped by
level 2's 8100.

Rewards (``rewards/math.py``, integer answers compared exactly, without worker processes):

* the lenient reward (``data.chat_arith.reward: lenient``): the last ``\\boxed{}``, else "the answer
  is …", else the last number decides correctness (1.0), plus ``format_reward`` when the correct
  answer was boxed;
* the strict score (``reward: boxed``, and the held-out strict accuracy) is 1.0 only for a
  correct answer inside the last ``\\boxed{}``.
"""

from __future__ import annotations

import dataclasses
import random
import re
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from ..config.schema import DEFAULT_INSTRUCTION, LEVEL_TOPICS
from ..rewards.math import MathReward, MathRewardConfig, RewardResult
from .arithmetic import is_held_out
from .math_datasets import MathExample
from .math_prompts import ChatPromptRenderer

_INTEGER = re.compile(r"[-−]?\d+")


@dataclass(frozen=True)
class ChatArithProblem:
    """One question (``"7 + 5"``), its integer answer, topic and level."""

    expression: str
    answer: str
    topic: str
    level: int

    @property
    def uid(self) -> int:
        """Stable id from the expression (independent of the levels and the seed)."""
        return zlib.crc32(self.expression.encode())

    @property
    def difficulty(self) -> float:
        """Nominal pass-rate proxy: 1 for level 0, falling by 0.25 per level."""
        return 1.0 - 0.25 * self.level

    def question(self) -> str:
        return f"What is {self.expression}?"


def _level_expressions(level: int) -> Iterator[tuple[str, int]]:
    """``(expression, value)`` of every question of ``level``."""
    if level == 0:
        yield from ((f"{a} + {b}", a + b) for a in range(10) for b in range(10))
    elif level == 1:
        yield from ((f"{a} * {b}", a * b) for a in range(1, 11) for b in range(1, 11))
    elif level == 2:
        yield from ((f"{a} + {b}", a + b) for a in range(10, 100) for b in range(10, 100))
    else:
        for a in range(1, 10):
            for b in range(1, 10):
                for c in range(1, 10):
                    yield f"{a} + {b} * {c}", a + b * c
                    if c <= a * b:
                        yield f"{a} * {b} - {c}", a * b - c


def _round_robin(by_level: dict[int, list[ChatArithProblem]], count: int, rng: random.Random) -> list[ChatArithProblem]:
    """Up to ``count`` problems taken one level at a time from shuffled per-level lists, shuffled."""
    queues = {level: rng.sample(problems, len(problems)) for level, problems in sorted(by_level.items())}
    chosen: list[ChatArithProblem] = []
    while len(chosen) < count and any(queues.values()):
        for queue in queues.values():
            if queue and len(chosen) < count:
                chosen.append(queue.pop())
    rng.shuffle(chosen)
    return chosen


def make_split(levels: Sequence[int], num_train: int, num_eval: int, seed: int
               ) -> tuple[list[ChatArithProblem], list[ChatArithProblem]]:
    """Train and held-out problems (disjoint by :func:`arithmetic.is_held_out` of the expression),
    sampled level by level in turn with ``seed``."""
    unknown = sorted(set(levels) - set(LEVEL_TOPICS))
    if unknown or not levels:
        raise ValueError(f"data.chat_arith.levels {list(levels)}: expected a non-empty subset of {sorted(LEVEL_TOPICS)}")
    train: dict[int, list[ChatArithProblem]] = {}
    held: dict[int, list[ChatArithProblem]] = {}
    for level in sorted(set(levels)):
        for expression, value in _level_expressions(level):
            problem = ChatArithProblem(expression, str(value), LEVEL_TOPICS[level], level)
            (held if is_held_out(problem.expression) else train).setdefault(level, []).append(problem)
    rng = random.Random(seed)
    return _round_robin(train, num_train, rng), _round_robin(held, num_eval, rng)


def user_message(problem: ChatArithProblem, instruction: str) -> str:
    """The user turn: the question, then the instruction (when there is one) after a space."""
    return f"{problem.question()} {instruction}" if instruction else problem.question()


def worked_answer(problem: ChatArithProblem) -> str:
    """The supervised warm start's target reply, the question restated with its boxed result:
    ``"7 + 5 = \\boxed{12}"`` (strict score 1 by construction)."""
    return f"{problem.expression} = \\boxed{{{problem.answer}}}"


def render_prompts(problems: Sequence[ChatArithProblem], tokenizer: Any, instruction: str = DEFAULT_INSTRUCTION
                   ) -> list[tuple[int, ...]]:
    """Chat-template token ids of each problem's prompt (``ChatPromptRenderer``, generation prompt added)."""
    renderer = ChatPromptRenderer(tokenizer, prompt_source="dataset")
    examples = [MathExample(uid=p.expression, problem=p.question(), answer=p.answer,
                            messages=({"role": "user", "content": user_message(p, instruction)},),
                            topic=p.topic, difficulty=p.difficulty) for p in problems]
    return [renderer.render(e).token_ids for e in examples]


class IntegerAnswerReward:
    """``MathReward`` for arithmetic: an answer counts only when it is written as an integer, and
    the format reward w is paid only on a correct boxed answer:

        r = c + w · 1[boxed]   if the extracted answer is an integer equal to the reference,
        r = c₀                 otherwise (c = correct_score, c₀ = incorrect_score).

    Both rules close holes that runs on SmolLM2 found. math-verify evaluates expressions, so
    ``\\boxed{37 + 48}`` equals 85 to it: a GRPO run learned to copy the question into the box
    (held-out "accuracy" 1.0 after 40 steps). With the format reward paid for any box, two EBPO
    runs collapsed within 7–10 steps onto answering ``\\boxed{42}``, the instruction's example,
    to every prompt: w in every group, all G rewards equal, so GRPO would give those groups no
    gradient, but EBPO's baseline S·μ_glob + (1 − S)·r̄ lies below w while μ_glob < w, so every
    such reply got a positive advantage. Tying the format reward to correctness leaves no reward
    that a wrong answer can collect.
    """

    def __init__(self, reward: MathReward, require_box: bool = False) -> None:
        self.reward = reward
        self.require_box = require_box  # correct only inside the last \\boxed{} (the strict score)

    def score_batch(self, responses: Sequence[str], answers: Sequence[str], **kwargs: Any) -> list[RewardResult]:
        config = self.reward.config
        weight = config.format_weight if kwargs.get("format_weight") is None else float(kwargs["format_weight"])
        out = []
        for r in self.reward.score_batch(responses, answers, **kwargs):
            correct = (r.correct and bool(_INTEGER.fullmatch((r.extracted or "").strip()))
                       and (r.boxed or not self.require_box))
            score = config.correct_score + weight * r.boxed if correct else config.incorrect_score
            out.append(dataclasses.replace(r, correct=correct, score=float(score)))
        return out

    def score(self, response: str, answer: str, **kwargs: Any) -> RewardResult:
        return self.score_batch([response], [answer], **kwargs)[0]

    def close(self) -> None:
        self.reward.close()


def make_reward(format_reward: float, require_box: bool = False) -> IntegerAnswerReward:
    """The lenient reward: correctness (box, "the answer is", last number; integers only), plus
    ``format_reward`` when the correct answer is boxed; ``require_box``: the strict reward, 1 for
    a correct integer in the last box, else 0."""
    return IntegerAnswerReward(MathReward(MathRewardConfig(lenient=True, format_weight=format_reward)),
                               require_box=require_box)
