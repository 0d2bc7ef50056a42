#!/usr/bin/env python
"""Regenerate the parquet twins of tests/data/math_small.jsonl (the hand-written source of truth).

    python tools/make_test_math_data.py            # writes tests/data/math_small_{verl,dapo}.parquet

* ``math_small_verl.parquet`` — verl's layout: ``data_source``, ``prompt`` (one user message:
  problem + verl's MATH instruction), ``ability``, ``reward_model {style, ground_truth}``,
  ``extra_info {split, index, uid}``, plus top-level ``topic`` and ``difficulty`` columns.
* ``math_small_dapo.parquet`` — DAPO-Math-17K's exact schema: ``data_source = "math_dapo"``,
  ``prompt`` (DAPO's "Answer:" instruction header/footer around the problem), ``ability =
  "MATH"``, ``reward_model {ground_truth, style = "rule-lighteval/MATH_v2"}``,
  ``extra_info {index = <uuid>}``; no topic or difficulty (the real file has none).
"""

from __future__ import annotations

import argparse
import json
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"

VERL_INSTRUCTION = "Let's think step by step and output the final answer within \\boxed{}."
DAPO_HEADER = (
    "Solve the following math problem step by step. The last line of your response should be of "
    "the form Answer: $Answer (without quotes) where $Answer is the answer to the problem."
)
DAPO_FOOTER = 'Remember to put your answer on its own line after "Answer:".'
UUID_NAMESPACE = uuid.UUID("6f1c8f1e-2f53-4d0b-9a57-0c6b2f7f1d3a")

MESSAGES = pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def verl_table(rows: list[dict]) -> pa.Table:
    schema = pa.schema(
        [
            ("data_source", pa.string()),
            ("prompt", MESSAGES),
            ("ability", pa.string()),
            ("reward_model", pa.struct([("style", pa.string()), ("ground_truth", pa.string())])),
            ("extra_info", pa.struct([("split", pa.string()), ("index", pa.int64()), ("uid", pa.string())])),
            ("topic", pa.string()),
            ("difficulty", pa.float64()),
        ]
    )
    records = [
        {
            "data_source": "math_small",
            "prompt": [{"content": f"{r['problem']} {VERL_INSTRUCTION}", "role": "user"}],
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": r["answer"]},
            "extra_info": {"split": "test", "index": i, "uid": r["id"]},
            "topic": r["topic"],
            "difficulty": r["difficulty"],
        }
        for i, r in enumerate(rows)
    ]
    return pa.Table.from_pylist(records, schema=schema)


def dapo_table(rows: list[dict]) -> pa.Table:
    schema = pa.schema(
        [
            ("data_source", pa.string()),
            ("prompt", MESSAGES),
            ("ability", pa.string()),
            ("reward_model", pa.struct([("ground_truth", pa.string()), ("style", pa.string())])),
            ("extra_info", pa.struct([("index", pa.string())])),
        ]
    )
    records = [
        {
            "data_source": "math_dapo",
            "prompt": [{"content": f"{DAPO_HEADER}\n\n{r['problem']}\n\n{DAPO_FOOTER}", "role": "user"}],
            "ability": "MATH",
            "reward_model": {"ground_truth": r["answer"], "style": "rule-lighteval/MATH_v2"},
            "extra_info": {"index": str(uuid.uuid5(UUID_NAMESPACE, r["id"]))},
        }
        for r in rows
    ]
    return pa.Table.from_pylist(records, schema=schema)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", type=Path, default=DATA / "math_small.jsonl")
    parser.add_argument("--out-dir", type=Path, default=DATA)
    args = parser.parse_args()
    rows = read_rows(args.src)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, table in (("math_small_verl", verl_table(rows)), ("math_small_dapo", dapo_table(rows))):
        out = args.out_dir / f"{name}.parquet"
        pq.write_table(table, out)
        print(f"wrote {out} ({table.num_rows} rows)")


if __name__ == "__main__":
    main()
