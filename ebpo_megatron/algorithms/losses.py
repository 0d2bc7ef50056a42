"""PPO-clip policy loss with GRPO / Dr. GRPO / DAPO aggregations, KL estimators, entropy.

Per token t of response (m, i), with ρ_t = exp(log π_θ − log π_old) and advantage A:
    ℓ_t = max(−A·ρ_t, −A·clip(ρ_t, 1 − ε_low, 1 + ε_high))          (PPO-clip, docs/algorithms.md)
Options: dual clip (ℓ_t ← min(ℓ_t, −c·A) for A < 0), truncated importance sampling against
the rollout engine's log-probs (ℓ_t ← w_t·ℓ_t, w_t = min(exp(log π_old − log π_rollout), cap)),
and EntropyMech's Clip-Cov / KL-Cov (Cui et al. 2025).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Aggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
AGGREGATIONS: tuple[str, ...] = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


@dataclass(frozen=True)
class EntropyMech:
    """Covariance-based entropy control of Cui et al. (2025), as verl implements it.

    cov_t = (A_t − mean(A)) · (log π_t − mean(log π)) over the valid tokens (no gradient).
    ``clip_cov``: among valid tokens not already clipped by PPO with lb < cov_t < ub, pick
    max(⌊clip_ratio·n_valid⌋, 1) at random and drop their loss (no gradient through them).
    ``kl_cov``: the loss is the unclipped −A·ρ everywhere; the max(⌊kl_cov_ratio·n_valid⌋, 1)
    tokens of largest cov_t get kl_coef·|log π − log π_old| added.
    """

    kind: Literal["clip_cov", "kl_cov"]
    clip_ratio: float = 2e-4
    clip_cov_lb: float = 1.0
    clip_cov_ub: float = 5.0
    kl_cov_ratio: float = 2e-3
    kl_coef: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in ("clip_cov", "kl_cov"):
            raise ValueError(f"entropy_mech.kind: expected 'clip_cov' or 'kl_cov', got {self.kind!r}")


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def _covariance(advantages: torch.Tensor, logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    adv = advantages.detach()
    lp = logp.detach()
    return (adv - _masked_mean(adv, mask)) * (lp - _masked_mean(lp, mask))


def _apply_entropy_mech(
    mech: EntropyMech,
    unclipped: torch.Tensor,
    clipped: torch.Tensor,
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token loss under Clip-Cov or KL-Cov, and the boolean map of the tokens it touched."""
    valid = mask > 0
    n_valid = int(valid.sum())
    cov = _covariance(advantages, logp, mask)
    touched = torch.zeros_like(valid)
    if mech.kind == "clip_cov":
        loss = torch.maximum(unclipped, clipped)
        clipped_by_ppo = clipped > unclipped
        candidates = valid & ~clipped_by_ppo & (cov > mech.clip_cov_lb) & (cov < mech.clip_cov_ub)
        flat = torch.nonzero(candidates.reshape(-1)).flatten()
        if flat.numel():
            budget = max(int(mech.clip_ratio * n_valid), 1)
            order = torch.randperm(flat.numel(), generator=generator)
            touched.view(-1)[flat[order[:budget]]] = True
        return torch.where(touched, loss.detach() * 0.0, loss), touched
    loss = unclipped
    if n_valid:
        budget = max(int(mech.kl_cov_ratio * n_valid), 1)
        flat_valid = torch.nonzero(valid.reshape(-1)).flatten()
        top = torch.topk(cov.reshape(-1)[flat_valid], min(budget, n_valid)).indices
        touched.view(-1)[flat_valid[top]] = True
        loss = torch.where(touched, unclipped + mech.kl_coef * (logp - old_logp).abs(), unclipped)
    return loss, touched


