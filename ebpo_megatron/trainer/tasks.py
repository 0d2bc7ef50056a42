"""Build the run's :class:`Task` from the config: the embedded arithmetic task (tokenizer
trained in the run directory on first use) or math problems from jsonl/parquet files."""

from __future__ import annotations

from pathlib import Path

from ..config.schema import Config
from ..data.arithmetic import make_split, score_response
from ..data.sp_tokenizer import MODEL_FILE, SentencePieceTokenizer, train_tokenizer
from ..rewards.safe import SafeReward
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

    sft = [([tokenizer.bos_id] + tokenizer.encode(p.prompt), tokenizer.encode(p.answer) + [tokenizer.eos_id])
           for p in train]
    return Task(train=prompts(train), held_out=prompts(held_out), tokenizer=tokenizer,
                reward=SafeReward(score_response), stop_token_ids=(tokenizer.eos_id,), sft_pairs=sft)


def build_task(config: Config, run_dir: Path) -> Task:
    if config.data.task == "synthetic":
        return build_synthetic_task(config, run_dir)
    raise ValueError("data.task 'math' is wired through ebpo-eval and the math examples; "
                     "the trainer's math task builder is not implemented yet")
