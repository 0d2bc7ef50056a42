"""pass@k, mean Pass@1, maj@k and the results table against brute-force references."""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter
from fractions import Fraction

import pytest

from ebpo_megatron.evaluation import (
    PAPER_BENCHMARKS,
    cluster_answers,
    format_results_table,
    maj_at_k,
    majority_vote,
    mean_maj_at_k,
    mean_pass_at_1,
    mean_pass_at_k,
    pass_at_k,
)


def brute_pass_at_k(flags: list[bool], k: int) -> Fraction:
    """Fraction of all k-subsets of the samples that contain a correct one."""
    subsets = list(itertools.combinations(range(len(flags)), k))
    return Fraction(sum(any(flags[i] for i in s) for s in subsets), len(subsets))


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_at_k_equals_subset_enumeration(n):
    for c in range(n + 1):
        flags = [True] * c + [False] * (n - c)
        random.Random(n * 31 + c).shuffle(flags)
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(float(brute_pass_at_k(flags, k)), abs=1e-12)


def test_pass_at_k_closed_form_and_edges():
    assert pass_at_k(10, 0, 5) == 0.0
    assert pass_at_k(10, 10, 1) == 1.0
    assert pass_at_k(10, 6, 5) == 1.0  # n − c < k: every 5-subset holds a correct sample
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - math.comb(3, 2) / math.comb(5, 2))


def test_pass_at_k_is_stable_for_large_n():
    # C(1000, 500) overflows a float; the product form does not.
    exact = 1 - Fraction(math.comb(1000 - 10, 500), math.comb(1000, 500))
    assert pass_at_k(1000, 10, 500) == pytest.approx(float(exact), rel=1e-12)
    assert 0.0 <= pass_at_k(4096, 1, 16) <= 1.0
    assert pass_at_k(4096, 1, 16) == pytest.approx(16 / 4096, rel=1e-12)


@pytest.mark.parametrize("n,c,k", [(0, 0, 1), (3, 1, 0), (3, 1, 4), (3, 4, 1), (3, -1, 1)])
def test_pass_at_k_rejects_bad_arguments(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)
    with pytest.raises(TypeError):
        pass_at_k(3.0, 1, 1)  # type: ignore[arg-type]


def test_mean_pass_at_1_and_k_over_problems():
    correct = [[True, False, False, False], [True, True, True, True], [False] * 4, [True, False, True, False]]
    assert mean_pass_at_1(correct) == pytest.approx((0.25 + 1 + 0 + 0.5) / 4)
    assert mean_pass_at_k(correct, 1) == pytest.approx(mean_pass_at_1(correct))
    want = sum(float(brute_pass_at_k(flags, 2)) for flags in correct) / 4
    assert mean_pass_at_k(correct, 2) == pytest.approx(want)
    # problems may have different sample counts
    assert mean_pass_at_1([[True], [True, False]]) == pytest.approx(0.75)
    with pytest.raises(ValueError):
        mean_pass_at_1([])
    with pytest.raises(ValueError):
        mean_pass_at_1([[]])


def brute_majority(answers: list[str | None]) -> str | None:
    """Reference: most common answer, ties to the earliest first appearance."""
    votes = Counter(a for a in answers if a is not None)
    if not votes:
        return None
    top = max(votes.values())
    return next(a for a in answers if a is not None and votes[a] == top)


def test_majority_vote_matches_reference_on_random_draws():
    rng = random.Random(7)
    for _ in range(500):
        k = rng.randint(1, 12)
        answers = [rng.choice(["1", "2", "3", None]) for _ in range(k)]
        vote = majority_vote(answers)
        assert vote.answer == brute_majority(answers), answers
        if vote.answer is not None:
            assert vote.count == answers.count(vote.answer)
            assert vote.first_index == answers.index(vote.answer)


def test_majority_ties_go_to_the_earliest_answer():
    assert majority_vote(["b", "a", "a", "b"]).answer == "b"
    assert majority_vote(["a", "b", "b", "a"]).answer == "a"
    assert majority_vote(["c", "a", "b"]).answer == "c"
    assert majority_vote([None, None]).answer is None
    assert majority_vote([]).count == 0


