"""Math prompt datasets from jsonl or parquet, in the row layouts that RL users have.

Every row becomes one ``MathExample``. Accepted layouts (detected per row, fields may mix):

* **verl-style** (and **DAPO-Math-17K**, which is one): ``prompt`` = list of chat messages
  ``{"role", "content"}``, ``reward_model = {"ground_truth", "style"}``, ``data_source``,
  optional ``ability`` and ``extra_info`` (DAPO: ``{"index": <uuid>}``).
* **plain**: ``{"problem", "answer"}`` (``question`` for problem; ``ground_truth`` or
  ``solution`` for the answer — a solution text with a ``\\boxed{}`` gives its last box).
* ``prompt`` given as a plain string (e.g. open-r1's processed DAPO) is the problem text.
* optional ``topic`` (str) and ``difficulty`` (number in [0, 1]), as columns or inside
  ``extra_info``; optional ``uid``/``id``/``unique_id`` as a column or in ``extra_info``
  (else ``extra_info.index``, else ``<file stem>-<row>``).

For chat rows, ``problem`` is the last user message with DAPO's instruction header/footer
(or another known instruction suffix, see ``KNOWN_SUFFIXES``) removed when present, so a problem can be re-rendered with another instruction or labelled
by topic. A malformed row raises ``ValueError`` naming the file, the row (1-based line for
jsonl, 0-based index for parquet) and the field.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

from ..rewards.answer_extraction import find_last_box

PARQUET_HINT = "reading parquet needs pyarrow: pip install 'ebpo_megatron[math]' (or pip install pyarrow)"

# DAPO-Math-17K wraps each problem in this instruction (its 'Answer:' format).
DAPO_HEADER = (
    "Solve the following math problem step by step. The last line of your response should be of "
    "the form Answer: $Answer (without quotes) where $Answer is the answer to the problem."
)
DAPO_FOOTER = 'Remember to put your answer on its own line after "Answer:".'

_ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class MathExample:
    """One math prompt with its reference answer.

    ``messages`` holds the dataset's chat messages (None for plain rows); ``problem`` is always
    the bare problem text. ``difficulty`` is in [0, 1] (the paper's: 1 − base-model pass rate
    is one choice; the loader only checks the range).
    """

    uid: str
    problem: str
    answer: str
    messages: tuple[Mapping[str, str], ...] | None = None
    topic: str | None = None
    difficulty: float | None = None
    source: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)


class _RowError(ValueError):
    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(message)
        self.field_name = field_name


# Instruction suffixes that common datasets append to the problem (verl's MATH/DeepScaleR
# preprocessing, and the project's default).
KNOWN_SUFFIXES = (
    DAPO_FOOTER,
    "Let's think step by step and output the final answer within \\boxed{}.",
    "Please reason step by step, and put your final answer within \\boxed{}.",
)


def strip_instruction_template(text: str) -> str:
    """The bare problem: DAPO's header and any one of ``KNOWN_SUFFIXES`` removed when present."""
    body = text.strip()
    if body.startswith(DAPO_HEADER):
        body = body[len(DAPO_HEADER) :].strip()
    for suffix in KNOWN_SUFFIXES:
        if body.endswith(suffix):
            body = body[: -len(suffix)].strip()
            break
    return body


def _messages(value: Any) -> tuple[dict[str, str], ...]:
    if hasattr(value, "tolist"):  # numpy arrays from pandas-written parquet
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or not value:
        raise _RowError("prompt", f"expected a non-empty list of chat messages, got {type(value).__name__}")
    out = []
    for k, message in enumerate(value):
        if not isinstance(message, Mapping):
            raise _RowError(f"prompt[{k}]", f"expected a message object, got {type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if role not in _ROLES:
            raise _RowError(f"prompt[{k}].role", f"expected one of {_ROLES}, got {role!r}")
        if not isinstance(content, str):
            raise _RowError(f"prompt[{k}].content", f"expected a string, got {type(content).__name__}")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "user" for m in out):
        raise _RowError("prompt", "no message with role 'user'")
    return tuple(out)


def _answer_text(value: Any, field_name: str) -> str:
    if isinstance(value, bool) or value is None:
        raise _RowError(field_name, f"expected a string or number, got {value!r}")
    if hasattr(value, "tolist"):  # numpy scalars and arrays from pandas-written parquet
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        if len(value) != 1:
            raise _RowError(field_name, f"expected one answer, got a list of {len(value)}")
        value = value[0]
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _RowError(field_name, f"expected a finite number, got {value!r}")
        value = int(value) if value.is_integer() else value
    if isinstance(value, (int, float)):
        return str(value)
    if not isinstance(value, str):
        raise _RowError(field_name, f"expected a string or number, got {type(value).__name__}")
    text = value.strip()
    if not text:
        raise _RowError(field_name, "empty answer")
    return text


def _find(row: Mapping[str, Any], extra: Mapping[str, Any], key: str) -> Any:
    value = row.get(key)
    return extra.get(key) if value is None else value


