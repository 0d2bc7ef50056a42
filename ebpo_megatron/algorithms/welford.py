"""Welford / Chan running moments in float64, and the EBPO prior built from two of them.

Symbols of docs/algorithms.md: ``W_r`` accumulates every individual reward r_{m,i} seen in training,
``W_μ`` every group mean μ_m. μ_glob = mean(W_r), σ² = var(W_r), τ² = var(W_μ).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class WelfordState:
    """Running count n, mean x̄ and sum of squared deviations M2 = Σ (x − x̄)², in float64.

    Two states (n_a, x̄_a, M2_a) and (n_b, x̄_b, M2_b) merge with Chan's parallel formula:
        n = n_a + n_b,  δ = x̄_b − x̄_a,
        x̄ = x̄_a + δ·n_b/n,
        M2 = M2_a + M2_b + δ²·n_a·n_b/n.
    """

    count: float = 0.0
    mean: float = 0.0
    m2: float = 0.0

    @classmethod
    def from_values(cls, values: torch.Tensor) -> "WelfordState":
        """The moments of one batch, computed in one vectorized pass (float64)."""
        values = values.detach().reshape(-1).to(torch.float64)
        if values.numel() == 0:
            return cls()
        mean = values.mean()
        m2 = ((values - mean) ** 2).sum()
        return cls(float(values.numel()), float(mean), float(m2))

    def merge(self, other: "WelfordState") -> "WelfordState":
        """Chan's merge of ``other`` into this state, in place; returns self."""
        if other.count == 0:
            return self
        if self.count == 0:
            self.count, self.mean, self.m2 = other.count, other.mean, other.m2
            return self
        total = self.count + other.count
        delta = other.mean - self.mean
        self.mean = self.mean + delta * other.count / total
        self.m2 = self.m2 + other.m2 + delta * delta * self.count * other.count / total
        self.count = total
        return self

    def update(self, values: torch.Tensor) -> "WelfordState":
        """Add a whole batch of values in one Chan step, in place; returns self."""
        return self.merge(WelfordState.from_values(values))

    @property
    def var(self) -> float:
        """Unbiased variance M2 / (n − 1); 0 when fewer than 2 values were seen (docs/algorithms.md, ours)."""
        return self.m2 / (self.count - 1.0) if self.count >= 2 else 0.0

    def copy(self) -> "WelfordState":
        return WelfordState(self.count, self.mean, self.m2)

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, float]) -> None:
        missing = {"count", "mean", "m2"} - set(state)
        if missing:
            raise ValueError(f"WelfordState.load_state_dict: missing keys {sorted(missing)}")
        self.count, self.mean, self.m2 = (float(state[k]) for k in ("count", "mean", "m2"))


@dataclass
class EBPOPrior:
    """The global prior of EBPO: W_r over rewards and W_μ over group means (float64).

    μ_glob = mean(W_r) is the policy's historical success rate, σ² = var(W_r) the
    reward-level noise, τ² = var(W_μ) the raw between-prompt variance of group means.
    """

    rewards: WelfordState = field(default_factory=WelfordState)
    group_means: WelfordState = field(default_factory=WelfordState)

    @property
    def mu_glob(self) -> float:
        return self.rewards.mean

    @property
    def sigma2(self) -> float:
        return self.rewards.var

    @property
    def tau2_raw(self) -> float:
        return self.group_means.var

    def state_dict(self) -> dict[str, dict[str, float]]:
        return {"rewards": self.rewards.state_dict(), "group_means": self.group_means.state_dict()}

    def load_state_dict(self, state: dict[str, dict[str, float]]) -> None:
        for key in ("rewards", "group_means"):
            if key not in state:
                raise ValueError(f"EBPOPrior.load_state_dict: missing key {key!r}")
        self.rewards.load_state_dict(state["rewards"])
        self.group_means.load_state_dict(state["group_means"])
