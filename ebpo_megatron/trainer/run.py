"""Assemble a training run from its config and run it (``ebpo-train``).

process groups -> task (tokenizer) -> policy chunks -> warm start (fresh runs; with
``sft.eval_before`` a held-out evaluation before it) -> frozen
reference -> PolicyTrainer -> rollout engine -> curriculum sampler -> RLLoop (resuming from the
run directory's latest complete checkpoint) -> plot and summary.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from ..config.schema import Config, dump_config
from ..config.typed import to_dict
from ..data.sampler import CurriculumSampler
from ..data.task import Task
from ..data.tasks import build_task
from ..evaluation.runner import evaluate_held_out
from ..host_memory import apply_host_memory_reuse
from ..models import build_policy
from ..parallel import cpu_compat, initialize, launch_info, shutdown
from ..parallel.sharding import contiguous_shares
from ..rollout.factory import build_engine, native_engine
from .checkpoint import checkpoint_dir, latest_checkpoint, load_model, save_model
from .metrics_log import MetricsLogger, plot_run, read_metrics
from .policy_trainer import PolicyTrainer
from .rl_loop import RLLoop
from .rollout_batch import build_policy_batch
from .warm_start import sft_warm_start


BEFORE_SFT_FILE = "before_sft.json"


class _SilentLogger:
    def log(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


def _is_rank0() -> bool:
    return dist.get_rank() == 0


def _sft_batches(task: Task, config: Config) -> list:
    rng = random.Random(config.run.seed)
    rank = parallel_state.get_data_parallel_rank()
    size = parallel_state.get_data_parallel_world_size()
    batches = []
    for _ in range(config.sft.steps):
        pairs = rng.sample(task.sft_pairs, min(config.sft.batch_size, len(task.sft_pairs)))
        mine = pairs[contiguous_shares(len(pairs), size)[rank]]
        prompt_ids, answers = [p for p, _ in mine], [a for _, a in mine]
        batches.append(build_policy_batch(prompt_ids, answers, [[0.0] * len(a) for a in answers],
                                          torch.zeros(len(mine)), task.tokenizer.pad_id))
    return batches


def _evaluate_before_sft(model: torch.nn.Module, task: Task, config: Config) -> None:
    """Held-out evaluation of the loaded weights with the native engine, written to
    ``<run_dir>/before_sft.json`` (kept across resumes; the summary reports it)."""
    metrics = evaluate_held_out(native_engine(model, config, task.tokenizer.pad_id), task, config)
    if _is_rank0():
        (config.run.run_dir / BEFORE_SFT_FILE).write_text(json.dumps(metrics, indent=1))
        print("[sft] before the warm start: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()), flush=True)


def _earlier_wall_seconds(run_dir: Path, resumed: bool) -> float:
    """``wall_seconds`` of the summary a resumed run's earlier invocations left (0 for a fresh
    run, or when there is none: an invocation killed before its summary is not counted)."""
    summary_file = run_dir / "summary.json"
    if not resumed or not summary_file.is_file():
        return 0.0
    try:
        return float(json.loads(summary_file.read_text())["wall_seconds"])
    except (ValueError, KeyError, TypeError):  # a damaged summary: this invocation's time only
        return 0.0


def run(config: Config) -> dict[str, Any]:
    """Train; returns the run summary (also written to ``<run_dir>/summary.json``). Its
    ``wall_seconds`` is the run's total: a resume adds its own time to the previous summary's."""
    started = time.time()
    if config.run.torch_threads:
        torch.set_num_threads(config.run.torch_threads)
    apply_host_memory_reuse(config.run.host_memory_reuse)
    initialize(config.parallel, config.model, launch_info())
    try:
        return _run(config, started)
    finally:
        shutdown()


def _run(config: Config, started: float) -> dict[str, Any]:
    loop, sft_losses, resumed = _build(config)
    run_dir = config.run.run_dir
    # asked once, now: closing a vLLM engine tears down the default process group with it
    is_rank0 = _is_rank0()
    logger: Any = _SilentLogger()
    if is_rank0:
        # written only now: a resume that failed while building (another model, a damaged
        # checkpoint) leaves the run folder as it was
        (run_dir / "config.yaml").write_text(dump_config(config))
        logger = MetricsLogger(run_dir, config.run.steps, config.run.wandb, config.run.wandb_project,
                               to_dict(config), config.run.tensorboard, start_step=loop.step,
                               label=config.algorithm.estimator.upper())
        if sft_losses:
            print(f"[sft] warm start: loss {sft_losses[0]:.3f} -> {sft_losses[-1]:.3f} in {len(sft_losses)} steps",
                  flush=True)
        if resumed:
            print(f"[resume] continuing from step {loop.step} ({latest_checkpoint(run_dir / 'checkpoints')})",
                  flush=True)
    loop.logger = logger
    try:
        loop.run()
    finally:
        logger.close()
        loop.engine.close()  # vLLM's teardown needs the process groups, which run() shuts down next
    if not is_rank0:
        return {}
    summary = _summarize(config, loop, resumed, started)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"held-out pass@1: {summary['heldout_pass@1_start']:.3f} (start) -> "
          f"{summary['heldout_pass@1_end']:.3f} (end); {summary['wall_seconds']} s; "
          f"curves: {run_dir / 'training_curves.png'}", flush=True)
    return summary


def _build(config: Config) -> tuple[RLLoop, list[float], bool]:
    """Task, policy (warm-started on a fresh run), frozen reference, trainer, engine, sampler
    and the loop, resumed from the run directory's latest complete checkpoint when there is one.
    Returns the loop, the warm start's losses and whether it resumed."""
    cpu_compat.set_seed(config.run.seed)
    run_dir = config.run.run_dir
    if _is_rank0():
        run_dir.mkdir(parents=True, exist_ok=True)
        task = build_task(config, run_dir)  # rank 0 first: it may train the tokenizer
    dist.barrier()
    if not _is_rank0():
        task = build_task(config, run_dir)

    chunks = build_policy(config.model, config.parallel)
    resuming = config.run.resume and latest_checkpoint(run_dir / "checkpoints") is not None
    reference_dir = run_dir / "reference"
    sft_losses: list[float] = []
    if not resuming and config.model.checkpoint:
        load_model(Path(config.model.checkpoint), chunks)
    if not resuming and _is_rank0():
        (run_dir / BEFORE_SFT_FILE).unlink(missing_ok=True)  # a previous run's, in a reused run directory
    if not resuming and config.sft.steps > 0:
        if not task.sft_pairs:
            raise ValueError(f"sft.steps {config.sft.steps}: task '{config.data.task}' has no warm-start pairs")
        if config.sft.eval_before:
            _evaluate_before_sft(chunks[0], task, config)
        sft_losses = sft_warm_start(chunks[0], _sft_batches(task, config), lr=config.sft.lr,
                                    warmup_steps=config.sft.warmup_steps, min_lr=config.sft.min_lr,
                                    target_loss=config.sft.target_loss,
                                    log_every=max(config.sft.steps // 5, 1))
    # <run>/reference/: the policy as RL starts (after the warm start) — the frozen π_ref when
    # kl_coef > 0, and after a warm start (kept even without KL) the seed's starting point that
    # tools/compare.py gives every arm
    if not resuming and (config.algorithm.loss.kl_coef > 0 or config.sft.steps > 0):
        save_model(reference_dir, chunks)
    ref_chunks = None
    if config.algorithm.loss.kl_coef > 0:
        ref_chunks = build_policy(config.model, config.parallel)
        if resuming:
            load_model(reference_dir, ref_chunks)
        else:
            for ref, chunk in zip(ref_chunks, chunks):
                ref.load_state_dict(chunk.state_dict())

    trainer = PolicyTrainer(chunks, config.train.optim, config.algorithm.loss, config.train.step, ref_chunks)
    engine = build_engine(config, trainer.chunks[0].module, task.tokenizer.pad_id)
    sampler = CurriculumSampler(task.train, config.data.order, config.data.prompts_per_step, config.run.seed)
    loop = RLLoop(config, task, trainer, engine, sampler, _SilentLogger())
    resumed = loop.try_resume()
    return loop, sft_losses, resumed


def _summarize(config: Config, loop: RLLoop, resumed: bool, started: float) -> dict[str, Any]:
    """The run summary (rank 0): held-out pass@1 at the first and last evaluation, the task's
    own summary metrics (``Task.summary_metrics``), the best checkpoint, the evaluation before
    the warm start, wall time; also draws the training curves."""
    run_dir = config.run.run_dir
    rows = read_metrics(run_dir / "metrics.jsonl")
    evals = [r for r in rows if "eval/pass@1" in r]
    before_sft_file = run_dir / BEFORE_SFT_FILE
    before_sft = json.loads(before_sft_file.read_text()) if before_sft_file.is_file() else None
    plot_run(run_dir / "metrics.jsonl", run_dir / "training_curves.png",
             title=f"{config.run.name}: {config.algorithm.estimator}, G={config.rollout.n}",
             before_warm_start=before_sft)
    summary: dict[str, Any] = {
        "estimator": config.algorithm.estimator,
        "steps": loop.step,
        "heldout_pass@1_start": evals[0]["eval/pass@1"] if evals else None,
        "heldout_pass@1_end": evals[-1]["eval/pass@1"] if evals else None,
        "wall_seconds": round(_earlier_wall_seconds(run_dir, resumed) + time.time() - started, 1),
        "checkpoint": str(latest_checkpoint(run_dir / "checkpoints")),
    }
    if loop.best is not None:  # run.best_metric: the checkpoint of the best evaluation
        summary["best"] = {**loop.best, "checkpoint": str(checkpoint_dir(run_dir / "checkpoints", loop.best["step"]))}
    if before_sft is not None:
        summary["before_sft"] = before_sft
    for name, key in loop.task.summary_metrics.items():
        summary[f"heldout_{name}_start"] = evals[0].get(key) if evals else None
        summary[f"heldout_{name}_end"] = evals[-1].get(key) if evals else None
        if before_sft is not None:
            summary[f"heldout_{name}_before_sft"] = before_sft.get(key)
    return summary
