"""GPU checks: Transformer Engine layers, FP8, bf16 throughput, and the CUDA path of the train
step, the native engine and a whole run, whose batches are built in host memory. They skip with
a reason on machines without CUDA or Transformer Engine and run on a GPU machine
(`tools/device_check.sh`); the helpers of the CUDA-path checks also run on the CPU here."""

from __future__ import annotations

import math

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


def _bf16_steps(rank: int, world: int) -> dict[str, float]:
    """Two bf16 train steps (local spec, mixed precision: bf16 weights, fp32 main parameters in
    the distributed optimizer) from a batch in host memory; the second step's metrics."""
    from ebpo_megatron.models import build_policy
    from ebpo_megatron.parallel import ParallelConfig, cpu_compat, initialize
    from ebpo_megatron.trainer.batching import PolicyBatch
    from ebpo_megatron.config.training import LossConfig, OptimConfig, StepConfig
    from ebpo_megatron.trainer.policy_trainer import PolicyTrainer

    cfg = ModelConfig(**CFG, precision="bf16")
    initialize(ParallelConfig(), cfg)
    cpu_compat.set_seed(0)
    trainer = PolicyTrainer(build_policy(cfg, ParallelConfig()), OptimConfig(lr=1e-5), LossConfig(kl_coef=0.0),
                            StepConfig(micro_batch_size=8, step_kl=False, peak_tflops=989.0))
    tokens = torch.randint(0, 1000, (16, 128))
    batch = PolicyBatch(tokens, torch.full((16,), 128), torch.ones(16, 127), torch.randn(16),
                        old_logp=torch.full((16, 127), -7.0))
    trainer.train_step(batch)
    return trainer.train_step(batch)


@needs_cuda
def test_bf16_local_train_step_reports_mfu():
    metrics = run_ranks(_bf16_steps, 1)[0]
    assert 0.0 < metrics["perf/mfu"] < 1.0 and metrics["perf/tokens_per_s"] > 0


# ------------------------------------------------------ the CUDA path of the train step and rollout
# The RL loop builds its batches in host memory; the trainer and the native engine move what the
# model reads to the model's device, and metric collectives on CPU tensors go over gloo while
# the model's go over NCCL. Each helper runs on CUDA where there is one and on the CPU in a
# process that sees no GPU (``CPU_ONLY``); on a CPU machine the helpers run once each, so the
# GPU checks' own code is exercised in every test run.
CPU_ONLY = {"CUDA_VISIBLE_DEVICES": ""}
STEP_KEYS = ("actor/loss", "actor/pg_loss", "actor/grad_norm", "actor/entropy", "actor/param_norm",
             "actor/step_kl", "actor/kl_ref")


def _policy_with_fixed_weights(cfg: ModelConfig) -> list:
    """Policy chunks on this process's device with the deterministic weights of test_policy_trainer."""
    from test_policy_trainer import full_init

    from ebpo_megatron.models import build_policy
    from ebpo_megatron.models.weights import assign_full_weights, full_weights
    from ebpo_megatron.parallel import ParallelConfig

    chunks = build_policy(cfg, ParallelConfig())
    shapes = {name: tuple(t.shape) for name, t in full_weights(chunks).items()}
    assign_full_weights(chunks, lambda name: full_init(name, shapes))
    return chunks


def _host_batch_step(rank: int, world: int) -> dict:
    """One train step from a batch in host memory: π_old and π_ref recomputed, the step KL."""
    import dataclasses

    from test_policy_trainer import CFG, fixed_batch

    from ebpo_megatron.parallel import ParallelConfig, cpu_compat, initialize
    from ebpo_megatron.config.training import LossConfig, OptimConfig, StepConfig
    from ebpo_megatron.trainer.policy_trainer import PolicyTrainer

    initialize(ParallelConfig(), CFG)
    cpu_compat.set_seed(0)
    chunks, reference = _policy_with_fixed_weights(CFG), _policy_with_fixed_weights(CFG)
    trainer = PolicyTrainer(chunks, OptimConfig(lr=1e-3, adam_eps=1e-3), LossConfig(kl_coef=0.01),
                            StepConfig(micro_batch_size=3, step_kl=True), ref_chunks=reference)
    batch = dataclasses.replace(fixed_batch(), old_logp=None)
    metrics = trainer.train_step(batch)
    return {"device": str(next(chunks[0].parameters()).device), "batch_device": str(batch.tokens.device),
            "metrics": {key: metrics[key] for key in STEP_KEYS}}


