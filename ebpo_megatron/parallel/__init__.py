"""Process groups, layout validation, vocabulary-parallel log-probs/entropy, every patch of
Megatron-Core (``parallel.megatron_patches``, applied by :func:`initialize`; the RoPE it installs,
``parallel.rope``), CPU seeding and attention (``parallel.cpu_compat``)."""

from .distributed import (
    LaunchInfo,
    ParallelConfig,
    first_host,
    initialize,
    launch_info,
    padded_vocab_size,
    shutdown,
    validate_layout,
)
from .vocab_parallel import vocab_parallel_entropy, vocab_parallel_logprobs, vocab_parallel_logprobs_and_entropy

__all__ = [
    "LaunchInfo",
    "ParallelConfig",
    "first_host",
    "initialize",
    "launch_info",
    "padded_vocab_size",
    "shutdown",
    "validate_layout",
    "vocab_parallel_entropy",
    "vocab_parallel_logprobs",
    "vocab_parallel_logprobs_and_entropy",
]
