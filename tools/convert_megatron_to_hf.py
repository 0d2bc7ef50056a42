#!/usr/bin/env python
"""Convert a Megatron checkpoint (converted, model-only, or a training ``step_N``) back into a
Hugging Face checkpoint (sharded safetensors + config + tokenizer files) that transformers loads.

    python tools/convert_megatron_to_hf.py --ckpt DIR --out DIR [--config FILE]
        [--hf-template DIR] [--dtype bf16] [--max-shard-size-mb 2048] [--overwrite]

``--config``: a trainer config or model.yaml with the architecture (default: model.yaml in the
checkpoint, else the run's config.yaml). ``--hf-template``: where config/tokenizer files come
from (default: the ``hf/`` directory kept by the HF -> Megatron conversion). Streams one layer
at a time. ``--out`` must not exist or be empty (``--overwrite`` replaces it) and may never be,
contain or lie inside the checkpoint, its config or the template; the result is written beside it
and renamed into place when complete. Exit codes: 0 done, 2 bad input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", type=Path, required=True, help="Megatron checkpoint directory")
    parser.add_argument("--out", type=Path, required=True, help="Hugging Face directory to write")
    parser.add_argument("--config", type=Path, help="trainer config or model.yaml with the architecture")
    parser.add_argument("--hf-template", type=Path, help="directory with config.json and tokenizer files")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="output dtype (default: the checkpoint's)")
    parser.add_argument("--max-shard-size-mb", type=int, default=2048, help="safetensors shard size limit")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out when it exists and is not empty (never allowed when it overlaps the input)")
    args = parser.parse_args(argv)
    from ebpo_megatron.conversion import convert_megatron_to_hf

    try:
        report = convert_megatron_to_hf(args.ckpt, args.out, args.config, args.hf_template,
                                        DTYPES.get(args.dtype), args.max_shard_size_mb * 2**20,
                                        overwrite=args.overwrite)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{args.ckpt} -> {args.out}: {report.model.family}, {report.tensors} tensors, "
          f"{report.bytes_written / 2**20:.1f} MiB in {report.seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
