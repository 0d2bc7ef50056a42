"""Tokens/s of one RL train step on CPU: this project (Megatron-Core GPTModel, TP=1, DDP +
distributed optimizer, PolicyTrainer) vs the same architecture in Hugging Face `transformers`
with torch AdamW running the same GRPO/PPO-clip loss, in one run, same batch, the two sides
taking turns over ``--rounds``; prints the median step times and the median per-round ratio.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

import torch

from bench_model import (add_model_args, alternate, bench_config, describe, hf_model, load_hf_weights,
                         medians_and_ratio)
from ebpo_megatron.algorithms import entropy_from_logits, policy_loss


def make_batch(vocab: int, batch: int, prompt: int, response: int, seed: int = 0):
    """``batch`` sequences of ``prompt`` + ``response`` random tokens; the loss covers the response."""
    from ebpo_megatron.trainer.batching import PolicyBatch

    g = torch.Generator().manual_seed(seed)
    length = prompt + response
    tokens = torch.randint(0, vocab, (batch, length), generator=g)
    mask = torch.zeros(batch, length - 1)
    mask[:, prompt - 1:] = 1.0  # targets tokens[prompt:], the response
    old = -9.0 + 0.1 * torch.randn(batch, length - 1, generator=g)
    return PolicyBatch(tokens, torch.full((batch,), length), mask, torch.randn(batch, generator=g), old_logp=old)


def megatron_step(cfg, hf_dir, batch, micro: int) -> Callable[[], None]:
    """One RL train step of this project (parallel state must be initialized)."""
    from ebpo_megatron.models import build_policy
    from ebpo_megatron.parallel import ParallelConfig, cpu_compat
    from ebpo_megatron.config.training import LossConfig, OptimConfig, StepConfig
    from ebpo_megatron.trainer.policy_trainer import PolicyTrainer

    cpu_compat.set_seed(0)
    chunks = build_policy(cfg, ParallelConfig())
    if hf_dir is not None:
        load_hf_weights(chunks, cfg, hf_dir)
    trainer = PolicyTrainer(chunks, OptimConfig(lr=1e-5), LossConfig(kl_coef=0.0),
                            StepConfig(micro_batch_size=micro, step_kl=False))
    return lambda: trainer.train_step(batch)


def hf_step(cfg, hf_dir, batch, micro: int) -> Callable[[], None]:
    """The same step in transformers: full-sequence logits, the same loss, AdamW, clipping."""
    model = hf_model(cfg, hf_dir).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    total_tokens = float(batch.loss_mask.sum())

    def step() -> None:
        optimizer.zero_grad()
        for first in range(0, batch.size, micro):
            mb = batch.select(slice(first, first + micro))
            logits = model(mb.tokens).logits[:, :-1].float()
            logp = torch.log_softmax(logits, -1).gather(-1, mb.tokens[:, 1:].unsqueeze(-1)).squeeze(-1)
            loss, _ = policy_loss(logp, mb.old_logp, mb.advantages, mb.loss_mask, total_tokens=total_tokens)
            with torch.no_grad():
                entropy_from_logits(logits)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens per sequence")
    parser.add_argument("--response", type=int, default=96, help="response tokens per sequence")
    parser.add_argument("--micro", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=6,
                        help="rounds of one step on each side (after one warm-up round)")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    add_model_args(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from ebpo_megatron.parallel import ParallelConfig, initialize, launch_info, shutdown

    length = args.prompt + args.response
    cfg = bench_config(args.hf, length)
    batch = make_batch(cfg.vocab_size, args.batch, args.prompt, args.response)
    tokens = args.batch * length
    initialize(ParallelConfig(), cfg, launch_info())
    try:
        sides = {"ours": megatron_step(cfg, args.hf, batch, args.micro),
                 "hf": hf_step(cfg, args.hf, batch, args.micro)}
        times = alternate(sides, args.rounds)
    finally:
        shutdown()
    t_mc, t_hf, ratio = medians_and_ratio(times)
    print(f"{describe(cfg, args.hf)}, batch {args.batch} x ({args.prompt} prompt + {args.response} response) tokens, "
          f"{args.micro} sequences per micro-batch, {args.threads} threads, {args.rounds} rounds (median)")
    print(f"HF transformers + torch AdamW : {t_hf:7.3f} s/step  {tokens / t_hf:8.0f} tokens/s")
    print(f"ebpo_megatron (Megatron-Core) : {t_mc:7.3f} s/step  {tokens / t_mc:8.0f} tokens/s")
    print(f"ratio (ours / HF)             : {ratio}")


if __name__ == "__main__":
    main()
