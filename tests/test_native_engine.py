"""Native rollout engine: KV-cache sampling from the Megatron model itself."""

from __future__ import annotations

import pytest
import torch

from ebpo_megatron.models import ModelConfig
from mp_utils import run_ranks

CFG = ModelConfig(family="qwen3", num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
                  num_kv_heads=2, vocab_size=90, max_position_embeddings=40)
PROMPTS = [[5, 9, 14, 3], [7, 2], [11, 12, 13, 14, 15, 16, 17], [4]]


def _engine_checks(rank, world, tp):
    from megatron.core import parallel_state

    from ebpo_megatron.models import build_policy
    from ebpo_megatron.parallel import ParallelConfig, cpu_compat, initialize
    from ebpo_megatron.rollout.base import SamplingParams
    from ebpo_megatron.rollout.native_engine import NativeEngine
    from ebpo_megatron.config.training import LossConfig, OptimConfig, StepConfig
    from ebpo_megatron.trainer.policy_trainer import PolicyTrainer
    from ebpo_megatron.trainer.rollout_batch import build_policy_batch

    parallel = ParallelConfig(tensor_parallel=tp)
    initialize(parallel, CFG)
    cpu_compat.set_seed(0)
    chunks = build_policy(CFG, parallel)
    model = chunks[0]
    engine = NativeEngine(model, pad_token_id=0, max_sequence_length=CFG.max_position_embeddings)
    out = {}
    greedy = engine.generate(PROMPTS, SamplingParams(n=1, temperature=0.0, max_new_tokens=12))
    # prompts of one length: no padding, so the engine passes no attention mask at all
    unpadded = engine.generate([p[:2] for p in PROMPTS if len(p) >= 2],
                               SamplingParams(n=1, temperature=0.0, max_new_tokens=12))
    # argmax of a full re-forward at every position (no cache, no padding)
    mismatches = 0
    for prompt, response in zip(greedy.prompt_ids + unpadded.prompt_ids,
                                greedy.response_ids + unpadded.response_ids):
        seq = torch.tensor([prompt + response])
        with torch.no_grad():
            logits = model(seq, torch.arange(seq.shape[1]).unsqueeze(0), None)
        from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

        logits = gather_from_tensor_model_parallel_region(logits)[0, :, : CFG.vocab_size]
        predicted = logits[len(prompt) - 1: -1].argmax(-1).tolist()
        mismatches += sum(a != b for a, b in zip(predicted, response))
    out["greedy_mismatches"] = mismatches
    out["greedy_tokens"] = greedy.response_ids
    # n samples share their prompt's prefill (KV cache copied); batches of whole groups
    small = NativeEngine(model, pad_token_id=0, max_sequence_length=CFG.max_position_embeddings, max_batch_size=3)
    twice = small.generate(PROMPTS, SamplingParams(n=2, temperature=0.0, max_new_tokens=12))
    out["shared_prefill_greedy"] = twice.response_ids == [r for r in greedy.response_ids for _ in range(2)]

    params = SamplingParams(n=3, temperature=0.8, top_p=1.0, max_new_tokens=10, stop_token_ids=(17, 23), seed=4)
    sampled = engine.generate(PROMPTS, params)
    again = engine.generate(PROMPTS, params)
    out["reproducible"] = sampled.response_ids == again.response_ids
    out["sampled"] = sampled.response_ids
    out["finish"] = sampled.finish_reasons
    out["group_ids"] = sampled.group_ids.tolist()
    # the engine's log-probs equal the trainer's for the same weights and temperature
    trainer = PolicyTrainer(chunks, OptimConfig(lr=1e-4), LossConfig(kl_coef=0.0),
                            StepConfig(micro_batch_size=4, temperature=0.8, step_kl=False))
    batch = build_policy_batch(sampled.prompt_ids, sampled.response_ids, sampled.logprobs,
                               torch.zeros(len(sampled.response_ids)), pad_token_id=0)
    train_logp = trainer.logprobs(batch)
    gap = ((train_logp - batch.rollout_logp).abs() * batch.loss_mask).max()
    out["logp_gap"] = float(gap)
    try:
        engine.generate([[1] * 35], SamplingParams(max_new_tokens=10))
        out["too_long"] = None
    except ValueError as err:
        out["too_long"] = str(err)
    out["tp_rank"] = parallel_state.get_tensor_model_parallel_rank()
    return out


