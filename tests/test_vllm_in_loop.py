"""The trainer with ``rollout.engine: vllm`` end to end on CPU, vLLM replaced by the
transformers-backed stand-in of tests/hf_vllm_backend.py (same interface): TP=2 x DP=1, so two
engines serve one data-parallel rank and each must generate half of the prompts; the weights are
synced (wake and a full sync checked with the probe) once before the first generation and once
after every training step, so the evaluation at the last step reuses that step's sync, and the
stand-in's log-probs equal the trainer's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mp_utils import run_ranks
from test_train_e2e import ROOT, TINY, last_rows

pytest.importorskip("transformers")


def _train(rank, world, out):
    import hf_vllm_backend
    from ebpo_megatron.config.schema import load_config
    from ebpo_megatron.rollout import vllm_engine
    from ebpo_megatron.trainer.run import run

    vllm_engine._VLLMBackend = hf_vllm_backend.HFBackedVLLM  # the only vLLM-specific class
    overrides = [o for o in TINY if not o.startswith("run.steps")] + [
        "run.steps=3", "run.eval_every=3", "run.save_every=3", f"run.output_dir={out}", "run.name=vllm",
        "rollout.engine=vllm", "parallel.tensor_parallel=2", "model.num_attention_heads=4",
        "model.num_kv_heads=2"]
    run(load_config(ROOT / "examples/tiny_cpu.yaml", overrides))
    return {"prompts_seen": hf_vllm_backend.PROMPTS_SEEN[0], "events": list(hf_vllm_backend.EVENTS)}


def test_vllm_engine_in_the_rl_loop_tp2_dp1(tmp_path):
    results = run_ranks(_train, 2, str(tmp_path))
    rows = last_rows(tmp_path / "vllm" / "metrics.jsonl")
    assert sorted(rows) == [0, 1, 2, 3]
    for step in (1, 2, 3):
        assert rows[step]["rollout/sync_bytes"] > 0 and rows[step]["rollout/sync_missing_params"] == 0
        assert rows[step]["rollout/logp_diff_max"] < 1e-4  # the synced copy samples the trainer's policy
        assert rows[step]["rollout/sync_check_max_diff"] < 1e-4  # the probe checked every sync
    # 8 prompts per step over 2 processes: each engine generated 4 per step, none twice
    # (3 steps of 8 plus 2 evaluations, steps 0 and 3, of the 24 held-out prompts, split in halves)
    assert [r["prompts_seen"] for r in results] == [(3 * 8 + 2 * 24) // 2] * 2
    events = results[0]["events"]
    assert events[0] == "sleep2" and events[1:4] == ["wake:weights", "wake:kv_cache", "sync"]
    sync = ["wake:weights", "wake:kv_cache", "sync"]
    step = ["generate", "sleep2", *sync]  # generate, sleep for the rewards and training, sync the new weights
    # the engine starts asleep; sync, evaluate (step 0), 3 steps, evaluate with step 3's sync
    assert events == ["sleep2", *sync, "generate", *step * 3, "generate"]
    assert json.loads((tmp_path / "vllm" / "summary.json").read_text())["steps"] == 3
    assert (Path(tmp_path) / "vllm" / "vllm_model" / "config.json").is_file()
