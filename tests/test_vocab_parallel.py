"""Vocab-parallel log-probs and entropy (TP = 1, 2, 4 over gloo) against a float64
full-vocabulary reference: values and gradients, with temperature and padded entries."""

from __future__ import annotations

import pytest
import torch

from mp_utils import run_ranks

VOCAB, PADDED, TEMPERATURE = 37, 40, 0.7


def inputs():
    g = torch.Generator().manual_seed(3)
    logits = 4.0 * torch.randn(3, 5, PADDED, generator=g, dtype=torch.float64)
    targets = torch.randint(0, VOCAB, (3, 5), generator=g)
    weights = torch.randn(3, 5, generator=g, dtype=torch.float64)  # a non-uniform upstream gradient
    return logits, targets, weights


def reference():
    logits, targets, weights = inputs()
    z = logits.clone().requires_grad_(True)
    logp_all = torch.log_softmax(z[..., :VOCAB] / TEMPERATURE, dim=-1)
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    (grad_logp,) = torch.autograd.grad((logp * weights).sum(), z, retain_graph=True)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    (grad_entropy,) = torch.autograd.grad((entropy * weights).sum(), z)
    return logp.detach(), grad_logp, entropy.detach(), grad_entropy


def _shard_and_compute(rank, world):
    import torch.distributed as dist

    from ebpo_megatron.parallel.vocab_parallel import vocab_parallel_entropy, vocab_parallel_logprobs

    dist.init_process_group("gloo")
    group = dist.new_group(list(range(world)))
    logits, targets, weights = inputs()
    width = PADDED // world
    out = {}
    for dtype in (torch.float32, torch.float64):
        shard = logits[..., rank * width:(rank + 1) * width].to(dtype).clone().requires_grad_(True)
        logp = vocab_parallel_logprobs(shard, targets, group, temperature=TEMPERATURE, vocab_size=VOCAB)
        (g_logp,) = torch.autograd.grad((logp * weights.to(dtype)).sum(), shard)
        entropy = vocab_parallel_entropy(shard, group, temperature=TEMPERATURE, vocab_size=VOCAB)
        (g_entropy,) = torch.autograd.grad((entropy * weights.to(dtype)).sum(), shard)
        out[str(dtype)] = (logp.detach().double(), g_logp.double(), entropy.detach().double(), g_entropy.double())
    return out


@pytest.mark.parametrize("world", [1, 2, 4])
def test_matches_full_vocabulary_reference(world):
    ref_logp, ref_g_logp, ref_entropy, ref_g_entropy = reference()
    results = run_ranks(_shard_and_compute, world)
    width = PADDED // world
    for dtype, tol in (("torch.float64", 1e-10), ("torch.float32", 2e-5)):
        for rank, result in enumerate(results):
            logp, g_logp, entropy, g_entropy = result[dtype]
            cols = slice(rank * width, (rank + 1) * width)
            assert torch.allclose(logp, ref_logp, atol=tol * 10), dtype
            assert torch.allclose(entropy, ref_entropy, atol=tol * 10), dtype
            assert torch.allclose(g_logp, ref_g_logp[..., cols], atol=tol), dtype
            assert torch.allclose(g_entropy, ref_g_entropy[..., cols], atol=tol), dtype
    # padded entries carry no probability and no gradient
    last = results[-1]["torch.float64"]
    assert last[1][..., -(PADDED - VOCAB):].abs().max() == 0


def test_temperature_must_be_positive():
    from ebpo_megatron.parallel.vocab_parallel import vocab_parallel_logprobs

    with pytest.raises(ValueError, match="temperature"):
        vocab_parallel_logprobs(torch.zeros(1, 4), torch.zeros(1, dtype=torch.long), None, temperature=0.0)
