"""Rollout engines behind one interface (``base.RolloutEngine``): the native Megatron sampler
(``native_engine``), colocated vLLM (``vllm_engine``, the ``vllm`` extra), and the HF-named
weight export that feeds them (``weight_export``). Engines are imported from their modules so
that vLLM and Megatron load only when used."""

from .base import RolloutBatch, RolloutEngine, SamplingParams

__all__ = ["RolloutBatch", "RolloutEngine", "SamplingParams"]
