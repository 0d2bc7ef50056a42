"""Hugging Face safetensors checkpoints read and written one tensor at a time.

Reading: ``model.safetensors`` or shards listed in ``model.safetensors.index.json``; a tensor
is read from its shard only when asked for, and the shard is closed again (an open safetensors
file is memory-mapped, and every page read would stay resident), so memory holds one tensor
(plus what the caller keeps). Writing: tensors are buffered until a shard reaches ``max_shard_bytes``, then the shard
is written and freed; the index maps every tensor to its shard, as ``save_pretrained`` does.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .hf_config import read_json

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# Non-weight files copied next to converted weights so the result loads with transformers.
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja",
              "added_tokens.json")


class HFCheckpointError(ValueError):
    """A Hugging Face checkpoint cannot be used; the message names the file and the problem."""


@contextmanager
def open_safetensors(path: Path) -> Iterator[Any]:
    """``safe_open(path)``; a truncated or damaged file is an :class:`HFCheckpointError` naming it."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            yield f
    except (SafetensorError, OSError) as err:
        raise HFCheckpointError(f"{path}: not a readable safetensors file ({err})") from None


class HFCheckpointReader:
    """Lazy access to the tensors of an HF checkpoint directory."""

    def __init__(self, hf_dir: Path) -> None:
        self.dir = Path(hf_dir)
        index = self.dir / INDEX
        if index.is_file():
            content = read_json(index)
            weight_map = content.get("weight_map") if isinstance(content, dict) else None
        elif (self.dir / SINGLE).is_file():
            with open_safetensors(self.dir / SINGLE) as f:
                weight_map = {name: SINGLE for name in f.keys()}
        else:
            raise HFCheckpointError(f"{self.dir}: neither {INDEX} nor {SINGLE} found")
        if not isinstance(weight_map, dict) or not all(isinstance(s, str) for s in weight_map.values()):
            raise HFCheckpointError(f"{index}: no \"weight_map\" object mapping tensor names to shard files")
        missing = sorted({s for s in weight_map.values() if not (self.dir / s).is_file()})
        if missing:
            raise HFCheckpointError(f"{index}: shard file(s) {missing} listed in the index are missing from {self.dir}")
        self.weight_map: dict[str, str] = weight_map
        self._shapes: dict[str, tuple[int, ...]] = {}
        for shard in sorted(set(weight_map.values())):
            with open_safetensors(self.dir / shard) as f:
                self._shapes.update({n: tuple(f.get_slice(n).get_shape()) for n in f.keys()})

    def _shard(self, name: str) -> Path:
        if name not in self.weight_map:
            raise HFCheckpointError(f"{self.dir}: tensor {name!r} is not in the checkpoint")
        return self.dir / self.weight_map[name]

    def shape(self, name: str) -> tuple[int, ...]:
        self._shard(name)
        return self._shapes[name]

    def get(self, name: str) -> torch.Tensor:
        with open_safetensors(self._shard(name)) as f:
            return f.get_tensor(name)

    def names(self) -> list[str]:
        return sorted(self.weight_map)


def write_hf_checkpoint(out_dir: Path, tensors: Iterable[tuple[str, torch.Tensor]], max_shard_bytes: int) -> int:
    """Write ``tensors`` as sharded safetensors + index into ``out_dir``; returns the number of
    tensors. At most one shard (or one tensor larger than ``max_shard_bytes``) is in memory."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    shard_files: list[str] = []
    size = total = 0

    def flush() -> None:
        nonlocal shard, size
        name = f"model-{len(shard_files) + 1:05d}.safetensors"
        save_file(shard, str(out_dir / name), metadata={"format": "pt"})
        shard_files.append(name)
        weight_map.update({k: name for k in shard})
        shard, size = {}, 0

    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > max_shard_bytes:
            flush()
        shard[name] = tensor.contiguous()
        size += nbytes
        total += nbytes
    if shard:
        flush()
    count = len(weight_map)
    renamed = {f: f.replace(".safetensors", f"-of-{len(shard_files):05d}.safetensors") for f in shard_files}
    for old, new in renamed.items():
        (out_dir / old).rename(out_dir / new)
    index = {"metadata": {"total_size": total}, "weight_map": {k: renamed[v] for k, v in sorted(weight_map.items())}}
    (out_dir / INDEX).write_text(json.dumps(index, indent=1))
    return count


def copy_side_files(src_dir: Path, out_dir: Path) -> list[str]:
    """Copy config, generation config and tokenizer files from ``src_dir``; returns their names."""
    copied = []
    for name in SIDE_FILES:
        if (Path(src_dir) / name).is_file():
            shutil.copy2(Path(src_dir) / name, Path(out_dir) / name)
            copied.append(name)
    return copied
