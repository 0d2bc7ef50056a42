"""Evaluate a policy with a running rollout engine: k sampled responses per problem -> verdicts
and voted answers -> per-benchmark metrics (``evaluation.results.benchmark_metrics``).

One path for every evaluation: the training loop's held-out evaluation
(:func:`evaluate_held_out`) and ``ebpo-eval`` (``ebpo_megatron.evaluate``, which builds the
engine from a checkpoint) both call :func:`evaluate_benchmarks`. The problems are cut into
contiguous shares over the data-parallel group (over all processes for engines that hold their
own weights, vLLM), process ``rank`` samples its share with seed ``seed + rank``
(``parallel.sharding``), and the results are gathered on every process.

Correctness and the answers that vote in maj@m come from the task: for math files ``MathReward``
(``RewardResult.correct`` and its ``extracted`` answer; answers clustered with math-verify); for
a :class:`~ebpo_megatron.data.task.Task` (the embedded tasks, the training loop) its reward
(score ≥ 1), its ``voted_answer`` and its extra ``eval_rewards``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.distributed as dist
from megatron.core import parallel_state

from ..config.schema import Config
from ..data.math_datasets import MathExample, load_math_dataset
from ..data.math_prompts import ChatPromptRenderer
from ..data.sp_tokenizer import MODEL_FILE
from ..data.task import Task, TaskPrompt, TextTokenizer
from ..parallel.sharding import map_over_group
from ..rollout.base import RolloutEngine, SamplingParams, generate_decoded
from .metrics import Equivalence
from .results import (
    Benchmark,
    BenchmarkResult,
    EvalInputError,
    EvalSettings,
    ProblemResult,
    benchmark_metrics,
)

Scorer = Callable[[list[str], list[str]], tuple[list[bool], list[str | None]]]
"""(response texts, reference answers) -> (correct, extracted answer or None) per response."""
Check = Callable[[list[str], list[str]], list[bool]]
"""(response texts, reference answers) -> correct per response, under another reward."""


@dataclass
class EvalTask:
    """What evaluation needs from a task: decoding, stop tokens, scoring, answer equivalence;
    ``extra_checks`` (NAME -> verdicts) are reported as ``NAME_pass@1``; ``renderer`` (math
    configs) turns problems into chat prompts; ``train`` and ``held_out`` are a task's two splits."""

    tokenizer: TextTokenizer
    stop_token_ids: tuple[int, ...]
    scorer: Scorer
    equivalence: Equivalence | None = None
    renderer: ChatPromptRenderer | None = None
    held_out: list[TaskPrompt] = field(default_factory=list)
    train: list[TaskPrompt] = field(default_factory=list)
    extra_checks: dict[str, Check] = field(default_factory=dict)


def eval_task_from_task(task: Task) -> EvalTask:
    """A training task's evaluation view: correct = reward score ≥ 1, the task's voted answer
    and answer equivalence, and each of ``task.eval_rewards`` (score ≥ 1) as an extra check."""

    def scorer(texts: list[str], answers: list[str]) -> tuple[list[bool], list[str | None]]:
        scores, _ = task.reward(texts, answers)
        return [s >= 1.0 for s in scores], [task.voted_answer(t) for t in texts]

    def check(reward: Callable) -> Check:
        return lambda texts, answers: [s >= 1.0 for s in reward(texts, answers)[0]]

    return EvalTask(task.tokenizer, task.stop_token_ids, scorer, task.answer_equivalence,
                    held_out=task.held_out, train=task.train,
                    extra_checks={name: check(reward) for name, reward in task.eval_rewards.items()})


# ----------------------------------------------------------------------------- config and task
def build_eval_task(config: Config, run_dir: Path) -> EvalTask:
    """Math configs: the math reward and the chat renderer of ``data.tokenizer_dir`` (problems
    come from data files). Embedded tasks (synthetic, ...): the task ``build_task`` makes, with
    its splits and rewards; the synthetic task's tokenizer is read from ``run_dir/tokenizer``."""
    if config.data.task != "math":
        from ..data.tasks import build_task

        if config.data.task == "synthetic" and not (run_dir / "tokenizer" / MODEL_FILE).is_file():
            raise EvalInputError(f"{run_dir / 'tokenizer' / MODEL_FILE}: the run's tokenizer is missing "
                                 "(synthetic task: evaluate a checkpoint inside its run directory)")
        return eval_task_from_task(build_task(config, run_dir))

    from ..data.tasks import HFTokenizer
    from ..rewards.math import MathReward, MathVerifyEquivalence

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
def sharing_group(engine: RolloutEngine) -> Any:
    """The processes that share an evaluation's problems: the data-parallel group (TP ranks of
    one DP rank generate together), or all processes for engines holding their own weights."""
    return dist.group.WORLD if engine.owns_weights else parallel_state.get_data_parallel_group()


def evaluate_benchmarks(engine: RolloutEngine, task: EvalTask, benchmarks: Sequence[Benchmark],
                        settings: EvalSettings) -> list[BenchmarkResult]:
    """Sample ``settings.k`` responses per problem, score them, compute each benchmark's metrics
    (collective over the data-parallel group, or all processes for engines holding their own
    weights; the same results on every process)."""
    params = SamplingParams(n=settings.k, temperature=settings.temperature,
                            max_new_tokens=settings.max_new_tokens, stop_token_ids=task.stop_token_ids,
                            seed=settings.seed)

    def share(prompts: list[TaskPrompt], _first: int, rank: int) -> list[ProblemResult]:
        batch = generate_decoded(engine, [p.token_ids for p in prompts], params, rank, task.tokenizer.decode)
        answers = [prompts[int(g)].answer for g in batch.group_ids]
        correct, voted = task.scorer(batch.texts, answers)
        extra = {name: check(batch.texts, answers) for name, check in task.extra_checks.items()}
        k = settings.k
        return [ProblemResult(p.uid, correct[i * k:(i + 1) * k], voted[i * k:(i + 1) * k], p.topic,
                              {name: flags[i * k:(i + 1) * k] for name, flags in extra.items()})
                for i, p in enumerate(prompts)]

    results = []
    for bench in benchmarks:
        problems = map_over_group(bench.prompts, share, sharing_group(engine))
        results.append(BenchmarkResult(bench.name, bench.source, bench.dropped, problems,
                                       benchmark_metrics(problems, settings, task.equivalence)))
    return results


def evaluate_held_out(engine: RolloutEngine, task: Task, config: Config) -> dict[str, float]:
    """The training loop's evaluation: :func:`evaluate_benchmarks` on the task's held-out set
    with k = ``rollout.eval_samples`` samples at ``rollout.eval_temperature`` (0 = greedy),
    m = min(``rollout.eval_maj``, k) and seed ``run.seed``; metrics named ``eval/<metric>``."""
    r = config.rollout
    settings = EvalSettings(k=r.eval_samples, maj=min(r.eval_maj, r.eval_samples), temperature=r.eval_temperature,
                            max_new_tokens=r.max_new_tokens, seed=config.run.seed)
    [result] = evaluate_benchmarks(engine, eval_task_from_task(task),
                                   [Benchmark("held-out", "held-out split", task.held_out)], settings)
    return {f"eval/{key}": value for key, value in result.metrics.items()}
