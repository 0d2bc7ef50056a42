"""Tiny Hugging Face models built from configs (no download), matching a ModelConfig."""

from __future__ import annotations

import torch

from ebpo_megatron.conversion.hf_config import hf_config_from_model_config
from ebpo_megatron.models import ModelConfig


def hf_model(cfg: ModelConfig, state: dict[str, torch.Tensor] | None = None):
    """The transformers model for ``cfg`` in fp32 eval mode, with ``state`` loaded strictly."""
    import transformers

    config = hf_config_from_model_config(cfg)
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
