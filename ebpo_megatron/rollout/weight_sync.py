"""Send the trainer's current weights to a rollout engine that keeps its own copy (vLLM).

The model chunks are streamed as full tensors with Hugging Face names
(:func:`~ebpo_megatron.rollout.weight_export.export_hf_weights`, ``rollout.vllm.sync_bucket_mb``
at a time); every process of the model-parallel group takes part. With a ``probe`` (the
trainer's log-probs on a fixed sequence, ``rollout.vllm.sync_check``) the engine checks that it
reproduces them after loading.
"""

from __future__ import annotations

import torch

from ..config.schema import Config
from ..models.hf_mapping import Layout
from .base import RolloutEngine
from .sync_check import SyncProbe
from .weight_export import export_hf_weights


def send_weights(engine: RolloutEngine, chunks: list[torch.nn.Module], config: Config,
                 probe: SyncProbe | None = None) -> None:
    """Load ``chunks``' weights into ``engine`` (awake, ``owns_weights``)."""
    engine.update_weights(export_hf_weights(chunks, Layout.from_model_config(config.model),
                                            bucket_mb=config.rollout.vllm.sync_bucket_mb), probe=probe)
