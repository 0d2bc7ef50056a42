"""Evaluate a policy: k sampled responses per problem -> per-sample correctness and extracted
answers -> per-benchmark Pass@1 (mean over the k samples), maj@m and unbiased pass@k.

Two layers:

* :func:`evaluate_benchmarks` takes a rollout engine that is already running (the trainer's
  own, or one from :func:`policy_engine`), an :class:`EvalTask` (tokenizer, stop tokens, scorer)
  and :class:`Benchmark` prompt lists; every data-parallel rank generates and scores a
  contiguous share of each benchmark's problems and the results are gathered on every rank.
* :func:`run_evaluation` assembles everything from a checkpoint and a config (``ebpo-eval``,
  ``tools/estimate_difficulty.py``): process groups, policy, weights, native engine.

Correctness and the answers that vote in maj@m come from the task's reward: for math configs
``MathReward`` (``RewardResult.correct`` and its ``extracted`` answer; answers are clustered
with math-verify); for embedded tasks (``build_task``'s held-out set) their reward (score ≥ 1)
with the stripped response (synthetic task) or the extracted answer as the vote.

Sampling seeds are ``seed + 1_000_003 · dp_rank``: sampled results depend on the data-parallel
size, greedy ones (temperature 0) do not.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch.distributed as dist
from megatron.core import parallel_state

from ..config.schema import Config, load_config
from ..config.typed import ConfigError, to_dict
from ..data.math_datasets import MathExample, load_math_dataset
from ..data.math_prompts import ChatPromptRenderer
from ..data.sp_tokenizer import MODEL_FILE
from ..rollout.base import RolloutEngine, SamplingParams
from ..rollout.native_engine import NativeEngine
from ..trainer.task import TaskPrompt, TextTokenizer
from .metrics import (
    Equivalence,
    MathVerifyEquivalence,
    format_results_table,
    mean_maj_at_k,
    mean_pass_at_1,
    mean_pass_at_k,
)

T = TypeVar("T")
R = TypeVar("R")

Scorer = Callable[[list[str], list[str]], tuple[list[bool], list[str | None]]]
"""(response texts, reference answers) -> (correct, extracted answer or None) per response."""


class EvalInputError(ValueError):
    """Bad user input (a missing file, a setting out of range); the message names it."""


@dataclass(frozen=True)
class EvalSettings:
    """k samples per problem, maj@``maj`` over the first ``maj`` of them, sampling settings."""

    k: int = 32
    maj: int = 16
    temperature: float = 1.0
    max_new_tokens: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        if self.k < 1:
            raise EvalInputError(f"k: expected >= 1 samples per problem, got {self.k}")
        if not 1 <= self.maj <= self.k:
            raise EvalInputError(f"maj: expected 1 <= maj <= k ({self.k}), got {self.maj}")
        if self.temperature < 0:
            raise EvalInputError(f"temperature: expected >= 0 (0 = greedy), got {self.temperature}")
        if self.max_new_tokens < 1:
            raise EvalInputError(f"max_new_tokens: expected >= 1, got {self.max_new_tokens}")


@dataclass(frozen=True)
class Benchmark:
    """One benchmark's prompts; ``TaskPrompt.uid`` is the problem's row index in ``source``."""

    name: str
    source: str
    prompts: list[TaskPrompt]
    dropped: int = 0  # rows whose prompt exceeded data.max_prompt_tokens


@dataclass
class EvalTask:
    """What evaluation needs from a task: decoding, stop tokens, scoring, answer equivalence;
    ``renderer`` (math configs) turns problems into chat prompts; ``train`` and ``held_out`` are an
    embedded task's two splits."""

    tokenizer: TextTokenizer
    stop_token_ids: tuple[int, ...]
    scorer: Scorer
    equivalence: Equivalence | None = None
    renderer: ChatPromptRenderer | None = None
    held_out: list[TaskPrompt] = field(default_factory=list)
    train: list[TaskPrompt] = field(default_factory=list)


@dataclass
class ProblemResult:
    """The k samples of one problem: verdicts and extracted answers, in sampling order."""

    uid: int
    correct: list[bool]
    answers: list[str | None]


@dataclass
class BenchmarkResult:
    name: str
    source: str
    dropped: int
    problems: list[ProblemResult]
    metrics: dict[str, float]  # fractions in [0, 1]


# ----------------------------------------------------------------------------- config and task
def find_run_dir(checkpoint: Path) -> Path | None:
    """The run directory of a checkpoint: the nearest of its parent and grandparent holding a
    ``config.yaml`` (``runs/X/checkpoints/step_N`` -> ``runs/X``; ``runs/X/reference`` -> ``runs/X``)."""
    for candidate in (checkpoint.parent, checkpoint.parent.parent):
        if (candidate / "config.yaml").is_file():
            return candidate
    return None


