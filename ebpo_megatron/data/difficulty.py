"""Measured difficulty of training prompts: the ebpo-diff curriculum's pass rates.

The paper orders prompts by the base policy's pass rate p̂_q = (1/16) Σ_{j=1..16} 1[r_{q,j} = 1]
over 16 samples at temperature 1.0 (higher = easier). ``tools/estimate_difficulty.py`` measures
it and writes a JSON object ``{"<uid>": p̂_q, ...}``; ``data.difficulty_file`` hands it to the
trainer, which replaces each training prompt's nominal difficulty by its measured one.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Protocol, Sequence, TypeVar

from ..atomic_file import write_text_atomic


class _Prompt(Protocol):
    uid: int
    difficulty: float


P = TypeVar("P", bound=_Prompt)


def write_pass_rates(path: Path, rates: dict[int, float]) -> None:
    """``{"<uid>": rate}`` sorted by uid, written atomically (a temporary file renamed)."""
    write_text_atomic(path, json.dumps({str(uid): rates[uid] for uid in sorted(rates)}, indent=0))


def load_pass_rates(path: Path) -> dict[int, float]:
    """Read ``{"<uid>": rate}``; every rate must be a number in [0, 1] (the error names the file)."""
    if not path.is_file():
        raise ValueError(f"data.difficulty_file: file not found: {path}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"data.difficulty_file {path}: not a JSON object of pass rates ({err})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"data.difficulty_file {path}: expected a JSON object {{uid: pass rate}}, "
                         f"got {type(raw).__name__}")
    rates = {}
    for key, value in raw.items():
        if not key.lstrip("-").isdigit():
            raise ValueError(f"data.difficulty_file {path}: key {key!r} is not an integer prompt uid")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or not 0.0 <= value <= 1.0:
            raise ValueError(f"data.difficulty_file {path}: uid {key}: expected a pass rate in [0, 1], got {value!r}")
        rates[int(key)] = float(value)
    return rates


def with_pass_rates(prompts: Sequence[P], rates: dict[int, float], source: Path) -> list[P]:
    """``prompts`` (frozen dataclasses) with ``difficulty`` = their measured pass rate; every
    prompt must have one."""
    missing = [p.uid for p in prompts if p.uid not in rates]
    if missing:
        raise ValueError(f"data.difficulty_file {source}: no pass rate for {len(missing)} of {len(prompts)} "
                         f"training prompts (first uids {missing[:5]}); was it measured for this task and seed?")
    return [replace(p, difficulty=rates[p.uid]) for p in prompts]
