"""The math reward: answer extraction, math-verify equivalence, timeouts, garbage input, latency.

The verdict table below is hand-written: each row says what a careful grader would decide.
Rows that math-verify gets wrong are kept apart as strict xfails (a fix upstream shows up).
"""

from __future__ import annotations

import os
import sys
import time

import pytest

from ebpo_megatron.rewards import (
    CheckerPool,
    MathReward,
    MathRewardConfig,
    WorkerStartError,
    extract_answer,
    normalize_answer_string,
    normalize_ground_truth,
)
from ebpo_megatron.rewards import math as reward_math
from ebpo_megatron.rewards.answer_extraction import find_answer_is, find_last_box, find_last_number
from ebpo_megatron.rewards.math import fast_verdict
from ebpo_megatron.rewards.math_check import MISSING_MATH_VERIFY, require_math_verify



# ---------------------------------------------------------------------------------------------
# Checkers injected into worker processes (module level, so workers can import them).
def slow_checker(gold: str, pred: str) -> bool:
    if pred == "slow":
        time.sleep(60)
    if pred == "nap":
        time.sleep(0.3)
    return gold == pred


def raising_checker(gold: str, pred: str) -> bool:
    raise ZeroDivisionError("division by zero in checker")


def crashing_checker(gold: str, pred: str) -> bool:
    if pred == "crash":
        os._exit(3)
    return gold == pred


def _failing_warmup() -> None:
    raise RuntimeError("warm-up failed on purpose")


def warmup_failing_checker(gold: str, pred: str) -> bool:
    return True


warmup_failing_checker.warmup = _failing_warmup  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def reward():
    pytest.importorskip("math_verify")
    r = MathReward(MathRewardConfig(num_workers=1, timeout_s=10.0))
    yield r
    r.close()


