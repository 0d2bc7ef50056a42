"""Checksums of a checkpoint's files: ``MANIFEST.json``, written when the checkpoint is complete
and checked before it is loaded.

The manifest maps every file of the directory (path relative to it) to its size and the
xxh3-128 digest of its bytes. xxh3 is not cryptographic: it detects damage (flipped bits, a
truncated or missing file), not tampering. It hashes several GB/s on one core (blake2b: 0.46),
so the manifest adds about 1 % to a save; the measurement is in docs/architecture.md (Checkpoints).

Both functions are collective: every rank calls them, after every rank has written its files.
Rank 0 lists the files (or reads the manifest) and spreads them over the ranks by size, each rank
hashes its share, and the results are gathered, so the manifest of a TP/PP/DP checkpoint covers
the files of every rank and each rank hashes about 1/world of the bytes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch.distributed as dist
import xxhash

MANIFEST = "MANIFEST.json"
HASH = "xxh3_128"
_CHUNK = 8 << 20


def file_digest(path: Path) -> str:
    """The xxh3-128 digest of the file's bytes (hex), read in 8 MiB chunks."""
    digest = xxhash.xxh3_128()
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while size := f.readinto(buffer):
            digest.update(view[:size])
    return digest.hexdigest()


def _distributed() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _from_rank0(value: Any) -> Any:
    """Rank 0's ``value`` on every rank."""
    if not _distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gathered(values: list[Any]) -> list[Any]:
    """Every rank's ``values``, concatenated in rank order, on every rank."""
    if not _distributed():
        return values
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, values)
    return [v for part in out for v in part]


def _my_share(sizes: dict[str, int]) -> list[str]:
    """This rank's files: largest first, each to the rank with the fewest bytes so far."""
    world = dist.get_world_size() if _distributed() else 1
    load = [0] * world
    mine: list[str] = []
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        rank = load.index(min(load))
        load[rank] += sizes[name]
        if rank == _rank():
            mine.append(name)
    return mine


def write_manifest(directory: Path) -> None:
    """Checksum every file of ``directory``; rank 0 writes ``MANIFEST.json`` into it (collective)."""
    directory = Path(directory)
    sizes = None
    if _rank() == 0:
        sizes = {p.relative_to(directory).as_posix(): p.stat().st_size
                 for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST}
    sizes = _from_rank0(sizes)
    digests = dict(_gathered([(name, file_digest(directory / name)) for name in _my_share(sizes)]))
    if _rank() == 0:
        files = {name: {"size": sizes[name], HASH: digests[name]} for name in sorted(sizes)}
        (directory / MANIFEST).write_text(json.dumps({"hash": HASH, "files": files}, indent=0) + "\n")


def _read_manifest(directory: Path) -> dict[str, dict[str, Any]] | str | None:
    """The manifest's files, a one-line problem when it cannot be read, or None when absent."""
    path = directory / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        if manifest["hash"] != HASH or not all({"size", HASH} <= set(e) for e in files.values()):
            raise ValueError(f"expected hash {HASH} with a size and digest per file")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as err:
        return f"{path}: unreadable manifest ({type(err).__name__}: {err})"
    return files


def _check(path: Path, entry: dict[str, Any]) -> str | None:
    if not path.is_file():
        return f"{path}: missing (listed in {MANIFEST})"
    size = path.stat().st_size
    if size != entry["size"]:
        return f"{path}: {size} bytes, {MANIFEST} recorded {entry['size']} (truncated or overwritten)"
    if file_digest(path) != entry[HASH]:
        return f"{path}: checksum mismatch (the bytes changed since the checkpoint was written)"
    return None


def verify_manifest(directory: Path) -> list[str] | None:
    """Check ``directory`` against its manifest (collective): the problems found, one line each
    naming the file (empty when every file matches), or None when it has no manifest."""
    directory = Path(directory)
    files = _from_rank0(_read_manifest(directory) if _rank() == 0 else None)
    if files is None or isinstance(files, str):
        return None if files is None else [files]
    mine = _my_share({name: entry["size"] for name, entry in files.items()})
    problems = [p for p in (_check(directory / name, files[name]) for name in mine) if p is not None]
    return sorted(_gathered(problems))
