"""Independent float64 references for ``ebpo_megatron.algorithms`` (plain Python loops + numpy).

Nothing here imports the package: every expected value in the tests is computed from these
functions, written directly from the formulas of docs/algorithms.md.
Symbols as in docs/algorithms.md: r_{m,i}, mu_m, s_m, G_m, W_r, W_mu, mu_glob, sigma2, tau2, S, V_m.
"""

from __future__ import annotations

import math

import numpy as np

EPS = 1e-6


# --------------------------------------------------------------------------- groups


def groups_of(group_ids):
    """Ordered dict id -> list of row indices (first-appearance order; order is irrelevant)."""
    groups: dict[int, list[int]] = {}
    for i, g in enumerate(group_ids):
        groups.setdefault(int(g), []).append(i)
    return groups


def _mean(values):
    return math.fsum(values) / len(values)


def _var_unbiased(values):
    n = len(values)
    if n < 2:
        return 0.0
    mu = _mean(values)
    return math.fsum((v - mu) ** 2 for v in values) / (n - 1)


def zero_signal_frac(rewards, group_ids):
    """Fraction of responses in groups whose rewards are all equal (max == min)."""
    rewards = [float(r) for r in rewards]
    n_zero = 0
    for idx in groups_of(group_ids).values():
        vals = [rewards[i] for i in idx]
        if max(vals) == min(vals):
            n_zero += len(idx)
    return n_zero / len(rewards)


# --------------------------------------------------------------------------- estimators


def ref_grpo(rewards, group_ids, eps=EPS):
    rewards = [float(r) for r in rewards]
    out = [0.0] * len(rewards)
    for idx in groups_of(group_ids).values():
        vals = [rewards[i] for i in idx]
        mu = _mean(vals)
        s = math.sqrt(_var_unbiased(vals))
        for i in idx:
            out[i] = (rewards[i] - mu) / (s + eps)
    return np.array(out, dtype=np.float64)


def ref_dr_grpo(rewards, group_ids):
    rewards = [float(r) for r in rewards]
    out = [0.0] * len(rewards)
    for idx in groups_of(group_ids).values():
        mu = _mean([rewards[i] for i in idx])
        for i in idx:
            out[i] = rewards[i] - mu
    return np.array(out, dtype=np.float64)


def ref_rloo(rewards, group_ids):
    """Leave-one-out baseline, written literally as the mean of the *other* responses."""
    rewards = [float(r) for r in rewards]
    out = [0.0] * len(rewards)
    for idx in groups_of(group_ids).values():
        for i in idx:
            others = [rewards[j] for j in idx if j != i]
            out[i] = rewards[i] - _mean(others)
    return np.array(out, dtype=np.float64)


class RefPrior:
    """The EBPO prior kept as plain lists of *every* reward and group mean seen so far."""

    def __init__(self):
        self.all_rewards: list[float] = []
        self.all_group_means: list[float] = []

    @property
    def mu_glob(self) -> float:
        return float(np.mean(np.array(self.all_rewards, dtype=np.float64))) if self.all_rewards else 0.0

    @property
    def sigma2(self) -> float:
        if len(self.all_rewards) < 2:
            return 0.0
        return float(np.var(np.array(self.all_rewards, dtype=np.float64), ddof=1))

    @property
    def tau2_raw(self) -> float:
        if len(self.all_group_means) < 2:
            return 0.0
        return float(np.var(np.array(self.all_group_means, dtype=np.float64), ddof=1))


def ref_ebpo_step(rewards, group_ids, prior: RefPrior, *, eps=EPS, batch_normalize=True, tau2="raw"):
    """One EBPO step (docs/algorithms.md, the paper's Algorithm 1); mutates ``prior``. Returns (adv float64, metrics, S per group)."""
    rewards = [float(r) for r in rewards]
    groups = groups_of(group_ids)
    # 1. group means of the whole step
    mu = {g: _mean([rewards[i] for i in idx]) for g, idx in groups.items()}
    # 2. update the prior FIRST
    prior.all_rewards.extend(rewards)
    prior.all_group_means.extend(mu.values())
    # 3. prior statistics
    mu_glob, sigma2, tau2_raw = prior.mu_glob, prior.sigma2, prior.tau2_raw
    a = [0.0] * len(rewards)
    s_list, tau2_list, s_by_group = [], [], {}
    for g, idx in groups.items():
        G = len(idx)
        if tau2 == "raw":
            t2 = tau2_raw
        elif tau2 == "bias_corrected":
            t2 = max(tau2_raw - sigma2 / G, 0.0)
        else:
            raise ValueError(tau2)
        # 4. shrinkage
        num = sigma2 / G
        den = num + t2
        S = num / den if den != 0 else 0.0
        # 5. baseline, 6. raw advantage
        V = (1.0 - S) * mu[g] + S * mu_glob
        for i in idx:
            a[i] = rewards[i] - V
        s_list.append(S)
        tau2_list.append(t2)
        s_by_group[g] = S
    # 7. batch normalization over all responses of the step
    if batch_normalize:
        m = _mean(a)
        sd = math.sqrt(_var_unbiased(a))
        adv = [(x - m) / (sd + eps) for x in a]
    else:
        adv = a
    metrics = {
        "ebpo/mu_glob": mu_glob,
        "ebpo/sigma2": sigma2,
        "ebpo/tau2": _mean(tau2_list),
        "ebpo/shrinkage": _mean(s_list),
        "adv/zero_signal_frac": zero_signal_frac(rewards, group_ids),
        "reward/mean": _mean(rewards),
    }
    return np.array(adv, dtype=np.float64), metrics, s_by_group


