"""Hugging Face checkpoint -> Megatron ``dist_checkpointing`` checkpoint, streamed.

Each checkpoint chunk (one tensor, or one layer's slice of a stacked key) is built from the HF
tensors it needs (:func:`models.hf_mapping.hf_to_megatron`: QKV interleaved per KV group,
[gate; up] for fc1, vocabulary rows zero-padded to V_pad) at the moment it is written, so peak
memory is a small multiple of the largest tensor. The checkpoint holds full (TP = PP = 1)
tensors; Megatron reads any TP/PP slice of them, so the trainer loads it under any layout whose
padded vocabulary matches (``--tp`` fixes V_pad = multiple of lcm(128, TP) and is validated).

Output directory: the checkpoint (``.metadata``, ``*.distcp``, ``common.pt``, ``metadata.json``,
``COMPLETE``), ``model.yaml`` (the ``model:`` block for a trainer config) and ``hf/`` (the
source's config and tokenizer files, used by the way back).
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from ..config.typed import to_dict
from ..models.config import ModelConfig
from ..models.hf_mapping import Layout, expected_hf_shapes, hf_to_megatron
from ..parallel.distributed import ParallelConfig, padded_vocab_size, validate_layout
from .dcp_stream import TensorChunk, write_checkpoint
from .hf_checkpoint import HFCheckpointError, HFCheckpointReader, copy_side_files
from .hf_config import model_config_from_hf, read_hf_config
from .megatron_schema import (
    CheckpointSchema,
    checkpoint_schema,
    megatron_single_process,
)
from .output_dir import staged_output

COMPLETE = "COMPLETE"
MODEL_YAML = "model.yaml"
HF_SIDE_DIR = "hf"
_IGNORED_HF = ("rotary_emb.inv_freq",)


@dataclass
class ConversionReport:
    model: ModelConfig
    tensors: int
    bytes_written: int
    seconds: float


def check_hf_tensors(reader: HFCheckpointReader, layout: Layout) -> None:
    """Every expected tensor present with its expected shape, nothing unexpected."""
    expected = expected_hf_shapes(layout)
    present = {n for n in reader.names() if not n.endswith(_IGNORED_HF)}
    if layout.tie_word_embeddings:
        present.discard("lm_head.weight")  # some tied checkpoints store the copy anyway
    missing, unexpected = sorted(set(expected) - present), sorted(present - set(expected))
    if missing:
        raise HFCheckpointError(f"{reader.dir}: {len(missing)} tensor(s) missing, e.g. {missing[:3]}")
    if unexpected:
        raise HFCheckpointError(f"{reader.dir}: {len(unexpected)} unexpected tensor(s) for this config, "
                                f"e.g. {unexpected[:3]}")
    for name, shape in expected.items():
        if reader.shape(name) != shape:
            raise HFCheckpointError(f"{reader.dir}: tensor {name} has shape {reader.shape(name)}, "
                                    f"expected {shape} from config.json")


def megatron_shapes(schema: CheckpointSchema, layout: Layout, padded_vocab: int) -> dict[str, tuple[int, ...]]:
    """Shape of every (per-layer) checkpoint tensor, from the HF shapes through the same mapping
    that converts the data (on meta tensors, so nothing is allocated)."""
    hf_shapes = expected_hf_shapes(layout)

    def meta(name: str) -> torch.Tensor:
        return torch.empty(hf_shapes[name], device="meta")

    return {e.key: tuple(hf_to_megatron(e.parameter_name(0), meta, layout, padded_vocab).shape)
            for e in schema.tensors}


def _plan(schema: CheckpointSchema, shapes: dict[str, tuple[int, ...]], num_layers: int,
          dtype: torch.dtype) -> list[TensorChunk]:
    chunks = []
    for entry in schema.tensors:
        shape = shapes[entry.key]
        if not entry.stacked:
            chunks.append(TensorChunk(entry.key, shape, (0,) * len(shape), shape, dtype))
            continue
        for layer in range(num_layers):
            chunks.append(TensorChunk(entry.key, (num_layers, *shape), (layer,) + (0,) * len(shape),
                                      (1, *shape), dtype))
    return chunks


def _object_key(key: str, layer: int, num_layers: int) -> str:
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject(key, None, (num_layers,), (layer,), replica_id=0).unique_key


def convert_hf_to_megatron(hf_dir: Path, out_dir: Path, tp: int = 1, pp: int = 1,
                           dtype: torch.dtype | None = None, overwrite: bool = False) -> ConversionReport:
    """Convert ``hf_dir`` into a Megatron checkpoint at ``out_dir``, written beside it and
    renamed when complete (:mod:`.output_dir`: a non-empty ``out_dir`` only with ``overwrite``,
    never one overlapping ``hf_dir``). ``dtype``: default the HF tensors' own."""
    started = time.time()
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    model = model_config_from_hf(read_hf_config(hf_dir), str(hf_dir / "config.json"))
    validate_layout(tp * pp, ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp), model)
    reader = HFCheckpointReader(hf_dir)
    layout = Layout.from_model_config(model)
    check_hf_tensors(reader, layout)
    dtype = dtype or reader.get("model.norm.weight").dtype
    padded = padded_vocab_size(model.vocab_size, tp)
    with staged_output(out_dir, [hf_dir], overwrite) as tmp, megatron_single_process(model):
        from megatron.core.dist_checkpointing.core import (
            CheckpointingConfig,
            save_config,
        )
        from megatron.core.dist_checkpointing.serialization import (
            get_default_save_common_strategy,
        )

        schema = checkpoint_schema(model)
        chunks = _plan(schema, megatron_shapes(schema, layout, padded), model.num_layers, dtype)
        by_key = {e.key: e for e in schema.tensors}
        objects = {_object_key(o.key, layer, model.num_layers): o.data
                   for o in schema.objects for layer in range(model.num_layers if o.stacked else 1)}

        def make_chunk(chunk: TensorChunk) -> torch.Tensor:
            entry = by_key[chunk.key]
            layer = chunk.offset[0] if entry.stacked else None
            full = hf_to_megatron(entry.parameter_name(layer), reader.get, layout, padded).to(dtype)
            return full.unsqueeze(0) if entry.stacked else full

        def make_object(key: str) -> bytes:
            buffer = io.BytesIO()
            torch.save([objects[key]], buffer)  # Megatron stores a list of the objects of a key
            return buffer.getvalue()

        write_checkpoint(tmp, chunks, list(objects), make_chunk, make_object)
        get_default_save_common_strategy().save_common({}, tmp)
        save_config(CheckpointingConfig("torch_dist", 1), str(tmp))
        model_block = to_dict(model)
        model_block["checkpoint"] = str(out_dir.resolve())
        (tmp / MODEL_YAML).write_text(yaml.safe_dump({"model": model_block}, sort_keys=False))
        (tmp / HF_SIDE_DIR).mkdir()
        copy_side_files(hf_dir, tmp / HF_SIDE_DIR)
        (tmp / COMPLETE).write_text("model\n")
    written = sum(p.stat().st_size for p in out_dir.glob("*.distcp"))
    return ConversionReport(model, len(chunks), written, time.time() - started)
