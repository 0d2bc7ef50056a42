"""Checkpoints: Megatron ``dist_checkpointing`` (sharded, re-loadable under another TP/PP/DP
layout) for model and optimizer, plus the trainer's own state, written atomically.

Layout of ``<run_dir>/checkpoints/``:
    step_000012/            a complete checkpoint (has the file COMPLETE)
        <dist_checkpointing files>    model + distributed optimizer ("fully_reshardable")
        trainer_state.pt    step, LR scheduler, EBPO prior, sampler position, anything else
        rng_rank<r>.pt      torch / python / numpy RNG states of rank r
        MANIFEST.json       size and xxh3-128 checksum of every file above (checkpoint_manifest.py)
        COMPLETE
        CORRUPT             only after a resume found it damaged: why; it is then never loaded again
    .tmp_step_000013/       a checkpoint being written (ignored, removed on the next save)
    .trash_step_000004/     a checkpoint being removed (ignored, removed on the next save)

A checkpoint is written into the temporary directory and renamed only when every rank has
finished, so a crash or kill mid-write leaves the previous checkpoint as the latest complete one
(a write that fails, e.g. on a full disk, is a :class:`CheckpointError` naming the directory, the
cause and the disk's free space); a checkpoint is renamed away before it is deleted, so a kill
mid-delete never leaves half of one.

Resume (:func:`resume_checkpoint`) checks the newest complete checkpoint against its manifest
first: a damaged one is named and skipped for the next older one (``run.on_bad_checkpoint:
fallback``) or stops the run (``stop``). A checkpoint without a manifest (written before
checksums were recorded) is loaded unverified, with a warning. Rotation (``keep_last``) counts
only checkpoints with a manifest that were not found damaged, so the newest good one stays.
Every load failure is a :class:`CheckpointError` whose one-line message names the file.
"""

from __future__ import annotations

import os
import random
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from torch.distributed.checkpoint.api import CheckpointException

from ..parallel.megatron_patches import unshare_adam_steps
from .checkpoint_manifest import MANIFEST, verify_manifest, write_manifest
from .policy_trainer import PolicyTrainer

COMPLETE = "COMPLETE"
CORRUPT = "CORRUPT"
ON_BAD_CHECKPOINT = ("fallback", "stop")
_SHARDING = {"distrib_optim_sharding_type": "fully_reshardable"}


class CheckpointError(ValueError):
    """A checkpoint cannot be used or written; the one-line message names the file or directory and
    what is wrong."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint's files differ from its manifest: damaged after it was written."""


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def checkpoint_dir(root: Path, step: int) -> Path:
    """Where checkpoint ``step`` lives under ``root``."""
    return root / f"step_{step:06d}"


def _step(path: Path) -> int:
    return int(path.name.split("_")[1])


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root`` not marked CORRUPT, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step_*") if (p / COMPLETE).is_file() and not (p / CORRUPT).exists()]
    return sorted(found, key=_step)


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


def _discard(path: Path) -> None:
    """Remove a checkpoint directory: renamed away first, so a kill never leaves half of it."""
    trash = path.with_name(f".trash_{path.name}")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _rotate(root: Path, keep_last: int, keep_steps: tuple[int, ...]) -> None:
    """Keep the newest ``keep_last`` verified checkpoints (with a manifest, not marked CORRUPT)
    and ``keep_steps``; remove every complete checkpoint older than the oldest one kept."""
    verified = [p for p in complete_checkpoints(root) if (p / MANIFEST).is_file()]
    window = verified[-keep_last:]
    if not window:
        return
    kept = set(window) | {checkpoint_dir(root, s) for s in keep_steps}
    for old in complete_checkpoints(root):
        if old not in kept and _step(old) < _step(window[0]):
            _discard(old)


def save_checkpoint(root: Path, step: int, trainer: PolicyTrainer, state: dict[str, Any],
                    keep_last: int | None = None, keep_steps: tuple[int, ...] = ()) -> Path:
    """Write checkpoint ``step`` (all ranks call this); returns its final directory.

    ``state`` is the trainer's own picklable state (prior, sampler, ...); the LR scheduler and
    the step are added here. Every file is checksummed into ``MANIFEST.json`` before the
    checkpoint is marked complete. ``keep_last`` rotates older checkpoints out (see
    :func:`_rotate`), except ``keep_steps``.
    """
    root = Path(root)
    tmp = root / f".tmp_step_{step:06d}"
    final = checkpoint_dir(root, step)
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in [*root.glob(".tmp_step_*"), *root.glob(".trash_*")]:
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    try:
        dist_checkpointing.save(_sharded_state_dict(trainer, is_loading=False), str(tmp))
        torch.save(_rng_state(), tmp / f"rng_rank{_rank()}.pt")
        if _rank() == 0:
            torch.save({"step": step, "scheduler": trainer.scheduler.state_dict(), **state},
                       tmp / "trainer_state.pt")
    except Exception as err:  # noqa: BLE001 - a full disk surfaces as several error types
        free = shutil.disk_usage(root).free / 2**30
        raise CheckpointError(
            f"{tmp}: writing checkpoint step {step} failed ({_one_line(err)}); {free:.2f} GiB free on "
            f"that disk. The last complete checkpoint in {root} is untouched (the partial one is "
            "removed at the next save)") from err
    _barrier()
    write_manifest(tmp)
    if _rank() == 0:
        (tmp / COMPLETE).write_text(f"{step}\n")
        if final.exists():
            _discard(final)
        os.replace(tmp, final)
        if keep_last:
            _rotate(root, keep_last, keep_steps)
    _barrier()
    return final


