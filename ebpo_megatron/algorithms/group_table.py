"""Per-prompt reward statistics, reduced by group id (locally and across data-parallel ranks).

A *group* is the set of G_m responses of prompt m. Responses are keyed by an int64 group id,
never by position: groups may be non-contiguous, of unequal size, and split across ranks.

For every group the table holds G_m, μ_m = (1/G_m) Σ_i r_{m,i}, M2_m = Σ_i (r_{m,i} − μ_m)²,
and min/max of the rewards. Partial tables (from different ranks) merge exactly like Welford
states (Chan's formula), so a table built on several ranks equals the one-process table to
float64 rounding, and every rank ends with the bit-identical table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from .welford import WelfordState


@dataclass(frozen=True)
class GroupTable:
    """Statistics of M groups, sorted by group id (all tensors of length M, float64 but ``ids``)."""

    ids: torch.Tensor  # int64, sorted ascending, unique
    count: torch.Tensor  # G_m
    mean: torch.Tensor  # μ_m
    m2: torch.Tensor  # Σ_i (r_{m,i} − μ_m)²
    min: torch.Tensor
    max: torch.Tensor

    @property
    def num_groups(self) -> int:
        return int(self.ids.numel())

    @property
    def std(self) -> torch.Tensor:
        """Unbiased s_m = sqrt(M2_m / (G_m − 1)); 0 for groups of one response."""
        return torch.sqrt(self.m2 / (self.count - 1.0).clamp(min=1.0))

    def lookup(self, group_ids: torch.Tensor) -> torch.Tensor:
        """Row index in this table of each response's group id."""
        return torch.searchsorted(self.ids, group_ids)

    def reward_moments(self) -> WelfordState:
        """Welford state of all rewards of the table (Chan's merge over groups)."""
        return moments_of(self.count, self.mean, self.m2)


def moments_of(count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor) -> WelfordState:
    """Chan's merge of many (n_k, x̄_k, M2_k) partials in one vectorized step.

    n = Σ n_k,  x̄ = Σ n_k x̄_k / n,  M2 = Σ M2_k + Σ n_k (x̄_k − x̄)².
    """
    total = count.sum()
    if total == 0:
        return WelfordState()
    overall = (count * mean).sum() / total
    m2_total = m2.sum() + (count * (mean - overall) ** 2).sum()
    return WelfordState(float(total), float(overall), float(m2_total))


def _unique_inverse(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted unique ids and each element's index among them (``torch.unique`` semantics).

    Dense ids (max id below 2·N + 1024, the usual prompt indices) take an O(N + max id) path
    with ``bincount`` and a prefix sum instead of a sort.
    """
    if ids.numel() == 0 or int(ids.max()) >= 2 * ids.numel() + 1024:
        return torch.unique(ids, sorted=True, return_inverse=True)
    present = torch.bincount(ids) > 0
    position = torch.cumsum(present, 0) - 1
    return torch.nonzero(present).flatten(), position.index_select(0, ids)


def _reduce_by_id(
    ids: torch.Tensor,
    mean: torch.Tensor,
    count: torch.Tensor | None = None,
    m2: torch.Tensor | None = None,
    minimum: torch.Tensor | None = None,
    maximum: torch.Tensor | None = None,
) -> tuple[GroupTable, torch.Tensor]:
    """Merge partial statistics (n_k, x̄_k, M2_k, min_k, max_k) that share a group id.

    Vectorized Chan merge per id: n = Σ n_k, x̄ = Σ n_k x̄_k / n, M2 = Σ [M2_k + n_k (x̄_k − x̄)²].
    With ``count`` None each partial is a single reward (n = 1, M2 = 0, min = max = x̄).
    Returns the table and, for every partial, its row in the table.
    """
    unique_ids, inverse = _unique_inverse(ids)
    num = unique_ids.numel()
    if count is None:
        total = torch.bincount(inverse, minlength=num).to(torch.float64)
        group_mean = torch.bincount(inverse, weights=mean, minlength=num) / total
        spread = (mean - group_mean.index_select(0, inverse)) ** 2
        minimum = maximum = mean
    else:
        total = torch.bincount(inverse, weights=count, minlength=num)
        group_mean = torch.bincount(inverse, weights=count * mean, minlength=num) / total
        spread = count * (mean - group_mean.index_select(0, inverse)) ** 2 + m2
    group_m2 = torch.bincount(inverse, weights=spread, minlength=num)
    group_min = torch.full((num,), float("inf"), dtype=torch.float64).scatter_reduce(
        0, inverse, minimum, reduce="amin"
    )
    group_max = torch.full((num,), float("-inf"), dtype=torch.float64).scatter_reduce(
        0, inverse, maximum, reduce="amax"
    )
    return GroupTable(unique_ids, total, group_mean, group_m2, group_min, group_max), inverse


def _all_gather_rows(rows: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Concatenate every rank's ``rows`` ([K_rank, C]) in rank order; K_rank may differ."""
    world = dist.get_world_size(group)
    size = torch.tensor([rows.shape[0]], dtype=torch.int64)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros((longest, rows.shape[1]), dtype=rows.dtype)
    padded[: rows.shape[0]] = rows
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded, group=group)
    return torch.cat([g[: int(s.item())] for g, s in zip(gathered, sizes)])


def global_group_table(
    rewards: torch.Tensor, group_ids: torch.Tensor, process_group: dist.ProcessGroup | None
) -> tuple[GroupTable, torch.Tensor]:
    """The group table of the whole step, and the table row of each of this rank's responses.

    Each rank reduces its rows by group id (a response is a partial with n = 1, M2 = 0); with
    ``process_group`` the partial tables are all-gathered (O(M) values, never the rows) and
    every rank merges them in rank order, so every rank holds the identical table.
    """
    local, row = _reduce_by_id(group_ids, rewards.to(torch.float64))
    if process_group is None:
        return local, row
    ids = _all_gather_rows(local.ids.unsqueeze(1), process_group).squeeze(1)
    stats = torch.stack([local.mean, local.count, local.m2, local.min, local.max], dim=1)
    stats = _all_gather_rows(stats, process_group)
    table, _ = _reduce_by_id(ids, *stats.unbind(dim=1))
    return table, table.lookup(local.ids).index_select(0, row)
