"""The verifiable math reward: extract the final answer, check it against the reference.

For a reply y and reference answer a*:

    r(y, a*) = c · 1[extract(y) ≡ a*] + w · 1[answer of y was inside \\boxed]

with c = ``correct_score`` (1.0) and w = ``format_weight`` (0.0 = the paper's binary reward;
a small w such as 0.1 is the optional format bonus). An incorrect reply scores
``incorrect_score`` (0.0) plus the same format term. ``extract`` is answer_extraction.py's rule
(last box, then "the answer is", then — only with ``lenient`` — the last number) and ``≡`` is
math-verify's equivalence (math_check.py), computed in a pool of worker processes with a hard
per-check timeout (checker_pool.py): a pathological expression such as ``9^{9^{9^{9}}}`` costs
at most ``timeout_s`` and yields ``error="timeout"``, never a stalled step.

Shortcuts that skip the workers (``fast_path=True``), each exact:
  * no answer extracted → incorrect;
  * identical answers after ``normalize_answer_string`` → correct;
  * both answers plain integers → compared as integers;
  * both plain decimals equal as exact fractions → correct (unequal decimals go to math-verify,
    which compares floats to 6 decimals).
Both compare canonical digit strings (``decimal_key``), so numbers of any length work (Python's
int() stops at 4300 digits).
Within one batch each distinct (reference, answer) pair is checked once.

Garbage never raises: a reply that is not a string, a missing/invalid reference (an int too
long for str() included), an over-long answer (``max_answer_chars``) each give an incorrect
result whose ``error`` says why (tests/test_math_reward_property.py checks it with hypothesis).
"""

from __future__ import annotations

import re
import sys
import threading
import unicodedata
from dataclasses import dataclass, replace
from typing import Any, Sequence

from .answer_extraction import Extraction, extract_answer, normalize_answer_string, normalize_ground_truth
from .checker_pool import Checker, CheckerPool, CheckOutcome, default_num_workers
from .math_check import MISSING_MATH_VERIFY, math_verify_available, math_verify_equal


@dataclass(frozen=True)
class RewardResult:
    """One reply's reward. ``error`` is None, "timeout", or why the check could not run."""

    score: float
    correct: bool
    boxed: bool
    error: str | None = None
    extracted: str | None = None
    method: str = "none"


@dataclass(frozen=True)
class MathRewardConfig:
    """Settings of the math reward (see the module docstring for the formula)."""

    correct_score: float = 1.0
    incorrect_score: float = 0.0
    format_weight: float = 0.0
    lenient: bool = False
    answer_is_fallback: bool = True
    timeout_s: float = 5.0
    # the checks of one batch together: what has not finished by then scores incorrect with
    # error checker_pool.OVER_BUDGET (None: no limit; each check still has timeout_s)
    batch_budget_s: float | None = 60.0
    num_workers: int = 0  # 0 = default_num_workers()
    memory_limit_mb: int | None = 4096
    max_answer_chars: int = 1000
    fast_path: bool = True

    def __post_init__(self) -> None:
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s: expected > 0, got {self.timeout_s}")
        if self.batch_budget_s is not None and self.batch_budget_s <= 0:
            raise ValueError(f"batch_budget_s: expected > 0 or None, got {self.batch_budget_s}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers: expected >= 0 (0 = default), got {self.num_workers}")
        if self.max_answer_chars < 1:
            raise ValueError(f"max_answer_chars: expected >= 1, got {self.max_answer_chars}")


_INT = re.compile(r"^[+-]?\d+$")
_DECIMAL = re.compile(r"^[+-]?\d+(?:\.\d+)?$")


def _ascii_digits(digits: str) -> str:
    return "".join(str(unicodedata.decimal(c)) for c in digits)  # \d also matches other scripts' digits


