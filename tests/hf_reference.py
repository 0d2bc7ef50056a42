"""Tiny Hugging Face models built from configs (no download), matching a ModelConfig."""

from __future__ import annotations

import torch

from ebpo_megatron.models import ModelConfig


def hf_config(cfg: ModelConfig):
    import transformers

    common = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_kv_heads, max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=cfg.tie_word_embeddings,
        rope_theta=cfg.rope_theta, attention_dropout=0.0,
    )
    if cfg.family == "llama":
        extra = {"head_dim": cfg.kv_channels, "attention_bias": False, "mlp_bias": False}
        if cfg.rope_scaling is not None:
            s = cfg.rope_scaling
            extra["rope_scaling"] = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                                     "high_freq_factor": s.high_freq_factor,
                                     "original_max_position_embeddings": s.original_max_position_embeddings}
        return transformers.LlamaConfig(**common, **extra)
    if cfg.family == "qwen2":
        return transformers.Qwen2Config(**common, use_sliding_window=False)
    return transformers.Qwen3Config(**common, head_dim=cfg.kv_channels, attention_bias=False, use_sliding_window=False)


def hf_model(cfg: ModelConfig, state: dict[str, torch.Tensor] | None = None):
    """The transformers model for ``cfg`` in fp32 eval mode, with ``state`` loaded strictly."""
    import transformers

    config = hf_config(cfg)
    cls = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM,
           "qwen3": transformers.Qwen3ForCausalLM}[cfg.family]
    torch.manual_seed(0)
    model = cls(config).float().eval()
    if state is not None:
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [m for m in missing if not (cfg.tie_word_embeddings and m == "lm_head.weight")]
        assert not missing and not unexpected, (missing, unexpected)
        if cfg.tie_word_embeddings:
            model.tie_weights()
    return model
