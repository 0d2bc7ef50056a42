"""Sharded checkpoints: atomic save, resume equal to an uninterrupted run (the Adam step-counter
trap included), and loading under another TP / DP layout."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ebpo_megatron.models import ModelConfig
from mp_utils import run_ranks

CFG = ModelConfig(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
                  num_kv_heads=2, vocab_size=60, max_position_embeddings=32)


def batch_for(step: int):
    from ebpo_megatron.trainer.batching import PolicyBatch

    g = torch.Generator().manual_seed(100 + step)
    tokens = torch.randint(0, CFG.vocab_size, (8, 10), generator=g)
    mask = torch.zeros(8, 9)
    mask[:, 3:] = 1.0
    return PolicyBatch(tokens, torch.full((8,), 10), mask, torch.randn(8, generator=g),
                       old_logp=-4.0 + 0.1 * torch.randn(8, 9, generator=g))


def _run(rank, world, tp, root, save_after, total_steps, resume):
    from megatron.core import parallel_state

    from ebpo_megatron.models import build_policy
    from ebpo_megatron.models.weights import full_weights
    from ebpo_megatron.parallel import ParallelConfig, cpu_compat, initialize
    from ebpo_megatron.trainer.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
    from ebpo_megatron.config.training import LossConfig, OptimConfig, StepConfig
    from ebpo_megatron.trainer.policy_trainer import PolicyTrainer

    parallel = ParallelConfig(tensor_parallel=tp)
    initialize(parallel, CFG)
    cpu_compat.set_seed(0)
    chunks = build_policy(CFG, parallel)
    trainer = PolicyTrainer(chunks, OptimConfig(lr=1e-2, warmup_steps=2, decay_style="cosine", decay_steps=10),
                            LossConfig(kl_coef=0.0), StepConfig(micro_batch_size=2, step_kl=False))
    root = Path(root)
    start, extra, loaded = 0, None, None
    if resume:
        state = load_checkpoint(latest_checkpoint(root), trainer)
        start, extra = state["step"], state["extra"]
        loaded = full_weights(trainer.chunks)
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    snapshots = {}
    for step in range(start + 1, total_steps + 1):
        share = 8 // dp
        trainer.train_step(batch_for(step).select(slice(dp_rank * share, (dp_rank + 1) * share)))
        if step == save_after:
            snapshots["saved"] = full_weights(trainer.chunks)
            save_checkpoint(root, step, trainer, {"extra": {"prior": [1.5, 2.5]}}, keep_last=1)
    snapshots["final"] = full_weights(trainer.chunks)
    snapshots["loaded"] = loaded
    snapshots["extra"] = extra
    snapshots["lr"] = trainer.optimizer.param_groups[0]["lr"]
    return snapshots


def _max_diff(a, b):
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("save_layout,load_layout", [((2, 1), (1, 1)), ((2, 2), (1, 1)), ((1, 1), (2, 2))],
                         ids=["DP2->DP1", "TP2->TP1", "TP1->TP2"])
def test_resume_equals_uninterrupted_run(tmp_path, save_layout, load_layout):
    (save_world, save_tp), (load_world, load_tp) = save_layout, load_layout
    straight = run_ranks(_run, save_world, save_tp, str(tmp_path / "a"), 2, 4, False)[0]
    resumed = run_ranks(_run, load_world, load_tp, str(tmp_path / "a"), -1, 4, True)
    merged = {}
    for r in resumed:
        merged.update(r["final"])
    assert _max_diff(resumed[0]["loaded"], straight["saved"]) == 0.0
    assert resumed[0]["extra"] == {"prior": [1.5, 2.5]}
    moved = _max_diff(straight["final"], straight["saved"])
    assert moved > 1e-3  # two more Adam steps really moved the weights
    assert _max_diff(merged, straight["final"]) < 1e-5
    assert resumed[0]["lr"] == pytest.approx(straight["lr"])


def test_atomic_layout_and_keep_last(tmp_path):
    from ebpo_megatron.trainer.checkpoint import complete_checkpoints, latest_checkpoint

    run_ranks(_run, 1, 1, str(tmp_path), 1, 1, False)
    root = Path(tmp_path)
    (root / ".tmp_step_000009").mkdir()  # a write that was killed midway
    (root / "step_000007").mkdir()  # no COMPLETE marker: ignored
    assert latest_checkpoint(root).name == "step_000001"
    assert [p.name for p in complete_checkpoints(root)] == ["step_000001"]
    assert {"COMPLETE", "trainer_state.pt", "rng_rank0.pt"} <= {p.name for p in (root / "step_000001").iterdir()}


def test_incomplete_checkpoint_is_a_clear_error(tmp_path):
    from ebpo_megatron.trainer.checkpoint import CheckpointError, load_checkpoint

    (tmp_path / "step_000003").mkdir()
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        load_checkpoint(tmp_path / "step_000003", trainer=None)
