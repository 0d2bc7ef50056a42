"""Megatron-Core GPTModel builders (Llama-3 / Qwen2.5 / Qwen3) and the HF name/layout table."""

from .builder import build_policy, transformer_config
from .config import ModelConfig, RopeScaling

__all__ = ["ModelConfig", "RopeScaling", "build_policy", "transformer_config"]