# ---------------------------------------------------------------------------------------------
# (response, ground truth, expected correct)
CASES: list[tuple[str, object, bool]] = [
    # fractions, decimals, LaTeX vs plain
    (r"So the probability is \boxed{\frac{1}{2}}.", "0.5", True),
    (r"\boxed{\dfrac12}", r"\frac{1}{2}", True),
    (r"\boxed{1/2}", r"\frac{1}{2}", True),
    (r"\boxed{\frac{7}{2}}", "3.5", True),
    (r"\boxed{1.50}", r"\frac{3}{2}", True),
    (r"\boxed{\frac{3}{28}}", r"\frac{6}{56}", True),
    (r"\boxed{\frac{3}{27}}", r"\frac{3}{28}", False),
    (r"\boxed{0.333}", r"\frac13", False),
    (r"\boxed{ 18 }", "18.0", True),
    (r"\boxed{3}", "3.0001", False),
    (r"\boxed{10^{-3}}", "0.001", True),
    # nested braces, radicals, symbolic forms
    (r"Hence $\cos 30^\circ = \boxed{\frac{\sqrt{3}}{2}}$", r"\frac{\sqrt3}{2}", True),
    (r"\boxed{2\sqrt{2}}", r"\sqrt{8}", True),
    (r"\boxed{\sqrt{2}/2}", r"\frac{1}{\sqrt{2}}", True),
    (r"\boxed{\frac{e^4}{2} - \frac12}", r"\frac{e^4 - 1}{2}", True),
    (r"\boxed{3e^{2}}", "3e^2", True),
    (r"\boxed{22.17}", "3e^2", False),
    (r"\boxed{\pi^2/6}", r"\frac{\pi^2}{6}", True),
    (r"\boxed{9\pi}", r"9\pi", True),
    (r"\boxed{28.27}", r"9\pi", False),
    (r"\boxed{3.14}", r"\pi", False),
    (r"\boxed{x^2+2x+1}", "(x+1)^2", True),
    (r"\boxed{y^2+2y+1}", "(x+1)^2", False),
    (r"\boxed{\frac{-i}{2}}", r"-\frac{i}{2}", True),
    (r"\boxed{i}", "-i", False),
    (r"\boxed{-2}", "2", False),
    (r"\boxed{-\infty}", r"\infty", False),
    # \fbox and the last-box rule
    (r"\fbox{42}", "42", True),
    (r"First \boxed{3}. Wait, I made an error: \boxed{4}", "4", True),
    (r"First \boxed{3}. Wait, I made an error: \boxed{4}", "3", False),
    # degrees, units, money, percentages
    (r"\boxed{60^\circ}", "60", True),
    (r"\boxed{60}", r"60^\circ", True),
    (r"\boxed{720^\circ}", "720", True),
    (r"\boxed{5\text{ cm}}", "5", True),
    (r"\boxed{45\,\mathrm{m}}", "45", True),
    (r"\boxed{12 \text{ dollars}}", "12", True),
    (r"\boxed{\$30}", "30", True),
    (r"\boxed{25\%}", "25", True),
    (r"\boxed{1{,}210}", "1210", True),
    (r"\boxed{1210.00}", "1210", True),
    # intervals and inequalities
    (r"\boxed{(4, \infty)}", r"(4,\infty)", True),
    (r"\boxed{\left( 4, \infty \right)}", r"(4, \infty)", True),
    (r"\boxed{x > 4}", r"(4, \infty)", True),
    (r"\boxed{x \in (4, \infty)}", r"(4,\infty)", True),
    (r"\boxed{[1,2)}", "(1,2]", False),
    (r"\boxed{(-\infty, 3]}", r"(-\infty,3)", False),
    # sets and multiple answers
    (r"\boxed{\{3, 1, 2\}}", r"\{1,2,3\}", True),
    (r"\boxed{\{1,2\}}", r"\{1,2,3\}", False),
    (r"The roots are \boxed{3, 2}", "2, 3", True),
    (r"\boxed{x = 2 \text{ or } x = 3}", "2, 3", True),
    (r"\boxed{2}", "2, 3", False),
    (r"\boxed{x=6}", "6", True),
    (r"\boxed{(1,2)}", "(2,1)", False),
    # text answers, choices
    (r"\boxed{\text{Monday}}", "Monday", True),
    (r"\boxed{\text{Monday}}", "Tuesday", False),
    (r"\boxed{\text{(B)}}", "B", True),
    # "the answer is" / "Answer:" fallbacks, reference answer formats
    ("The answer is 0.5.", r"\frac12", True),
    (r"The final answer is $\frac{3}{8}$.", r"\frac38", True),
    ("Adding up, we get 34.\nAnswer: 34", "34", True),
    ("**Answer:** 12", "12", True),
    ("So the answer is 12 apples.", "12", True),
    ("So the answer is 13 apples.", "12", False),
    (r"\boxed{5}", r"\boxed{5}", True),
    (r"\boxed{5}", "$5$", True),
    (r"\boxed{7}", 7, True),
    (r"\boxed{2.5}", 2.5, True),
    # no usable answer
    ("I don't know.", "5", False),
    ("so we get 46 numbers.", "46", False),  # last-number fallback is off by default
    (r"\boxed{5} and then \boxed{6", "5", False),  # the last box is unclosed: no boxed answer
]

KNOWN_MATH_VERIFY_GAPS: list[tuple[str, str, bool]] = [
    (r"\boxed{\frac{1}{2i}}", r"-\frac{i}{2}", True),  # bare i read as a symbol
    (r"\boxed{\frac{\pi}{3}}", r"60^\circ", True),  # radians vs degrees
]


@pytest.fixture(scope="module")
def case_results(reward):
    t0 = time.perf_counter()
    results = reward.score_batch([c[0] for c in CASES], [c[1] for c in CASES])
    elapsed = time.perf_counter() - t0
    print(f"\n{len(CASES)} verdict cases scored in {elapsed:.2f} s")
    return results


