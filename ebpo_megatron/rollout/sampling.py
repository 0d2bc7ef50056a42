"""Token sampling from logits: temperature, top-k, top-p (nucleus), greedy.

With temperature T the sampling distribution is p = softmax(z / T); top-k keeps the k largest
logits; top-p keeps the smallest set of tokens, in order of decreasing p, whose mass reaches
``top_p`` (the token that crosses the threshold is kept). The reported log-prob is
log p(token) under softmax(z / T) *before* the top-k/top-p filters — the same quantity the
trainer computes from its own logits at that temperature, so the two can be compared.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set the logits outside the top-k / top-p sets to −inf (last axis = vocabulary)."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_tokens(
    logits: torch.Tensor,
    *,
    temperature: float,
    top_k: int,
    top_p: float,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row of ``logits`` [B, V]; returns (tokens [B], logp [B]).

    ``temperature == 0`` is greedy (argmax), with log-probs of the untempered softmax. Without
    top-k / top-p the sampling distribution is exp(log p), from the one log-softmax pass the
    log-probs need.
    """
    logits = logits.float()
    scaled = logits / temperature if temperature not in (0.0, 1.0) else logits
    logp_all = torch.log_softmax(scaled, dim=-1)
    if temperature == 0:
        tokens = torch.argmax(logits, dim=-1)
    elif top_k == 0 and top_p >= 1.0:
        tokens = draw(logp_all.exp(), generator)
    else:
        filtered = filter_logits(scaled, top_k=top_k, top_p=top_p)
        tokens = draw(torch.softmax(filtered, dim=-1), generator)
    return tokens, logp_all.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


DRAW_BLOCK = 256  # vocabulary entries per block of the two-level inversion in ``draw``


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of ``probs`` [B, V] by inversion: with C_v = Σ_{u≤v} p_u and
    x = U·C_V, U ~ Uniform[0, 1), the token is the first v with C_v > x, so P(v) = p_v and a
    token with p_v = 0 is never drawn. One uniform per row; ``torch.multinomial`` draws one
    exponential per vocabulary entry, which dominates a CPU decode step at 49k tokens.

    In two levels, in float64: the vocabulary in blocks of ``DRAW_BLOCK``, S_j the sum of block
    j's p, x falls in the first block j with Σ_{i≤j} S_i > x, and inside it at the first v with
    Σ_{i<j} S_i + Σ_{u≤v, u in block j} p_u > x; the cumulative sums then cover V / 256 + 256
    entries per row instead of V (in a SmolLM2 rollout's profile the float64 copy and cumsum of
    [32, 49152] took ~6 ms per decode step). Where rounding puts x past the last positive entry
    of its block (or past the last block with mass), that entry (block) is taken. U comes from
    ``generator``'s device (the CPU for the native engine's) and moves to ``probs``'s."""
    rows, vocab = probs.shape
    full = vocab // DRAW_BLOCK * DRAW_BLOCK
    sums = probs[:, :full].reshape(rows, -1, DRAW_BLOCK).sum(-1, dtype=torch.float64)
    if full < vocab:
        sums = torch.cat([sums, probs[:, full:].sum(-1, dtype=torch.float64, keepdim=True)], 1)
    block_cdf = sums.cumsum(dim=-1)
    uniform_device = generator.device if generator is not None else probs.device
    uniform = torch.rand(rows, 1, dtype=torch.float64, generator=generator, device=uniform_device)
    x = uniform.to(probs.device) * block_cdf[:, -1:]
    last_block = _last_true(sums > 0)
    block = torch.minimum(torch.searchsorted(block_cdf, x, right=True).squeeze(-1), last_block)
    ids = block[:, None] * DRAW_BLOCK + torch.arange(DRAW_BLOCK, device=probs.device)
    in_vocab = ids < vocab
    inside = probs.gather(1, ids.clamp(max=vocab - 1)).double() * in_vocab
    before = F.pad(block_cdf, (1, 0)).gather(1, block[:, None]).squeeze(-1)  # Σ_{i<j} S_i
    cdf = before[:, None] + inside.cumsum(dim=-1)
    position = torch.minimum(torch.searchsorted(cdf, x, right=True).squeeze(-1), _last_true(inside > 0))
    return block * DRAW_BLOCK + position


def _last_true(flags: torch.Tensor) -> torch.Tensor:
    """Index of the last True of each row of ``flags`` [B, n] (0 for a row without one)."""
    index = torch.arange(flags.shape[-1], device=flags.device)
    return torch.where(flags, index, 0).amax(dim=-1)
