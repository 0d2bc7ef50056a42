"""The embedded verifiable task: small arithmetic and algebra problems with exact integer answers.

Each problem is a short string such as ``"47+8="`` whose answer is ``"55"``; a response is
correct when its text (up to the end-of-sequence token) equals the answer exactly. Topics and
levels (the difficulty proxy before a model measures pass rates) exercise the curriculum modes:

    level 0  addition        a+b,     a, b in 0..9
    level 0  multiplication  a*b,     a, b in 0..9
    level 1  subtraction     a-b,     a in 10..99, b in 0..9, a ≥ b
    level 1  equation        x+b=c;x= (answer c − b), b in 0..9, c in b..19
    level 2  addition        a+b,     a in 10..99, b in 0..9
    level 3  addition        a+b,     a, b in 10..99

The held-out split is fixed by a hash of the problem text (≈10%), so no held-out problem is
ever trained on, whatever the seed.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass
from typing import Iterator


@dataclass(frozen=True)
class ArithmeticProblem:
    uid: int
    prompt: str
    answer: str
    topic: str
    level: int

    @property
    def difficulty(self) -> float:
        """Nominal pass-rate proxy: 1 for the easiest level, falling by 0.25 per level."""
        return 1.0 - 0.25 * self.level


def _all_problems(levels: set[int]) -> Iterator[tuple[str, str, str, int]]:
    if 0 in levels:
        for a in range(10):
            for b in range(10):
                yield f"{a}+{b}=", str(a + b), "addition", 0
                yield f"{a}*{b}=", str(a * b), "multiplication", 0
    if 1 in levels:
        for a in range(10, 100):
            for b in range(10):
                yield f"{a}-{b}=", str(a - b), "subtraction", 1
        for b in range(10):
            for c in range(b, 20):
                yield f"x+{b}={c};x=", str(c - b), "equation", 1
    if 2 in levels:
        for a in range(10, 100):
            for b in range(10):
                yield f"{a}+{b}=", str(a + b), "addition", 2
    if 3 in levels:
        for a in range(10, 100):
            for b in range(10, 100):
                yield f"{a}+{b}=", str(a + b), "addition", 3


def is_held_out(prompt: str, fraction: float = 0.1) -> bool:
    return zlib.crc32(prompt.encode()) % 1000 < fraction * 1000


def make_split(levels: list[int], num_train: int, num_eval: int, seed: int
               ) -> tuple[list[ArithmeticProblem], list[ArithmeticProblem]]:
    """Train and held-out problems (disjoint by :func:`is_held_out`), sampled with ``seed``."""
    train, held = [], []
    for uid, (prompt, answer, topic, level) in enumerate(_all_problems(set(levels))):
        problem = ArithmeticProblem(uid, prompt, answer, topic, level)
        (held if is_held_out(prompt) else train).append(problem)
    rng = random.Random(seed)
    rng.shuffle(train)
    rng.shuffle(held)
    if not train or not held:
        raise ValueError(f"data.synthetic.levels {levels}: no problems generated")
    return train[:num_train], held[:num_eval]


def score_response(response: str, answer: str) -> float:
    """1.0 when the response text (stripped) equals the answer exactly, else 0.0."""
    return 1.0 if response.strip() == answer else 0.0
