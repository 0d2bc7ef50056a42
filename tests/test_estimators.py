"""Advantage estimators (grpo, dr_grpo, rloo, ebpo) against the float64 loop references.

Batches have uneven, shuffled, non-contiguous group ids (e.g. 7, 1003, 42) and mixed group sizes.
Expected values come only from tests/reference_impl.py, never from the package.
"""

import uuid

import numpy as np
import pytest
import torch

from ebpo_megatron.algorithms import (
    EBPOPrior,
    GroupAffine,
    compute_advantages,
    list_estimators,
    register_estimator,
)
from reference_impl import (
    RefPrior,
    groups_of,
    ref_dr_grpo,
    ref_ebpo_step,
    ref_grpo,
    ref_rloo,
    zero_signal_frac,
)

ATOL = 1e-6  # float32 output against float64 reference


def make_batch(rng, sizes, *, binary=True, p=None, fixed_ids=(7, 1003, 42), all_equal=()):
    """Rewards/ids for groups of the given sizes, rows shuffled, ids non-contiguous and unsorted.

    ``all_equal``: indexes of groups forced to one value (alternately all-0 / all-1).
    Rewards are float32-representable so float32 and float64 tensors carry the same values.
    """
    n_groups = len(sizes)
    extra = rng.choice(np.arange(50, 1_000_000), size=n_groups, replace=False)
    ids = list(fixed_ids[:n_groups]) + [int(x) for x in extra[: n_groups - len(fixed_ids[:n_groups])]]
    rng.shuffle(ids)
    rewards, gids = [], []
    for k, (gid, G) in enumerate(zip(ids, sizes)):
        if k in all_equal:
            vals = [float(k % 2)] * G
        elif binary:
            pm = rng.uniform(0.05, 0.95) if p is None else p
            vals = [float(rng.random() < pm) for _ in range(G)]
        else:
            vals = [float(np.float32(v)) for v in rng.normal(0.3, 1.5, size=G)]
        rewards += vals
        gids += [gid] * G
    perm = rng.permutation(len(rewards))
    rewards = np.array(rewards, dtype=np.float64)[perm]
    gids = np.array(gids, dtype=np.int64)[perm]
    return rewards, gids


def as_tensors(rewards, gids, dtype=torch.float32):
    return torch.tensor(rewards, dtype=dtype), torch.tensor(gids, dtype=torch.int64)


def check_adv(adv, expected, n):
    assert isinstance(adv, torch.Tensor)
    assert adv.dtype == torch.float32, adv.dtype
    assert adv.shape == (n,)
    np.testing.assert_allclose(adv.double().numpy(), expected, rtol=1e-7, atol=ATOL)


def check_common_metrics(metrics, adv, rewards, gids):
    for key in ("adv/zero_signal_frac", "adv/mean", "adv/std", "reward/mean"):
        assert key in metrics, key
        assert isinstance(metrics[key], float), (key, type(metrics[key]))
    assert metrics["adv/zero_signal_frac"] == pytest.approx(zero_signal_frac(rewards, gids), abs=1e-12)
    assert metrics["reward/mean"] == pytest.approx(float(np.mean(rewards)), rel=1e-9, abs=1e-12)
    a = adv.double().numpy()
    assert metrics["adv/mean"] == pytest.approx(float(a.mean()), abs=1e-6)
    # adv/std: the contract does not fix ddof; accept the biased or the unbiased one.
    sd1, sd0 = float(a.std(ddof=1)), float(a.std(ddof=0))
    assert min(abs(metrics["adv/std"] - sd1), abs(metrics["adv/std"] - sd0)) < 1e-5


SIZE_SETS = [
    [4, 4, 4, 4, 4, 4],
    [2, 3, 5, 8, 16, 4, 7],
    [16, 2, 2, 9, 4, 3, 3, 11, 6],
]


# --------------------------------------------------------------------------- grpo / dr_grpo / rloo


