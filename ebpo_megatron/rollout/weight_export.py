"""Stream the policy's weights as full tensors with Hugging Face names (rollout weight sync,
HF checkpoint export).

For each parameter of each pipeline stage: the TP shards are all-gathered inside the TP group
and merged (``hf_mapping.merge_tp_shards``: QKV groups, [gate; up] halves, vocabulary rows),
renamed to the global layer index and mapped to HF names (padding removed). Stages take turns:
the owning stage packs tensors into a flat bucket of at most ``bucket_mb`` MiB (a tensor larger
than that travels alone) and broadcasts it over the PP group, so every rank yields the same
stream and no rank ever holds more than one bucket plus the largest tensor of the model.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from ..models.hf_mapping import Layout, megatron_to_hf
from ..models.weights import local_parameters, tp_merged
from .buckets import iter_buckets


def _local_tensors(chunks: list[torch.nn.Module]) -> Iterator[tuple[str, torch.Tensor]]:
    """(global Megatron name, full tensor) for this stage's parameters, one at a time."""
    for global_name, local_name, param in local_parameters(chunks):
        yield global_name, tp_merged(local_name, param)


def export_hf_weights(
    chunks: list[torch.nn.Module], layout: Layout, bucket_mb: float = 512.0
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, full tensor) for every weight of the model, on every rank (see module
    docstring). All ranks of the model-parallel group must iterate it to the end together."""
    limit = int(bucket_mb * 2**20)
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    pp_size = dist.get_world_size(pp_group)
    if pp_size == 1:
        for bucket in iter_buckets(_local_tensors(chunks), limit, one_dtype=True):
            for name, tensor in bucket:
                yield from megatron_to_hf(name, tensor, layout)
        return
    my_stage = parallel_state.get_pipeline_model_parallel_rank()
    ranks = dist.get_process_group_ranks(pp_group)
    for stage in range(pp_size):
        source = iter_buckets(_local_tensors(chunks), limit, one_dtype=True) if stage == my_stage else None
        while True:
            bucket = next(source, None) if source is not None else None
            header = [[(n, t.shape) for n, t in bucket] if bucket else []]
            header.append(bucket[0][1].dtype if bucket else None)
            dist.broadcast_object_list(header, src=ranks[stage], group=pp_group)
            meta, dtype = header
            if not meta:
                break
            numel = sum(int(torch.Size(shape).numel()) for _, shape in meta)
            flat = (torch.cat([t.reshape(-1) for _, t in bucket]) if stage == my_stage
                    else torch.empty(numel, dtype=dtype))
            dist.broadcast(flat, src=ranks[stage], group=pp_group)
            position = 0
            for name, shape in meta:
                n = int(torch.Size(shape).numel())
                tensor = flat[position: position + n].view(shape)
                position += n
                yield from megatron_to_hf(name, tensor, layout)