def row_to_example(row: Any, *, default_uid: str, default_source: str) -> MathExample:
    """One row in any accepted layout → MathExample (raises _RowError naming the field)."""
    if not isinstance(row, Mapping):
        raise _RowError("<row>", f"expected an object, got {type(row).__name__}")
    extra = row.get("extra_info") or {}
    if not isinstance(extra, Mapping):
        raise _RowError("extra_info", f"expected an object, got {type(extra).__name__}")

    messages = None
    prompt = row.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        messages = _messages(prompt)
        user = [m["content"] for m in messages if m["role"] == "user"][-1]
        problem = strip_instruction_template(user)
    else:
        problem_field = next((k for k in ("problem", "question") if row.get(k) is not None), None)
        raw = prompt if prompt is not None else (row[problem_field] if problem_field else None)
        name = "prompt" if prompt is not None else (problem_field or "problem")
        if not isinstance(raw, str):
            raise _RowError(name, f"expected a string, got {type(raw).__name__}" if raw is not None else "missing")
        problem = strip_instruction_template(raw)
    if not problem:
        raise _RowError("problem", "empty problem text")

    reward_model = row.get("reward_model")
    if reward_model is not None:
        if not isinstance(reward_model, Mapping):
            raise _RowError("reward_model", f"expected an object, got {type(reward_model).__name__}")
        answer = _answer_text(reward_model.get("ground_truth"), "reward_model.ground_truth")
    elif row.get("answer") is not None:
        answer = _answer_text(row["answer"], "answer")
    elif row.get("ground_truth") is not None:
        answer = _answer_text(row["ground_truth"], "ground_truth")
    elif row.get("solution") is not None:
        answer = _answer_text(row["solution"], "solution")
        boxed, _ = find_last_box(answer)
        answer = boxed if boxed is not None else answer
    else:
        raise _RowError("answer", "missing (expected answer, ground_truth, solution or reward_model.ground_truth)")

    topic = _find(row, extra, "topic")
    if topic is not None and (not isinstance(topic, str) or not topic.strip()):
        raise _RowError("topic", f"expected a non-empty string, got {topic!r}")
    difficulty = _find(row, extra, "difficulty")
    if difficulty is not None:
        if isinstance(difficulty, bool) or not isinstance(difficulty, (int, float)):
            raise _RowError("difficulty", f"expected a number in [0, 1], got {difficulty!r}")
        difficulty = float(difficulty)
        if not 0.0 <= difficulty <= 1.0:
            raise _RowError("difficulty", f"expected a number in [0, 1], got {difficulty!r}")

    uid_keys = ("uid", "id", "unique_id")
    uid_value = next((row[k] for k in uid_keys if row.get(k) is not None), None)
    if uid_value is None:
        uid_value = next((extra[k] for k in (*uid_keys, "index") if extra.get(k) is not None), None)
    uid = default_uid if uid_value is None else str(uid_value)
    source = row.get("data_source") or row.get("source") or default_source
    kept = {k: row[k] for k in ("ability",) if row.get(k) is not None}
    if isinstance(reward_model, Mapping) and reward_model.get("style") is not None:
        kept["reward_style"] = reward_model["style"]
    return MathExample(
        uid=uid,
        problem=problem,
        answer=answer,
        messages=messages,
        topic=topic.strip() if isinstance(topic, str) else None,
        difficulty=difficulty,
        source=str(source),
        extra=kept,
    )


def iter_jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """``(where, row)`` per non-blank line; ``where`` is "line N" (1-based). A line that is not
    UTF-8 or not JSON (including an integer over Python's 4300-digit limit) is a ValueError
    naming the file and the line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(f"{path}: line {lineno}: not UTF-8 text (byte {raw[exc.start]:#04x} at "
                                 f"offset {exc.start} of the line)") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:  # JSONDecodeError, or an integer over the digit limit
                reason = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
                raise ValueError(f"{path}: line {lineno}: field <row>: invalid JSON ({reason})") from None
            yield f"line {lineno}", row


def iter_parquet_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """``(where, row)`` per parquet row; ``where`` is "row index N" (0-based)."""
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ImportError(PARQUET_HINT) from exc
    table = pq.read_table(path)
    for index, row in enumerate(table.to_pylist()):
        yield f"row index {index}", row


def load_math_dataset(path: str | Path, *, source: str | None = None, dedupe: bool = False) -> list[MathExample]:
    """All examples of a ``.jsonl`` / ``.json`` (one object a line) or ``.parquet`` file.

    ``source`` overrides a missing ``data_source`` (default: the file stem). With ``dedupe``,
    a row whose (problem, answer) was seen before is dropped (DAPO-Math-17K's released file
    repeats each problem about 100 times).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"math dataset not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        rows = iter_parquet_rows(path)
    elif suffix in (".jsonl", ".json", ".ndjson"):
        rows = iter_jsonl_rows(path)
    else:
        raise ValueError(f"{path}: unknown dataset format {suffix!r} (expected .jsonl or .parquet)")
    default_source = source or path.stem
    examples: list[MathExample] = []
    seen: set[tuple[str, str]] = set()
    for n, (where, row) in enumerate(rows):
        try:
            example = row_to_example(row, default_uid=f"{path.stem}-{n}", default_source=default_source)
        except _RowError as exc:
            raise ValueError(f"{path}: {where}: field {exc.field_name}: {exc}") from None
        if dedupe:
            key = (example.problem, example.answer)
            if key in seen:
                continue
            seen.add(key)
        examples.append(example)
    return examples
