"""Reward functions. ``math``: the verifiable math reward (answer extraction + math-verify
equivalence in worker processes with a hard timeout). Nothing here imports sympy or
math-verify in the calling process; the checker workers do.
"""

from .answer_extraction import Extraction, extract_answer, normalize_answer_string, normalize_ground_truth
from .checker_pool import CheckerPool, CheckOutcome, WorkerStartError
from .math import MathReward, MathRewardConfig, RewardResult, default_reward, score, score_batch

__all__ = [
    "CheckOutcome",
    "CheckerPool",
    "Extraction",
    "MathReward",
    "MathRewardConfig",
    "RewardResult",
    "WorkerStartError",
    "default_reward",
    "extract_answer",
    "normalize_answer_string",
    "normalize_ground_truth",
    "score",
    "score_batch",
]
