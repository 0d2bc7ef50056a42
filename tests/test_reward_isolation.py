"""A user reward that hangs is abandoned in a killable worker process (its capacity recovered, the
hang counted, the process free to exit), a reward that cannot reach a worker is a clear error,
and a per-batch budget bounds a batch of pathological answers (the rest scores 0, counted)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ebpo_megatron.rewards.checker_pool import OVER_BUDGET, CheckerPool
from ebpo_megatron.rewards.math import MathReward, MathRewardConfig
from ebpo_megatron.rewards.safe import SafeReward
from test_math_reward import _alive

HERE = Path(__file__).resolve().parent


def hangs_on_some_inputs(response: str, answer: str) -> float:
    """A user reward with a bug: it never returns for responses starting with "hang"."""
    if response.startswith("hang"):
        while True:
            time.sleep(1.0)
    return 1.0 if response == answer else 0.0


def stalling_checker(gold: str, pred: str) -> bool:
    """A checker that takes "forever" (as math-verify on 9^{9^{9^9}}) on answers starting with "stall"."""
    if pred.startswith("stall"):
        time.sleep(600)
    return gold == pred


def test_hung_reward_is_abandoned_and_its_worker_recovered():
    reward = SafeReward(hangs_on_some_inputs, timeout_s=0.5, workers=2)
    try:
        for batch in range(3):  # six hangs: more than there are workers
            scores, stats = reward(["hang a", "1", "hang b"], ["1", "1", "1"])
            assert scores == [0.0, 1.0, 0.0], batch
            assert stats["reward/timeouts"] == 2.0, batch
        scores, stats = reward(["1", "2", "3", "4"], ["1", "2", "0", "4"])
        assert scores == [1.0, 1.0, 0.0, 1.0]  # every worker is free again
        assert stats["reward/timeouts"] == 0.0
        pool = reward.pool()
        assert pool.replaced == 6 and pool.num_workers == 2
    finally:
        reward.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_process_exits_after_hung_rewards_and_leaves_no_worker():
    code = (
        "import sys\n"
        f"sys.path.insert(0, {str(HERE)!r})\n"
        "from ebpo_megatron.rewards.safe import SafeReward\n"
        "from test_reward_isolation import hangs_on_some_inputs\n"
        "reward = SafeReward(hangs_on_some_inputs, timeout_s=0.5, workers=2)\n"
        "print(reward(['hang'] * 4, ['1'] * 4)[1]['reward/timeouts'])\n"
        "reward(['hang'] * 2, ['1'] * 2)\n"
        "print(*reward.pool().pids)\n"
    )
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    timeouts, pids = done.stdout.splitlines()
    assert float(timeouts) == 4.0
    gone_by = time.monotonic() + 10
    while any(_alive(int(pid)) for pid in pids.split()) and time.monotonic() < gone_by:
        time.sleep(0.1)
    assert not any(_alive(int(pid)) for pid in pids.split())


def _local_reward():
    def closure(response: str, answer: str) -> float:
        return 1.0
    return closure


@pytest.mark.parametrize("fn", [lambda r, a: 1.0, _local_reward()], ids=["lambda", "closure"])
def test_reward_that_cannot_reach_a_worker_is_a_clear_error(fn):
    with pytest.raises(ValueError, match="reward function: .* cannot be sent to a worker process .* module-level"):
        SafeReward(fn)


def test_reward_batch_budget_scores_the_rest_zero_and_counts_it():
    reward = SafeReward(hangs_on_some_inputs, timeout_s=60.0, workers=1, budget_s=1.0)
    try:
        scores, stats = reward(["1", "hang", "1", "1"], ["1"] * 4)
        assert scores == [1.0, 0.0, 0.0, 0.0]
        assert stats["reward/over_budget"] == 3.0 and stats["reward/timeouts"] == 0.0
        assert reward.last_error == OVER_BUDGET
        assert reward(["1", "0"], ["1", "1"])[0] == [1.0, 0.0]  # the next batch has the whole budget
    finally:
        reward.close()


def test_checker_pool_budget_bounds_a_batch_of_stalls():
    with CheckerPool(stalling_checker, num_workers=1, memory_limit_mb=None) as pool:
        pool.wait_ready()
        tasks = [("a", "a")] + [("a", f"stall {i}") for i in range(6)] + [("b", "b")]
        outcomes = pool.run(tasks, timeout_s=60.0, budget_s=1.0)
        assert outcomes[0].verdict is True and outcomes[0].error is None
        assert [o.error for o in outcomes[1:]] == [OVER_BUDGET] * 7
        assert pool.replaced == 1  # only the worker busy at the end of the budget
        assert [o.verdict for o in pool.run([("c", "c")], timeout_s=5.0, budget_s=1.0)] == [True]


def test_math_reward_batch_budget():
    reward = MathReward(MathRewardConfig(num_workers=1, timeout_s=60.0, batch_budget_s=1.0, memory_limit_mb=None),
                        checker=stalling_checker)
    try:
        results = reward.score_batch([r"\boxed{stall 1}", r"\boxed{stall 2}", r"\boxed{stall 3}"], ["7"] * 3)
        assert [r.error for r in results] == [OVER_BUDGET] * 3
        assert not any(r.correct for r in results) and all(r.boxed for r in results)
    finally:
        reward.close()


def test_math_task_reward_counts_over_budget():
    from ebpo_megatron.data.tasks import _math_reward

    reward = MathReward(MathRewardConfig(num_workers=1, timeout_s=60.0, batch_budget_s=1.0, memory_limit_mb=None),
                        checker=stalling_checker)
    try:
        scores, stats = _math_reward(reward)([r"\boxed{stall}", r"\boxed{3}", "no answer"], ["x", "3", "3"])
        assert scores == [0.0, 1.0, 0.0]
        assert stats["reward/over_budget"] == 1.0 and stats["reward/errors"] == 0.0
    finally:
        reward.close()
