#!/usr/bin/env python
"""Label each problem of a math dataset with one of the paper's 9 topics (writes a ``topic`` column).

    python tools/label_topics.py --in data/train.parquet --out data/train_topics.parquet
    python tools/label_topics.py --in tests/data/math_small.jsonl --out /tmp/labelled.jsonl --overwrite
    python tools/label_topics.py --in data/train.parquet --out data/train_topics.parquet \\
        --checkpoint checkpoints/qwen3_8b_mcore --config examples/qwen3_8b_dapo_math.yaml rollout.engine=native

Keyword mode (default): the classifier of ``ebpo_megatron.data.topics`` reads each row's problem
text (any layout ``load_math_dataset`` accepts: verl/DAPO chat prompts, plain problem/answer rows).

LLM mode (``--checkpoint``, as the paper labelled DAPO-Math-17K): the model is asked, greedily
through the native rollout engine, with a chat prompt (``data.tokenizer_dir``'s template) that
lists the 9 topic names; the label is the topic named first in its reply ("and" may stand for
"&"). A reply naming none, or a prompt too long for the model's context, falls back to the
keyword classifier; both fallbacks are counted and reported. Runs under torchrun too (TP/DP from
the config; every DP rank labels a share).

Rows that already have a topic keep it unless ``--overwrite``; the summary then reports the
labeller's agreement with those existing labels. The output format follows ``--out``'s suffix
(.jsonl or .parquet); a parquet input written to parquet keeps its schema and gains (or
replaces) the ``topic`` column. Exit status: 0 done, 1 bad data, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ebpo_megatron.data.math_datasets import MathExample, _RowError, iter_jsonl_rows, iter_parquet_rows, row_to_example
from ebpo_megatron.data.topics import DEFAULT_TOPIC, TOPICS, classify_topic

LLM_PROMPT = (
    "Classify the following math problem into exactly one of these topics:\n"
    + "".join(f"- {topic}\n" for topic in TOPICS)
    + "Answer with the topic name only.\n\nProblem: {problem}"
)
_TOPIC_PATTERNS = {
    topic: re.compile(r"\s+".join(r"(?:&|and)" if word == "&" else re.escape(word) for word in topic.split()),
                      re.IGNORECASE)
    for topic in TOPICS
}


def parse_topic(reply: str) -> str | None:
    """The topic whose name occurs first in ``reply`` (case-insensitive, "and" for "&"), or None."""
    found = [(m.start(), topic) for topic, pattern in _TOPIC_PATTERNS.items() if (m := pattern.search(reply))]
    return min(found)[1] if found else None


def read_rows(path: Path) -> tuple[list[tuple[str, Any]], Any]:
    """Rows with their location, and the pyarrow table for parquet input (else None)."""
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        return list(iter_parquet_rows(path)), pq.read_table(path)
    if path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        return list(iter_jsonl_rows(path)), None
    raise ValueError(f"{path}: unknown format {path.suffix!r} (expected .jsonl or .parquet)")


def write_rows(out: Path, rows: list[tuple[str, Any]], table: Any, column: str, values: list[Any],
               arrow_type: str) -> None:
    """Write ``rows`` with ``column`` set to ``values`` (added or replaced), as jsonl or parquet
    by ``out``'s suffix; a parquet ``table`` keeps its schema (``arrow_type``: e.g. "string")."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        if table is None:
            table = pa.Table.from_pylist([row for _, row in rows])
        array = pa.array(values, type=getattr(pa, arrow_type)())
        if column in table.column_names:
            table = table.set_column(table.column_names.index(column), column, array)
        else:
            table = table.append_column(column, array)
        pq.write_table(table, out)
    elif out.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        with open(out, "w", encoding="utf-8") as f:
            f.writelines(json.dumps({**row, column: value}, ensure_ascii=False, default=str) + "\n" for (_, row), value in zip(rows, values))
    else:
        raise ValueError(f"{out}: unknown format {out.suffix!r} (expected .jsonl or .parquet)")


def read_examples(path: Path, rows: list[tuple[str, Any]]) -> list[MathExample]:
    """One example per row; a malformed row is a ValueError naming the file, row and field."""
    examples = []
    for n, (where, row) in enumerate(rows):
        try:
            examples.append(row_to_example(row, default_uid=str(n), default_source=path.stem))
        except _RowError as exc:
            raise ValueError(f"{path}: {where}: field {exc.field_name}: {exc}") from None
    return examples


def merge_labels(examples: list[MathExample], predicted: list[str], overwrite: bool) -> tuple[list[str], Counter]:
    """Topic per row (existing labels kept unless ``overwrite``) and agreement counts."""
    agreement: Counter = Counter()
    topics = []
    for example, guess in zip(examples, predicted):
        if example.topic is not None:
            agreement["agree" if guess == example.topic else "disagree"] += 1
        topics.append(example.topic if example.topic is not None and not overwrite else guess)
    return topics, agreement


