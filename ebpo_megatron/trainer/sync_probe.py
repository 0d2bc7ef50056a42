"""The trainer's side of the rollout engine's sync check (``rollout.sync_check``): the policy's
own log-probs of the fixed probe sequence, on every rank."""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from ..models.config import ModelConfig
from ..rollout.sync_check import SyncProbe, probe_token_ids, tolerance
from .policy_trainer import PolicyTrainer
from .rollout_batch import build_policy_batch


def trainer_sync_probe(trainer: PolicyTrainer, model: ModelConfig, pad_token_id: int) -> SyncProbe:
    """Teacher-forced log-probs (temperature 1) of ``probe_token_ids`` under the trainer's current
    weights. Collective over the model-parallel group (one forward); the last pipeline stage's
    result is broadcast so that every rank's engine gets it."""
    tokens = probe_token_ids(model.vocab_size)
    batch = build_policy_batch([tokens[:1]], [tokens[1:]], [[0.0] * (len(tokens) - 1)], torch.zeros(1),
                               pad_token_id)
    logp = trainer.logprobs(batch, temperature=1.0)
    expected = torch.empty(len(tokens) - 1) if logp is None else logp[0, : len(tokens) - 1].float().cpu()
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(expected, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                       group=parallel_state.get_pipeline_model_parallel_group())
    return SyncProbe(tokens, expected, tolerance(model.precision))
