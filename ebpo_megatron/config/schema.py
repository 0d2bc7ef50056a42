"""The trainer's configuration: one typed dataclass per section, loaded from YAML.

    run        names, seeds, step counts, checkpoint and logging cadence
    model      architecture (``models.config.ModelConfig``)
    parallel   TP / PP / DP layout (``parallel.distributed.ParallelConfig``)
    data       the prompt stream: embedded synthetic task, chat arithmetic or math files, curriculum order
    rollout    engine and sampling (G = ``rollout.n``)
    algorithm  advantage estimator, DAPO sampling options, the PPO loss
    train      how a step's batch is used (epochs, mini/micro-batches), the optimizer
    sft        the supervised warm start (embedded default, chat_arith)

``load_config(path, overrides)`` validates everything before any model or process-group work.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from ..algorithms import estimator_options, list_estimators
from ..models.config import ModelConfig
from ..parallel.distributed import ParallelConfig
from .training import LossConfig, OptimConfig, StepConfig
from .aliases import FORMER_KEYS, OTHER_FRAMEWORK_NAMES
from .precision import resolve_precision
from .typed import ConfigError, apply_overrides, from_dict, load_yaml, to_dict


@dataclass
class RunConfig:
    name: str = "run"
    output_dir: str = "runs"
    seed: int = 1234
    steps: int = 100
    eval_every: int = 10
    save_every: int = 20
    keep_last: int = 2
    resume: bool = True
    # a checkpoint whose files fail their checksums on resume: resume from the newest older one
    # that verifies ("fallback") or stop with an error naming the damaged file ("stop")
    on_bad_checkpoint: Literal["fallback", "stop"] = "fallback"
    wandb: Literal["offline", "online", "disabled"] = "offline"
    wandb_project: str = "ebpo_megatron"
    tensorboard: bool = False
    torch_threads: int | None = None
    # large freed host blocks stay in the process for the next step instead of going back to the
    # kernel (no page faults on reuse; ebpo_megatron/host_memory.py): auto = where the trainer
    # computes on the CPU; true / false force it
    host_memory_reuse: bool | Literal["auto"] = "auto"
    # checkpoint choice: an evaluation metric (higher is better, e.g. "eval/maj@16"); the checkpoint
    # of its best evaluation is saved, never rotated out, and named in checkpoints/BEST
    best_metric: str | None = None

    def __post_init__(self) -> None:
        for key in ("steps", "eval_every", "save_every", "keep_last"):
            if getattr(self, key) < 1:
                raise ConfigError(f"run.{key}: expected >= 1, got {getattr(self, key)}")
        if self.best_metric is not None and not self.best_metric.startswith("eval/"):
            raise ConfigError(f"run.best_metric: expected an evaluation metric 'eval/...', got {self.best_metric!r}")

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


@dataclass
class SyntheticTaskConfig:
    num_train: int = 4000
    num_eval: int = 200
    levels: list[int] = field(default_factory=lambda: [0, 1, 2])
    tokenizer_vocab: int = 96
    # the levels whose training problems the supervised warm start (sft.steps > 0) answers;
    # empty = all of ``levels`` (RL then trains on every level)
    sft_levels: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not set(self.sft_levels) <= set(self.levels):
            raise ConfigError(f"data.synthetic.sft_levels: expected a subset of levels {self.levels}, "
                              f"got {self.sft_levels}")


# data.task chat_arith: the levels (data/chat_arithmetic.py makes their questions) and the default
# instruction appended to every question
LEVEL_TOPICS = {0: "single_digit_addition", 1: "times_table", 2: "two_digit_addition", 3: "three_term"}
DEFAULT_INSTRUCTION = "Put the final answer in \\boxed{}."


@dataclass
class ChatArithConfig:
    """``data.task: chat_arith`` (data/chat_arithmetic.py): chat-template arithmetic questions."""

    num_train: int = 2000
    num_eval: int = 200
    levels: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    instruction: str = DEFAULT_INSTRUCTION
    # "lenient": correct by the final answer (box, "the answer is", last number) + format_reward
    # when that correct answer is boxed; "boxed": 1 only for the correct answer in the last box
    reward: Literal["lenient", "boxed"] = "lenient"
    format_reward: float = 0.1
    # the levels whose training problems the supervised warm start (sft.steps > 0) answers with
    # "7 + 5 = \\boxed{12}"; empty = all of ``levels``
    sft_levels: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        for key in ("num_train", "num_eval"):
            if getattr(self, key) < 1:
                raise ConfigError(f"data.chat_arith.{key}: expected >= 1, got {getattr(self, key)}")
        if not self.levels or not set(self.levels) <= set(LEVEL_TOPICS):
            raise ConfigError(f"data.chat_arith.levels: expected a non-empty subset of {sorted(LEVEL_TOPICS)}, "
                              f"got {self.levels}")
        if not set(self.sft_levels) <= set(self.levels):
            raise ConfigError(f"data.chat_arith.sft_levels: expected a subset of levels {self.levels}, "
                              f"got {self.sft_levels}")
        if not 0.0 <= self.format_reward < 1.0:  # pass@1 counts reward >= 1 as correct
            raise ConfigError(f"data.chat_arith.format_reward: expected 0 <= value < 1, got {self.format_reward}")
        if self.reward == "boxed" and self.format_reward:
            raise ConfigError("data.chat_arith.format_reward: applies to reward 'lenient'; with reward "
                              f"'boxed' set it to 0 (got {self.format_reward})")


@dataclass
class DataConfig:
    task: Literal["synthetic", "math", "chat_arith"] = "synthetic"
    train_files: list[str] = field(default_factory=list)
    eval_files: list[str] = field(default_factory=list)
    tokenizer_dir: str | None = None
    order: Literal["random", "topic", "difficulty"] = "random"
    # measured pass rates {"uid": rate} (tools/estimate_difficulty.py) that replace the training
    # prompts' nominal difficulty: the paper's ebpo-diff order
    difficulty_file: str | None = None
    prompts_per_step: int = 16
    max_prompt_tokens: int = 256
    synthetic: SyntheticTaskConfig = field(default_factory=SyntheticTaskConfig)
    chat_arith: ChatArithConfig = field(default_factory=ChatArithConfig)

    def __post_init__(self) -> None:
        if self.prompts_per_step < 1:
            raise ConfigError(f"data.prompts_per_step: expected >= 1, got {self.prompts_per_step}")
        if self.task == "math" and not self.train_files:
            raise ConfigError("data.train_files: task 'math' needs at least one jsonl/parquet file")
        if self.task == "chat_arith" and not self.tokenizer_dir:
            raise ConfigError("data.tokenizer_dir: task 'chat_arith' needs a local Hugging Face tokenizer directory")


@dataclass
class VLLMConfig:
    tensor_parallel: int = 1
    gpu_memory_utilization: float = 0.5
    sync_bucket_mb: int = 512
    # None: eager on CPU (torch.compile adds ~80 s to vLLM's start-up there for SmolLM2-135M),
    # CUDA graphs on GPUs; false on CPU: compiled, rollouts ~20-30% faster (the SmolLM2 example's)
    enforce_eager: bool | None = None
    # after every sync, vLLM's log-probs of a fixed probe sequence must match the trainer's
    # (rollout/sync_check.py): an engine computing with other weights is an error, not garbage
    sync_check: bool = True
    # KV-cache block size in tokens; None: 32 on CPU (faster than vLLM's 128 for short RL
    # sequences, rollout/vllm_setup.py), vLLM's default on GPUs
    block_size: int | None = None


@dataclass
class RolloutConfig:
    engine: Literal["native", "vllm"] = "native"
    n: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 32
    eval_temperature: float = 0.0
    eval_samples: int = 1  # k samples per held-out prompt: pass@1 (mean), and with k > 1 pass@k
    eval_maj: int = 16  # with eval_samples > 1: maj@m and pass@m, m = min(eval_maj, eval_samples)
    max_batch_size: int = 256
    vllm: VLLMConfig = field(default_factory=VLLMConfig)

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ConfigError(f"rollout.n: expected >= 1 responses per prompt, got {self.n}")
        if self.eval_samples < 1 or self.eval_maj < 1:
            raise ConfigError(f"rollout.eval_samples and rollout.eval_maj: expected >= 1, got "
                              f"{self.eval_samples} and {self.eval_maj}")


@dataclass
class OverlongConfig:
    enabled: bool = False
    buffer_length: int = 4
    penalty_factor: float = 1.0


@dataclass
class RunLossConfig(LossConfig):
    """``algorithm.loss``: the trainer's LossConfig, with truncated importance sampling ``auto``
    by default (resolved at load: cap 2.0 in bf16 when π_old is recomputed, else off;
    config/precision.py)."""

    tis_cap: float | Literal["auto"] | None = "auto"


@dataclass
class AlgorithmConfig:
    estimator: str = "ebpo"
    # the chosen estimator's options, e.g. {eps: 1e-6, batch_normalize: true, tau2: raw} for ebpo:
    # the keyword parameters of its registered function (algorithms.estimator_options), checked
    # against their annotations at load and completed with the signature's defaults, so the
    # resolved config records every option the run used; compute_advantages gets exactly these
    options: dict[str, Any] = field(default_factory=dict)
    dynamic_sampling: bool = False
    max_sampling_rounds: int = 4
    overlong: OverlongConfig = field(default_factory=OverlongConfig)
    loss: RunLossConfig = field(default_factory=RunLossConfig)

    def __post_init__(self) -> None:
        if self.estimator not in list_estimators():
            raise ConfigError(
                f"algorithm.estimator: got {self.estimator!r}, expected one of {list_estimators()}"
            )
        self.options = _resolve_options(self.estimator, self.options)


def _resolve_options(estimator: str, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` checked against the signature of estimator ``estimator`` as if its options were
    a config section (unknown name, wrong type, missing required option: ConfigError naming
    ``algorithm.options.<key>`` and the estimator), plus the default of every option not given."""
    params = estimator_options(estimator)
    for key in (k for k in options if k not in params):
        owners = [other for other in list_estimators() if key in estimator_options(other)]
        if owners:  # options left from another estimator (algorithm.estimator=... on an ebpo config)
            raise ConfigError(f"algorithm.options.{key}: an option of estimator(s) {owners}, not of "
                              f"{estimator!r}, whose options are {list(params)}")
    section = dataclasses.make_dataclass(
        f"{estimator}_options",
        [(name, p.annotation) if p.default is p.empty else (name, p.annotation, field(default=p.default))
         for name, p in params.items()],
        kw_only=True,
    )
    try:
        resolved = from_dict(section, options, prefix="algorithm.options", root=Config)
    except ConfigError as err:
        raise ConfigError(f"{err} [options of estimator {estimator!r}]") from None
    return {name: getattr(resolved, name) for name in params}


