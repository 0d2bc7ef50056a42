"""The PPO/EBPO train step on Megatron-Core model chunks (TP, PP, DP; CPU or GPU).

One call of :meth:`PolicyTrainer.train_step` on a :class:`PolicyBatch` (this DP rank's rows):
    1. old-policy log-probs log π_old (no grad; skipped when the batch carries them, and in an
       on-policy step — one epoch, one mini-batch — where π_old = π_θ at the only update, so the
       update's own forward gives them, detached: the same values without a forward pass of
       their own) and reference log-probs log π_ref (frozen reference chunks, when ``kl_coef > 0``);
    2. ``ppo_epochs`` × ``mini_batches`` optimizer steps; each mini-batch is cut into
       micro-batches (fixed size, or a token budget) and run through Megatron's
       ``get_forward_backward_func`` (pipeline schedule when PP > 1);
    3. per-step KL(π_t ‖ π_{t+1}) on the step's tokens and throughput metrics.
Every forward computes logits from the micro-batch's first response position on
(``PolicyBatch.response_start``, ``models.policy_model``): log π of prompt tokens is never used.
Rows of a micro-batch with the same prompt run as one row, the prompt computed once
(``train.step.share_prompts``, ``models.prompt_sharing``): the same log-probs and gradient.
The batch may live in host memory (the RL loop builds it there); each micro-batch is moved to
the model's device when the schedule's forward step takes it, and log-probs come back to the
batch's device.

Loss scaling. Each micro-batch's loss is normalized by the counts of the *whole* mini-batch on
all DP ranks (N_tok for token-mean, B for the sequence modes; see ``algorithms.aggregate``),
so Σ over micro-batches and ranks = the full-batch loss. Megatron divides a micro-batch loss by
the number of micro-batches n_mb, and DDP averages gradients over the d DP ranks; the loss
handed to Megatron is therefore multiplied by n_mb·d, which makes the gradient exactly the
full-batch gradient whatever the micro-batch count, DP size and aggregation mode.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Any, Iterable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func

from ..algorithms import aggregate, kl_penalty, policy_loss
from ..config.training import LossConfig, OptimConfig, StepConfig
from ..models.policy_model import positions_can_be_skipped
from ..models.prompt_sharing import pack_shared_prompts, resolve_share_prompts
from ..parallel.vocab_parallel import vocab_parallel_logprobs, vocab_parallel_logprobs_and_entropy
from .batching import PolicyBatch, microbatch_indices, minibatch_slices


def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    return chunk.module if isinstance(chunk, DistributedDataParallel) else chunk


def _num_params(chunks: list[torch.nn.Module]) -> int:
    """Parameters of the whole model (summed over TP and PP ranks)."""
    local = sum(p.numel() for c in chunks for p in c.parameters())
    total = torch.tensor([float(local)], dtype=torch.float64)
    for group in (parallel_state.get_tensor_model_parallel_group(),
                  parallel_state.get_pipeline_model_parallel_group()):
        if dist.get_world_size(group) > 1:
            dist.all_reduce(total, group=group)
    return int(total.item())


class PolicyTrainer:
    """Megatron DDP + (distributed) optimizer + LR schedule around policy model chunks.

    ``chunks``: the GPTModel chunks of this rank (from ``models.build_policy``);
    ``ref_chunks``: frozen reference chunks (same layout) or None when ``loss.kl_coef == 0``.
    """

    def __init__(
        self,
        chunks: list[torch.nn.Module],
        optim: OptimConfig,
        loss: LossConfig,
        step: StepConfig,
        ref_chunks: list[torch.nn.Module] | None = None,
    ) -> None:
        if loss.kl_coef > 0 and ref_chunks is None:
            raise ValueError("loss.kl_coef > 0 needs reference model chunks (ref_chunks)")
        if loss.tis_cap == "auto":
            raise ValueError("loss.tis_cap 'auto' is unresolved: resolve it first "
                             "(config.precision.resolve_precision; load_config does)")
        self.optim_cfg, self.loss_cfg, self.step_cfg = optim, loss, step
        config = _unwrap(chunks[0]).config
        self.model_config = config
        self.device = next(_unwrap(chunks[0]).parameters()).device  # micro-batches are moved here
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            config.variable_seq_lengths = True  # micro-batches are trimmed to their own length
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=optim.use_distributed_optimizer,
        )
        self.chunks = [
            DistributedDataParallel(config=_unwrap(c).config, ddp_config=ddp_config, module=_unwrap(c))
            for c in chunks
        ]
        self.ref_chunks = ref_chunks
        for ref in ref_chunks or []:
            ref.requires_grad_(False)
            ref.eval()
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam", lr=optim.lr, min_lr=optim.min_lr, weight_decay=optim.weight_decay,
                adam_beta1=optim.adam_beta1, adam_beta2=optim.adam_beta2, adam_eps=optim.adam_eps,
                clip_grad=optim.clip_grad, bf16=config.bf16, fp16=config.fp16,
                params_dtype=config.params_dtype,
                use_distributed_optimizer=optim.use_distributed_optimizer,
            ),
            self.chunks,
        )
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0 if optim.warmup_steps else optim.lr, max_lr=optim.lr,
            min_lr=optim.min_lr, lr_warmup_steps=optim.warmup_steps,
            lr_decay_steps=max(optim.decay_steps, optim.warmup_steps + 1),
            lr_decay_style=optim.decay_style, start_wd=optim.weight_decay,
            end_wd=optim.weight_decay, wd_incr_steps=1, wd_incr_style="constant",
        )
        config.no_sync_func = [c.no_sync for c in self.chunks] if len(self.chunks) > 1 else self.chunks[0].no_sync
        config.finalize_model_grads_func = finalize_model_grads
        config.grad_scale_func = self.optimizer.scale_loss
        self.num_params = _num_params(self.chunks)
        self.vocab_size = getattr(_unwrap(chunks[0]), "real_vocab_size", None)  # logits past it: padding
        self.dp_group = parallel_state.get_data_parallel_group()
        self.tp_group = parallel_state.get_tensor_model_parallel_group()
        # the output layer only on response positions (models.policy_model), unless the sequence
        # is split over ranks
        self.skip_prompt_logits = positions_can_be_skipped(config)
        # the G responses to a prompt in one row, the prompt computed once (models.prompt_sharing)
        self.share_prompts = resolve_share_prompts(step.share_prompts, _unwrap(chunks[0]))

    # ----------------------------------------------------------------------------- helpers
    @property
    def is_last_stage(self) -> bool:
        return parallel_state.is_pipeline_last_stage(ignore_virtual=True)

    def _microbatches(self, batch: PolicyBatch) -> tuple[list[torch.Tensor], list[PolicyBatch]]:
        """Row indices of each micro-batch, and the micro-batches (trimmed to their length)."""
        rows = microbatch_indices(
            batch.lengths,
            micro_batch_size=self.step_cfg.micro_batch_size,
            max_tokens=self.step_cfg.max_tokens_per_microbatch,
        )
        return rows, [batch.select(r) for r in rows]

    def _share_from_last_stage(self, metrics: dict[str, float]) -> dict[str, float]:
        """The last pipeline stage's metrics, on every stage (rank 0 logs)."""
        group = parallel_state.get_pipeline_model_parallel_group()
        if dist.get_world_size(group) == 1:
            return metrics
        box = [metrics if self.is_last_stage else None]
        src = parallel_state.get_pipeline_model_parallel_last_rank()
        dist.broadcast_object_list(box, src=src, group=group)
        return box[0]

    def _dp_sum(self, *values: float) -> list[float]:
        out = torch.tensor(values, dtype=torch.float64)
        if dist.get_world_size(self.dp_group) > 1:
            dist.all_reduce(out, group=self.dp_group)
        return out.tolist()

    def _run(self, chunks, microbatches: list[PolicyBatch], loss_fn, forward_only: bool) -> list[dict]:
        """One pass of Megatron's schedule over ``microbatches``; returns loss_fn's dicts."""
        def forward_step(data_iterator: Iterator[PolicyBatch], model: torch.nn.Module):
            mb = next(data_iterator).to(self.device)
            start = mb.response_start() if self.skip_prompt_logits else None
            packed = None
            if self.share_prompts and mb.prompt_lengths is not None:
                packed = pack_shared_prompts(mb.tokens, mb.lengths, mb.prompt_lengths, start or 0)
            if packed is not None:
                output = model(packed.tokens, packed.positions, packed.attention_mask, gather=packed.gather)
            else:
                positions = torch.arange(mb.tokens.shape[1], device=mb.tokens.device).expand_as(mb.tokens)
                output = model(mb.tokens, positions, None, logits_from=start)
            return output, partial(loss_fn, mb, start or 0)

        longest = max(mb.tokens.shape[1] for mb in microbatches)
        widest = max(mb.size for mb in microbatches)
        return get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(microbatches),
            model=chunks,
            num_microbatches=len(microbatches),
            seq_length=longest,
            micro_batch_size=widest,
            decoder_seq_length=longest,
            forward_only=forward_only,
        )

    def _token_logprobs(self, mb: PolicyBatch, start: int, logits: torch.Tensor,
                        temperature: float | None = None) -> torch.Tensor:
        """log π(tokens[t+1] | tokens[≤t]) at temperature T (the step's unless given),
        target-aligned [b, s−1], from the vocab-parallel logits [b, s − start, v/tp] of positions
        start, …; 0 before ``start``."""
        return F.pad(vocab_parallel_logprobs(*self._vocab_inputs(mb, start, logits, temperature)), (start, 0))

    def _token_logprobs_and_entropy(self, mb: PolicyBatch, start: int, logits: torch.Tensor,
                                    entropy_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`_token_logprobs` and H(π) at the same positions, from one log Z; H is
        differentiable iff ``entropy_grad`` (a loss term, not only a metric)."""
        logp, entropy = vocab_parallel_logprobs_and_entropy(*self._vocab_inputs(mb, start, logits),
                                                            entropy_grad=entropy_grad)
        return F.pad(logp, (start, 0)), F.pad(entropy, (start, 0))

    def _vocab_inputs(self, mb: PolicyBatch, start: int, logits: torch.Tensor,
                      temperature: float | None = None) -> tuple[Any, ...]:
        """Arguments of the vocab-parallel functions: the logits of positions start … s−2 and
        their targets tokens[start+1:], the TP group, T (the step's unless given) and the real
        vocabulary size."""
        return (logits[:, :-1].float(), mb.tokens[:, start + 1:], self.tp_group,
                self.step_cfg.temperature if temperature is None else temperature, self.vocab_size)

    # ------------------------------------------------------------------------ log-probs
    @torch.no_grad()
    def logprobs(self, batch: PolicyBatch, reference: bool = False,
                 temperature: float | None = None) -> torch.Tensor | None:
        """Target-aligned log-probs [B, L−1] of the policy (or the reference) at the step's
        temperature (or ``temperature``) on the last PP stage, on the batch's device; None on the
        other stages."""
        chunks = self.ref_chunks if reference else self.chunks
        if chunks is None:
            raise ValueError("reference log-probs requested but no reference chunks were given")
        for c in chunks:
            c.eval()
        rows, micro = self._microbatches(batch)

        def collect(mb: PolicyBatch, start: int, logits: torch.Tensor):
            return torch.zeros((), dtype=torch.float32), {"logp": self._token_logprobs(mb, start, logits, temperature)}

        outputs = self._run(chunks, micro, collect, forward_only=True)
        if not self.is_last_stage:
            return None
        return _assemble(batch.loss_mask, zip(rows, [out["logp"] for out in outputs]))

    # ----------------------------------------------------------------------- train step
    def train_step(self, batch: PolicyBatch) -> dict[str, float]:
        """Update the policy on this rank's share of one RL step; returns step metrics
        (identical on every rank of the last pipeline stage)."""
        start = time.perf_counter()
        if batch.old_logp is None and self.step_cfg.old_logp == "rollout":
            if batch.rollout_logp is None:
                raise ValueError("train.step.old_logp 'rollout': the batch carries no rollout log-probs")
            batch = batch.with_logps(old_logp=batch.rollout_logp)
        elif batch.old_logp is None and not self.step_cfg.on_policy:
            batch = batch.with_logps(old_logp=self.logprobs(batch))
        old_from_update = batch.old_logp is None  # π_old: the (only) update's forward, detached
        if self.loss_cfg.kl_coef > 0 and batch.ref_logp is None:
            batch = batch.with_logps(ref_logp=self.logprobs(batch, reference=True))
        for c in self.chunks:
            c.train()
        sums: dict[str, float] = {}
        grad_norms: list[float] = []
        updates = 0
        trained_tokens = 0.0
        for _ in range(self.step_cfg.ppo_epochs):
            for rows in minibatch_slices(batch.size, self.step_cfg.mini_batches):
                mini = batch.select(rows)
                metrics, grad_norm, update_logp = self._update(mini)
                if old_from_update and self.is_last_stage:  # the whole batch was the mini-batch
                    batch = batch.with_logps(old_logp=_assemble(batch.loss_mask, update_logp))
                updates += 1
                grad_norms.append(grad_norm)
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + v
                trained_tokens += float(mini.lengths.sum())
        out = {k: v / updates for k, v in sums.items()}
        out["actor/grad_norm"] = sum(grad_norms) / len(grad_norms)
        out["actor/lr"] = self.optimizer.param_groups[0]["lr"]
        out["actor/param_norm"] = self._param_norm()
        mismatch = self._rollout_mismatch(batch) if self.step_cfg.old_logp == "recompute" else {}
        if self.step_cfg.step_kl and self.is_last_stage:
            new_logp = self.logprobs(batch)
            kl = kl_penalty(batch.old_logp, new_logp, "k3")  # KL(π_t ‖ π_{t+1}) on π_t's samples
            kl_sum, count = self._dp_sum(float((kl * batch.loss_mask).sum()), float(batch.loss_mask.sum()))
            out["actor/step_kl"] = kl_sum / max(count, 1.0)
        elif self.step_cfg.step_kl:
            self.logprobs(batch)  # the other stages take part in the pipeline schedule
        seconds = time.perf_counter() - start
        tokens_step, = self._dp_sum(trained_tokens)
        forward_tokens, = self._dp_sum(float(batch.lengths.sum()))
        passes = (self.step_cfg.old_logp == "recompute" and not old_from_update) + (self.loss_cfg.kl_coef > 0) \
            + self.step_cfg.step_kl
        flops = 6.0 * self.num_params * tokens_step + 2.0 * self.num_params * forward_tokens * passes
        out["perf/tokens_per_s"] = tokens_step / seconds
        out["perf/tflops"] = flops / seconds / 1e12
        if self.step_cfg.peak_tflops:
            out["perf/mfu"] = out["perf/tflops"] / (self.step_cfg.peak_tflops * dist.get_world_size())
        out["perf/train_step_s"] = seconds
        out.update(mismatch)
        return self._share_from_last_stage(out)

    def _param_norm(self) -> float:
        """‖θ‖₂ of the whole model: TP shards summed over the TP group, TP-replicated tensors
        counted once, stages summed over the PP group. Each tensor's rows (last dimension) are
        normed in float32 and their squares summed in float64: within ~1e-8 of an all-float64
        sum, without a float64 copy of the model."""
        tp_size = dist.get_world_size(self.tp_group)
        squares = torch.zeros((), dtype=torch.float64, device=self.device)
        for chunk in self.chunks:
            for param in chunk.module.parameters():
                weight = 1.0 if getattr(param, "tensor_model_parallel", False) else 1.0 / tp_size
                rows = param.detach().reshape(-1, param.shape[-1])
                row_norms = torch.linalg.vector_norm(rows, dim=1, dtype=torch.float32)
                squares += weight * row_norms.double().square().sum()
        for group in (self.tp_group, parallel_state.get_pipeline_model_parallel_group()):
            if dist.get_world_size(group) > 1:
                dist.all_reduce(squares, group=group)
        return float(squares.sqrt())

    def _rollout_mismatch(self, batch: PolicyBatch) -> dict[str, float]:
        """Mean and max |log π_rollout − log π_old| over response tokens (train–inference gap)."""
        if batch.rollout_logp is None or not self.is_last_stage:
            return {}
        gap = (batch.rollout_logp - batch.old_logp).abs() * batch.loss_mask
        total, count = self._dp_sum(float(gap.sum()), float(batch.loss_mask.sum()))
        worst = torch.tensor([float(gap.max()) if gap.numel() else 0.0])
        if dist.get_world_size(self.dp_group) > 1:
            dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=self.dp_group)
        return {"rollout/logp_diff_mean": total / max(count, 1.0), "rollout/logp_diff_max": float(worst)}

    def _update(self, mini: PolicyBatch) -> tuple[dict[str, float], float, list[tuple[torch.Tensor, torch.Tensor]]]:
        """One optimizer step on one mini-batch; returns (summed loss metrics, grad norm, and when
        ``mini`` carries no π_old the log-probs of the update's forward (π_θ before the step,
        detached) as (rows of ``mini``, log-probs [b, ≤ L−1]) per micro-batch on the last PP
        stage, else []).

        Without ``mini.old_logp`` (an on-policy step) π_old is that forward's own log π,
        detached: ratio ρ = 1 and ∇ρ = ∇log π, as with a separate forward of the same weights."""
        loss_cfg = self.loss_cfg
        rows, micro = self._microbatches(mini)
        forward_logps: list[torch.Tensor] = []  # micro-batches in schedule order
        total_tokens, total_seqs = self._dp_sum(float(mini.loss_mask.sum()), float(mini.size))
        scale = len(micro) * dist.get_world_size(self.dp_group)
        totals = {"total_tokens": max(total_tokens, 1.0), "total_seqs": total_seqs}
        mech = loss_cfg.entropy_mechanism()

        def loss_fn(mb: PolicyBatch, start: int, logits: torch.Tensor):
            logp, entropy = self._token_logprobs_and_entropy(  # H: a metric unless it is a loss term
                mb, start, logits, entropy_grad=loss_cfg.entropy_coef > 0)
            mask = mb.loss_mask.to(logp.dtype)
            if mb.old_logp is None:
                forward_logps.append(logp.detach())
            loss, stats = policy_loss(
                logp, logp.detach() if mb.old_logp is None else mb.old_logp, mb.advantages, mask,
                clip_low=loss_cfg.clip_low, clip_high=loss_cfg.clip_high, agg=loss_cfg.agg,
                dual_clip=loss_cfg.dual_clip, rollout_logp=mb.rollout_logp, tis_cap=loss_cfg.tis_cap,
                entropy_mech=mech, norm_const=loss_cfg.norm_const, **totals,
            )
            tokens = float(mask.sum())
            report = {"actor/pg_loss": loss.detach()}
            if loss_cfg.kl_coef > 0:
                kl = aggregate(kl_penalty(logp, mb.ref_logp, loss_cfg.kl_kind), mask, loss_cfg.agg,
                               norm_const=loss_cfg.norm_const, **totals)
                loss = loss + loss_cfg.kl_coef * kl
                report["actor/kl_ref"] = kl.detach()
            if loss_cfg.entropy_coef > 0:
                loss = loss - loss_cfg.entropy_coef * aggregate(
                    entropy, mask, loss_cfg.agg, norm_const=loss_cfg.norm_const, **totals)
            report["actor/entropy"] = (entropy.detach() * mask).sum() / totals["total_tokens"]
            report["actor/loss"] = loss.detach()
            # token-weighted so that the sum over micro-batches and ranks is the batch mean
            for key, value in stats.items():
                report[key] = torch.tensor(value * tokens / totals["total_tokens"])
            return loss * scale, report

        for c in self.chunks:
            c.zero_grad_buffer()
        self.optimizer.zero_grad()
        reports = self._run(self.chunks, micro, loss_fn, forward_only=False)
        _, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=1)
        summed: dict[str, float] = {}
        if self.is_last_stage:
            keys = sorted(reports[0])
            local = [sum(float(r[k]) for r in reports) for k in keys]
            summed = dict(zip(keys, self._dp_sum(*local)))
        return summed, float(grad_norm) if grad_norm is not None else float("nan"), list(zip(rows, forward_logps))


def _assemble(like: torch.Tensor, pieces: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Target-aligned log-probs [B, L−1] (float32, shaped and placed as ``like``, a batch's loss
    mask) from micro-batch pieces (row indices, log-probs [b, ≤ L−1]); 0 past a piece's length."""
    full = torch.zeros(like.shape, dtype=torch.float32, device=like.device)
    for rows, logp in pieces:
        full[rows, : logp.shape[1]] = logp.to(full.device, torch.float32)
    return full
