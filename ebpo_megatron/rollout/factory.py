"""The rollout engine a config asks for (``rollout.engine``).

* ``native``: :class:`NativeEngine` samples from the trainer's own model (no weight sync).
* ``vllm``: one colocated :class:`VLLMEngine` per process, started from a config.json of the
  policy's architecture only; it holds no weights until the caller sends them
  (``update_weights`` after ``wake``).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from ..config.schema import Config
from .base import RolloutEngine
from .native_engine import NativeEngine


def native_engine(model: torch.nn.Module, config: Config, pad_token_id: int) -> NativeEngine:
    """The native sampler over ``model`` (the first model chunk's module)."""
    return NativeEngine(model, pad_token_id=pad_token_id,
                        max_sequence_length=config.model.max_position_embeddings,
                        max_batch_size=config.rollout.max_batch_size)


def vllm_model_dir(config: Config) -> Path:
    """The HF directory vLLM starts from: config.json of the policy's architecture only (weights
    come from the trainer at every wake; prompts arrive as token ids, so no tokenizer). Written by
    global rank 0; every rank returns after it exists."""
    from ..conversion.hf_config import hf_config_from_model_config

    directory = config.run.run_dir / "vllm_model"
    if dist.get_rank() == 0:
        directory.mkdir(parents=True, exist_ok=True)
        hf_config_from_model_config(config.model).save_pretrained(directory)
    dist.barrier()
    return directory


def vllm_engine(config: Config) -> RolloutEngine:
    """One colocated ``VLLMEngine`` per process for ``config.model`` (``rollout.vllm`` settings)."""
    from .vllm_engine import VLLMEngine

    block_size = {} if config.rollout.vllm.block_size is None else {"block_size": config.rollout.vllm.block_size}
    return VLLMEngine.from_config(
        config.rollout.vllm, vllm_model_dir(config), seed=config.run.seed,
        dtype="float32" if config.model.precision == "fp32" else "bfloat16",
        max_model_len=config.model.max_position_embeddings,
        gather_prompts=config.rollout.vllm.tensor_parallel > 1,
        engine_kwargs={"skip_tokenizer_init": True, **block_size})


def build_engine(config: Config, model: torch.nn.Module, pad_token_id: int) -> RolloutEngine:
    """``rollout.engine``'s engine; ``model`` is only sampled from by the native engine."""
    if config.rollout.engine == "vllm":
        return vllm_engine(config)
    return native_engine(model, config, pad_token_id)
