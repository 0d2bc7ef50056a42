"""Vocab-parallel log-probs and entropy, alone and from one shared log Z, against a float64
full-vocabulary reference: TP = 1, 2, 4 spawned gloo ranks on localhost, values and gradients,
temperature != 1, padded vocabulary ids."""

from __future__ import annotations

import functools
import os
import pickle
import socket
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

VOCAB, PADDED, TEMPERATURE = 37, 40, 0.7  # ids 37..39 are padding


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, outdir: str, fn: Callable) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        result = {"ok": True, "value": fn(rank, world)}
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported to the parent test
        result = {"ok": False, "error": traceback.format_exc()}
    with open(os.path.join(outdir, f"{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)


def spawn(fn: Callable, world: int) -> list[Any]:
    """``fn(rank, world)`` on ``world`` gloo ranks (torch only: no Megatron import)."""
    with tempfile.TemporaryDirectory() as outdir:
        mp.spawn(_worker, args=(world, _free_port(), outdir, fn), nprocs=world, join=True)
        results = []
        for rank in range(world):
            with open(os.path.join(outdir, f"{rank}.pkl"), "rb") as f:
                results.append(pickle.load(f))
    errors = [f"rank {r}:\n{res['error']}" for r, res in enumerate(results) if not res["ok"]]
    assert not errors, "\n".join(errors)
    return [res["value"] for res in results]


def inputs(vocab: int = VOCAB) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    logits = 4.0 * torch.randn(3, 5, PADDED, generator=g, dtype=torch.float64)
    logits[..., vocab:] += 50.0  # large padded logits: any leak of them would show
    targets = torch.randint(0, vocab, (3, 5), generator=g)
    targets[0, :3] = torch.tensor([0, vocab - 1, 19])  # first and last real ids, a TP=2 boundary
    weights = torch.randn(3, 5, generator=g, dtype=torch.float64)  # a non-uniform upstream gradient
    return logits, targets, weights


def reference(vocab: int = VOCAB) -> tuple[torch.Tensor, ...]:
    """float64, full vocabulary, plain torch: log_softmax over the real ids of z / T."""
    logits, targets, weights = inputs(vocab)
    z = logits.clone().requires_grad_(True)
    logp_all = torch.log_softmax(z[..., :vocab] / TEMPERATURE, dim=-1)
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    (grad_logp,) = torch.autograd.grad((logp * weights).sum(), z, retain_graph=True)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    (grad_entropy,) = torch.autograd.grad((entropy * weights).sum(), z)
    return logp.detach(), grad_logp, entropy.detach(), grad_entropy


def _shard_and_compute(rank: int, world: int, vocab: int = VOCAB) -> dict[str, tuple[torch.Tensor, ...]]:
    import torch.distributed as dist

    from ebpo_megatron.parallel.vocab_parallel import (
        vocab_parallel_entropy,
        vocab_parallel_logprobs,
        vocab_parallel_logprobs_and_entropy,
    )

    group = dist.new_group(list(range(world)))
    logits, targets, weights = inputs(vocab)
    width = PADDED // world
    out = {}
    for dtype in (torch.float32, torch.float64):
        shard = logits[..., rank * width:(rank + 1) * width].to(dtype).clone().requires_grad_(True)
        logp = vocab_parallel_logprobs(shard, targets, group, temperature=TEMPERATURE, vocab_size=vocab)
        (g_logp,) = torch.autograd.grad((logp * weights.to(dtype)).sum(), shard, retain_graph=True)
        (g_again,) = torch.autograd.grad((logp * weights.to(dtype)).sum(), shard)  # retained graph intact
        entropy = vocab_parallel_entropy(shard, group, temperature=TEMPERATURE, vocab_size=vocab)
        (g_entropy,) = torch.autograd.grad((entropy * weights.to(dtype)).sum(), shard)
        assert torch.equal(g_logp, g_again)
        out[str(dtype)] = (logp.detach().double(), g_logp.double(), entropy.detach().double(), g_entropy.double())
        # together: H differentiable (a loss term), then a value only (a metric)
        both_logp, both_entropy = vocab_parallel_logprobs_and_entropy(
            shard, targets, group, temperature=TEMPERATURE, vocab_size=vocab)
        (g_both,) = torch.autograd.grad(((both_logp + 0.5 * both_entropy) * weights.to(dtype)).sum(), shard)
        metric_logp, metric_entropy = vocab_parallel_logprobs_and_entropy(
            shard, targets, group, temperature=TEMPERATURE, vocab_size=vocab, entropy_grad=False)
        assert not metric_entropy.requires_grad and metric_logp.requires_grad
        (g_metric,) = torch.autograd.grad((metric_logp * weights.to(dtype)).sum(), shard)
        out[str(dtype) + " together"] = (both_logp.detach().double(), both_entropy.detach().double(),
                                         g_both.double(), metric_logp.detach().double(),
                                         metric_entropy.double(), g_metric.double())
    return out


@pytest.mark.parametrize(("world", "vocab"), [(1, VOCAB), (2, VOCAB), (4, VOCAB), (4, 29)])
def test_matches_full_vocabulary_reference(world: int, vocab: int) -> None:
    """(4, 29): the last rank's slice (ids 30..39) is all padding, the third one ends in one."""
    ref_logp, ref_g_logp, ref_entropy, ref_g_entropy = reference(vocab)
    results = spawn(functools.partial(_shard_and_compute, vocab=vocab), world)
    width = PADDED // world
    for dtype, tol in (("torch.float64", 1e-12), ("torch.float32", 2e-5)):
        for rank, result in enumerate(results):
            logp, g_logp, entropy, g_entropy = result[dtype]
            cols = slice(rank * width, (rank + 1) * width)
            torch.testing.assert_close(logp, ref_logp, atol=10 * tol, rtol=0)
            torch.testing.assert_close(entropy, ref_entropy, atol=10 * tol, rtol=0)
            torch.testing.assert_close(g_logp, ref_g_logp[..., cols], atol=tol, rtol=0)
            torch.testing.assert_close(g_entropy, ref_g_entropy[..., cols], atol=tol, rtol=0)
            both_logp, both_entropy, g_both, metric_logp, metric_entropy, g_metric = result[dtype + " together"]
            for value, ref in ((both_logp, ref_logp), (metric_logp, ref_logp),
                               (both_entropy, ref_entropy), (metric_entropy, ref_entropy)):
                torch.testing.assert_close(value, ref, atol=10 * tol, rtol=0)
            torch.testing.assert_close(g_both, (ref_g_logp + 0.5 * ref_g_entropy)[..., cols], atol=tol, rtol=0)
            torch.testing.assert_close(g_metric, ref_g_logp[..., cols], atol=tol, rtol=0)
    last_logp_grad = results[-1]["torch.float64"][1]
    assert last_logp_grad[..., max(vocab - (world - 1) * width, 0):].abs().max() == 0  # padding: no gradient
    assert ref_entropy.mean() > 0.5 and ref_logp.max() < 0  # the reference is not degenerate


def test_single_rank_without_group_and_gradcheck() -> None:
    """tp_group=None is the full vocabulary; torch.autograd.gradcheck (finite differences) of
    the three functions in float64, independent of the analytic reference's autograd."""
    from ebpo_megatron.parallel.vocab_parallel import (
        vocab_parallel_entropy,
        vocab_parallel_logprobs,
        vocab_parallel_logprobs_and_entropy,
    )

    ref_logp, _, ref_entropy, _ = reference()
    logits, targets, _ = inputs()
    logp = vocab_parallel_logprobs(logits, targets, None, TEMPERATURE, VOCAB)
    torch.testing.assert_close(logp, ref_logp, atol=1e-12, rtol=0)
    torch.testing.assert_close(vocab_parallel_entropy(logits, None, TEMPERATURE, VOCAB), ref_entropy,
                               atol=1e-12, rtol=0)
    z = logits[:1, :2].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: vocab_parallel_logprobs(t, targets[:1, :2], None, TEMPERATURE, VOCAB), z)
    assert torch.autograd.gradcheck(lambda t: vocab_parallel_entropy(t, None, TEMPERATURE, VOCAB), z)
    assert torch.autograd.gradcheck(
        lambda t: vocab_parallel_logprobs_and_entropy(t, targets[:1, :2], None, TEMPERATURE, VOCAB), z)
    # no padding declared: every id counts (here the large padded logits dominate)
    full = torch.log_softmax(logits / TEMPERATURE, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(vocab_parallel_logprobs(logits, targets, None, TEMPERATURE), full, atol=1e-12, rtol=0)


def test_bfloat16_logits_are_computed_in_float32() -> None:
    from ebpo_megatron.parallel.vocab_parallel import vocab_parallel_logprobs

    logits, targets, _ = inputs()
    low = logits.to(torch.bfloat16)
    logp = vocab_parallel_logprobs(low, targets, None, TEMPERATURE, VOCAB)
    expected = torch.log_softmax(low.double()[..., :VOCAB] / TEMPERATURE, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    assert logp.dtype == torch.float32
    torch.testing.assert_close(logp.double(), expected, atol=1e-5, rtol=0)


def test_temperature_must_be_positive() -> None:
    from ebpo_megatron.parallel.vocab_parallel import vocab_parallel_entropy, vocab_parallel_logprobs

    with pytest.raises(ValueError, match="temperature: expected > 0, got 0.0"):
        vocab_parallel_logprobs(torch.zeros(1, 4), torch.zeros(1, dtype=torch.long), None, temperature=0.0)
    with pytest.raises(ValueError, match="temperature"):
        vocab_parallel_entropy(torch.zeros(1, 4), None, temperature=-1.0)
