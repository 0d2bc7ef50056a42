"""Model FLOPs utilization of the PPO/EBPO train step on one GPU (issue 4's goal: >= 40% in bf16
for a ~1B model): a Llama-style model from the flags, random tokens that are all response
(so the output layer covers every position), ``PolicyTrainer`` with the given implementation
and precision, ``--steps`` timed steps after one warm-up step.

MFU = the trainer's ``perf/mfu``: 6·N·tokens (forward + backward, N = parameters, attention
FLOPs not counted) plus 2·N·tokens per extra forward pass, over step time × ``--peak-tflops``.
H100 / H200 SXM dense bf16 peak: 989 TFLOP/s. On a machine without CUDA the same code runs on
the CPU (useful only to check the script with small flags).

    python bench/mfu.py                                   # ~1.2B, local spec, bf16
    python bench/mfu.py --impl transformer_engine --precision fp8   # needs the gpu extra
"""

from __future__ import annotations

import argparse
import statistics

import torch

from ebpo_megatron.models import ModelConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--ffn", type=int, default=5632)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq", type=int, default=2048, help="tokens per sequence")
    parser.add_argument("--batch", type=int, default=16, help="sequences per step")
    parser.add_argument("--micro", type=int, default=2, help="sequences per micro-batch")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--impl", choices=["local", "transformer_engine"], default="local")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp8"], default="bf16")
    parser.add_argument("--recompute", choices=["none", "selective", "full"], default="none")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="per device, dense, this precision")
    args = parser.parse_args()

    from ebpo_megatron.models import build_policy
    from ebpo_megatron.parallel import ParallelConfig, cpu_compat, initialize, launch_info, shutdown
    from ebpo_megatron.trainer.batching import PolicyBatch
    from ebpo_megatron.config.training import LossConfig, OptimConfig, StepConfig
    from ebpo_megatron.trainer.policy_trainer import PolicyTrainer

    cfg = ModelConfig(num_layers=args.layers, hidden_size=args.hidden, ffn_hidden_size=args.ffn,
                      num_attention_heads=args.heads, num_kv_heads=args.kv_heads, vocab_size=args.vocab,
                      max_position_embeddings=args.seq, transformer_impl=args.impl,
                      precision=args.precision, recompute=args.recompute)
    initialize(ParallelConfig(), cfg, launch_info())
    try:
        cpu_compat.set_seed(0)
        trainer = PolicyTrainer(build_policy(cfg, ParallelConfig()), OptimConfig(lr=1e-5), LossConfig(kl_coef=0.0),
                                StepConfig(micro_batch_size=args.micro, step_kl=False, peak_tflops=args.peak_tflops))
        g = torch.Generator().manual_seed(0)  # the batch in host memory, as the RL loop has it
        tokens = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
        batch = PolicyBatch(tokens, torch.full((args.batch,), args.seq), torch.ones(args.batch, args.seq - 1),
                            torch.randn(args.batch, generator=g),
                            old_logp=torch.full((args.batch, args.seq - 1), -10.0))
        trainer.train_step(batch)  # warm-up
        steps = [trainer.train_step(batch) for _ in range(args.steps)]
        name = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
        mem = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
        print(f"{name}: {trainer.num_params / 1e9:.2f}B parameters, {args.impl} {args.precision}, "
              f"recompute {args.recompute}, {args.batch} x {args.seq} tokens, micro-batch {args.micro}, "
              f"peak {args.peak_tflops:.0f} TFLOP/s, {args.steps} steps (median)")
        for key in ("perf/train_step_s", "perf/tokens_per_s", "perf/tflops", "perf/mfu"):
            print(f"{key:20s} {statistics.median(s[key] for s in steps):12.4f}")
        print(f"{'max GPU memory GiB':20s} {mem:12.1f}")
    finally:
        shutdown()


if __name__ == "__main__":
    main()
