"""Build the run's :class:`Task` from the config: the embedded arithmetic task (tokenizer
trained in the run directory on first use), chat-template arithmetic for an instruction-tuned
model, or math problems from jsonl/parquet files."""

from __future__ import annotations

from pathlib import Path

from ..config.schema import Config
from ..rewards.checker_pool import OVER_BUDGET
from ..rewards.safe import SafeReward
from .arithmetic import make_split, score_response
from .difficulty import load_pass_rates, with_pass_rates
from .sp_tokenizer import MODEL_FILE, SentencePieceTokenizer, train_tokenizer
from .task import Task, TaskPrompt


def build_synthetic_task(config: Config, run_dir: Path) -> Task:
    syn = config.data.synthetic
    train, held_out = make_split(syn.levels, syn.num_train, syn.num_eval, config.run.seed)
    tok_dir = run_dir / "tokenizer"
    if (tok_dir / MODEL_FILE).is_file():
        tokenizer = SentencePieceTokenizer(tok_dir / MODEL_FILE)
    else:
        tokenizer = train_tokenizer([p.prompt + p.answer for p in train], tok_dir, syn.tokenizer_vocab)
    if tokenizer.vocab_size > config.model.vocab_size:
        raise ValueError(
            f"model.vocab_size {config.model.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size} "
            f"({tok_dir / MODEL_FILE})"
        )

    def prompts(problems):
        return [TaskPrompt(p.uid, tuple([tokenizer.bos_id] + tokenizer.encode(p.prompt)), p.answer,
                           p.topic, p.difficulty) for p in problems]

    sft_levels = set(syn.sft_levels or syn.levels)
    sft = [([tokenizer.bos_id] + tokenizer.encode(p.prompt), tokenizer.encode(p.answer) + [tokenizer.eos_id])
           for p in train if p.level in sft_levels]
    return Task(train=prompts(train), held_out=prompts(held_out), tokenizer=tokenizer,
                reward=SafeReward(score_response), stop_token_ids=(tokenizer.eos_id,), sft_pairs=sft,
                voted_answer=lambda response: response.strip() or None)  # the reward compares the text


class HFTokenizer:
    """The :class:`TextTokenizer` view of a Hugging Face tokenizer."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        if tokenizer.eos_token_id is None:
            raise ValueError(f"data.tokenizer_dir: tokenizer {tokenizer.name_or_path} has no eos token")
        self.eos_id = int(tokenizer.eos_token_id)
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
        self.vocab_size = len(tokenizer)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode([i for i in ids if 0 <= i < self.vocab_size], skip_special_tokens=True)


def _math_reward(reward):
    """(responses, answers) -> (scores, counts) with the math reward's errors, timeouts and checks
    cut by the batch budget counted."""
    def score(responses: list[str], answers: list[str]) -> tuple[list[float], dict[str, float]]:
        results = reward.score_batch(responses, answers)
        timeouts = sum(r.error == "timeout" for r in results)
        over_budget = sum(r.error == OVER_BUDGET for r in results)
        errors = sum(r.error not in (None, "timeout", OVER_BUDGET) for r in results)
        return [r.score for r in results], {"reward/errors": float(errors), "reward/timeouts": float(timeouts),
                                           "reward/over_budget": float(over_budget),
                                           "reward/boxed_frac": sum(r.boxed for r in results) / max(len(results), 1)}
    return score


def build_math_task(config: Config) -> Task:
    """Math problems from jsonl/parquet (verl, DAPO-Math-17K or plain rows), rendered with the
    tokenizer's chat template; prompts over ``data.max_prompt_tokens`` are dropped and counted."""
    import zlib

    from ..rewards.math import MathReward, MathRewardConfig, MathVerifyEquivalence
    from .math_datasets import load_math_dataset
    from .math_prompts import ChatPromptRenderer

    data = config.data
    if not data.tokenizer_dir:
        raise ValueError("data.tokenizer_dir: task 'math' needs a local Hugging Face tokenizer directory")
    renderer = ChatPromptRenderer(data.tokenizer_dir, max_prompt_tokens=data.max_prompt_tokens)
    tokenizer = HFTokenizer(renderer.tokenizer)
    if tokenizer.vocab_size > config.model.vocab_size:
        raise ValueError(f"model.vocab_size {config.model.vocab_size} is smaller than the tokenizer's "
                         f"{tokenizer.vocab_size} ({data.tokenizer_dir}): wrong tokenizer for this model?")

    def prompts(files: list[str], field: str) -> list[TaskPrompt]:
        examples = [e for f in files for e in load_math_dataset(f)]
        kept, dropped = renderer.render_all(examples)
        if not kept:
            raise ValueError(f"data.{field}: no usable prompt ({len(examples)} rows, {dropped} longer than "
                             f"data.max_prompt_tokens = {data.max_prompt_tokens})")
        if dropped:
            print(f"[data] {field}: dropped {dropped} of {len(examples)} prompts longer than "
                  f"{data.max_prompt_tokens} tokens", flush=True)
        return [TaskPrompt(zlib.crc32(p.example.uid.encode()), p.token_ids, p.example.answer,
                           p.example.topic or "unknown",
                           0.5 if p.example.difficulty is None else p.example.difficulty) for p in kept]

    train = prompts(data.train_files, "train_files")
    held_out = prompts(data.eval_files, "eval_files") if data.eval_files else train[: min(64, len(train))]
    reward = MathReward(MathRewardConfig())
    return Task(train=train, held_out=held_out, tokenizer=tokenizer, reward=_math_reward(reward),
                stop_token_ids=(tokenizer.eos_id,), answer_equivalence=MathVerifyEquivalence(reward))


