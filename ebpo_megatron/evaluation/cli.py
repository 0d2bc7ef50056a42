"""``ebpo-eval``: Pass@1 (mean over k samples), maj@m and pass@k of a checkpoint on math benchmarks.

    ebpo-eval --checkpoint runs/X/checkpoints/step_000100 --data data/math500.jsonl data/aime24.jsonl \\
              --k 32 --maj 16 --out eval/step100.json --table eval/step100.md [dotted.key=value ...]

One process by default, or many under torchrun / srun (TP/DP from the config and overrides).
``--config`` defaults to the run directory's ``config.yaml``; ``--data`` to ``data.eval_files``
(embedded tasks such as the synthetic one evaluate their held-out set). Exit status: 0 done, 2 bad input
(missing checkpoint or data file, bad setting or config), 1 any other failure.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from .runner import EvalInputError, EvalSettings, resolve_config, results_json, results_table, run_evaluation


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ebpo-eval", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True, help="model-only or training checkpoint directory")
    p.add_argument("--config", type=Path, default=None, help="trainer YAML (default: the run's config.yaml)")
    p.add_argument("--data", type=Path, nargs="+", default=[], help="math .jsonl/.parquet files, one benchmark each")
    p.add_argument("--k", type=int, default=32, help="samples per problem (pass@1 is their mean; pass@k)")
    p.add_argument("--maj", type=int, default=16, help="maj@m over the first m samples (m <= k)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: rollout.max_new_tokens")
    p.add_argument("--seed", type=int, default=None, help="default: run.seed")
    p.add_argument("--out", type=Path, default=None, help="JSON results (default: eval/<checkpoint name>.json)")
    p.add_argument("--table", type=Path, default=None, help="also write the markdown table here")
    p.add_argument("overrides", nargs="*", help="dotted.key=value config overrides, e.g. parallel.tensor_parallel=2")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    for noise in ("Transformer Engine and Apex", "Apex is not installed", ".*is deprecated",
                  "The following imports from", "To copy construct from a tensor"):
        warnings.filterwarnings("ignore", message=noise)
    try:
        config, run_dir = resolve_config(args.checkpoint, args.config, args.overrides)
        settings = EvalSettings(
            k=args.k, maj=args.maj, temperature=args.temperature,
            max_new_tokens=args.max_new_tokens or config.rollout.max_new_tokens,
            seed=config.run.seed if args.seed is None else args.seed,
        )
        done = run_evaluation(config, args.checkpoint, run_dir, args.data, settings)
    except (EvalInputError, FileNotFoundError, ImportError) as err:  # ImportError: a missing extra
        print(f"ebpo-eval: error: {err}", file=sys.stderr)
        return 2
    except (ValueError, RuntimeError) as err:
        print(f"ebpo-eval: error: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    if not done.is_rank0:
        return 0
    table = results_table(done.results, args.checkpoint.name)
    out = args.out or Path("eval") / f"{args.checkpoint.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results_json(done.results, config, args.checkpoint, settings, done.seconds), indent=1))
    if args.table is not None:
        args.table.parent.mkdir(parents=True, exist_ok=True)
        args.table.write_text(table)
    print(table, end="")
    print(f"wrote {out} ({sum(len(r.problems) for r in done.results)} problems x {settings.k} samples, "
          f"{done.seconds:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
