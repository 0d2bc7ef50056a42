"""The whole RL step (rollout P prompts x G, reward, advantages, train step: ``RLLoop.run_step``)
for the CPU recipes side by side in one process, taking turns over ``--rounds``:

    fp32 + native   model.precision fp32, pi_old = the rollout's log-probs, one row per response
                    (no shared prompts), on SmolLM2 micro-batches of 8 as then: the issue's "today"
    bf16 + native   model.precision bf16, pi_old recomputed, truncated IS on (tis_cap auto), the G
                    responses to a prompt in one row (share_prompts auto), rollout.engine native
    bf16 + vLLM     the same with rollout.engine vllm (only where vllm imports: .venv-vllm),
                    weights synced every step, without the sync probe (rollout.vllm.sync_check);
                    with vLLM's torch.compile graphs (rollout.vllm.enforce_eager=false, about 80 s
                    more start-up) by default, or eager with ``--vllm-eager``:
                    examples/smollm2_arith_cpu.yaml's recipe

plus Hugging Face fp32 ``generate`` of the same P x G x N tokens and an HF fp32 train step
(bench/train_step.py's) on a batch of the same shape (on SmolLM2 in micro-batches of 8, as the
fp32 recipe), the baselines of the issue's goals. Every
recipe starts from the same weights; responses never stop early (no stop tokens), so each
rollout samples exactly P x G x N tokens. Default model: SmolLM2-135M-Instruct at
runs/smollm2/hf (`make real` fetches it) on the chat arithmetic task; ``--tiny``, or without
that directory, the random tiny model of examples/tiny_cpu.yaml on the embedded task (seconds).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ebpo_megatron.omp_env import apply_omp_defaults  # noqa: E402

apply_omp_defaults()  # as ebpo-train does, before torch loads OpenMP

import torch  # noqa: E402

from bench_model import alternate, hf_model, load_hf_weights, medians_and_ratio  # noqa: E402
from train_step import hf_step, make_batch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2 = ROOT / "runs/smollm2/hf"
ISSUE_MICRO_BATCH = 8  # examples/smollm2_arith_cpu.yaml's micro_batch_size when the issue was filed


def recipes(args: argparse.Namespace, with_vllm: bool) -> dict[str, list[str]]:
    """Each recipe's overrides of the example config (the module docstring's table); the vLLM
    recipe only ``with_vllm``."""
    fp32 = ["model.precision=fp32", "train.step.old_logp=rollout", "train.step.share_prompts=false",
            "rollout.engine=native"]
    if args.hf is not None:  # the baseline keeps the example's micro-batches from when the issue was filed
        fp32.append(f"train.step.micro_batch_size={ISSUE_MICRO_BATCH}")
    bf16 = ["model.precision=bf16", "train.step.old_logp=recompute"]
    chosen = {"fp32 + native": fp32, "bf16 + native": bf16 + ["rollout.engine=native"]}
    if with_vllm:
        chosen["bf16 + vLLM"] = bf16 + ["rollout.engine=vllm",
                                        f"rollout.vllm.enforce_eager={str(args.vllm_eager).lower()}"]
    return chosen


def base_overrides(args: argparse.Namespace, out: Path) -> tuple[Path, list[str]]:
    """The example config and the overrides shared by every recipe."""
    shared = [f"run.output_dir={out}", "run.wandb=disabled", f"run.torch_threads={args.threads}",
              f"data.prompts_per_step={args.prompts}", f"rollout.n={args.n}", f"rollout.max_new_tokens={args.new}",
              "rollout.vllm.sync_check=false"]
    if args.hf is None:
        return ROOT / "examples/tiny_cpu.yaml", shared + [
            "data.synthetic.num_train=200", "data.synthetic.num_eval=8",
            f"model.max_position_embeddings={32 + args.new}"]
    return ROOT / "examples/smollm2_arith_cpu.yaml", shared + [
        "model.checkpoint=null", f"data.tokenizer_dir={args.hf}", "data.chat_arith.num_train=200",
        "data.chat_arith.num_eval=8"]


def recipe_loop(name: str, overrides: list[str], config_file: Path, shared: list[str], task,
                load_weights: Callable):
    """An RLLoop for one recipe (as trainer/run.py assembles it, no warm start or checkpoints)."""
    from ebpo_megatron.config.schema import load_config
    from ebpo_megatron.data.sampler import CurriculumSampler
    from ebpo_megatron.models import build_policy
    from ebpo_megatron.rollout.factory import build_engine
    from ebpo_megatron.trainer.policy_trainer import PolicyTrainer
    from ebpo_megatron.trainer.rl_loop import RLLoop

    config = load_config(config_file, shared + overrides + [f"run.name={name.replace(' ', '')}"])
    chunks = build_policy(config.model, config.parallel)
    load_weights(chunks)
    ref = None
    if config.algorithm.loss.kl_coef > 0:
        ref = build_policy(config.model, config.parallel)
        load_weights(ref)
    trainer = PolicyTrainer(chunks, config.train.optim, config.algorithm.loss, config.train.step, ref)
    engine = build_engine(config, chunks[0], task.tokenizer.pad_id)
    sampler = CurriculumSampler(task.train, config.data.order, config.data.prompts_per_step, config.run.seed)
    loop = RLLoop(config, task, trainer, engine, sampler, logger=None)
    loop.sync_weights()  # as RLLoop.run does before the first step; every step ends with one
    return loop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hf", type=Path, default=SMOLLM2 if (SMOLLM2 / "config.json").is_file() else None,
                        help="HF checkpoint directory (default: runs/smollm2/hf when present)")
    parser.add_argument("--tiny", action="store_true", help="the random tiny model of examples/tiny_cpu.yaml")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--n", type=int, default=4, help="G, responses per prompt")
    parser.add_argument("--new", type=int, default=32, help="new tokens per response")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of one step per side (after one warm-up)")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--vllm-eager", action="store_true",
                        help="the vLLM recipe without torch.compile (rollout.vllm.enforce_eager=true)")
    args = parser.parse_args()
    if args.tiny:
        args.hf = None
    torch.set_num_threads(args.threads)

    from ebpo_megatron.config.schema import load_config
    from ebpo_megatron.models import build_policy
    from ebpo_megatron.models.weights import assign_full_weights, full_weights
    from ebpo_megatron.parallel import cpu_compat, initialize, launch_info, shutdown
    from ebpo_megatron.data.tasks import build_task
    from ebpo_megatron.host_memory import apply_host_memory_reuse

    try:
        import vllm  # noqa: F401
        with_vllm = True
    except ImportError:
        with_vllm = False
    chosen = recipes(args, with_vllm)
    out = Path(tempfile.mkdtemp(prefix="rl_step_"))
    config_file, shared = base_overrides(args, out)
    base = load_config(config_file, shared)
    apply_host_memory_reuse(base.run.host_memory_reuse)  # as ebpo-train does
    initialize(base.parallel, base.model, launch_info())
    loops = {}
    try:
        task = dataclasses.replace(build_task(base, out), stop_token_ids=())  # every response: --new tokens
        cpu_compat.set_seed(0)
        initial = full_weights(build_policy(base.model, base.parallel)) if args.hf is None else None

        def load_weights(chunks: list[torch.nn.Module]) -> None:
            if initial is None:
                load_hf_weights(chunks, base.model, args.hf)
            else:
                assign_full_weights(chunks, initial.__getitem__)

        loops = {name: recipe_loop(name, overrides, config_file, shared, task, load_weights)
                 for name, overrides in chosen.items()}
        metrics: dict[str, list[dict[str, float]]] = {name: [] for name in loops}
        sides = {name: (lambda name=name: metrics[name].append(loops[name].run_step())) for name in loops}
        hf = hf_model(base.model, args.hf).eval()
        prompt_len = min(len(p.token_ids) for p in task.train[:args.prompts])
        ids = torch.tensor([list(p.token_ids[-prompt_len:]) for p in task.train[:args.prompts]])
        sides["HF generate fp32"] = torch.no_grad()(lambda: hf.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new, min_new_tokens=args.new,
            do_sample=True, temperature=1.0, top_k=0, top_p=1.0, num_return_sequences=args.n,
            pad_token_id=task.tokenizer.pad_id))
        train_batch = make_batch(base.model.vocab_size, args.prompts * args.n, prompt_len, args.new)
        fp32_step = loops["fp32 + native"].config.train.step  # the HF step runs the fp32 recipe's micro-batches
        sides["HF train step fp32"] = hf_step(base.model, args.hf, train_batch, fp32_step.micro_batch_size)
        times = alternate(sides, args.rounds)
    finally:
        for loop in loops.values():  # vLLM before the process group it uses
            if hasattr(loop.engine, "close"):
                loop.engine.close()
        shutdown()
        shutil.rmtree(out, ignore_errors=True)
    for name, rows in metrics.items():
        del rows[0]  # the warm-up call's
    report(args, prompt_len, times, metrics)


def report(args: argparse.Namespace, prompt_len: int, times: dict[str, list[float]],
           metrics: dict[str, list[dict[str, float]]]) -> None:
    """Median seconds per recipe (step, rollout, train step) and each bf16 recipe's ratios for
    the issue's goals (``prompt_len``: the HF sides' prompt length, the shortest of the recipes' first prompts)."""
    def part(name: str, key: str) -> list[float]:
        return [row[key] for row in metrics[name]]

    model = str(args.hf) if args.hf else "tiny random model (examples/tiny_cpu.yaml)"
    tokens = args.prompts * args.n * args.new
    print(f"{model}: {args.prompts} prompts x G={args.n}, {args.new} new tokens ({tokens} sampled per step), "
          f"HF sides with {prompt_len}-token prompts, {args.threads} threads, {args.rounds} rounds "
          f"(median; ratio: per round min-max); vLLM {'eager' if args.vllm_eager else 'compiled'}; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"{'recipe':<16}{'step s':>9}{'rollout s':>11}{'train s':>9}   step time / fp32 + native")
    baseline = times["fp32 + native"]
    for name in metrics:
        _, _, ratio = medians_and_ratio({"ours": baseline, "hf": times[name]})
        print(f"{name:<16}{statistics.median(times[name]):9.2f}{statistics.median(part(name, 'perf/rollout_s')):11.2f}"
              f"{statistics.median(part(name, 'perf/train_step_s')):9.2f}   {ratio}")
    for name in ("HF generate fp32", "HF train step fp32"):
        print(f"{name:<20} {statistics.median(times[name]):7.2f} s")
    goals = (("step / fp32 + native (goal <= 0.4x)", lambda name: (times[name], baseline)),
             ("HF generate fp32 / rollout (goal >= 3x)",
              lambda name: (times["HF generate fp32"], part(name, "perf/rollout_s"))),
             ("HF train step fp32 / train step (goal >= 2x)",
              lambda name: (times["HF train step fp32"], part(name, "perf/train_step_s"))))
    print("goals of the issue, per recipe:")
    for label, sides in goals:
        print(f"  {label}")
        for name in metrics:
            if name != "fp32 + native":
                numerator, denominator = sides(name)
                print(f"    {name:<16}{medians_and_ratio({'hf': numerator, 'ours': denominator})[2]}")


if __name__ == "__main__":
    main()
