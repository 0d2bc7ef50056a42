"""Build Megatron-Core ``GPTModel`` chunks from a :class:`ModelConfig` and a ``ParallelConfig``.

Layer spec: ``get_gpt_layer_local_spec`` (RMSNorm, ``qk_layernorm`` for QK-norm; linear layers
with a direct forward when autograd is off, see ``models.no_grad_linear``; without CUDA its core
attention is SDPA, see ``parallel.cpu_compat``) or the Transformer Engine spec. Precision
fp32 / bf16 / fp8; for fp8 Megatron builds the TE recipe from ``TransformerConfig.fp8_recipe``
("delayed" -> ``DelayedScaling``, "tensorwise" -> ``Float8CurrentScaling``), :func:`fp8_recipe`
returns the same object. Transformer Engine and FP8 need the ``gpu`` extra; asking for them
without it is an error naming the extra.

Llama-3 RoPE scaling uses Megatron's own ``GPTModel(rope_scaling=True, rope_scaling_factor=s)``.
Megatron-Core 0.16.1 forwards only the factor (gpt_model.py:166-167); low/high frequency factors
and the original context length are fixed at Llama 3.1's 1 / 4 / 8192 in
``RotaryEmbedding._apply_scaling`` (rotary_pos_embedding.py:92-98). Other values are applied by
calling that same function with them on the base frequencies.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..parallel import cpu_compat
from ..parallel.distributed import ParallelConfig, padded_vocab_size
from .config import ModelConfig, RopeScaling

GPU_EXTRA = "pip install 'ebpo_megatron[gpu]'"
_MEGATRON_LLAMA3_DEFAULTS = RopeScaling()  # what RotaryEmbedding._apply_scaling assumes


def _require_transformer_engine(why: str) -> None:
    try:
        import transformer_engine  # noqa: F401
    except ImportError as err:
        raise RuntimeError(
            f"{why} needs NVIDIA Transformer Engine, which is not importable here: install the "
            f"gpu extra, {GPU_EXTRA} (needs a CUDA machine), or use transformer_impl: local with "
            f"precision fp32/bf16"
        ) from err
    if not torch.cuda.is_available():
        raise RuntimeError(f"{why} needs a CUDA GPU for Transformer Engine's kernels; none is available")


def _recompute_kwargs(mode: str | None) -> dict[str, Any]:
    if mode is None:
        return {}
    if mode == "selective":  # core attention only
        return {"recompute_granularity": "selective"}
    return {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}


def transformer_config(model: ModelConfig, parallel: ParallelConfig):
    """Megatron ``TransformerConfig`` for the architecture, the layout and the precision."""
    from megatron.core.transformer import TransformerConfig

    if model.transformer_impl == "transformer_engine":
        _require_transformer_engine("transformer_impl 'transformer_engine'")
    if model.precision == "auto":
        raise ValueError("model.precision 'auto' is unresolved: resolve it first "
                         "(config.precision.resolve_precision; load_config does)")
    if model.precision == "fp8":
        _require_transformer_engine("precision 'fp8'")
    half = model.precision in ("bf16", "fp8")
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
        gated_linear_unit=True,  # SwiGLU: fc1 = [gate; up], silu(gate) * up
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
        use_cpu_initialization=cpu_compat.use_cpu_initialization(),
        params_dtype=torch.bfloat16 if half else torch.float32,
        bf16=half,
        pipeline_dtype=torch.bfloat16 if half else torch.float32,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        **_recompute_kwargs(model.recompute),
        **fp8,
    )


def fp8_recipe(model: ModelConfig, parallel: ParallelConfig | None = None):
    """The Transformer Engine FP8 recipe Megatron uses for ``model`` (built lazily, needs the
    gpu extra): ``DelayedScaling`` for fp8_recipe "delayed", ``Float8CurrentScaling`` for
    "current"."""
    if model.precision != "fp8":
        raise ValueError(f"fp8_recipe: model precision is {model.precision!r}, not 'fp8'")
    config = transformer_config(model, parallel or ParallelConfig())  # raises without TE
    from megatron.core.fp8_utils import get_fp8_recipe

    return get_fp8_recipe(config)


def layer_spec(model: ModelConfig):
    """Transformer layer ``ModuleSpec``: Transformer Engine, or local with RMSNorm and linear layers
    that skip Megatron's autograd functions when autograd is off (``models.no_grad_linear``);
    self-attention caches rotated keys when generating (``models.rotated_key_cache``)."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    from .no_grad_linear import NoGradColumnParallelLinear, NoGradRowParallelLinear
    from .rotated_key_cache import RotatedKeyCacheAttention

    if model.transformer_impl == "transformer_engine":
        spec = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=bool(model.qk_norm))
    else:
        spec = cpu_compat.adapt_layer_spec(
            get_gpt_layer_local_spec(qk_layernorm=bool(model.qk_norm), normalization="RMSNorm"))
        attention, mlp = spec.submodules.self_attention.submodules, spec.submodules.mlp.submodules
        attention.linear_qkv = mlp.linear_fc1 = NoGradColumnParallelLinear
        attention.linear_proj = mlp.linear_fc2 = NoGradRowParallelLinear
    spec.submodules.self_attention.module = RotatedKeyCacheAttention
    return spec


