"""Model architecture from YAML: Llama-3 / Qwen2.5 / Qwen3 dense decoders.

Family defaults: ``qwen2`` has QKV bias, ``qwen3`` has QK-norm (RMSNorm over each head's q and
k); all use RMSNorm, SwiGLU, RoPE and GQA. ``rope_scaling`` is Llama-3's frequency scaling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class RopeScaling:
    """Llama-3 RoPE scaling (HF ``rope_type: llama3``)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass
class ModelConfig:
    family: Literal["llama", "qwen2", "qwen3"] = "llama"
    num_layers: int = 2
    hidden_size: int = 128
    ffn_hidden_size: int = 384
    num_attention_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int | None = None
    vocab_size: int = 128
    max_position_embeddings: int = 256
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    qkv_bias: bool | None = None  # default: True for qwen2
    qk_norm: bool | None = None  # default: True for qwen3
    transformer_impl: Literal["local", "transformer_engine"] = "local"
    precision: Literal["fp32", "bf16", "fp8"] = "fp32"
    fp8_recipe: Literal["delayed", "current"] = "delayed"
    recompute: Literal["none", "selective", "full"] = "none"
    init_std: float = 0.02
    checkpoint: str | None = None  # initial weights: a model-only Megatron dist checkpoint

    def __post_init__(self) -> None:
        if self.qkv_bias is None:
            self.qkv_bias = self.family == "qwen2"
        if self.qk_norm is None:
            self.qk_norm = self.family == "qwen3"
        if self.num_attention_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of num_kv_heads {self.num_kv_heads}"
            )
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}; set head_dim"
            )
        if self.precision == "fp8" and self.transformer_impl != "transformer_engine":
            raise ValueError("precision 'fp8' needs transformer_impl: transformer_engine")

    @property
    def kv_channels(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads
