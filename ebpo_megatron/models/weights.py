"""Move full (unsharded, globally named) Megatron tensors into and out of this rank's chunks.

Global names use the model-wide layer index (``decoder.layers.<i>``); a pipeline stage's own
modules count their layers from 0, so names are shifted by the stage's layer offset.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from .hf_mapping import global_layer_name, merge_tp_shards, shard_for_rank


def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    return getattr(chunk, "module", chunk)


def local_parameters(chunks: list[torch.nn.Module]) -> Iterator[tuple[str, str, torch.nn.Parameter]]:
    """(global name, local name, parameter) of this rank; a tied output layer is skipped."""
    for vp_stage, chunk in enumerate(chunks):
        model = _unwrap(chunk)
        offset = get_transformer_layer_offset(model.config, vp_stage if len(chunks) > 1 else None)
        for name, param in model.named_parameters():
            if name == "output_layer.weight" and model.share_embeddings_and_output_weights:
                continue
            yield global_layer_name(name, offset), name, param


def tp_merged(name: str, param: torch.Tensor) -> torch.Tensor:
    """A parameter merged over the TP group (all TP ranks must call this together)."""
    group = parallel_state.get_tensor_model_parallel_group()
    size = dist.get_world_size(group)
    data = param.detach()
    if size == 1 or not getattr(param, "tensor_model_parallel", False):
        return data
    shards = [torch.empty_like(data) for _ in range(size)]
    dist.all_gather(shards, data.contiguous(), group=group)
    return merge_tp_shards(name, shards)


@torch.no_grad()
def assign_full_weights(chunks: list[torch.nn.Module], get_full: Callable[[str], torch.Tensor]) -> None:
    """Copy this rank's shard of every full tensor ``get_full(global_name)`` into its parameter
    (vocabulary rows must already be padded to the model's vocabulary)."""
    rank = parallel_state.get_tensor_model_parallel_rank()
    size = parallel_state.get_tensor_model_parallel_world_size()
    for global_name, local_name, param in local_parameters(chunks):
        full = get_full(global_name)
        shard = shard_for_rank(local_name, full, rank, size) if getattr(param, "tensor_model_parallel", False) else full
        if tuple(shard.shape) != tuple(param.shape):
            raise ValueError(
                f"{global_name}: shard of shape {tuple(shard.shape)} does not fit the parameter "
                f"{tuple(param.shape)} (full tensor {tuple(full.shape)}, TP {size})"
            )
        param.copy_(shard.to(param.dtype))
    for chunk in chunks:  # a tied output layer on the last stage mirrors the embedding
        model = _unwrap(chunk)
        if model.share_embeddings_and_output_weights and model.post_process and not model.pre_process:
            full = get_full("embedding.word_embeddings.weight")
            model.output_layer.weight.copy_(shard_for_rank("output_layer.weight", full, rank, size))


def full_weights(chunks: list[torch.nn.Module]) -> dict[str, torch.Tensor]:
    """This stage's parameters, TP-merged, by global name (all TP ranks must call this)."""
    return {g: tp_merged(local, p).clone() for g, local, p in local_parameters(chunks)}
