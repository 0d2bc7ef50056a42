"""Token sampling: temperature, top-k and top-p checked statistically on a fixed distribution."""

import math

import pytest
import torch

from ebpo_megatron.rollout.base import SamplingParams
from ebpo_megatron.rollout.sampling import DRAW_BLOCK, draw, filter_logits, sample_tokens

PROBS = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04], dtype=torch.float64)
LOGITS = PROBS.log().float()
DRAWS = 40_000


def empirical(temperature=1.0, top_k=0, top_p=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    tokens, logp = sample_tokens(LOGITS.expand(DRAWS, -1), temperature=temperature, top_k=top_k,
                                 top_p=top_p, generator=gen)
    return torch.bincount(tokens, minlength=len(PROBS)).double() / DRAWS, tokens, logp


def expected(temperature=1.0, top_k=0, top_p=1.0):
    """Reference written directly from the definitions with Python floats."""
    weights = [p ** (1.0 / temperature) for p in PROBS.tolist()]
    total = sum(weights)
    q = [w / total for w in weights]
    order = sorted(range(len(q)), key=lambda i: -q[i])
    keep = set(order[:top_k]) if top_k else set(order)
    if top_p < 1.0:
        mass, nucleus = 0.0, set()
        for i in order:
            if mass >= top_p:
                break
            nucleus.add(i)
            mass += q[i]
        keep &= nucleus
    z = sum(q[i] for i in keep)
    return torch.tensor([q[i] / z if i in keep else 0.0 for i in range(len(q))], dtype=torch.float64)


def assert_close_to(freq, ref):
    # 5 binomial standard deviations, plus exact zeros outside the support
    sd = torch.sqrt(ref * (1 - ref) / DRAWS)
    assert torch.all((freq - ref).abs() <= 5 * sd + 1e-12), (freq, ref)
    assert torch.all(freq[ref == 0] == 0)


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_temperature(temperature):
    freq, tokens, logp = empirical(temperature=temperature)
    assert_close_to(freq, expected(temperature=temperature))
    ref_logp = torch.log_softmax(LOGITS.double() / temperature, -1)[tokens]
    assert torch.allclose(logp.double(), ref_logp, atol=1e-5)


def test_top_k():
    freq, _, _ = empirical(top_k=3)
    assert_close_to(freq, expected(top_k=3))


@pytest.mark.parametrize("top_p", [0.5, 0.7, 0.9])
def test_top_p(top_p):
    freq, _, _ = empirical(top_p=top_p)
    assert_close_to(freq, expected(top_p=top_p))


def test_top_k_and_top_p_with_temperature():
    freq, _, _ = empirical(temperature=0.7, top_k=4, top_p=0.8)
    assert_close_to(freq, expected(temperature=0.7, top_k=4, top_p=0.8))


def test_greedy_and_seeded_reproducibility():
    logits = torch.randn(16, 50, generator=torch.Generator().manual_seed(1))
    tokens, logp = sample_tokens(logits, temperature=0.0, top_k=0, top_p=1.0, generator=None)
    assert torch.equal(tokens, logits.argmax(-1))
    assert torch.allclose(logp, torch.log_softmax(logits, -1).max(-1).values)
    a = sample_tokens(logits, temperature=1.0, top_k=0, top_p=1.0, generator=torch.Generator().manual_seed(5))
    b = sample_tokens(logits, temperature=1.0, top_k=0, top_p=1.0, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0])


@pytest.mark.parametrize("vocab", [6, DRAW_BLOCK, DRAW_BLOCK + 1, 8000, 49152])
def test_two_level_draw_is_the_inversion_of_the_full_cdf(vocab):
    """The block-wise inversion picks, for the same uniform, the token of the textbook one (the
    first v whose float64 cumulative probability exceeds U·C_V), and never a token of
    probability 0: every 7th token is masked out and so is all of block 1 when there is one."""
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(2000, vocab, generator=g) * 3
    logits[:, ::7] = float("-inf")
    logits[:, DRAW_BLOCK: 2 * DRAW_BLOCK] = float("-inf")
    probs = torch.softmax(logits, -1)
    got = draw(probs, torch.Generator().manual_seed(1))
    cdf = probs.double().cumsum(-1)
    uniform = torch.rand(probs.shape[0], 1, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    want = torch.searchsorted(cdf, uniform * cdf[:, -1:], right=True).squeeze(-1)
    assert torch.equal(got, want)
    assert bool((probs.gather(1, got[:, None]) > 0).all())


def test_filter_keeps_the_token_that_crosses_top_p():
    logits = torch.tensor([[math.log(0.5), math.log(0.3), math.log(0.2)]])
    kept = torch.isfinite(filter_logits(logits, top_p=0.6))
    assert kept.tolist() == [[True, True, False]]


@pytest.mark.parametrize("field,value", [("n", 0), ("temperature", -1.0), ("top_p", 0.0), ("top_k", -1),
                                         ("max_new_tokens", 0)])
def test_sampling_params_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})
