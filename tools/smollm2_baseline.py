#!/usr/bin/env python
"""Baseline of a Hugging Face chat model on the chat-arithmetic held-out split, with HF ``generate``.

    python tools/smollm2_baseline.py --hf runs/smollm2/hf [--threads 1] [--out baseline.json]

Two measurements on the held-out problems of ``data/chat_arithmetic.py`` (the split a
``data.task: chat_arith`` run evaluates on, same seed and levels):

* sampled: the first ``--sampled-prompts`` (24) prompts x ``--samples`` (4) at
  ``--temperature`` (1.0) — what a G = 4 rollout sees;
* greedy: ``--greedy-prompts`` (200) prompts.

Each reports strict accuracy (right answer in the last ``\\boxed{}``), lenient accuracy (the
training reward's correctness: box, else "the answer is", else the last number) and the boxed
fraction, per level and overall, and the wall time. Replies are cut at ``--max-new-tokens`` (32).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ebpo_megatron.data.chat_arithmetic import (
    DEFAULT_INSTRUCTION,
    ChatArithProblem,
    make_reward,
    make_split,
    render_prompts,
)


def generate(model: Any, tokenizer: Any, prompts: Sequence[tuple[int, ...]], *, samples: int,
             temperature: float, max_new_tokens: int, batch_size: int) -> list[str]:
    """Replies (``samples`` per prompt, prompt-major) decoded without special tokens; greedy when
    ``temperature`` is 0."""
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    replies: list[str] = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start: start + batch_size]
        width = max(len(p) for p in batch)
        ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in batch])  # left padding
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        sampling = {"do_sample": True, "temperature": temperature, "top_p": 1.0, "top_k": 0} if temperature > 0 \
            else {"do_sample": False}
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 num_return_sequences=samples, pad_token_id=pad, **sampling)
        replies += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return replies


def score(problems: Sequence[ChatArithProblem], replies: Sequence[str], samples: int,
          format_reward: float) -> dict[str, dict[str, float]]:
    """Per level and ``"all"``: n (replies), strict, lenient and boxed fractions."""
    reward = make_reward(format_reward)
    answers = [p.answer for p in problems for _ in range(samples)]
    lenient = reward.score_batch(list(replies), answers)
    reward.close()
    sums: dict[str, dict[str, float]] = defaultdict(lambda: {"n": 0, "strict": 0.0, "lenient": 0.0, "boxed": 0.0})
    for i, result in enumerate(lenient):
        level = problems[i // samples].level
        for key in (f"level{level}", "all"):
            row = sums[key]
            row["n"] += 1
            row["strict"] += float(result.correct and result.boxed)  # = make_reward(.., require_box=True)
            row["lenient"] += float(result.correct)
            row["boxed"] += float(result.boxed)
    return {key: {"n": row["n"], **{k: round(row[k] / row["n"], 4) for k in ("strict", "lenient", "boxed")}}
            for key, row in sorted(sums.items())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hf", type=Path, default=ROOT / "runs" / "smollm2" / "hf", help="HF checkpoint directory")
    parser.add_argument("--levels", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--seed", type=int, default=1234, help="split and sampling seed (run.seed of the run)")
    parser.add_argument("--instruction", default=DEFAULT_INSTRUCTION)
    parser.add_argument("--format-reward", type=float, default=0.1)
    parser.add_argument("--sampled-prompts", type=int, default=24)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--greedy-prompts", type=int, default=200)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=25)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM

    from ebpo_megatron.data.math_prompts import load_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(args.hf), local_files_only=True, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(args.hf)
    _, held = make_split(args.levels, 1, max(args.sampled_prompts, args.greedy_prompts), args.seed)
    results: dict[str, Any] = {"checkpoint": str(args.hf), "load_s": round(time.perf_counter() - start, 1)}
    runs = (("sampled", args.sampled_prompts, args.samples, args.temperature),
            ("greedy", args.greedy_prompts, 1, 0.0))
    for name, count, samples, temperature in runs:
        problems = held[:count]
        start = time.perf_counter()
        replies = generate(model, tokenizer, render_prompts(problems, tokenizer, args.instruction), samples=samples,
                           temperature=temperature, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
        seconds = time.perf_counter() - start
        table = score(problems, replies, samples, args.format_reward)
        examples = [{"question": p.question(), "answer": p.answer, "reply": replies[i * samples]}
                    for i, p in enumerate(problems[:6])]
        results[name] = {"prompts": len(problems), "samples": samples, "temperature": temperature,
                         "seconds": round(seconds, 1), "by_level": table, "examples": examples}
        print(f"\n{name}: {len(problems)} prompts x {samples} at T={temperature}, {args.max_new_tokens} new tokens, "
              f"{seconds:.1f} s")
        print(f"  {'':8s} {'n':>5s} {'strict':>7s} {'lenient':>8s} {'boxed':>6s}")
        for key, row in table.items():
            print(f"  {key:8s} {row['n']:5d} {row['strict']:7.3f} {row['lenient']:8.3f} {row['boxed']:6.3f}")
        for example in examples[:3]:
            print(f"  e.g. {example['question']} ({example['answer']}): {example['reply']!r}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
