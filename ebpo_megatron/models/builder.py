"""Build Megatron-Core GPTModel chunks from a ModelConfig and a ParallelConfig.

Local spec (``transformer_impl: local``; on CPU its core attention is SDPA, see
``parallel.cpu_compat``) or Transformer Engine spec; fp32 / bf16 / fp8 (a TE recipe: delayed
or current scaling). TE and FP8 need the ``gpu`` extra; asking for them without it is a clear
error naming the extra.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..parallel import cpu_compat
from ..parallel.distributed import ParallelConfig, padded_vocab_size
from .config import ModelConfig

GPU_EXTRA = "pip install 'ebpo_megatron[gpu]' (Transformer Engine; needs CUDA)"


def _require_transformer_engine(why: str) -> None:
    try:
        import transformer_engine  # noqa: F401
    except ImportError as err:
        raise RuntimeError(f"{why} needs Transformer Engine, which is not installed: {GPU_EXTRA}") from err
    if not torch.cuda.is_available():
        raise RuntimeError(f"{why} needs a CUDA GPU (Transformer Engine kernels), none is available")


def transformer_config(model: ModelConfig, parallel: ParallelConfig):
    """Megatron TransformerConfig for the architecture and the precision."""
    from megatron.core.transformer import TransformerConfig

    if model.transformer_impl == "transformer_engine":
        _require_transformer_engine("transformer_impl 'transformer_engine'")
    if model.precision == "fp8":
        _require_transformer_engine("precision 'fp8'")
    bf16 = model.precision in ("bf16", "fp8")
    recompute = {} if model.recompute == "none" else (
        {"recompute_granularity": "selective"} if model.recompute == "selective" else
        {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1})
    fp8 = {} if model.precision != "fp8" else {
        "fp8": "hybrid", "fp8_recipe": "delayed" if model.fp8_recipe == "delayed" else "tensorwise"}
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_kv_heads,
        kv_channels=model.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=model.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=bool(model.qkv_bias),
        qk_layernorm=bool(model.qk_norm),
        attention_dropout=0.0,
        hidden_dropout=0.0,
        init_method_std=model.init_std,
        tensor_model_parallel_size=parallel.tensor_parallel,
        pipeline_model_parallel_size=parallel.pipeline_parallel,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline,
        sequence_parallel=parallel.sequence_parallel,
        use_cpu_initialization=not torch.cuda.is_available(),
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        bf16=bf16,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        **recompute,
        **fp8,
    )


def layer_spec(model: ModelConfig):
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    if model.transformer_impl == "transformer_engine":
        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=bool(model.qk_norm))
    spec = get_gpt_layer_local_spec(qk_layernorm=bool(model.qk_norm), normalization="RMSNorm")
    return cpu_compat.adapt_layer_spec(spec)


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling) -> torch.Tensor:
    """HF's ``rope_type: llama3`` frequency scaling (transformers/modeling_rope_utils.py)."""
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def build_policy(model: ModelConfig, parallel: ParallelConfig) -> list[torch.nn.Module]:
    """GPTModel chunks of this rank (one per virtual pipeline stage). Needs Megatron's parallel
    state (``parallel.initialize``)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    cpu_compat.enable()
    config = transformer_config(model, parallel)
    spec = layer_spec(model)
    vocab = padded_vocab_size(model.vocab_size, parallel.tensor_parallel, parallel.vocab_multiple)
    chunks = []
    for vp_stage in range(parallel.virtual_pipeline or 1):
        vp = vp_stage if parallel.virtual_pipeline else None
        chunk = GPTModel(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=vocab,
            max_sequence_length=model.max_position_embeddings,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp),
            share_embeddings_and_output_weights=model.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_base=int(model.rope_theta),
            vp_stage=vp,
        )
        if model.rope_scaling is not None:
            rope = chunk.rotary_pos_emb
            dim = rope.inv_freq.shape[0] * 2
            base = 1.0 / (model.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
            rope.inv_freq = _llama3_inv_freq(base, model.rope_scaling).to(rope.inv_freq.device)
        chunk.real_vocab_size = model.vocab_size  # logits beyond it are padding
        chunks.append(chunk)
    return chunks
