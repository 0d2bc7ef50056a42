"""The built GPTModel's forward (TP=1, fp32) and every parameter's gradient equal a forward
written with plain torch ops in float64 for the same weights, and its autograd gradients: embedding, RMSNorm, RoPE with Llama-3 scaling, GQA attention with
a causal mask, QKV bias (qwen2), QK-norm (qwen3), SwiGLU, tied/untied head; for each family.
Also ModelConfig parsing, layout validation, vocabulary padding and the missing-extra errors;
GPU-only checks (Transformer Engine, FP8) skip with a reason without CUDA."""

from __future__ import annotations

import math

import pytest
import torch
from mp_utils import run_ranks

from ebpo_megatron.models import ModelConfig, RopeScaling
from ebpo_megatron.parallel import ParallelConfig, padded_vocab_size, validate_layout

FAMILIES = {
    # Llama 3.1's scaling (Megatron's built-in 1 / 4 / 8192)
    "llama": dict(family="llama", rope_scaling=RopeScaling(factor=8.0), rope_theta=500000.0),
    # other frequency factors and context length: the builder re-derives the frequencies
    "llama_custom": dict(family="llama", rope_theta=500000.0, rope_scaling=RopeScaling(
        factor=4.0, low_freq_factor=1.0, high_freq_factor=2.0, original_max_position_embeddings=64)),
    "qwen2": dict(family="qwen2", rope_theta=1000000.0, tie_word_embeddings=True),
    "qwen3": dict(family="qwen3", head_dim=24, rope_theta=1000000.0),
}
SEQ = 48


def tiny(family: str) -> ModelConfig:
    return ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
                       num_kv_heads=2, vocab_size=100, max_position_embeddings=64, **FAMILIES[family])


