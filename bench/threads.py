"""Thread count and OpenMP wait policy on a busy CPU: the vectorized EBPO estimator on 1M
responses and the tiny model's train step (examples/tiny_cpu.yaml's shapes), each setting in its
own process (``OMP_WAIT_POLICY`` is read once, when torch's OpenMP runtime loads), the settings
taking turns over ``--rounds``; ``--compete`` adds one process spinning on a core for the run.
Prints the median milliseconds per setting.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def measure(repeats: int) -> dict[str, float]:
    """Median ms of the estimator and of the train step in this process (the child's job)."""
    import torch

    from ebpo_megatron.algorithms import EBPOPrior, compute_advantages
    from ebpo_megatron.models import ModelConfig
    from ebpo_megatron.parallel import ParallelConfig, initialize, launch_info, shutdown

    sys.path.insert(0, str(HERE))
    from train_step import make_batch, megatron_step

    gen = torch.Generator().manual_seed(0)
    group_ids = torch.arange(250_000).repeat_interleave(4)[torch.randperm(1_000_000, generator=gen)]
    rewards = torch.bernoulli(torch.full((1_000_000,), 0.3), generator=gen)
    cfg = ModelConfig(num_layers=2, hidden_size=128, ffn_hidden_size=256, num_attention_heads=4, num_kv_heads=2,
                      vocab_size=32, max_position_embeddings=32)
    initialize(ParallelConfig(), cfg, launch_info())
    try:
        jobs = {"estimator_ms": lambda: compute_advantages("ebpo", rewards, group_ids, prior=EBPOPrior()),
                "train_step_ms": megatron_step(cfg, None, make_batch(32, 128, 10, 5), micro=64)}
        out = {}
        for name, job in jobs.items():
            job()  # warm-up
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                job()
                times.append(1e3 * (time.perf_counter() - start))
            out[name] = statistics.median(times)
    finally:
        shutdown()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--policies", nargs="+", default=["unset", "PASSIVE", "ACTIVE"])
    parser.add_argument("--rounds", type=int, default=3, help="processes per setting, settings alternating")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls of each job per process (median)")
    parser.add_argument("--compete", action="store_true", help="one extra process spinning on a core")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.repeats)))
        return
    settings = list(itertools.product(args.threads, args.policies))
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if args.compete else None
    results: dict[tuple[int, str], list[dict[str, float]]] = {s: [] for s in settings}
    try:
        for round_index in range(args.rounds):
            for threads, policy in settings if round_index % 2 == 0 else reversed(settings):
                env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
                env.update(OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
                if policy != "unset":
                    env["OMP_WAIT_POLICY"] = policy
                done = subprocess.run([sys.executable, __file__, "--child", "--repeats", str(args.repeats)],
                                      env=env, capture_output=True, text=True, check=True)
                results[threads, policy].append(json.loads(done.stdout.strip().splitlines()[-1]))
    finally:
        if spinner is not None:
            spinner.kill()
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; "
          f"competing spinner: {'yes' if args.compete else 'no'}; {args.rounds} processes per setting (median)")
    print(f"{'threads':>7} {'OMP_WAIT_POLICY':>15} {'estimator 1M (ms)':>18} {'tiny train step (ms)':>21}")
    for threads, policy in settings:
        rows = results[threads, policy]
        est = statistics.median(r["estimator_ms"] for r in rows)
        step = statistics.median(r["train_step_ms"] for r in rows)
        print(f"{threads:>7} {policy:>15} {est:>18.0f} {step:>21.0f}")


if __name__ == "__main__":
    main()
