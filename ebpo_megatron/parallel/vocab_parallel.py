"""Log-probabilities and entropy from vocabulary-parallel logits, without gathering the vocabulary.

TP rank r holds logits z[..., v] for v in its slice [r·V_r, (r+1)·V_r) of the (padded)
vocabulary. With temperature T, x = z / T, and padded entries v ≥ ``vocab_size`` excluded:
    m = max_v x_v                    (all-reduce MAX)
    S = Σ_v exp(x_v − m)             (all-reduce SUM)          log Z = m + log S
    log π(t) = x_t − log Z           (x_t: all-reduce SUM of the one rank that holds t)
    H = log Z − Σ_v p_v x_v          (Σ_v p_v x_v: all-reduce SUM)
Gradients (per rank, on its own slice, scaled by 1/T):
    ∂ log π(t) / ∂x_v = 1[v = t] − p_v,        ∂H / ∂x_v = −p_v (x_v − Σ_u p_u x_u).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _world(group: dist.ProcessGroup | None) -> tuple[int, int]:
    if group is None or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _all_reduce(tensor: torch.Tensor, group: dist.ProcessGroup | None, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if _world(group)[1] > 1:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


def _scaled_shard(logits: torch.Tensor, group, temperature: float, vocab_size: int | None):
    """x = z / T with padded entries set to −inf, and this shard's first vocabulary id."""
    rank, _ = _world(group)
    width = logits.shape[-1]
    start = rank * width
    x = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    if vocab_size is not None and start + width > vocab_size:
        x = x.clone()
        x[..., max(vocab_size - start, 0):] = float("-inf")
    return x, start


def _softmax_parts(x: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(exp(x − m), S, log Z) with the global max m and normalizer S."""
    m = _all_reduce(x.max(dim=-1).values, group, dist.ReduceOp.MAX)
    e = torch.exp(x - m.unsqueeze(-1))
    s = _all_reduce(e.sum(-1), group)
    return e, s, m + torch.log(s)


class _VocabParallelLogProb(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, group, temperature, vocab_size):
        x, start = _scaled_shard(logits, group, temperature, vocab_size)
        e, s, log_z = _softmax_parts(x, group)
        local = targets - start
        here = (local >= 0) & (local < x.shape[-1])
        picked = x.gather(-1, local.clamp(0, x.shape[-1] - 1).unsqueeze(-1)).squeeze(-1)
        target_logit = _all_reduce(torch.where(here, picked, torch.zeros_like(picked)), group)
        ctx.save_for_backward(e, s, local, here)
        ctx.temperature = temperature
        return target_logit - log_z

    @staticmethod
    def backward(ctx, grad):
        e, s, local, here = ctx.saved_tensors
        d = -(e / s.unsqueeze(-1))
        onehot = torch.zeros_like(d).scatter(-1, local.clamp(0, d.shape[-1] - 1).unsqueeze(-1),
                                             here.unsqueeze(-1).to(d.dtype))
        return (d + onehot) * (grad / ctx.temperature).unsqueeze(-1), None, None, None, None


class _VocabParallelEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, group, temperature, vocab_size):
        x, _ = _scaled_shard(logits, group, temperature, vocab_size)
        e, s, log_z = _softmax_parts(x, group)
        p = e / s.unsqueeze(-1)
        finite_x = torch.where(torch.isfinite(x), x, torch.zeros_like(x))
        mean_x = _all_reduce((p * finite_x).sum(-1), group)
        ctx.save_for_backward(p, finite_x, mean_x)
        ctx.temperature = temperature
        return log_z - mean_x

    @staticmethod
    def backward(ctx, grad):
        p, x, mean_x = ctx.saved_tensors
        d = -p * (x - mean_x.unsqueeze(-1))
        return d * (grad / ctx.temperature).unsqueeze(-1), None, None, None


def vocab_parallel_logprobs(
    logits_shard: torch.Tensor,
    targets: torch.Tensor,
    tp_group: dist.ProcessGroup | None = None,
    temperature: float = 1.0,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """log π(targets) [...] from this rank's logits [..., V/TP] (see module docstring)."""
    if temperature <= 0:
        raise ValueError(f"temperature: expected > 0, got {temperature}")
    return _VocabParallelLogProb.apply(logits_shard, targets, tp_group, temperature, vocab_size)


def vocab_parallel_entropy(
    logits_shard: torch.Tensor,
    tp_group: dist.ProcessGroup | None = None,
    temperature: float = 1.0,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Entropy H(π) [...] of the tempered distribution from this rank's logits [..., V/TP]."""
    if temperature <= 0:
        raise ValueError(f"temperature: expected > 0, got {temperature}")
    return _VocabParallelEntropy.apply(logits_shard, tp_group, temperature, vocab_size)
