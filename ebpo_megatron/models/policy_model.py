"""``PolicyGPTModel``: Megatron-Core's ``GPTModel`` whose forward can skip the output layer on
leading positions.

An RL sequence is prompt + response and the loss only needs log π at response positions. With
``forward(..., logits_from=s)`` the last stage projects hidden states s, s+1, …, L−1 only:
logits [b, L−s, V/TP] instead of [b, L, V/TP]. The decoder still runs on all L positions (the
response attends to the prompt); only the output layer z = W h and everything computed from z
(log-softmax, entropy, their backward) shrink. With prompts ~4x longer than responses, as in the
SmolLM2 arithmetic task, this removes most of the vocabulary work of a train step.
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core.models.gpt import GPTModel


class PolicyGPTModel(GPTModel):
    """``GPTModel`` plus the ``logits_from`` forward argument (module docstring)."""

    _logits_from: int = 0

    def forward(self, *args: Any, logits_from: int = 0, **kwargs: Any) -> torch.Tensor:
        if logits_from < 0:
            raise ValueError(f"logits_from: expected >= 0, got {logits_from}")
        if logits_from and (self.config.sequence_parallel or self.config.context_parallel_size > 1):
            raise ValueError("logits_from needs the full sequence on every rank: it cannot be used "
                             "with sequence or context parallelism")
        self._logits_from = logits_from
        try:
            return super().forward(*args, **kwargs)
        finally:
            self._logits_from = 0

    def _postprocess(self, hidden_states: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if self.post_process and self._logits_from:
            hidden_states = hidden_states[self._logits_from:]  # [s, b, h]: drop leading positions
        return super()._postprocess(hidden_states=hidden_states, **kwargs)
