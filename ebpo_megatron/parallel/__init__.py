"""Process groups, layout validation, vocabulary-parallel log-probs/entropy, CPU compatibility
(``parallel.cpu_compat``, the only CPU-specific module)."""

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