# ---------------------------------------------------------------- plain-torch reference (float64)
def rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """ω_i = θ^(−2i/d), then the Llama-3 rule written element by element."""
    d = cfg.kv_channels
    inv = 1.0 / cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    s = cfg.rope_scaling
    if s is None:
        return inv
    out = []
    for f in inv.tolist():
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


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on [b, s, n, d] with non-interleaved halves (x1, x2) -> (x1 cos − x2 sin, x2 cos + x1 sin)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def reference_forward(p: dict[str, torch.Tensor], cfg: ModelConfig, tokens: torch.Tensor) -> torch.Tensor:
    """Logits [b, s, V_pad] from Megatron-named full weights, plain torch ops."""
    eps, d, nq, nkv = cfg.rms_norm_eps, cfg.kv_channels, cfg.num_attention_heads, cfg.num_kv_heads
    b, s = tokens.shape
    h = p["embedding.word_embeddings.weight"][tokens]
    angles = torch.arange(s, dtype=torch.float64)[:, None] * rope_inv_freq(cfg)[None]
    cos = torch.cat([angles.cos(), angles.cos()], -1)[None, :, None, :]
    sin = torch.cat([angles.sin(), angles.sin()], -1)[None, :, None, :]
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    group = nq // nkv
    for i in range(cfg.num_layers):
        L = f"decoder.layers.{i}."
        x = rms(h, p[L + "input_layernorm.weight"], eps)
        qkv = x @ p[L + "self_attention.linear_qkv.weight"].T
        if cfg.qkv_bias:
            qkv = qkv + p[L + "self_attention.linear_qkv.bias"]
        # Megatron's fused layout: per KV head g, [q heads of group g, k_g, v_g]
        blocks = qkv.view(b, s, nkv, (group + 2) * d)
        q = blocks[..., : group * d].reshape(b, s, nq, d)
        k = blocks[..., group * d:(group + 1) * d]
        v = blocks[..., (group + 1) * d:]
        if cfg.qk_norm:
            q = rms(q, p[L + "self_attention.q_layernorm.weight"], eps)
            k = rms(k, p[L + "self_attention.k_layernorm.weight"], eps)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        k = k.repeat_interleave(group, dim=2)  # query head j reads KV head j // group
        v = v.repeat_interleave(group, dim=2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d)
        attn = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        o = torch.einsum("bhqk,bkhd->bqhd", attn, v).reshape(b, s, nq * d)
        h = h + o @ p[L + "self_attention.linear_proj.weight"].T
        x = rms(h, p[L + "pre_mlp_layernorm.weight"], eps)
        gate, up = p[L + "mlp.linear_fc1.weight"].chunk(2, 0)  # fc1 = [gate; up]
        h = h + (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ p[L + "mlp.linear_fc2.weight"].T
    h = rms(h, p["decoder.final_layernorm.weight"], eps)
    head = p["embedding.word_embeddings.weight"] if cfg.tie_word_embeddings else p["output_layer.weight"]
    return h @ head.T


# ---------------------------------------------------------------- forward equality
def _compare_families(rank: int, world: int) -> dict[str, dict[str, float]]:
    from ebpo_megatron.models import build_policy
    from ebpo_megatron.parallel import cpu_compat, initialize

    out = {}
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
        names = {n for n, _ in model.named_parameters()}
        tokens = torch.randint(0, cfg.vocab_size, (2, SEQ))
        logits = model(tokens, torch.arange(SEQ).expand(2, SEQ), None)
        # gradients of one scalar of the logits through both models
        probe = torch.randn(logits.shape, dtype=torch.float64)
        (logits.double() * probe).sum().backward()
        logits = logits.detach().double()
        params = {n: t.detach().double().requires_grad_() for n, t in model.named_parameters()}
        ref = reference_forward(params, cfg, tokens)
        (ref * probe).sum().backward()
        ref = ref.detach()
        grad_diff = max(float((t.grad.double() - params[n].grad).abs().max() / params[n].grad.abs().max())
                        for n, t in model.named_parameters())
        tail = model(tokens, torch.arange(SEQ).expand(2, SEQ), None, logits_from=SEQ - 5).double()
        no_scaling = reference_forward(params, ModelConfig(**{**vars(cfg), "rope_scaling": None}), tokens)
        out[family] = {
            "diff": float((logits - ref).abs().max()), "scale": float(ref.abs().max()),
            "tail_shape": tuple(tail.shape[:2]), "tail_diff": float((tail - ref[:, SEQ - 5:]).abs().max()),
            "scaling_effect": float((no_scaling - ref).abs().max()),
            "inv_freq_diff": float((model.rotary_pos_emb.inv_freq.double() - rope_inv_freq(cfg)).abs().max()
                                   / rope_inv_freq(cfg).abs().max()),
            "grad_diff": grad_diff,
            "vocab": logits.shape[-1], "has_bias": "decoder.layers.0.self_attention.linear_qkv.bias" in names,
            "has_qk_norm": "decoder.layers.0.self_attention.q_layernorm.weight" in names,
            "has_output_layer": "output_layer.weight" in names,
        }
    return out


def test_forward_matches_plain_torch_reference_for_each_family() -> None:
    results = run_ranks(_compare_families, 1)[0]
    for family, r in results.items():
        assert r["scale"] > 0.1, (family, r)
        assert r["diff"] < 1e-5, (family, r)
        assert r["grad_diff"] < 1e-5, (family, r)  # every parameter's gradient, relative to its largest
        assert r["tail_shape"] == (2, 5) and r["tail_diff"] < 1e-5, (family, r)  # logits_from
        assert r["inv_freq_diff"] < 1e-6, (family, r)
        assert r["vocab"] == 128  # 100 padded to a multiple of 128
    # the scaling shows in the logits beyond the tolerance (Llama 3.1's touches only frequencies
    # with wavelengths > 2048 positions, hence the small effect over 48 positions)
    assert results["llama"]["scaling_effect"] > 3e-5 and results["llama_custom"]["scaling_effect"] > 1e-3
    assert results["qwen2"]["has_bias"] and not results["llama"]["has_bias"]
    assert results["qwen3"]["has_qk_norm"] and not results["qwen2"]["has_qk_norm"]
    assert not results["qwen2"]["has_output_layer"] and results["llama"]["has_output_layer"]  # tied vs untied


# ---------------------------------------------------------------- configuration
def test_model_config_from_dict_rejects_unknown_keys_and_parses_rope_scaling() -> None:
    cfg = ModelConfig.from_dict({"family": "qwen2", "rope_scaling": {"rope_type": "llama3", "factor": 32.0},
                                 "recompute": "none"})
    assert cfg.qkv_bias is True and cfg.qk_norm is False and cfg.recompute is None
    assert cfg.rope_scaling == RopeScaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                           original_max_position_embeddings=8192)
    assert ModelConfig(family="qwen3").qk_norm is True and ModelConfig(family="qwen3", qk_norm=False).qk_norm is False
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['hiden_size', 'num_heads'\]"):
        ModelConfig.from_dict({"hiden_size": 64, "num_heads": 4})
    with pytest.raises(ValueError, match=r"RopeScaling: unknown key\(s\) \['low_freq'\]"):
        ModelConfig.from_dict({"rope_scaling": {"low_freq": 1.0}})
    with pytest.raises(ValueError, match="only rope_type 'llama3'"):
        RopeScaling.from_dict({"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ValueError, match=r"ModelConfig.family: got 'gpt2', expected one of \['llama', 'qwen2', 'qwen3'\]"):
        ModelConfig(family="gpt2")
    with pytest.raises(ValueError, match="recompute: got 'partial'"):
        ModelConfig(recompute="partial")
    with pytest.raises(ValueError, match="num_attention_heads 6 is not a multiple of num_kv_heads 4"):
        ModelConfig(num_attention_heads=6, num_kv_heads=4, hidden_size=96)
    with pytest.raises(ValueError, match="fp8"):
        ModelConfig(precision="fp8")  # fp8 needs the Transformer Engine implementation


def test_layout_validation_names_the_number_and_the_rule() -> None:
    cfg = tiny("llama")
    with pytest.raises(ValueError, match=r"world size 6 is not divisible by tensor_parallel × pipeline_parallel = 4×1 = 4"):
        validate_layout(6, ParallelConfig(tensor_parallel=4), cfg)
    with pytest.raises(ValueError, match="num_kv_heads 2 is not divisible by tensor_parallel 4"):
        validate_layout(4, ParallelConfig(tensor_parallel=4), ModelConfig(num_attention_heads=4, num_kv_heads=2))
    with pytest.raises(ValueError, match="num_attention_heads 4 is not divisible by tensor_parallel 8"):
        validate_layout(8, ParallelConfig(tensor_parallel=8), cfg)
    with pytest.raises(ValueError, match="num_layers 2 is not divisible by pipeline_parallel × virtual_pipeline = 4"):
        validate_layout(4, ParallelConfig(pipeline_parallel=4), cfg)
    with pytest.raises(ValueError, match="num_layers 2 is not divisible by pipeline_parallel × virtual_pipeline = 4"):
        validate_layout(4, ParallelConfig(pipeline_parallel=2, virtual_pipeline=2), cfg)
    with pytest.raises(ValueError, match="virtual_pipeline 2 needs pipeline_parallel > 1"):
        validate_layout(4, ParallelConfig(virtual_pipeline=2), ModelConfig(num_layers=4))
    with pytest.raises(ValueError, match="sequence_parallel needs transformer_impl 'transformer_engine'"):
        validate_layout(2, ParallelConfig(tensor_parallel=2, sequence_parallel=True), cfg)
    assert validate_layout(8, ParallelConfig(tensor_parallel=2, pipeline_parallel=2), cfg) == 2
    assert validate_layout(3, ParallelConfig(), cfg) == 3


def test_padded_vocab_size_rule() -> None:
    # V_pad = ceil(V / lcm(128, TP)) * lcm(128, TP)
    assert padded_vocab_size(100, 1) == 128 and padded_vocab_size(100, 2) == 128
    assert padded_vocab_size(128, 4) == 128 and padded_vocab_size(129, 4) == 256
    assert padded_vocab_size(128256, 8) == 128256 and padded_vocab_size(128257, 8) == 128384  # Llama 3
    assert padded_vocab_size(151936, 8) == 151936  # Qwen2.5: already a multiple of 128
    assert padded_vocab_size(100, 3) == 384 and padded_vocab_size(49152, 3) == 49152  # lcm(128, 3) = 384
    assert padded_vocab_size(100, 2, multiple=1) == 100 and padded_vocab_size(101, 2, multiple=1) == 102
    for vocab, tp in ((1000, 1), (1000, 2), (1000, 4), (32001, 8), (7, 3)):
        padded = padded_vocab_size(vocab, tp)
        assert padded >= vocab and padded % tp == 0 and padded - vocab < math.lcm(128, tp)
    with pytest.raises(ValueError, match="positive"):
        padded_vocab_size(0, 1)


def _te_importable() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(_te_importable(), reason="transformer_engine is importable: the missing-extra path cannot be exercised")
def test_transformer_engine_and_fp8_name_the_missing_gpu_extra() -> None:
    from ebpo_megatron.models import build_policy, fp8_recipe, transformer_config

    extra = r"pip install 'ebpo_megatron\[gpu\]'"
    with pytest.raises(RuntimeError, match=r"transformer_impl 'transformer_engine' needs .*" + extra):
        build_policy(ModelConfig(transformer_impl="transformer_engine"), ParallelConfig())
    fp8 = ModelConfig(transformer_impl="transformer_engine", precision="fp8", fp8_recipe="current")
    with pytest.raises(RuntimeError, match=extra):
        transformer_config(fp8, ParallelConfig())
    with pytest.raises(RuntimeError, match=extra):
        fp8_recipe(fp8)
    with pytest.raises(ValueError, match="not 'fp8'"):
        fp8_recipe(ModelConfig())


# ---------------------------------------------------------------- GPU only
needs_cuda_and_te = pytest.mark.skipif(
    not (torch.cuda.is_available() and _te_importable()),
    reason=f"needs a CUDA GPU (available: {torch.cuda.is_available()}) and Transformer Engine "
           f"(importable: {_te_importable()}): pip install 'ebpo_megatron[gpu]'",
)


@pytest.mark.parametrize("recipe, class_name", [("delayed", "DelayedScaling"), ("current", "Float8CurrentScaling")])
@needs_cuda_and_te
def test_fp8_recipe_is_the_transformer_engine_recipe(recipe: str, class_name: str) -> None:
    from ebpo_megatron.models import fp8_recipe

    built = fp8_recipe(ModelConfig(transformer_impl="transformer_engine", precision="fp8", fp8_recipe=recipe))
    assert class_name in [c.__name__ for c in type(built).__mro__]


def _te_forward(rank: int, world: int) -> tuple[float, float]:
    from ebpo_megatron.models import build_policy
    from ebpo_megatron.parallel import cpu_compat, initialize

    cfg = ModelConfig(**{**vars(tiny("qwen3")), "transformer_impl": "transformer_engine"})
    initialize(ParallelConfig(), cfg)
    cpu_compat.set_seed(0)
    model = build_policy(cfg, ParallelConfig())[0].cuda()
    fused = {"self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
             "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight"}
    params = {}
    for name, tensor in model.named_parameters():
        for te_name, local_name in fused.items():
            name = name.replace(te_name, local_name)
        params[name] = tensor.detach().double().cpu()
    tokens = torch.randint(0, cfg.vocab_size, (2, SEQ))
    with torch.no_grad():
        logits = model(tokens.cuda(), torch.arange(SEQ).expand(2, SEQ).cuda(), None).double().cpu()
    ref = reference_forward(params, cfg, tokens)
    return float((logits - ref).abs().max()), float(ref.abs().max())


@needs_cuda_and_te
def test_transformer_engine_forward_matches_plain_torch_reference() -> None:
    diff, scale = run_ranks(_te_forward, 1)[0]
    assert diff < 1e-3 * max(scale, 1.0)
