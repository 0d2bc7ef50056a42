"""The RL loop; one step (:meth:`RLLoop.run_step`) reads top to bottom:

    sample prompts (curriculum) -> generate (G = rollout.n per prompt) and reward
    -> advantages (compute_advantages; prior and group statistics reduced over DP)
    -> train (old / reference log-probs, PPO epochs: PolicyTrainer.train_step)
    -> weight sync to the rollout engine -> metrics

and :meth:`RLLoop.run` adds evaluation and checkpoints around it. A step's responses travel as
one :class:`~ebpo_megatron.rollout.base.RolloutBatch` from the engine to the trainer. Every DP
rank takes a contiguous share of the step's prompts (``parallel.sharding``); group ids are the
prompts' positions in the whole step, so the estimator can merge a prompt's statistics across
ranks.
"""

from __future__ import annotations

import json
import math
import signal
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from ..algorithms import EBPOPrior, compute_advantages, groups_with_signal, overlong_penalty
from ..atomic_file import write_text_atomic
from ..config.schema import Config
from ..config.typed import ConfigError
from ..data.task import Task, TaskPrompt
from ..evaluation.runner import evaluate_held_out
from ..parallel.sharding import contiguous_shares, group_rank_size
from ..rollout.base import RolloutBatch, RolloutEngine, SamplingParams, generate_decoded
from ..rollout.weight_sync import send_weights
from .checkpoint import checkpoint_dir, latest_checkpoint, resume_checkpoint, save_checkpoint
from .policy_trainer import PolicyTrainer
from .rollout_batch import build_policy_batch
from .sync_probe import trainer_sync_probe


class NonFiniteLoss(RuntimeError):
    """The loss or the gradient norm became NaN/inf; the message names the step and the last
    good checkpoint (nothing after it is saved, so nothing good is overwritten)."""


class StopRequested(Exception):
    """SIGUSR1/SIGTERM arrived: a checkpoint was written and the run should exit cleanly."""


def _dp() -> tuple[int, int, Any]:
    group = parallel_state.get_data_parallel_group()
    return dist.get_rank(group), dist.get_world_size(group), group


def _dp_mean(values: dict[str, float], weights: float = 1.0) -> dict[str, float]:
    """Weighted mean of per-rank values over the DP group (identical on every rank)."""
    _, size, group = _dp()
    keys = sorted(values)
    packed = torch.tensor([values[k] * weights for k in keys] + [weights], dtype=torch.float64)
    if size > 1:
        dist.all_reduce(packed, group=group)
    return {k: float(packed[i] / packed[-1]) for i, k in enumerate(keys)}


def _score(batch: RolloutBatch, task: Task, prompts: list[TaskPrompt]) -> RolloutBatch:
    """Score the decoded ``batch`` against the answers of ``prompts`` (indexed by group id)."""
    batch.answers = [prompts[int(g)].answer for g in batch.group_ids]
    scores, stats = task.reward(batch.texts, batch.answers)
    batch.rewards = torch.tensor(scores, dtype=torch.float32)
    batch.stats = {**stats, **batch.stats}
    return batch


def _generate_share(engine: RolloutEngine, task: Task, prompts: list[TaskPrompt], params: SamplingParams,
                    group: Any) -> RolloutBatch:
    """This process's share of ``prompts`` over ``group``, sampled with its rank's seed and
    scored; group ids are positions in ``prompts``."""
    rank, size = group_rank_size(group)
    part = contiguous_shares(len(prompts), size)[rank]
    batch = generate_decoded(engine, [p.token_ids for p in prompts[part]], params, rank, task.tokenizer.decode)
    batch.group_ids = batch.group_ids + part.start
    return _score(batch, task, prompts)


def rollout_share(engine: RolloutEngine, task: Task, prompts: list[TaskPrompt], first_group_id: int,
                  params: SamplingParams) -> RolloutBatch:
    """Generate and score this data-parallel rank's share of ``prompts`` (the whole step's list);
    group ids are ``first_group_id`` + the prompts' positions in ``prompts``.

    Engines that own their weights (vLLM) generate on every process: the step's P prompts are
    shared over all W processes, and every process then keeps the responses of its data-parallel
    share, so no prompt is generated twice, also when DP is smaller than the number of engines
    (e.g. TP = 8, DP = 1, eight vLLM engines); their stats are the mean over processes."""
    dp_rank, dp_size, dp_group = _dp()
    mine = contiguous_shares(len(prompts), dp_size)[dp_rank]
    if mine.stop == mine.start:
        raise ValueError(f"data.prompts_per_step ({len(prompts)}) leaves data-parallel rank {dp_rank} without prompts")
    if not engine.owns_weights:
        batch = _generate_share(engine, task, prompts, params, dp_group)
    else:
        world = dist.get_world_size()
        if len(prompts) < world:
            raise ValueError(f"{len(prompts)} prompts for {world} processes: the {type(engine).__name__} engine "
                             f"gives every process a share; raise data.prompts_per_step (and the held-out set) "
                             f"to >= {world}")
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, _generate_share(engine, task, prompts, params, dist.group.WORLD))
        everything = RolloutBatch.concat(gathered)
        batch = everything.select([i for i, g in enumerate(everything.group_ids.tolist())
                                   if mine.start <= g < mine.stop])
        batch.stats = {k: v / world for k, v in everything.stats.items()}
    batch.group_ids = batch.group_ids + first_group_id
    return batch