def decimal_key(number: str) -> str:
    """A plain integer or decimal (``_DECIMAL``) written canonically: ASCII digits, no "+", no
    leading or trailing fractional zeros, "0" for any zero. Two numbers are equal exactly when
    their keys are. Strings, not int()/Fraction: Python converts at most 4300 digits."""
    whole, _, frac = number.lstrip("+-").partition(".")
    whole, frac = _ascii_digits(whole).lstrip("0"), _ascii_digits(frac).rstrip("0")
    if not whole and not frac:
        return "0"
    return ("-" if number.startswith("-") else "") + (whole or "0") + ("." + frac if frac else "")


def fast_verdict(gold: str, pred: str) -> bool | None:
    """An exact verdict without sympy when one is certain, else None (see module docstring)."""
    g, p = normalize_answer_string(gold), normalize_answer_string(pred)
    if g == p:
        return True
    if _INT.match(g) and _INT.match(p):
        return decimal_key(g) == decimal_key(p)
    if _DECIMAL.match(g) and _DECIMAL.match(p) and decimal_key(g) == decimal_key(p):
        return True
    return None


def _short_repr(value: Any) -> str:
    try:
        return f"{value!r:.60}"
    except ValueError:  # an int over Python's str() conversion limit
        return f"an integer of more than {sys.get_int_max_str_digits()} digits"


def _as_ground_truth(value: Any) -> str | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        try:
            return str(value)
        except ValueError:  # over Python's str() conversion limit: no reply of ours can be that long
            return None
    if isinstance(value, float):
        return repr(value) if value == value and abs(value) != float("inf") else None
    if isinstance(value, str):
        gt = normalize_ground_truth(value)
        return gt or None
    return None