def test_there_are_at_least_40_cases_with_both_verdicts():
    assert len(CASES) >= 40
    assert sum(c[2] for c in CASES) >= 15 and sum(not c[2] for c in CASES) >= 15


@pytest.mark.parametrize("index", range(len(CASES)), ids=[f"{i:02d}-{c[0][:30]}" for i, c in enumerate(CASES)])
def test_verdict(case_results, index):
    response, truth, expected = CASES[index]
    result = case_results[index]
    assert result.error is None, result
    assert result.correct is expected, (response, truth, result)
    assert result.score == (1.0 if expected else 0.0)


@pytest.mark.parametrize("response,truth,expected", KNOWN_MATH_VERIFY_GAPS)
@pytest.mark.xfail(strict=True, reason="math-verify limitation (see math_check.py)")
def test_known_math_verify_gaps(reward, response, truth, expected):
    assert reward.score(response, truth).correct is expected


def test_boxed_flag_and_method(case_results):
    by_response = {c[0]: r for c, r in zip(CASES, case_results)}
    assert by_response[r"\fbox{42}"].boxed and by_response[r"\fbox{42}"].method == "fbox"
    assert by_response["The answer is 0.5."].boxed is False
    assert by_response["The answer is 0.5."].method == "answer_is"
    assert by_response["I don't know."].method == "none" and by_response["I don't know."].extracted is None


# ---------------------------------------------------------------------------------------------
# extraction
@pytest.mark.parametrize(
    "text,answer",
    [
        (r"\boxed{\frac{a}{b}}", r"\frac{a}{b}"),
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),  # escaped braces do not close the box
        (r"\boxed{\left\{ x \right\}}", r"\left\{ x \right\}"),
        (r"x \boxed {7} y", "7"),  # space before the brace
        (r"$\boxed 5$", "5"),  # MATH's brace-less form
        (r"\boxed{a} \fbox{b}", "b"),
        (r"\fbox{a} \boxed{b}", "b"),
        (r"\boxed{1}\boxed{2}\boxed{3}", "3"),
        (r"\boxed{{{x}}}", "{{x}}"),
        (r"\boxed{a\\}", "a\\\\"),  # "\\" is an escaped backslash, the brace closes the box
    ],
)
def test_find_last_box(text, answer):
    assert find_last_box(text)[0] == answer


@pytest.mark.parametrize(
    "text",
    [r"\boxed{}", r"\boxed{   }", r"\boxed{1} \boxed{2", r"no box at all", r"\boxedfoo{3}", r"\boxed"],
)
def test_find_last_box_gives_nothing(text):
    assert find_last_box(text)[0] is None


@pytest.mark.parametrize(
    "text,answer",
    [
        ("The answer is 5.", "5"),
        ("The answer is 3.5.", "3.5"),
        (r"The final answer is $\frac{1}{2}$, as computed.", r"\frac{1}{2}"),
        (r"Final answer: \(x^2\)", "x^2"),
        ("**Final Answer:** 7\nsome more text", "7"),
        ("the ANSWER = 9", "9"),
        ("The answer is 12 apples.", "12"),
        ("The answer is 1,234.", "1,234"),
        ("The answer is 4. Then the answer is 5.", "5"),
        ("answer:\n$$\\frac{3}{4}$$", r"\frac{3}{4}"),
    ],
)
def test_find_answer_is(text, answer):
    assert find_answer_is(text) == answer


@pytest.mark.parametrize(
    "text,number",
    [
        ("we get 46 numbers", "46"),
        ("x = -3.25 finally", "-3.25"),
        ("total 1,234,567 items", "1234567"),
        ("it is 3/4 of it", "3/4"),
        ("1, 2, 3", "3"),
        ("no digits here", None),
    ],
)
def test_find_last_number(text, number):
    assert find_last_number(text) == number


