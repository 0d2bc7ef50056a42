#!/usr/bin/env python
"""Convert a Hugging Face Llama-3.x / Qwen2.5 / Qwen3 dense checkpoint into a Megatron
``dist_checkpointing`` checkpoint that ``ebpo-train`` loads with ``model.checkpoint: OUT``.

    python tools/convert_hf_to_megatron.py --hf DIR --out DIR [--tp N --pp M] [--dtype bf16] [--overwrite]

Streams tensor by tensor (see ebpo_megatron/conversion/). ``--tp/--pp`` are the layout the
checkpoint is meant for: they are validated against the model (heads, KV heads, layers) and fix
the vocabulary padding; the checkpoint itself loads under any layout with the same padding.
``--out`` must not exist or be empty (``--overwrite`` replaces it) and may never be, contain or
lie inside ``--hf``; the result is written beside it and renamed into place when complete.
Exit codes: 0 done, 2 bad input (the message names the file and the problem).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hf", type=Path, required=True, help="Hugging Face checkpoint directory")
    parser.add_argument("--out", type=Path, required=True, help="Megatron checkpoint directory to write")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size it is meant for")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size it is meant for")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="stored dtype (default: the HF tensors')")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out when it exists and is not empty (never allowed when it overlaps the input)")
    args = parser.parse_args(argv)
    from ebpo_megatron.conversion import convert_hf_to_megatron

    try:
        report = convert_hf_to_megatron(args.hf, args.out, args.tp, args.pp, DTYPES.get(args.dtype),
                                        overwrite=args.overwrite)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    m = report.model
    print(f"{args.hf} -> {args.out}: {m.family}, {m.num_layers} layers, hidden {m.hidden_size}, "
          f"{report.tensors} chunks, {report.bytes_written / 2**20:.1f} MiB in {report.seconds:.1f} s; "
          f"model block: {args.out / 'model.yaml'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
