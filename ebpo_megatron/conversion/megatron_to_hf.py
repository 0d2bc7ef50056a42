"""Megatron ``dist_checkpointing`` checkpoint -> Hugging Face safetensors, streamed.

Works for a converted checkpoint, a model-only checkpoint (``save_model``) and a training
checkpoint (``runs/<name>/checkpoints/step_N``: model tensors are read, optimizer state is
ignored), whatever TP/PP/DP layout wrote it: Megatron reads the requested slices. Tensors are
read one layer at a time (each stacked key's slice [i]), mapped with
:func:`models.hf_mapping.megatron_to_hf` (vocabulary padding removed, QKV and fc1 split) and
written in shards, so memory holds one layer plus one output shard.

The model's architecture comes from ``--config`` (a trainer config or ``model.yaml``), else
``model.yaml`` in the checkpoint, else the run's ``config.yaml`` above a ``step_N`` directory.
Config and tokenizer files come from ``--hf-template``, else the ``hf/`` directory that the
HF -> Megatron conversion stored next to the (initial) checkpoint, else a config.json is
generated and no tokenizer is written.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import torch

from ..config.schema import load_config
from ..models.config import ModelConfig
from ..models.hf_mapping import Layout, megatron_to_hf
from ..parallel.distributed import padded_vocab_size
from .dcp_stream import read_slices, stored_tensors
from .hf_checkpoint import copy_side_files, write_hf_checkpoint
from .hf_config import hf_config_from_model_config, model_config_from_hf, read_hf_config
from .hf_to_megatron import (
    COMPLETE,
    HF_SIDE_DIR,
    MODEL_YAML,
    ConversionReport,
    megatron_shapes,
)
from .megatron_schema import (
    CheckpointSchema,
    TensorEntry,
    checkpoint_schema,
    megatron_single_process,
)
from .output_dir import staged_output


class MegatronCheckpointError(ValueError):
    """A Megatron checkpoint cannot be converted; the message names the directory and why."""


def find_model_config(ckpt_dir: Path, config_file: Path | None = None) -> tuple[ModelConfig, Path]:
    """The architecture of ``ckpt_dir`` and the file it came from (see the module docstring)."""
    candidates = [config_file] if config_file else [ckpt_dir / MODEL_YAML] + [
        p / "config.yaml" for p in list(ckpt_dir.parents)[:3]]
    for path in candidates:
        if path is not None and path.is_file():
            return load_config(path).model, path
    raise MegatronCheckpointError(
        f"{ckpt_dir}: cannot tell the model architecture: no {MODEL_YAML} in it and no run config.yaml "
        "above it; pass --config")


def _template_dir(ckpt_dir: Path, model: ModelConfig, template: Path | None) -> Path | None:
    if template is not None:
        return template
    for base in (ckpt_dir, Path(model.checkpoint) if model.checkpoint else None):
        if base is not None and (base / HF_SIDE_DIR / "config.json").is_file():
            return base / HF_SIDE_DIR
    return None


def _check_template(template: Path, model: ModelConfig) -> None:
    source = template / "config.json"
    theirs = model_config_from_hf(read_hf_config(template), str(source))
    fields = ("family", "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_kv_heads",
              "kv_channels", "vocab_size", "tie_word_embeddings")
    wrong = [f for f in fields if getattr(theirs, f) != getattr(model, f)]
    if wrong:
        raise MegatronCheckpointError(
            f"{source}: the template's architecture differs from the checkpoint's in {wrong} "
            f"(template {[getattr(theirs, f) for f in wrong]}, checkpoint {[getattr(model, f) for f in wrong]})")


def _check_checkpoint(ckpt_dir: Path, schema: CheckpointSchema, model: ModelConfig,
                      layout: Layout) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    if not (ckpt_dir / ".metadata").is_file():
        raise MegatronCheckpointError(f"{ckpt_dir}: not a Megatron torch_dist checkpoint (no .metadata file)")
    stored = stored_tensors(ckpt_dir)
    expected = megatron_shapes(schema, layout, padded_vocab_size(model.vocab_size, 1))
    for entry in schema.tensors:
        if entry.key not in stored:
            raise MegatronCheckpointError(f"{ckpt_dir}: tensor {entry.key} is missing: not a checkpoint of this "
                                          f"{model.family} model")
        shape = stored[entry.key][0]
        want = (model.num_layers, *expected[entry.key]) if entry.stacked else expected[entry.key]
        vocab_rows = entry.key in ("embedding.word_embeddings.weight", "output_layer.weight")
        if shape != want and not (vocab_rows and shape[1:] == want[1:] and shape[0] >= model.vocab_size):
            raise MegatronCheckpointError(f"{ckpt_dir}: tensor {entry.key} has shape {shape}, the model config "
                                          f"expects {want}")
    return stored


def _read(ckpt_dir: Path, entries: list[TensorEntry], stored: dict, layer: int | None) -> dict[str, torch.Tensor]:
    requests = {}
    for entry in entries:
        shape, dtype = stored[entry.key]
        if entry.stacked:
            requests[entry.key] = ((layer,) + (0,) * (len(shape) - 1), (1, *shape[1:]), dtype)
        else:
            requests[entry.key] = ((0,) * len(shape), shape, dtype)
    loaded = read_slices(ckpt_dir, requests)
    return {e.parameter_name(layer): loaded[e.key][0] if e.stacked else loaded[e.key] for e in entries}


def _hf_tensors(ckpt_dir: Path, schema: CheckpointSchema, stored: dict, model: ModelConfig,
                dtype: torch.dtype | None) -> Iterator[tuple[str, torch.Tensor]]:
    layout = Layout.from_model_config(model)
    flat = [e for e in schema.tensors if not e.stacked]
    stacked = [e for e in schema.tensors if e.stacked]
    groups: list[tuple[list[TensorEntry], int | None]] = [
        ([e for e in flat if e.key.startswith("embedding")], None),
        *[(stacked, layer) for layer in range(model.num_layers)],
        ([e for e in flat if not e.key.startswith("embedding")], None)]
    for entries, layer in groups:
        for name, tensor in _read(ckpt_dir, entries, stored, layer).items():
            for hf_name, hf_tensor in megatron_to_hf(name, tensor, layout):
                yield hf_name, hf_tensor.to(dtype or hf_tensor.dtype).clone()


def convert_megatron_to_hf(ckpt_dir: Path, out_dir: Path, config_file: Path | None = None,
                           template: Path | None = None, dtype: torch.dtype | None = None,
                           max_shard_bytes: int = 2 * 1024**3, overwrite: bool = False) -> ConversionReport:
    """Convert ``ckpt_dir`` into an HF checkpoint at ``out_dir``, written beside it and renamed
    when complete (:mod:`.output_dir`: a non-empty ``out_dir`` only with ``overwrite``, never
    one overlapping the checkpoint, its config or the template); ``dtype`` default: the
    checkpoint's."""
    started = time.time()
    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    if not (ckpt_dir / COMPLETE).is_file():
        raise MegatronCheckpointError(f"{ckpt_dir}: not a complete checkpoint (no {COMPLETE} marker)")
    model, config_path = find_model_config(ckpt_dir, config_file)
    template = _template_dir(ckpt_dir, model, template)
    if template is not None:
        _check_template(template, model)
    inputs = [p for p in (ckpt_dir, config_path, template) if p is not None]
    with staged_output(out_dir, inputs, overwrite) as tmp:
        with megatron_single_process(model):
            schema = checkpoint_schema(model)
            stored = _check_checkpoint(ckpt_dir, schema, model, Layout.from_model_config(model))
            count = write_hf_checkpoint(tmp, _hf_tensors(ckpt_dir, schema, stored, model, dtype), max_shard_bytes)
        if template is not None:
            copy_side_files(template, tmp)
        else:
            hf_config_from_model_config(model).save_pretrained(tmp)
    written = sum(p.stat().st_size for p in out_dir.glob("*.safetensors"))
    return ConversionReport(model, count, written, time.time() - started)
