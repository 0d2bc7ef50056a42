"""Shared-prompt packing: the G responses to one prompt in one row, the prompt computed once.

An RL micro-batch holds G responses to each of its prompts, and the plain layout (one row per
response, ``trainer.batching``) runs every prompt token through the decoder G times, forward and
backward. Packed, each group of rows with the same prompt becomes one row

    [ pad … prompt (P positions, left-padded) | response 1 (R) | … | response K (R) ]

of width S = P + K·R (P: the micro-batch's longest prompt, R: its longest response, K: its
largest group). The attention mask makes each response see exactly what it sees in its own row:
query i attends to key j iff j is a real token, j ≤ i, and j lies in the prompt or in i's own
response segment (a padding query attends to itself only, so that no softmax row is empty).
Positions are 0 … P−1 over the prompt and P … P+R−1 in every response segment; a left-padded
prompt of length p therefore starts at position P−p instead of 0, which RoPE does not see (its
scores depend on position differences only; learned absolute position embeddings would, and are
refused by ``PolicyGPTModel``).

The loss is unchanged: the forward gathers, for each original row b and each position
t ≥ ``start`` of the plain layout, the hidden state of the packed position that predicts the same
token, so the output layer returns logits [b, L − start, V/TP] in the plain layout. With
π(y_k | x) the same function of the same tokens in both layouts, log π, the loss and — because
the prompt's activations receive the sum of the K responses' gradients, as the K copies did —
∇θ are the plain step's up to floating-point rounding. Positions a row does not train on
(t < p_b − 1, or past its response) are gathered from the packed position P − 1; the loss mask
zeroes them, as it zeroes the prompt positions of the plain layout.

With SmolLM2's arithmetic task (prompts ~60 tokens, G = 4 responses of ≤ 32) a micro-batch of
8 rows shrinks from 8 × ~92 to 2 × ~190 token positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LogitGather:
    """Where the plain layout's positions t = start … L−1 of row b sit in the packed rows:
    hidden state (position ``position[b, t − start]``, row ``row[b, t − start]``)."""

    row: torch.Tensor  # [b, L − start], long
    position: torch.Tensor  # [b, L − start], long


@dataclass(frozen=True)
class PackedRows:
    """One micro-batch in the packed layout (module docstring)."""

    tokens: torch.Tensor  # [g, S]
    positions: torch.Tensor  # [g, S], the same row g times
    attention_mask: torch.Tensor  # [g, 1, S, S], True = masked out (Megatron's convention)
    gather: LogitGather


def prompt_groups(tokens: torch.Tensor, prompt_lengths: torch.Tensor) -> list[list[int]]:
    """Rows with the same prompt (same length, same tokens), in order of first appearance."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for b, length in enumerate(prompt_lengths.tolist()):
        groups.setdefault(tuple(tokens[b, :length].tolist()), []).append(b)
    return list(groups.values())