def test_extract_answer_order_and_lenient_flag():
    assert extract_answer(r"The answer is 3. \boxed{4}").answer == "4"  # a box beats "answer is"
    assert extract_answer("we count 46").method == "none"
    lenient = extract_answer("we count 46", lenient=True)
    assert (lenient.answer, lenient.method, lenient.boxed) == ("46", "last_number", False)
    assert extract_answer("The answer is 5", answer_is_fallback=False).answer is None
    cut = extract_answer(r"The answer is \boxed{5")  # a cut-off box after the phrase is no answer
    assert (cut.answer, cut.method) == (None, "none")
    assert extract_answer(r"The answer is \boxed{5", lenient=True).answer == "5"
    with pytest.raises(TypeError):
        extract_answer(None)  # type: ignore[arg-type]


def test_normalizers():
    assert normalize_ground_truth(r"$\frac{1}{2}$") == r"\frac{1}{2}"
    assert normalize_ground_truth(r"\boxed{5}") == "5"
    assert normalize_ground_truth(r"\(x+1\)") == "x+1"
    assert normalize_answer_string(r"\dfrac{1}{2}") == normalize_answer_string(r"\frac{1}{2}")
    assert normalize_answer_string(r"\left( 4, \infty \right)") == r"(4,\infty)"
    assert normalize_answer_string(r"\text{Monday}.") == "Monday"
    assert normalize_answer_string("60^{\\circ}") == "60"


def test_fast_verdict_is_exact_or_abstains():
    assert fast_verdict("12", "12") is True
    assert fast_verdict("12", "13") is False
    assert fast_verdict("007", "7") is True
    assert fast_verdict("10", "10.0") is True
    assert fast_verdict("0.5", "0.50") is True
    assert fast_verdict("0.5", "0.6") is None  # floats are left to math-verify's rounding rule
    assert fast_verdict(r"\frac12", "0.5") is None


def test_lenient_last_number_fallback(reward):
    assert reward.score("so we get 46 numbers.", "46", lenient=True).correct
    assert not reward.score("so we get 46 numbers.", "46").correct


def test_format_weight_adds_a_bonus_for_boxed_answers(reward):
    results = reward.score_batch(
        [r"\boxed{4}", r"\boxed{5}", "The answer is 4", "nothing"], ["4", "4", "4", "4"], format_weight=0.1
    )
    assert [r.score for r in results] == pytest.approx([1.1, 0.1, 1.0, 0.0])
    assert [r.boxed for r in results] == [True, True, False, False]


def test_custom_scores_from_config():
    r = MathReward(MathRewardConfig(correct_score=1.0, incorrect_score=-1.0, format_weight=0.5))
    try:  # both fast-path cases: no worker is started
        results = r.score_batch([r"\boxed{4}", "The answer is 3"], ["4", "4"])
        assert [x.score for x in results] == [1.5, -1.0]
        assert r._pool is None
    finally:
        r.close()


# ---------------------------------------------------------------------------------------------
# garbage input
def test_garbage_inputs_never_raise(reward):
    huge = "x" * 5_000_000 + r" \boxed{17}"
    responses = [None, 17, ["\\boxed{1}"], "", "   ", "\x00\x01\udcff", huge, b"\\boxed{3}", b"\xff\xfe\\boxed{3}"]
    truths = ["1", "17", "1", "1", "1", "1", "17", "3", "3"]
    t0 = time.perf_counter()
    results = reward.score_batch(responses, truths)
    assert time.perf_counter() - t0 < 5.0
    assert [r.correct for r in results] == [False, False, False, False, False, False, True, True, True]
    assert results[0].error == "invalid response: NoneType"
    assert results[1].error == "invalid response: int"
    assert results[2].error == "invalid response: list"
    assert all(r.error is None for r in results[3:])


