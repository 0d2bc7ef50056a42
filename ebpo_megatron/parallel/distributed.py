"""Process groups: from torchrun or Slurm environment variables to Megatron's parallel state.

World = DP × PP × TP ranks (TP fastest, as Megatron orders them). The layout is validated
*before* any process group is created, each failure naming the number and the rule.
"""

from __future__ import annotations

import math
import os
import re
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .megatron_patches import apply_megatron_patches


@dataclass
class ParallelConfig:
    """Model-parallel layout; data parallelism takes the rest of the world (DP = W / (TP·PP))."""

    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    virtual_pipeline: int | None = None
    sequence_parallel: bool = False
    vocab_multiple: int = 128  # the vocabulary is padded to a multiple of lcm(vocab_multiple, TP)

    def __post_init__(self) -> None:
        if self.tensor_parallel < 1 or self.pipeline_parallel < 1:
            raise ValueError("tensor_parallel and pipeline_parallel must be >= 1")
        if self.virtual_pipeline is not None and self.virtual_pipeline < 2:
            raise ValueError(f"virtual_pipeline: expected None or >= 2, got {self.virtual_pipeline}")
        if self.sequence_parallel and self.tensor_parallel == 1:
            raise ValueError("sequence_parallel needs tensor_parallel > 1")


@dataclass(frozen=True)
class LaunchInfo:
    """Where this process sits in the job and how to reach rank 0."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def padded_vocab_size(vocab_size: int, tensor_parallel: int, multiple: int = 128) -> int:
    """The vocabulary rounded up to a multiple of lcm(``multiple``, TP).

    Rule: V_pad = ⌈V / m⌉ · m with m = lcm(multiple, TP). Every TP rank then holds an equal
    slice V_pad / TP of the embedding and the output layer, and the slice stays a multiple of
    ``multiple`` / gcd(multiple, TP) for efficient kernels. Unlike Megatron-LM's m = multiple ×
    TP, the padded size does not change with TP when TP divides ``multiple`` (1, 2, 4, ..., 128),
    so sharded checkpoints move between those TP sizes. Logits of ids ≥ V are padding and must
    be excluded (``vocab_parallel_logprobs(..., vocab_size=V)``).
    """
    if vocab_size < 1 or tensor_parallel < 1 or multiple < 1:
        raise ValueError(f"padded_vocab_size: expected positive sizes, got vocab {vocab_size}, "
                         f"tensor_parallel {tensor_parallel}, multiple {multiple}")
    step = math.lcm(multiple, tensor_parallel)
    return -(-vocab_size // step) * step


def validate_layout(world_size: int, parallel: ParallelConfig, model: object) -> int:
    """Check the TP × PP × DP layout against the world and the model before anything is
    created; returns DP = world_size / (TP · PP). Each failure is a ValueError naming the number
    and the rule. The vocabulary cannot fail: it is padded (:func:`padded_vocab_size`).

    ``model`` needs ``num_attention_heads``, ``num_kv_heads``, ``num_layers`` (and optionally
    ``transformer_impl``).
    """
    tp, pp = parallel.tensor_parallel, parallel.pipeline_parallel
    if world_size < 1 or world_size % (tp * pp):
        raise ValueError(
            f"world size {world_size} is not divisible by tensor_parallel × pipeline_parallel = "
            f"{tp}×{pp} = {tp * pp}"
        )
    if model.num_attention_heads % tp:
        raise ValueError(f"num_attention_heads {model.num_attention_heads} is not divisible by tensor_parallel {tp}")
    if model.num_kv_heads % tp:
        raise ValueError(f"num_kv_heads {model.num_kv_heads} is not divisible by tensor_parallel {tp}")
    if parallel.virtual_pipeline is not None and pp == 1:
        raise ValueError(f"virtual_pipeline {parallel.virtual_pipeline} needs pipeline_parallel > 1, got 1")
    stages = pp * (parallel.virtual_pipeline or 1)
    if model.num_layers % stages:
        raise ValueError(
            f"num_layers {model.num_layers} is not divisible by pipeline_parallel × virtual_pipeline = {stages}"
        )
    if parallel.sequence_parallel and getattr(model, "transformer_impl", "local") == "local":
        raise ValueError(
            "sequence_parallel needs transformer_impl 'transformer_engine': the local spec's torch "
            "norm does not support it (megatron/core/transformer/torch_norm.py:32)"
        )
    return world_size // (tp * pp)


def _split_top_level(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return parts + [text[start:]]


def first_host(nodelist: str) -> str:
    """First hostname of a Slurm node list: 'node[003-005,010],cpu1' -> 'node003'
    (each bracket expression contributes its first value, zero padding kept)."""
    entry = _split_top_level(nodelist.strip())[0]
    if not entry or entry.count("[") != entry.count("]"):
        raise ValueError(f"SLURM_JOB_NODELIST: cannot parse {nodelist!r}")
    return re.sub(r"\[([^\]]*)\]", lambda m: m.group(1).split(",")[0].split("-")[0], entry)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_info(env: dict[str, str] | None = None) -> LaunchInfo:
    """Rank and rendezvous from torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), else
    from Slurm (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, master = first host of
    SLURM_JOB_NODELIST, port MASTER_PORT or 29500), else a single process on localhost."""
    env = dict(os.environ if env is None else env)
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchInfo(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                          env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        master = env.get("MASTER_ADDR") or first_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1"))
        return LaunchInfo(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]),
                          int(env.get("SLURM_LOCALID", 0)), master, int(env.get("MASTER_PORT", 29500)))
    return LaunchInfo(0, 1, 0, "127.0.0.1", int(env.get("MASTER_PORT", 0)) or _free_port())


def process_group_backend(cuda: bool) -> str:
    """gloo on the CPU; with CUDA, NCCL for CUDA tensors (the model's collectives) and gloo for
    CPU tensors (metric sums, the advantage estimator's group table, the Welford prior: they
    live in host memory, and an NCCL-only group refuses them)."""
    return "cpu:gloo,cuda:nccl" if cuda else "gloo"


def initialize(parallel: ParallelConfig, model: object, info: LaunchInfo | None = None) -> int:
    """Validate, patch Megatron-Core (:func:`~.megatron_patches.apply_megatron_patches`: checks
    its version; once per process), create the default process group
    (:func:`process_group_backend`) and Megatron's model-parallel groups; returns the
    data-parallel size. Call it before building models, optimizers or checkpoints."""
    from megatron.core import parallel_state

    info = info or launch_info()
    world_size = dist.get_world_size() if dist.is_initialized() else info.world_size
    dp = validate_layout(world_size, parallel, model)
    apply_megatron_patches()
    if not dist.is_initialized():
        backend = process_group_backend(torch.cuda.is_available())
        if torch.cuda.is_available():
            torch.cuda.set_device(info.local_rank)
        host = f"[{info.master_addr}]" if ":" in info.master_addr else info.master_addr  # IPv6
        dist.init_process_group(
            backend, init_method=f"tcp://{host}:{info.master_port}",
            rank=info.rank, world_size=info.world_size,
        )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_parallel,
        pipeline_model_parallel_size=parallel.pipeline_parallel,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline,
    )
    return dp


def shutdown() -> None:
    """Destroy Megatron's groups and the default process group (safe to call twice)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
