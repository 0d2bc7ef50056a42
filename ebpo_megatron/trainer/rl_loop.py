"""The RL loop, top to bottom:

    sample prompts (curriculum) -> rollout (G = rollout.n per prompt) -> reward
    -> advantages (compute_advantages; prior and group statistics reduced over DP)
    -> old / reference log-probs -> PPO epochs (PolicyTrainer.train_step)
    -> weight sync -> metrics -> checkpoint

Every DP rank takes a contiguous share of the step's prompts; group ids are the prompts'
positions in the whole step, so the estimator can merge a prompt's statistics across ranks.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from ..algorithms import EBPOPrior, compute_advantages, groups_with_signal, overlong_penalty
from ..config.schema import Config
from ..config.typed import ConfigError
from ..models.hf_mapping import Layout
from ..rollout.base import RolloutEngine, SamplingParams
from ..rollout.weight_export import export_hf_weights
from .checkpoint import checkpoint_dir, latest_checkpoint, resume_checkpoint, save_checkpoint
from .policy_trainer import PolicyTrainer
from .rollout_batch import build_policy_batch
from .sync_probe import trainer_sync_probe
from .task import Task, TaskPrompt


class NonFiniteLoss(RuntimeError):
    """The loss or the gradient norm became NaN/inf; the message names the step and the last
    good checkpoint (nothing after it is saved, so nothing good is overwritten)."""


class StopRequested(Exception):
    """SIGUSR1/SIGTERM arrived: a checkpoint was written and the run should exit cleanly."""


@dataclass
class StepRollout:
    prompts: list[TaskPrompt]  # this rank's prompts
    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    logprobs: list[list[float]]
    finish_reasons: list[str]
    group_ids: torch.Tensor
    rewards: torch.Tensor
    reward_stats: dict[str, float]
    texts: list[str]
    answers: list[str]


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


Row = tuple[int, list[int], list[int], list[float], str, str, float]  # prompt, ids, resp, logp, finish, text, score


def _generate_and_score(engine: RolloutEngine, task: Task, prompts: list[TaskPrompt],
                        params: SamplingParams) -> tuple[list[Row], dict[str, float]]:
    """One row per response; the first field is the index of its prompt in ``prompts``."""
    batch = engine.generate([list(p.token_ids) for p in prompts], params)
    texts = [task.tokenizer.decode(r) for r in batch.response_ids]
    scores, stats = task.reward(texts, [prompts[int(g)].answer for g in batch.group_ids])
    rows = list(zip(batch.group_ids.tolist(), batch.prompt_ids, batch.response_ids, batch.logprobs,
                    batch.finish_reasons, texts, scores))
    return rows, {**stats, **batch.stats}


def _spread_over_processes(engine: RolloutEngine, task: Task, prompts: list[TaskPrompt], start: int, count: int,
                           params: SamplingParams) -> tuple[list[Row], dict[str, float]]:
    """Engines that own their weights (vLLM): the step's P prompts are cut into W contiguous
    slices (W = world size), process r generates and scores slice r, and every process then takes
    the rows of its data-parallel share [start, start + count). No prompt is generated twice, also
    when DP is smaller than the number of engines (e.g. TP = 8, DP = 1, eight vLLM engines)."""
    from .batching import minibatch_slices

    world, rank = dist.get_world_size(), dist.get_rank()
    if len(prompts) < world:
        raise ValueError(f"{len(prompts)} prompts for {world} processes: the {type(engine).__name__} engine gives "
                         f"every process a share; raise data.prompts_per_step (and the held-out set) to >= {world}")
    part = minibatch_slices(len(prompts), world)[rank]
    rows, stats = _generate_and_score(engine, task, prompts[part],
                                      SamplingParams(**{**params.__dict__, "seed": params.seed + 104729 * rank}))
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, ([(part.start + r[0], *r[1:]) for r in rows], stats))
    mine = [(r[0] - start, *r[1:]) for share, _ in gathered for r in share if start <= r[0] < start + count]
    keys = set().union(*(s for _, s in gathered))
    mean_stats = {k: sum(s.get(k, 0.0) for _, s in gathered) / world for k in keys}
    return mine, mean_stats


def rollout_share(
    engine: RolloutEngine, task: Task, prompts: list[TaskPrompt], first_group_id: int,
    params: SamplingParams,
) -> StepRollout:
    """Generate and score this data-parallel rank's share of ``prompts`` (the whole step's list)."""
    rank, size, _ = _dp()
    per_rank = -(-len(prompts) // size)
    mine = prompts[rank * per_rank: (rank + 1) * per_rank]
    if not mine:
        raise ValueError(
            f"data.prompts_per_step ({len(prompts)}) leaves data-parallel rank {rank} without prompts"
        )
    if engine.owns_weights:
        rows, stats = _spread_over_processes(engine, task, prompts, rank * per_rank, len(mine), params)
    else:
        rows, stats = _generate_and_score(engine, task, mine, params)
    index, prompt_ids, response_ids, logprobs, reasons, texts, scores = (list(c) for c in zip(*rows))
    group_ids = torch.tensor(index, dtype=torch.long) + first_group_id + rank * per_rank
    return StepRollout(mine, prompt_ids, response_ids, logprobs, reasons, group_ids,
                       torch.tensor(scores, dtype=torch.float32), stats, texts,
                       [mine[i].answer for i in index])


def evaluate(engine: RolloutEngine, task: Task, config: Config) -> dict[str, float]:
    """Held-out validation with k = ``rollout.eval_samples`` samples per prompt at
    ``rollout.eval_temperature`` (0 = greedy): pass@1 = mean reward-correctness (score ≥ 1);
    with k > 1 also maj@m, pass@m and pass@k (m = min(``rollout.eval_maj``, k); the paper's
    validation curves are maj@16 and pass@16), computed as ``ebpo-eval`` does
    (``evaluation.runner.benchmark_metrics``) with the task's voted answers; pass@1 and each of
    ``task.eval_rewards`` also per topic (:func:`_per_topic`)."""
    from ..evaluation.runner import EvalSettings, ProblemResult, benchmark_metrics

    r = config.rollout
    params = SamplingParams(
        n=r.eval_samples, temperature=r.eval_temperature, max_new_tokens=r.max_new_tokens,
        stop_token_ids=task.stop_token_ids, seed=config.run.seed,
    )
    share = rollout_share(engine, task, task.held_out, 0, params)
    correct = (share.rewards >= 1.0).tolist()
    out = {"eval/pass@1": sum(correct) / len(correct)}
    correct_by_name = {"pass@1": correct}
    for name, reward in task.eval_rewards.items():
        scores, _ = reward(share.texts, share.answers)
        correct_by_name[f"{name}_pass@1"] = [s >= 1.0 for s in scores]
        out[f"eval/{name}_pass@1"] = sum(correct_by_name[f"{name}_pass@1"]) / len(scores)
    if r.eval_samples > 1:
        rows: dict[int, list[int]] = {}
        for i, group in enumerate(share.group_ids.tolist()):
            rows.setdefault(group, []).append(i)
        problems = [ProblemResult(group, [correct[i] for i in members],
                                  [task.voted_answer(share.texts[i]) for i in members])
                    for group, members in rows.items()]
        settings = EvalSettings(k=r.eval_samples, maj=min(r.eval_maj, r.eval_samples),
                                temperature=r.eval_temperature, max_new_tokens=r.max_new_tokens)
        metrics = benchmark_metrics(problems, settings, task.answer_equivalence)
        out.update({f"eval/{key}": value for key, value in metrics.items() if key != "pass@1"})
    return {**_dp_mean(out, weights=float(len(share.rewards))), **_per_topic(task, share.group_ids, correct_by_name)}


MAX_TOPICS_LOGGED = 20


def _per_topic(task: Task, held_out_index: torch.Tensor, correct_by_name: dict[str, list[bool]]) -> dict[str, float]:
    """``eval/NAME/TOPIC``: the fraction of correct responses among those to the held-out prompts
    of each topic, over all DP ranks; only when the held-out set has 2 to ``MAX_TOPICS_LOGGED`` topics."""
    topics = sorted({p.topic for p in task.held_out})
    if not 2 <= len(topics) <= MAX_TOPICS_LOGGED:
        return {}
    column = torch.tensor([topics.index(task.held_out[i].topic) for i in held_out_index.tolist()])
    names = sorted(correct_by_name)
    counts = torch.zeros(len(names) + 1, len(topics), dtype=torch.float64)  # last row: responses
    for row, name in enumerate(names):
        counts[row].index_add_(0, column, torch.tensor(correct_by_name[name], dtype=torch.float64))
    counts[-1].index_add_(0, column, torch.ones(len(column), dtype=torch.float64))
    _, size, group = _dp()
    if size > 1:
        dist.all_reduce(counts, group=group)
    return {f"eval/{name}/{topic}": float(counts[row, t] / counts[-1, t])
            for row, name in enumerate(names) for t, topic in enumerate(topics) if counts[-1, t] > 0}


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
            tmp = self.checkpoint_root / "BEST.tmp"
            tmp.write_text(json.dumps(record) + "\n")
            tmp.replace(self.checkpoint_root / "BEST")  # atomic: a kill leaves the old or the new

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
    @contextlib.contextmanager
    def generation_phase(self) -> Iterator[None]:
        """Wake the engine (and send it the current weights if it keeps its own copy), then
        put it back to sleep for training."""
        self.engine.wake()
        try:
            if self.engine.owns_weights:
                vllm = self.config.rollout.vllm
                probe = (trainer_sync_probe(self.trainer, self.config.model, self.task.tokenizer.pad_id)
                         if vllm.sync_check else None)
                self.engine.update_weights(export_hf_weights(
                    self.trainer.chunks, Layout.from_model_config(self.config.model),
                    bucket_mb=vllm.sync_bucket_mb), probe=probe)
            yield
        finally:
            self.engine.sleep()

    def sampling_params(self) -> SamplingParams:
        r = self.config.rollout
        rank, _, _ = _dp()
        return SamplingParams(
            n=r.n, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
            max_new_tokens=r.max_new_tokens, stop_token_ids=self.task.stop_token_ids,
            seed=(self.config.run.seed * 1_000_003 + self.step * 1009 + rank) % 2**62,
        )

    def collect(self) -> tuple[list[StepRollout], dict[str, float]]:
        """Rollouts of this step; with DAPO dynamic sampling, rounds until enough groups carry
        signal (or ``max_sampling_rounds``)."""
        algo = self.config.algorithm
        per_step = self.config.data.prompts_per_step
        shares: list[StepRollout] = []
        kept_groups = 0
        rounds = 0
        params = self.sampling_params()
        _, _, group = _dp()
        while True:
            prompts = self.sampler.next_batch()
            share = rollout_share(self.engine, self.task, prompts, rounds * per_step,
                                  SamplingParams(**{**params.__dict__, "seed": params.seed + 7919 * rounds}))
            if algo.overlong.enabled:
                lengths = torch.tensor([len(r) for r in share.response_ids])
                share.rewards = share.rewards + overlong_penalty(
                    lengths, self.config.rollout.max_new_tokens, algo.overlong.buffer_length,
                    algo.overlong.penalty_factor)
            rounds += 1
            if not algo.dynamic_sampling:
                shares.append(share)
                break
            keep = groups_with_signal(share.rewards, share.group_ids, group)
            kept = _select(share, keep)
            count = torch.tensor([float(keep.sum()) / self.config.rollout.n])
            dist.all_reduce(count, group=group)
            kept_groups += int(round(float(count)))
            if len(kept.rewards):
                shares.append(kept)
            if kept_groups >= per_step or rounds >= algo.max_sampling_rounds:
                if not shares:  # nothing with signal on this rank: train on the last round as is
                    shares.append(share)
                break
        return shares, {"sampling/rounds": float(rounds), "sampling/kept_groups": float(kept_groups)}

    def run_step(self) -> dict[str, float]:
        self.step += 1
        start = time.perf_counter()
        with self.generation_phase():
            shares, sampling = self.collect()
        rollout_seconds = time.perf_counter() - start
        _, _, group = _dp()
        merged = _merge(shares)
        algo = self.config.algorithm
        raw_rewards = merged.rewards
        advantages, adv_metrics = compute_advantages(
            algo.estimator, raw_rewards, merged.group_ids, prior=self.prior,
            process_group=group, **algo.estimator_options(),
        )
        batch = build_policy_batch(merged.prompt_ids, merged.response_ids, merged.logprobs,
                                   advantages, self.task.tokenizer.pad_id)
        train_metrics = self.trainer.train_step(batch)
        for key in ("actor/loss", "actor/grad_norm"):
            value = train_metrics.get(key)
            if value is not None and not math.isfinite(value):
                latest = latest_checkpoint(self.checkpoint_root)
                raise NonFiniteLoss(
                    f"step {self.step}: {key} is {value}; stopping without saving. Last good checkpoint: "
                    f"{latest or 'none (no checkpoint was written yet)'}; lower the learning rate or check the rewards"
                )
        lengths = [float(len(r)) for r in merged.response_ids]
        local = {
            "response/length_mean": sum(lengths) / len(lengths),
            "response/clip_frac": sum(f == "length" for f in merged.finish_reasons) / len(lengths),
            **{k: v for k, v in merged.reward_stats.items() if k.startswith("reward/")},
        }
        metrics = {
            **_dp_mean(local, weights=float(len(lengths))),
            **adv_metrics, **train_metrics, **(sampling if algo.dynamic_sampling else {}),
            **getattr(self.engine, "last_sync_stats", {}),
            "perf/rollout_s": rollout_seconds,
            "perf/step_s": time.perf_counter() - start,
        }
        return metrics

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict[str, float]:
        run = self.config.run
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGUSR1, signal.SIGTERM)}
        try:
            if self.step == 0:
                with self.generation_phase():
                    self.logger.log(0, evaluate(self.engine, self.task, self.config))
            last: dict[str, float] = {}
            while self.step < run.steps:
                metrics = self.run_step()
                improved = False
                if self.step % run.eval_every == 0 or self.step == run.steps:
                    with self.generation_phase():
                        metrics.update(evaluate(self.engine, self.task, self.config))
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


def _select(share: StepRollout, keep: torch.Tensor) -> StepRollout:
    rows = torch.nonzero(keep).flatten().tolist()
    return StepRollout(
        share.prompts, [share.prompt_ids[i] for i in rows], [share.response_ids[i] for i in rows],
        [share.logprobs[i] for i in rows], [share.finish_reasons[i] for i in rows],
        share.group_ids[rows], share.rewards[rows], share.reward_stats,
        [share.texts[i] for i in rows], [share.answers[i] for i in rows],
    )


def _merge(shares: list[StepRollout]) -> StepRollout:
    """Concatenate the rounds of one step (dynamic sampling) into one rollout."""
    if len(shares) == 1:
        return shares[0]
    stats: dict[str, float] = {}
    for s in shares:
        for k, v in s.reward_stats.items():
            stats[k] = stats.get(k, 0.0) + v
    return StepRollout(
        [p for s in shares for p in s.prompts],
        [x for s in shares for x in s.prompt_ids], [x for s in shares for x in s.response_ids],
        [x for s in shares for x in s.logprobs], [x for s in shares for x in s.finish_reasons],
        torch.cat([s.group_ids for s in shares]), torch.cat([s.rewards for s in shares]), stats,
        [x for s in shares for x in s.texts], [x for s in shares for x in s.answers],
    )
