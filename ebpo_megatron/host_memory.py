"""Host memory reuse for CPU training: large freed blocks stay in the process for the next
step instead of going back to the kernel.

glibc's ``malloc`` serves every block above its mmap threshold (at most 32 MiB) with a fresh
``mmap`` and returns it with ``munmap`` when freed. PyTorch's CPU allocator is plain ``malloc``,
and a CPU train step allocates such blocks many times over (vocabulary-wide logits and their
gradients, the dense embedding gradient, activations of a micro-batch): every one is new memory,
and each of its 4 KiB pages costs a page fault and a zeroing by the kernel on first touch. An
RL step of the bf16 + vLLM recipe on SmolLM2-135M (bench/rl_step.py's shape) took ~500k page
faults; with reuse ~70k and 0.89x the time (median of 5 alternating pairs; the fp32 recipe
~250k faults and no gain: docs/performance.md, "Host memory reuse").

With reuse on, ``mallopt(M_MMAP_MAX, 0)`` serves every block from the heap and
``mallopt(M_TRIM_THRESHOLD, 1 GiB)`` keeps up to 1 GiB of free memory at its top, so a step
reuses what the previous step freed. The price: memory a step freed is not returned to the
system while the process runs (the resident size stays at the largest step's).
``run.host_memory_reuse``: ``auto`` turns it on where the trainer computes on the CPU (no CUDA
device) and glibc is the C library; off on GPU machines, whose hosts load and convert
checkpoints far larger than a step.
A ``MALLOC_MMAP_MAX_`` / ``MALLOC_TRIM_THRESHOLD_`` or ``glibc.malloc`` tunable the user set
wins: nothing is changed then.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Mapping
from typing import Literal

from .parallel.cpu_compat import cuda_absent

M_TRIM_THRESHOLD = -1  # mallopt parameters (glibc's malloc.h)
M_MMAP_MAX = -4
TRIM_THRESHOLD_BYTES = 1 << 30


def user_tuned_malloc(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the environment already tunes glibc's mmap use or trimming."""
    environ = os.environ if environ is None else environ
    return ("MALLOC_MMAP_MAX_" in environ or "MALLOC_TRIM_THRESHOLD_" in environ
            or "glibc.malloc" in environ.get("GLIBC_TUNABLES", ""))


def glibc() -> ctypes.CDLL | None:
    """The process's C library when it is glibc (the one with ``mallopt``), else None."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt") else None


def keep_freed_memory() -> bool:
    """Serve large blocks from the heap and keep freed memory (module docstring); True when
    glibc accepted both settings."""
    libc = glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))


def apply_host_memory_reuse(setting: bool | Literal["auto"]) -> bool:
    """``run.host_memory_reuse`` for this process: ``auto`` -> on without a CUDA device; never
    over the user's own malloc tuning. Returns whether reuse is on."""
    wanted = cuda_absent() if setting == "auto" else bool(setting)
    if not wanted or user_tuned_malloc():
        return False
    return keep_freed_memory()
