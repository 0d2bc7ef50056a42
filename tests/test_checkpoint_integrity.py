"""Damaged checkpoints are never trained on: every file is checksummed into MANIFEST.json when a
checkpoint completes (the files of every TP/DP rank), resume verifies it and falls back to the
newest checkpoint that verifies (or stops), rotation never removes the newest good checkpoint,
every damaged file ends in a one-line CheckpointError, and a SIGKILL in the middle of a save
resumes bit-exactly from the newest complete checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mp_utils import run_ranks
from test_checkpoint import CFG, batch_for

HERE = Path(__file__).resolve().parent


def flip_bits(path: Path, count: int = 4096) -> None:
    """Invert ``count`` bytes in the middle of ``path`` (same size, different bytes)."""
    data = bytearray(path.read_bytes())
    start = max(len(data) // 2 - count // 2, 0)
    data[start:start + count] = bytes(b ^ 0xFF for b in data[start:start + count])
    path.write_bytes(bytes(data))


def truncate(path: Path, keep: float = 0.5) -> None:
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])


def _trainer(tp: int):
    from ebpo_megatron.models import build_policy
    from ebpo_megatron.parallel import ParallelConfig, cpu_compat, initialize
    from ebpo_megatron.config.training import LossConfig, OptimConfig, StepConfig
    from ebpo_megatron.trainer.policy_trainer import PolicyTrainer

    parallel = ParallelConfig(tensor_parallel=tp)
    initialize(parallel, CFG)
    cpu_compat.set_seed(0)
    return PolicyTrainer(build_policy(CFG, parallel), OptimConfig(lr=1e-2, warmup_steps=2),
                         LossConfig(kl_coef=0.0), StepConfig(micro_batch_size=2, step_kl=False))


def _train(trainer, step: int) -> None:
    from megatron.core import parallel_state

    dp, rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    trainer.train_step(batch_for(step).select(slice(rank * 8 // dp, (rank + 1) * 8 // dp)))


def _save_two(rank, world, tp, root):
    """Train and save steps 1 and 2 (keep_last=2); the full weights after step 1."""
    from ebpo_megatron.models.weights import full_weights
    from ebpo_megatron.trainer.checkpoint import save_checkpoint

    trainer = _trainer(tp)
    weights = {}
    for step in (1, 2):
        _train(trainer, step)
        weights[step] = full_weights(trainer.chunks)
        save_checkpoint(Path(root), step, trainer, {"extra": step}, keep_last=2)
    return weights


def _verify(rank, world, tp, directory):
    from ebpo_megatron.trainer.checkpoint_manifest import verify_manifest

    _trainer(tp)  # the process groups
    return verify_manifest(Path(directory))


@pytest.mark.parametrize("world,tp", [(2, 1), (2, 2)], ids=["DP2", "TP2"])
def test_manifest_lists_every_rank_file_and_names_a_damaged_one(tmp_path, world, tp):
    run_ranks(_save_two, world, tp, str(tmp_path))
    step = tmp_path / "step_000002"
    manifest = json.loads((step / "MANIFEST.json").read_text())
    on_disk = {p.name for p in step.iterdir()} - {"MANIFEST.json", "COMPLETE"}
    assert set(manifest["files"]) == on_disk
    assert {"rng_rank0.pt", "rng_rank1.pt", "trainer_state.pt", ".metadata"} <= on_disk
    assert run_ranks(_verify, world, tp, str(step)) == [[]] * world
    last_rank_file = sorted(step.glob(f"__{world - 1 if tp > 1 else 0}_*.distcp"))[-1]
    flip_bits(last_rank_file)
    for got in run_ranks(_verify, world, tp, str(step)):  # every rank reaches the same verdict
        assert got == [f"{last_rank_file}: checksum mismatch (the bytes changed since the checkpoint was written)"]


def _resume_then_save(rank, world, root, on_bad):
    """Resume (``on_bad``), train the next step and save it as step 3 with keep_last=2."""
    from ebpo_megatron.models.weights import full_weights
    from ebpo_megatron.trainer.checkpoint import CheckpointError, complete_checkpoints, resume_checkpoint, \
        save_checkpoint

    trainer = _trainer(1)
    try:
        state = resume_checkpoint(Path(root), trainer, on_bad)
    except CheckpointError as err:
        return {"error": str(err), "type": type(err).__name__}
    loaded = full_weights(trainer.chunks)
    _train(trainer, state["step"] + 1)
    save_checkpoint(Path(root), 3, trainer, {"extra": 3}, keep_last=2)
    return {"step": state["step"], "loaded": loaded, "kept": [p.name for p in complete_checkpoints(Path(root))]}


def _save_on_a_full_disk(rank, world, root):
    """Save step 1, then step 2 with every write failing as on a full disk."""
    from megatron.core import dist_checkpointing

    from ebpo_megatron.trainer import checkpoint
    from ebpo_megatron.trainer.checkpoint import CheckpointError, complete_checkpoints, save_checkpoint

    trainer = _trainer(1)
    _train(trainer, 1)
    save_checkpoint(Path(root), 1, trainer, {"extra": 1}, keep_last=2)

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    checkpoint.dist_checkpointing = type("FullDisk", (), {"save": staticmethod(no_space),
                                                          "load": dist_checkpointing.load})
    _train(trainer, 2)
    try:
        save_checkpoint(Path(root), 2, trainer, {"extra": 2}, keep_last=2)
    except CheckpointError as err:
        return {"error": str(err), "kept": [p.name for p in complete_checkpoints(Path(root))]}
    return {"error": None}


def test_a_failed_save_is_one_clear_error_and_keeps_the_last_checkpoint(tmp_path):
    """A write that fails (here: no space left on the disk) stops with a CheckpointError naming
    the directory, the step, the cause and the free space; the previous checkpoint stays complete."""
    out = run_ranks(_save_on_a_full_disk, 1, str(tmp_path))[0]
    assert out["error"] is not None and "\n" not in out["error"]
    assert str(tmp_path / ".tmp_step_000002") in out["error"] and "checkpoint step 2" in out["error"]
    assert "No space left on device" in out["error"] and "GiB free" in out["error"]
    assert out["kept"] == ["step_000001"]


def test_damaged_newest_checkpoint_falls_back_and_rotation_keeps_the_good_one(tmp_path, capfd):
    saved = run_ranks(_save_two, 1, 1, str(tmp_path))[0]
    damaged = tmp_path / "step_000002" / "__0_0.distcp"
    flip_bits(damaged)
    got = run_ranks(_resume_then_save, 1, str(tmp_path), "fallback")[0]
    assert "error" not in got, got
    assert got["step"] == 1
    assert all(torch.equal(got["loaded"][k], saved[1][k]) for k in saved[1])
    assert f"step_000002 is damaged, trying an older checkpoint: {damaged}: checksum mismatch" in capfd.readouterr().err
    assert (tmp_path / "step_000002" / "CORRUPT").is_file()  # never loaded or counted again
    # keep_last=2 counts verified checkpoints: the damaged step 2 does not push out step 1
    assert got["kept"] == ["step_000001", "step_000003"]


def test_damaged_checkpoint_stops_the_run_when_asked(tmp_path):
    run_ranks(_save_two, 1, 1, str(tmp_path))
    damaged = tmp_path / "step_000002" / "trainer_state.pt"
    truncate(damaged)
    got = run_ranks(_resume_then_save, 1, str(tmp_path), "stop")[0]
    assert got["type"] == "CorruptCheckpointError"
    assert got["error"].startswith(f"{damaged}: ") and "truncated" in got["error"] and "\n" not in got["error"]
    assert not (tmp_path / "step_000002" / "CORRUPT").exists()


def test_no_checkpoint_verifies_is_an_error_that_marks_nothing(tmp_path):
    run_ranks(_save_two, 1, 1, str(tmp_path))
    for step in ("step_000001", "step_000002"):
        (tmp_path / step / ".metadata").unlink()
    got = run_ranks(_resume_then_save, 1, str(tmp_path), "fallback")[0]
    assert got["error"].startswith(f"no checkpoint under {tmp_path} verifies (2 damaged, newest: "
                                   f"{tmp_path / 'step_000002' / '.metadata'}: missing")
    assert not list(tmp_path.glob("*/CORRUPT"))


def _load_latest(rank, world, root):
    from ebpo_megatron.trainer.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint

    try:
        load_checkpoint(latest_checkpoint(Path(root)), _trainer(1))
    except CheckpointError as err:
        return str(err)
    return None


@pytest.mark.parametrize("damage", ["truncated distcp", "empty trainer_state", "truncated rng"])
def test_damage_without_a_manifest_is_one_line(tmp_path, damage, capfd):
    """A checkpoint written before manifests (MANIFEST.json removed here) loads with a warning,
    and its damaged files still end in one CheckpointError line naming the file."""
    run_ranks(_save_two, 1, 1, str(tmp_path))
    step = tmp_path / "step_000002"
    (step / "MANIFEST.json").unlink()
    target = {"truncated distcp": "__0_0.distcp", "empty trainer_state": "trainer_state.pt",
              "truncated rng": "rng_rank0.pt"}[damage]
    truncate(step / target, 0.0 if damage.startswith("empty") else 0.5)
    error = run_ranks(_load_latest, 1, str(tmp_path))[0]
    assert error is not None and "\n" not in error
    assert str(step / target) in error or (target.endswith(".distcp") and error.startswith(f"{step}: cannot load"))
    assert "no MANIFEST.json" in capfd.readouterr().err


# ---------------------------------------------------------------- SIGKILL in the middle of a save
KILL_CHILD = HERE / "checkpoint_kill_child.py"


def _child(root: Path, mode: str, point: str) -> subprocess.Popen:
    """The child in its own process group (a kill takes its helper processes too), output in
    ``root/<mode>.log``."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    with open(root / f"{mode}.log", "w") as log:
        return subprocess.Popen([sys.executable, str(KILL_CHILD), str(root), mode, point], env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _finish(proc: subprocess.Popen, root: Path, mode: str) -> None:
    assert proc.wait(timeout=120) == 0, (root / f"{mode}.log").read_text()[-3000:]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """Steps 1..4, a checkpoint after steps 1..3 (keep_last=2), the state after each step."""
    root = tmp_path_factory.mktemp("uninterrupted")
    _finish(_child(root, "train", "none"), root, "train")
    return root


@pytest.mark.parametrize("point,newest", [("files_written", 2), ("hashing", 2), ("rotation", 3)])
def test_sigkill_mid_save_resumes_bit_exact_from_the_newest_complete_checkpoint(uninterrupted, tmp_path,
                                                                                point, newest):
    """The child blocks at ``point`` of its step-3 save (files written, not yet checksummed;
    checksumming; removing step 1 after step 3 is in place) and signals it with a file; it is
    SIGKILLed there. Resuming loads the newest complete checkpoint, which verifies; its state
    equals the uninterrupted run's at that step, and one more step equals the uninterrupted
    run's next step, bit for bit (weights, learning rate, RNG)."""
    proc = _child(tmp_path, "train", point)
    deadline = time.monotonic() + 120
    try:
        while not (tmp_path / "AT_KILL_POINT").exists():
            assert proc.poll() is None, (tmp_path / "train.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the child never reached its kill point"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    _finish(_child(tmp_path, "resume", "none"), tmp_path, "resume")
    resumed = torch.load(tmp_path / "resumed.pt", weights_only=False)
    assert resumed["step"] == newest and resumed["problems"] == []
    for got, step in ((resumed["loaded"], newest), (resumed["next"], newest + 1)):
        want = torch.load(uninterrupted / f"state_{step}.pt", weights_only=False)
        assert want["weights"].keys() == got["weights"].keys()
        assert all(torch.equal(want["weights"][k], got["weights"][k]) for k in want["weights"]), step
        assert want["lr"] == got["lr"] and torch.equal(want["rng"], got["rng"]), step
