"""Child process of test_checkpoint_integrity's SIGKILL test (one rank, no torchrun).

``ROOT train POINT``: train steps 1..4 with a checkpoint after steps 1..3 (keep_last=2) and write
``state_<step>.pt`` (weights, learning rate, torch RNG) after each; with POINT other than
``none``, the step-3 save stops at POINT, touches ``ROOT/AT_KILL_POINT`` and waits to be killed.
``ROOT resume none``: resume, record the loaded state and the state after one more step, and the
checksum problems of every complete checkpoint, in ``ROOT/resumed.pt``.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import torch

from mp_utils import free_port


def _wait_for_kill(root: Path) -> None:
    (root / "AT_KILL_POINT").touch()
    time.sleep(3600)


def _stop_at(point: str, root: Path) -> None:
    """Make the step-3 save stop at ``point``."""
    from ebpo_megatron.trainer import checkpoint, checkpoint_manifest

    if point == "files_written":  # every rank's files are written, none checksummed
        checkpoint.write_manifest = lambda directory: _wait_for_kill(root)
    elif point == "hashing":  # in the middle of the manifest's checksums
        digest = checkpoint_manifest.file_digest

        def slow_digest(path: Path) -> str:
            _wait_for_kill(root)
            return digest(path)

        checkpoint_manifest.file_digest = slow_digest
    elif point == "rotation":  # step 3 is in place; half of step 1's files are deleted
        rmtree = shutil.rmtree

        def half_rmtree(path, *args, **kwargs):
            if Path(path).name == ".trash_step_000001" and Path(path).is_dir():
                for f in sorted(Path(path).iterdir())[::2]:
                    f.unlink()
                _wait_for_kill(root)
            return rmtree(path, *args, **kwargs)

        shutil.rmtree = half_rmtree


def _state(trainer) -> dict:
    from ebpo_megatron.models.weights import full_weights

    return {"weights": full_weights(trainer.chunks), "lr": trainer.optimizer.param_groups[0]["lr"],
            "rng": torch.get_rng_state()}


def main(root: Path, mode: str, point: str) -> None:
    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(free_port())})
    torch.set_num_threads(1)
    from ebpo_megatron.parallel import shutdown
    from ebpo_megatron.trainer.checkpoint import complete_checkpoints, resume_checkpoint, save_checkpoint
    from ebpo_megatron.trainer.checkpoint_manifest import verify_manifest
    from test_checkpoint_integrity import _train, _trainer

    trainer = _trainer(1)
    if mode == "train":
        for step in (1, 2, 3, 4):
            _train(trainer, step)
            if step == 3 and point != "none":
                _stop_at(point, root)
            if step <= 3:
                save_checkpoint(root, step, trainer, {"extra": step}, keep_last=2)
            torch.save(_state(trainer), root / f"state_{step}.pt")
    else:
        state = resume_checkpoint(root, trainer)
        loaded = _state(trainer)
        _train(trainer, state["step"] + 1)
        verdicts = [verify_manifest(c) for c in complete_checkpoints(root)]
        problems = [p for v in verdicts for p in (["no manifest"] if v is None else v)]
        torch.save({"step": state["step"], "loaded": loaded, "next": _state(trainer), "problems": problems},
                   root / "resumed.pt")
    shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3])
