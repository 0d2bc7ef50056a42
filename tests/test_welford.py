"""WelfordState / EBPOPrior against numpy mean and var(ddof=1), merges, state dicts."""

import copy

import numpy as np
import pytest
import torch

from ebpo_megatron.algorithms import EBPOPrior, WelfordState

REL = 1e-12


@pytest.fixture(scope="module")
def values():
    rng = np.random.default_rng(2024)
    # offset + mixed scales: a naive sum-of-squares formula would lose digits here
    return np.concatenate([rng.normal(1000.0, 3.0, 60_000), rng.uniform(990.0, 1010.0, 40_000)])[
        rng.permutation(100_000)]


def _close(got, want, rel=REL):
    assert abs(got - want) <= rel * abs(want), (got, want, abs(got - want) / abs(want))


def _chunks(values, bounds):
    return [values[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


@pytest.mark.parametrize("chunking", ["one", "seven_uneven", "thousand"])
def test_update_matches_numpy(values, chunking):
    n = len(values)
    if chunking == "one":
        bounds = [0, n]
    elif chunking == "seven_uneven":
        bounds = [0, 3, 1_000, 1_001, 25_000, 60_123, 99_998, n]
    else:
        rng = np.random.default_rng(1)
        cuts = np.sort(rng.choice(np.arange(1, n), size=999, replace=False))
        bounds = [0, *cuts.tolist(), n]
    chunks = _chunks(values, bounds)
    assert sum(len(c) for c in chunks) == n
    w = WelfordState()
    for c in chunks:
        ret = w.update(torch.from_numpy(c.copy()))
        assert ret is w
    assert w.count == n
    _close(w.mean, float(np.mean(values)))
    _close(w.var, float(np.var(values, ddof=1)))
    for field in (w.count, w.mean, w.m2):
        assert isinstance(field, float)


def test_from_values_matches_numpy(values):
    w = WelfordState.from_values(torch.from_numpy(values))
    assert w.count == len(values)
    _close(w.mean, float(np.mean(values)))
    _close(w.var, float(np.var(values, ddof=1)))
    _close(w.m2, float(np.sum((values - np.mean(values)) ** 2)))


def test_update_float32_input_is_accumulated_in_float64():
    x32 = torch.tensor([0.1, 0.2, 0.7, 1e4, -3.3], dtype=torch.float32)
    ref = x32.double().numpy()
    w = WelfordState().update(x32)
    _close(w.mean, float(np.mean(ref)))
    _close(w.var, float(np.var(ref, ddof=1)))


def test_merge_order_independence(values):
    parts = _chunks(values, [0, 17, 40_000, 100_000])
    a, b, c = (WelfordState.from_values(torch.from_numpy(p.copy())) for p in parts)
    ab = copy.deepcopy(a).merge(copy.deepcopy(b))
    ba = copy.deepcopy(b).merge(copy.deepcopy(a))
    for x, y in ((ab.count, ba.count), (ab.mean, ba.mean), (ab.var, ba.var), (ab.m2, ba.m2)):
        _close(x, y)
    want_ab = np.concatenate(parts[:2])
    _close(ab.mean, float(np.mean(want_ab)))
    _close(ab.var, float(np.var(want_ab, ddof=1)))
    # three-way, every order and bracketing
    orders = [
        copy.deepcopy(a).merge(copy.deepcopy(b)).merge(copy.deepcopy(c)),
        copy.deepcopy(c).merge(copy.deepcopy(b)).merge(copy.deepcopy(a)),
        copy.deepcopy(b).merge(copy.deepcopy(c).merge(copy.deepcopy(a))),
        copy.deepcopy(a).merge(copy.deepcopy(c).merge(copy.deepcopy(b))),
    ]
    for w in orders:
        assert w.count == len(values)
        _close(w.mean, float(np.mean(values)))
        _close(w.var, float(np.var(values, ddof=1)))
        _close(w.mean, orders[0].mean)
        _close(w.var, orders[0].var)


def test_merge_returns_self_and_empty_is_neutral(values):
    a = WelfordState.from_values(torch.from_numpy(values[:500].copy()))
    before = a.state_dict()
    ret = a.merge(WelfordState())
    assert ret is a
    assert a.state_dict() == before
    e = WelfordState().merge(copy.deepcopy(a))
    assert e.state_dict() == before
    a.update(torch.empty(0, dtype=torch.float64))  # empty tensor: no-op
    assert a.state_dict() == before


def test_var_zero_below_two_values():
    assert WelfordState().var == 0.0
    assert WelfordState().count == 0.0 and WelfordState().mean == 0.0 and WelfordState().m2 == 0.0
    one = WelfordState.from_values(torch.tensor([5.25], dtype=torch.float64))
    assert one.count == 1.0 and one.mean == 5.25
    assert one.var == 0.0
    two = WelfordState.from_values(torch.tensor([1.0, 3.0], dtype=torch.float64))
    assert two.var == 2.0


def test_welford_state_dict_round_trip(values):
    w = WelfordState.from_values(torch.from_numpy(values[:12_345].copy()))
    d = w.state_dict()
    assert set(d) == {"count", "mean", "m2"}
    assert all(isinstance(v, float) for v in d.values())
    w2 = WelfordState()
    w2.load_state_dict(copy.deepcopy(d))
    assert (w2.count, w2.mean, w2.m2) == (w.count, w.mean, w.m2)
    assert w2.var == w.var
    # continuing from the restored state equals continuing the original, bit for bit
    nxt = torch.from_numpy(values[12_345:20_000].copy())
    w.update(nxt)
    w2.update(nxt)
    assert w2.state_dict() == w.state_dict()


def test_ebpo_prior_state_dict_round_trip(values):
    prior = EBPOPrior()
    prior.rewards.update(torch.from_numpy(values[:4000].copy()))
    prior.group_means.update(torch.from_numpy(values[4000:4100].copy() / 1000.0))
    d = prior.state_dict()
    assert set(d) == {"rewards", "group_means"}
    assert d["rewards"] == prior.rewards.state_dict()
    assert d["group_means"] == prior.group_means.state_dict()
    p2 = EBPOPrior()
    p2.load_state_dict(copy.deepcopy(d))
    assert p2.state_dict() == d
    assert (p2.mu_glob, p2.sigma2, p2.tau2_raw) == (prior.mu_glob, prior.sigma2, prior.tau2_raw)
    assert prior.mu_glob == prior.rewards.mean
    assert prior.sigma2 == prior.rewards.var
    assert prior.tau2_raw == prior.group_means.var
    # torch.save / torch.load (checkpoint path) keeps it exact too
    import io

    buf = io.BytesIO()
    torch.save(d, buf)
    buf.seek(0)
    p3 = EBPOPrior()
    p3.load_state_dict(torch.load(buf))
    assert p3.state_dict() == d
