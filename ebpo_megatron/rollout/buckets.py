"""Group a stream of (name, tensor) pairs into buckets of bounded size, in order, lazily."""

from __future__ import annotations

from typing import Iterable, Iterator

import torch


def iter_buckets(
    named_tensors: Iterable[tuple[str, torch.Tensor]], limit_bytes: int, *, one_dtype: bool = False
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Lists of at most ``limit_bytes`` bytes (a tensor larger than the limit travels alone);
    with ``one_dtype`` a bucket also never mixes dtypes (so it can be flattened into one
    tensor). Holds at most one bucket of references at a time."""
    if limit_bytes < 1:
        raise ValueError(f"bucket limit: expected >= 1 byte, got {limit_bytes}")
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for item in named_tensors:
        name, tensor = item
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise TypeError(f"weight stream: expected (str, torch.Tensor) pairs, got {type(item)!r}")
        nbytes = tensor.numel() * tensor.element_size()
        new_dtype = one_dtype and bucket and tensor.dtype != bucket[0][1].dtype
        if bucket and (size + nbytes > limit_bytes or new_dtype):
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket
