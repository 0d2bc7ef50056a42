"""DAPO's sampling-side pieces (Yu et al. 2025): overlong reward shaping and dynamic sampling.

The loss-side pieces of DAPO are options of :func:`policy_loss` (clip-higher ε_high = 0.28,
``agg="token-mean"``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .group_table import global_group_table


def overlong_penalty(
    response_lengths: torch.Tensor, max_length: int, buffer_length: int, penalty_factor: float = 1.0
) -> torch.Tensor:
    """Soft overlong punishment added to the reward, with L = |y|, L_max, L_cache:

        R_len = 0                                  if L ≤ L_max − L_cache
              = ((L_max − L_cache) − L) / L_cache   if L_max − L_cache < L ≤ L_max
              = −1                                 if L > L_max
    scaled by ``penalty_factor``.
    """
    if not 0 < buffer_length <= max_length:
        raise ValueError(
            f"buffer_length: expected 0 < buffer_length <= max_length ({max_length}), got {buffer_length}"
        )
    length = response_lengths.to(torch.float64)
    start = float(max_length - buffer_length)
    penalty = ((start - length) / buffer_length).clamp(max=0.0)
    penalty = torch.where(length > max_length, torch.full_like(penalty, -1.0), penalty)
    return (penalty_factor * penalty).to(torch.float32)


def groups_with_signal(
    rewards: torch.Tensor, group_ids: torch.Tensor, process_group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """Dynamic sampling's filter: True for responses whose group's rewards are not all equal.

    Groups whose G_m rewards are all 0 or all 1 give GRPO no gradient; DAPO drops them and
    samples more prompts until the batch is full. With ``process_group`` a group split across
    ranks is judged on all of its responses.
    """
    table, row = global_group_table(rewards.detach(), group_ids.to(torch.int64), process_group)
    return (table.max != table.min).index_select(0, row)
