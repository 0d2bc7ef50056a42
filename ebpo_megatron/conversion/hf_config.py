"""Hugging Face ``config.json`` <-> :class:`ModelConfig` for the supported dense families.

Accepted: ``LlamaForCausalLM`` (no attention/MLP bias), ``Qwen2ForCausalLM`` (QKV bias) and
``Qwen3ForCausalLM`` (QK-norm), all with SiLU-gated MLPs. RoPE settings are read from the
legacy keys (``rope_theta`` + ``rope_scaling``) or from transformers 5's ``rope_parameters``.
Anything else is a ValueError naming the file and the field.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..models.config import ModelConfig, RopeScaling

_FAMILY = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}


def _rope(config: dict[str, Any], source: str) -> tuple[float, RopeScaling | None]:
    params = config.get("rope_parameters") or {}
    theta = config.get("rope_theta", params.get("rope_theta", 10000.0))
    scaling = config.get("rope_scaling") or (params if params.get("rope_type") not in (None, "default") else None)
    if not scaling:
        return float(theta), None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind != "llama3":
        raise ValueError(f"{source}: rope type {kind!r} is not supported (only 'llama3' scaling)")
    fields = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    return float(theta), RopeScaling(**{k: scaling[k] for k in fields if k in scaling})


def model_config_from_hf(config: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """The :class:`ModelConfig` of an HF checkpoint's ``config.json`` (``source`` names it in
    errors)."""
    archs = config.get("architectures") or []
    family = next((_FAMILY[a] for a in archs if a in _FAMILY), None)
    if family is None:
        raise ValueError(f"{source}: architectures {archs} is not supported; expected one of {sorted(_FAMILY)}")
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{source}: hidden_act {config['hidden_act']!r}: only 'silu' (SwiGLU) is supported")
    if config.get("mlp_bias"):
        raise ValueError(f"{source}: mlp_bias true is not supported")
    if family != "qwen2" and config.get("attention_bias"):
        raise ValueError(f"{source}: attention_bias true is only supported for Qwen2")
    missing = [k for k in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                           "vocab_size") if k not in config]
    if missing:
        raise ValueError(f"{source}: missing field(s) {missing}")
    theta, scaling = _rope(config, source)
    heads = config["num_attention_heads"]
    return ModelConfig(
        family=family, num_layers=config["num_hidden_layers"], hidden_size=config["hidden_size"],
        ffn_hidden_size=config["intermediate_size"], num_attention_heads=heads,
        num_kv_heads=config.get("num_key_value_heads") or heads, head_dim=config.get("head_dim"),
        vocab_size=config["vocab_size"], max_position_embeddings=config.get("max_position_embeddings", 4096),
        rope_theta=theta, rope_scaling=scaling, rms_norm_eps=config.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
    )


def read_json(path: Path) -> Any:
    """The JSON value stored in ``path``; a file that is not UTF-8 or not JSON is a ValueError
    naming it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text (byte {err.start})") from None
    except ValueError as err:  # JSONDecodeError, or an integer over Python's digit limit
        raise ValueError(f"{path}: not valid JSON ({err})") from None


def read_hf_config(hf_dir: Path) -> dict[str, Any]:
    """The ``config.json`` of an HF checkpoint directory; missing or malformed is an error naming it."""
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no config.json in the Hugging Face checkpoint directory")
    config = read_json(path)
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object, got a {type(config).__name__}")
    return config


def hf_config_from_model_config(cfg: ModelConfig):
    """The transformers config object for ``cfg`` (fp32, eval settings)."""
    import transformers

    common = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_kv_heads, max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=cfg.tie_word_embeddings,
        rope_theta=cfg.rope_theta, attention_dropout=0.0,
    )
    if cfg.family == "llama":
        extra: dict[str, Any] = {"head_dim": cfg.kv_channels, "attention_bias": False, "mlp_bias": False}
        if cfg.rope_scaling is not None:
            s = cfg.rope_scaling
            extra["rope_scaling"] = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                                     "high_freq_factor": s.high_freq_factor,
                                     "original_max_position_embeddings": s.original_max_position_embeddings}
        return transformers.LlamaConfig(**common, **extra, architectures=["LlamaForCausalLM"])
    if cfg.family == "qwen2":
        return transformers.Qwen2Config(**common, use_sliding_window=False, architectures=["Qwen2ForCausalLM"])
    return transformers.Qwen3Config(**common, head_dim=cfg.kv_channels, attention_bias=False,
                                    use_sliding_window=False, architectures=["Qwen3ForCausalLM"])