def pack_shared_prompts(tokens: torch.Tensor, lengths: torch.Tensor, prompt_lengths: torch.Tensor,
                        start: int, pad_id: int = 0) -> PackedRows | None:
    """The packed layout of a micro-batch (``tokens`` [b, L], right-padded rows of prompt ⧺
    response, ``lengths`` and ``prompt_lengths`` [b]); None when no two rows share a prompt
    (nothing to save). ``start`` (≤ p_b − 1 of every row with a response): the first plain-layout
    position whose logits the caller needs."""
    prompt_lengths = prompt_lengths.to(torch.long).cpu()
    lengths = lengths.to(torch.long).cpu()
    if bool((prompt_lengths < 1).any()) or bool((lengths < prompt_lengths).any()):
        raise ValueError("prompt sharing: every row needs 1 <= prompt length <= length")
    if bool(((prompt_lengths - 1 < start) & (lengths > prompt_lengths)).any()):
        raise ValueError(f"prompt sharing: start {start} lies past the first response position of a row")
    host_tokens = tokens.cpu()
    groups = prompt_groups(host_tokens, prompt_lengths)
    if len(groups) == len(host_tokens):
        return None
    prompt_width = int(prompt_lengths.max())
    response_width = max(int((lengths - prompt_lengths).max()), 1)
    slots = max(len(group) for group in groups)
    width = prompt_width + slots * response_width
    segment = torch.cat([torch.zeros(prompt_width, dtype=torch.long),
                         torch.arange(1, slots + 1).repeat_interleave(response_width)])
    positions = torch.cat([torch.arange(prompt_width),
                           (prompt_width + torch.arange(response_width)).repeat(slots)])

    packed = torch.full((len(groups), width), pad_id, dtype=host_tokens.dtype)
    real = torch.zeros(len(groups), width, dtype=torch.bool)
    plain_width = host_tokens.shape[1]
    gather_row = torch.zeros(len(host_tokens), plain_width - start, dtype=torch.long)
    gather_position = torch.full_like(gather_row, prompt_width - 1)
    for g, rows in enumerate(groups):
        prompt = int(prompt_lengths[rows[0]])
        packed[g, prompt_width - prompt: prompt_width] = host_tokens[rows[0], :prompt]
        real[g, prompt_width - prompt: prompt_width] = True
        for slot, b in enumerate(rows):
            response = int(lengths[b]) - prompt
            first = prompt_width + slot * response_width
            packed[g, first: first + response] = host_tokens[b, prompt: prompt + response]
            real[g, first: first + response] = True
            gather_row[b] = g
            if response > 1:  # plain position prompt − 1 + j predicts response token j: packed
                # P − 1 (the default) for j = 0, else the segment's position j − 1
                gather_position[b, prompt - start: prompt - start + response - 1] = first + torch.arange(response - 1)

    query_segment, key_segment = segment[:, None], segment[None, :]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    visible = causal & ((key_segment == 0) | (key_segment == query_segment))
    keep = (visible[None] & real[:, None, :] & real[:, :, None]) | torch.eye(width, dtype=torch.bool)[None]
    device = tokens.device
    return PackedRows(
        tokens=packed.to(device),
        positions=positions.expand(len(groups), width).to(device),
        attention_mask=(~keep).unsqueeze(1).to(device),
        gather=LogitGather(row=gather_row.to(device), position=gather_position.to(device)),
    )


def sharing_unsupported_reason(model: torch.nn.Module) -> str | None:
    """Why ``model`` (a ``PolicyGPTModel`` chunk) cannot run packed rows, or None when it can:
    the whole sequence on every rank (no sequence / context parallelism), RoPE, and a core
    attention that honours an arbitrary attention mask (``SDPACoreAttention``, the local layer
    spec without CUDA; Transformer Engine's and Megatron's fused kernels take their causal mask
    from the mask type instead)."""
    from ..parallel.cpu_compat import SDPACoreAttention
    from .policy_model import positions_can_be_skipped

    config = model.config
    if not positions_can_be_skipped(config):
        return "the sequence is split over ranks (sequence or context parallelism)"
    if model.position_embedding_type != "rope" or config.multi_latent_attention:
        return f"{model.position_embedding_type!r} position embeddings (needs RoPE)"
    for layer in model.decoder.layers:
        attention = layer.self_attention.core_attention
        if not isinstance(attention, SDPACoreAttention):
            return f"core attention {type(attention).__name__} (needs SDPACoreAttention: the local layer spec on CPU)"
    return None


def resolve_share_prompts(setting: bool | str, model: torch.nn.Module) -> bool:
    """``train.step.share_prompts`` for ``model``: "auto" -> whether it can; True where it cannot
    is an error naming the reason."""
    reason = sharing_unsupported_reason(model)
    if setting == "auto":
        return reason is None
    if setting and reason is not None:
        raise ValueError(f"train.step.share_prompts: true, but this model cannot run shared-prompt rows: {reason}; "
                         "set it to auto or false")
    return bool(setting)
