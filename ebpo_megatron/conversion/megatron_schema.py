"""Which sharded keys a Megatron ``dist_checkpointing`` checkpoint of a model holds, read from
Megatron itself rather than written down by hand.

Megatron-Core names checkpoint entries by *sharded key*, not by parameter name: the local spec's
``decoder.layers.<i>.input_layernorm.weight`` is stored under
``decoder.layers.self_attention.linear_qkv.layer_norm_weight`` (the Transformer Engine name),
and all layers of one parameter share a key, stacked along a prepended axis of size L (layer i
is the slice [i]). Linear layers also store an ``_extra_state`` object per layer. The schema is
taken from the ``sharded_state_dict`` of a one-layer skeleton of the same family (tiny widths,
so it costs nothing), which keeps the converters right when Megatron renames keys.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from ..models.config import ModelConfig

_LAYER_PREFIX = "decoder.layers.0."


@dataclass(frozen=True)
class TensorEntry:
    """One checkpoint tensor: ``key`` in the checkpoint, ``name`` the Megatron parameter name
    (for stacked entries the part after ``decoder.layers.<i>.``)."""

    key: str
    name: str
    stacked: bool

    def parameter_name(self, layer: int | None) -> str:
        return f"decoder.layers.{layer}.{self.name}" if self.stacked else self.name


@dataclass(frozen=True)
class ObjectEntry:
    """One ``ShardedObject`` (e.g. a linear layer's ``_extra_state``) and its value in a freshly
    built model."""

    key: str
    stacked: bool
    data: Any


@dataclass(frozen=True)
class CheckpointSchema:
    tensors: tuple[TensorEntry, ...]
    objects: tuple[ObjectEntry, ...]


@contextlib.contextmanager
def megatron_single_process(model: ModelConfig) -> Iterator[None]:
    """Megatron's parallel state at TP = PP = 1 for a converter: created (one gloo process) and
    destroyed here unless the caller already set it up at TP = PP = 1."""
    from megatron.core import parallel_state

    from ..parallel import ParallelConfig, initialize, shutdown

    if dist.is_initialized():
        if (parallel_state.get_tensor_model_parallel_world_size() != 1
                or parallel_state.get_pipeline_model_parallel_world_size() != 1):
            raise RuntimeError("the checkpoint converters run in one process at TP = PP = 1")
        yield
        return
    initialize(ParallelConfig(), model)
    try:
        yield
    finally:
        shutdown()


def _skeleton(model: ModelConfig) -> ModelConfig:
    return dataclasses.replace(model, num_layers=1, hidden_size=8, ffn_hidden_size=4, head_dim=2,
                               vocab_size=8, transformer_impl="local", precision="fp32", recompute=None,
                               rope_scaling=None, checkpoint=None)


def checkpoint_schema(model: ModelConfig) -> CheckpointSchema:
    """The sharded keys of ``model``'s checkpoint (call inside :func:`megatron_single_process`)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    from ..models import build_policy
    from ..parallel import ParallelConfig

    (chunk,) = build_policy(_skeleton(model), ParallelConfig())
    tensors: dict[str, TensorEntry] = {}
    objects: dict[str, ObjectEntry] = {}
    for name, item in getattr(chunk, "module", chunk).sharded_state_dict().items():
        stacked = name.startswith(_LAYER_PREFIX)
        if isinstance(item, ShardedObject):
            objects.setdefault(item.key, ObjectEntry(item.key, stacked, item.data))
        else:  # ShardedTensor or a factory (SwiGLU fc1) that covers the whole tensor
            suffix = name[len(_LAYER_PREFIX):] if stacked else name
            tensors.setdefault(item.key, TensorEntry(item.key, suffix, stacked))
    return CheckpointSchema(tuple(tensors.values()), tuple(objects.values()))