# --------------------------------------------------------------------------- policy loss


def _as_2d_adv(advantages, B, T):
    adv = np.asarray(advantages, dtype=np.float64)
    if adv.ndim == 1:
        return np.repeat(adv[:, None], T, axis=1)
    return adv.copy()


def ref_token_terms(logp, old_logp, advantages, *, clip_low=0.2, clip_high=0.2, dual_clip=None,
                    rollout_logp=None, tis_cap=None):
    """Per-token loss l[b][t] and its derivative dl/dlogp[b][t], plus the per-token clip flag.

    Written per token with python floats (no vectorization) from the contract:
    rho = exp(logp - old); l = max(-A rho, -A clip(rho)); dual clip for A < 0: l = min(l, -c A);
    TIS: l *= min(exp(old - rollout), cap).
    """
    logp = np.asarray(logp, dtype=np.float64)
    old = np.asarray(old_logp, dtype=np.float64)
    B, T = logp.shape
    A = _as_2d_adv(advantages, B, T)
    loss = np.zeros((B, T))
    grad = np.zeros((B, T))
    clipped = np.zeros((B, T), dtype=bool)
    for b in range(B):
        for t in range(T):
            a = float(A[b, t])
            rho = math.exp(float(logp[b, t]) - float(old[b, t]))
            rho_c = min(max(rho, 1.0 - clip_low), 1.0 + clip_high)
            l1 = -a * rho
            l2 = -a * rho_c
            if l2 > l1:
                l, g = l2, 0.0  # the clipped (constant) term is active
                clipped[b, t] = True
            else:
                l, g = l1, -a * rho
            if dual_clip is not None and a < 0:
                cap = -dual_clip * a
                if cap < l:
                    l, g = cap, 0.0
            if rollout_logp is not None and tis_cap is not None:
                w = min(math.exp(float(old[b, t]) - float(rollout_logp[b, t])), tis_cap)
                l, g = l * w, g * w
            loss[b, t] = l
            grad[b, t] = g
    return loss, grad, clipped


def ref_aggregate(token_loss, mask, agg, *, norm_const=None, total_tokens=None, total_seqs=None):
    """Aggregate per-token values; returns (loss, weights) with loss = sum(weights * token_loss)."""
    mask = np.asarray(mask, dtype=np.float64)
    B, T = mask.shape
    weights = np.zeros((B, T))
    if agg == "token-mean":
        denom = total_tokens if total_tokens is not None else mask.sum()
        for b in range(B):
            for t in range(T):
                weights[b, t] = mask[b, t] / denom
    elif agg == "seq-mean-token-mean":
        nseq = total_seqs if total_seqs is not None else B
        for b in range(B):
            n_b = mask[b].sum()
            for t in range(T):
                weights[b, t] = mask[b, t] / n_b / nseq if n_b > 0 else 0.0
    elif agg == "seq-mean-token-sum-norm":
        nseq = total_seqs if total_seqs is not None else B
        C = norm_const if norm_const is not None else T
        for b in range(B):
            for t in range(T):
                weights[b, t] = mask[b, t] / C / nseq
    else:
        raise ValueError(agg)
    total = 0.0
    for b in range(B):
        for t in range(T):
            if weights[b, t] != 0.0:
                total += weights[b, t] * token_loss[b, t]
    return total, weights


def ref_policy_loss(logp, old_logp, advantages, mask, *, clip_low=0.2, clip_high=0.2, agg="token-mean",
                    dual_clip=None, rollout_logp=None, tis_cap=None, norm_const=None, total_tokens=None,
                    total_seqs=None):
    """Returns (loss, dloss/dlogp [B,T], metrics) in float64."""
    tok, dtok, clipped = ref_token_terms(logp, old_logp, advantages, clip_low=clip_low, clip_high=clip_high,
                                         dual_clip=dual_clip, rollout_logp=rollout_logp, tis_cap=tis_cap)
    loss, w = ref_aggregate(tok, mask, agg, norm_const=norm_const, total_tokens=total_tokens,
                            total_seqs=total_seqs)
    mask_np = np.asarray(mask, dtype=np.float64)
    valid = mask_np > 0
    n_valid = valid.sum()
    logp = np.asarray(logp, dtype=np.float64)
    old = np.asarray(old_logp, dtype=np.float64)
    metrics = {
        "actor/clip_frac": float((clipped & valid).sum() / n_valid),
        "actor/approx_kl": float(sum(old[b, t] - logp[b, t] for b, t in zip(*np.nonzero(valid))) / n_valid),
        "actor/ratio_mean": float(sum(math.exp(logp[b, t] - old[b, t]) for b, t in zip(*np.nonzero(valid)))
                                  / n_valid),
    }
    return loss, w * dtok, metrics


