"""What the checkpoint manifest costs: ``save_checkpoint`` of the bench model (weights + Adam
state) over ``--rounds``, and inside each save the seconds spent checksumming its files into
MANIFEST.json (xxh3-128); for comparison, blake2b over the same files. Prints medians and the
manifest's share of the save.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench_model import add_model_args, bench_config, describe, load_hf_weights
from train_step import make_batch


def trained_once(cfg, hf_dir):
    """The bench model's PolicyTrainer after one step (so that the Adam state exists)."""
    from ebpo_megatron.models import build_policy
    from ebpo_megatron.parallel import ParallelConfig, cpu_compat
    from ebpo_megatron.config.training import LossConfig, OptimConfig, StepConfig
    from ebpo_megatron.trainer.policy_trainer import PolicyTrainer

    cpu_compat.set_seed(0)
    chunks = build_policy(cfg, ParallelConfig())
    if hf_dir is not None:
        load_hf_weights(chunks, cfg, hf_dir)
    trainer = PolicyTrainer(chunks, OptimConfig(lr=1e-5), LossConfig(kl_coef=0.0), StepConfig(micro_batch_size=4,
                                                                                              step_kl=False))
    trainer.train_step(make_batch(cfg.vocab_size, 4, 16, 16))
    return trainer


def blake2b_seconds(directory: Path) -> float:
    start = time.perf_counter()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest = hashlib.blake2b()
        with open(path, "rb") as f:
            while chunk := f.read(8 << 20):
                digest.update(chunk)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="saves (after one warm-up save)")
    add_model_args(parser)
    args = parser.parse_args()
    torch.set_num_threads(1)

    from ebpo_megatron.parallel import ParallelConfig, initialize, launch_info, shutdown
    from ebpo_megatron.trainer import checkpoint

    cfg = bench_config(args.hf, 64)
    initialize(ParallelConfig(), cfg, launch_info())
    manifest_s: list[float] = []
    write_manifest = checkpoint.write_manifest

    def timed_manifest(directory: Path) -> None:
        start = time.perf_counter()
        write_manifest(directory)
        manifest_s.append(time.perf_counter() - start)

    checkpoint.write_manifest = timed_manifest
    try:
        trainer = trained_once(cfg, args.hf)
        save_s: list[float] = []
        with tempfile.TemporaryDirectory() as tmp:
            for i in range(args.rounds + 1):
                start = time.perf_counter()
                saved = checkpoint.save_checkpoint(Path(tmp), i, trainer, {}, keep_last=1)
                save_s.append(time.perf_counter() - start)
            size = sum(p.stat().st_size for p in saved.rglob("*") if p.is_file())
            blake = statistics.median(blake2b_seconds(saved) for _ in range(3))
    finally:
        shutdown()
    save, manifest = statistics.median(save_s[1:]), statistics.median(manifest_s[1:])
    print(f"{describe(cfg, args.hf)}; checkpoint {size / 1e6:.0f} MB; {args.rounds} saves (median)")
    print(f"save_checkpoint, manifest included : {save:7.3f} s")
    print(f"  of which the xxh3-128 manifest   : {manifest:7.3f} s  ({100 * manifest / save:.1f} % of the save, "
          f"{100 * manifest / (save - manifest):.1f} % on top of the save without it; {size / manifest / 1e9:.1f} GB/s)")
    print(f"blake2b over the same files        : {blake:7.3f} s  ({100 * blake / (save - manifest):.1f} % on top)")


if __name__ == "__main__":
    main()
