"""Evaluation metrics of the paper: Pass@1 averaged over samples, pass@k, maj@k, and its table.

For one problem with n sampled responses of which c are correct:

* **pass@k** (unbiased, Chen et al. 2021): the probability that a uniformly random k-subset
  of the n samples holds at least one correct response,
      pass@k = 1 − C(n−c, k) / C(n, k) = 1 − ∏_{i=n−c+1}^{n} (1 − k / i),
  the product form avoiding huge binomials; it is exactly 1 when n − c < k.
* **mean Pass@1 over n samples**: pass@1 = c / n, the paper's "Pass@1 averaged over 32
  samples"; a benchmark's score is the mean over its problems (×100 for %).
* **maj@k**: the answers extracted from the *first* k samples vote; answers that are
  equivalent form one cluster (equivalence: identical ``normalize_answer_string`` and, when
  an ``equivalent(a, b)`` function is given — e.g. ``MathVerifyEquivalence`` — clusters whose
  first answers it deems equal are merged, greedily in order of first appearance). A sample
  with no extracted answer does not vote. The largest cluster wins; **ties go to the cluster
  whose first answer appeared earliest** among the k samples. The problem counts as solved
  when the winning cluster's first sample was graded correct (all members of a cluster are
  equivalent, so they share the verdict). No vote at all → not solved.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

from ..rewards.answer_extraction import normalize_answer_string

Equivalence = Callable[[str, str], bool]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem: 1 − C(n−c, k)/C(n, k), in the stable product form."""
    if not (isinstance(n, int) and isinstance(c, int) and isinstance(k, int)):
        raise TypeError(f"pass_at_k: n, c, k must be ints, got {n!r}, {c!r}, {k!r}")
    if k < 1 or n < k:
        raise ValueError(f"pass_at_k: need 1 <= k <= n, got n={n}, k={k}")
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n, got c={c}, n={n}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def mean_pass_at_k(correct: Sequence[Sequence[bool]], k: int) -> float:
    """Mean over problems of pass@k, each from its own (n, c); every problem needs n >= k."""
    if not correct:
        raise ValueError("mean_pass_at_k: no problems")
    return math.fsum(pass_at_k(len(flags), int(sum(bool(f) for f in flags)), k) for flags in correct) / len(correct)


def mean_pass_at_1(correct: Sequence[Sequence[bool]]) -> float:
    """Mean over problems of c/n: Pass@1 averaged over each problem's n samples."""
    if not correct:
        raise ValueError("mean_pass_at_1: no problems")
    for i, flags in enumerate(correct):
        if len(flags) == 0:
            raise ValueError(f"mean_pass_at_1: problem {i} has no samples")
    return math.fsum(sum(bool(f) for f in flags) / len(flags) for flags in correct) / len(correct)


@dataclass(frozen=True)
class Vote:
    """The winning cluster of a majority vote: its first answer and sample index, and its size."""

    answer: str | None
    first_index: int | None
    count: int


def cluster_answers(answers: Sequence[str | None], equivalent: Equivalence | None = None) -> list[list[int]]:
    """Clusters of sample indices with equivalent answers, ordered by first appearance."""
    buckets: dict[str, list[int]] = {}
    for i, answer in enumerate(answers):
        if answer is None:
            continue
        buckets.setdefault(normalize_answer_string(answer), []).append(i)
    clusters = sorted(buckets.values(), key=lambda members: members[0])
    if equivalent is None or len(clusters) < 2:
        return clusters
    merged: list[list[int]] = []
    for members in clusters:
        for target in merged:
            if equivalent(answers[target[0]], answers[members[0]]):  # type: ignore[arg-type]
                target.extend(members)
                break
        else:
            merged.append(list(members))
    for target in merged:
        target.sort()
    return merged


def majority_vote(answers: Sequence[str | None], equivalent: Equivalence | None = None) -> Vote:
    """The largest cluster; ties to the earliest first appearance (see module docstring)."""
    clusters = cluster_answers(answers, equivalent)
    if not clusters:
        return Vote(None, None, 0)
    best = max(clusters, key=lambda members: (len(members), -members[0]))
    return Vote(answers[best[0]], best[0], len(best))


def maj_at_k(
    answers: Sequence[str | None],
    correct: Sequence[bool],
    k: int,
    equivalent: Equivalence | None = None,
) -> bool:
    """maj@k of one problem from its samples' extracted answers and verdicts (first k samples)."""
    if len(answers) != len(correct):
        raise ValueError(f"maj_at_k: {len(answers)} answers but {len(correct)} verdicts")
    if not 1 <= k <= len(answers):
        raise ValueError(f"maj_at_k: need 1 <= k <= {len(answers)}, got k={k}")
    vote = majority_vote(answers[:k], equivalent)
    return vote.first_index is not None and bool(correct[vote.first_index])


def mean_maj_at_k(
    answers: Sequence[Sequence[str | None]],
    correct: Sequence[Sequence[bool]],
    k: int,
    equivalent: Equivalence | None = None,
) -> float:
    """Fraction of problems whose maj@k vote is correct."""
    if not answers or len(answers) != len(correct):
        raise ValueError("mean_maj_at_k: need one answer list and one verdict list per problem")
    return sum(maj_at_k(a, c, k, equivalent) for a, c in zip(answers, correct)) / len(answers)


PAPER_BENCHMARKS: tuple[str, ...] = ("MATH-500", "AIME24", "AIME25", "AMC23", "Olympiad")


def format_results_table(
    rows: Sequence[tuple[Sequence[str], Mapping[str, float]]],
    benchmarks: Sequence[str] = PAPER_BENCHMARKS,
    label_headers: Sequence[str] = ("model", "method"),
    decimals: int = 2,
    average_header: str = "avg",
) -> str:
    """A markdown table laid out like the paper's: labels, one column per benchmark, average last.

    ``rows`` holds ``(labels, {benchmark: score})``; scores are printed as given (pass
    percentages for the paper's layout) with ``decimals`` digits. The average is the plain
    mean over ``benchmarks``; a row missing a benchmark shows "–" there and in its average.
    """
    header = [*label_headers, *benchmarks, average_header]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for labels, scores in rows:
        if len(labels) != len(label_headers):
            raise ValueError(f"format_results_table: {len(labels)} labels for headers {list(label_headers)}")
        cells = [str(label) for label in labels]
        values = [scores.get(b) for b in benchmarks]
        cells += ["–" if v is None else f"{v:.{decimals}f}" for v in values]
        complete = [v for v in values if v is not None]
        avg = math.fsum(complete) / len(values) if values and len(complete) == len(values) else None
        cells.append("–" if avg is None else f"{avg:.{decimals}f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
