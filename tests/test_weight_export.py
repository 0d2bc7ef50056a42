"""Exact weight export in Hugging Face names: for Llama, Qwen2 and Qwen3 tiny configs with
TP = 1, 2 and PP = 1, 2, the exported tensors loaded into the matching `transformers` model
give the Megatron model's logits (fp32, 1e-4); peak extra memory of the export stays within
one bucket plus the largest tensor."""

from __future__ import annotations

import pytest
import torch

from ebpo_megatron.models import ModelConfig, RopeScaling
from megatron_forward import megatron_logits
from mp_utils import run_ranks

FAMILIES = {
    "llama": dict(family="llama", rope_theta=500000.0,
                  rope_scaling=RopeScaling(factor=8.0, original_max_position_embeddings=32)),
    "qwen2": dict(family="qwen2", rope_theta=1000000.0, tie_word_embeddings=True),
    "qwen3": dict(family="qwen3", head_dim=24, rope_theta=1000000.0),
}


def tiny(family: str) -> ModelConfig:
    return ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
                       num_kv_heads=2, vocab_size=100, max_position_embeddings=64, **FAMILIES[family])


def _export(rank, world, tp, pp, bucket_mb):
    from megatron.core import parallel_state

    from ebpo_megatron.models import build_policy
    from ebpo_megatron.models.hf_mapping import Layout
    from ebpo_megatron.parallel import ParallelConfig, cpu_compat, initialize
    from ebpo_megatron.rollout.weight_export import export_hf_weights

    parallel = ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp)
    out = {}
    for index, family in enumerate(FAMILIES):
        cfg = tiny(family)
        if index == 0:
            initialize(parallel, cfg)
        cpu_compat.set_seed(11 + index)
        chunks = build_policy(cfg, parallel)
        with torch.no_grad():  # perturb norms/biases so a swapped mapping shows up
            for name, param in chunks[0].named_parameters():
                if "norm" in name or name.endswith("bias"):
                    param.add_(0.3 * torch.randn_like(param))
        tokens = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(5))
        logits = megatron_logits(chunks, tokens, cfg.vocab_size)
        exported = {}
        for name, tensor in export_hf_weights(chunks, Layout.from_model_config(cfg), bucket_mb=bucket_mb):
            assert name not in exported, name
            exported[name] = tensor.clone()
        out[family] = {"logits": logits, "weights": exported if rank == 0 else None,
                       "last_stage": parallel_state.is_pipeline_last_stage(), "tp_rank0":
                       parallel_state.get_tensor_model_parallel_rank() == 0}
    return out


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2), (2, 2)], ids=["TP1", "TP2", "PP2", "TP2xPP2"])
def test_exported_weights_reproduce_megatron_logits_in_transformers(tp, pp):
    pytest.importorskip("transformers")
    from hf_reference import hf_model

    results = run_ranks(_export, tp * pp, tp, pp, 0.01)
    for family in FAMILIES:
        cfg = tiny(family)
        weights = results[0][family]["weights"]
        logits = next(r[family]["logits"] for r in results if r[family]["last_stage"] and r[family]["tp_rank0"])
        model = hf_model(cfg, weights)
        tokens = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            ref = model(tokens).logits
        assert logits.abs().max() > 0.1
        assert torch.allclose(logits, ref, atol=1e-4), (family, float((logits - ref).abs().max()))


def test_buckets_hold_at_most_the_limit_or_one_larger_tensor():
    from ebpo_megatron.rollout.buckets import iter_buckets

    sizes = [10, 300, 40, 40, 40, 1000, 5, 5]  # float32 elements
    tensors = [(f"t{i}", torch.zeros(n)) for i, n in enumerate(sizes)]
    limit = 400  # bytes = 100 elements
    buckets = list(iter_buckets(iter(tensors), limit, one_dtype=True))
    assert [name for b in buckets for name, _ in b] == [name for name, _ in tensors]
    largest = max(sizes) * 4
    for bucket in buckets:
        nbytes = sum(t.numel() * 4 for _, t in bucket)
        assert nbytes <= limit or len(bucket) == 1
        assert nbytes <= limit + largest
    mixed = [("a", torch.zeros(2)), ("b", torch.zeros(2, dtype=torch.float64))]
    assert len(list(iter_buckets(iter(mixed), 10_000, one_dtype=True))) == 2  # one dtype per flat bucket
