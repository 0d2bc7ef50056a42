"""Log-probabilities and entropy from vocabulary-parallel logits, never gathering the vocabulary.

TP rank r holds logits z[..., v] for v in its slice [r·V_r, (r+1)·V_r) of the (padded)
vocabulary (equal slices, as Megatron's ``ColumnParallelLinear`` output layer gives them). With
temperature T, x = z / T over the rank's real ids (ids v ≥ V = ``vocab_size`` are padding, always
at the end of a slice, and are left out: probability 0, gradient 0):

    ℓ_r = log Σ_{v on r} e^{x_v}     (torch.logsumexp; −∞ for a slice that is all padding)
    log Z = m + log Σ_r e^{ℓ_r − m},  m = max_r ℓ_r   (all-reduce MAX, then SUM, of [...] scalars)
    p_v = e^{x_v − log Z}
    log π(t) = x_t − log Z           (x_t: all-reduce SUM; only the rank holding t contributes)
    H = −Σ_v p_v log p_v             (all-reduce SUM; = log Z − Σ_v p_v x_v, but summing
                                      log p_v = x_v − log Z keeps float32 error ~ε·(H + 1)
                                      instead of ε·|log Z|)

Gradients on each rank's own slice (the upstream gradient is the same on every TP rank, as it is
when all TP ranks compute the same loss), with the chain rule's 1/T:

    ∂ log π(t) / ∂z_v = (1[v = t] − p_v) / T,    ∂H / ∂z_v = −p_v (x_v − Σ_u p_u x_u) / T
                                                               = −p_v (log p_v + H) / T.

One autograd function computes both from one log Z: ``vocab_parallel_logprobs_and_entropy``
(what a train step's loss needs: log π, and H as a loss term or a metric) saves the passes of a
second log-sum-exp over the shard. When H takes no gradient, p is recomputed in the backward
pass from the saved x and log Z, so the forward keeps no [..., V_r] tensor of its own (at T = 1
in float32, x is a view of the logits); when it does, p and log p are kept. Targets must be
real ids (0 ≤ t < V): positions with other values (e.g. an ignore index) give meaningless values
and must be masked by the caller.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

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


def _real_ids(logits: torch.Tensor, group: Group, temperature: float,
              vocab_size: int | None) -> tuple[torch.Tensor, int]:
    """x = z / T over this shard's real ids, in at least float32 (never written to: a view of
    ``logits`` when no conversion is needed); and the shard's first vocabulary id."""
    rank, _ = _rank_and_size(group)
    width = logits.shape[-1]
    start = rank * width
    real = width if vocab_size is None else min(max(vocab_size - start, 0), width)
    x = logits[..., :real].to(torch.promote_types(logits.dtype, torch.float32))
    return (x if temperature == 1.0 else x / temperature), start


def _log_normalizer(x: torch.Tensor, group: Group) -> torch.Tensor:
    """log Z = log Σ_v e^{x_v} over all TP ranks, from each rank's ℓ_r (module docstring)."""
    local = torch.logsumexp(x, dim=-1)
    if _rank_and_size(group)[1] == 1:
        return local
    m = _all_reduce(local.clone(), group, dist.ReduceOp.MAX)
    return m + torch.log(_all_reduce(torch.exp(local - m), group))


def _log_probabilities(x: torch.Tensor, log_z: torch.Tensor) -> torch.Tensor:
    """log p_v = x_v − log Z (a new tensor)."""
    return torch.sub(x, log_z.unsqueeze(-1))


def _to_shard_width(grad: torch.Tensor, width: int) -> torch.Tensor:
    """Zero gradient for the padded ids at the end of the shard."""
    return grad if grad.shape[-1] == width else F.pad(grad, (0, width - grad.shape[-1]))


class _VocabParallelLogProbEntropy(torch.autograd.Function):
    """(log π(t), H) from one log Z. ``targets`` None: no log π; ``entropy`` "none": no H,
    "value": H without gradient, "differentiable": H with gradient. Skipped outputs are empty."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, targets: torch.Tensor | None, group: Group,
                temperature: float, vocab_size: int | None, entropy: str) -> tuple[torch.Tensor, torch.Tensor]:
        x, start = _real_ids(logits, group, temperature, vocab_size)
        log_z = _log_normalizer(x, group)
        logp = h = log_z.new_empty(0)
        local = here = p = log_p = None
        if targets is not None:
            real = x.shape[-1]
            here = (targets >= start) & (targets < start + real)
            local = (targets - start).clamp(0, max(real - 1, 0))
            picked = x.gather(-1, local.unsqueeze(-1)).squeeze(-1) if real else torch.zeros_like(log_z)
            logp = _all_reduce(torch.where(here, picked, torch.zeros_like(picked)), group) - log_z
        else:
            ctx.mark_non_differentiable(logp)
        if entropy != "none":
            log_p = _log_probabilities(x, log_z)
            p = log_p.exp()
            h = _all_reduce((p * log_p).sum(dim=-1).neg_(), group)
        if entropy != "differentiable" or not ctx.needs_input_grad[0]:
            p = log_p = None  # log π's backward recomputes p from x and log Z: no [..., V_r] tensor kept
            ctx.mark_non_differentiable(h)
        ctx.save_for_backward(x, log_z, local, here, p, log_p, h if p is not None else None)
        ctx.temperature, ctx.width = temperature, logits.shape[-1]
        return logp, h

    @staticmethod
    def backward(ctx: Any, grad_logp: torch.Tensor, grad_h: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, log_z, local, here, p, log_p, h = ctx.saved_tensors
        g_logp = grad_logp / ctx.temperature if local is not None else None
        if p is not None:  # −p (g_logπ + g_H (log p + H)) / T
            d = (log_p + h.unsqueeze(-1)).mul_((grad_h / ctx.temperature).unsqueeze(-1))
            if g_logp is not None:
                d.add_(g_logp.unsqueeze(-1))
            d.mul_(p).neg_()
        else:  # −p g_logπ / T
            d = _log_probabilities(x, log_z).exp_().neg_().mul_(g_logp.unsqueeze(-1))
        if g_logp is not None and d.shape[-1]:  # + 1[v = t] g_logπ / T
            d.scatter_add_(-1, local.unsqueeze(-1), (g_logp * here).unsqueeze(-1).to(d.dtype))
        return _to_shard_width(d, ctx.width), None, None, None, None, None


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
    return _VocabParallelLogProbEntropy.apply(logits_shard, targets, tp_group, temperature, vocab_size, "none")[0]


def vocab_parallel_entropy(
    logits_shard: torch.Tensor,
    tp_group: Group = None,
    temperature: float = 1.0,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Entropy H(π) = −Σ_v π_v log π_v [...] of the tempered distribution from this rank's
    logits [..., V_pad/TP]; arguments as for :func:`vocab_parallel_logprobs`."""
    _check_temperature(temperature)
    return _VocabParallelLogProbEntropy.apply(logits_shard, None, tp_group, temperature, vocab_size,
                                              "differentiable")[1]


def vocab_parallel_logprobs_and_entropy(
    logits_shard: torch.Tensor,
    targets: torch.Tensor,
    tp_group: Group = None,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    entropy_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log π(targets), H(π)) from one log Z: what the two functions above give, with one pass
    over the shard fewer. ``entropy_grad=False``: H is a value only (a metric), and the
    backward of log π recomputes p instead of keeping it; arguments as for
    :func:`vocab_parallel_logprobs`."""
    _check_temperature(temperature)
    return _VocabParallelLogProbEntropy.apply(logits_shard, targets, tp_group, temperature, vocab_size,
                                              "differentiable" if entropy_grad else "value")
