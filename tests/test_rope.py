"""``parallel.rope``: RoPE as one rotation per half equals a float64 complex-number reference
((x₁ + i x₂)·mscale·e^{iθ}, rotated width r ≤ d, the rest passed through) and Megatron's
``apply_rotary_pos_emb`` (result and gradient, also on a strided view as Megatron's QKV split
gives); gradcheck in float64; every case outside the fast path (interleaved, packed sequences)
is Megatron's own result. That Megatron's attention is routed through it is
test_megatron_patches.py's."""

from __future__ import annotations

import pytest
import torch
from megatron.core.models.common.embeddings import rope_utils
from megatron.core.transformer.transformer_config import TransformerConfig

from ebpo_megatron.parallel import rope

S, B, HEADS, D = 7, 3, 4, 16


class _OneRank:
    """A context-parallel group of one rank (what Megatron's function asks of it)."""

    @staticmethod
    def size() -> int:
        return 1

    @staticmethod
    def rank() -> int:
        return 0


def _config(**overrides: object) -> TransformerConfig:
    return TransformerConfig(num_layers=1, hidden_size=HEADS * D, num_attention_heads=HEADS, **overrides)


def _freqs(rotated: int, interleaved: bool = False) -> torch.Tensor:
    """Megatron's layout: [s, 1, 1, r], angles θ_{p,i} = p·ω_i as [θ, θ] (or interleaved)."""
    omega = 1.0 / 10000 ** (torch.arange(0, rotated, 2, dtype=torch.float32) / rotated)
    angles = torch.arange(S, dtype=torch.float32)[:, None] * omega[None]
    both = (torch.stack((angles, angles), -1).flatten(-2) if interleaved
            else torch.cat((angles, angles), -1))
    return both[:, None, None, :]


def _complex_reference(x: torch.Tensor, freqs: torch.Tensor, mscale: float) -> torch.Tensor:
    """(x₁ + i x₂)·mscale·e^{iθ} on the rotated width, in float64; the rest unchanged."""
    rotated = freqs.shape[-1]
    half = rotated // 2
    x = x.double()
    theta = freqs[..., :half].double()
    z = torch.complex(x[..., :half], x[..., half:rotated]) * mscale * torch.exp(1j * theta)
    return torch.cat((z.real, z.imag, x[..., rotated:]), -1)


@pytest.mark.parametrize("rotated", [D, D // 2])
@pytest.mark.parametrize("mscale", [1.0, 1.3])
def test_rotation_equals_complex_reference_and_megatron(rotated: int, mscale: float) -> None:
    torch.manual_seed(0)
    # a strided view, as the query / key split of Megatron's fused QKV output is
    fused = torch.randn(S, B, HEADS, 3 * D)
    x = fused[..., D:2 * D].detach().requires_grad_()
    x_megatron = x.detach().clone().requires_grad_()
    freqs = _freqs(rotated)
    config = _config()

    mine = rope.apply_rotary_pos_emb(x, freqs, config, mscale=mscale)
    theirs = rope_utils.apply_rotary_pos_emb(x_megatron, freqs, config=config, mscale=mscale,
                                              cp_group=_OneRank())
    torch.testing.assert_close(mine.double(), _complex_reference(x, freqs, mscale), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-6)
    assert mine.is_contiguous()

    upstream = torch.randn(mine.shape)
    (mine * upstream).sum().backward()
    (theirs * upstream).sum().backward()
    torch.testing.assert_close(x.grad, x_megatron.grad, rtol=1e-6, atol=1e-6)


def test_gradcheck_float64() -> None:
    torch.manual_seed(1)
    x = torch.randn(S, 2, 2, D, dtype=torch.float64, requires_grad=True)
    freqs = _freqs(D // 2).double()
    assert torch.autograd.gradcheck(lambda t: rope.rotate_half_pairs(t, freqs, 1.1), (x,))


def test_without_grad_the_same_rotation() -> None:
    x = torch.randn(S, B, HEADS, D)
    freqs = _freqs(D)
    with torch.no_grad():
        fast = rope.rotate_half_pairs(x, freqs)
    assert fast.grad_fn is None
    torch.testing.assert_close(fast.double(), _complex_reference(x, freqs, 1.0), rtol=1e-6, atol=1e-6)


def test_other_layouts_are_megatrons_own() -> None:
    torch.manual_seed(2)
    x = torch.randn(S, B, HEADS, D)
    # interleaved angles: the half-pair rotation would give another result
    interleaved, freqs_i = _config(rotary_interleaved=True), _freqs(D, interleaved=True)
    megatron = rope_utils.apply_rotary_pos_emb(x, freqs_i, config=interleaved, cp_group=_OneRank())
    torch.testing.assert_close(rope.apply_rotary_pos_emb(x, freqs_i, interleaved, cp_group=_OneRank()), megatron)
    assert (rope.rotate_half_pairs(x, freqs_i) - megatron).abs().max() > 1e-2
    # packed sequences (cu_seqlens): Megatron's thd path, one sequence of all S tokens
    packed = x[:, 0]
    cu_seqlens = torch.tensor([0, S], dtype=torch.int32)
    torch.testing.assert_close(
        rope.apply_rotary_pos_emb(packed, _freqs(D), _config(), cu_seqlens=cu_seqlens, cp_group=_OneRank()),
        rope_utils.apply_rotary_pos_emb(packed, _freqs(D), config=_config(), cu_seqlens=cu_seqlens,
                                        cp_group=_OneRank()))