def resolve_config(checkpoint: Path, config_path: Path | None,
                   overrides: Sequence[str] = ()) -> tuple[Config, Path]:
    """Check ``checkpoint``; load ``config_path`` (default: the run directory's config.yaml)
    with overrides. Returns the config and the run directory (for the synthetic tokenizer)."""
    if not checkpoint.is_dir():
        raise EvalInputError(f"--checkpoint: directory not found: {checkpoint}")
    if not (checkpoint / "COMPLETE").is_file():
        raise EvalInputError(f"--checkpoint: {checkpoint} is not a complete checkpoint (no COMPLETE marker)")
    run_dir = find_run_dir(checkpoint)
    if config_path is None:
        if run_dir is None:
            raise EvalInputError(f"--config: not given, and no config.yaml next to {checkpoint} or its parent")
        config_path = run_dir / "config.yaml"
    try:
        config = load_config(config_path, list(overrides))
    except ConfigError as err:
        raise EvalInputError(f"--config: {err}") from None
    return config, run_dir or config.run.run_dir


def build_eval_task(config: Config, run_dir: Path) -> EvalTask:
    """Math configs: the math reward and the chat renderer of ``data.tokenizer_dir`` (problems
    come from data files). Embedded tasks (synthetic, ...): the task ``build_task`` makes, with
    its held-out set and reward; the synthetic task's tokenizer is read from ``run_dir/tokenizer``."""
    if config.data.task != "math":
        from ..rewards.answer_extraction import extract_answer
        from ..trainer.tasks import build_task

        synthetic = config.data.task == "synthetic"
        if synthetic and not (run_dir / "tokenizer" / MODEL_FILE).is_file():
            raise EvalInputError(f"{run_dir / 'tokenizer' / MODEL_FILE}: the run's tokenizer is missing "
                                 "(synthetic task: evaluate a checkpoint inside its run directory)")
        task = build_task(config, run_dir)

        def embedded_scorer(texts: list[str], answers: list[str]) -> tuple[list[bool], list[str | None]]:
            scores, _ = task.reward(texts, answers)  # the synthetic task compares the stripped text
            voted = [t.strip() or None for t in texts] if synthetic else [extract_answer(t).answer for t in texts]
            return [s >= 1.0 for s in scores], voted

        return EvalTask(task.tokenizer, task.stop_token_ids, embedded_scorer, held_out=task.held_out,
                        train=task.train)

    from ..rewards.math import MathReward
    from ..trainer.tasks import HFTokenizer

    if not config.data.tokenizer_dir:
        raise EvalInputError("data.tokenizer_dir: task 'math' needs a local Hugging Face tokenizer directory")
    try:
        renderer = ChatPromptRenderer(config.data.tokenizer_dir, max_prompt_tokens=config.data.max_prompt_tokens)
    except FileNotFoundError as err:
        raise EvalInputError(f"data.tokenizer_dir: {err}") from None
    tokenizer = HFTokenizer(renderer.tokenizer)
    if tokenizer.vocab_size > config.model.vocab_size:
        raise EvalInputError(f"model.vocab_size {config.model.vocab_size} is smaller than the tokenizer's "
                             f"{tokenizer.vocab_size} ({config.data.tokenizer_dir})")
    reward = MathReward()

    def math_scorer(texts: list[str], answers: list[str]) -> tuple[list[bool], list[str | None]]:
        results = reward.score_batch(texts, answers)
        return [r.correct for r in results], [r.extracted for r in results]

    return EvalTask(tokenizer, (tokenizer.eos_id,), math_scorer, MathVerifyEquivalence(reward), renderer)


def load_benchmarks(task: EvalTask, files: Sequence[Path], split: str = "held-out") -> list[Benchmark]:
    """One benchmark per math file (named by its stem), or one split of an embedded task
    (``split``: "held-out" or "train")."""
    if task.renderer is None:
        if files:
            raise EvalInputError("--data: an embedded task (data.task other than 'math') evaluates its "
                                 "own splits; data files need a math config")
        splits = {"held-out": task.held_out, "train": task.train}
        if split not in splits:
            raise EvalInputError(f"split: expected one of {sorted(splits)}, got {split!r}")
        return [Benchmark(split, f"{split} split of the embedded task", splits[split])]
    if not files:
        raise EvalInputError("--data: no data file given (and data.eval_files is empty)")
    names = [Path(f).stem for f in files]
    if len(set(names)) != len(names):
        raise EvalInputError(f"--data: benchmark names (file stems) must be unique, got {names}")
    benchmarks = []
    for path in map(Path, files):
        if not path.is_file():
            raise EvalInputError(f"--data: file not found: {path}")
        prompts, dropped = render_examples(task.renderer, load_math_dataset(path))
        if not prompts:
            raise EvalInputError(f"{path}: no prompt within data.max_prompt_tokens = "
                                 f"{task.renderer.max_prompt_tokens} ({dropped} rows)")
        benchmarks.append(Benchmark(path.stem, str(path), prompts, dropped))
    return benchmarks


