"""Turn a rollout (prompts + sampled responses + rewards) into the trainer's PolicyBatch.

Sequence b = prompt_b ⧺ response_b, right-padded. ``loss_mask[b, t] = 1`` where the target
token t+1 is a response token; the rollout engine's per-token log-probs land at the same
(target-aligned) positions.
"""

from __future__ import annotations

import torch

from .batching import PolicyBatch


def build_policy_batch(
    prompt_ids: list[list[int]],
    response_ids: list[list[int]],
    rollout_logprobs: list[list[float]],
    advantages: torch.Tensor,
    pad_token_id: int,
) -> PolicyBatch:
    """Pack one rank's responses; rows with an empty response get an all-zero mask."""
    count = len(prompt_ids)
    lengths = [len(p) + len(r) for p, r in zip(prompt_ids, response_ids)]
    width = max(max(lengths), 2)
    tokens = torch.full((count, width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((count, width - 1))
    rollout_logp = torch.zeros((count, width - 1))
    for b, (prompt, response, logp) in enumerate(zip(prompt_ids, response_ids, rollout_logprobs)):
        sequence = list(prompt) + list(response)
        tokens[b, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        start = len(prompt) - 1  # target index t+1 = len(prompt) is the first response token
        mask[b, start: start + len(response)] = 1.0
        rollout_logp[b, start: start + len(response)] = torch.tensor(logp, dtype=torch.float32)
    return PolicyBatch(
        tokens=tokens,
        lengths=torch.tensor(lengths, dtype=torch.long),
        loss_mask=mask,
        advantages=advantages.to(torch.float32),
        rollout_logp=rollout_logp,
        prompt_lengths=torch.tensor([len(p) for p in prompt_ids], dtype=torch.long),
    )
