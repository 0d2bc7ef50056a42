"""Write and read a PyTorch Distributed Checkpoint (the ``torch_dist`` backend of Megatron's
``dist_checkpointing``) one chunk at a time.

``torch.distributed.checkpoint.save`` normally takes a state dict of materialized tensors. Here
the save plan is made from chunk descriptions alone (key, global shape, offset, dtype) and each
chunk's data is produced only when the storage writer asks for it (``resolve_data``); with
``thread_count=1`` the file-system writer resolves, writes and drops one item at a time, so
memory holds one chunk whatever the checkpoint size. Reading asks for any slice of a stored
tensor (e.g. one layer of a stacked key); the reader fetches only the stored chunks it overlaps.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint import load as dcp_load
from torch.distributed.checkpoint import save as dcp_save
from torch.distributed.checkpoint.default_planner import (
    DefaultLoadPlanner,
    DefaultSavePlanner,
)
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
)
from torch.distributed.checkpoint.planner import (
    LoadPlan,
    SavePlan,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.planner_helpers import (
    create_read_items_for_chunk_list,
)


@dataclass(frozen=True)
class TensorChunk:
    """The slice of tensor ``key`` (global shape ``global_shape``) starting at ``offset``."""

    key: str
    global_shape: tuple[int, ...]
    offset: tuple[int, ...]
    shape: tuple[int, ...]
    dtype: torch.dtype

    def write_item(self) -> WriteItem:
        return WriteItem(
            index=MetadataIndex(self.key, torch.Size(self.offset)), type=WriteItemType.SHARD,
            tensor_data=TensorWriteData(
                chunk=ChunkStorageMetadata(offsets=torch.Size(self.offset), sizes=torch.Size(self.shape)),
                properties=TensorProperties(dtype=self.dtype), size=torch.Size(self.global_shape)),
        )


class _LazySavePlanner(DefaultSavePlanner):
    """A save planner whose plan is given and whose data is produced on request."""

    def __init__(self, chunks: list[TensorChunk], objects: list[str],
                 make_chunk: Callable[[TensorChunk], torch.Tensor], make_object: Callable[[str], bytes]) -> None:
        super().__init__()
        self._chunks = {c.key + str(tuple(c.offset)): c for c in chunks}
        self._items = [c.write_item() for c in chunks] + [
            WriteItem(index=MetadataIndex(key), type=WriteItemType.BYTE_IO) for key in objects]
        self._make_chunk, self._make_object = make_chunk, make_object

    def create_local_plan(self) -> SavePlan:
        self.plan = SavePlan(self._items, planner_data={})
        return self.plan

    def resolve_data(self, write_item: WriteItem):
        if write_item.type == WriteItemType.BYTE_IO:
            return io.BytesIO(self._make_object(write_item.index.fqn))
        chunk = self._chunks[write_item.index.fqn + str(tuple(write_item.index.offset))]
        data = self._make_chunk(chunk)
        if tuple(data.shape) != chunk.shape or data.dtype != chunk.dtype:
            raise ValueError(f"{chunk.key} at {chunk.offset}: produced {tuple(data.shape)} {data.dtype}, "
                             f"planned {chunk.shape} {chunk.dtype}")
        return data.contiguous()


def write_checkpoint(out_dir: Path, chunks: list[TensorChunk], objects: list[str],
                     make_chunk: Callable[[TensorChunk], torch.Tensor], make_object: Callable[[str], bytes]) -> None:
    """Save ``chunks`` (data from ``make_chunk``) and byte objects (from ``make_object``) as a
    distributed checkpoint in ``out_dir``, in this process alone."""
    writer = FileSystemWriter(str(out_dir), single_file_per_rank=True, thread_count=1, sync_files=False)
    dcp_save({}, storage_writer=writer, planner=_LazySavePlanner(chunks, objects, make_chunk, make_object),
             no_dist=True)


class _SliceLoadPlanner(DefaultLoadPlanner):
    """Reads, for each key, the slice starting at ``offsets[key]`` with its buffer's shape."""

    def __init__(self, offsets: dict[str, tuple[int, ...]]) -> None:
        super().__init__(flatten_state_dict=False)
        self._offsets = offsets

    def create_local_plan(self) -> LoadPlan:
        items = []
        for key, buffer in self.state_dict.items():
            stored = self.metadata.state_dict_metadata[key]
            wanted = ChunkStorageMetadata(offsets=torch.Size(self._offsets[key]), sizes=buffer.shape)
            items += create_read_items_for_chunk_list(key, stored, [wanted])
        return LoadPlan(items)

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        return self.state_dict[index.fqn]


def read_slices(ckpt_dir: Path, requests: dict[str, tuple[tuple[int, ...], tuple[int, ...], torch.dtype]]
                ) -> dict[str, torch.Tensor]:
    """``{key: tensor}`` for requests ``{key: (offset, shape, dtype)}`` (one slice per key)."""
    buffers = {key: torch.empty(shape, dtype=dtype) for key, (_, shape, dtype) in requests.items()}
    dcp_load(buffers, storage_reader=FileSystemReader(str(ckpt_dir)),
             planner=_SliceLoadPlanner({key: offset for key, (offset, _, _) in requests.items()}), no_dist=True)
    return buffers


def stored_tensors(ckpt_dir: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Global shape and dtype of every tensor stored in a distributed checkpoint."""
    metadata = FileSystemReader(str(ckpt_dir)).read_metadata().state_dict_metadata
    return {key: (tuple(md.size), md.properties.dtype) for key, md in metadata.items() if hasattr(md, "size")}
