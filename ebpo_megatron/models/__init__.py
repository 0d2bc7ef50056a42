"""Megatron-Core GPTModel builders (Llama-3 / Qwen2.5 / Qwen3) and the HF name/layout table."""

from .builder import GPU_EXTRA, build_policy, fp8_recipe, layer_spec, transformer_config
from .config import ModelConfig, RopeScaling

__all__ = ["GPU_EXTRA", "ModelConfig", "RopeScaling", "build_policy", "fp8_recipe", "layer_spec",
           "transformer_config"]