def ref_covariance(logp, advantages, mask):
    """cov_t = (A_t - masked_mean(A)) * (logp_t - masked_mean(logp)) over valid tokens (0 elsewhere)."""
    logp = np.asarray(logp, dtype=np.float64)
    B, T = logp.shape
    A = _as_2d_adv(advantages, B, T)
    mask = np.asarray(mask, dtype=np.float64)
    cells = [(b, t) for b in range(B) for t in range(T) if mask[b, t] > 0]
    mean_a = math.fsum(A[b, t] for b, t in cells) / len(cells)
    mean_l = math.fsum(logp[b, t] for b, t in cells) / len(cells)
    cov = np.zeros((B, T))
    for b, t in cells:
        cov[b, t] = (A[b, t] - mean_a) * (logp[b, t] - mean_l)
    return cov, cells


def ref_clip_cov_candidates(logp, old_logp, advantages, mask, *, clip_low=0.2, clip_high=0.2, lb=1.0, ub=5.0):
    """Valid tokens, not clipped by PPO, with lb < cov < ub."""
    cov, cells = ref_covariance(logp, advantages, mask)
    _, _, clipped = ref_token_terms(logp, old_logp, advantages, clip_low=clip_low, clip_high=clip_high)
    return [(b, t) for b, t in cells if not clipped[b, t] and lb < cov[b, t] < ub], cov


def ref_clip_cov_loss(logp, old_logp, advantages, mask, selected, *, clip_low=0.2, clip_high=0.2,
                      agg="token-mean"):
    """PPO loss with the loss (and gradient) of the ``selected`` tokens zeroed."""
    tok, dtok, _ = ref_token_terms(logp, old_logp, advantages, clip_low=clip_low, clip_high=clip_high)
    for b, t in selected:
        tok[b, t] = 0.0
        dtok[b, t] = 0.0
    loss, w = ref_aggregate(tok, mask, agg)
    return loss, w * dtok


def ref_kl_cov_loss(logp, old_logp, advantages, mask, k, *, kl_coef=1.0, agg="token-mean"):
    """Unclipped -A rho everywhere; the top-k valid tokens by cov get + kl_coef*|logp - old|."""
    logp = np.asarray(logp, dtype=np.float64)
    old = np.asarray(old_logp, dtype=np.float64)
    B, T = logp.shape
    A = _as_2d_adv(advantages, B, T)
    cov, cells = ref_covariance(logp, advantages, mask)
    ranked = sorted(cells, key=lambda bt: cov[bt[0], bt[1]], reverse=True)
    top = set(ranked[:k])
    tok = np.zeros((B, T))
    dtok = np.zeros((B, T))
    for b in range(B):
        for t in range(T):
            rho = math.exp(logp[b, t] - old[b, t])
            tok[b, t] = -A[b, t] * rho
            dtok[b, t] = -A[b, t] * rho
            if (b, t) in top:
                d = logp[b, t] - old[b, t]
                tok[b, t] += kl_coef * abs(d)
                dtok[b, t] += kl_coef * (1.0 if d > 0 else -1.0)
    loss, w = ref_aggregate(tok, mask, agg)
    return loss, w * dtok, ranked, cov


# --------------------------------------------------------------------------- KL, entropy


def ref_kl(logp, ref_logp, kind="k3"):
    logp = np.asarray(logp, dtype=np.float64)
    ref = np.asarray(ref_logp, dtype=np.float64)
    out = np.zeros(logp.shape)
    for idx in np.ndindex(logp.shape):
        x, r = float(logp[idx]), float(ref[idx])
        if kind == "k1":
            out[idx] = x - r
        elif kind == "k2":
            out[idx] = 0.5 * (x - r) ** 2
        elif kind == "k3":
            d = r - x
            out[idx] = math.exp(d) - d - 1.0
        else:
            raise ValueError(kind)
    return out


def ref_entropy(logits):
    """H = logsumexp(z) - sum softmax(z) z, computed row by row after subtracting the max (float64)."""
    z = np.asarray(logits, dtype=np.float64)
    lead = z.shape[:-1]
    out = np.zeros(lead)
    for idx in np.ndindex(lead):
        row = [float(v) for v in z[idx]]
        m = max(row)
        shifted = [v - m for v in row]
        e = [math.exp(v) for v in shifted]
        s = math.fsum(e)
        # H = log s - sum p * shifted  (shift invariance of the entropy)
        out[idx] = math.log(s) - math.fsum(ei / s * v for ei, v in zip(e, shifted))
    return out
