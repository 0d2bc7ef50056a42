"""Bad input to compute_advantages raises ValueError naming the offending argument."""

import math

import pytest
import torch

from ebpo_megatron.algorithms import EBPOPrior, compute_advantages

GOOD_R = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0])
GOOD_G = torch.tensor([7, 7, 1003, 1003, 42, 42])
ALL = ["grpo", "dr_grpo", "rloo", "ebpo"]


def kwargs_for(name):
    return {"prior": EBPOPrior()} if name == "ebpo" else {}


def test_good_input_is_accepted():
    for name in ALL:
        adv, _ = compute_advantages(name, GOOD_R, GOOD_G, **kwargs_for(name))
        assert adv.shape == (6,)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_reward(name, bad):
    r = GOOD_R.clone()
    r[3] = bad
    prior = EBPOPrior()
    with pytest.raises(ValueError, match="rewards"):
        compute_advantages(name, r, GOOD_G, **({"prior": prior} if name == "ebpo" else {}))
    if name == "ebpo":  # a rejected step must not touch the prior
        assert prior.rewards.count == 0 and prior.group_means.count == 0


@pytest.mark.parametrize("name", ALL)
def test_shape_mismatch(name):
    with pytest.raises(ValueError, match="rewards|group_ids"):
        compute_advantages(name, GOOD_R, GOOD_G[:5], **kwargs_for(name))
    with pytest.raises(ValueError, match="rewards|group_ids"):
        compute_advantages(name, GOOD_R[:4], GOOD_G, **kwargs_for(name))


@pytest.mark.parametrize("name", ALL)
def test_two_dimensional_rewards(name):
    with pytest.raises(ValueError, match="rewards"):
        compute_advantages(name, GOOD_R.reshape(3, 2), GOOD_G.reshape(3, 2), **kwargs_for(name))
    with pytest.raises(ValueError, match="rewards"):
        compute_advantages(name, GOOD_R.reshape(6, 1), GOOD_G, **kwargs_for(name))


@pytest.mark.parametrize("name", ALL)
def test_two_dimensional_group_ids(name):
    with pytest.raises(ValueError, match="group_ids"):
        compute_advantages(name, GOOD_R, GOOD_G.reshape(6, 1), **kwargs_for(name))


@pytest.mark.parametrize("name", ALL)
def test_negative_group_id(name):
    g = GOOD_G.clone()
    g[0] = g[1] = -3
    with pytest.raises(ValueError, match="group_ids"):
        compute_advantages(name, GOOD_R, g, **kwargs_for(name))


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_float_group_ids(name, dtype):
    with pytest.raises(ValueError, match="group_ids"):
        compute_advantages(name, GOOD_R, GOOD_G.to(dtype), **kwargs_for(name))


@pytest.mark.parametrize("name", ALL)
def test_empty_batch(name):
    with pytest.raises(ValueError, match="(?i)empty|rewards"):
        compute_advantages(name, torch.empty(0), torch.empty(0, dtype=torch.int64), **kwargs_for(name))


def test_unknown_estimator_lists_known_names():
    with pytest.raises(ValueError, match="grpo") as info:
        compute_advantages("no_such_estimator", GOOD_R, GOOD_G)
    msg = str(info.value)
    for name in ALL:
        assert name in msg
    assert "no_such_estimator" in msg


@pytest.mark.parametrize("name", ["grpo", "rloo"])
def test_singleton_group_names_the_group(name):
    r = torch.tensor([1.0, 0.0, 1.0, 0.5, 1.0])
    g = torch.tensor([7, 7, 1234567, 42, 42])
    with pytest.raises(ValueError, match="1234567"):
        compute_advantages(name, r, g)


def test_ebpo_without_prior():
    with pytest.raises(ValueError, match="prior"):
        compute_advantages("ebpo", GOOD_R, GOOD_G)
    with pytest.raises(ValueError, match="prior"):
        compute_advantages("ebpo", GOOD_R, GOOD_G, prior=None)
