"""Log-probabilities and entropy from vocabulary-parallel logits, never gathering the vocabulary.

TP rank r holds logits z[..., v] for v in its slice [r·V_r, (r+1)·V_r) of the (padded)
vocabulary (equal slices, as Megatron's ``ColumnParallelLinear`` output layer gives them). With
temperature T, x = z / T, and padded ids v ≥ V (``vocab_size``) set to x_v = −∞:

    m = max_v x_v                    (all-reduce MAX over the TP group)
    S = Σ_v exp(x_v − m)             (all-reduce SUM)          log Z = m + log S,  p_v = e^{x_v − m} / S
    log π(t) = x_t − log Z           (x_t: all-reduce SUM; only the rank holding t contributes)
    H = log Z − Σ_v p_v x_v          (Σ_v p_v x_v: all-reduce SUM)

Gradients on each rank's own slice (the upstream gradient is the same on every TP rank, as it is
when all TP ranks compute the same loss), with the chain rule's 1/T:

    ∂ log π(t) / ∂z_v = (1[v = t] − p_v) / T,        ∂H / ∂z_v = −p_v (x_v − Σ_u p_u x_u) / T.

Padded ids get probability 0 and gradient 0. Targets must be real ids (0 ≤ t < V): positions
with other values (e.g. an ignore index) give meaningless values and must be masked by the caller.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

Group = dist.ProcessGroup | None


def _rank_and_size(group: Group) -> tuple[int, int]:
    """(rank, size) in the TP group; ``None`` (or no process group) means a single rank."""
    if group is None or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _all_reduce(tensor: torch.Tensor, group: Group, op: Any = dist.ReduceOp.SUM) -> torch.Tensor:
    if _rank_and_size(group)[1] > 1:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


def _scaled_shard(logits: torch.Tensor, group: Group, temperature: float,
                  vocab_size: int | None) -> tuple[torch.Tensor, int]:
    """x = z / T in at least float32, padded ids set to −∞; and this shard's first vocabulary id."""
    rank, _ = _rank_and_size(group)
    width = logits.shape[-1]
    start = rank * width
    x = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature  # a new tensor
    if vocab_size is not None and start + width > vocab_size:
        x[..., max(vocab_size - start, 0):] = float("-inf")
    return x, start


def _softmax_parts(x: torch.Tensor, group: Group) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(e = exp(x − m), S, log Z) with the global max m and normalizer S = Σ_v e_v."""
    m = _all_reduce(x.max(dim=-1).values, group, dist.ReduceOp.MAX)
    e = torch.exp(x - m.unsqueeze(-1))
    s = _all_reduce(e.sum(dim=-1), group)
    return e, s, m + torch.log(s)


class _VocabParallelLogProb(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, targets: torch.Tensor, group: Group,
                temperature: float, vocab_size: int | None) -> torch.Tensor:
        x, start = _scaled_shard(logits, group, temperature, vocab_size)
        e, s, log_z = _softmax_parts(x, group)
        local = (targets - start).clamp(0, x.shape[-1] - 1)
        here = (targets >= start) & (targets < start + x.shape[-1])
        picked = x.gather(-1, local.unsqueeze(-1)).squeeze(-1)
        target_logit = _all_reduce(torch.where(here, picked, torch.zeros_like(picked)), group)
        ctx.save_for_backward(e, s, local, here)
        ctx.temperature = temperature
        return target_logit - log_z

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        e, s, local, here = ctx.saved_tensors
        d = -(e / s.unsqueeze(-1))  # −p_v (saved tensors stay intact for a retained graph)
        d.scatter_add_(-1, local.unsqueeze(-1), here.unsqueeze(-1).to(d.dtype))  # + 1[v = t]
        return d.mul_((grad / ctx.temperature).unsqueeze(-1)), None, None, None, None


class _VocabParallelEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, group: Group, temperature: float,
                vocab_size: int | None) -> torch.Tensor:
        x, _ = _scaled_shard(logits, group, temperature, vocab_size)
        e, s, log_z = _softmax_parts(x, group)
        p = e.div_(s.unsqueeze(-1))
        x = torch.nan_to_num(x, neginf=0.0)  # p_v = 0 there; avoids 0·(−∞)
        mean_x = _all_reduce((p * x).sum(dim=-1), group)
        ctx.save_for_backward(p, x, mean_x)
        ctx.temperature = temperature
        return log_z - mean_x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        p, x, mean_x = ctx.saved_tensors
        d = -p * (x - mean_x.unsqueeze(-1))
        return d.mul_((grad / ctx.temperature).unsqueeze(-1)), None, None, None


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature: expected > 0, got {temperature}")


def vocab_parallel_logprobs(
    logits_shard: torch.Tensor,
    targets: torch.Tensor,
    tp_group: Group = None,
    temperature: float = 1.0,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """log π(targets) of shape [...] from this rank's logits [..., V_pad/TP] (module docstring).

    ``tp_group=None``: the shard is the whole vocabulary. ``vocab_size``: the real vocabulary V;
    ids ≥ V are padding and excluded (``None``: no padding). Differentiable w.r.t. the shard;
    float32 or wider arithmetic whatever the input dtype. All TP ranks must call it together.
    """
    _check_temperature(temperature)
    return _VocabParallelLogProb.apply(logits_shard, targets, tp_group, temperature, vocab_size)


def vocab_parallel_entropy(
    logits_shard: torch.Tensor,
    tp_group: Group = None,
    temperature: float = 1.0,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Entropy H(π) = −Σ_v π_v log π_v [...] of the tempered distribution from this rank's
    logits [..., V_pad/TP]; arguments as for :func:`vocab_parallel_logprobs`."""
    _check_temperature(temperature)
    return _VocabParallelEntropy.apply(logits_shard, tp_group, temperature, vocab_size)
