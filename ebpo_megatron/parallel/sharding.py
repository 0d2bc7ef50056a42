"""How a list of prompts is spread over processes, and the seed each process samples with.

One rule for every place that splits work (training rollouts, evaluation, warm-start batches):

* **shares**: ``count`` items are cut into ``size`` contiguous parts whose sizes differ by at
  most one (bounds ``round(i · count / size)``); process ``rank`` of the group takes part ``rank``;
* **seeds**: process ``rank`` of the group that shares the work samples with ``seed + rank``,
  so the same checkpoint, seed and layout draw the same samples whichever path evaluates it.
  Greedy decoding (temperature 0) does not depend on the seed, so its results do not depend on
  the number of processes either.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")
R = TypeVar("R")


def contiguous_shares(count: int, size: int) -> list[slice]:
    """``count`` items in ``size`` contiguous slices, equal up to one item (some empty when
    count < size)."""
    if size < 1 or count < 0:
        raise ValueError(f"contiguous_shares: expected count >= 0 and size >= 1, got {count} and {size}")
    bounds = torch.linspace(0, count, size + 1).round().long().tolist()
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def rank_seed(seed: int, rank: int) -> int:
    """The sampling seed of process ``rank`` of the group sharing the work."""
    return seed + rank


def group_rank_size(group: Any) -> tuple[int, int]:
    return dist.get_rank(group), dist.get_world_size(group)


def map_over_group(items: list[T], fn: Callable[[list[T], int, int], list[R]], group: Any) -> list[R]:
    """``fn(share, first_index, rank)`` on this process's share of ``items``; the results of all
    shares, in item order, on every process of ``group``."""
    rank, size = group_rank_size(group)
    part = contiguous_shares(len(items), size)[rank]
    out = fn(items[part], part.start, rank) if part.stop > part.start else []
    if size == 1:
        return out
    gathered: list[list[R]] = [[] for _ in range(size)]
    dist.all_gather_object(gathered, out, group=group)
    return [r for share in gathered for r in share]