def test_numbers_over_pythons_int_digit_limit_never_raise(reward):
    big = "7" * 5000  # int(big) raises: Python converts at most 4300 digits
    assert fast_verdict(big, big) is True and fast_verdict(big, "+" + big) is True
    assert fast_verdict(big, "7") is False and fast_verdict("-0", "0") is True
    assert fast_verdict(big + ".50", "0" + big + ".5") is True
    assert fast_verdict(big + ".5", big + ".25") is None  # unequal decimals: math-verify decides
    results = reward.score_batch([r"\boxed{7}", r"\boxed{7}", r"\boxed{7.5}", r"\boxed{7}"],
                                 [big, int(big[:4299]) * 10**701, big + ".5", -(10**6000)])
    assert [r.correct for r in results] == [False, False, False, False]
    assert results[0].error is None and results[2].error is None
    for huge_int in (results[1], results[3]):  # str() of such an int raises too
        assert huge_int.error == "invalid ground truth: an integer of more than 4300 digits"


def test_bad_ground_truths_are_errors_not_exceptions(reward):
    truths = [None, True, float("nan"), ["1"], "", "   ", {"a": 1}]
    results = reward.score_batch([r"\boxed{1}"] * len(truths), truths)
    assert not any(r.correct for r in results)
    assert all(r.error and r.error.startswith("invalid ground truth") for r in results)
    assert all(r.boxed for r in results)


def test_overlong_answer_is_rejected_without_a_check(reward):
    result = reward.score(r"\boxed{" + "1+" * 2000 + "1}", "4001")
    assert not result.correct and result.error.startswith("answer too long")


def test_pathological_nested_braces_are_linear():
    text = r"\boxed{" + "{" * 200_000 + "}" * 200_000 + "}"
    t0 = time.perf_counter()
    assert find_last_box(text)[0] is not None
    assert time.perf_counter() - t0 < 2.0


def test_length_mismatch_is_a_caller_error(reward):
    with pytest.raises(ValueError, match="2 responses but 1 ground truths"):
        reward.score_batch(["a", "b"], ["1"])


def test_empty_batch(reward):
    assert reward.score_batch([], []) == []


# ---------------------------------------------------------------------------------------------
# timeouts and worker failures
def test_pathological_expression_times_out_and_the_pool_recovers(reward):
    pool = reward.pool()
    replaced_before = pool.replaced
    t0 = time.perf_counter()
    results = reward.score_batch([r"\boxed{9^{9^{9^{9}}}}", r"\boxed{\frac{1}{2}}"], ["5", "0.5"], timeout_s=1.5)
    elapsed = time.perf_counter() - t0
    assert results[0].error == "timeout" and not results[0].correct and results[0].boxed
    assert results[1].correct and results[1].error is None  # the next check ran on the replacement
    assert pool.replaced == replaced_before + 1
    assert elapsed < 15.0
    assert reward.score(r"\boxed{0.25}", r"\frac14").correct


def test_slow_checker_is_killed_and_others_finish():
    with CheckerPool(slow_checker, num_workers=2, memory_limit_mb=None) as pool:
        pool.wait_ready()
        old_pids = set(pool.pids)
        t0 = time.perf_counter()
        outcomes = pool.run([("a", "slow"), ("a", "a"), ("b", "c"), ("d", "d")], timeout_s=1.0)
        elapsed = time.perf_counter() - t0
        assert [o.error for o in outcomes] == ["timeout", None, None, None]
        assert [o.verdict for o in outcomes] == [False, True, False, True]
        assert elapsed < 5.0  # one timeout, not a stalled batch
        assert pool.replaced == 1 and len(set(pool.pids) - old_pids) == 1
        # two slow tasks in one batch with two workers: both time out, both workers replaced
        outcomes = pool.run([("a", "slow"), ("a", "slow"), ("x", "x")], timeout_s=0.5)
        assert [o.error for o in outcomes] == ["timeout", "timeout", None]
        assert pool.replaced == 3