@dataclass
class TrainConfig:
    step: StepConfig = field(default_factory=StepConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)


@dataclass
class SFTConfig:
    """Supervised warm start on the task's ``sft_pairs`` before RL (fresh runs only)."""

    steps: int = 0
    lr: float = 3e-3
    # linear warm-up over min(warmup_steps, steps), then constant lr (min_lr unset) or cosine
    # decay to min_lr
    warmup_steps: int = 0
    min_lr: float | None = None
    # stop once the mean training loss of the last 20 steps is at most this (nats per answer
    # token); ``steps`` is then the most it may take. None: always ``steps``
    target_loss: float | None = None
    batch_size: int = 64
    # evaluate the held-out set before the warm start too (summary.json "before_sft"), so that the
    # warm start's and RL's shares of the gain are reported apart
    eval_before: bool = False

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_size < 1 or self.lr <= 0:
            raise ConfigError(f"sft: expected steps >= 0, batch_size >= 1, lr > 0; got steps {self.steps}, "
                              f"batch_size {self.batch_size}, lr {self.lr}")
        if self.warmup_steps < 0:
            raise ConfigError(f"sft.warmup_steps: expected >= 0, got {self.warmup_steps}")
        if self.target_loss is not None and self.target_loss <= 0:
            raise ConfigError(f"sft.target_loss: expected > 0 (nats per answer token), got {self.target_loss}")
        if self.min_lr is not None and not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"sft.min_lr: expected 0 <= min_lr <= lr ({self.lr}), got {self.min_lr}")