def _norms_in_params_dtype(chunk: torch.nn.Module, dtype: torch.dtype) -> None:
    """Give the local spec's norm weights (``torch.nn.RMSNorm`` / ``LayerNorm``, which Megatron's
    ``WrappedTorchNorm`` builds in float32 whatever ``params_dtype`` says) the parameters' dtype,
    as Megatron's ``Float16Module`` does for a bf16 model on GPUs (``module.bfloat16()``) and as
    Transformer Engine builds its norms: a bf16 model on the CPU then holds the same rounded
    weights as on a GPU. The optimizer keeps float32 main copies of them, as of every bf16 weight.
    """
    for module in chunk.modules():
        if isinstance(module, (torch.nn.RMSNorm, torch.nn.LayerNorm)):
            module.to(dtype)


def _apply_rope_scaling(chunk: torch.nn.Module, model: ModelConfig) -> None:
    """Re-derive the scaled frequencies when the scaling differs from Megatron's fixed 1/4/8192."""
    scaling = model.rope_scaling
    fixed = _MEGATRON_LLAMA3_DEFAULTS
    if scaling is None or (scaling.low_freq_factor, scaling.high_freq_factor,
                           scaling.original_max_position_embeddings) == (
            fixed.low_freq_factor, fixed.high_freq_factor, fixed.original_max_position_embeddings):
        return
    rope = chunk.rotary_pos_emb
    dim = 2 * rope.inv_freq.shape[0]
    device = rope.inv_freq.device
    base = 1.0 / (model.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))
    rope.inv_freq = rope._apply_scaling(
        base, factor=scaling.factor, low_freq_factor=scaling.low_freq_factor,
        high_freq_factor=scaling.high_freq_factor,
        original_max_position_embeddings=scaling.original_max_position_embeddings,
    )


def build_policy(model: ModelConfig, parallel: ParallelConfig) -> list[torch.nn.Module]:
    """This rank's ``PolicyGPTModel`` chunks (one per virtual pipeline stage, else one).

    Needs Megatron's parallel state and patches (``parallel.initialize``). The output layer
    covers the padded vocabulary (``padded_vocab_size``); ``chunk.real_vocab_size`` is the real
    one, logits past it are padding.
    """
    from megatron.core import parallel_state

    from .no_grad_linear import use_no_grad_output_layer
    from .policy_model import PolicyGPTModel
    from .swiglu_mlp import use_swiglu_mlp

    config = transformer_config(model, parallel)  # raises first if the gpu extra is missing
    spec = layer_spec(model)
    vocab = padded_vocab_size(model.vocab_size, parallel.tensor_parallel, parallel.vocab_multiple)
    chunks = []
    for vp_stage in range(parallel.virtual_pipeline or 1):
        vp = vp_stage if parallel.virtual_pipeline else None
        chunk = PolicyGPTModel(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=vocab,
            max_sequence_length=model.max_position_embeddings,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp),
            share_embeddings_and_output_weights=model.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_base=model.rope_theta,
            rope_scaling=model.rope_scaling is not None,
            rope_scaling_factor=model.rope_scaling.factor if model.rope_scaling else 8.0,
            vp_stage=vp,
        )
        _apply_rope_scaling(chunk, model)
        use_swiglu_mlp(chunk)  # the MLP's SwiGLU as one autograd function (models.swiglu_mlp)
        use_no_grad_output_layer(chunk)
        _norms_in_params_dtype(chunk, config.params_dtype)
        chunk.real_vocab_size = model.vocab_size
        chunks.append(chunk)
    return chunks
