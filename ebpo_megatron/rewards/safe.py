"""Run a user reward function so that it can never crash or stall a step, and is never silent.

Each sample is scored in a pool of worker processes (checker_pool.CheckerPool, the machinery of
the math reward) with a per-sample timeout and, optionally, a budget for the whole batch. A call
that raises, returns a non-number, NaN or inf, runs past the timeout or past the batch budget is
scored 0 and counted by kind; the first error text of the step is kept for the log. A call past
its timeout is abandoned for good: its worker is killed (SIGKILL) and replaced, so a reward that
hangs on some inputs costs one timeout per hang and never holds a worker, slows the trainer or
keeps the process alive at the end of the run (workers die with it).

The reward must reach a worker process: a module-level function (or ``"module:function"``),
importable there by name. A lambda, a closure, a local function or a function defined in the
script run as ``__main__`` cannot be sent; :class:`SafeReward` says so when it is built.
"""

from __future__ import annotations

import math
import threading
from typing import Callable, Sequence

from .checker_pool import OVER_BUDGET, CheckerPool, check_sendable, default_num_workers

Reward = Callable[[str, str], float]


class SafeReward:
    """``reward(responses, answers) -> (scores, counts)`` with ``fn(response, answer)`` run in
    ``workers`` processes (0: :func:`default_num_workers`), started on first use."""

    def __init__(self, fn: Reward | str, timeout_s: float = 5.0, workers: int = 0,
                 budget_s: float | None = None, memory_limit_mb: int | None = None) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s: expected > 0, got {timeout_s}")
        if budget_s is not None and budget_s <= 0:
            raise ValueError(f"budget_s: expected > 0 or None, got {budget_s}")
        try:
            check_sendable(fn)
        except ValueError as err:
            raise ValueError(f"reward function: {err}") from err
        self.fn, self.timeout_s, self.budget_s = fn, timeout_s, budget_s
        self.workers = workers or default_num_workers()
        self.memory_limit_mb = memory_limit_mb
        self.last_error = ""
        self._pool: CheckerPool | None = None
        self._lock = threading.Lock()

    def pool(self) -> CheckerPool:
        """The worker pool, started (and waited for) on first call."""
        with self._lock:
            if self._pool is None:
                self._pool = CheckerPool(self.fn, self.workers, memory_limit_mb=self.memory_limit_mb,
                                         returns="value")
                self._pool.wait_ready()
            return self._pool

    def close(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.close()
                self._pool = None

    def __call__(self, responses: Sequence[str], answers: Sequence[str]) -> tuple[list[float], dict[str, float]]:
        if len(responses) != len(answers):
            raise ValueError(f"responses/answers: {len(responses)} vs {len(answers)} entries")
        outcomes = self.pool().run(list(zip(responses, answers)), self.timeout_s, self.budget_s)
        scores: list[float] = []
        counts = {"errors": 0, "timeouts": 0, "over_budget": 0, "nan": 0}
        first_error = ""
        for outcome in outcomes:
            value, error = outcome.verdict, outcome.error
            if error is not None:
                kind = {"timeout": "timeouts", OVER_BUDGET: "over_budget"}.get(error, "errors")
                counts[kind] += 1
                first_error = first_error or (f"timeout after {self.timeout_s}s" if kind == "timeouts" else error)
                scores.append(0.0)
            elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                counts["nan"] += 1
                first_error = first_error or f"reward returned {value if isinstance(value, str) else repr(value)}"
                scores.append(0.0)
            else:
                scores.append(float(value))
        self.last_error = first_error
        return scores, {f"reward/{k}": float(v) for k, v in counts.items()}
