"""The RL trainer: batching, the Megatron train step, checkpoints, logging, the loop."""
