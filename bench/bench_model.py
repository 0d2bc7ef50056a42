"""The model the speed benches share: a ~26M-parameter Llama-style default, or the architecture
and weights of a Hugging Face checkpoint (``--hf DIR``, e.g. runs/smollm2/hf after `make real`)."""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ebpo_megatron.models import ModelConfig


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hf", type=Path, help="benchmark this HF checkpoint's model (default: ~26M Llama)")


def bench_config(hf_dir: Path | None, max_positions: int) -> ModelConfig:
    if hf_dir is None:
        return ModelConfig(num_layers=6, hidden_size=512, ffn_hidden_size=1408, num_attention_heads=8,
                           num_kv_heads=4, vocab_size=8192, max_position_embeddings=max_positions)
    from ebpo_megatron.conversion.hf_config import model_config_from_hf, read_hf_config

    cfg = model_config_from_hf(read_hf_config(hf_dir), str(hf_dir / "config.json"))
    return dataclasses.replace(cfg, max_position_embeddings=max(max_positions, cfg.max_position_embeddings))


def describe(cfg: ModelConfig, hf_dir: Path | None) -> str:
    params = (1 if cfg.tie_word_embeddings else 2) * cfg.vocab_size * cfg.hidden_size + cfg.num_layers * (
        cfg.hidden_size * (cfg.num_attention_heads + 2 * cfg.num_kv_heads) * cfg.kv_channels
        + cfg.num_attention_heads * cfg.kv_channels * cfg.hidden_size + 3 * cfg.hidden_size * cfg.ffn_hidden_size)
    return f"{hf_dir.name if hf_dir else 'Llama-style'} model, {params / 1e6:.1f}M parameters"


def hf_model(cfg: ModelConfig, hf_dir: Path | None):
    """The transformers model: the checkpoint's weights, or random ones for the default."""
    import transformers

    from ebpo_megatron.conversion.hf_config import hf_config_from_model_config

    if hf_dir is not None:
        return transformers.AutoModelForCausalLM.from_pretrained(hf_dir).float()
    config = hf_config_from_model_config(cfg)
    config._attn_implementation = "sdpa"
    return transformers.AutoModelForCausalLM.from_config(config).float()


@torch.no_grad()
def load_hf_weights(chunks: list[torch.nn.Module], cfg: ModelConfig, hf_dir: Path) -> None:
    """The checkpoint's weights into Megatron chunks, through the converters' mapping."""
    from ebpo_megatron.conversion.hf_checkpoint import HFCheckpointReader
    from ebpo_megatron.models.hf_mapping import Layout, hf_to_megatron
    from ebpo_megatron.models.weights import assign_full_weights
    from ebpo_megatron.parallel.distributed import padded_vocab_size

    reader, layout = HFCheckpointReader(hf_dir), Layout.from_model_config(cfg)
    padded = padded_vocab_size(cfg.vocab_size, 1)
    assign_full_weights(chunks, lambda name: hf_to_megatron(name, reader.get, layout, padded))


def alternate(sides: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """Seconds of each side per round: one warm-up call each, then ``rounds`` rounds calling every
    side once, the order reversed every other round, so that a machine getting busier or quieter
    during the run weighs on both sides alike (these shared machines drift by tens of percent)."""
    for run in sides.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in sides}
    for round_index in range(rounds):
        order = list(sides) if round_index % 2 == 0 else list(reversed(sides))
        for name in order:
            start = time.perf_counter()
            sides[name]()
            times[name].append(time.perf_counter() - start)
    return times


def medians_and_ratio(times: dict[str, list[float]], detail: str = "") -> tuple[float, float, str]:
    """(median seconds of "ours", of "hf", and "R.RRx   (per round LO-HI<detail>)" for the
    per-round ratios hf/ours: above 1 means ours is faster)."""
    ratios = sorted(h / o for h, o in zip(times["hf"], times["ours"]))
    return (statistics.median(times["ours"]), statistics.median(times["hf"]),
            f"{statistics.median(ratios):.2f}x   (per round {ratios[0]:.2f}-{ratios[-1]:.2f}{detail})")
