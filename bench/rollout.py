"""Rollout speed on CPU, in one run: tokens/s of the native engine (Megatron GPTModel + static
KV cache) vs Hugging Face `transformers` `generate` on the same model weights (exported with
``export_hf_weights``), same prompts and lengths, the two sides taking turns over ``--rounds``;
and the seconds of a full HF-named weight export of a ~100M-parameter model (TP = PP = 1: the
stream hands out views of the parameters), alone and with a copy of every tensor into a
receiver's buffers, as a weight sync does. ``--n 1`` (default): greedy, distinct prompts, the
token streams are compared; ``--n G``: the RL case, G samples per prompt at ``--temperature``
(HF: ``num_return_sequences=G``), both sides forced to the same length.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import torch

from bench_model import (add_model_args, alternate, bench_config, describe, hf_model, load_hf_weights,
                         medians_and_ratio)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=16, help="sequences (prompts x n)")
    parser.add_argument("--n", type=int, default=1, help="samples per prompt (1: greedy)")
    parser.add_argument("--temperature", type=float, default=0.7, help="with --n > 1")
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--rounds", type=int, default=5,
                        help="rounds of one generation on each side (after one warm-up round)")
    parser.add_argument("--skip-export", action="store_true", help="skip the 125M weight-export timing")
    add_model_args(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from ebpo_megatron.models import ModelConfig, build_policy
    from ebpo_megatron.models.hf_mapping import Layout
    from ebpo_megatron.parallel import ParallelConfig, cpu_compat, initialize, launch_info, shutdown
    from ebpo_megatron.rollout.base import SamplingParams
    from ebpo_megatron.rollout.native_engine import NativeEngine
    from ebpo_megatron.rollout.weight_export import export_hf_weights

    cfg = bench_config(args.hf, args.prompt + args.new)
    initialize(ParallelConfig(), cfg, launch_info())
    try:
        cpu_compat.set_seed(0)
        chunks = build_policy(cfg, ParallelConfig())
        if args.hf is not None:
            load_hf_weights(chunks, cfg, args.hf)
        model = chunks[0].eval()
        g = torch.Generator().manual_seed(0)
        if args.batch % args.n:
            parser.error(f"--batch {args.batch} is not a multiple of --n {args.n}")
        prompts = [torch.randint(3, cfg.vocab_size, (args.prompt,), generator=g).tolist()
                   for _ in range(args.batch // args.n)]
        engine = NativeEngine(model, pad_token_id=0, max_sequence_length=cfg.max_position_embeddings)
        temperature = 0.0 if args.n == 1 else args.temperature
        params = SamplingParams(n=args.n, temperature=temperature, max_new_tokens=args.new)
        hf = hf_model(cfg, args.hf).eval()
        if args.hf is None:
            hf.load_state_dict(dict(export_hf_weights([model], Layout.from_model_config(cfg))), strict=False)
        ids = torch.tensor(prompts)
        kwargs = dict(max_new_tokens=args.new, min_new_tokens=args.new, pad_token_id=0,
                      **(dict(do_sample=False) if args.n == 1 else
                         dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                              num_return_sequences=args.n)))
        outputs: dict[str, Any] = {}

        def ours() -> None:
            outputs["ours"] = engine.generate(prompts, params)

        @torch.no_grad()
        def theirs() -> None:
            outputs["hf"] = hf.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)

        times = alternate({"ours": ours, "hf": theirs}, args.rounds)
        tokens = args.batch * args.new
        check = ""
        if args.n == 1:
            same = sum(a == b for r, t in zip(outputs["ours"].response_ids, outputs["hf"][:, args.prompt:].tolist())
                       for a, b in zip(r, t))
            check = f", identical greedy tokens: {same}/{tokens}"
        t_ours, t_hf, ratio = medians_and_ratio(times, check)
        mode = "greedy" if args.n == 1 else f"{args.n} samples per prompt at T={temperature}"
        print(f"{describe(cfg, args.hf)}, batch {args.batch}, prompt {args.prompt}, {args.new} new tokens, "
              f"{mode}, {args.threads} threads, {args.rounds} rounds (median)")
        print(f"HF transformers generate : {tokens / t_hf:8.0f} tokens/s")
        print(f"native engine (Megatron) : {tokens / t_ours:8.0f} tokens/s")
        print(f"ratio (ours / HF)        : {ratio}")

        if args.skip_export:
            return
        big = ModelConfig(num_layers=12, hidden_size=768, ffn_hidden_size=2048, num_attention_heads=12,
                          num_kv_heads=4, vocab_size=32000, max_position_embeddings=512)
        cpu_compat.set_seed(0)
        chunks = build_policy(big, ParallelConfig())
        layout = Layout.from_model_config(big)
        count = sum(p.numel() for p in chunks[0].parameters())
        start = time.perf_counter()
        exported = sum(t.numel() for _, t in export_hf_weights(chunks, layout, bucket_mb=64))
        t_export = time.perf_counter() - start
        receiver = {name: torch.empty_like(t) for name, t in export_hf_weights(chunks, layout, bucket_mb=64)}
        start = time.perf_counter()
        for name, tensor in export_hf_weights(chunks, layout, bucket_mb=64):
            receiver[name].copy_(tensor)
        t_sync = time.perf_counter() - start
        print(f"weight export, {count / 1e6:.0f}M parameters ({exported / 1e6:.0f}M exported): {t_export:.3f} s; "
              f"with a copy of every tensor into a receiver's buffers: {t_sync:.3f} s")
    finally:
        shutdown()


if __name__ == "__main__":
    main()