def _rollouts(rank: int, world: int) -> dict:
    """Greedy and sampled responses of the native engine to prompts of different lengths."""
    from test_policy_trainer import CFG

    from ebpo_megatron.parallel import ParallelConfig, cpu_compat, initialize
    from ebpo_megatron.rollout.base import SamplingParams
    from ebpo_megatron.rollout.native_engine import NativeEngine

    initialize(ParallelConfig(), CFG)
    cpu_compat.set_seed(0)
    model = _policy_with_fixed_weights(CFG)[0]
    engine = NativeEngine(model, pad_token_id=0, max_sequence_length=CFG.max_position_embeddings)
    prompts = [[5, 9, 13, 2], [7, 1], [3, 3, 8, 40, 11, 6]]
    out = {"device": str(next(model.parameters()).device)}
    for name, temperature in (("greedy", 0.0), ("sampled", 1.0)):
        batch = engine.generate(prompts, SamplingParams(n=2, temperature=temperature, max_new_tokens=8, seed=3))
        out[name] = (batch.response_ids, batch.logprobs)
    return out


def test_cuda_path_helpers_run_here() -> None:
    """The helpers of the CUDA checks below, on this machine's device."""
    step, rollouts = run_ranks(_host_batch_step, 1)[0], run_ranks(_rollouts, 1)[0]
    assert step["batch_device"] == "cpu"
    assert all(math.isfinite(v) for v in step["metrics"].values()), step
    for name in ("greedy", "sampled"):
        responses, logprobs = rollouts[name]
        assert len(responses) == 6 and all(len(r) == len(lp) > 0 for r, lp in zip(responses, logprobs))


@needs_cuda
def test_train_step_on_cuda_from_a_host_batch_equals_the_cpu_step() -> None:
    cuda, cpu = run_ranks(_host_batch_step, 1)[0], run_ranks(_host_batch_step, 1, env=CPU_ONLY)[0]
    assert cuda["device"].startswith("cuda") and cpu["device"] == "cpu"
    for key in STEP_KEYS:
        assert cuda["metrics"][key] == pytest.approx(cpu["metrics"][key], rel=1e-4, abs=1e-6), key


@needs_cuda
def test_native_engine_on_cuda_equals_the_cpu_engine() -> None:
    cuda, cpu = run_ranks(_rollouts, 1)[0], run_ranks(_rollouts, 1, env=CPU_ONLY)[0]
    assert cuda["device"].startswith("cuda") and cpu["device"] == "cpu"
    for name in ("greedy", "sampled"):  # the sampling uniforms come from the same CPU generator
        (cuda_ids, cuda_logp), (cpu_ids, cpu_logp) = cuda[name], cpu[name]
        assert cuda_ids == cpu_ids, name
        for a, b in zip(cuda_logp, cpu_logp):
            assert a == pytest.approx(b, abs=1e-4), name


@needs_cuda
def test_embedded_run_trains_on_cuda(tmp_path) -> None:
    """`ebpo-train` on the embedded task on a GPU: warm start, rollouts, train steps, evaluation
    and checkpoints, with NCCL for the model and gloo for host tensors."""
    import json
    import subprocess

    from test_train_e2e import command, env

    done = subprocess.run(command(tmp_path, "run.steps=3"), env=env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    rows = [json.loads(line) for line in (tmp_path / "e2e" / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in rows if "actor/loss" in row]
    assert len(steps) == 3 and all(math.isfinite(row["actor/loss"]) for row in steps)
