"""DAPO's overlong shaping and dynamic-sampling filter against hand-computed values."""

import pytest
import torch

from ebpo_megatron.algorithms import groups_with_signal, overlong_penalty


def reference_overlong(length: int, max_length: int, buffer: int) -> float:
    if length <= max_length - buffer:
        return 0.0
    if length <= max_length:
        return ((max_length - buffer) - length) / buffer
    return -1.0


def test_overlong_penalty_matches_piecewise_definition():
    lengths = list(range(0, 140, 3))
    got = overlong_penalty(torch.tensor(lengths), max_length=100, buffer_length=25, penalty_factor=0.5)
    want = [0.5 * reference_overlong(n, 100, 25) for n in lengths]
    assert torch.allclose(got.double(), torch.tensor(want, dtype=torch.float64), atol=1e-7)


def test_overlong_penalty_rejects_bad_buffer():
    with pytest.raises(ValueError, match="buffer_length"):
        overlong_penalty(torch.tensor([1]), max_length=10, buffer_length=20)


def test_groups_with_signal_keeps_only_mixed_groups():
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.5, 0.0, 0.0, 0.5])
    group_ids = torch.tensor([4, 4, 9, 9, 2, 7, 7, 2])  # non-contiguous
    keep = groups_with_signal(rewards, group_ids)
    assert keep.tolist() == [True, True, False, False, False, False, False, False]
