"""Curriculum sampling of prompts (docs/algorithms.md, "Curriculum"):

* ``random``     (ebpo-naive): a fresh shuffle every epoch;
* ``topic``      (ebpo-topic): cluster by cluster — topic order shuffled per epoch, prompts
                 shuffled within their topic;
* ``difficulty`` (ebpo-diff):  easy → hard by the ``difficulty`` column, read as a pass rate
                 (higher = easier, so sorted descending), no shuffle; later epochs repeat it.

The order of epoch e is a pure function of (seed, e), so the sampler's state is just
(epoch, cursor) and a resumed run continues with the identical stream.
"""

from __future__ import annotations

import random
from typing import Generic, Literal, Protocol, Sequence, TypeVar


class _Example(Protocol):
    topic: str
    difficulty: float


E = TypeVar("E", bound=_Example)
Order = Literal["random", "topic", "difficulty"]


class CurriculumSampler(Generic[E]):
    def __init__(self, examples: Sequence[E], order: Order, prompts_per_step: int, seed: int) -> None:
        if not examples:
            raise ValueError("data: the training set is empty")
        if order not in ("random", "topic", "difficulty"):
            raise ValueError(f"data.order: expected random | topic | difficulty, got {order!r}")
        self.examples, self.order = list(examples), order
        self.prompts_per_step, self.seed = prompts_per_step, seed
        self.epoch, self.cursor = 0, 0
        self._permutation = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> list[int]:
        rng = random.Random(self.seed * 1_000_003 + epoch)
        indices = list(range(len(self.examples)))
        if self.order == "random":
            rng.shuffle(indices)
        elif self.order == "topic":
            topics = sorted({self.examples[i].topic for i in indices})
            rng.shuffle(topics)
            clusters = []
            for topic in topics:
                members = [i for i in indices if self.examples[i].topic == topic]
                rng.shuffle(members)
                clusters.extend(members)
            indices = clusters
        else:
            indices.sort(key=lambda i: (-self.examples[i].difficulty, i))
        return indices

    def next_batch(self) -> list[E]:
        """The next ``prompts_per_step`` examples of the stream (crossing epochs as needed)."""
        batch = []
        while len(batch) < self.prompts_per_step:
            if self.cursor == len(self._permutation):
                self.epoch += 1
                self.cursor = 0
                self._permutation = self._epoch_order(self.epoch)
            take = min(self.prompts_per_step - len(batch), len(self._permutation) - self.cursor)
            batch.extend(self.examples[i] for i in self._permutation[self.cursor: self.cursor + take])
            self.cursor += take
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._permutation = self._epoch_order(self.epoch)
