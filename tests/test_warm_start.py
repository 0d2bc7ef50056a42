"""The supervised warm start: its loss is the token-mean NLL of the answer tokens (float64
reference from the full logits, although the output layer skips the prompt positions), and one
step with the batch split over two DP ranks equals the single-process step."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mp_utils import run_ranks
from test_policy_trainer import BATCH, CFG, fixed_batch, full_init


def _reference_nll(model: torch.nn.Module, batch) -> float:
    """−(1/N_tok) Σ mask·log softmax(logits)[next token], all positions projected, float64."""
    with torch.no_grad():
        positions = torch.arange(batch.tokens.shape[1]).unsqueeze(0).expand_as(batch.tokens)
        logits = model(batch.tokens, positions, None, logits_from=0).double()[:, :-1, :CFG.vocab_size]
        logp = torch.log_softmax(logits, -1).gather(-1, batch.tokens[:, 1:, None]).squeeze(-1)
    mask = batch.loss_mask.double()
    return float(-(logp * mask).sum() / mask.sum())


def _warm_start(rank: int, world: int, shapes):
    from megatron.core import parallel_state

    from ebpo_megatron.models import build_policy
    from ebpo_megatron.models.weights import assign_full_weights, full_weights
    from ebpo_megatron.parallel import ParallelConfig, cpu_compat, initialize
    from ebpo_megatron.trainer.warm_start import sft_warm_start

    parallel = ParallelConfig()
    initialize(parallel, CFG)
    cpu_compat.set_seed(0)
    chunks = build_policy(CFG, parallel)
    if shapes is None:
        return {n: tuple(t.shape) for n, t in full_weights(chunks).items()}
    assign_full_weights(chunks, lambda n: full_init(n, shapes))
    batch = fixed_batch()
    # prompts of 4 tokens, then answers: the output layer can skip positions 0..2
    batch = dataclasses.replace(batch, loss_mask=torch.where(torch.arange(batch.loss_mask.shape[1]) >= 3,
                                                             batch.loss_mask, 0.0))
    reference = _reference_nll(chunks[0], batch)
    share = BATCH // parallel_state.get_data_parallel_world_size()
    rank_dp = parallel_state.get_data_parallel_rank()
    mine = batch.select(slice(rank_dp * share, (rank_dp + 1) * share))
    assert mine.response_start() >= 3
    losses = sft_warm_start(chunks[0], [mine, mine], lr=1e-2)
    return {"reference": reference, "losses": losses, "weights": full_weights(chunks)}


@pytest.fixture(scope="module")
def single():
    shapes = run_ranks(_warm_start, 1, None)[0]
    return shapes, run_ranks(_warm_start, 1, shapes)[0]


def test_loss_is_the_token_mean_nll_of_the_answers(single):
    _, result = single
    assert result["losses"][0] == pytest.approx(result["reference"], rel=1e-5)
    assert result["losses"][1] < result["losses"][0]


def test_two_dp_ranks_give_the_single_process_steps(single):
    shapes, one = single
    for two in run_ranks(_warm_start, 2, shapes):
        assert two["losses"] == pytest.approx(one["losses"], rel=1e-5)
        # Adam moves every weight by about lr = 1e-2 per step whatever the gradient's size, so
        # a gradient that is wrong shows at 1e-2; summation-order rounding in a gradient entry
        # near Adam's ε shows as < 1e-4 (seen: 4e-5 in one entry of 2048)
        for name, weight in one["weights"].items():
            torch.testing.assert_close(two["weights"][name], weight, rtol=0, atol=1e-4, msg=name)


def test_warmup_then_cosine_schedule_against_its_formula():
    from ebpo_megatron.trainer.warm_start import warmup_cosine_lr

    total, warmup, lr, floor = 50, 10, 3e-3, 3e-4
    got = [warmup_cosine_lr(t, total, lr, warmup, floor) for t in range(total)]
    for t in range(warmup):
        assert got[t] == pytest.approx(lr * (t + 1) / warmup, rel=1e-12)
    for t in range(warmup, total):  # float64 reference from the definition
        progress = (t - warmup) / (total - warmup - 1)
        assert got[t] == pytest.approx(floor + (lr - floor) * 0.5 * (1 + torch.cos(torch.tensor(
            torch.pi * progress, dtype=torch.float64)).item()), rel=1e-12)
    assert got[warmup] == pytest.approx(lr) and got[-1] == pytest.approx(floor)
    assert warmup_cosine_lr(7, 20, lr, 0, lr) == lr  # min_lr = lr: constant


def _stops_at_target(rank: int, world: int, shapes, target: float):
    from megatron.core import parallel_state

    from ebpo_megatron.models import build_policy
    from ebpo_megatron.models.weights import assign_full_weights
    from ebpo_megatron.parallel import ParallelConfig, cpu_compat, initialize
    from ebpo_megatron.trainer.warm_start import sft_warm_start

    initialize(ParallelConfig(), CFG)
    cpu_compat.set_seed(0)
    chunks = build_policy(CFG, ParallelConfig())
    assign_full_weights(chunks, lambda n: full_init(n, shapes))
    share = BATCH // parallel_state.get_data_parallel_world_size()
    rank_dp = parallel_state.get_data_parallel_rank()
    mine = fixed_batch().select(slice(rank_dp * share, (rank_dp + 1) * share))
    return sft_warm_start(chunks[0], [mine] * 60, lr=1e-2, target_loss=target)


def test_the_warm_start_stops_when_the_windowed_loss_reaches_the_target(single):
    from ebpo_megatron.trainer.warm_start import TARGET_WINDOW, reached_target

    assert not reached_target([0.1] * (TARGET_WINDOW - 1), 1.0)  # fewer steps than the window
    assert reached_target([9.0] + [0.5] * TARGET_WINDOW, 0.5)
    assert not reached_target([0.4] * (TARGET_WINDOW - 1) + [0.7], 0.4)
    shapes, one = single
    first_loss = one["losses"][0]
    # a target above the starting loss: stops after exactly one window, on both DP ranks alike
    for losses in run_ranks(_stops_at_target, 2, shapes, first_loss * 2):
        assert len(losses) == TARGET_WINDOW
    # a target below it: the stop is the first step whose window mean reaches it
    losses = run_ranks(_stops_at_target, 1, shapes, first_loss * 0.5)[0]
    assert len(losses) < 60
    stop = next(i for i in range(len(losses)) if reached_target(losses[: i + 1], first_loss * 0.5))
    assert stop == len(losses) - 1
