"""Names other RL frameworks give to keys of ours, for the config's "Did you mean" hints, and
keys of ours that have moved.

A user coming from verl, TRL, OpenRLHF or Megatron-LM who writes ``algorithm.group_size`` or
``num_generations`` is told ``rollout.n`` (``Config.KEY_ALIASES``; see ``typed.suggest_keys``).
Only names that mean one key of ours are listed; a misspelling or a key of ours placed in the
wrong section is found without a table. A config that still sets a moved key is told its new
place (``Config.MOVED_KEYS``; see ``typed.from_dict``).
"""

from __future__ import annotations

OTHER_FRAMEWORK_NAMES: dict[str, str] = {
    # responses per prompt (G)
    "group_size": "rollout.n",
    "num_generations": "rollout.n",  # TRL
    "n_samples_per_prompt": "rollout.n",  # OpenRLHF
    # lengths
    "max_response_length": "rollout.max_new_tokens",  # verl
    "max_completion_length": "rollout.max_new_tokens",  # TRL
    "generate_max_len": "rollout.max_new_tokens",  # OpenRLHF
    "max_prompt_length": "data.max_prompt_tokens",  # verl, TRL
    "prompt_max_len": "data.max_prompt_tokens",  # OpenRLHF
    # the algorithm and its loss
    "adv_estimator": "algorithm.estimator",  # verl
    "advantage_estimator": "algorithm.estimator",  # OpenRLHF
    "kl_loss_coef": "algorithm.loss.kl_coef",  # verl
    "init_kl_coef": "algorithm.loss.kl_coef",  # OpenRLHF
    "beta": "algorithm.loss.kl_coef",  # TRL
    "clip_ratio_low": "algorithm.loss.clip_low",  # verl
    "clip_ratio_high": "algorithm.loss.clip_high",  # verl
    "epsilon": "algorithm.loss.clip_low",  # TRL
    "epsilon_high": "algorithm.loss.clip_high",  # TRL
    "loss_agg_mode": "algorithm.loss.agg",  # verl
    # the train step and the run
    "num_iterations": "train.step.ppo_epochs",  # TRL
    "max_epochs": "train.step.ppo_epochs",  # OpenRLHF
    "ppo_micro_batch_size_per_gpu": "train.step.micro_batch_size",  # verl
    "micro_train_batch_size": "train.step.micro_batch_size",  # OpenRLHF
    "learning_rate": "train.optim.lr",  # TRL, HF Trainer (sft.learning_rate is pointed at sft.lr)
    "actor_learning_rate": "train.optim.lr",  # OpenRLHF
    "total_training_steps": "run.steps",  # verl
    "save_freq": "run.save_every",  # verl
    "test_freq": "run.eval_every",  # verl
    # layout
    "tensor_model_parallel_size": "parallel.tensor_parallel",  # Megatron-LM, verl
    "pipeline_model_parallel_size": "parallel.pipeline_parallel",  # Megatron-LM, verl
    "virtual_pipeline_model_parallel_size": "parallel.virtual_pipeline",  # Megatron-LM
}

FORMER_KEYS: dict[str, str] = {
    # the estimator's options: the keyword parameters of its registered function
    # (algorithms.estimator_options), checked against it at load
    "algorithm.eps": "algorithm.options.eps",
    "algorithm.batch_normalize": "algorithm.options.batch_normalize",
    "algorithm.tau2": "algorithm.options.tau2",
}
