"""policy_loss (PPO-clip, aggregations, dual clip, TIS, EntropyMech), kl_penalty, entropy_from_logits
against the float64 per-token loop references of tests/reference_impl.py."""

import numpy as np
import pytest
import torch

from ebpo_megatron.algorithms import EntropyMech, entropy_from_logits, kl_penalty, policy_loss
from reference_impl import (
    ref_clip_cov_candidates,
    ref_clip_cov_loss,
    ref_covariance,
    ref_entropy,
    ref_kl,
    ref_kl_cov_loss,
    ref_policy_loss,
    ref_token_terms,
)

AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
LENGTHS = [11, 3, 7, 1, 9, 5]


def make_inputs(seed, *, B=6, T=11, per_token_adv=False, holes=False, spread=0.3, adv_sign=None):
    """float32-representable float64 numpy arrays: logp, old_logp, adv, mask, rollout_logp."""
    rng = np.random.default_rng(seed)
    f32 = lambda x: np.asarray(x, dtype=np.float32).astype(np.float64)  # noqa: E731
    old = f32(-rng.exponential(1.0, (B, T)) - 0.05)
    logp = f32(old + rng.normal(0.0, spread, (B, T)))
    rollout = f32(old + rng.normal(0.0, 0.4, (B, T)))
    if per_token_adv:
        adv = f32(rng.normal(0.0, 1.5, (B, T)))
    else:
        adv = f32(rng.normal(0.0, 1.5, B))
    if adv_sign is not None:
        adv = adv_sign * np.abs(adv)
    mask = np.zeros((B, T))
    for b in range(B):
        mask[b, : LENGTHS[b % len(LENGTHS)] if T == 11 else rng.integers(1, T + 1)] = 1.0
    if holes:
        mask[0, [2, 5]] = 0.0
        mask[4, 0] = 0.0
    # garbage (but finite) values under the mask must not leak into the loss
    logp = np.where(mask > 0, logp, f32(old + 2.5))
    return logp, old, adv, mask, rollout


def t(x, dtype=torch.float32, grad=False):
    out = torch.tensor(np.asarray(x), dtype=dtype)
    if grad:
        out.requires_grad_(True)
    return out


def call(logp, old, adv, mask, dtype=torch.float32, grad=False, **kw):
    lp = t(logp, dtype, grad)
    for key in ("rollout_logp",):
        if key in kw and kw[key] is not None:
            kw[key] = t(kw[key], dtype)
    loss, metrics = policy_loss(lp, t(old, dtype), t(adv, dtype), t(mask, dtype), **kw)
    return lp, loss, metrics


