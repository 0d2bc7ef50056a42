"""`ebpo-train` on damaged checkpoints: a newest checkpoint with flipped bits is named and skipped,
the run resumes from the newest one that verifies and retraces the uninterrupted run exactly;
each kind of damaged file ends the run with one line naming the file, never a traceback."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from test_checkpoint_integrity import flip_bits, truncate
from test_train_e2e import ROOT, command, comparable, env, last_rows

SAVES = ("run.save_every=2", "run.keep_last=2")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A 6-step run with checkpoints at steps 4 and 6 (and the KL reference)."""
    out = tmp_path_factory.mktemp("base")
    done = subprocess.run(command(out, *SAVES), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return out / "e2e"


def _copy(base: Path, tmp_path: Path) -> Path:
    run_dir = tmp_path / "e2e"
    shutil.copytree(base, run_dir)
    return run_dir


def test_damaged_newest_checkpoint_resumes_from_the_newest_good_one(base, tmp_path):
    from ebpo_megatron.trainer.checkpoint import complete_checkpoints
    from ebpo_megatron.trainer.checkpoint_manifest import verify_manifest

    run_dir = _copy(base, tmp_path)
    damaged = run_dir / "checkpoints/step_000006/__0_0.distcp"
    flip_bits(damaged)  # 4 KiB of flipped bits; the file keeps its size
    done = subprocess.run(command(tmp_path, *SAVES), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"step_000006 is damaged, trying an older checkpoint: {damaged}: checksum mismatch" in done.stderr
    assert "[resume] continuing from step 4" in done.stdout + done.stderr
    want, got = last_rows(base / "metrics.jsonl"), last_rows(run_dir / "metrics.jsonl")
    for step in (5, 6):  # retrained from step 4: the uninterrupted run's steps 5 and 6 exactly
        assert comparable(got[step]) == pytest.approx(comparable(want[step]), rel=1e-6, abs=1e-9), step
        assert got[step]["actor/param_norm"] == pytest.approx(want[step]["actor/param_norm"], rel=1e-9)
    kept = complete_checkpoints(run_dir / "checkpoints")
    assert [p.name for p in kept] == ["step_000004", "step_000006"]  # the good step 4 survived rotation
    assert all(verify_manifest(p) == [] for p in kept)


DAMAGE = {  # name: (file under the run directory, how it is damaged, what the message says)
    "truncated distcp": ("checkpoints/step_000006/__0_0.distcp", "truncate", "truncated"),
    "truncated trainer_state": ("checkpoints/step_000006/trainer_state.pt", "truncate", "truncated"),
    "empty rng": ("checkpoints/step_000006/rng_rank0.pt", "empty", "truncated"),
    "deleted .metadata": ("checkpoints/step_000006/.metadata", "delete", "missing"),
    "truncated reference": ("reference/__0_0.distcp", "truncate", "truncated"),
    "truncated distcp, no manifest": ("checkpoints/step_000006/__0_0.distcp", "legacy", "cannot load"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_file_ends_in_one_line_naming_it(base, tmp_path, damage):
    name, how, says = DAMAGE[damage]
    run_dir = _copy(base, tmp_path)
    path = run_dir / name
    if how == "delete":
        path.unlink()
    else:
        truncate(path, 0.0 if how == "empty" else 0.5)
    if how == "legacy":  # a checkpoint written before manifests: loaded unverified, with a warning
        (path.parent / "MANIFEST.json").unlink()
    done = subprocess.run(command(tmp_path, *SAVES, "run.on_bad_checkpoint=stop"), cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert "error: " in last and says in last, last
    assert str(path if how != "legacy" else path.parent) in last, last