@pytest.fixture(scope="module")
def single():
    return run_ranks(_engine_checks, 1, 1)[0]


def test_greedy_equals_argmax_of_full_forward(single):
    assert single["greedy_mismatches"] == 0
    assert all(len(r) == 12 for r in single["greedy_tokens"])
    assert single["shared_prefill_greedy"]  # each of the n = 2 copies = the n = 1 response


def test_logprobs_equal_the_trainers(single):
    assert single["logp_gap"] < 1e-4


def test_stop_tokens_length_groups_and_reproducibility(single):
    assert single["reproducible"]
    assert single["group_ids"] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    for tokens, reason in zip(single["sampled"], single["finish"]):
        if reason == "stop":
            assert tokens[-1] in (17, 23) and not set(tokens[:-1]) & {17, 23}
        else:
            assert len(tokens) == 10 and not set(tokens) & {17, 23}
    assert "exceed the context of 40 tokens" in single["too_long"]


def test_tensor_parallel_ranks_sample_the_same_tokens_as_one_process(single):
    results = run_ranks(_engine_checks, 2, 2)
    assert results[0]["sampled"] == results[1]["sampled"]
    assert results[0]["greedy_tokens"] == single["greedy_tokens"]
    assert results[0]["greedy_mismatches"] == 0 and results[0]["logp_gap"] < 1e-4


def _bf16_cache_runs(rank, world):
    """Sampled responses of a bf16 model with the float32 KV cache, and with the cache in bf16
    (the cast switched off by hiding SDPACoreAttention from rotated_key_cache)."""
    import dataclasses

    from ebpo_megatron.models import build_policy, rotated_key_cache
    from ebpo_megatron.parallel import ParallelConfig, cpu_compat, initialize
    from ebpo_megatron.rollout.base import SamplingParams
    from ebpo_megatron.rollout.native_engine import NativeEngine

    cfg = dataclasses.replace(CFG, precision="bf16")
    initialize(ParallelConfig(), cfg)
    cpu_compat.set_seed(0)
    model = build_policy(cfg, ParallelConfig())[0]
    engine = NativeEngine(model, pad_token_id=0, max_sequence_length=cfg.max_position_embeddings)
    params = SamplingParams(n=3, temperature=0.8, max_new_tokens=10, seed=4)
    cached_dtypes = []
    allocate = type(model.decoder.layers[0].self_attention)._allocate_memory

    def spy(self, *args, **kwargs):
        memory = allocate(self, *args, **kwargs)
        cached_dtypes.append(memory.dtype)
        return memory

    type(model.decoder.layers[0].self_attention)._allocate_memory = spy
    fp32_cache = engine.generate(PROMPTS, params)
    rotated_key_cache.SDPACoreAttention = type("NotTheCoreAttention", (), {})
    bf16_cache = engine.generate(PROMPTS, params)
    return {"dtypes": cached_dtypes, "runs": [(r.response_ids, r.logprobs) for r in (fp32_cache, bf16_cache)]}


def test_bf16_model_caches_keys_and_values_in_float32_with_the_same_samples():
    """On the CPU the bf16 model's attention runs in float32 (SDPACoreAttention), so the cache
    holds the rotated keys and the values in float32: the same responses and log-probs as a bf16
    cache whose prefix is cast at every step."""
    out = run_ranks(_bf16_cache_runs, 1)[0]
    layers = CFG.num_layers
    assert out["dtypes"][: 2 * layers] == [torch.float32] * (2 * layers)
    assert out["dtypes"][2 * layers:] == [torch.bfloat16] * (2 * layers)
    (tokens, logps), (tokens_bf16, logps_bf16) = out["runs"]
    assert tokens == tokens_bf16 and logps == logps_bf16
    assert sum(len(r) for r in tokens) > 20