def test_normalized_strings_vote_together():
    answers = [r"\frac{1}{2}", r"\dfrac{1}{2}", "3", "3", r"\left(1,2\right)", "(1, 2)", "(1,2)"]
    clusters = cluster_answers(answers)
    assert clusters == [[0, 1], [2, 3], [4, 5, 6]]
    assert majority_vote(answers).answer == r"\left(1,2\right)"


def test_equivalence_function_merges_clusters():
    def numeric(a: str, b: str) -> bool:
        return abs(float(Fraction(a)) - float(Fraction(b))) < 1e-9

    answers = ["1/2", "0.5", "3", "3", "0.50"]
    # by string only: "3" wins (2 votes) over "1/2", "0.5", "0.50" (1 each)
    assert majority_vote(answers).answer == "3"
    # with numeric equivalence the three halves merge and win
    vote = majority_vote(answers, numeric)
    assert (vote.answer, vote.count, vote.first_index) == ("1/2", 3, 0)


def test_maj_at_k_uses_first_k_samples_and_the_winners_verdict():
    answers = ["7", "5", "5", "7", "7"]
    correct = [True, False, False, True, True]
    assert maj_at_k(answers, correct, 3) is False  # "5" wins among the first 3
    assert maj_at_k(answers, correct, 5) is True
    assert maj_at_k([None, None], [False, False], 2) is False
    with pytest.raises(ValueError):
        maj_at_k(answers, correct, 6)
    with pytest.raises(ValueError):
        maj_at_k(answers, correct[:2], 2)


def test_mean_maj_at_k_against_brute_force():
    rng = random.Random(3)
    problems, verdicts, truths = [], [], []
    for _ in range(50):
        truth = rng.choice("abc")
        answers = [rng.choice("abcd") if rng.random() > 0.1 else None for _ in range(8)]
        problems.append(answers)
        verdicts.append([a == truth for a in answers])
        truths.append(truth)
    want = sum(brute_majority(a[:5]) == t for a, t in zip(problems, truths)) / 50
    assert mean_maj_at_k(problems, verdicts, 5) == pytest.approx(want)


def test_results_table_matches_the_paper_layout():
    rows = [
        (("Qwen3-8B", "GRPO"), {"MATH-500": 65.60, "AIME24": 50.21, "AIME25": 42.29, "AMC23": 89.53, "Olympiad": 45.99}),
        (("Qwen3-8B", "EBPO-topic"), {"MATH-500": 76.80, "AIME24": 56.04, "AIME25": 47.92, "AMC23": 86.25, "Olympiad": 54.93}),
        (("Llama-3.1-8B", "GRPO"), {"MATH-500": 22.66, "AIME24": 2.71}),
    ]
    table = format_results_table(rows)
    lines = table.strip().splitlines()
    assert lines[0] == "| model | method | " + " | ".join(PAPER_BENCHMARKS) + " | avg |"
    assert lines[1] == "|---|---|---|---|---|---|---|---|"
    # the paper's averages: 58.72 and 64.39
    assert lines[2] == "| Qwen3-8B | GRPO | 65.60 | 50.21 | 42.29 | 89.53 | 45.99 | 58.72 |"
    assert lines[3] == "| Qwen3-8B | EBPO-topic | 76.80 | 56.04 | 47.92 | 86.25 | 54.93 | 64.39 |"
    assert lines[4] == "| Llama-3.1-8B | GRPO | 22.66 | 2.71 | – | – | – | – |"
    custom = format_results_table([(("run",), {"a": 1.0, "b": 2.0})], benchmarks=["a", "b"], label_headers=["run"], decimals=1)
    assert custom.splitlines()[2] == "| run | 1.0 | 2.0 | 1.5 |"
    with pytest.raises(ValueError):
        format_results_table([(("only-one-label",), {})])


def test_math_verify_equivalence_for_voting():
    pytest.importorskip("math_verify")
    from ebpo_megatron.evaluation import MathVerifyEquivalence
    from ebpo_megatron.rewards import MathReward, MathRewardConfig

    reward = MathReward(MathRewardConfig(num_workers=1))
    try:
        eq = MathVerifyEquivalence(reward)
        answers = [r"\frac{1}{2}", "0.5", "3", "3", "1/2"]
        vote = majority_vote(answers, eq)
        assert (vote.answer, vote.count) == (r"\frac{1}{2}", 3)
        assert eq("12", "12.0") and not eq("3", "4")
    finally:
        reward.close()
