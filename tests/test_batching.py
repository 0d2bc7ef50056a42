"""Mini-/micro-batch cutting of a PolicyBatch (pure torch)."""

import pytest
import torch

from ebpo_megatron.trainer.batching import PolicyBatch, microbatch_indices, minibatch_slices


def make_batch(lengths):
    batch, width = len(lengths), max(lengths)
    tokens = torch.zeros(batch, width, dtype=torch.long)
    for b, n in enumerate(lengths):
        tokens[b, :n] = torch.arange(1, n + 1)
    mask = torch.zeros(batch, width - 1)
    for b, n in enumerate(lengths):
        mask[b, 2 : n - 1] = 1.0
    return PolicyBatch(tokens, torch.tensor(lengths), mask, torch.arange(batch, dtype=torch.float32))


def test_select_trims_padding_to_longest_row():
    batch = make_batch([5, 9, 3, 4])
    sub = batch.select(torch.tensor([0, 2, 3]))
    assert sub.tokens.shape == (3, 5) and sub.loss_mask.shape == (3, 4)
    assert sub.advantages.tolist() == [0.0, 2.0, 3.0]
    assert torch.equal(sub.tokens[0], torch.arange(1, 6))


def test_minibatch_slices_cover_all_rows_once():
    slices = minibatch_slices(10, 3)
    rows = [i for s in slices for i in range(10)[s]]
    assert rows == list(range(10)) and [s.stop - s.start for s in slices] == [3, 4, 3]
    with pytest.raises(ValueError, match="mini_batches"):
        minibatch_slices(2, 3)


def test_token_budget_packing_respects_budget_and_covers_rows():
    lengths = torch.tensor([7, 30, 12, 12, 3, 40, 8, 9])
    groups = microbatch_indices(lengths, max_tokens=40)
    seen = sorted(int(i) for g in groups for i in g)
    assert seen == list(range(len(lengths)))
    for g in groups:
        assert len(g) * int(lengths[g].max()) <= 40 or len(g) == 1
    fixed = microbatch_indices(lengths, micro_batch_size=3)
    assert [g.tolist() for g in fixed] == [[0, 1, 2], [3, 4, 5], [6, 7]]


def test_shape_mismatch_names_the_field():
    with pytest.raises(ValueError, match="loss_mask"):
        PolicyBatch(torch.zeros(2, 5, dtype=torch.long), torch.tensor([5, 5]), torch.zeros(2, 5), torch.zeros(2))


def test_to_moves_every_tensor_and_keeps_the_rest():
    batch = make_batch([5, 3])
    batch = batch.with_logps(old_logp=torch.zeros(2, 4), rollout_logp=torch.ones(2, 4))
    moved = batch.to(torch.device("meta"))  # a device of its own, on any machine
    for name in ("tokens", "lengths", "loss_mask", "advantages", "old_logp", "rollout_logp"):
        value = getattr(moved, name)
        assert value.device.type == "meta" and value.shape == getattr(batch, name).shape, name
        assert value.dtype == getattr(batch, name).dtype, name
    assert moved.ref_logp is None
    back = batch.to(torch.device("cpu"))
    assert torch.equal(back.tokens, batch.tokens) and torch.equal(back.rollout_logp, batch.rollout_logp)
