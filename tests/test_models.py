"""The built GPTModel's forward equals a forward written with plain torch ops for the same
weights (RMSNorm, RoPE with Llama-3 scaling, GQA, QKV bias, QK-norm, SwiGLU, tied/untied head),
for each architecture family; layout validation and missing-extra errors."""

from __future__ import annotations

import math

import pytest
import torch

from ebpo_megatron.models import ModelConfig, RopeScaling
from ebpo_megatron.parallel import ParallelConfig, padded_vocab_size, validate_layout
from mp_utils import run_ranks

FAMILIES = {
    "llama": dict(family="llama", rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                                            original_max_position_embeddings=32),
                  rope_theta=500000.0),
    "qwen2": dict(family="qwen2", rope_theta=1000000.0, tie_word_embeddings=True),
    "qwen3": dict(family="qwen3", head_dim=24, rope_theta=1000000.0),
}


def tiny(family: str) -> ModelConfig:
    return ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
                       num_kv_heads=2, vocab_size=100, max_position_embeddings=64, **FAMILIES[family])


def rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    d = cfg.kv_channels
    inv = 1.0 / cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    s = cfg.rope_scaling
    if s is None:
        return inv
    out = []
    for f in inv.tolist():  # Llama-3 rule, written element by element
        wavelen = 2 * math.pi / f
        if wavelen < s.original_max_position_embeddings / s.high_freq_factor:
            out.append(f)
        elif wavelen > s.original_max_position_embeddings / s.low_freq_factor:
            out.append(f / s.factor)
        else:
            smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
                s.high_freq_factor - s.low_freq_factor)
            out.append((1 - smooth) * f / s.factor + smooth * f)
    return torch.tensor(out, dtype=torch.float64)