class RLLoop:
    """Owns the step loop; everything it composes is built by ``trainer.run``."""

    def __init__(self, config: Config, task: Task, trainer: PolicyTrainer, engine: RolloutEngine,
                 sampler: Any, logger: Any) -> None:
        self.config, self.task, self.trainer, self.engine = config, task, trainer, engine
        self.sampler, self.logger = sampler, logger
        self.prior = EBPOPrior()
        self.step = 0
        self.checkpoint_root = config.run.run_dir / "checkpoints"
        self._stop_signal: int | None = None
        self.best: dict[str, Any] | None = None  # {"metric", "value", "step"} of run.best_metric

    # ------------------------------------------------------------------ checkpoint
    def state(self) -> dict[str, Any]:
        return {"prior": self.prior.state_dict(), "sampler": self.sampler.state_dict(), "best": self.best}

    def save(self) -> Path:
        keep = (self.best["step"],) if self.best else ()
        return save_checkpoint(self.checkpoint_root, self.step, self.trainer, self.state(),
                               keep_last=self.config.run.keep_last, keep_steps=keep)

    def _track_best(self, metrics: dict[str, float]) -> bool:
        """Record this step's evaluation when ``run.best_metric`` improved; True when it did
        (the caller saves this step and names it in ``checkpoints/BEST``)."""
        name = self.config.run.best_metric
        if name is None:
            return False
        if name not in metrics:
            raise ConfigError(f"run.best_metric {name!r}: not among the evaluation metrics "
                              f"{sorted(k for k in metrics if k.startswith('eval/'))}")
        if self.best is not None and metrics[name] <= self.best["value"]:
            return False
        self.best = {"metric": name, "value": float(metrics[name]), "step": self.step}
        return True

    def _write_best(self) -> None:
        if self.best is not None and dist.get_rank() == 0:
            record = {**self.best, "checkpoint": str(checkpoint_dir(self.checkpoint_root, self.best["step"]))}
            write_text_atomic(self.checkpoint_root / "BEST", json.dumps(record) + "\n")

    def try_resume(self) -> bool:
        if not self.config.run.resume:
            return False
        state = resume_checkpoint(self.checkpoint_root, self.trainer, self.config.run.on_bad_checkpoint)
        if state is None:
            return False
        self.prior.load_state_dict(state["prior"])
        self.sampler.load_state_dict(state["sampler"])
        self.best = state.get("best")
        self.step = int(state["step"])
        return True

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self._stop_signal = signum

    def _stop_agreed(self) -> bool:
        """True on every rank when any rank received SIGUSR1/SIGTERM (they may see it at
        different step boundaries; all must take the collective save together)."""
        flag = torch.tensor([0.0 if self._stop_signal is None else 1.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    # ------------------------------------------------------------------ one step
    def sync_weights(self) -> None:
        """Wake the engine and, if it keeps its own copy of the weights (vLLM), send it the
        trainer's current ones (checked with a probe when ``rollout.vllm.sync_check``). Called
        once before the first generation and once after every training step; the engine then
        stays awake for the evaluation and the next step's generation."""
        self.engine.wake()
        if self.engine.owns_weights:
            probe = (trainer_sync_probe(self.trainer, self.config.model, self.task.tokenizer.pad_id)
                     if self.config.rollout.vllm.sync_check else None)
            send_weights(self.engine, self.trainer.chunks, self.config, probe)

    def sampling_params(self) -> SamplingParams:
        """This step's sampling settings; the seed is the step's, each process adds its rank
        (``parallel.sharding.rank_seed``)."""
        r = self.config.rollout
        return SamplingParams(
            n=r.n, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
            max_new_tokens=r.max_new_tokens, stop_token_ids=self.task.stop_token_ids,
            seed=(self.config.run.seed * 1_000_003 + self.step * 1009) % 2**62,
        )

    def collect(self) -> tuple[RolloutBatch, dict[str, float]]:
        """Generate and reward this step's rollouts; with DAPO dynamic sampling, rounds until
        enough groups carry signal (or ``max_sampling_rounds``), keeping those groups only."""
        algo = self.config.algorithm
        per_step = self.config.data.prompts_per_step
        kept: list[RolloutBatch] = []
        kept_groups = 0
        rounds = 0
        params = self.sampling_params()
        _, _, group = _dp()
        while True:
            prompts = self.sampler.next_batch()
            batch = rollout_share(self.engine, self.task, prompts, rounds * per_step,
                                  replace(params, seed=params.seed + 7919 * rounds))
            if algo.overlong.enabled:
                lengths = torch.tensor([len(r) for r in batch.response_ids])
                batch.rewards = batch.rewards + overlong_penalty(
                    lengths, self.config.rollout.max_new_tokens, algo.overlong.buffer_length,
                    algo.overlong.penalty_factor)
            rounds += 1
            if not algo.dynamic_sampling:
                return batch, {}
            keep = groups_with_signal(batch.rewards, batch.group_ids, group)
            count = torch.tensor([float(keep.sum()) / self.config.rollout.n])
            dist.all_reduce(count, group=group)
            kept_groups += int(round(float(count)))
            if keep.any():
                kept.append(batch.select(torch.nonzero(keep).flatten().tolist()))
            if kept_groups >= per_step or rounds >= algo.max_sampling_rounds:
                # nothing with signal on this rank: train on the last round as is
                merged = RolloutBatch.concat(kept) if kept else batch
                return merged, {"sampling/rounds": float(rounds), "sampling/kept_groups": float(kept_groups)}

    def advantages(self, rollout: RolloutBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """Â per response from the rewards and group ids (``algorithm.estimator``)."""
        algo = self.config.algorithm
        _, _, group = _dp()
        return compute_advantages(algo.estimator, rollout.rewards, rollout.group_ids, prior=self.prior,
                                  process_group=group, **algo.options)

    def train(self, rollout: RolloutBatch, advantages: torch.Tensor) -> dict[str, float]:
        """One PolicyTrainer step on the rollout; a non-finite loss or gradient norm stops the
        run before anything is saved."""
        batch = build_policy_batch(rollout.prompt_ids, rollout.response_ids, rollout.logprobs,
                                   advantages, self.task.tokenizer.pad_id)
        metrics = self.trainer.train_step(batch)
        for key in ("actor/loss", "actor/grad_norm"):
            value = metrics.get(key)
            if value is not None and not math.isfinite(value):
                latest = latest_checkpoint(self.checkpoint_root)
                raise NonFiniteLoss(
                    f"step {self.step}: {key} is {value}; stopping without saving. Last good checkpoint: "
                    f"{latest or 'none (no checkpoint was written yet)'}; lower the learning rate or check the rewards"
                )
        return metrics

    def rollout_metrics(self, rollout: RolloutBatch) -> dict[str, float]:
        """Response length, the share cut at ``max_new_tokens``, the reward's counts (mean over
        DP ranks weighted by their response counts)."""
        lengths = [float(len(r)) for r in rollout.response_ids]
        local = {
            "response/length_mean": sum(lengths) / len(lengths),
            "response/clip_frac": sum(f == "length" for f in rollout.finish_reasons) / len(lengths),
            **{k: v for k, v in rollout.stats.items() if k.startswith("reward/")},
        }
        return _dp_mean(local, weights=float(len(lengths)))

    def run_step(self) -> dict[str, float]:
        """generate and reward -> advantages -> train -> weight sync; the step's metrics."""
        self.step += 1
        start = time.perf_counter()
        rollout, sampling = self.collect()
        self.engine.sleep()
        rollout_seconds = time.perf_counter() - start
        advantages, adv_metrics = self.advantages(rollout)
        train_metrics = self.train(rollout, advantages)
        self.sync_weights()
        return {
            **self.rollout_metrics(rollout), **adv_metrics, **train_metrics, **sampling,
            **getattr(self.engine, "last_sync_stats", {}),
            "perf/rollout_s": rollout_seconds,
            "perf/step_s": time.perf_counter() - start,
        }

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict[str, float]:
        run = self.config.run
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGUSR1, signal.SIGTERM)}
        try:
            self.sync_weights()
            if self.step == 0:
                self.logger.log(0, evaluate_held_out(self.engine, self.task, self.config))
            last: dict[str, float] = {}
            while self.step < run.steps:
                metrics = self.run_step()
                improved = False
                if self.step % run.eval_every == 0 or self.step == run.steps:
                    metrics.update(evaluate_held_out(self.engine, self.task, self.config))
                    improved = self._track_best(metrics)
                self.logger.log(self.step, metrics)
                last = metrics
                stopping = self._stop_agreed()
                if self.step % run.save_every == 0 or self.step == run.steps or stopping or improved:
                    self.save()
                    self._write_best()
                if stopping:
                    raise StopRequested(f"signal {self._stop_signal or 'on another rank'}: "
                                        f"checkpoint saved at step {self.step}")
            return last
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
