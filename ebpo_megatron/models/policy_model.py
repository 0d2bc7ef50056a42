"""``PolicyGPTModel``: Megatron-Core's ``GPTModel`` whose forward can skip the output layer on
leading positions.

An RL sequence is prompt + response and the loss only needs log π at response positions. With
``forward(..., logits_from=s)`` the last stage projects hidden states s, s+1, …, L−1 only:
logits [b, L−s, V/TP] instead of [b, L, V/TP]. The decoder still runs on all L positions (the
response attends to the prompt); only the output layer z = W h and everything computed from z
(log-softmax, entropy, their backward) shrink. With prompts ~4x longer than responses, as in the
SmolLM2 arithmetic task, this removes most of the vocabulary work of a train step.

On that path the hidden states are turned batch-first ([s, b, h] → [b, s, h], a copy of h-wide
rows) before the output layer, so the logits come out [b, s, V/TP] directly; Megatron's own path
computes them [s, b, V/TP] and copies them to [b, s, V/TP] (and back in the backward pass), two
copies of the largest tensor of the step. ``logits_from=None`` (the default) is Megatron's path
unchanged: inference, labels, multi-token prediction, sequence and context parallelism.

``forward(packed.tokens, packed.positions, packed.attention_mask, gather=packed.gather)`` runs a
micro-batch in the shared-prompt layout of ``models.prompt_sharing``: RoPE angles of the given
positions (the same for every row) instead of 0 … S−1, and the output layer on the hidden states
that ``gather`` picks, so that the logits come out [b, L − start, V/TP] in the plain layout.
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core.models.gpt import GPTModel

from .prompt_sharing import LogitGather, sharing_unsupported_reason


def positions_can_be_skipped(config: Any) -> bool:
    """Whether ``logits_from`` may be used: every rank must hold the whole sequence, i.e. no
    sequence or context parallelism (``config``: the model's TransformerConfig)."""
    return not (config.sequence_parallel or config.context_parallel_size > 1)


class PolicyGPTModel(GPTModel):
    """``GPTModel`` plus the ``logits_from`` forward argument (module docstring)."""

    _logits_from: int | None = None
    _gather: LogitGather | None = None
    _rope_positions: torch.Tensor | None = None

    def forward(self, *args: Any, logits_from: int | None = None, gather: LogitGather | None = None,
                **kwargs: Any) -> torch.Tensor:
        if gather is not None:
            return self._packed_forward(*args, gather=gather, **kwargs)
        if logits_from is not None and logits_from < 0:
            raise ValueError(f"logits_from: expected >= 0, got {logits_from}")
        if logits_from is not None and not positions_can_be_skipped(self.config):
            raise ValueError("logits_from needs the full sequence on every rank: it cannot be used "
                             "with sequence or context parallelism")
        self._logits_from = logits_from
        try:
            return super().forward(*args, **kwargs)
        finally:
            self._logits_from = None

    def _packed_forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                        *, gather: LogitGather, **kwargs: Any) -> torch.Tensor:
        reason = sharing_unsupported_reason(self)
        if reason is not None:
            raise ValueError(f"this model cannot run shared-prompt rows: {reason}")
        self._gather, self._rope_positions = gather, position_ids[0]
        try:
            return super().forward(input_ids, position_ids, attention_mask, **kwargs)
        finally:
            self._gather = self._rope_positions = None

    def _preprocess(self, *args: Any, **kwargs: Any) -> tuple:
        output = super()._preprocess(*args, **kwargs)
        if self._rope_positions is None or output[1] is None:
            return output
        return (output[0], output[1][self._rope_positions], *output[2:])  # angles of 0 … S−1, picked

    def _postprocess(self, hidden_states: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if not self.post_process or (self._logits_from is None and self._gather is None):
            return super()._postprocess(hidden_states=hidden_states, **kwargs)
        if (kwargs.get("labels") is not None or kwargs.get("inference_context") is not None
                or kwargs.get("mtp_in_postprocess") or self.config.mtp_num_layers is not None):
            raise ValueError("logits_from: a training forward that returns logits only "
                             "(no labels, inference context or multi-token prediction)")
        weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None
        if self._gather is not None:  # [b, L − start, h] of the plain layout, from [S, g, h]
            rows = hidden_states[self._gather.position, self._gather.row]
        else:
            rows = hidden_states[self._logits_from:].transpose(0, 1)
        logits, _ = self.output_layer(rows, weight=weight, runtime_gather_output=kwargs.get("runtime_gather_output"))
        return logits  # [b, s − logits_from, V/TP]
