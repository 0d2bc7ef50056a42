"""Speed of the vectorized EBPO estimator vs straightforward per-group Python loops.

1M responses in groups of 4 (250k prompts), shuffled so groups are not contiguous. Two loop
references, both computing the same advantages (checked):
- "tensor loop": the common way RL frameworks write group baselines (e.g. verl's
  ``compute_grpo_outcome_advantage``): collect each response's reward tensor into a dict keyed
  by its prompt id, then per group ``torch.mean`` / ``torch.std`` over the stacked tensors;
- "float loop": the same algorithm on plain Python floats and lists (the fastest pure-Python form).
Prints the times and the ratios (goal of the foundation issue: >= 100x against a per-group loop).
"""

from __future__ import annotations

import argparse
import math
import time
from collections import defaultdict

import torch

from ebpo_megatron.algorithms import EBPOPrior, compute_advantages


def ebpo_loop(rewards: list[float], group_ids: list[int], eps: float = 1e-6) -> list[float]:
    """docs/algorithms.md's EBPO step by step with dicts and Python loops (fresh prior, one step, batch norm)."""
    groups: dict[int, list[int]] = defaultdict(list)
    for i, g in enumerate(group_ids):
        groups[g].append(i)
    n = len(rewards)
    mu_glob = sum(rewards) / n
    sigma2 = sum((r - mu_glob) ** 2 for r in rewards) / (n - 1)
    means = {g: sum(rewards[i] for i in idx) / len(idx) for g, idx in groups.items()}
    mean_of_means = sum(means.values()) / len(means)
    tau2 = sum((m - mean_of_means) ** 2 for m in means.values()) / (len(means) - 1)
    raw = [0.0] * n
    for g, idx in groups.items():
        noise = sigma2 / len(idx)
        shrink = noise / (noise + tau2) if noise + tau2 > 0 else 0.0
        baseline = (1 - shrink) * means[g] + shrink * mu_glob
        for i in idx:
            raw[i] = rewards[i] - baseline
    mean_a = sum(raw) / n
    std_a = math.sqrt(sum((a - mean_a) ** 2 for a in raw) / (n - 1))
    return [(a - mean_a) / (std_a + eps) for a in raw]


def ebpo_tensor_loop(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """docs/algorithms.md's EBPO step by step, written the way per-group baselines usually are in RL code."""
    id2score: dict[int, list[torch.Tensor]] = defaultdict(list)
    for i in range(len(rewards)):
        id2score[int(group_ids[i])].append(rewards[i])
    means = {g: torch.mean(torch.stack(scores).double()) for g, scores in id2score.items()}
    mu_glob = rewards.double().mean()
    sigma2 = rewards.double().var()
    tau2 = torch.stack(list(means.values())).var()
    raw = torch.zeros(len(rewards), dtype=torch.float64)
    baseline = {}
    for g, scores in id2score.items():
        noise = sigma2 / len(scores)
        shrink = noise / (noise + tau2) if noise + tau2 > 0 else torch.zeros(())
        baseline[g] = (1 - shrink) * means[g] + shrink * mu_glob
    for i in range(len(rewards)):
        raw[i] = rewards[i] - baseline[int(group_ids[i])]
    return (raw - raw.mean()) / (raw.std() + eps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--responses", type=int, default=1_000_000)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5, help="vectorized runs; the best counts")
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    prompts = args.responses // args.group_size
    group_ids = torch.arange(prompts).repeat_interleave(args.group_size)
    group_ids = group_ids[torch.randperm(group_ids.numel(), generator=gen)]
    rewards = torch.bernoulli(torch.full((group_ids.numel(),), 0.3), generator=gen)

    t_vec = float("inf")
    for _ in range(args.repeats):  # best of several: the first call also pays warm-up
        start = time.perf_counter()
        vectorized, _ = compute_advantages("ebpo", rewards, group_ids, prior=EBPOPrior())
        t_vec = min(t_vec, time.perf_counter() - start)

    start = time.perf_counter()
    looped = ebpo_loop(rewards.tolist(), group_ids.tolist())
    t_loop = time.perf_counter() - start
    start = time.perf_counter()
    tensor_looped = ebpo_tensor_loop(rewards, group_ids)
    t_tensor = time.perf_counter() - start

    diff_float = float((vectorized.double() - torch.tensor(looped, dtype=torch.float64)).abs().max())
    diff_tensor = float((vectorized.double() - tensor_looped).abs().max())
    print(f"responses: {rewards.numel():,} in groups of {args.group_size} (shuffled)")
    print(f"vectorized ebpo     : {t_vec * 1e3:9.1f} ms (best of {args.repeats})")
    print(f"tensor loop (verl-style dict of per-group tensors): {t_tensor * 1e3:9.1f} ms  "
          f"-> {t_tensor / t_vec:6.1f}x   (max |diff| {diff_tensor:.2e})")
    print(f"float loop (plain Python lists)                   : {t_loop * 1e3:9.1f} ms  "
          f"-> {t_loop / t_vec:6.1f}x   (max |diff| {diff_float:.2e})")


if __name__ == "__main__":
    main()
