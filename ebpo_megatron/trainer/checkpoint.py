"""Checkpoints: Megatron ``dist_checkpointing`` (sharded, re-loadable under another TP/PP/DP
layout) for model and optimizer, plus the trainer's own state, written atomically.

Layout of ``<run_dir>/checkpoints/``:
    step_000012/            a complete checkpoint (has the file COMPLETE)
        <dist_checkpointing files>    model + distributed optimizer ("fully_reshardable")
        trainer_state.pt    step, LR scheduler, EBPO prior, sampler position, anything else
        rng_rank<r>.pt      torch / python / numpy RNG states of rank r
        COMPLETE
    .tmp_step_000013/       a checkpoint being written (ignored, removed on the next save)

A checkpoint is written into the temporary directory and renamed only when every rank has
finished, so a crash or kill mid-write leaves the previous checkpoint as the latest complete one.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing

from . import megatron_fixes
from .policy_trainer import PolicyTrainer

COMPLETE = "COMPLETE"
_SHARDING = {"distrib_optim_sharding_type": "fully_reshardable"}


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message names the directory and what is wrong."""


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def checkpoint_dir(root: Path, step: int) -> Path:
    """Where checkpoint ``step`` lives under ``root``."""
    return root / f"step_{step:06d}"


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step_*") if (p / COMPLETE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def latest_checkpoint(root: Path) -> Path | None:
    done = complete_checkpoints(root)
    return done[-1] if done else None


def _sharded_state_dict(trainer: PolicyTrainer, is_loading: bool) -> dict[str, Any]:
    model_sd: dict[str, Any] = {}
    for i, chunk in enumerate(trainer.chunks):
        key = "model" if len(trainer.chunks) == 1 else f"model{i}"
        model_sd[key] = chunk.module.sharded_state_dict()
    merged = model_sd["model"] if len(trainer.chunks) == 1 else {
        k: v for sd in model_sd.values() for k, v in sd.items()}
    model_sd["optimizer"] = trainer.optimizer.sharded_state_dict(
        merged, is_loading=is_loading, metadata=_SHARDING
    )
    return model_sd


def _rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def save_checkpoint(root: Path, step: int, trainer: PolicyTrainer, state: dict[str, Any],
                    keep_last: int | None = None, keep_steps: tuple[int, ...] = ()) -> Path:
    """Write checkpoint ``step`` (all ranks call this); returns its final directory.

    ``state`` is the trainer's own picklable state (prior, sampler, ...); the LR scheduler and
    the step are added here. ``keep_last`` rotates older checkpoints out, except ``keep_steps``.
    """
    root = Path(root)
    tmp = root / f".tmp_step_{step:06d}"
    final = checkpoint_dir(root, step)
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp_step_*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    dist_checkpointing.save(_sharded_state_dict(trainer, is_loading=False), str(tmp))
    torch.save(_rng_state(), tmp / f"rng_rank{_rank()}.pt")
    if _rank() == 0:
        torch.save({"step": step, "scheduler": trainer.scheduler.state_dict(), **state},
                   tmp / "trainer_state.pt")
    _barrier()
    if _rank() == 0:
        (tmp / COMPLETE).write_text(f"{step}\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if keep_last:
            kept = {checkpoint_dir(root, s) for s in keep_steps}
            for old in complete_checkpoints(root)[:-keep_last]:
                if old not in kept:
                    shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(path: Path, trainer: PolicyTrainer) -> dict[str, Any]:
    """Load model, optimizer, scheduler and RNG states from ``path``; returns the trainer state.

    Works under another TP/PP/DP layout than the one that saved (fully reshardable format).
    """
    path = Path(path)
    if not (path / COMPLETE).is_file():
        raise CheckpointError(f"{path}: not a complete checkpoint (no {COMPLETE} marker)")
    state_file = path / "trainer_state.pt"
    if not state_file.is_file():
        raise CheckpointError(f"{path}: trainer_state.pt is missing")
    megatron_fixes.apply()
    # torch's AdamW creates its state lazily; the distributed optimizer's loader needs it to
    # exist (distrib_optimizer.py:642 asserts one step per group), so prime it with zero steps.
    for opt in getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer]):
        opt._init_optimizer_states_with_dummy_values()
    try:
        loaded = dist_checkpointing.load(_sharded_state_dict(trainer, is_loading=True), str(path))
    except Exception as err:  # dist_checkpointing raises several types for a mismatch
        raise CheckpointError(
            f"{path}: cannot load model/optimizer into this model ({type(err).__name__}: {err}). "
            "Was it saved from another architecture?"
        ) from err
    for i, chunk in enumerate(trainer.chunks):
        chunk.module.load_state_dict(loaded["model" if len(trainer.chunks) == 1 else f"model{i}"])
    with torch.no_grad():  # main params are views of parameters that require grad
        trainer.optimizer.load_state_dict(loaded["optimizer"])
    megatron_fixes.unshare_adam_steps(trainer.optimizer)
    state = torch.load(state_file, weights_only=False)
    trainer.scheduler.load_state_dict(state.pop("scheduler"))
    rng_file = path / f"rng_rank{_rank()}.pt"
    if rng_file.is_file():  # absent when resuming on more ranks than saved
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return state


def save_model(root: Path, chunks: list[torch.nn.Module]) -> None:
    """Model weights alone (e.g. the frozen reference policy), sharded and atomic."""
    root = Path(root)
    tmp = root.with_name(root.name + ".tmp")
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    dist_checkpointing.save({"model": _model_state(chunks)}, str(tmp))
    _barrier()
    if _rank() == 0:
        (tmp / COMPLETE).write_text("model\n")
        shutil.rmtree(root, ignore_errors=True)
        os.replace(tmp, root)
    _barrier()


def load_model(root: Path, chunks: list[torch.nn.Module]) -> None:
    root = Path(root)
    if not (root / COMPLETE).is_file():
        raise CheckpointError(f"{root}: not a complete model checkpoint (no {COMPLETE} marker)")
    loaded = dist_checkpointing.load({"model": _model_state(chunks)}, str(root))
    for i, chunk in enumerate(chunks):
        getattr(chunk, "module", chunk).load_state_dict(loaded["model"][i])


def _model_state(chunks: list[torch.nn.Module]) -> list[dict[str, Any]]:
    return [getattr(c, "module", c).sharded_state_dict() for c in chunks]
