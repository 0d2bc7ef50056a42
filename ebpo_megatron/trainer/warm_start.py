"""Supervised warm start (SFT) of a freshly built policy, before RL.

Minimizes the token-mean negative log-likelihood of the answer tokens,
    L = −(1/N_tok) Σ_{b,t} mask_{b,t} · log π(tokens[b, t+1] | tokens[b, ≤t]),
with torch AdamW on the raw GPTModel (no DDP wrapper, so the RL trainer can wrap the same
module afterwards); the output layer runs from the batch's first target position on. Data parallel: each rank's loss is normalized by the global token count
and gradients are summed over the DP group, which gives the full-batch gradient. TP works
through the model's own collectives (TP-replicated parameters see identical gradients).
Pipeline parallelism is not supported here: warm-start a PP model offline.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from ..models.policy_model import positions_can_be_skipped
from ..parallel.vocab_parallel import vocab_parallel_logprobs
from .batching import PolicyBatch


def _clip_grad_norm(params: list[torch.Tensor], max_norm: float, tp_group: dist.ProcessGroup) -> None:
    """Scale gradients so the norm of the *whole* model's gradient is at most ``max_norm``:
    TP-sharded gradients are summed over the TP group, replicated ones counted once."""
    tp_size = dist.get_world_size(tp_group)
    squares = torch.zeros((), dtype=torch.float64, device=params[0].device)
    for p in params:
        weight = 1.0 if getattr(p, "tensor_model_parallel", False) else 1.0 / tp_size
        squares += weight * p.grad.double().pow(2).sum()
    if tp_size > 1:
        dist.all_reduce(squares, group=tp_group)
    coef = max_norm / (float(squares.sqrt()) + 1e-6)
    if coef < 1.0:
        for p in params:
            p.grad.mul_(coef)


def sft_warm_start(
    model: torch.nn.Module,
    batches: list[PolicyBatch],
    *,
    lr: float,
    log_every: int = 0,
) -> list[float]:
    """Run one AdamW step per batch (this rank's share); returns the global loss per step."""
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        raise ValueError("sft.steps > 0 needs parallel.pipeline_parallel = 1 (warm-start PP models offline)")
    dp_group = parallel_state.get_data_parallel_group()
    tp_group = parallel_state.get_tensor_model_parallel_group()
    # the output layer only from the first target position (models.policy_model), unless the
    # sequence is split over ranks
    skip_prompt_logits = positions_can_be_skipped(model.config)
    params = [p for p in model.parameters() if p.requires_grad]
    device = params[0].device  # the batches (host memory) are moved here one at a time
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for step, batch in enumerate(batches):
        batch = batch.to(device)
        total = batch.loss_mask.sum().double()
        dist.all_reduce(total, group=dp_group)
        positions = torch.arange(batch.tokens.shape[1], device=device).unsqueeze(0).expand_as(batch.tokens)
        first = batch.response_start() if skip_prompt_logits else None
        logits = model(batch.tokens, positions, None, logits_from=first)
        start = first or 0
        logp = vocab_parallel_logprobs(logits[:, :-1].float(), batch.tokens[:, start + 1:], tp_group,
                                       vocab_size=getattr(model, "real_vocab_size", None))
        loss = -(logp * batch.loss_mask[:, start:]).sum() / total.float().clamp(min=1.0)
        optimizer.zero_grad(set_to_none=False)
        loss.backward()
        if dist.get_world_size(dp_group) > 1:
            for p in params:
                dist.all_reduce(p.grad, group=dp_group)
        _clip_grad_norm(params, 1.0, tp_group)
        optimizer.step()
        reported = loss.detach().double()
        dist.all_reduce(reported, group=dp_group)
        losses.append(float(reported))
        if log_every and (step + 1) % log_every == 0 and dist.get_rank() == 0:
            print(f"[sft] step {step + 1}/{len(batches)} loss {losses[-1]:.4f}", flush=True)
    return losses
