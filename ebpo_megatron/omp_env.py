"""OpenMP settings for shared CPUs, to be applied before torch loads its OpenMP runtime.

``OMP_WAIT_POLICY=PASSIVE``: an OpenMP thread that finishes its share of a parallel region
sleeps at once instead of spinning for the next region. With the default (spin, then sleep) a
thread whose sibling was descheduled by another process burns its core spinning at every
barrier, and a 2-thread region on a busy 2-core machine takes up to 10x the 1-thread time
(docs/performance.md, "Threads on a busy CPU", has the measurements and ``bench/threads.py``).
The runtime reads the variable once, when it loads (``import torch``), so this module imports
nothing heavy and ``ebpo-train`` applies it first. A value already in the environment wins.
"""

from __future__ import annotations

import os

OMP_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE"}


def apply_omp_defaults() -> None:
    """Set each of :data:`OMP_DEFAULTS` that the environment leaves unset. Only effective before
    ``import torch`` in this process; child processes (torchrun, spawned ranks) inherit it."""
    for name, value in OMP_DEFAULTS.items():
        os.environ.setdefault(name, value)