def build_chat_arith_task(config: Config) -> Task:
    """Generated arithmetic questions in the tokenizer's chat template (data/chat_arithmetic.py):
    the reward of ``data.chat_arith.reward``; strict (boxed) and lenient accuracy both evaluated;
    warm-start pairs (prompt, ``worked_answer`` + end of turn) from the training problems of
    ``data.chat_arith.sft_levels``."""
    from . import chat_arithmetic as ca
    from .math_prompts import load_tokenizer

    data, cfg = config.data, config.data.chat_arith
    tokenizer = HFTokenizer(load_tokenizer(data.tokenizer_dir))
    if tokenizer.vocab_size > config.model.vocab_size:
        raise ValueError(f"model.vocab_size {config.model.vocab_size} is smaller than the tokenizer's "
                         f"{tokenizer.vocab_size} ({data.tokenizer_dir}): wrong tokenizer for this model?")
    train, held_out = ca.make_split(cfg.levels, cfg.num_train, cfg.num_eval, config.run.seed)

    def prompts(problems: list[ca.ChatArithProblem]) -> list[TaskPrompt]:
        ids = ca.render_prompts(problems, tokenizer.tokenizer, cfg.instruction)
        longest = max(len(i) for i in ids)
        if longest > data.max_prompt_tokens:
            raise ValueError(f"data.max_prompt_tokens {data.max_prompt_tokens}: chat_arith prompts take "
                             f"up to {longest} tokens")
        return [TaskPrompt(p.uid, i, p.answer, p.topic, p.difficulty) for p, i in zip(problems, ids)]

    train_prompts = prompts(train)
    # warm start (sft.steps > 0): training prompts of the sft levels -> "7 + 5 = \\boxed{12}" + end of turn
    sft_levels = set(cfg.sft_levels or cfg.levels)
    sft = [(list(prompt.token_ids), tokenizer.encode(ca.worked_answer(problem)) + [tokenizer.eos_id])
           for problem, prompt in zip(train, train_prompts) if problem.level in sft_levels]
    strict, lenient = ca.make_reward(0.0, require_box=True), ca.make_reward(0.0)
    reward = strict if cfg.reward == "boxed" else ca.make_reward(cfg.format_reward)  # boxed: format_reward = 0
    return Task(train=train_prompts, held_out=prompts(held_out), tokenizer=tokenizer,
                reward=_math_reward(reward), stop_token_ids=(tokenizer.eos_id,), sft_pairs=sft,
                eval_rewards={"strict": _math_reward(strict), "lenient": _math_reward(lenient)},
                summary_metrics={"boxed_acc": "eval/strict_pass@1", "lenient_acc": "eval/lenient_pass@1"})


def build_task(config: Config, run_dir: Path) -> Task:
    """The task of ``data.task``; with ``data.difficulty_file`` its training prompts carry their
    measured pass rates as difficulty."""
    if config.data.task == "synthetic":
        task = build_synthetic_task(config, run_dir)
    elif config.data.task == "chat_arith":
        task = build_chat_arith_task(config)
    else:
        task = build_math_task(config)
    if config.data.difficulty_file:
        source = Path(config.data.difficulty_file)
        task.train = with_pass_rates(task.train, load_pass_rates(source), source)
    return task
