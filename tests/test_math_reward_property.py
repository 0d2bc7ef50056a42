"""Property test of the math reward's promise that garbage never raises (rewards/math.py): any
reply and any reference (text, boxed or "the answer is" forms, numbers past Python's
4300-digit int conversion limit, non-string references) give one RewardResult, and a check
that runs long ends as error "timeout" instead of stalling."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ebpo_megatron.rewards import MathReward, MathRewardConfig, RewardResult

TIMEOUT_S = 2.0

# "+007", "-123...": short, or repeated to around Python's 4300-digit int conversion limit
digits = st.builds(lambda sign, zeros, head, tail, times: f"{sign}{'0' * zeros}{head}{tail * times}",
                   st.sampled_from(["", "+", "-"]), st.integers(0, 3), st.integers(1, 9),
                   st.from_regex(r"\A\d{1,12}\Z"), st.one_of(st.integers(0, 3), st.integers(400, 700)))
decimals = st.builds(lambda whole, frac: f"{whole}.{frac}", digits, st.from_regex(r"\A\d{1,50}\Z"))
latex = st.lists(st.sampled_from([r"\frac{", "}", "{", "^", "_", r"\sqrt", r"\pi", "x", "=", "+", "-", "1", "2",
                                  r"\infty", "(", ")", "[", ",", r"\boxed{", r"\text{", " ", "."]),
                 max_size=30).map("".join)
answers = st.one_of(st.text(max_size=40), digits, decimals, latex)
replies = st.one_of(st.text(max_size=200), answers.map(lambda a: rf"so \boxed{{{a}}}"),
                    answers.map(lambda a: f"The answer is {a}."), answers)
references = st.one_of(answers, st.integers(4290, 4400).map(lambda n: 10**n - 1), st.integers(),
                       st.floats(), st.none(), st.binary(max_size=20))


@pytest.fixture(scope="module")
def reward():
    pytest.importorskip("math_verify")
    r = MathReward(MathRewardConfig(num_workers=1, timeout_s=TIMEOUT_S, max_answer_chars=10_000))
    r.pool()  # started once, outside the examples
    yield r
    r.close()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(reply=replies, reference=references, lenient=st.booleans())
def test_any_reply_and_reference_give_a_result(reward, reply, reference, lenient):
    result = reward.score(reply, reference, lenient=lenient)
    assert isinstance(result, RewardResult)
    assert math.isfinite(result.score) and result.score in (0.0, 1.0)
    assert result.error is None or isinstance(result.error, str)
    if result.correct:
        assert result.error is None


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(number=st.one_of(digits, decimals))
def test_a_number_matches_itself_in_another_form_whatever_its_length(reward, number):
    unsigned = number.lstrip("+-")
    other = ("-" if number.startswith("-") else "+") + "00" + unsigned + ("0" if "." in unsigned else "")
    assert reward.score(rf"\boxed{{{other}}}", number).correct
