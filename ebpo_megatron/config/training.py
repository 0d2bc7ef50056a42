"""The trainer's own settings: the optimizer (``train.optim``), the PPO loss
(``algorithm.loss``) and how a step's batch is used (``train.step``). Plain dataclasses, so that
loading a config imports no Megatron code; ``trainer.policy_trainer.PolicyTrainer`` takes them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..algorithms import EntropyMech


@dataclass
class OptimConfig:
    """Adam(W) with warm-up and decay (Megatron's OptimizerParamScheduler) and grad clipping."""

    lr: float = 1e-6
    min_lr: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    warmup_steps: int = 0
    decay_style: Literal["constant", "linear", "cosine"] = "constant"
    decay_steps: int = 1000
    use_distributed_optimizer: bool = True

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr: expected > 0, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"min_lr: expected 0 <= min_lr <= lr ({self.lr}), got {self.min_lr}")
        if self.warmup_steps < 0 or self.decay_steps < 1:
            raise ValueError("warmup_steps must be >= 0 and decay_steps >= 1")


@dataclass
class LossConfig:
    """PPO-clip loss options (``algorithms.policy_loss``) plus the KL and entropy terms.

    loss = policy_loss + kl_coef · agg(KL_kind(π_θ ‖ π_ref)) − entropy_coef · agg(H(π_θ)).
    """

    clip_low: float = 0.2
    clip_high: float = 0.2
    agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = "token-mean"
    norm_const: float | None = None
    dual_clip: float | None = None
    # truncated importance sampling, min(π_old / π_rollout, tis_cap); None: off (ebpo-train's
    # default "auto" is resolved at config load: on in bf16, config/precision.py)
    tis_cap: float | None = None
    kl_coef: float = 0.001
    kl_kind: Literal["k1", "k2", "k3"] = "k3"
    entropy_coef: float = 0.0
    entropy_mech: Literal["none", "clip_cov", "kl_cov"] = "none"
    clip_cov_ratio: float = 2e-4
    clip_cov_lb: float = 1.0
    clip_cov_ub: float = 5.0
    kl_cov_ratio: float = 2e-3
    kl_cov_coef: float = 1.0

    def entropy_mechanism(self) -> EntropyMech | None:
        if self.entropy_mech == "none":
            return None
        return EntropyMech(
            kind=self.entropy_mech, clip_ratio=self.clip_cov_ratio, clip_cov_lb=self.clip_cov_lb,
            clip_cov_ub=self.clip_cov_ub, kl_cov_ratio=self.kl_cov_ratio, kl_coef=self.kl_cov_coef,
        )


@dataclass
class StepConfig:
    """How one RL step's batch is used for updates."""

    ppo_epochs: int = 1
    mini_batches: int = 1
    micro_batch_size: int | None = 4
    max_tokens_per_microbatch: int | None = None
    temperature: float = 1.0
    step_kl: bool = True
    peak_tflops: float | None = None  # per device, for MFU; None: report TFLOP/s only
    # π_old of the PPO ratio: "recompute" (the trainer's own log-probs before the update, verl's
    # default: a forward pass of its own, except in an on-policy step — ppo_epochs 1, one
    # mini-batch — where the update's forward computes them, detached, at no extra cost) or
    # "rollout" (the engine's sampling log-probs; saves that pass when the engine computes the
    # same distribution, e.g. the native engine in fp32, at the cost of the mismatch metric)
    old_logp: Literal["recompute", "rollout"] = "recompute"
    # the G responses to a prompt in one row of a micro-batch, the prompt computed once
    # (models.prompt_sharing; the same loss and gradient): "auto" = where the model's attention
    # takes the packed rows' mask (the local layer spec on CPU, SDPA) and the sequence is not
    # split over ranks; true: the same, an error where it cannot; false: one row per response
    share_prompts: bool | Literal["auto"] = "auto"

    @property
    def on_policy(self) -> bool:
        """One update per step on the whole batch: π_old = π_θ at that update."""
        return self.ppo_epochs == 1 and self.mini_batches == 1

    def __post_init__(self) -> None:
        if (self.micro_batch_size is None) == (self.max_tokens_per_microbatch is None):
            raise ValueError("give exactly one of micro_batch_size and max_tokens_per_microbatch")
        if self.ppo_epochs < 1 or self.mini_batches < 1:
            raise ValueError("ppo_epochs and mini_batches must be >= 1")
        if self.temperature <= 0:
            raise ValueError(f"temperature: expected > 0, got {self.temperature}")
