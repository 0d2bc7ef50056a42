"""Final-answer extraction from a model reply, and a light string normalization of answers.

Pure string code: no sympy, no math-verify, safe to call in the trainer process on any input.

Extraction order (the first rule that yields a non-empty answer wins):

1. **Last box.** The *last* ``\\boxed{...}`` or ``\\fbox{...}`` in the reply decides (a model
   that boxes a draft and then a corrected value is graded on the corrected one). Braces nest;
   escaped braces ``\\{`` ``\\}`` do not count. ``\\boxed 5`` (argument without braces, as in
   some MATH solutions) takes the token up to the next space or ``$``. If that last box is
   unclosed (a truncated reply) or empty, no boxed answer is taken — an earlier box is *not*
   used, as in verl's ``last_boxed_only_string`` — and the fallbacks below run.
2. **"The answer is X".** The last phrase "answer is", "answer:" or "answer =" (any case,
   e.g. "The final answer is $\\frac{1}{2}$.") and what follows it on that line: a ``$...$``,
   ``\\(...\\)`` or ``\\[...\\]`` span when it starts with one, otherwise the text up to the end of
   the sentence; a trailing period and trailing words after a leading number ("12 apples") are
   dropped. Searched in the last ``tail_chars`` characters only. A phrase followed by a box
   (necessarily unclosed or empty, else rule 1 had taken it) yields nothing.
3. **Last number** (only with ``lenient=True``): the last number in the reply — integer,
   decimal, thousands-grouped (``1,234``) or a simple fraction ``a/b`` — with grouping commas
   removed. Off by default: it rewards replies that never committed to an answer.

``boxed`` in the result is True only for rule 1.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

Method = Literal["boxed", "fbox", "answer_is", "last_number", "none"]

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_DEFAULT_TAIL_CHARS = 20_000


@dataclass(frozen=True)
class Extraction:
    """The answer string taken from a reply (None when no rule matched) and the rule used."""

    answer: str | None
    method: Method

    @property
    def boxed(self) -> bool:
        return self.method in ("boxed", "fbox")


def _match_braces(text: str, open_pos: int) -> int | None:
    """Index of the ``}`` closing the ``{`` at ``open_pos``, or None if unbalanced.

    A backslash escapes the next character, so ``\\{`` and ``\\}`` are not counted (and ``\\\\``
    is one escaped backslash).
    """
    depth = 0
    i = open_pos
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def _box_argument(text: str, cmd_end: int) -> str | None:
    """The argument of a box command whose name ends at ``cmd_end`` (None if absent/unclosed)."""
    i = cmd_end
    n = len(text)
    while i < n and text[i] in " \t":
        i += 1
    if i >= n:
        return None
    if text[i] == "{":
        close = _match_braces(text, i)
        return None if close is None else text[i + 1 : close]
    if i == cmd_end:  # "\boxedx" is another command name, not "\boxed x"
        return None
    match = re.match(r"[^\s$]+", text[i:])
    return match.group(0) if match else None


def find_last_box(text: str) -> tuple[str | None, Method]:
    """Content of the last ``\\boxed``/``\\fbox`` in ``text`` and which command it was.

    Returns ``(None, "none")`` when there is no box, and ``(None, "boxed"/"fbox")`` when the
    last box is unclosed or empty (the caller treats that as "no boxed answer").
    """
    best_pos = -1
    best_cmd = ""
    for cmd in _BOX_COMMANDS:
        pos = text.rfind(cmd)
        while pos != -1:
            after = pos + len(cmd)
            # "\boxedfoo" / "\fboxed" are not box commands; keep looking further left.
            if after < len(text) and text[after].isalpha():
                pos = text.rfind(cmd, 0, pos)
                continue
            break
        if pos > best_pos:
            best_pos, best_cmd = pos, cmd
    if best_pos < 0:
        return None, "none"
    method: Method = "boxed" if best_cmd == "\\boxed" else "fbox"
    arg = _box_argument(text, best_pos + len(best_cmd))
    if arg is None or not arg.strip():
        return None, method
    return arg.strip(), method


_ANSWER_IS = re.compile(r"answer\s*(?:is\s*:?|:|=)\s*", re.IGNORECASE)
_MATH_SPANS = ((r"$$", r"$$"), (r"$", r"$"), (r"\(", r"\)"), (r"\[", r"\]"))
_NUMBER_THEN_WORDS = re.compile(r"^([+-]?\d[\d,]*(?:\.\d+)?(?:\s*/\s*\d+)?)\s+[A-Za-z][A-Za-z\s]*$")


def _strip_markdown(s: str) -> str:
    return s.strip().strip("*_`").strip()


def find_answer_is(text: str, tail_chars: int = _DEFAULT_TAIL_CHARS) -> str | None:
    """The answer after the last "answer is" / "answer:" phrase, or None (see module doc)."""
    tail = text[-tail_chars:]
    last = None
    for last in _ANSWER_IS.finditer(tail):
        pass
    if last is None:
        return None
    rest = tail[last.end() :]
    rest = _strip_markdown(rest.split("\n", 1)[0] if not rest.startswith(("$$", "\\[")) else rest)
    for opener, closer in _MATH_SPANS:
        if rest.startswith(opener):
            end = rest.find(closer, len(opener))
            if end != -1:
                inner = rest[len(opener) : end].strip()
                return inner.rstrip(".").strip() or None
            rest = rest[len(opener) :]
            break
    rest = rest.split("\n", 1)[0]
    # End of the sentence: ". " or a final period; a decimal point is followed by a digit.
    sentence = re.split(r"\.(?=\s|$)", rest, maxsplit=1)[0]
    sentence = _strip_markdown(sentence).rstrip(".,;").strip()
    words = _NUMBER_THEN_WORDS.match(sentence)
    if words:
        sentence = words.group(1)
    return sentence or None


_LAST_NUMBER = re.compile(
    r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*(?:\d{1,3}(?:,\d{3})+|\d+))?"
)


def find_last_number(text: str, tail_chars: int = _DEFAULT_TAIL_CHARS) -> str | None:
    """The last number in ``text`` (grouping commas removed), or None."""
    last = None
    for last in _LAST_NUMBER.finditer(text[-tail_chars:]):
        pass
    if last is None:
        return None
    return re.sub(r"\s+", "", last.group(0)).replace(",", "")


def extract_answer(
    text: str,
    *,
    lenient: bool = False,
    answer_is_fallback: bool = True,
    tail_chars: int = _DEFAULT_TAIL_CHARS,
) -> Extraction:
    """Apply the rules of the module docstring to ``text``; never raises on a string."""
    if not isinstance(text, str):
        raise TypeError(f"extract_answer: expected str, got {type(text).__name__}")
    boxed, method = find_last_box(text)
    if boxed is not None:
        return Extraction(boxed, method)
    if answer_is_fallback:
        said = find_answer_is(text, tail_chars)
        if said is not None:
            _, inner_method = find_last_box(said)
            if inner_method == "none":
                return Extraction(said, "answer_is")
            # A box after the phrase is unclosed or empty (a cut-off reply): no answer from it.
    if lenient:
        number = find_last_number(text, tail_chars)
        if number is not None:
            return Extraction(number, "last_number")
    return Extraction(None, "none")


def normalize_ground_truth(gt: str) -> str:
    """A dataset's reference answer as a bare expression: ``$..$`` and a surrounding box removed."""
    gt = gt.strip()
    boxed, _ = find_last_box(gt)
    if boxed is not None:
        gt = boxed
    for opener, closer in _MATH_SPANS:
        if gt.startswith(opener) and gt.endswith(closer) and len(gt) >= len(opener) + len(closer):
            gt = gt[len(opener) : len(gt) - len(closer)].strip()
            break
    return gt


_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mathbf)\{([^{}]*)\}")
_SPACING = re.compile(r"\\[,;:! ]|\\quad|\\qquad|~")


def normalize_answer_string(answer: str) -> str:
    """A cheap canonical string of an answer, for exact-match shortcuts and majority voting.

    Removes whitespace, ``$``, ``\\left``/``\\right``, LaTeX spacing (``\\,`` ``\\!`` ``~``...),
    ``\\text{..}``-style wrappers (keeping their content), degree marks, a trailing period,
    and rewrites ``\\dfrac``/``\\tfrac`` to ``\\frac``. It is *not* an equivalence test:
    ``1/2`` and ``0.5`` stay different strings (math-verify decides those).
    """
    s = answer.strip()
    s = s.replace("$", "")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _SPACING.sub("", s)
    for _ in range(3):
        s2 = _TEXT_WRAPPER.sub(r"\1", s)
        if s2 == s:
            break
        s = s2
    s = re.sub(r"\^\s*\{?\\circ\}?", "", s)
    s = s.replace("\\%", "%")
    s = re.sub(r"\s+", "", s)
    return s.rstrip(".")