@dataclass
class Config:
    KEY_ALIASES: ClassVar[dict[str, str]] = OTHER_FRAMEWORK_NAMES  # for "Did you mean" (config/aliases.py)
    MOVED_KEYS: ClassVar[dict[str, str]] = FORMER_KEYS  # a moved key -> its new place (config/aliases.py)
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)

    def __post_init__(self) -> None:
        if self.train.step.temperature != self.rollout.temperature:
            raise ConfigError(
                f"train.step.temperature ({self.train.step.temperature}) must equal rollout.temperature "
                f"({self.rollout.temperature}): the PPO ratio compares log-probs of the distribution "
                "that was sampled")


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read YAML ``path`` (None: all defaults), apply ``a.b=value`` overrides, validate, and
    resolve ``auto`` precision settings (``config.precision``)."""
    data = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            data = load_yaml(path.read_text()) or {}
        except Exception as err:
            raise ConfigError(f"{path}: not valid YAML ({err})") from err
    try:
        config = from_dict(Config, apply_overrides(data, overrides))
    except ConfigError as err:
        raise ConfigError(f"{path or 'config'}: {err}") from err
    return resolve_precision(config)


def dump_config(config: Config) -> str:
    """The resolved config as YAML text."""
    import yaml

    return yaml.safe_dump(to_dict(config), sort_keys=False)
