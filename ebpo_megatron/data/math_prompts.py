"""Render math examples into model prompts with a Hugging Face tokenizer's chat template.

The tokenizer is loaded from a LOCAL directory only (``local_files_only=True``: nothing is
downloaded). A prompt is

    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids  = tokenizer(text, add_special_tokens=False).input_ids

(``add_special_tokens=False`` because templates already write their BOS). ``messages`` is

* ``prompt_source="dataset"`` (default): the row's own chat messages when it has them (verl /
  DAPO rows already carry their instruction), else ``[system?] + user(problem + "\\n\\n" +
  instruction)``;
* ``prompt_source="problem"``: always built from the bare problem text and ``instruction``
  (e.g. to ask DAPO problems for a ``\\boxed{}`` answer instead of DAPO's "Answer:" line).

A prompt longer than ``max_prompt_tokens`` tokens is dropped and counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

from .math_datasets import MathExample

DEFAULT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
TRANSFORMERS_HINT = "prompt rendering needs transformers: pip install 'ebpo_megatron[math]' (or pip install transformers)"


def load_tokenizer(directory: str | Path) -> Any:
    """A tokenizer from a local directory (tokenizer.json, sentencepiece or tiktoken ``tokenizer.model``)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"tokenizer directory not found: {directory} (only local directories are read)")
    try:
        from transformers import AutoTokenizer
    except ImportError as exc:
        raise ImportError(TRANSFORMERS_HINT) from exc
    return AutoTokenizer.from_pretrained(str(directory), local_files_only=True, trust_remote_code=False)


@dataclass(frozen=True)
class RenderedPrompt:
    """One example's prompt text and its token ids."""

    example: MathExample
    text: str
    token_ids: tuple[int, ...]


class ChatPromptRenderer:
    """Chat-template prompts for math examples (see the module docstring)."""

    def __init__(
        self,
        tokenizer: Any,
        *,
        instruction: str = DEFAULT_INSTRUCTION,
        system_prompt: str | None = None,
        max_prompt_tokens: int | None = None,
        prompt_source: Literal["dataset", "problem"] = "dataset",
        chat_template: str | None = None,
    ) -> None:
        if isinstance(tokenizer, (str, Path)):
            tokenizer = load_tokenizer(tokenizer)
        if chat_template is not None:
            tokenizer.chat_template = chat_template
        if not getattr(tokenizer, "chat_template", None):
            where = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
            raise ValueError(f"tokenizer {where!s} has no chat_template: pass chat_template=...")
        if max_prompt_tokens is not None and max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens: expected >= 1 or None, got {max_prompt_tokens}")
        if prompt_source not in ("dataset", "problem"):
            raise ValueError(f"prompt_source: 'dataset' or 'problem', got {prompt_source!r}")
        self.tokenizer = tokenizer
        self.instruction = instruction
        self.system_prompt = system_prompt
        self.max_prompt_tokens = max_prompt_tokens
        self.prompt_source = prompt_source

    def messages(self, example: MathExample) -> list[dict[str, str]]:
        """The chat messages sent to the template for ``example``."""
        if self.prompt_source == "dataset" and example.messages:
            return [dict(m) for m in example.messages]
        content = example.problem if not self.instruction else f"{example.problem}\n\n{self.instruction}"
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        messages.append({"role": "user", "content": content})
        return messages

    def render(self, example: MathExample) -> RenderedPrompt:
        """The prompt of one example (no length filter)."""
        text = self.tokenizer.apply_chat_template(
            self.messages(example), add_generation_prompt=True, tokenize=False
        )
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return RenderedPrompt(example, text, tuple(int(i) for i in ids))

    def render_all(self, examples: Sequence[MathExample]) -> tuple[list[RenderedPrompt], int]:
        """``(kept prompts, number dropped for exceeding max_prompt_tokens)``."""
        kept: list[RenderedPrompt] = []
        dropped = 0
        for example in examples:
            prompt = self.render(example)
            if self.max_prompt_tokens is not None and len(prompt.token_ids) > self.max_prompt_tokens:
                dropped += 1
                continue
            kept.append(prompt)
        return kept, dropped
