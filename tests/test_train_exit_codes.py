"""``ebpo-train``'s exit statuses: bad input of any kind (a config value, a data file, a damaged
checkpoint: every ValueError, CheckpointError included, and a missing file) is one line
``ebpo-train: error: ...`` and status 2; a NaN loss is status 1 (train.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ebpo_megatron import train
from ebpo_megatron.trainer import run as run_module
from ebpo_megatron.trainer.checkpoint import CheckpointError
from ebpo_megatron.trainer.rl_loop import NonFiniteLoss

CONFIG = str(Path(__file__).resolve().parents[1] / "examples" / "tiny_cpu.yaml")


def _undecodable() -> UnicodeDecodeError:
    try:
        b"caf\xe9".decode("utf-8")
    except UnicodeDecodeError as err:
        return err
    raise AssertionError("unreachable")


def _json_error() -> json.JSONDecodeError:
    try:
        json.loads("{")
    except json.JSONDecodeError as err:
        return err
    raise AssertionError("unreachable")


@pytest.mark.parametrize(
    "error,status",
    [
        (CheckpointError("runs/x/checkpoints/step_000003/trainer_state.pt: truncated"), 2),
        (ValueError("data.train_files: no usable prompt\n(all 3 rows over max_prompt_tokens)"), 2),
        (_undecodable(), 2),
        (_json_error(), 2),
        (FileNotFoundError("math dataset not found: x.jsonl"), 2),
        (NonFiniteLoss("step 4: loss is nan; stopping without saving. Last good checkpoint: none"), 1),
    ],
    ids=["checkpoint", "multi-line ValueError", "UnicodeDecodeError", "JSONDecodeError", "missing file", "NaN loss"],
)
def test_errors_are_one_line_with_the_documented_status(monkeypatch, capsys, error, status):
    def failing_run(config):
        raise error

    monkeypatch.setattr(run_module, "run", failing_run)
    assert train.main(["--config", CONFIG]) == status
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["ebpo-train: error: " + " ".join(str(error).splitlines())], lines