def _one_line(err: BaseException) -> str:
    """``Type: first line`` of an exception (for a CheckpointException, of its first rank's failure)."""
    if isinstance(err, CheckpointException) and err.failures:
        err = next(iter(err.failures.values()))[0]
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"[:500]


def _verify(path: Path, warn_unverified: bool = True) -> None:
    """Check ``path`` against its manifest (all ranks): CorruptCheckpointError naming the first
    damaged file; without a manifest, a warning (``warn_unverified``) that it is loaded unverified."""
    problems = verify_manifest(path)
    if problems is None:
        if warn_unverified and _rank() == 0:
            print(f"[checkpoint] warning: {path} has no {MANIFEST} (written before checksums were "
                  "recorded): loading it unverified", file=sys.stderr, flush=True)
        return
    if problems:
        more = f" (and {len(problems) - 1} more damaged file(s))" if len(problems) > 1 else ""
        raise CorruptCheckpointError(problems[0] + more)


def _load_pickle(path: Path) -> Any:
    """``torch.load`` of a small pickled file; CheckpointError naming it when it is unreadable."""
    try:
        return torch.load(path, weights_only=False)
    except Exception as err:  # noqa: BLE001 - a truncated or garbled file raises many types
        raise CheckpointError(f"{path}: unreadable ({_one_line(err)})") from err


def _load_sharded(path: Path, sharded: dict[str, Any]) -> dict[str, Any]:
    """``dist_checkpointing.load`` with every failure (CheckpointException is a BaseException) as
    one CheckpointError line."""
    try:
        return dist_checkpointing.load(sharded, str(path))
    except (Exception, CheckpointException) as err:  # dist_checkpointing raises several types
        raise CheckpointError(
            f"{path}: cannot load the model/optimizer ({_one_line(err)}); a damaged file, or a "
            "checkpoint of another architecture?"
        ) from err


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
    _verify(path)
    state = _load_pickle(state_file)
    rng_file = path / f"rng_rank{_rank()}.pt"
    rng = _load_pickle(rng_file) if rng_file.is_file() else None  # absent on more ranks than saved
    # torch's AdamW creates its state lazily; the distributed optimizer's loader needs it to
    # exist (distrib_optimizer.py:642 asserts one step per group), so prime it with zero steps.
    for opt in getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer]):
        opt._init_optimizer_states_with_dummy_values()
    loaded = _load_sharded(path, _sharded_state_dict(trainer, is_loading=True))
    for i, chunk in enumerate(trainer.chunks):
        chunk.module.load_state_dict(loaded["model" if len(trainer.chunks) == 1 else f"model{i}"])
    with torch.no_grad():  # main params are views of parameters that require grad
        trainer.optimizer.load_state_dict(loaded["optimizer"])
    unshare_adam_steps(trainer.optimizer)
    trainer.scheduler.load_state_dict(state.pop("scheduler"))
    if rng is not None:
        _set_rng_state(rng)
    return state


def resume_checkpoint(root: Path, trainer: PolicyTrainer, on_bad: str = "fallback") -> dict[str, Any] | None:
    """Load the newest complete checkpoint under ``root`` that verifies (all ranks call this);
    returns its trainer state, or None when there is no checkpoint.

    A damaged checkpoint (:class:`CorruptCheckpointError`) is named on stderr; with ``on_bad``
    "fallback" the next older one is tried and, once one loads, the damaged ones are marked
    CORRUPT (never loaded or counted by rotation again); with "stop" the error is raised. When
    none verifies, CheckpointError (nothing is marked, so a rerun says the same).
    """
    if on_bad not in ON_BAD_CHECKPOINT:
        raise ValueError(f"on_bad: expected one of {ON_BAD_CHECKPOINT}, got {on_bad!r}")
    root = Path(root)
    damaged: list[tuple[Path, str]] = []
    for path in reversed(complete_checkpoints(root)):
        try:
            state = load_checkpoint(path, trainer)
        except CorruptCheckpointError as err:
            if on_bad == "stop":
                raise CorruptCheckpointError(f"{err}; not resuming (run.on_bad_checkpoint: stop): move "
                                             f"{path} away or set run.on_bad_checkpoint=fallback") from err
            if _rank() == 0:
                print(f"[checkpoint] {path.name} is damaged, trying an older checkpoint: {err}",
                      file=sys.stderr, flush=True)
            damaged.append((path, str(err)))
            continue
        if _rank() == 0:
            for bad, reason in damaged:
                (bad / CORRUPT).write_text(reason + "\n")
        return state
    if damaged:
        raise CheckpointError(f"no checkpoint under {root} verifies ({len(damaged)} damaged, newest: "
                              f"{damaged[0][1]}); delete {root} to start afresh")
    return None


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
    write_manifest(tmp)
    if _rank() == 0:
        (tmp / COMPLETE).write_text("model\n")
        if root.exists():
            _discard(root)
        os.replace(tmp, root)
    _barrier()


def load_model(root: Path, chunks: list[torch.nn.Module]) -> None:
    """Model weights from a ``save_model``, converted or training checkpoint (all ranks), checked
    against its manifest when it has one (a converted checkpoint has none)."""
    root = Path(root)
    if not (root / COMPLETE).is_file():
        raise CheckpointError(f"{root}: not a complete model checkpoint (no {COMPLETE} marker)")
    _verify(root, warn_unverified=False)
    loaded = _load_sharded(root, {"model": _model_state(chunks)})
    for i, chunk in enumerate(chunks):
        getattr(chunk, "module", chunk).load_state_dict(loaded["model"][i])


def _model_state(chunks: list[torch.nn.Module]) -> list[dict[str, Any]]:
    return [getattr(c, "module", c).sharded_state_dict() for c in chunks]
