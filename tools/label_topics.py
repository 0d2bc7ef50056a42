#!/usr/bin/env python
"""Label each problem of a math dataset with one of the paper's 9 topics (writes a ``topic`` column).

    python tools/label_topics.py --in data/train.parquet --out data/train_topics.parquet
    python tools/label_topics.py --in tests/data/math_small.jsonl --out /tmp/labelled.jsonl --overwrite

The keyword classifier of ``ebpo_megatron.data.topics`` reads each row's problem text (any
layout ``load_math_dataset`` accepts: verl/DAPO chat prompts, plain problem/answer rows).
Rows that already have a topic keep it unless ``--overwrite``; the summary then reports the
classifier's agreement with those existing labels. The output format follows ``--out``'s
suffix (.jsonl or .parquet); a parquet input written to parquet keeps its schema and gains (or
replaces) the ``topic`` column. ``--model`` (labelling with an LLM, as the paper did) needs
the rollout engine and is refused until it exists.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ebpo_megatron.data.math_datasets import _RowError, iter_jsonl_rows, iter_parquet_rows, row_to_example  # noqa: E402
from ebpo_megatron.data.topics import DEFAULT_TOPIC, TOPICS, classify_topic  # noqa: E402

MODEL_UNAVAILABLE = "--model needs the rollout engine (not yet available)"


def _read(path: Path) -> tuple[list[tuple[str, Any]], Any]:
    """Rows with their location, and the pyarrow table for parquet input (else None)."""
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        return list(iter_parquet_rows(path)), pq.read_table(path)
    if path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        return list(iter_jsonl_rows(path)), None
    raise ValueError(f"{path}: unknown format {path.suffix!r} (expected .jsonl or .parquet)")


def label_rows(path: Path, rows: list[tuple[str, Any]], default: str, overwrite: bool) -> tuple[list[str], Counter]:
    """Topic per row and agreement counts ('agree'/'disagree' with existing labels)."""
    topics: list[str] = []
    agreement: Counter = Counter()
    for n, (where, row) in enumerate(rows):
        try:
            example = row_to_example(row, default_uid=str(n), default_source=path.stem)
        except _RowError as exc:
            raise ValueError(f"{path}: {where}: field {exc.field_name}: {exc}") from None
        predicted = classify_topic(example.problem, default)
        if example.topic is not None:
            agreement["agree" if predicted == example.topic else "disagree"] += 1
        topics.append(example.topic if example.topic is not None and not overwrite else predicted)
    return topics, agreement


def _write(out: Path, rows: list[tuple[str, Any]], table: Any, topics: list[str]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        if table is None:
            table = pa.Table.from_pylist([row for _, row in rows])
        column = pa.array(topics, type=pa.string())
        if "topic" in table.column_names:
            table = table.set_column(table.column_names.index("topic"), "topic", column)
        else:
            table = table.append_column("topic", column)
        pq.write_table(table, out)
    elif out.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        with open(out, "w", encoding="utf-8") as f:
            for (_, row), topic in zip(rows, topics):
                f.write(json.dumps({**row, "topic": topic}, ensure_ascii=False, default=str) + "\n")
    else:
        raise ValueError(f"{out}: unknown format {out.suffix!r} (expected .jsonl or .parquet)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Label math problems with the paper's 9 topics.")
    parser.add_argument("--in", dest="inp", type=Path, required=True, help="input .jsonl or .parquet")
    parser.add_argument("--out", type=Path, required=True, help="output .jsonl or .parquet")
    parser.add_argument("--default", default=DEFAULT_TOPIC, choices=TOPICS, help="topic when no keyword matches")
    parser.add_argument("--overwrite", action="store_true", help="relabel rows that already have a topic")
    parser.add_argument("--model", default=None, help="label with an LLM (needs the rollout engine)")
    args = parser.parse_args(argv)
    if args.model is not None:
        parser.error(MODEL_UNAVAILABLE)
    if not args.inp.is_file():
        parser.error(f"--in: file not found: {args.inp}")
    try:
        rows, table = _read(args.inp)
        topics, agreement = label_rows(args.inp, rows, args.default, args.overwrite)
        _write(args.out, rows, table, topics)
    except ValueError as exc:
        print(f"label_topics: error: {exc}", file=sys.stderr)
        return 1
    counts = Counter(topics)
    print(f"wrote {args.out}: {len(topics)} rows")
    for topic in TOPICS:
        print(f"  {counts.get(topic, 0):6d}  {topic}")
    labelled = agreement["agree"] + agreement["disagree"]
    if labelled:
        print(f"classifier agrees with {agreement['agree']}/{labelled} existing labels ({agreement['agree'] / labelled:.1%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
