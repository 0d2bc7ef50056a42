"""Evaluation results and their metrics, with no process-group or model code: what one problem's
k samples gave (:class:`ProblemResult`), the metrics of a benchmark (:func:`benchmark_metrics`,
the one function both the training loop's evaluation and ``ebpo-eval`` use), per-problem pass
rates, and the JSON / markdown reports.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config.schema import Config
from ..config.typed import to_dict
from ..data.task import TaskPrompt
from .metrics import Equivalence, format_results_table, mean_maj_at_k, mean_pass_at_1, mean_pass_at_k

MAX_TOPICS_REPORTED = 20


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
class ProblemResult:
    """The k samples of one problem: verdicts and extracted answers, in sampling order."""

    uid: int
    correct: list[bool]
    answers: list[str | None]
    topic: str = "default"
    # more verdicts per sample under the task's other rewards (chat_arith: "strict", "lenient")
    extra_correct: dict[str, list[bool]] = field(default_factory=dict)


@dataclass
class BenchmarkResult:
    name: str
    source: str
    dropped: int
    problems: list[ProblemResult]
    metrics: dict[str, float]  # fractions in [0, 1]


def benchmark_metrics(problems: Sequence[ProblemResult], settings: EvalSettings,
                      equivalence: Equivalence | None = None) -> dict[str, float]:
    """The metrics of one benchmark, as fractions:

    * ``pass@1``: mean over problems of c/k (c of the k samples correct), and ``NAME_pass@1`` the
      same under each extra reward of the task;
    * with k > 1: ``maj@m`` (the first m = ``settings.maj`` samples vote), unbiased ``pass@m`` and
      ``pass@k`` (the paper's validation reports maj@16 and pass@16);
    * ``pass@1/TOPIC`` (and ``NAME_pass@1/TOPIC``): the fraction of correct samples among those
      of the problems of each topic, when the benchmark has 2 to ``MAX_TOPICS_REPORTED`` topics.
    """
    correct = [p.correct for p in problems]
    metrics = {"pass@1": mean_pass_at_1(correct)}
    names = sorted(problems[0].extra_correct) if problems else []
    for name in names:
        metrics[f"{name}_pass@1"] = mean_pass_at_1([p.extra_correct[name] for p in problems])
    if settings.k > 1:
        metrics[f"maj@{settings.maj}"] = mean_maj_at_k([p.answers for p in problems], correct, settings.maj,
                                                      equivalence)
        for k in sorted({settings.maj, settings.k} - {1}):
            metrics[f"pass@{k}"] = mean_pass_at_k(correct, k)
    return {**metrics, **per_topic_metrics(problems, names)}


def per_topic_metrics(problems: Sequence[ProblemResult], extra_names: Sequence[str] = ()) -> dict[str, float]:
    """``pass@1/TOPIC`` and ``NAME_pass@1/TOPIC``: correct samples / samples over the problems of
    each topic; empty unless there are 2 to ``MAX_TOPICS_REPORTED`` topics."""
    topics = sorted({p.topic for p in problems})
    if not 2 <= len(topics) <= MAX_TOPICS_REPORTED:
        return {}
    out: dict[str, float] = {}
    for name in ["pass@1", *(f"{n}_pass@1" for n in sorted(extra_names))]:
        extra = name.removesuffix("_pass@1")
        for topic in topics:
            flags = [f for p in problems if p.topic == topic
                     for f in (p.correct if name == "pass@1" else p.extra_correct[extra])]
            out[f"{name}/{topic}"] = sum(flags) / len(flags)
    return out


def pass_rates(result: BenchmarkResult) -> dict[int, float]:
    """Per problem uid: p̂ = (1/k) Σ_j 1[sample j correct], the fraction of its k samples graded
    correct (the ebpo-diff difficulty with k = 16 at temperature 1.0)."""
    return {p.uid: sum(p.correct) / len(p.correct) for p in result.problems}


def _metric_names(results: Sequence[BenchmarkResult]) -> list[str]:
    """Every metric of any benchmark, in order of first appearance (per-topic ones differ)."""
    return list(dict.fromkeys(key for r in results for key in r.metrics))


def average_metrics(results: Sequence[BenchmarkResult]) -> dict[str, float]:
    """Plain mean over the benchmarks of each metric they all report (the paper's "avg" column)."""
    return {key: math.fsum(r.metrics[key] for r in results) / len(results)
            for key in _metric_names(results) if all(key in r.metrics for r in results)}


def results_table(results: Sequence[BenchmarkResult], label: str) -> str:
    """Markdown: one row per metric (percent), benchmarks as columns, their average last ("–"
    where a benchmark lacks the metric)."""
    names = [r.name for r in results]
    rows = [((label, key), {r.name: 100.0 * r.metrics[key] for r in results if key in r.metrics})
            for key in _metric_names(results)]
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
                "samples": [{"uid": p.uid, "topic": p.topic, "correct": [int(c) for c in p.correct],
                             "answers": p.answers,
                             **{f"{name}_correct": [int(c) for c in flags] for name, flags in p.extra_correct.items()}}
                            for p in r.problems],
            }
            for r in results
        },
        "config": to_dict(config),
    }
