"""GPU-only checks (Transformer Engine layers, FP8, bf16 throughput). They skip with a reason
on machines without CUDA or Transformer Engine, and run on a GPU machine with the `gpu` extra."""

from __future__ import annotations

import pytest
import torch

from ebpo_megatron.models import ModelConfig
from mp_utils import run_ranks

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _te_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


needs_te = pytest.mark.skipif(not _te_available(), reason="needs Transformer Engine (pip install 'ebpo_megatron[gpu]')")
CFG = dict(num_layers=2, hidden_size=256, ffn_hidden_size=512, num_attention_heads=8, num_kv_heads=4,
           vocab_size=1000, max_position_embeddings=128)


def _forward_pair(rank, world, impl, precision):
    """Same weights in the local spec (fp32) and in the requested implementation/precision."""
    from ebpo_megatron.models import build_policy
    from ebpo_megatron.models.weights import assign_full_weights, full_weights
    from ebpo_megatron.parallel import ParallelConfig, cpu_compat, initialize

    reference_cfg = ModelConfig(**CFG)
    initialize(ParallelConfig(), reference_cfg)
    cpu_compat.set_seed(0)
    reference = build_policy(reference_cfg, ParallelConfig())
    weights = full_weights(reference)
    other = build_policy(ModelConfig(**CFG, transformer_impl=impl, precision=precision), ParallelConfig())

    def lookup(name):  # TE fuses the pre-attention / pre-MLP norms into the linear layers
        for local, te in (("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight"),
                          ("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight")):
            name = name.replace(te, local)
        return weights[name].cuda()

    assign_full_weights(other, lookup)
    tokens = torch.randint(0, 1000, (2, 64), device="cuda")
    positions = torch.arange(64, device="cuda").expand(2, 64)
    with torch.no_grad():
        want = reference[0].cuda()(tokens, positions, None).float()
        got = other[0].cuda()(tokens, positions, None).float()
    return float((got - want).abs().max()), float(want.abs().max())


@needs_cuda
@needs_te
def test_transformer_engine_bf16_matches_local_fp32():
    diff, scale = run_ranks(_forward_pair, 1, "transformer_engine", "bf16")[0]
    assert diff < 0.05 * scale


@needs_cuda
@needs_te
def test_fp8_forward_stays_close_to_fp32():
    diff, scale = run_ranks(_forward_pair, 1, "transformer_engine", "fp8")[0]
    assert diff < 0.15 * scale


@needs_cuda
def test_bf16_local_train_step_reports_mfu():
    from ebpo_megatron.trainer.batching import PolicyBatch

    def _step(rank, world):
        from ebpo_megatron.models import build_policy
        from ebpo_megatron.parallel import ParallelConfig, cpu_compat, initialize
        from ebpo_megatron.trainer.policy_trainer import LossConfig, OptimConfig, PolicyTrainer, StepConfig

        cfg = ModelConfig(**CFG, precision="bf16")
        initialize(ParallelConfig(), cfg)
        cpu_compat.set_seed(0)
        trainer = PolicyTrainer(build_policy(cfg, ParallelConfig()), OptimConfig(lr=1e-5), LossConfig(kl_coef=0.0),
                                StepConfig(micro_batch_size=8, step_kl=False, peak_tflops=989.0))
        tokens = torch.randint(0, 1000, (16, 128), device="cuda")
        mask = torch.ones(16, 127, device="cuda")
        batch = PolicyBatch(tokens, torch.full((16,), 128), mask, torch.randn(16, device="cuda"),
                            old_logp=torch.full((16, 127), -7.0, device="cuda"))
        trainer.train_step(batch)
        return trainer.train_step(batch)

    metrics = run_ranks(_step, 1)[0]
    assert 0.0 < metrics["perf/mfu"] < 1.0 and metrics["perf/tokens_per_s"] > 0