def rotate(x, cos, sin):  # x [b, s, n, d], non-interleaved halves
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def reference_forward(p: dict[str, torch.Tensor], cfg: ModelConfig, tokens: torch.Tensor) -> torch.Tensor:
    """Plain torch, float64, from Megatron-named full weights."""
    eps, d, nq, nkv = cfg.rms_norm_eps, cfg.kv_channels, cfg.num_attention_heads, cfg.num_kv_heads
    b, s = tokens.shape
    h = p["embedding.word_embeddings.weight"][tokens]
    angles = torch.arange(s, dtype=torch.float64)[:, None] * rope_inv_freq(cfg)[None]
    cos = torch.cat([angles.cos(), angles.cos()], -1)[None, :, None, :]
    sin = torch.cat([angles.sin(), angles.sin()], -1)[None, :, None, :]
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    for i in range(cfg.num_layers):
        L = f"decoder.layers.{i}."
        x = rms(h, p[L + "input_layernorm.weight"], eps)
        qkv = x @ p[L + "self_attention.linear_qkv.weight"].T
        if cfg.qkv_bias:
            qkv = qkv + p[L + "self_attention.linear_qkv.bias"]
        per_group = (nq // nkv + 2) * d
        q, k, v = [], [], []
        for g in range(nkv):  # Megatron groups [q heads of the group, k, v] per KV head
            block = qkv[..., g * per_group:(g + 1) * per_group]
            q.append(block[..., : (nq // nkv) * d])
            k.append(block[..., (nq // nkv) * d:(nq // nkv + 1) * d])
            v.append(block[..., (nq // nkv + 1) * d:])
        q = torch.cat(q, -1).view(b, s, nq, d)
        k = torch.cat(k, -1).view(b, s, nkv, d)
        v = torch.cat(v, -1).view(b, s, nkv, d)
        if cfg.qk_norm:
            q = rms(q, p[L + "self_attention.q_layernorm.weight"], eps)
            k = rms(k, p[L + "self_attention.k_layernorm.weight"], eps)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        k = k.repeat_interleave(nq // nkv, dim=2)
        v = v.repeat_interleave(nq // nkv, dim=2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d)
        attn = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        o = torch.einsum("bhqk,bkhd->bqhd", attn, v).reshape(b, s, nq * d)
        h = h + o @ p[L + "self_attention.linear_proj.weight"].T
        x = rms(h, p[L + "pre_mlp_layernorm.weight"], eps)
        gate, up = p[L + "mlp.linear_fc1.weight"].chunk(2, 0)
        h = h + (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ p[L + "mlp.linear_fc2.weight"].T
    h = rms(h, p["decoder.final_layernorm.weight"], eps)
    head = p["embedding.word_embeddings.weight"] if cfg.tie_word_embeddings else p["output_layer.weight"]
    return h @ head.T


def _compare_families(rank: int, world: int) -> dict[str, float]:
    from ebpo_megatron.models import build_policy
    from ebpo_megatron.parallel import cpu_compat, initialize

    diffs = {}
    for index, family in enumerate(FAMILIES):
        cfg = tiny(family)
        if index == 0:
            initialize(ParallelConfig(), cfg)
        cpu_compat.set_seed(index)
        model = build_policy(cfg, ParallelConfig())[0]
        with torch.no_grad():  # norms and biases away from their init values, so wiring shows
            for name, param in model.named_parameters():
                if "norm" in name or name.endswith("bias"):
                    param.copy_(1.0 + 0.5 * torch.randn_like(param))
        tokens = torch.randint(0, cfg.vocab_size, (3, 11))
        logits = model(tokens, torch.arange(11).expand(3, 11), None).double()
        params = {n: t.detach().double() for n, t in model.named_parameters()}
        ref = reference_forward(params, cfg, tokens)
        diffs[family] = float((logits - ref).abs().max())
        diffs[family + "_scale"] = float(ref.abs().max())
    return diffs


def test_forward_matches_plain_torch_reference_for_each_family():
    diffs = run_ranks(_compare_families, 1)[0]
    for family in FAMILIES:
        assert diffs[family + "_scale"] > 0.1
        assert diffs[family] < 1e-5, (family, diffs)


def test_layout_validation_names_the_number_and_the_rule():
    cfg = tiny("llama")
    with pytest.raises(ValueError, match=r"world size 6 is not divisible by tensor_parallel × pipeline_parallel = 4×1"):
        validate_layout(6, ParallelConfig(tensor_parallel=4), cfg)
    with pytest.raises(ValueError, match="num_kv_heads 2 is not divisible by tensor_parallel 4"):
        validate_layout(4, ParallelConfig(tensor_parallel=4), ModelConfig(num_attention_heads=4, num_kv_heads=2))
    with pytest.raises(ValueError, match="num_attention_heads 4 is not divisible by tensor_parallel 8"):
        validate_layout(8, ParallelConfig(tensor_parallel=8), cfg)
    with pytest.raises(ValueError, match="num_layers 2 is not divisible by pipeline_parallel"):
        validate_layout(4, ParallelConfig(pipeline_parallel=4), cfg)
    assert validate_layout(8, ParallelConfig(tensor_parallel=2, pipeline_parallel=2), cfg) == 2
    assert padded_vocab_size(100, 2) == 128 and padded_vocab_size(49152, 1) == 49152
    assert padded_vocab_size(128257, 8) == 128384 and padded_vocab_size(49152, 3) == 49152
    assert padded_vocab_size(100, 3) == 384  # lcm(128, 3)


def test_fp8_and_transformer_engine_name_the_missing_extra():
    pytest.importorskip("megatron.core")
    try:
        import transformer_engine  # noqa: F401
        pytest.skip("transformer_engine is installed: the error path cannot be exercised here")
    except ImportError:
        pass
    from ebpo_megatron.models import transformer_config

    with pytest.raises(RuntimeError, match=r"ebpo_megatron\[gpu\]"):
        transformer_config(ModelConfig(transformer_impl="transformer_engine"), ParallelConfig())
    with pytest.raises(RuntimeError, match=r"ebpo_megatron\[gpu\]"):
        transformer_config(ModelConfig(transformer_impl="transformer_engine", precision="fp8"), ParallelConfig())
    with pytest.raises(ValueError, match="fp8"):
        ModelConfig(precision="fp8")  # fp8 needs the TE implementation
