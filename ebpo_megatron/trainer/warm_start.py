"""Supervised warm start (SFT) of a freshly built policy, before RL.

Minimizes the token-mean negative log-likelihood of the answer tokens,
    L = −(1/N_tok) Σ_{b,t} mask_{b,t} · log π(tokens[b, t+1] | tokens[b, ≤t]),
with torch AdamW on the raw GPTModel (no DDP wrapper, so the RL trainer can wrap the same
module afterwards). With bf16 parameters (``precision: bf16``) AdamW updates fp32 main copies
(``trainer.main_params``), as Megatron's optimizer does in the RL phase, never the bf16 weights
themselves; the forward and backward run in bf16. The output layer runs from the batch's first
target position on. Data parallel: each rank's loss is normalized by the global token count
and gradients are summed over the DP group, which gives the full-batch gradient. TP works
through the model's own collectives (TP-replicated parameters see identical gradients).
Pipeline parallelism is not supported here: warm-start a PP model offline.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from ..models.policy_model import positions_can_be_skipped
from ..parallel.vocab_parallel import vocab_parallel_logprobs
from .batching import PolicyBatch
from .main_params import MainParams


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


def warmup_cosine_lr(step: int, total: int, lr: float, warmup_steps: int, min_lr: float) -> float:
    """Learning rate of optimizer step ``step`` (0-based) of ``total``: linear warm-up to ``lr``
    over ``warmup_steps`` steps, then cosine decay to ``min_lr`` at the last step,
        lr_t = min_lr + (lr − min_lr) · ½ (1 + cos(π (t − W) / (T − W − 1))),  t ≥ W."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    span = total - warmup_steps - 1
    progress = (step - warmup_steps) / span if span > 0 else 1.0
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def sft_warm_start(
    model: torch.nn.Module,
    batches: list[PolicyBatch],
    *,
    lr: float,
    warmup_steps: int = 0,
    min_lr: float | None = None,
    target_loss: float | None = None,
    log_every: int = 0,
) -> list[float]:
    """Run one AdamW step per batch (this rank's share); returns the global loss per step.
    ``min_lr`` None: constant ``lr`` after the warm-up; else cosine decay to it
    (:func:`warmup_cosine_lr`). ``target_loss``: stop early, after the first step at which the
    mean global loss of the last :data:`TARGET_WINDOW` steps is at most ``target_loss`` (the same
    step on every rank), so that the warm start ends at one level of competence whatever the
    seed, instead of at one step count."""
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        raise ValueError("sft.steps > 0 needs parallel.pipeline_parallel = 1 (warm-start PP models offline)")
    dp_group = parallel_state.get_data_parallel_group()
    tp_group = parallel_state.get_tensor_model_parallel_group()
    # the output layer only from the first target position (models.policy_model), unless the
    # sequence is split over ranks
    skip_prompt_logits = positions_can_be_skipped(model.config)
    params = [p for p in model.parameters() if p.requires_grad]
    device = params[0].device  # the batches (host memory) are moved here one at a time
    main = MainParams(params)
    optimizer = torch.optim.AdamW(main.main, lr=lr, weight_decay=0.0)
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
        model.zero_grad(set_to_none=False)
        loss.backward()
        main.grads_to_main()
        if dist.get_world_size(dp_group) > 1:
            for p in main.main:
                dist.all_reduce(p.grad, group=dp_group)
        _clip_grad_norm(main.main, 1.0, tp_group)
        for group in optimizer.param_groups:
            group["lr"] = warmup_cosine_lr(step, len(batches), lr, min(warmup_steps, len(batches)),
                                           lr if min_lr is None else min_lr)
        optimizer.step()
        main.main_to_params()
        reported = loss.detach().double()
        dist.all_reduce(reported, group=dp_group)
        losses.append(float(reported))
        if log_every and (step + 1) % log_every == 0 and dist.get_rank() == 0:
            print(f"[sft] step {step + 1}/{len(batches)} loss {losses[-1]:.4f}", flush=True)
        if target_loss is not None and reached_target(losses, target_loss):
            break
    return losses


TARGET_WINDOW = 20


def reached_target(losses: list[float], target_loss: float) -> bool:
    """The mean of the last :data:`TARGET_WINDOW` losses is at most ``target_loss``."""
    recent = losses[-TARGET_WINDOW:]
    return len(recent) == TARGET_WINDOW and math.fsum(recent) / TARGET_WINDOW <= target_loss