@pytest.mark.parametrize("sizes", SIZE_SETS)
@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed", [0, 1])
def test_baseline_estimators_match_reference(sizes, binary, dtype, seed):
    rng = np.random.default_rng(1000 * seed + len(sizes) + 7 * binary)
    rewards, gids = make_batch(rng, sizes, binary=binary, all_equal=(1, 2) if binary else ())
    r, g = as_tensors(rewards, gids, dtype)
    refs = {
        "grpo": ref_grpo(rewards, gids),
        "dr_grpo": ref_dr_grpo(rewards, gids),
        "rloo": ref_rloo(rewards, gids),
    }
    for name, expected in refs.items():
        adv, metrics = compute_advantages(name, r, g)
        check_adv(adv, expected, len(rewards))
        check_common_metrics(metrics, adv, rewards, gids)


def test_grpo_eps_option():
    rng = np.random.default_rng(3)
    rewards, gids = make_batch(rng, [3, 5, 4], binary=False)
    r, g = as_tensors(rewards, gids)
    adv, _ = compute_advantages("grpo", r, g, eps=0.5)
    check_adv(adv, ref_grpo(rewards, gids, eps=0.5), len(rewards))


def test_grpo_all_equal_group_is_exactly_zero():
    rewards = np.array([1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    gids = np.array([42, 7, 1003, 42, 7, 42, 42, 1003, 7])  # 7: all 0, 42: all 1, 1003: all 0
    r, g = as_tensors(rewards, gids)
    for name in ("grpo", "dr_grpo", "rloo"):
        adv, metrics = compute_advantages(name, r, g)
        assert torch.count_nonzero(adv) == 0, name
        assert metrics["adv/zero_signal_frac"] == 1.0


def test_dr_grpo_allows_singleton_groups():
    rewards = np.array([0.7, 1.0, 0.0, 0.25, 1.0])
    gids = np.array([1003, 5, 5, 42, 5])
    r, g = as_tensors(rewards, gids)
    adv, metrics = compute_advantages("dr_grpo", r, g)
    check_adv(adv, ref_dr_grpo(rewards, gids), 5)
    assert adv[0].item() == 0.0 and adv[3].item() == 0.0
    # singleton groups have max == min
    assert metrics["adv/zero_signal_frac"] == pytest.approx(2 / 5)


def test_huge_and_unsorted_group_ids():
    """'any non-negative ids': ids far beyond the batch size must work (no dense id tables)."""
    rng = np.random.default_rng(11)
    rewards, gids = make_batch(rng, [3, 4, 2, 5], binary=False, fixed_ids=())
    remap = {int(x): (1 << 40) + 977 * k for k, x in enumerate(sorted(set(gids.tolist()), reverse=True))}
    gids = np.array([remap[int(x)] for x in gids], dtype=np.int64)
    r, g = as_tensors(rewards, gids)
    for name, ref in (("grpo", ref_grpo), ("rloo", ref_rloo), ("dr_grpo", ref_dr_grpo)):
        adv, _ = compute_advantages(name, r, g)
        check_adv(adv, ref(rewards, gids), len(rewards))
    prior, rp = EBPOPrior(), RefPrior()
    adv, _ = compute_advantages("ebpo", r, g, prior=prior)
    expected, _, _ = ref_ebpo_step(rewards, gids, rp)
    check_adv(adv, expected, len(rewards))


def test_rloo_is_leave_one_out_scaled_dr_grpo():
    rng = np.random.default_rng(5)
    rewards, gids = make_batch(rng, [2, 3, 6, 9], binary=False)
    r, g = as_tensors(rewards, gids, torch.float64)
    rloo, _ = compute_advantages("rloo", r, g)
    dr, _ = compute_advantages("dr_grpo", r, g)
    groups = groups_of(gids)
    for idx in groups.values():
        G = len(idx)
        np.testing.assert_allclose(rloo.double().numpy()[idx], G / (G - 1) * dr.double().numpy()[idx], atol=1e-6)


# --------------------------------------------------------------------------- ebpo over many steps


def _metric_close(got, want, key):
    assert key in got, key
    assert got[key] == pytest.approx(want, rel=1e-9, abs=1e-12), (key, got[key], want)


@pytest.mark.parametrize("tau2", ["raw", "bias_corrected"])
@pytest.mark.parametrize("batch_normalize", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ebpo_multi_step_matches_reference(tau2, batch_normalize, dtype):
    rng = np.random.default_rng(17 + 2 * (tau2 == "raw") + int(batch_normalize))
    prior, ref_prior = EBPOPrior(), RefPrior()
    step_sizes = [
        [4, 4, 4, 4],
        [2, 3, 5, 8, 16, 4, 7],
        [4, 4, 4, 4, 4, 4, 4, 4],
        [16, 2, 2, 9, 4, 3],
        [8, 8, 3],
        [5, 4, 6, 2, 2, 2, 3, 12],
        [4, 4, 4, 4, 4],
    ]
    n_seen, m_seen = 0, 0
    for step, sizes in enumerate(step_sizes):
        binary = step != 3  # one step of shaped (continuous) rewards
        rewards, gids = make_batch(rng, sizes, binary=binary, p=[0.2, 0.35, 0.5, None, 0.6, 0.7, 0.8][step],
                                   all_equal=(0,) if step % 2 == 0 else ())
        r, g = as_tensors(rewards, gids, dtype)
        adv, metrics = compute_advantages("ebpo", r, g, prior=prior, tau2=tau2, batch_normalize=batch_normalize)
        expected, ref_metrics, _ = ref_ebpo_step(rewards, gids, ref_prior, tau2=tau2,
                                                 batch_normalize=batch_normalize)
        n_seen += len(rewards)
        m_seen += len(sizes)
        check_adv(adv, expected, len(rewards))
        for key in ("ebpo/mu_glob", "ebpo/sigma2", "ebpo/tau2", "ebpo/shrinkage", "adv/zero_signal_frac"):
            _metric_close(metrics, ref_metrics[key], key)
        check_common_metrics(metrics, adv, rewards, gids)
        # the prior holds every reward / every group mean seen so far (updated FIRST)
        assert prior.rewards.count == n_seen
        assert prior.group_means.count == m_seen
        assert prior.mu_glob == pytest.approx(ref_prior.mu_glob, rel=1e-12)
        assert prior.sigma2 == pytest.approx(ref_prior.sigma2, rel=1e-12)
        assert prior.tau2_raw == pytest.approx(ref_prior.tau2_raw, rel=1e-12)


def test_ebpo_first_step_uses_updated_prior():
    """Prior updated FIRST: on an empty prior, step 1 already shrinks toward the step's own mean."""
    rewards = np.array([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0])
    gids = np.array([7, 7, 7, 7, 1003, 1003, 1003, 1003])
    prior = EBPOPrior()
    adv, metrics = compute_advantages("ebpo", *as_tensors(rewards, gids), prior=prior, batch_normalize=False)
    expected, ref_metrics, _ = ref_ebpo_step(rewards, gids, RefPrior(), batch_normalize=False)
    check_adv(adv, expected, 8)
    assert metrics["ebpo/mu_glob"] == pytest.approx(0.5)
    assert 0.0 < metrics["ebpo/shrinkage"] < 1.0
    assert metrics["ebpo/shrinkage"] == pytest.approx(ref_metrics["ebpo/shrinkage"], rel=1e-9)


def test_ebpo_single_group_on_empty_prior():
    """One group, empty prior: tau2 = var of one group mean = 0 -> S = 1, V = mu_glob."""
    rewards = np.array([1.0, 0.0, 1.0, 1.0])
    gids = np.array([42] * 4)
    prior = EBPOPrior()
    adv, metrics = compute_advantages("ebpo", *as_tensors(rewards, gids), prior=prior, batch_normalize=False)
    assert metrics["ebpo/tau2"] == 0.0
    assert metrics["ebpo/shrinkage"] == pytest.approx(1.0)
    check_adv(adv, rewards - 0.75, 4)


def test_ebpo_zero_denominator_gives_zero_shrinkage():
    """All rewards ever equal: sigma2 = 0 and tau2 = 0 -> S = 0 (no NaN)."""
    rewards = np.zeros(9)
    gids = np.array([7, 7, 7, 1003, 1003, 42, 42, 42, 42])
    prior = EBPOPrior()
    for bn in (False, True):
        adv, metrics = compute_advantages("ebpo", *as_tensors(rewards, gids), prior=prior, batch_normalize=bn)
        assert metrics["ebpo/shrinkage"] == 0.0
        assert torch.isfinite(adv).all()
        assert torch.count_nonzero(adv) == 0
        assert metrics["adv/zero_signal_frac"] == 1.0


# --------------------------------------------------------------------------- ebpo properties


def test_all_fail_group_gets_minus_S_mu_glob_where_grpo_gives_zero():
    rng = np.random.default_rng(21)
    prior, ref_prior = EBPOPrior(), RefPrior()
    for _ in range(3):  # history with a success rate around 0.6
        rewards, gids = make_batch(rng, [4] * 12, p=0.6)
        compute_advantages("ebpo", *as_tensors(rewards, gids), prior=prior)
        ref_ebpo_step(rewards, gids, ref_prior)
    rewards = np.array([0, 0, 0, 0, 1, 0, 1, 1, 1, 0, 0, 1], dtype=np.float64)
    gids = np.array([1003, 1003, 7, 1003, 7, 42, 42, 7, 5, 1003, 7, 5], dtype=np.int64)
    #  group 1003: all fail; 7: (0,1,1,0); 42: (0,1); 5: (1,1)
    r, g = as_tensors(rewards, gids)
    adv, metrics = compute_advantages("ebpo", r, g, prior=prior, batch_normalize=False)
    expected, ref_metrics, s_by_group = ref_ebpo_step(rewards, gids, ref_prior, batch_normalize=False)
    check_adv(adv, expected, len(rewards))
    fail = gids == 1003
    S, mu_glob = s_by_group[1003], ref_prior.mu_glob
    assert 0 < S < 1 and mu_glob > 0
    np.testing.assert_allclose(adv.double().numpy()[fail], -S * mu_glob, atol=ATOL)
    assert (adv[torch.from_numpy(fail)] < -1e-3).all()
    grpo_adv, _ = compute_advantages("grpo", r, g)
    assert (grpo_adv[torch.from_numpy(fail)] == 0.0).all()


def _prior_with_history(mu_glob, sigma2, tau2, n=1e6, m=2.5e5):
    prior = EBPOPrior()
    prior.load_state_dict({
        "rewards": {"count": float(n), "mean": float(mu_glob), "m2": float(sigma2 * (n - 1))},
        "group_means": {"count": float(m), "mean": float(mu_glob), "m2": float(tau2 * (m - 1))},
    })
    return prior


def test_all_fail_penalty_grows_with_mu_glob():
    rewards = np.array([0, 0, 0, 0, 1, 0, 1, 0], dtype=np.float64)
    gids = np.array([1003, 1003, 7, 1003, 7, 7, 7, 1003], dtype=np.int64)  # group 1003 fails entirely
    r, g = as_tensors(rewards, gids)
    fail = torch.from_numpy(gids == 1003)
    penalties = []
    for mu in (0.1, 0.3, 0.5, 0.7, 0.9):
        prior = _prior_with_history(mu, sigma2=0.2, tau2=0.05)
        adv, metrics = compute_advantages("ebpo", r, g, prior=prior, batch_normalize=False)
        vals = adv[fail].double()
        assert torch.allclose(vals, vals[0].expand_as(vals))
        # all groups have G = 4 and tau2 is raw, so S_m = ebpo/shrinkage for every group
        assert vals[0].item() == pytest.approx(-metrics["ebpo/shrinkage"] * metrics["ebpo/mu_glob"], abs=ATOL)
        assert vals[0].item() < 0
        penalties.append(-vals[0].item())
    assert all(b > a + 1e-3 for a, b in zip(penalties, penalties[1:])), penalties


def test_all_fail_penalty_grows_with_mu_glob_from_real_history():
    """Same property with histories produced by compute_advantages itself (binary rewards)."""
    rng = np.random.default_rng(8)
    probe_r = np.array([0, 0, 0, 0, 1, 0, 1, 0], dtype=np.float64)
    probe_g = np.array([1003, 1003, 1003, 1003, 7, 7, 7, 7], dtype=np.int64)
    out = []
    for p_hist in (0.2, 0.4):  # sigma2 = p(1-p) grows with p below 0.5 as well
        prior = EBPOPrior()
        for _ in range(4):
            rewards, gids = make_batch(rng, [4] * 40, p=p_hist)
            compute_advantages("ebpo", *as_tensors(rewards, gids), prior=prior)
        adv, metrics = compute_advantages("ebpo", *as_tensors(probe_r, probe_g), prior=prior, batch_normalize=False)
        out.append((metrics["ebpo/mu_glob"], -adv[:4].double().mean().item()))
    (mu_a, pen_a), (mu_b, pen_b) = out
    assert mu_b > mu_a
    assert pen_b > pen_a > 0


@pytest.mark.parametrize("tau2", ["raw", "bias_corrected"])
def test_shrinkage_always_in_unit_interval(tau2):
    rng = np.random.default_rng(99 if tau2 == "raw" else 100)
    for _ in range(150):
        n_hist = float(rng.integers(0, 5000))
        m_hist = float(rng.integers(0, 1000))
        prior = EBPOPrior()
        prior.load_state_dict({
            "rewards": {"count": n_hist, "mean": float(rng.uniform(0, 1)),
                        "m2": float(rng.uniform(0, 0.3) * max(n_hist - 1, 0))},
            "group_means": {"count": m_hist, "mean": float(rng.uniform(0, 1)),
                            "m2": float(rng.choice([0.0, rng.uniform(0, 0.3)]) * max(m_hist - 1, 0))},
        })
        sizes = [int(x) for x in rng.integers(2, 17, size=int(rng.integers(1, 8)))]
        rewards, gids = make_batch(rng, sizes, binary=bool(rng.random() < 0.7))
        adv, metrics = compute_advantages("ebpo", *as_tensors(rewards, gids, torch.float64), prior=prior,
                                          tau2=tau2, batch_normalize=False)
        assert 0.0 <= metrics["ebpo/shrinkage"] <= 1.0
        assert torch.isfinite(adv).all()
        # per-group S_m recovered from the raw advantage: V_m = r - a = mu_m + S_m (mu_glob - mu_m)
        mu_glob = prior.mu_glob
        a = adv.double().numpy()
        for idx in groups_of(gids).values():
            mu_m = float(np.mean(rewards[idx]))
            V = float(np.mean(rewards[idx] - a[idx]))
            if abs(mu_glob - mu_m) > 0.05:
                S_m = (V - mu_m) / (mu_glob - mu_m)
                assert -1e-4 <= S_m <= 1 + 1e-4, S_m


# --------------------------------------------------------------------------- registry


def test_list_estimators_contains_builtins_sorted():
    names = list_estimators()
    assert {"grpo", "dr_grpo", "rloo", "ebpo"} <= set(names)
    assert names == sorted(names)


def test_register_estimator_custom_usable_through_compute_advantages():
    # The contract names only the decorator; the estimator protocol (table, *, prior, **options)
    # -> (GroupAffine(scale, shift), metrics) is the package's documented per-group affine map.
    name = f"test_scaled_dr_grpo_{uuid.uuid4().hex[:8]}"

    @register_estimator(name)
    def scaled(table, *, prior=None, factor=1.0, **options):
        scale = torch.full_like(table.mean, float(factor))
        return GroupAffine(scale=scale, shift=-float(factor) * table.mean), {"custom/factor": float(factor)}

    assert name in list_estimators()
    rng = np.random.default_rng(4)
    rewards, gids = make_batch(rng, [3, 5, 2, 4], binary=False)
    adv, metrics = compute_advantages(name, *as_tensors(rewards, gids), factor=2.5)
    check_adv(adv, 2.5 * ref_dr_grpo(rewards, gids), len(rewards))
    assert metrics["custom/factor"] == 2.5
    check_common_metrics(metrics, adv, rewards, gids)
