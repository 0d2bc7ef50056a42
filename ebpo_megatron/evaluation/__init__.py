"""Evaluation metrics: pass@k (unbiased), mean Pass@1, maj@k, and the paper's results table."""

from ..rewards.math import MathVerifyEquivalence
from .metrics import (
    PAPER_BENCHMARKS,
    Vote,
    cluster_answers,
    format_results_table,
    maj_at_k,
    majority_vote,
    mean_maj_at_k,
    mean_pass_at_1,
    mean_pass_at_k,
    pass_at_k,
)

__all__ = [
    "PAPER_BENCHMARKS",
    "MathVerifyEquivalence",
    "Vote",
    "cluster_answers",
    "format_results_table",
    "maj_at_k",
    "majority_vote",
    "mean_maj_at_k",
    "mean_pass_at_1",
    "mean_pass_at_k",
    "pass_at_k",
]
