"""End-to-end check of a weight sync: log-probs of a fixed probe sequence, computed by the
rollout engine after the sync, against those of the trainer's own forward on the same weights.

A sync can report success and still leave the engine computing with other weights: a kernel
copy that was not refreshed (vLLM's CPU-packed tied lm_head kept the dummy weights while every
parameter had been "loaded": log-probs off by up to 12.9 nats), a layer processed with half of
its shards, a name mapping error. Counting loaded names cannot see any of these; comparing what
the model computes does. One probe costs one forward of ``PROBE_LENGTH`` tokens on each side.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PROBE_LENGTH = 16
FP32_ATOL = 1e-3  # fp32 vLLM vs the fp32 trainer: measured max |diff| 2e-5
LOW_PRECISION_ATOL = 0.5  # bf16/fp16 arithmetic; unsynced or stale weights are off by nats


@dataclass(frozen=True)
class SyncProbe:
    """Teacher-forced log-probs (temperature 1) that the synced engine must reproduce:
    ``expected[t]`` = log p(token_ids[t + 1] | token_ids[: t + 1]), within ``atol``."""

    token_ids: list[int]
    expected: torch.Tensor  # [len(token_ids) - 1], float
    atol: float

    def __post_init__(self) -> None:
        if len(self.token_ids) < 2 or self.expected.shape != (len(self.token_ids) - 1,):
            raise ValueError(f"SyncProbe: {len(self.token_ids)} tokens need {len(self.token_ids) - 1} "
                             f"expected log-probs, got shape {tuple(self.expected.shape)}")


def probe_token_ids(vocab_size: int, length: int = PROBE_LENGTH, seed: int = 0) -> list[int]:
    """A fixed pseudo-random token sequence over the whole vocabulary."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (length,), generator=generator).tolist()


def tolerance(precision: str) -> float:
    """Probe tolerance for the trainer's ``model.precision`` ("fp32", "bf16", ...)."""
    return FP32_ATOL if precision == "fp32" else LOW_PRECISION_ATOL


def probe_max_diff(probe: SyncProbe, got: torch.Tensor) -> float:
    """max |got - expected| (inf for a wrong shape or a non-finite value)."""
    got = torch.as_tensor(got, dtype=torch.float64)
    if got.shape != probe.expected.shape or not torch.isfinite(got).all():
        return float("inf")
    return float((got - probe.expected.double()).abs().max())
