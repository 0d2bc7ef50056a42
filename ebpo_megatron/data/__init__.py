"""Prompt datasets for the math workload: loaders (jsonl / parquet in verl, DAPO-Math-17K and
plain layouts), chat-template prompt rendering from a local tokenizer, and the topic classifier.
Heavy packages (pyarrow, transformers) are imported only when a function needs them.
"""

from .math_datasets import MathExample, load_math_dataset, row_to_example, strip_instruction_template
from .math_prompts import DEFAULT_INSTRUCTION, ChatPromptRenderer, RenderedPrompt, load_tokenizer
from .topics import DEFAULT_TOPIC, TOPICS, classify_topic, classify_topics, topic_scores

__all__ = [
    "DEFAULT_INSTRUCTION",
    "DEFAULT_TOPIC",
    "TOPICS",
    "ChatPromptRenderer",
    "MathExample",
    "RenderedPrompt",
    "classify_topic",
    "classify_topics",
    "load_math_dataset",
    "load_tokenizer",
    "row_to_example",
    "strip_instruction_template",
    "topic_scores",
]
