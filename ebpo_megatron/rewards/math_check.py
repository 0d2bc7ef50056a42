"""Equivalence of two answer strings with the ``math-verify`` package (runs inside reward workers).

``math_verify_equal(gold, pred)`` wraps each answer as ``\\boxed{...}``, parses it with
math-verify's LaTeX extraction (plain expressions as a fallback) into sympy objects and calls
``math_verify.verify(gold, pred)``: string match, numeric match to 6 decimals (so ``1/3`` equals
``0.333333``), symbolic simplification, sets/intervals/tuples, ``x = 3`` against ``3``, degrees,
percentages and ``\\text{}`` units handled by its normalizer. ``allow_set_relation_comp`` is on,
so an interval answer matches the equivalent inequality (``(4, \\infty)`` ≡ ``x > 4``).
Known gaps of math-verify (tests mark them xfail): a bare ``i`` is a symbol unless the
expression looks complex, so ``\\frac{1}{2i}`` ≢ ``-\\frac{i}{2}``; degrees are not radians.
math-verify's own signal-based timeouts are switched off: the worker pool kills a check that
overruns (see checker_pool.py).

math-verify is imported lazily; without it the error names the project's ``math`` extra.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from functools import lru_cache
from types import ModuleType

MISSING_MATH_VERIFY = (
    "the math reward needs the 'math-verify' package: pip install 'ebpo_megatron[math]'"
)


def require_math_verify() -> ModuleType:
    """Import math_verify, or raise ImportError naming the ``math`` extra."""
    try:
        module = importlib.import_module("math_verify")
    except ImportError as exc:
        raise ImportError(MISSING_MATH_VERIFY) from exc
    # The pool enforces timeouts; math-verify warns once per process that its own are off.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    return module


def math_verify_available() -> bool:
    """True when math_verify can be imported (checked without importing sympy)."""
    return importlib.util.find_spec("math_verify") is not None


@lru_cache(maxsize=4096)
def _parse(answer: str) -> tuple:
    mv = require_math_verify()
    config = [mv.LatexExtractionConfig(boxed_match_priority=0), mv.ExprExtractionConfig()]
    return tuple(mv.parse("\\boxed{" + answer + "}", extraction_config=config, parsing_timeout=None))


def math_verify_equal(gold: str, pred: str) -> bool:
    """True when ``pred`` is mathematically equivalent to ``gold`` according to math-verify."""
    mv = require_math_verify()
    parsed_gold, parsed_pred = _parse(gold), _parse(pred)
    if not parsed_gold or not parsed_pred:
        return False
    return bool(
        mv.verify(list(parsed_gold), list(parsed_pred), allow_set_relation_comp=True, timeout_seconds=None)
    )


def _warmup() -> None:
    """Import sympy/latex2sympy and fill their caches once, before the worker reports ready."""
    math_verify_equal("\\frac{1}{2}", "0.5")
    math_verify_equal("[1,2)", "x")


math_verify_equal.warmup = _warmup  # type: ignore[attr-defined]
