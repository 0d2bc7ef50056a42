"""The tensors of one RL step, and how they are cut into mini- and micro-batches.

Layout (per response b, right-padded to a common length L):
    tokens[b, :]         prompt tokens, then response tokens, then padding
    lengths[b]           prompt + response length (the rest is padding)
    loss_mask[b, t]      1 where target tokens[b, t+1] is a response token   ([B, L−1])
    advantages[b]        A_{m,i} of the response
    old_logp / ref_logp / rollout_logp [B, L−1]: log π(tokens[b, t+1] | tokens[b, ≤t])
    prompt_lengths[b]    prompt length (optional; rows with the same prompt can then share it,
                         models.prompt_sharing)
Position t of every [B, L−1] tensor is the prediction of token t+1 ("target-aligned").
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from ..parallel.sharding import contiguous_shares


@dataclass
class PolicyBatch:
    """One data-parallel rank's share of an RL step (see module docstring for the layout)."""

    tokens: torch.Tensor
    lengths: torch.Tensor
    loss_mask: torch.Tensor
    advantages: torch.Tensor
    old_logp: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None
    rollout_logp: torch.Tensor | None = None
    prompt_lengths: torch.Tensor | None = None

    def __post_init__(self) -> None:
        batch, length = self.tokens.shape
        expect = {"lengths": (batch,), "loss_mask": (batch, length - 1), "advantages": (batch,)}
        if self.prompt_lengths is not None:
            expect["prompt_lengths"] = (batch,)
        for name in ("old_logp", "ref_logp", "rollout_logp"):
            if getattr(self, name) is not None:
                expect[name] = (batch, length - 1)
        for name, shape in expect.items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise ValueError(f"PolicyBatch.{name}: expected shape {shape}, got {got}")

    @property
    def size(self) -> int:
        return int(self.tokens.shape[0])

    def select(self, index: torch.Tensor | slice) -> "PolicyBatch":
        """Rows ``index``, trimmed to the longest of them (trailing padding columns dropped)."""
        rows = {f.name: getattr(self, f.name) for f in fields(self)}
        picked = {k: (v[index] if v is not None else None) for k, v in rows.items()}
        longest = int(picked["lengths"].max()) if picked["lengths"].numel() else 1
        for name, value in picked.items():
            if value is None or name in ("lengths", "advantages", "prompt_lengths"):
                continue
            picked[name] = value[:, : longest if name == "tokens" else longest - 1]
        return PolicyBatch(**picked)

    def response_start(self) -> int:
        """The first target position t with a loss-mask entry in any row (0 when there is none):
        log π at positions < t is never used, so the output layer may skip them."""
        columns = self.loss_mask.any(dim=0).nonzero()
        return int(columns[0]) if len(columns) else 0

    def with_logps(self, **logps: torch.Tensor) -> "PolicyBatch":
        return replace(self, **logps)

    def to(self, device: torch.device) -> "PolicyBatch":
        """Every tensor on ``device``. A step's batch stays in host memory; the trainer moves
        each micro-batch to the model's device as Megatron's schedule asks for it."""
        tensors = {f.name: getattr(self, f.name) for f in fields(self)}
        return PolicyBatch(**{name: None if t is None else t.to(device) for name, t in tensors.items()})


def minibatch_slices(batch_size: int, num_minibatches: int) -> list[slice]:
    """Cut ``batch_size`` rows into ``num_minibatches`` contiguous, equal-as-possible slices."""
    if not 1 <= num_minibatches <= batch_size:
        raise ValueError(
            f"mini_batches: expected between 1 and the rank's batch size {batch_size}, got {num_minibatches}"
        )
    return contiguous_shares(batch_size, num_minibatches)


def microbatch_indices(
    lengths: torch.Tensor, *, micro_batch_size: int | None = None, max_tokens: int | None = None
) -> list[torch.Tensor]:
    """Row indices of each micro-batch.

    ``micro_batch_size``: fixed-size consecutive chunks. ``max_tokens`` (dynamic batching): rows
    sorted by length, then packed greedily so that rows × longest-row ≤ ``max_tokens`` (padding
    included); a row longer than the budget gets a micro-batch of its own.
    """
    if (micro_batch_size is None) == (max_tokens is None):
        raise ValueError("micro-batching: give exactly one of micro_batch_size and max_tokens")
    count = int(lengths.numel())
    if micro_batch_size is not None:
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size: expected >= 1, got {micro_batch_size}")
        return [torch.arange(i, min(i + micro_batch_size, count)) for i in range(0, count, micro_batch_size)]
    if max_tokens < 1:
        raise ValueError(f"max_tokens: expected >= 1, got {max_tokens}")
    order = torch.argsort(lengths, descending=True, stable=True).tolist()
    groups: list[list[int]] = []
    for row in order:
        if groups and (len(groups[-1]) + 1) * int(lengths[groups[-1][0]]) <= max_tokens:
            groups[-1].append(row)
        else:
            groups.append([row])
    return [torch.tensor(sorted(g)) for g in groups]