def aggregate(
    token_loss: torch.Tensor,
    mask: torch.Tensor,
    agg: Aggregation,
    *,
    norm_const: float | None = None,
    total_tokens: float | None = None,
    total_seqs: float | None = None,
) -> torch.Tensor:
    """Reduce a per-token loss ℓ [B, T] to a scalar.

    token-mean:               Σ_{b,t} ℓ·mask / N_tok              (DAPO; N_tok = ``total_tokens``)
    seq-mean-token-mean:      (1/B) Σ_b [Σ_t ℓ·mask / Σ_t mask]    (GRPO; B = ``total_seqs``)
    seq-mean-token-sum-norm:  (1/B) Σ_b [Σ_t ℓ·mask] / C           (Dr. GRPO; C = ``norm_const``,
                                                                    default T = mask.shape[-1])
    ``total_tokens`` / ``total_seqs`` are the counts of the *whole* batch (all micro-batches and
    data-parallel ranks), so the sum of the micro-batch losses is the full-batch loss.
    """
    if agg not in AGGREGATIONS:
        raise ValueError(f"agg: expected one of {list(AGGREGATIONS)}, got {agg!r}")
    masked = token_loss * mask
    if agg == "token-mean":
        denominator = total_tokens if total_tokens is not None else mask.sum().clamp(min=1.0)
        return masked.sum() / denominator
    seqs = total_seqs if total_seqs is not None else float(mask.shape[0])
    if agg == "seq-mean-token-mean":
        per_seq = masked.sum(-1) / mask.sum(-1).clamp(min=1.0)
    else:
        per_seq = masked.sum(-1) / (norm_const if norm_const is not None else float(mask.shape[-1]))
    return per_seq.sum() / seqs


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    agg: Aggregation = "token-mean",
    dual_clip: float | None = None,
    rollout_logp: torch.Tensor | None = None,
    tis_cap: float | None = None,
    entropy_mech: EntropyMech | None = None,
    norm_const: float | None = None,
    total_tokens: float | None = None,
    total_seqs: float | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO-clip loss (module docstring) aggregated by :func:`aggregate`; returns (loss, metrics).

    Shapes: ``logp``, ``old_logp``, ``mask``, ``rollout_logp`` [B, T]; ``advantages`` [B] (one
    per response, broadcast over tokens) or [B, T]. Metrics: ``actor/clip_frac`` (valid tokens
    where the clipped term is the active one), ``actor/approx_kl`` (masked mean of
    log π_old − log π), ``actor/ratio_mean``, ``actor/tis_weight_mean`` with TIS,
    ``actor/entropy_mech_frac`` with EntropyMech.
    """
    if logp.shape != old_logp.shape or logp.shape != mask.shape:
        raise ValueError(
            f"logp, old_logp, mask: expected equal shapes [B, T], got {tuple(logp.shape)}, "
            f"{tuple(old_logp.shape)}, {tuple(mask.shape)}"
        )
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    advantages = advantages.to(logp.dtype).expand_as(logp)
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip: expected a constant c > 1, got {dual_clip}")
    mask = mask.to(logp.dtype)

    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    metrics: dict[str, float] = {}
    if entropy_mech is not None:
        token_loss, touched = _apply_entropy_mech(
            entropy_mech, unclipped, clipped, logp, old_logp, advantages, mask, generator
        )
        metrics["actor/entropy_mech_frac"] = float(_masked_mean(touched.to(mask.dtype), mask))
    else:
        token_loss = torch.maximum(unclipped, clipped)
    if dual_clip is not None:
        token_loss = torch.where(
            advantages < 0, torch.minimum(token_loss, -dual_clip * advantages), token_loss
        )
    if tis_cap is not None:
        if rollout_logp is None:
            raise ValueError("rollout_logp: tis_cap needs the rollout engine's log-probs")
        weight = torch.exp(old_logp - rollout_logp).clamp(max=tis_cap).detach()
        token_loss = token_loss * weight
        metrics["actor/tis_weight_mean"] = float(_masked_mean(weight, mask))

    loss = aggregate(
        token_loss, mask, agg,
        norm_const=norm_const, total_tokens=total_tokens, total_seqs=total_seqs,
    )
    with torch.no_grad():
        metrics["actor/clip_frac"] = float(_masked_mean((clipped > unclipped).to(mask.dtype), mask))
        metrics["actor/approx_kl"] = float(_masked_mean(-log_ratio, mask))
        metrics["actor/ratio_mean"] = float(_masked_mean(ratio, mask))
    return loss, metrics


def kl_penalty(
    logp: torch.Tensor, ref_logp: torch.Tensor, kind: Literal["k1", "k2", "k3"] = "k3"
) -> torch.Tensor:
    """Per-token estimate of KL(π_θ ‖ π_ref) from samples of π_θ (Schulman's estimators).

    With d = log π_ref − log π_θ:  k1 = −d,  k2 = d²/2,  k3 = exp(d) − d − 1 (≥ 0, unbiased).
    """
    d = ref_logp - logp
    if kind == "k1":
        return -d
    if kind == "k2":
        return 0.5 * d * d
    if kind == "k3":
        return torch.expm1(d) - d
    raise ValueError(f"kind: expected 'k1', 'k2' or 'k3', got {kind!r}")


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy over the last axis: H = logsumexp(z) − Σ_v softmax(z)_v · z_v (stable)."""
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)
