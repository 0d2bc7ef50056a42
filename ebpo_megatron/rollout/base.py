"""One interface for every rollout engine (native Megatron sampler, vLLM).

A rollout step samples G = ``n`` responses for each of P prompts; response r belongs to prompt
``group_ids[r]`` — the group ids the advantage estimator reduces over.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar, Literal

import torch

from ..parallel.sharding import rank_seed


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings. ``top_k = 0`` and ``top_p = 1`` disable those filters."""

    n: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 32
    stop_token_ids: tuple[int, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"n: expected >= 1 responses per prompt, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"temperature: expected >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: expected in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k: expected >= 0 (0 = off), got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: expected >= 1, got {self.max_new_tokens}")


FinishReason = Literal["stop", "length"]


@dataclass
class RolloutBatch:
    """The one record of a rollout, from the engine to the trainer: one entry per response
    (P·n of them) in every per-response field; adding a field to it is the only change a new
    per-response quantity needs (:meth:`select` and :meth:`concat` handle every field).

    The engine fills the generation fields; scoring adds ``texts`` (decoded responses),
    ``answers`` (the reference answer of each response's prompt) and ``rewards`` (float32).
    ``logprobs[r][t]`` is the rollout engine's log π(response[r][t] | prefix) under the sampling
    temperature (the train–inference mismatch is measured against it). ``stats`` holds counts
    and timings of the call (summed by :meth:`concat`).
    """

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    logprobs: list[list[float]]
    finish_reasons: list[FinishReason]
    group_ids: torch.Tensor  # int64 [P·n]: index of each response's prompt
    stats: dict[str, float] = field(default_factory=dict)
    texts: list[str] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)
    rewards: torch.Tensor = field(default_factory=lambda: torch.zeros(0))

    SCORED: ClassVar[tuple[str, ...]] = ("texts", "answers", "rewards")  # empty until scored

    def __post_init__(self) -> None:
        n = len(self.response_ids)
        for name in self._per_response_fields():
            value = getattr(self, name)
            if len(value) != n and not (name in self.SCORED and len(value) == 0):
                raise ValueError(f"RolloutBatch.{name}: expected {n} entries, got {len(value)}")
        if tuple(self.group_ids.shape) != (n,):
            raise ValueError(f"RolloutBatch.group_ids: expected shape ({n},), got {tuple(self.group_ids.shape)}")

    @classmethod
    def _per_response_fields(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.name != "stats"]

    def __len__(self) -> int:
        return len(self.response_ids)

    def select(self, rows: list[int]) -> "RolloutBatch":
        """The responses ``rows`` (in that order), every field; ``stats`` unchanged."""
        def take(value: Any) -> Any:
            if len(value) == 0:
                return value
            return value[rows] if isinstance(value, torch.Tensor) else [value[i] for i in rows]

        return replace(self, **{name: take(getattr(self, name)) for name in self._per_response_fields()})

    @classmethod
    def concat(cls, batches: Sequence["RolloutBatch"]) -> "RolloutBatch":
        """The responses of ``batches`` one after the other; ``stats`` summed key by key."""
        if len(batches) == 1:
            return batches[0]
        columns: dict[str, Any] = {}
        for name in cls._per_response_fields():
            values = [getattr(b, name) for b in batches]
            if isinstance(values[0], torch.Tensor):
                columns[name] = torch.cat(values)
            else:
                columns[name] = [x for v in values for x in v]
        stats: dict[str, float] = {}
        for b in batches:
            for key, value in b.stats.items():
                stats[key] = stats.get(key, 0.0) + value
        return cls(**columns, stats=stats)


class RolloutEngine(abc.ABC):
    """Generates responses; receives weights from the trainer; frees memory between phases.

    ``owns_weights`` False (the native engine): generation runs on the trainer's own model, so
    the TP ranks of a data-parallel rank generate its prompts together and no sync is needed.
    True (vLLM): the engine keeps its own copy of the weights, which the trainer sends with
    ``update_weights`` after every ``wake``, and each process (or TP block of processes)
    generates on its own, so the trainer spreads a step's prompts over all processes.
    """

    owns_weights: bool = False

    @abc.abstractmethod
    def generate(self, prompt_token_ids: list[list[int]], params: SamplingParams) -> RolloutBatch:
        """Sample ``params.n`` responses for every prompt."""

    @abc.abstractmethod
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load new weights given as (Hugging Face name, full tensor) pairs."""

    def sleep(self) -> None:
        """Release weights / KV cache for the training phase (no-op where nothing is held)."""

    def wake(self) -> None:
        """Restore what ``sleep`` released, before the next ``generate``."""

    def close(self) -> None:
        """Free what the engine holds, while the process groups still exist (no-op where it
        holds nothing of its own); the engine is unusable afterwards."""


def generate_decoded(engine: RolloutEngine, prompt_token_ids: Sequence[Sequence[int]], params: SamplingParams,
                     rank: int, decode: Callable[[list[int]], str]) -> RolloutBatch:
    """``engine.generate`` of one process's share of prompts, sampled with that process's seed
    (``parallel.sharding.rank_seed(params.seed, rank)``: the same draws for a rank whichever
    caller — trainer, evaluation, tool — asks), with every response decoded into ``texts``."""
    batch = engine.generate([list(p) for p in prompt_token_ids], replace(params, seed=rank_seed(params.seed, rank)))
    batch.texts = [decode(r) for r in batch.response_ids]
    return batch