class MathReward:
    """The math reward with its own persistent checker pool (started on first use)."""

    def __init__(self, config: MathRewardConfig | None = None, *, checker: Checker | str | None = None) -> None:
        self.config = config or MathRewardConfig()
        self._checker: Checker | str = checker if checker is not None else math_verify_equal
        self._pool: CheckerPool | None = None
        self._lock = threading.Lock()
        self._run_lock = threading.Lock()

    # -- pool ------------------------------------------------------------------------------
    def pool(self) -> CheckerPool:
        """The worker pool, started (and waited for) on first call."""
        with self._lock:
            if self._pool is None:
                if self._checker is math_verify_equal and not math_verify_available():
                    raise ImportError(MISSING_MATH_VERIFY)
                workers = self.config.num_workers or default_num_workers()
                self._pool = CheckerPool(
                    self._checker,
                    workers,
                    memory_limit_mb=self.config.memory_limit_mb,
                )
                self._pool.wait_ready()
            return self._pool

    def check_pairs(self, pairs: Sequence[tuple[str, str]], timeout_s: float | None = None) -> list[CheckOutcome]:
        """Run the checker on ``(reference, answer)`` pairs in the pool (one caller at a time),
        all of them within ``config.batch_budget_s``."""
        timeout_s = self.config.timeout_s if timeout_s is None else float(timeout_s)
        pool = self.pool()
        with self._run_lock:
            return pool.run(pairs, timeout_s, self.config.batch_budget_s)

    def close(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.close()
                self._pool = None

    def __enter__(self) -> "MathReward":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- scoring ---------------------------------------------------------------------------
    def _result(self, correct: bool, ext: Extraction | None, error: str | None, format_weight: float) -> RewardResult:
        boxed = ext is not None and ext.boxed
        base = self.config.correct_score if correct else self.config.incorrect_score
        return RewardResult(
            score=float(base + format_weight * boxed),
            correct=correct,
            boxed=boxed,
            error=error,
            extracted=None if ext is None else ext.answer,
            method="none" if ext is None else ext.method,
        )

    def score_batch(
        self,
        responses: Sequence[Any],
        ground_truths: Sequence[Any],
        timeout_s: float | None = None,
        *,
        lenient: bool | None = None,
        format_weight: float | None = None,
    ) -> list[RewardResult]:
        """Rewards of ``responses[i]`` against ``ground_truths[i]``; arguments left None use the config."""
        if len(responses) != len(ground_truths):
            raise ValueError(f"score_batch: {len(responses)} responses but {len(ground_truths)} ground truths")
        cfg = self.config
        timeout_s = cfg.timeout_s if timeout_s is None else float(timeout_s)
        lenient = cfg.lenient if lenient is None else lenient
        format_weight = cfg.format_weight if format_weight is None else float(format_weight)

        results: list[RewardResult | None] = [None] * len(responses)
        to_check: dict[tuple[str, str], list[tuple[int, Extraction]]] = {}
        for i, (response, raw_gt) in enumerate(zip(responses, ground_truths)):
            if isinstance(response, bytes):
                response = response.decode("utf-8", errors="replace")
            if not isinstance(response, str):
                results[i] = self._result(False, None, f"invalid response: {type(response).__name__}", format_weight)
                continue
            gt = _as_ground_truth(raw_gt)
            ext = extract_answer(response, lenient=lenient, answer_is_fallback=cfg.answer_is_fallback)
            if gt is None:
                results[i] = self._result(False, ext, f"invalid ground truth: {_short_repr(raw_gt)}", format_weight)
                continue
            if ext.answer is None:
                results[i] = self._result(False, ext, None, format_weight)
                continue
            if len(ext.answer) > cfg.max_answer_chars:
                error = f"answer too long ({len(ext.answer)} > {cfg.max_answer_chars} chars)"
                results[i] = self._result(False, ext, error, format_weight)
                continue
            verdict = fast_verdict(gt, ext.answer) if cfg.fast_path else None
            if verdict is not None:
                results[i] = self._result(verdict, ext, None, format_weight)
                continue
            to_check.setdefault((gt, ext.answer), []).append((i, ext))

        if to_check:
            pairs = list(to_check)
            outcomes = self.check_pairs(pairs, timeout_s)
            for pair, outcome in zip(pairs, outcomes):
                for i, ext in to_check[pair]:
                    results[i] = self._result(outcome.verdict, ext, outcome.error, format_weight)
        return [r for r in results if r is not None]

    def score(self, response: Any, ground_truth: Any, timeout_s: float | None = None, **kwargs: Any) -> RewardResult:
        """The reward of one reply (a batch of one)."""
        return self.score_batch([response], [ground_truth], timeout_s, **kwargs)[0]

    def with_config(self, **changes: Any) -> "MathReward":
        """A new reward (with its own pool) whose config differs by ``changes``."""
        return MathReward(replace(self.config, **changes), checker=self._checker)


_DEFAULT: MathReward | None = None
_DEFAULT_LOCK = threading.Lock()


def default_reward() -> MathReward:
    """The process-wide reward with the default config (its pool persists until exit)."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None:
            _DEFAULT = MathReward()
        return _DEFAULT


def score_batch(
    responses: Sequence[Any],
    ground_truths: Sequence[Any],
    timeout_s: float = 5.0,
    *,
    lenient: bool = False,
    format_weight: float = 0.0,
) -> list[RewardResult]:
    """``default_reward().score_batch(...)``: the batched math reward with a persistent pool."""
    return default_reward().score_batch(
        responses, ground_truths, timeout_s, lenient=lenient, format_weight=format_weight
    )


def score(response: Any, ground_truth: Any, timeout_s: float = 5.0, **kwargs: Any) -> RewardResult:
    """The math reward of one reply with the default persistent pool."""
    return score_batch([response], [ground_truth], timeout_s, **kwargs)[0]


class MathVerifyEquivalence:
    """``equivalent(a, b)`` for voting: exact shortcut, else math-verify in the reward's worker pool.

    A check that times out or fails counts as "not equivalent".
    """

    def __init__(self, reward: MathReward | None = None, timeout_s: float = 5.0) -> None:
        self.reward = reward if reward is not None else default_reward()
        self.timeout_s = timeout_s

    def __call__(self, a: str, b: str) -> bool:
        quick = fast_verdict(a, b)
        if quick is not None:
            return quick
        outcome = self.reward.check_pairs([(a, b)], self.timeout_s)[0]
        return outcome.error is None and outcome.verdict
