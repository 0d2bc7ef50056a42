"""Full-vocabulary logits of Megatron policy chunks under any TP/PP layout (for tests)."""

from __future__ import annotations

import torch


def megatron_logits(chunks: list, tokens: torch.Tensor, vocab_size: int) -> torch.Tensor | None:
    """Logits [B, S, vocab_size] on the last pipeline stage (None elsewhere): a forward through
    Megatron's pipeline schedule, TP shards gathered, vocabulary padding cut."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    batch, seq = tokens.shape
    positions = torch.arange(seq).expand(batch, seq)
    with torch.no_grad():
        if parallel_state.get_pipeline_model_parallel_world_size() == 1:
            output = chunks[0](tokens, positions, None)
        else:
            chunks[0].config.variable_seq_lengths = True

            def step(it, model):
                return model(next(it), positions, None), lambda o: (o.sum() * 0, {"logits": o})

            collected = get_forward_backward_func()(forward_step_func=step, data_iterator=iter([tokens]),
                                                    model=chunks, num_microbatches=1, seq_length=seq,
                                                    micro_batch_size=batch, forward_only=True)
            output = collected[0]["logits"] if collected else None
    if output is None:
        return None
    return gather_from_tensor_model_parallel_region(output)[..., :vocab_size]
