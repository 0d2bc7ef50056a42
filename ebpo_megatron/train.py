"""``ebpo-train --config FILE [dotted.key=value ...]`` (also ``python -m ebpo_megatron.train``).

One process, or many under torchrun / srun (ranks from the environment). The config is
validated before any model or process-group work.

Exit status: 0 done (or stopped by SIGUSR1/SIGTERM after a checkpoint); 1 a NaN/inf loss; 2 bad
input: the config, a data file, a damaged checkpoint (any ValueError, ``CheckpointError``
included, or a missing file), reported as one line ``ebpo-train: error: ...``.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from .omp_env import apply_omp_defaults

apply_omp_defaults()  # before torch (imported by the config schema) loads its OpenMP runtime

from .config.schema import load_config  # noqa: E402
from .config.typed import ConfigError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ebpo-train", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="YAML config (see examples/)")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. optim.lr=1e-5")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"ebpo-train: config error: {err}", file=sys.stderr)
        return 2
    for noise in ("Transformer Engine and Apex", "Apex is not installed", ".*is deprecated",
                  "The following imports from", "To copy construct from a tensor"):
        warnings.filterwarnings("ignore", message=noise)
    from .trainer.rl_loop import NonFiniteLoss, StopRequested
    from .trainer.run import run

    try:
        run(config)
    except StopRequested as stop:
        print(f"ebpo-train: {stop}; rerun the same command to resume", file=sys.stderr)
    except NonFiniteLoss as err:
        print(f"ebpo-train: error: {err}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as err:  # bad input: data files, checkpoints (CheckpointError), ...
        print("ebpo-train: error: " + " ".join(str(err).splitlines()), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
