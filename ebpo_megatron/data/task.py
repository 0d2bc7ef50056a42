"""What the RL loop needs from a task, whatever its source (embedded synthetic task, math files).

A task supplies tokenized prompts with reference answers (train and held-out), a tokenizer
for decoding responses, a reward over (response text, answer), and, optionally, supervised
(prompt, answer) pairs for the warm start.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol


@dataclass(frozen=True)
class TaskPrompt:
    uid: int
    token_ids: tuple[int, ...]
    answer: str
    topic: str = "default"
    difficulty: float = 0.5


class TextTokenizer(Protocol):
    eos_id: int
    pad_id: int
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


RewardFn = Callable[[list[str], list[str]], tuple[list[float], dict[str, float]]]


def extracted_answer(response: str) -> str | None:
    """The final answer of a response (``\\boxed{}``, else "the answer is", else the last number)."""
    from ..rewards.answer_extraction import extract_answer

    return extract_answer(response).answer


@dataclass
class Task:
    """Prompts, tokenizer and reward of one training run."""

    train: list[TaskPrompt]
    held_out: list[TaskPrompt]
    tokenizer: TextTokenizer
    reward: RewardFn
    stop_token_ids: tuple[int, ...]
    sft_pairs: list[tuple[list[int], list[int]]] = field(default_factory=list)
    # more held-out accuracies: the evaluation logs the fraction scoring >= 1 under reward NAME as
    # eval/NAME_pass@1 (chat_arith: "strict", boxed answers only, and "lenient")
    eval_rewards: dict[str, RewardFn] = field(default_factory=dict)
    # the answer a response casts in a majority vote (maj@m), and when two answers are the same
    # (None: equal after answer-string normalization)
    voted_answer: Callable[[str], str | None] = extracted_answer
    answer_equivalence: Callable[[str, str], bool] | None = None
    # more run-summary entries: NAME -> evaluation metric, reported as heldout_NAME_start / _end
    # (and _before_sft) in summary.json (chat_arith: boxed_acc = eval/strict_pass@1)
    summary_metrics: dict[str, str] = field(default_factory=dict)