# --------------------------------------------------------------------------- forward values


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("per_token_adv", [False, True])
@pytest.mark.parametrize("holes", [False, True])
def test_policy_loss_matches_reference(agg, per_token_adv, holes):
    logp, old, adv, mask, _ = make_inputs(3 + per_token_adv + 2 * holes, per_token_adv=per_token_adv, holes=holes)
    _, loss, metrics = call(logp, old, adv, mask, agg=agg, clip_low=0.2, clip_high=0.28)
    want, _, ref_m = ref_policy_loss(logp, old, adv, mask, agg=agg, clip_low=0.2, clip_high=0.28)
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert ref_m["actor/clip_frac"] > 0  # the data exercises clipping
    # float32 inputs: the fraction itself may be a float32 number; 1e-6 << 1/n_valid still catches
    # any single token classified differently
    assert metrics["actor/clip_frac"] == pytest.approx(ref_m["actor/clip_frac"], abs=1e-6)
    assert metrics["actor/approx_kl"] == pytest.approx(ref_m["actor/approx_kl"], rel=1e-5, abs=1e-6)
    assert metrics["actor/ratio_mean"] == pytest.approx(ref_m["actor/ratio_mean"], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("agg", AGGS)
def test_policy_loss_float64_tight(agg):
    logp, old, adv, mask, _ = make_inputs(8)
    _, loss, _ = call(logp, old, adv, mask, dtype=torch.float64, agg=agg)
    want, _, _ = ref_policy_loss(logp, old, adv, mask, agg=agg)
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(want, rel=1e-12, abs=1e-14)


def test_norm_const_option():
    logp, old, adv, mask, _ = make_inputs(9)
    _, loss, _ = call(logp, old, adv, mask, dtype=torch.float64, agg="seq-mean-token-sum-norm", norm_const=4096.0)
    want, _, _ = ref_policy_loss(logp, old, adv, mask, agg="seq-mean-token-sum-norm", norm_const=4096.0)
    assert loss.item() == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("agg", AGGS)
def test_micro_batches_sum_to_full_batch(agg):
    logp, old, adv, mask, _ = make_inputs(12)
    B = logp.shape[0]
    total_tokens, total_seqs = float(mask.sum()), B
    _, full, _ = call(logp, old, adv, mask, dtype=torch.float64, agg=agg)
    slices = [slice(0, 1), slice(1, 3), slice(3, 4), slice(4, 6)]  # 4 uneven micro-batches
    parts = []
    for s in slices:
        _, part, _ = call(logp[s], old[s], adv[s], mask[s], dtype=torch.float64, agg=agg,
                          total_tokens=total_tokens, total_seqs=total_seqs)
        want, _, _ = ref_policy_loss(logp[s], old[s], adv[s], mask[s], agg=agg,
                                     total_tokens=total_tokens, total_seqs=total_seqs)
        assert part.item() == pytest.approx(want, rel=1e-12, abs=1e-14)
        parts.append(part.item())
    assert sum(parts) == pytest.approx(full.item(), rel=1e-12, abs=1e-14)
    # and without total_* the micro-batch losses do NOT sum to it in general (local normalization)
    local = sum(call(logp[s], old[s], adv[s], mask[s], dtype=torch.float64, agg=agg)[1].item() for s in slices)
    assert abs(local - full.item()) > 1e-6


@pytest.mark.parametrize("agg", AGGS)
def test_dual_clip(agg):
    logp, old, adv, mask, _ = make_inputs(21, spread=0.9)
    c = 3.0
    _, loss, _ = call(logp, old, adv, mask, dtype=torch.float64, agg=agg, dual_clip=c)
    want, _, _ = ref_policy_loss(logp, old, adv, mask, agg=agg, dual_clip=c)
    plain, _, _ = ref_policy_loss(logp, old, adv, mask, agg=agg)
    assert want != pytest.approx(plain, rel=1e-6)  # dual clip is active for some tokens
    assert loss.item() == pytest.approx(want, rel=1e-12, abs=1e-14)


@pytest.mark.parametrize("agg", AGGS)
def test_tis_weights(agg):
    logp, old, adv, mask, rollout = make_inputs(31)
    cap = 1.3
    w = np.exp(old - rollout)
    assert (w[mask > 0] > cap).any() and (w[mask > 0] < cap).any()
    _, loss, metrics = call(logp, old, adv, mask, dtype=torch.float64, agg=agg, rollout_logp=rollout, tis_cap=cap)
    want, _, _ = ref_policy_loss(logp, old, adv, mask, agg=agg, rollout_logp=rollout, tis_cap=cap)
    assert loss.item() == pytest.approx(want, rel=1e-12, abs=1e-14)
    # TIS needs both rollout_logp and tis_cap
    _, no_cap, _ = call(logp, old, adv, mask, dtype=torch.float64, agg=agg, rollout_logp=rollout)
    plain, _, _ = ref_policy_loss(logp, old, adv, mask, agg=agg)
    assert no_cap.item() == pytest.approx(plain, rel=1e-12, abs=1e-14)


def test_tis_weight_carries_no_gradient():
    logp, old, adv, mask, rollout = make_inputs(32)
    roll = t(rollout, torch.float64, grad=True)
    lp = t(logp, torch.float64, grad=True)
    loss, _ = policy_loss(lp, t(old, torch.float64), t(adv, torch.float64), t(mask, torch.float64),
                          rollout_logp=roll, tis_cap=1.3)
    loss.backward()
    assert roll.grad is None or torch.count_nonzero(roll.grad) == 0


def test_masked_tokens_do_not_matter():
    logp, old, adv, mask, _ = make_inputs(40, holes=True)
    logp2 = np.where(mask > 0, logp, old + 0.01)
    for agg in AGGS:
        a = call(logp, old, adv, mask, dtype=torch.float64, agg=agg)[1].item()
        b = call(logp2, old, adv, mask, dtype=torch.float64, agg=agg)[1].item()
        assert a == pytest.approx(b, rel=1e-12, abs=1e-15)


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("variant", ["plain", "dual_clip", "tis", "per_token_adv"])
def test_gradient_wrt_logp(agg, variant):
    logp, old, adv, mask, rollout = make_inputs(50, per_token_adv=variant == "per_token_adv", holes=True,
                                                spread=0.9 if variant == "dual_clip" else 0.3)
    kw = {}
    if variant == "dual_clip":
        kw = dict(dual_clip=3.0)
    elif variant == "tis":
        kw = dict(rollout_logp=rollout, tis_cap=1.3)
    lp, loss, _ = call(logp, old, adv, mask, dtype=torch.float64, grad=True, agg=agg, **kw)
    loss.backward()
    want_loss, want_grad, _ = ref_policy_loss(logp, old, adv, mask, agg=agg, **kw)
    assert loss.item() == pytest.approx(want_loss, rel=1e-12, abs=1e-14)
    np.testing.assert_allclose(lp.grad.numpy(), want_grad, rtol=1e-10, atol=1e-13)
    # clipped tokens and masked tokens get no gradient
    _, _, clipped = ref_token_terms(logp, old, adv, **{k: v for k, v in kw.items()})
    assert np.all(lp.grad.numpy()[mask == 0] == 0.0)
    assert np.all(lp.grad.numpy()[clipped & (mask > 0)] == 0.0)


def test_gradient_float32_close_to_reference():
    logp, old, adv, mask, _ = make_inputs(51)
    lp, loss, _ = call(logp, old, adv, mask, grad=True, agg="seq-mean-token-mean")
    loss.backward()
    _, want_grad, _ = ref_policy_loss(logp, old, adv, mask, agg="seq-mean-token-mean")
    np.testing.assert_allclose(lp.grad.double().numpy(), want_grad, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- EntropyMech


def _cov_inputs(seed):
    logp, old, adv, mask, _ = make_inputs(seed, B=8, T=16, spread=0.3)
    return logp, old, adv, mask


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_clip_cov_deterministic_all_candidates(agg):
    lb, ub = 0.3, 5.0
    for seed in range(60, 200):  # pick data with >= 2 candidates and no cov near lb/ub
        logp, old, adv, mask = _cov_inputs(seed)
        cand, cov = ref_clip_cov_candidates(logp, old, adv, mask, lb=lb, ub=ub)
        valid_cov = cov[mask > 0]
        if len(cand) >= 2 and np.min(np.abs(valid_cov - lb)) > 1e-6 and np.min(np.abs(valid_cov - ub)) > 1e-6:
            break
    else:
        pytest.fail("no suitable clip_cov data")
    n_valid = int(mask.sum())
    c = len(cand)
    ratio = (c + 0.5) / n_valid  # max(int(ratio * n_valid), 1) == c: every candidate is selected
    assert max(int(ratio * n_valid), 1) == c
    mech = EntropyMech(kind="clip_cov", clip_ratio=ratio, clip_cov_lb=lb, clip_cov_ub=ub)
    lp, loss, metrics = call(logp, old, adv, mask, dtype=torch.float64, grad=True, agg=agg, entropy_mech=mech,
                             generator=torch.Generator().manual_seed(0))
    loss.backward()
    want, want_grad = ref_clip_cov_loss(logp, old, adv, mask, cand, agg=agg)
    plain, _, _ = ref_policy_loss(logp, old, adv, mask, agg=agg)
    assert want != pytest.approx(plain, rel=1e-9)
    assert loss.item() == pytest.approx(want, rel=1e-12, abs=1e-14)
    np.testing.assert_allclose(lp.grad.numpy(), want_grad, rtol=1e-10, atol=1e-13)
    assert metrics["actor/entropy_mech_frac"] == pytest.approx(c / n_valid, abs=1e-9)


def test_clip_cov_random_subset_is_among_candidates():
    lb, ub = 0.3, 5.0
    for seed in range(60, 200):
        logp, old, adv, mask = _cov_inputs(seed)
        cand, _ = ref_clip_cov_candidates(logp, old, adv, mask, lb=lb, ub=ub)
        if len(cand) >= 4:
            break
    else:
        pytest.fail("no suitable clip_cov data")
    n_valid = int(mask.sum())
    k = 2
    ratio = (k + 0.5) / n_valid
    mech = EntropyMech(kind="clip_cov", clip_ratio=ratio, clip_cov_lb=lb, clip_cov_ub=ub)
    _, plain_grad, _ = ref_policy_loss(logp, old, adv, mask)
    for s in range(3):
        lp, loss, metrics = call(logp, old, adv, mask, dtype=torch.float64, grad=True, entropy_mech=mech,
                                 generator=torch.Generator().manual_seed(s))
        loss.backward()
        g = lp.grad.numpy()
        zeroed = {(b, tt) for b, tt in zip(*np.nonzero((g == 0.0) & (plain_grad != 0.0)))}
        assert len(zeroed) == k
        assert zeroed <= set(cand)
        np.testing.assert_allclose(g[g != 0.0], plain_grad[g != 0.0], rtol=1e-10, atol=1e-13)
        assert metrics["actor/entropy_mech_frac"] == pytest.approx(k / n_valid, abs=1e-9)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("k", [1, 5])
def test_kl_cov_top_k(agg, k):
    logp, old, adv, mask = _cov_inputs(77)
    n_valid = int(mask.sum())
    ratio = (k + 0.5) / n_valid
    kl_coef = 0.7
    want, want_grad, ranked, cov = ref_kl_cov_loss(logp, old, adv, mask, k, kl_coef=kl_coef, agg=agg)
    gap = cov[ranked[k - 1]] - cov[ranked[k]]
    assert gap > 1e-6  # the top-k set is unambiguous
    mech = EntropyMech(kind="kl_cov", kl_cov_ratio=ratio, kl_coef=kl_coef)
    lp, loss, metrics = call(logp, old, adv, mask, dtype=torch.float64, grad=True, agg=agg, entropy_mech=mech)
    loss.backward()
    assert loss.item() == pytest.approx(want, rel=1e-12, abs=1e-14)
    np.testing.assert_allclose(lp.grad.numpy(), want_grad, rtol=1e-10, atol=1e-13)
    assert metrics["actor/entropy_mech_frac"] == pytest.approx(k / n_valid, abs=1e-9)
    # the kl_cov loss is the *unclipped* surrogate: it differs from PPO-clip on this data
    plain, _, _ = ref_policy_loss(logp, old, adv, mask, agg=agg)
    assert want != pytest.approx(plain, rel=1e-6)


def test_covariance_reference_definition():
    """Sanity check of the reference itself: cov is computed with token-weighted masked means."""
    logp, old, adv, mask = _cov_inputs(5)
    cov, cells = ref_covariance(logp, adv, mask)
    A = np.repeat(adv[:, None], logp.shape[1], axis=1)
    m = mask > 0
    want = (A - A[m].mean()) * (logp - logp[m].mean())
    np.testing.assert_allclose(cov[m], want[m], rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------- KL penalty, entropy


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kl_penalty(kind, dtype):
    rng = np.random.default_rng(7)
    logp = np.asarray(-rng.exponential(1.0, (4, 9)), dtype=np.float32).astype(np.float64)
    ref = np.asarray(logp + rng.normal(0, 0.8, (4, 9)), dtype=np.float32).astype(np.float64)
    got = kl_penalty(t(logp, dtype), t(ref, dtype), kind=kind)
    assert got.shape == (4, 9)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    np.testing.assert_allclose(got.double().numpy(), ref_kl(logp, ref, kind), rtol=tol, atol=tol)


def test_kl_penalty_default_is_k3_and_properties():
    rng = np.random.default_rng(8)
    logp = -rng.exponential(1.0, 50)
    ref = logp + rng.normal(0, 1.0, 50)
    k3 = kl_penalty(t(logp, torch.float64), t(ref, torch.float64))
    np.testing.assert_allclose(k3.numpy(), ref_kl(logp, ref, "k3"), rtol=1e-12, atol=1e-14)
    assert (k3 >= 0).all()
    assert (kl_penalty(t(logp, torch.float64), t(logp, torch.float64)) == 0).all()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_entropy_from_logits_matches_reference(dtype, tol):
    rng = np.random.default_rng(9)
    z = np.asarray(rng.normal(0, 3.0, (3, 5, 50)), dtype=np.float32).astype(np.float64)
    got = entropy_from_logits(t(z, dtype))
    assert got.shape == (3, 5)
    np.testing.assert_allclose(got.double().numpy(), ref_entropy(z), rtol=tol, atol=tol)
    # uniform logits: H = log V
    u = entropy_from_logits(torch.zeros(2, 64, dtype=dtype))
    np.testing.assert_allclose(u.double().numpy(), np.log(64.0), rtol=tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-2), (torch.float64, 1e-8)])
def test_entropy_from_logits_huge_magnitudes(dtype, tol):
    rng = np.random.default_rng(10)
    cases = [
        1e4 * rng.standard_normal((4, 32)),  # nearly one-hot rows, |z| ~ 1e4
        1e4 + rng.normal(0, 1.0, (4, 32)),  # all logits ~ +1e4: a spread distribution
        -1e4 + rng.normal(0, 1.0, (4, 32)),  # all logits ~ -1e4
        np.tile(np.array([1e4, 1e4, -1e4, 0.0]), (2, 1)),  # two tied maxima: H = log 2
    ]
    for z in cases:
        z = np.asarray(z, dtype=np.float32 if dtype == torch.float32 else np.float64).astype(np.float64)
        got = entropy_from_logits(t(z, dtype))
        assert torch.isfinite(got).all(), got
        np.testing.assert_allclose(got.double().numpy(), ref_entropy(z), rtol=0, atol=tol)
    got = entropy_from_logits(t(np.tile(np.array([1e4, 1e4, -1e4, 0.0]), (2, 1)), dtype))
    np.testing.assert_allclose(got.double().numpy(), np.log(2.0), atol=tol)