@dataclass
class Labels:
    """A predicted topic per row, the LLM mode's counts, and whether this process writes."""

    topics: list[str]
    counts: Counter  # "llm", "fallback_no_topic", "fallback_too_long"
    is_rank0: bool


def llm_labels(examples: list[MathExample], checkpoint: Path, config_path: Path | None, overrides: list[str],
               default: str, max_new_tokens: int) -> Labels:
    """Ask the model for each problem's topic (greedy); keyword fallback when it names none."""

    import torch.distributed as dist

    from ebpo_megatron.data.math_prompts import ChatPromptRenderer
    from ebpo_megatron.evaluate import policy_engine, resolve_config
    from ebpo_megatron.evaluation.results import EvalInputError
    from ebpo_megatron.evaluation.runner import build_eval_task, render_examples, sharing_group
    from ebpo_megatron.parallel.sharding import map_over_group
    from ebpo_megatron.rollout.base import SamplingParams, generate_decoded

    config, run_dir = resolve_config(checkpoint, config_path, overrides)
    task = build_eval_task(config, run_dir)
    if task.renderer is None:
        raise EvalInputError("--config: LLM labelling needs a math config (data.task: math, data.tokenizer_dir)")
    renderer = ChatPromptRenderer(task.renderer.tokenizer, instruction="", prompt_source="problem",
                                  max_prompt_tokens=config.model.max_position_embeddings - max_new_tokens)
    asks = [MathExample(e.uid, LLM_PROMPT.format(problem=e.problem), e.answer) for e in examples]
    prompts, _ = render_examples(renderer, asks)
    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=max_new_tokens,
                            stop_token_ids=task.stop_token_ids, seed=config.run.seed)
    with policy_engine(config, checkpoint, task.tokenizer.pad_id) as engine:
        def replies_of(share: list, _first: int, rank: int) -> list[str]:
            return generate_decoded(engine, [p.token_ids for p in share], params, rank, task.tokenizer.decode).texts

        replies = map_over_group(prompts, replies_of, sharing_group(engine))
        is_rank0 = dist.get_rank() == 0
    answered = {p.uid: parse_topic(reply) for p, reply in zip(prompts, replies)}
    counts: Counter = Counter()
    topics = []
    for row, example in enumerate(examples):
        topic = answered.get(row)
        counts["fallback_too_long" if row not in answered else "llm" if topic else "fallback_no_topic"] += 1
        topics.append(topic or classify_topic(example.problem, default))
    return Labels(topics, counts, is_rank0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Label math problems with the paper's 9 topics.")
    parser.add_argument("--in", dest="inp", type=Path, required=True, help="input .jsonl or .parquet")
    parser.add_argument("--out", type=Path, required=True, help="output .jsonl or .parquet")
    parser.add_argument("--default", default=DEFAULT_TOPIC, choices=TOPICS, help="topic when no keyword matches")
    parser.add_argument("--overwrite", action="store_true", help="relabel rows that already have a topic")
    parser.add_argument("--checkpoint", type=Path, default=None, help="label with this model (LLM mode)")
    parser.add_argument("--config", type=Path, default=None, help="its trainer YAML (default: the run's config.yaml)")
    parser.add_argument("--max-new-tokens", type=int, default=24, help="reply length in LLM mode")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value config overrides (LLM mode)")
    args = parser.parse_args(argv)
    if args.checkpoint is None and (args.config is not None or args.overrides):
        parser.error("--config and overrides need --checkpoint (LLM mode)")
    if not args.inp.is_file():
        parser.error(f"--in: file not found: {args.inp}")
    input_errors: tuple[type[Exception], ...] = ()
    if args.checkpoint is not None:
        from ebpo_megatron.evaluation.results import EvalInputError

        input_errors = (EvalInputError,)
    try:
        rows, table = read_rows(args.inp)
        examples = read_examples(args.inp, rows)
        if args.checkpoint is None:
            labels = Labels([classify_topic(e.problem, args.default) for e in examples], Counter(), True)
        else:
            labels = llm_labels(examples, args.checkpoint, args.config, args.overrides, args.default,
                                args.max_new_tokens)
        topics, agreement = merge_labels(examples, labels.topics, args.overwrite)
        if labels.is_rank0:
            write_rows(args.out, rows, table, "topic", topics, "string")
    except input_errors as exc:
        print(f"label_topics: error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"label_topics: error: {exc}", file=sys.stderr)
        return 1
    if not labels.is_rank0:
        return 0
    counts = Counter(topics)
    print(f"wrote {args.out}: {len(topics)} rows")
    for topic in TOPICS:
        print(f"  {counts.get(topic, 0):6d}  {topic}")
    if args.checkpoint is not None:
        c = labels.counts
        print(f"llm: {c['llm']}  fallback_no_topic: {c['fallback_no_topic']}  "
              f"fallback_too_long: {c['fallback_too_long']}  (of {len(examples)} rows)")
    labelled = agreement["agree"] + agreement["disagree"]
    if labelled:
        print(f"labels agree with {agreement['agree']}/{labelled} existing labels ({agreement['agree'] / labelled:.1%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
