"""Resolve the run's precision-dependent settings once, at config load.

``model.precision: auto`` becomes ``bf16`` where the hardware computes bf16 natively — a CUDA
GPU for which ``torch.cuda.is_bf16_supported()`` holds, or a CPU whose ``/proc/cpuinfo`` flags
include ``amx_bf16`` (Intel AMX) or ``avx512_bf16`` (AVX-512 BF16) — and ``fp32`` elsewhere (a
CPU without them emulates bf16 matrix multiplies, slower than fp32).

``algorithm.loss.tis_cap: auto`` (the ``ebpo-train`` default) becomes the truncated importance
sampling cap C = :data:`BF16_TIS_CAP` when the resolved precision is not fp32 and π_old is
recomputed by the trainer (``train.step.old_logp: recompute``): then the rollout engine's
log-probs come from other kernels (decode steps, vLLM) in low precision and differ from the
trainer's, and each token's loss is weighted by min(π_old / π_rollout, C). In fp32, or with
``old_logp: rollout`` (π_old *is* π_rollout, every weight 1), it becomes null (off). A number
or null in the config is kept as given.

Each resolution of an ``auto`` prints one line (rank 0), and the resolved values are what
``config.yaml`` records, so a run never changes its numerics silently.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .schema import Config

BF16_TIS_CAP = 2.0  # C of Yao et al., "Your efficient RL framework secretly brings you off-policy RL training"
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
CPUINFO = Path("/proc/cpuinfo")


def cpu_bf16_flags(cpuinfo: str) -> list[str]:
    """The native-bf16 flags (:data:`CPU_BF16_FLAGS`) on the ``flags`` lines of ``/proc/cpuinfo`` text."""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "flags":
            flags.update(value.split())
    return [flag for flag in CPU_BF16_FLAGS if flag in flags]


def native_bf16() -> tuple[bool, str]:
    """Whether this machine's compute device has native bf16, and why (for the start-up line)."""
    import torch

    if torch.cuda.is_available():
        supported = torch.cuda.is_bf16_supported()
        return supported, f"{torch.cuda.get_device_name()} {'supports' if supported else 'lacks'} bf16"
    flags = cpu_bf16_flags(CPUINFO.read_text()) if CPUINFO.is_file() else []
    return bool(flags), f"CPU flags {', '.join(flags)}" if flags else "no amx_bf16 / avx512_bf16 CPU flag"


def _say(line: str) -> None:
    """One line on rank 0's stderr (stdout may carry a tool's output, e.g. ``ebpo-plan --json``)."""
    if int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) == 0:
        print(f"[precision] {line}", file=sys.stderr, flush=True)


def resolve_precision(config: Config) -> Config:
    """Replace ``model.precision: auto`` and ``algorithm.loss.tis_cap: auto`` by concrete values
    (module docstring), in place; returns ``config``."""
    model, loss = config.model, config.algorithm.loss
    if model.precision == "auto":
        bf16, why = native_bf16()
        model.precision = "bf16" if bf16 else "fp32"
        _say(f"model.precision auto -> {model.precision} ({why})")
    if loss.tis_cap == "auto":
        on = model.precision != "fp32" and config.train.step.old_logp == "recompute"
        loss.tis_cap = BF16_TIS_CAP if on else None
        if on:
            _say(f"algorithm.loss.tis_cap auto -> {BF16_TIS_CAP} ({model.precision}: rollout and trainer log-probs "
                 "differ; tokens weighted by min(pi_old / pi_rollout, cap); set a number or null to override)")
    return config
