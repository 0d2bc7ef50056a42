"""Keep the trainer's process-wide state across calls into an in-process vLLM.

vLLM runs in the trainer's process and changes process-wide state as it starts and runs: it
reseeds Python's, NumPy's and torch's global generators (``seed``, at start-up and again after
its warm-up), and its CPU worker binds OpenMP threads and replaces ``torch.set_num_threads``
with a function that only logs a warning. The trainer's RNG streams (dropout, data order,
Megatron's RNG tracker draws from torch's default generator on CPU) and its thread count must not
depend on whether the rollout engine is vLLM, so every vLLM call runs inside
:func:`preserved_process_state`.
"""

from __future__ import annotations

import contextlib
import random
from typing import Iterator

import numpy as np
import torch


@contextlib.contextmanager
def preserved_process_state() -> Iterator[None]:
    """Restore, on exit, the global RNG states (Python, NumPy, torch CPU and every initialized
    CUDA device), ``torch.set_num_threads`` itself and the intra-op thread count."""
    set_num_threads = torch.set_num_threads
    threads = torch.get_num_threads()
    python_state, numpy_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        torch.set_num_threads = set_num_threads
        if torch.get_num_threads() != threads:
            set_num_threads(threads)
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        torch.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