def test_reply_from_an_interrupted_call_is_not_taken_for_the_next():
    with CheckerPool(slow_checker, num_workers=2, memory_limit_mb=None) as pool:
        pool.wait_ready()
        with pytest.raises(Exception):  # the second task cannot be sent: the call aborts
            pool.run([("x", "nap"), (lambda: 0, "y")], timeout_s=5.0)  # type: ignore[list-item]
        # The stale reply (False, for "x" vs "nap") arrives before this call's first task ends.
        outcomes = pool.run([("nap", "nap"), ("c", "d"), ("e", "e")], timeout_s=5.0)
        assert [o.verdict for o in outcomes] == [True, False, True]


def test_checker_exception_becomes_an_error_string():
    reward = MathReward(MathRewardConfig(num_workers=1), checker=raising_checker)
    try:
        result = reward.score(r"\boxed{\frac{1}{3}}", "0.3")
        assert not result.correct
        assert result.error == "ZeroDivisionError: division by zero in checker"
    finally:
        reward.close()


def test_worker_crash_is_reported_and_replaced():
    with CheckerPool(crashing_checker, num_workers=1, memory_limit_mb=None) as pool:
        pool.wait_ready()
        outcomes = pool.run([("a", "crash"), ("b", "b")], timeout_s=5.0)
        assert outcomes[0].error == "worker died (exit code 3)"
        assert outcomes[1].verdict is True and outcomes[1].error is None
        assert pool.replaced == 1


