"""ebpo-plan: parameter counts, memory per GPU, KV-cache capacity, FLOPs and layout errors against
numbers worked out by hand in this file; per-rank counts against real Megatron-Core models; the
CLI on the shipped example configs."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ebpo_megatron.planner import (
    GiB,
    PlanError,
    PlanInputs,
    count_parameters,
    flops_plan,
    inflight_layers,
    layer_activation_bytes,
    main,
    make_plan,
    rank_params,
    rollout_plan,
    stage_memory,
)
from mp_utils import run_ranks

ROOT = Path(__file__).resolve().parents[1]

# Llama-3.1-70B dimensions
L70 = dict(num_layers=80, hidden_size=8192, ffn_hidden_size=28672, num_attention_heads=64, num_kv_heads=8,
           vocab_size=128256, max_position_embeddings=131072)


def llama70(**kw) -> PlanInputs:
    base = dict(**L70, precision="bf16", tensor_parallel=8, pipeline_parallel=4, sequence_parallel=True,
                nodes=4, gpus_per_node=8, prompts_per_step=512, group_size=4, max_prompt_tokens=1024,
                max_new_tokens=3072, mini_batches=4, micro_batch_size=1, vllm_tensor_parallel=8,
                gpu_memory_utilization=0.3, reserve_gib=3.0)
    base.update(kw)
    return PlanInputs(**base)


# ------------------------------------------------------------------------------ parameters
def test_llama70b_parameter_count_by_hand():
    h, f, heads, kv, d, V, L = 8192, 28672, 64, 8, 128, 128256, 80
    embedding = V * h                                  # 1,050,673,152
    attention = h * heads * d + 2 * h * kv * d + heads * d * h  # q + k + v + o = 150,994,944
    mlp = 3 * h * f                                    # gate, up, down = 704,643,072
    norms = 2 * h
    per_layer = attention + mlp + norms                # 855,654,400
    total = embedding + L * per_layer + h + V * h      # + final norm + untied output layer
    assert per_layer == 855_654_400
    assert total == 70_553_706_496  # ~70.55e9

    c = count_parameters(llama70())
    assert c.attention == attention == 150_994_944
    assert c.mlp == mlp and c.per_layer == per_layer
    assert c.total == total
    assert c.matmul == L * (attention + mlp) + V * h  # input embedding lookup is not a GEMM


def test_llama8b_and_tied_qwen_counts():
    llama8 = PlanInputs(num_layers=32, hidden_size=4096, ffn_hidden_size=14336, num_attention_heads=32,
                        num_kv_heads=8, vocab_size=128256)
    assert count_parameters(llama8).total == 8_030_261_248
    # Qwen2.5-0.5B-like: tied embeddings, QKV bias: 494,032,768 (the published HF count)
    qwen = PlanInputs(num_layers=24, hidden_size=896, ffn_hidden_size=4864, num_attention_heads=14,
                      num_kv_heads=2, vocab_size=151936, tie_word_embeddings=True, qkv_bias=True)
    h, f, d = 896, 4864, 64
    per_layer = h * 14 * d + 2 * h * 2 * d + 14 * d * h + (14 + 4) * d + 3 * h * f + 2 * h
    assert count_parameters(qwen).total == 151936 * h + 24 * per_layer + h == 494_032_768


def test_llama70b_per_rank_split_tp8_pp4():
    inp = llama70()
    layer_split = (855_654_400 - 2 * 8192) // 8  # linear weights over TP 8; norms replicated
    layers = 20 * (layer_split + 2 * 8192)
    first, mid, last = (rank_params(inp, s) for s in (0, 1, 3))
    assert first.total == layers + 128256 * 8192 // 8 == 2_270_756_864
    assert mid.total == layers == 2_139_422_720
    assert last.total == layers + 8192 + 128256 * 8192 // 8 == 2_270_765_056
    # bf16 weights: 2 bytes per parameter on the rank, 4.23 GiB on the first stage
    m0 = stage_memory(inp, 0)
    assert m0.weights == 2 * 2_270_756_864
    assert m0.weights / GiB == pytest.approx(4.2296, abs=1e-4)
    assert m0.grads == 4 * 2_270_756_864  # fp32 grad buffer
    # fp32 model: weights 4 bytes, Adam without a separate main copy (8 bytes / DP)
    m32 = stage_memory(dataclasses.replace(inp, precision="fp32"), 0)
    assert m32.weights == 4 * 2_270_756_864 and m32.optimizer == 8 * 2_270_756_864


def test_optimizer_state_is_sharded_over_dp():
    n = 2_270_756_864
    assert stage_memory(llama70(nodes=4), 0).optimizer == 12 * n  # DP 1
    assert stage_memory(llama70(nodes=8, gpu_memory_utilization=0.45), 0).optimizer == 12 * n / 2  # DP 2
    assert stage_memory(llama70(nodes=32), 0).optimizer == 12 * n / 8  # DP 8
    assert stage_memory(llama70(nodes=8, use_distributed_optimizer=False), 0).optimizer == 12 * n


def test_fp8_keeps_bf16_weights_and_adds_te_cache():
    bf16, fp8 = stage_memory(llama70(), 0), stage_memory(llama70(precision="fp8", flash_attention=True), 0)
    assert fp8.weights == bf16.weights == 2 * 2_270_756_864
    linear = 20 * (855_654_400 - 2 * 8192) // 8  # q, k, v, o, MLP weights on the rank
    assert fp8.fp8_cache == 2 * linear and bf16.fp8_cache == 0
    assert fp8.reference == 2 * 2_270_756_864 + linear  # frozen copy + forward-only FP8 cache
    assert stage_memory(llama70(kl_coef=0.0), 0).reference == 0


# ------------------------------------------------------------------------------ activations
def test_activations_korthikanti_formulas():
    s, b, h, a, t = 4096, 1, 8192, 64, 8
    inp = llama70()  # TP 8, SP, no flash attention
    none = s * b * h * (34 / t + 5 * a * s / (h * t))
    assert layer_activation_bytes(inp, "none") == pytest.approx(none)
    assert layer_activation_bytes(inp, "selective") == pytest.approx(34 * s * b * h / t)
    assert layer_activation_bytes(inp, "full") == pytest.approx(2 * s * b * h / t)
    no_sp = dataclasses.replace(inp, sequence_parallel=False)
    assert layer_activation_bytes(no_sp, "none") == pytest.approx(s * b * h * (10 + 24 / t + 5 * a * s / (h * t)))
    assert layer_activation_bytes(no_sp, "full") == pytest.approx(2 * s * b * h)
    tp1 = PlanInputs(**L70, max_prompt_tokens=1024, max_new_tokens=1024, micro_batch_size=2)
    assert layer_activation_bytes(tp1, "none") == pytest.approx(2048 * 2 * h * (34 + 5 * a * 2048 / h))
    # fused attention never stores the s x s scores
    flash = dataclasses.replace(inp, flash_attention=True)
    assert layer_activation_bytes(flash, "none") == pytest.approx(34 * s * b * h / t)


def test_stage_activations_use_1f1b_inflight_microbatches():
    inp = llama70(recompute="selective")
    per_layer = 34 * 4096 * 8192 / 8
    # stage 0 holds PP = 4 micro-batches of its 20 layers; the last stage one
    assert inflight_layers(inp, 0) == 4 * 20 and inflight_layers(inp, 3) == 1 * 20
    assert stage_memory(inp, 0).activations == pytest.approx(80 * per_layer)  # 10.62 GiB
    assert stage_memory(inp, 0).activations / GiB == pytest.approx(10.625, abs=1e-3)
    assert stage_memory(inp, 3).activations == pytest.approx(20 * per_layer)
    # full recompute: only layer inputs + one layer's full activations in backward
    full = llama70(recompute="full")
    m = stage_memory(full, 0)
    assert m.activations == pytest.approx(80 * 2 * 4096 * 8192 / 8)
    assert m.recompute_working == pytest.approx(4096 * 8192 * (34 / 8 + 5 * 64 * 4096 / (8192 * 8)))
    # interleaved: first stage holds L * (1 + (p - 1) / (p * v)) layers
    inter = llama70(virtual_pipeline=5)
    assert inflight_layers(inter, 0) == pytest.approx(80 * (1 + 3 / 20))
    # few micro-batches cap the in-flight count
    few = llama70(prompts_per_step=8, mini_batches=4, micro_batch_size=4)  # 8 prompts x 4 / 4 / 4 = 2
    assert inflight_layers(few, 0) == 2 * 20


# ------------------------------------------------------------------------------ vLLM KV cache
def test_vllm_kv_tokens_by_hand():
    inp = llama70(nodes=8, pipeline_parallel=8, precision="fp8", gpu_memory_utilization=0.55)
    h, V, L = 8192, 128256, 80
    linear = 855_654_400 - 2 * h
    weights = ((2 * V * h + L * linear) / 8 + L * 2 * h + h) * 2  # bf16, TP 8, norms replicated
    budget = 0.55 * 79.1 * 2**30
    per_token_model = 2 * L * 8 * 128 * 2  # k and v, 80 layers, 8 KV heads, head dim 128, bf16
    per_token_gpu = per_token_model // 8
    rp = rollout_plan(inp)
    assert rp.weight_bytes == pytest.approx(weights) and weights / GiB == pytest.approx(16.43, abs=5e-3)
    assert rp.kv_bytes_per_token_model == per_token_model == 327_680
    assert rp.kv_bytes_per_token == per_token_gpu == 40_960
    assert rp.kv_tokens == int((budget - weights) // per_token_gpu) == 709_775
    assert rp.concurrent_sequences == 709_775 // 4096 == 173
    assert rp.engines == 8 and rp.sequences_per_engine == 2048 // 8 and rp.waves == 2
    # vLLM TP beyond the KV heads replicates them
    wide = PlanInputs(**{**L70, "num_kv_heads": 4}, nodes=2, vllm_tensor_parallel=16, tensor_parallel=4,
                      gpu_memory_utilization=0.9)
    assert rollout_plan(wide).kv_bytes_per_token == 2 * 80 * 1 * 128 * 2


def test_memory_phases_and_verdicts():
    inp = llama70(nodes=8, pipeline_parallel=8, precision="fp8", flash_attention=True, recompute="selective",
                  gpu_memory_utilization=0.55)
    plan = make_plan(inp)
    m = plan.stages[-1]
    resident = m.weights + m.grads + m.optimizer + m.fp8_cache + m.reference + 3 * GiB
    assert m.resident == pytest.approx(resident)
    assert m.generate == pytest.approx(resident + 0.55 * 79.1 * GiB + 128256 * 8192 * 2)  # sync: embedding
    assert plan.fits and plan.peak_gib == pytest.approx(73.82, abs=0.01)
    assert plan.summary()["dp"] == 1 and plan.summary()["world"] == 64
    # too much vLLM: a plan that does not fit says so
    over = make_plan(dataclasses.replace(inp, gpu_memory_utilization=0.7))
    assert not over.fits and "exceeds the GPU" in over.problems[0]
    starved = make_plan(dataclasses.replace(inp, gpu_memory_utilization=0.2))
    assert any("KV cache budget" in p for p in starved.problems)


def test_flops_per_step_by_hand():
    inp = llama70(nodes=8, pipeline_parallel=8, recompute="selective", mfu=0.5)
    c = count_parameters(inp)
    n = 80 * (c.q + c.kv + c.o + c.mlp) + 128256 * 8192
    tokens = 512 * 4 * 4096
    attn = 4 * 80 * 64 * 128  # per token per unit of context, forward
    fl = flops_plan(inp)
    assert fl.train == pytest.approx(6 * n * tokens + 3 * attn * 4096 * tokens)
    assert fl.recompute == pytest.approx(attn * 4096 * tokens)
    assert fl.logprob_passes == 3  # old, reference (kl_coef > 0), step KL
    assert fl.logprob == pytest.approx(3 * (2 * n + attn * 4096) * tokens)
    prefill, generated = 512 * 1024, 2048 * 3072
    assert fl.rollout == pytest.approx(2 * n * (prefill + generated) + attn * (prefill * 1024 + generated * (1024 + 1536)))
    assert fl.train_seconds == pytest.approx((fl.train + fl.recompute + fl.logprob) / (64 * 989e12 * 0.5))
    no_kl = flops_plan(dataclasses.replace(inp, kl_coef=0.0, step_kl=False))
    assert no_kl.logprob_passes == 1
    # on-policy (one mini-batch, one epoch): π_old comes from the update's own forward
    assert flops_plan(dataclasses.replace(inp, kl_coef=0.0, step_kl=False, mini_batches=1)).logprob_passes == 0
    # π_old from the rollout engine (train.step.old_logp: rollout): no pass of the trainer's
    assert flops_plan(dataclasses.replace(inp, kl_coef=0.0, step_kl=False, old_logp="rollout")).logprob_passes == 0
    short = flops_plan(dataclasses.replace(inp, mean_response_tokens=1000))
    assert short.train_tokens == 2048 * (1024 + 1000)


# ------------------------------------------------------------------------------ a tiny model
def test_tiny_config_by_hand():
    tiny = PlanInputs(num_layers=2, hidden_size=128, ffn_hidden_size=256, num_attention_heads=4, num_kv_heads=2,
                      vocab_size=32, max_position_embeddings=32, precision="fp32", nodes=1, gpus_per_node=1,
                      prompts_per_step=32, group_size=4, max_prompt_tokens=8, max_new_tokens=5, mini_batches=2,
                      micro_batch_size=64, rollout_engine="native", reserve_gib=0.0)
    # per layer: q 128*128, k+v 2*128*64, o 128*128, MLP 3*128*256, norms 2*128
    per_layer = 16384 + 16384 + 16384 + 98304 + 256
    assert count_parameters(tiny).per_layer == per_layer == 147_712
    assert count_parameters(tiny).total == 32 * 128 + 2 * per_layer + 128 + 32 * 128 == 303_744
    plan = make_plan(tiny)
    m = plan.stages[0]
    padded = 128 * 128 * 2 + 2 * per_layer + 128  # vocabulary padded to 128
    assert m.params == padded
    assert m.weights == 4 * padded and m.grads == 4 * padded and m.optimizer == 8 * padded
    assert m.reference == 4 * padded
    # activations: s = 13, b = 64, fp32 doubles the 16-bit formula; 2 layers, one micro-batch
    assert m.activations == pytest.approx(2 * 2 * 13 * 64 * 128 * (34 + 5 * 4 * 13 / 128))
    assert plan.data_parallel == 1 and plan.microbatches == 1 and plan.fits


def _rank_numels(rank: int, world: int) -> list[tuple[str, int, int]]:
    from megatron.core import parallel_state

    from ebpo_megatron.models import ModelConfig, build_policy
    from ebpo_megatron.parallel import ParallelConfig, initialize

    par = ParallelConfig(tensor_parallel=2, pipeline_parallel=2)
    cfgs = {
        "llama": ModelConfig(family="llama", num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
                             num_kv_heads=2, vocab_size=100),
        "qwen2": ModelConfig(family="qwen2", num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
                             num_kv_heads=2, vocab_size=100, tie_word_embeddings=True),
        "qwen3": ModelConfig(family="qwen3", num_layers=4, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
                             num_kv_heads=2, head_dim=24, vocab_size=300),
    }
    initialize(par, cfgs["llama"])
    stage = parallel_state.get_pipeline_model_parallel_rank()
    out = []
    for name, cfg in cfgs.items():
        chunks = build_policy(cfg, par)
        out.append((name, stage, sum(p.numel() for c in chunks for p in c.parameters())))
    return out


def test_per_rank_counts_equal_real_megatron_models():
    results = run_ranks(_rank_numels, 4)
    dims = {
        "llama": dict(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_kv_heads=2,
                      vocab_size=100),
        "qwen2": dict(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_kv_heads=2,
                      vocab_size=100, tie_word_embeddings=True, qkv_bias=True),
        "qwen3": dict(num_layers=4, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_kv_heads=2,
                      head_dim=24, vocab_size=300, qk_norm=True),
    }
    for per_rank in results:
        for name, stage, numel in per_rank:
            inp = PlanInputs(**dims[name], tensor_parallel=2, pipeline_parallel=2, nodes=1, gpus_per_node=4)
            assert rank_params(inp, stage).total == numel, (name, stage)


# ------------------------------------------------------------------------------ layout errors
@pytest.mark.parametrize("change, message", [
    (dict(nodes=3, pipeline_parallel=8), r"world size 24 \(3 nodes x 8 GPUs\) is not divisible by tensor_parallel x pipeline_parallel = 8 x 8 = 64"),
    (dict(tensor_parallel=16, nodes=8), "num_kv_heads 8 is not divisible by tensor_parallel 16"),
    (dict(pipeline_parallel=3, nodes=3), "num_layers 80 is not divisible by pipeline_parallel x virtual_pipeline = 3"),
    (dict(tensor_parallel=1, sequence_parallel=True, pipeline_parallel=1), "sequence_parallel needs tensor_parallel > 1"),
    (dict(prompts_per_step=3, nodes=16), "leaves data-parallel ranks without prompts at DP = 4"),
    (dict(mini_batches=9000), "mini_batches 9000: a DP rank holds only 2048 responses"),
    (dict(max_new_tokens=200_000), "exceeds max_position_embeddings 131072"),
    (dict(vllm_tensor_parallel=3, nodes=3, pipeline_parallel=1), "does not divide|not divisible"),
    (dict(micro_batch_size=None), "exactly one of"),
])
def test_impossible_layouts_name_the_rule(change, message):
    with pytest.raises(PlanError, match=message):
        make_plan(llama70(**change))


# ------------------------------------------------------------------------------ the CLI
def test_cli_main_on_the_70b_example(capsys):
    rc = main(["--config", str(ROOT / "examples/llama3.1_70b_ebpo.yaml"), "--nodes", "8", "--gpus-per-node", "8"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "70,553,706,496" in out and "TP x PP x DP     8 x 8 x 1" in out
    assert "summary: world=64 tp=8 pp=8 dp=1 vllm_tp=8" in out and "peak_gib=73.82" in out
    # the 4-node layout is refused; 4 nodes at PP 4 is legal but vLLM 0.35 does not fit
    assert main(["--config", str(ROOT / "examples/llama3.1_70b_ebpo.yaml"), "--nodes", "4"]) == 2
    assert "is not divisible by tensor_parallel x pipeline_parallel = 8 x 8 = 64" in capsys.readouterr().err
    assert main(["--config", str(ROOT / "examples/llama3.1_70b_ebpo.yaml"), "--nodes", "4",
                 "parallel.pipeline_parallel=4", "rollout.vllm.gpu_memory_utilization=0.35"]) == 3
    assert "DOES NOT FIT: peak memory" in capsys.readouterr().out


def test_cli_json_and_config_errors(capsys):
    assert main(["--config", str(ROOT / "examples/llama3.1_8b_ebpo.yaml"), "--nodes", "1", "--json",
                 "--mfu", "0.3", "--peak-tflops", "500"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["summary"]["tp"] == 4 and data["summary"]["dp"] == 2 and data["params"]["total"] == 8_030_261_248
    assert data["inputs"]["mfu"] == 0.3 and data["inputs"]["peak_tflops"] == 500
    assert main(["--config", str(ROOT / "examples/llama3.1_8b_ebpo.yaml"), "--nodes", "1", "rollout.n=four"]) == 2
    assert "config error" in capsys.readouterr().err


def test_cli_as_module_subprocess():
    proc = subprocess.run(
        [sys.executable, "-m", "ebpo_megatron.planner", "--config", str(ROOT / "examples/tiny_cpu.yaml"),
         "--nodes", "1", "--gpus-per-node", "1"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "summary: world=1 tp=1 pp=1 dp=1" in proc.stdout