def render_examples(renderer: ChatPromptRenderer, examples: Sequence[MathExample]) -> tuple[list[TaskPrompt], int]:
    """Chat prompts of ``examples`` with uid = row index; rows over the length limit are dropped."""
    prompts: list[TaskPrompt] = []
    limit = renderer.max_prompt_tokens
    for row, example in enumerate(examples):
        ids = renderer.render(example).token_ids
        if limit is None or len(ids) <= limit:
            prompts.append(TaskPrompt(row, ids, example.answer, example.topic or "unknown"))
    return prompts, len(examples) - len(prompts)


# ----------------------------------------------------------------------------- generation
def map_over_dp(items: list[T], fn: Callable[[list[T], int], list[R]], every_process: bool = False) -> list[R]:
    """``fn(share, rank)`` on this data-parallel rank's contiguous share of ``items``; the
    results, in item order, on every rank. TP ranks of one DP rank take the same share.
    ``every_process``: shares over all processes instead (engines holding their own weights,
    vLLM: one per process, so TP ranks need not repeat each other's work)."""
    group = dist.group.WORLD if every_process else parallel_state.get_data_parallel_group()
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    per_rank = -(-len(items) // size)
    mine = items[rank * per_rank: (rank + 1) * per_rank]
    out = fn(mine, rank) if mine else []
    if size == 1:
        return out
    gathered: list[list[R]] = [[] for _ in range(size)]
    dist.all_gather_object(gathered, out, group=group)
    return [r for part in gathered for r in part]


def generate_texts(engine: RolloutEngine, tokenizer: TextTokenizer, prompts: list[Sequence[int]],
                   params: SamplingParams, dp_rank: int) -> list[list[str]]:
    """``params.n`` decoded responses per prompt (seed offset by the DP rank)."""
    seeded = SamplingParams(**{**params.__dict__, "seed": params.seed + 1_000_003 * dp_rank})
    batch = engine.generate([list(p) for p in prompts], seeded)
    texts = [tokenizer.decode(r) for r in batch.response_ids]
    return [texts[i * params.n: (i + 1) * params.n] for i in range(len(prompts))]


def benchmark_metrics(problems: Sequence[ProblemResult], settings: EvalSettings,
                      equivalence: Equivalence | None = None) -> dict[str, float]:
    """pass@1 (mean over the k samples), maj@m, and unbiased pass@m and pass@k (the paper's
    validation reports maj@16 and pass@16), as fractions."""
    correct = [p.correct for p in problems]
    metrics = {
        "pass@1": mean_pass_at_1(correct),
        f"maj@{settings.maj}": mean_maj_at_k([p.answers for p in problems], correct, settings.maj, equivalence),
    }
    for k in sorted({settings.maj, settings.k} - {1}):
        metrics[f"pass@{k}"] = mean_pass_at_k(correct, k)
    return metrics


def evaluate_benchmarks(engine: RolloutEngine, task: EvalTask, benchmarks: Sequence[Benchmark],
                        settings: EvalSettings) -> list[BenchmarkResult]:
    """Sample ``settings.k`` responses per problem, score them, compute each benchmark's metrics
    (collective over the data-parallel group; the same results on every rank)."""
    params = SamplingParams(n=settings.k, temperature=settings.temperature,
                            max_new_tokens=settings.max_new_tokens, stop_token_ids=task.stop_token_ids,
                            seed=settings.seed)

    def share(prompts: list[TaskPrompt], dp_rank: int) -> list[ProblemResult]:
        texts = generate_texts(engine, task.tokenizer, [p.token_ids for p in prompts], params, dp_rank)
        flat = [t for group in texts for t in group]
        correct, answers = task.scorer(flat, [p.answer for p in prompts for _ in range(settings.k)])
        k = settings.k
        return [ProblemResult(p.uid, correct[i * k:(i + 1) * k], answers[i * k:(i + 1) * k])
                for i, p in enumerate(prompts)]

    results = []
    for bench in benchmarks:
        problems = map_over_dp(bench.prompts, share, every_process=engine.owns_weights)
        results.append(BenchmarkResult(bench.name, bench.source, bench.dropped, problems,
                                       benchmark_metrics(problems, settings, task.equivalence)))
    return results


def pass_rates(result: BenchmarkResult) -> dict[int, float]:
    """Per problem uid: p̂ = (1/k) Σ_j 1[sample j correct], the fraction of its k samples graded
    correct (the ebpo-diff difficulty with k = 16 at temperature 1.0)."""
    return {p.uid: sum(p.correct) / len(p.correct) for p in result.problems}


# ----------------------------------------------------------------------------- from a checkpoint
@contextmanager
def policy_engine(config: Config, checkpoint: Path, pad_token_id: int) -> Iterator[RolloutEngine]:
    """Process groups (torchrun / Slurm / one process), the policy with ``checkpoint``'s
    weights, and the engine of ``rollout.engine`` over it: native (the Megatron model itself), or
    vLLM (one per process, woken and sent the weights through the trainer's export; the Megatron
    copy is dropped before generation). The groups are destroyed on exit."""
    import torch

    from ..models import build_policy
    from ..models.hf_mapping import Layout
    from ..parallel import cpu_compat, initialize, launch_info, shutdown
    from ..rollout.weight_export import export_hf_weights
    from ..trainer.checkpoint import load_model

    if config.run.torch_threads:
        torch.set_num_threads(config.run.torch_threads)
    initialize(config.parallel, config.model, launch_info())
    try:
        cpu_compat.set_seed(config.run.seed)
        chunks = build_policy(config.model, config.parallel)
        load_model(checkpoint, chunks)
        if config.rollout.engine != "vllm":
            yield NativeEngine(chunks[0], pad_token_id=pad_token_id,
                               max_sequence_length=config.model.max_position_embeddings,
                               max_batch_size=config.rollout.max_batch_size)
            return
        from ..trainer.run import build_vllm_engine

        engine = build_vllm_engine(config)
        engine.wake()
        engine.update_weights(export_hf_weights(chunks, Layout.from_model_config(config.model),
                                                bucket_mb=config.rollout.vllm.sync_bucket_mb))
        del chunks
        try:
            yield engine
        finally:
            engine.sleep()
            engine.close()  # before shutdown(): vLLM's teardown needs the process groups
    finally:
        shutdown()


@dataclass
class EvalRun:
    """What :func:`run_evaluation` returns: results, and whether this process is global rank 0."""

    results: list[BenchmarkResult]
    is_rank0: bool
    seconds: float


def run_evaluation(config: Config, checkpoint: Path, run_dir: Path, data_files: Sequence[Path],
                   settings: EvalSettings, split: str = "held-out") -> EvalRun:
    """Everything from a checkpoint: task, benchmarks (checked before any process group), engine,
    evaluation. ``data_files`` empty: ``data.eval_files`` for math configs, the embedded task's
    ``split`` otherwise."""
    started = time.time()
    task = build_eval_task(config, run_dir)
    if not data_files and task.renderer is not None:
        data_files = [Path(f) for f in config.data.eval_files]
    benchmarks = load_benchmarks(task, data_files, split)
    with policy_engine(config, checkpoint, task.tokenizer.pad_id) as engine:
        results = evaluate_benchmarks(engine, task, benchmarks, settings)
        is_rank0 = dist.get_rank() == 0
    return EvalRun(results, is_rank0, time.time() - started)


# ----------------------------------------------------------------------------- reports
def average_metrics(results: Sequence[BenchmarkResult]) -> dict[str, float]:
    """Plain mean of each metric over the benchmarks (as the paper's "avg" column)."""
    return {key: math.fsum(r.metrics[key] for r in results) / len(results) for key in results[0].metrics}


def results_table(results: Sequence[BenchmarkResult], label: str) -> str:
    """Markdown: one row per metric (percent), benchmarks as columns, their average last."""
    names = [r.name for r in results]
    rows = [((label, key), {r.name: 100.0 * r.metrics[key] for r in results}) for key in results[0].metrics]
    return format_results_table(rows, benchmarks=names, label_headers=("checkpoint", "metric"))


def results_json(results: Sequence[BenchmarkResult], config: Config, checkpoint: Path,
                 settings: EvalSettings, seconds: float) -> dict[str, Any]:
    """The JSON record of one evaluation: settings, per-benchmark metrics and raw samples."""
    return {
        "checkpoint": str(checkpoint),
        "settings": settings.__dict__,
        "seconds": round(seconds, 1),
        "average": average_metrics(results),
        "benchmarks": {
            r.name: {
                "source": r.source,
                "problems": len(r.problems),
                "dropped": r.dropped,
                "metrics": r.metrics,
                "samples": [{"uid": p.uid, "correct": [int(c) for c in p.correct], "answers": p.answers}
                            for p in r.problems],
            }
            for r in results
        },
        "config": to_dict(config),
    }
