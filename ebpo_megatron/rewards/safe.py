"""Run a user reward function so that it can never crash or stall a step, and is never silent.

Each sample is scored in a worker thread with a per-sample timeout. A call that raises, returns
a non-number, NaN or inf, or runs past the timeout is scored 0 and counted by kind; the first
error text of the step is kept for the log. (A timed-out call cannot be killed inside a thread:
it finishes in the background, its result ignored. Rewards that can hang in C code belong in a
process pool, as the math reward does.)
"""

from __future__ import annotations

import concurrent.futures as futures
import math
import time
from typing import Callable, Sequence

Reward = Callable[[str, str], float]


class SafeReward:
    def __init__(self, fn: Reward, timeout_s: float = 5.0, workers: int = 4) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s: expected > 0, got {timeout_s}")
        self.fn, self.timeout_s, self.workers = fn, timeout_s, workers
        self.pool = futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="reward")

    def __call__(self, responses: Sequence[str], answers: Sequence[str]) -> tuple[list[float], dict[str, float]]:
        if len(responses) != len(answers):
            raise ValueError(f"responses/answers: {len(responses)} vs {len(answers)} entries")
        jobs = [self.pool.submit(self.fn, r, a) for r, a in zip(responses, answers)]
        # every sample gets timeout_s of a worker: the batch's budget is timeout_s per wave
        deadline = time.monotonic() + self.timeout_s * math.ceil(len(jobs) / self.workers)
        scores: list[float] = []
        counts = {"errors": 0, "timeouts": 0, "nan": 0}
        first_error = ""
        for job in jobs:
            try:
                value = job.result(timeout=max(deadline - time.monotonic(), 0.0))
            except futures.TimeoutError:
                counts["timeouts"] += 1
                first_error = first_error or f"timeout after {self.timeout_s}s"
                scores.append(0.0)
                continue
            except Exception as err:  # noqa: BLE001 - any reward failure is scored 0 and counted
                counts["errors"] += 1
                first_error = first_error or f"{type(err).__name__}: {err}"
                scores.append(0.0)
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                counts["nan"] += 1
                first_error = first_error or f"reward returned {value!r}"
                scores.append(0.0)
            else:
                scores.append(float(value))
        self.last_error = first_error
        return scores, {f"reward/{k}": float(v) for k, v in counts.items()}