def test_worker_that_cannot_start_raises():
    with pytest.raises(WorkerStartError, match="warm-up failed on purpose"):
        with CheckerPool(warmup_failing_checker, num_workers=1) as pool:
            pool.wait_ready()
    with pytest.raises(ModuleNotFoundError):
        CheckerPool("no_such_module_xyz:check", num_workers=1)
    with pytest.raises(Exception):
        CheckerPool(lambda g, p: True, num_workers=1)  # cannot reach a worker process


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting to be reaped counts as gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return not any(line.startswith("State:") and "Z" in line.split()[1] for line in f)
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_stuck_workers_die_with_their_parent():
    import signal
    import subprocess

    script = (
        "import sys; sys.path[:0] = %r\n"
        "from ebpo_megatron.rewards import CheckerPool\n"
        "pool = CheckerPool('test_math_reward:slow_checker', 1, memory_limit_mb=None)\n"
        "pool.wait_ready(); print(pool.pids[0], flush=True)\n"
        "pool.run([('a', 'slow')], timeout_s=120)\n"
    ) % (sys.path,)
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        worker_pid = int(parent.stdout.readline())
        time.sleep(0.5)  # the worker is now inside the 60 s sleep
        assert _alive(worker_pid)
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 10
        while _alive(worker_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(worker_pid)
    finally:
        if parent.poll() is None:
            parent.kill()


def test_pool_made_in_a_short_lived_thread_keeps_its_workers():
    import threading

    box: dict = {}
    thread = threading.Thread(target=lambda: box.setdefault("pool", CheckerPool("operator:eq", 1, memory_limit_mb=None)))
    thread.start()
    thread.join()
    pool = box["pool"]
    try:
        pool.wait_ready()
        assert [o.verdict for o in pool.run([("1", "1"), ("1", "2")], timeout_s=5)] == [True, False]
        assert pool.replaced == 0
    finally:
        pool.close()


def test_missing_math_verify_names_the_extra(monkeypatch):
    monkeypatch.setattr(reward_math, "math_verify_available", lambda: False)
    reward = MathReward()
    with pytest.raises(ImportError, match=r"pip install 'ebpo_megatron\[math\]'"):
        reward.score(r"\boxed{\frac12}", "0.5")
    monkeypatch.setitem(sys.modules, "math_verify", None)
    with pytest.raises(ImportError) as info:
        require_math_verify()
    assert str(info.value) == MISSING_MATH_VERIFY


def test_reward_module_does_not_import_sympy_in_the_caller():
    import subprocess

    code = (
        "import sys; from ebpo_megatron.rewards import score_batch, extract_answer; "
        "print('sympy' in sys.modules, 'math_verify' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


# ---------------------------------------------------------------------------------------------
# batching: dedupe and latency
def test_batch_deduplicates_identical_checks(reward):
    seen: list[int] = []
    original = reward.check_pairs

    def counting(pairs, timeout_s=None):
        seen.append(len(pairs))
        return original(pairs, timeout_s)

    reward.check_pairs = counting  # type: ignore[method-assign]
    try:
        responses = [r"\boxed{\frac{2}{4}}"] * 6 + [r"\boxed{0.5}"] * 2 + [r"\boxed{1/2}"]
        results = reward.score_batch(responses, [r"\frac{1}{2}"] * 9)
    finally:
        del reward.check_pairs
    assert all(r.correct for r in results)
    assert seen == [3]  # three distinct (truth, answer) pairs reach the workers


def test_concurrent_callers_share_one_pool_safely(reward):
    from concurrent.futures import ThreadPoolExecutor

    def one(i: int) -> list[bool]:
        responses = [rf"\boxed{{\frac{{{i}}}{{{i + 1}}}}}", rf"\boxed{{{i}/{i + 2}}}"]
        return [r.correct for r in reward.score_batch(responses, [rf"\frac{{{i}}}{{{i + 1}}}"] * 2)]

    with ThreadPoolExecutor(4) as ex:
        outcomes = list(ex.map(one, range(1, 13)))
    assert outcomes == [[True, False]] * 12


def test_ipc_overhead_per_check_is_small():
    with CheckerPool("operator:eq", num_workers=1, memory_limit_mb=None) as pool:
        pool.wait_ready()
        tasks = [(str(i), str(i % 3)) for i in range(1000)]
        t0 = time.perf_counter()
        outcomes = pool.run(tasks, timeout_s=5.0)
        per_task_ms = (time.perf_counter() - t0) / len(tasks) * 1e3
    assert [o.verdict for o in outcomes[:4]] == [True, True, True, False]
    print(f"\npool round trip: {per_task_ms * 1e3:.0f} us per check")
    assert per_task_ms < 2.0


def _batch_of_256() -> tuple[list[str], list[str]]:
    """256 GRPO-like replies: 64 prompts × 4 samples, mixed forms, each string new to the workers."""
    import random

    rng = random.Random(1234)
    responses, truths = [], []
    for p in range(64):
        a, b = rng.randint(1, 97), rng.randint(2, 89)
        truth = rf"\frac{{{a}}}{{{b + 100}}}" if p % 2 else str(a * b + 1000)
        for g in range(4):
            form = (p + g) % 4
            if p % 2 == 0:
                value = [str(a * b + 1000), f"{a * b + 1000}.0", str(a * b + 999), f"{a * b + 1000}"][form]
            else:
                value = [rf"\dfrac{{{a}}}{{{b + 100}}}", f"{a}/{b + 100}", f"{a / (b + 100):.6f}", f"{a + 1}/{b + 100}"][form]
            responses.append(f"Let me think step by step... reasoning {p}-{g}. Therefore \\boxed{{{value}}}.")
            truths.append(truth)
    return responses, truths


def test_batch_of_256_latency():
    pytest.importorskip("math_verify")
    responses, truths = _batch_of_256()
    reward = MathReward(MathRewardConfig(num_workers=1))
    try:
        t0 = time.perf_counter()
        reward.pool()
        start_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        results = reward.score_batch(responses, truths)
        batch_s = time.perf_counter() - t0
    finally:
        reward.close()
    assert all(r.error is None for r in results)
    assert sum(r.correct for r in results) == 192  # exactly one wrong sample per group
    print(
        f"\nbatch of 256: {batch_s:.2f} s = {batch_s / 256 * 1e3:.2f} ms per reply "
        f"(1 worker; pool start {start_s:.2f} s, once per process)"
    )
    assert batch_s < 30.0
