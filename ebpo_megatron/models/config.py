"""Model architecture: Llama-3 / Qwen2.5 / Qwen3 dense decoders (RMSNorm, SwiGLU, RoPE, GQA).

Family defaults: ``qwen2`` has a QKV bias, ``qwen3`` QK-norm (RMSNorm over each head's q and k
before RoPE); ``llama`` neither. ``rope_scaling`` is Llama-3's frequency scaling (HF
``rope_type: llama3``): with wavelength λ_i = 2π / ω_i of the base frequency ω_i = θ^(−2i/d),
L = ``original_max_position_embeddings``, α = ``low_freq_factor``, β = ``high_freq_factor``,
s = ``factor``:

    ω'_i = ω_i                              if λ_i < L/β     (high frequencies kept)
    ω'_i = ω_i / s                          if λ_i > L/α     (low frequencies slowed down)
    ω'_i = (1 − γ) ω_i / s + γ ω_i,  γ = (L/λ_i − α) / (β − α)   otherwise.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

Family = Literal["llama", "qwen2", "qwen3"]
TransformerImpl = Literal["local", "transformer_engine"]
Precision = Literal["fp32", "bf16", "fp8", "auto"]  # auto: config.precision resolves it
Fp8Recipe = Literal["delayed", "current"]
Recompute = Literal["none", "selective", "full"]


def _reject_unknown(cls: type, data: Mapping[str, Any], ignore: tuple[str, ...] = ()) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known - set(ignore))
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown key(s) {unknown}; valid keys: {sorted(known)}")


def _check_choice(owner: str, name: str, value: Any, choices: tuple[Any, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{owner}.{name}: got {value!r}, expected one of {list(choices)}")


@dataclass
class RopeScaling:
    """Llama-3 RoPE scaling (HF ``rope_scaling`` with ``rope_type: llama3``); see the module
    docstring for the formula. Megatron-Core's defaults are those of Llama 3.1."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.factor <= 0:
            raise ValueError(f"rope_scaling.factor: expected > 0, got {self.factor}")
        if not 0 < self.low_freq_factor < self.high_freq_factor:
            raise ValueError(
                f"rope_scaling: expected 0 < low_freq_factor < high_freq_factor, got "
                f"{self.low_freq_factor} and {self.high_freq_factor}"
            )
        if self.original_max_position_embeddings < 1:
            raise ValueError(f"rope_scaling.original_max_position_embeddings: expected >= 1, got "
                             f"{self.original_max_position_embeddings}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RopeScaling:
        """From a mapping (an HF ``rope_scaling`` block works: ``rope_type``/``type`` must be
        ``llama3``); unknown keys are an error naming them."""
        kind = data.get("rope_type", data.get("type", "llama3"))
        if kind != "llama3":
            raise ValueError(f"rope_scaling: only rope_type 'llama3' is supported, got {kind!r}")
        _reject_unknown(cls, data, ignore=("rope_type", "type"))
        return cls(**{k: v for k, v in data.items() if k not in ("rope_type", "type")})


@dataclass
class ModelConfig:
    """One decoder-only architecture and how to build it (implementation, precision, recompute)."""

    family: Family = "llama"
    num_layers: int = 2
    hidden_size: int = 128
    ffn_hidden_size: int = 384
    num_attention_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int | None = None  # default: hidden_size / num_attention_heads
    vocab_size: int = 128  # real vocabulary; the model's is padded (parallel.padded_vocab_size)
    max_position_embeddings: int = 256
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    qkv_bias: bool | None = None  # default: True for qwen2
    qk_norm: bool | None = None  # default: True for qwen3
    transformer_impl: TransformerImpl = "local"
    precision: Precision = "fp32"  # "auto": bf16 on native-bf16 hardware, else fp32 (config/precision.py)
    fp8_recipe: Fp8Recipe = "delayed"  # delayed scaling, or per-tensor current scaling
    recompute: Recompute | None = None  # None (= "none"), "selective" or "full"
    init_std: float = 0.02
    checkpoint: str | None = None  # initial weights: a model-only Megatron dist checkpoint

    def __post_init__(self) -> None:
        name = type(self).__name__
        if self.recompute == "none":
            self.recompute = None
        for field_name, choices in (("family", get_args(Family)),
                                    ("transformer_impl", get_args(TransformerImpl)),
                                    ("precision", get_args(Precision)),
                                    ("fp8_recipe", get_args(Fp8Recipe)),
                                    ("recompute", (None, "selective", "full"))):
            _check_choice(name, field_name, getattr(self, field_name), choices)
        for field_name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                           "num_kv_heads", "vocab_size", "max_position_embeddings"):
            if getattr(self, field_name) < 1:
                raise ValueError(f"{name}.{field_name}: expected >= 1, got {getattr(self, field_name)}")
        if isinstance(self.rope_scaling, Mapping):
            self.rope_scaling = RopeScaling.from_dict(self.rope_scaling)
        if self.qkv_bias is None:
            self.qkv_bias = self.family == "qwen2"
        if self.qk_norm is None:
            self.qk_norm = self.family == "qwen3"
        if self.num_attention_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of num_kv_heads "
                f"{self.num_kv_heads} (each KV head serves a whole group of query heads)"
            )
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}; set head_dim"
            )
        if self.kv_channels % 2:
            raise ValueError(f"head dimension {self.kv_channels} must be even (RoPE rotates pairs)")
        if self.precision == "fp8" and self.transformer_impl != "transformer_engine":
            raise ValueError("precision 'fp8' needs transformer_impl: transformer_engine")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        """From a mapping (e.g. the ``model:`` block of a YAML file); an unknown key is a
        ValueError naming it, ``rope_scaling`` may be a mapping."""
        _reject_unknown(cls, data)
        return cls(**dict(data))

    @property
    def kv_channels(self) -> int:
        """Per-head dimension d."""
        return self.head_dim or self.hidden_size // self.num_attention_heads
