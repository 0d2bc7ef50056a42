"""Token sampling from logits: temperature, top-k, top-p (nucleus), greedy.

With temperature T the sampling distribution is p = softmax(z / T); top-k keeps the k largest
logits; top-p keeps the smallest set of tokens, in order of decreasing p, whose mass reaches
``top_p`` (the token that crosses the threshold is kept). The reported log-prob is
log p(token) under softmax(z / T) *before* the top-k/top-p filters — the same quantity the
trainer computes from its own logits at that temperature, so the two can be compared.
"""

from __future__ import annotations

import torch


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

    ``temperature == 0`` is greedy (argmax), with log-probs of the untempered softmax.
    """
    logits = logits.float()
    scaled = logits / temperature if temperature > 0 else logits
    logp_all = torch.log_softmax(scaled, dim=-1)
    if temperature == 0:
        tokens = torch.argmax(logits, dim=-1)
    else:
        filtered = filter_logits(scaled, top_k=top_k, top_p=top_p)
        tokens = draw(torch.softmax(filtered, dim=-1), generator)
    return tokens, logp_all.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of ``probs`` [B, V] by inversion: with C_v = Σ_{u≤v} p_u (float64) and
    x = U·C_V, U ~ Uniform[0, 1), the token is the first v with C_v > x, so P(v) = p_v and a
    token with p_v = 0 is never drawn. One uniform per row; ``torch.multinomial`` draws one
    exponential per vocabulary entry, which dominates a CPU decode step at 49k tokens. U comes
    from ``generator``'s device (the CPU for the native engine's) and moves to ``probs``'s."""
    cdf = probs.double().cumsum(dim=-1)
    uniform_device = generator.device if generator is not None else probs.device
    uniform = torch.rand(probs.shape[0], 1, dtype=torch.float64, generator=generator, device=uniform_device)
    x = uniform.to(probs.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, x, right=True).squeeze(-1).clamp_(max=probs.shape[-1] - 1)
