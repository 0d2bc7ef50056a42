"""Packing rollouts into target-aligned training tensors."""

import torch

from ebpo_megatron.trainer.rollout_batch import build_policy_batch


def test_masks_and_logprobs_are_target_aligned():
    prompts = [[5, 6, 7], [8, 9]]
    responses = [[10, 11], [12, 13, 14]]
    logps = [[-0.1, -0.2], [-0.3, -0.4, -0.5]]
    batch = build_policy_batch(prompts, responses, logps, torch.tensor([1.0, -1.0]), pad_token_id=0)
    assert batch.tokens.tolist() == [[5, 6, 7, 10, 11], [8, 9, 12, 13, 14]]
    assert batch.lengths.tolist() == [5, 5]
    for b, (p, r) in enumerate(zip(prompts, responses)):
        targets = batch.tokens[b, 1:]
        predicted = targets[batch.loss_mask[b] == 1].tolist()
        assert predicted == r  # exactly the response tokens are trained
        assert torch.allclose(batch.rollout_logp[b][batch.loss_mask[b] == 1], torch.tensor(logps[b]))


def test_padding_rows_have_no_loss():
    batch = build_policy_batch([[1, 2], [3, 4, 5, 6]], [[7], []], [[-1.0], []], torch.zeros(2), pad_token_id=99)
    assert batch.tokens[0].tolist() == [1, 2, 7, 99]
    assert batch.loss_mask[1].sum() == 0 and batch.loss_mask[0].tolist() == [0, 1, 0]
