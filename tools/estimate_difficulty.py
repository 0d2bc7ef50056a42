#!/usr/bin/env python
"""Write a math dataset back with a ``difficulty`` column: the model's pass rate on each problem.

    python tools/estimate_difficulty.py --checkpoint checkpoints/qwen3_8b_mcore \\
        --config examples/qwen3_8b_dapo_math.yaml --data data/dapo_math_17k.parquet \\
        --out data/dapo_math_17k_difficulty.parquet [--samples 16 --temperature 1.0] [key=value ...]
    python tools/estimate_difficulty.py --checkpoint runs/tiny_cpu/reference --out difficulty.json

Without ``--data`` (an embedded task: synthetic, chat_arith) the task's training split is scored
and ``--out`` is a JSON object ``{"<uid>": pass rate}``, the trainer's ``data.difficulty_file``.

The paper's ebpo-diff curriculum: difficulty = the base model's pass rate over 16 samples at
temperature 1.0 (``data.order: difficulty`` streams easy → hard, i.e. by falling pass rate).
Samples and verdicts come from ``ebpo_megatron.evaluation.runner`` (the same prompts, reward and
engine as ``ebpo-eval``). Every input row and column is written back in the same layout as
``--out``'s suffix (jsonl or parquet; a parquet input keeps its schema); ``difficulty`` is added
or replaced, and is null for rows whose prompt exceeds ``data.max_prompt_tokens``. Runs under
torchrun too. Exit status: 0 done, 2 bad input, 1 any other failure.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "tools"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from label_topics import read_rows, write_rows

from ebpo_megatron.config.schema import Config
from ebpo_megatron.data.difficulty import write_pass_rates
from ebpo_megatron.evaluate import resolve_config, run_evaluation
from ebpo_megatron.evaluation.results import BenchmarkResult, EvalInputError, EvalSettings, pass_rates


def difficulty_column(result: BenchmarkResult, num_rows: int) -> list[float | None]:
    """Per row: the fraction of its samples graded correct (None when the row was dropped)."""
    values: list[float | None] = [None] * num_rows
    for uid, rate in pass_rates(result).items():
        values[uid] = rate
    return values


def embedded_pass_rates(config: Config, checkpoint: Path, run_dir: Path, settings: EvalSettings,
                        out: Path) -> int:
    """An embedded task (no data file): the pass rate of every training prompt, written as
    ``{"<uid>": rate}`` for ``data.difficulty_file``."""
    if config.data.task == "math":
        raise EvalInputError("--data: a math config needs the data file to annotate")
    if out.suffix != ".json":
        raise EvalInputError(f"--out: an embedded task's pass rates are written as .json, got {out}")
    done = run_evaluation(config, checkpoint, run_dir, [], settings, split="train")
    rates = pass_rates(done.results[0])
    if done.is_rank0:
        write_pass_rates(out, rates)
        print(f"wrote {out}: {len(rates)} training prompts scored with {settings.k} samples "
              f"(mean pass rate {sum(rates.values()) / len(rates):.3f}); {done.seconds:.1f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="model checkpoint directory")
    parser.add_argument("--config", type=Path, default=None, help="trainer YAML (default: the run's config.yaml)")
    parser.add_argument("--data", type=Path, default=None,
                        help="math .jsonl or .parquet (omit for an embedded task: its training split)")
    parser.add_argument("--out", type=Path, required=True,
                        help="output .jsonl or .parquet (with --data), else .json {uid: pass rate}")
    parser.add_argument("--samples", type=int, default=16, help="samples per problem")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: rollout.max_new_tokens")
    parser.add_argument("--seed", type=int, default=None, help="default: run.seed")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value config overrides")
    args = parser.parse_args(argv)
    try:
        config, run_dir = resolve_config(args.checkpoint, args.config, args.overrides)
        settings = EvalSettings(k=args.samples, maj=1, temperature=args.temperature,
                                max_new_tokens=args.max_new_tokens or config.rollout.max_new_tokens,
                                seed=config.run.seed if args.seed is None else args.seed)
        if args.data is None:
            return embedded_pass_rates(config, args.checkpoint, run_dir, settings, args.out)
        if not args.data.is_file():
            raise EvalInputError(f"--data: file not found: {args.data}")
        rows, table = read_rows(args.data)
        done = run_evaluation(config, args.checkpoint, run_dir, [args.data], settings)
        values = difficulty_column(done.results[0], len(rows))
        if done.is_rank0:
            write_rows(args.out, rows, table, "difficulty", values, "float64")
    except (EvalInputError, FileNotFoundError) as err:
        print(f"estimate_difficulty: error: {err}", file=sys.stderr)
        return 2
    except (ValueError, RuntimeError) as err:
        print(f"estimate_difficulty: error: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    if done.is_rank0:
        scored = [v for v in values if v is not None]
        print(f"wrote {args.out}: {len(rows)} rows, {len(scored)} scored with {settings.k} samples "
              f"(mean pass rate {sum(scored) / len(scored):.3f}), {len(rows) - len(scored)} dropped "
              f"(longer than data.max_prompt_tokens); {done.seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
