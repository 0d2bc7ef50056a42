"""``ebpo-eval``: Pass@1 (mean over k samples), maj@m and pass@k of a checkpoint on math benchmarks.

    ebpo-eval --checkpoint runs/X/checkpoints/step_000100 --data data/math500.jsonl data/aime24.jsonl \\
              --k 32 --maj 16 --out eval/step100.json --table eval/step100.md [dotted.key=value ...]

One process by default, or many under torchrun / srun (TP/DP from the config and overrides).
``--config`` defaults to the run directory's ``config.yaml``; ``--data`` to ``data.eval_files``
(embedded tasks such as the synthetic one evaluate their held-out set). Exit status: 0 done, 2 bad input
(missing checkpoint or data file, bad setting or config), 1 any other failure.

This module assembles an evaluation from a checkpoint (process groups, policy, weights, engine)
and runs ``evaluation.runner.evaluate_benchmarks``, the training loop's evaluation path.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from .config.schema import Config, load_config
from .config.typed import ConfigError
from .evaluation.results import BenchmarkResult, EvalInputError, EvalSettings, results_json, results_table
from .evaluation.runner import build_eval_task, evaluate_benchmarks, load_benchmarks
from .models import build_policy
from .parallel import cpu_compat, initialize, launch_info, shutdown
from .rollout.base import RolloutEngine
from .rollout.factory import build_engine
from .rollout.weight_sync import send_weights
from .trainer.checkpoint import load_model


def find_run_dir(checkpoint: Path) -> Path | None:
    """The run directory of a checkpoint: the nearest of its parent and grandparent holding a
    ``config.yaml`` (``runs/X/checkpoints/step_N`` -> ``runs/X``; ``runs/X/reference`` -> ``runs/X``)."""
    for candidate in (checkpoint.parent, checkpoint.parent.parent):
        if (candidate / "config.yaml").is_file():
            return candidate
    return None


def resolve_config(checkpoint: Path, config_path: Path | None,
                   overrides: Sequence[str] = ()) -> tuple[Config, Path]:
    """Check ``checkpoint``; load ``config_path`` (default: the run directory's config.yaml)
    with overrides. Returns the config and the run directory (for the synthetic tokenizer)."""
    if not checkpoint.is_dir():
        raise EvalInputError(f"--checkpoint: directory not found: {checkpoint}")
    if not (checkpoint / "COMPLETE").is_file():
        raise EvalInputError(f"--checkpoint: {checkpoint} is not a complete checkpoint (no COMPLETE marker)")
    run_dir = find_run_dir(checkpoint)
    if config_path is None:
        if run_dir is None:
            raise EvalInputError(f"--config: not given, and no config.yaml next to {checkpoint} or its parent")
        config_path = run_dir / "config.yaml"
    try:
        config = load_config(config_path, list(overrides))
    except ConfigError as err:
        raise EvalInputError(f"--config: {err}") from None
    return config, run_dir or config.run.run_dir


@contextmanager
def policy_engine(config: Config, checkpoint: Path, pad_token_id: int) -> Iterator[RolloutEngine]:
    """Process groups (torchrun / Slurm / one process), the policy with ``checkpoint``'s
    weights, and the engine of ``rollout.engine`` over it: native (the Megatron model itself), or
    vLLM (one per process, woken and sent the weights through the trainer's export; the Megatron
    copy is dropped before generation). The groups are destroyed on exit."""
    if config.run.torch_threads:
        torch.set_num_threads(config.run.torch_threads)
    initialize(config.parallel, config.model, launch_info())
    try:
        cpu_compat.set_seed(config.run.seed)
        chunks = build_policy(config.model, config.parallel)
        load_model(checkpoint, chunks)
        engine = build_engine(config, chunks[0], pad_token_id)
        if not engine.owns_weights:
            yield engine
            return
        engine.wake()
        send_weights(engine, chunks, config)
        del chunks
        try:
            yield engine
        finally:
            engine.sleep()
            engine.close()  # before shutdown(): vLLM's teardown needs the process groups
    finally:
        shutdown()


@dataclass
class EvalRun:
    """What :func:`run_evaluation` returns: results, and whether this process is global rank 0."""

    results: list[BenchmarkResult]
    is_rank0: bool
    seconds: float


def run_evaluation(config: Config, checkpoint: Path, run_dir: Path, data_files: Sequence[Path],
                   settings: EvalSettings, split: str = "held-out") -> EvalRun:
    """Everything from a checkpoint: task, benchmarks (checked before any process group), engine,
    evaluation. ``data_files`` empty: ``data.eval_files`` for math configs, the embedded task's
    ``split`` otherwise."""
    started = time.time()
    task = build_eval_task(config, run_dir)
    if not data_files and task.renderer is not None:
        data_files = [Path(f) for f in config.data.eval_files]
    benchmarks = load_benchmarks(task, data_files, split)
    with policy_engine(config, checkpoint, task.tokenizer.pad_id) as engine:
        results = evaluate_benchmarks(engine, task, benchmarks, settings)
        is_rank0 = dist.get_rank() == 0
    return EvalRun(results, is_rank0, time.time() - started)


# ----------------------------------------------------------------------------- command line
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
