"""Rotary position embedding (RoPE) as one rotation per half, without Megatron's concatenations.

For a head vector x = [x₁, x₂] (halves of the rotated width r = 2h) and angles θ (the first h
entries of Megatron's ``freqs = [θ, θ]``), RoPE is the rotation

    y₁ = x₁ cos θ − x₂ sin θ,    y₂ = x₂ cos θ + x₁ sin θ,

and the entries past r pass through. Its Jacobian is the rotation by −θ, so the backward pass is
the same function with sin θ negated. Megatron's unfused path (``rope_utils._apply_rotary_pos_emb_bshd``)
computes t·cos + rotate_half(t)·sin with a chunk, a negation and two ``torch.cat`` per call, and
autograd keeps their intermediates: on the 26M default model a layer's forward + backward spent
3 ms of 116 in ``torch.cat``.

Megatron's attention calls :func:`apply_rotary_pos_emb` (patch B of ``parallel.megatron_patches``,
installed by ``parallel.initialize``), which takes this path for Megatron's standard RoPE (bshd
layout, not interleaved, no multi-latent attention, no mRoPE, no fused kernel selected) and hands
every other case to Megatron's own function.
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core.models.common.embeddings import rope_utils

_megatron_apply = rope_utils.apply_rotary_pos_emb


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """[x₁ cos − x₂ sin, x₂ cos + x₁ sin, x_pass] (contiguous), halves of width h = cos.shape[-1]."""
    half = cos.shape[-1]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    x1, x2 = x[..., :half], x[..., half:2 * half]
    out1, out2 = out[..., :half], out[..., half:2 * half]
    torch.mul(x1, cos, out=out1).addcmul_(x2, sin, value=-1.0)
    torch.mul(x2, cos, out=out2).addcmul_(x1, sin)
    if x.shape[-1] > 2 * half:
        out[..., 2 * half:] = x[..., 2 * half:]
    return out


class _Rotation(torch.autograd.Function):
    """y = R(θ) x; the gradient is R(−θ) g."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, -sin), None, None


def rotate_half_pairs(t: torch.Tensor, freqs: torch.Tensor, mscale: float = 1.0) -> torch.Tensor:
    """RoPE of ``t`` [s, b, heads, d] by ``freqs`` [s, 1, 1, r] = [θ, θ] (Megatron's
    non-interleaved layout), cos and sin scaled by ``mscale`` as Megatron does."""
    angles = freqs[..., : freqs.shape[-1] // 2]
    cos = (torch.cos(angles) * mscale).to(t.dtype)
    sin = (torch.sin(angles) * mscale).to(t.dtype)
    if torch.is_grad_enabled() and t.requires_grad:
        return _Rotation.apply(t, cos, sin)
    return _rotate(t, cos, sin)


def _takes_fast_path(t: torch.Tensor, freqs: torch.Tensor, config: Any, cu_seqlens: Any) -> bool:
    return (cu_seqlens is None and not config.apply_rope_fusion and not config.rotary_interleaved
            and not config.multi_latent_attention and getattr(config, "mrope_section", None) is None
            and freqs.dim() == t.dim() and freqs.shape[-1] % 2 == 0 and freqs.shape[-1] <= t.shape[-1])


def apply_rotary_pos_emb(t: torch.Tensor, freqs: torch.Tensor, config: Any, cu_seqlens: Any = None,
                         mscale: float = 1.0, cp_group: Any = None) -> torch.Tensor:
    """Megatron's ``rope_utils.apply_rotary_pos_emb`` (same arguments and result), by
    :func:`rotate_half_pairs` for standard RoPE in bshd layout."""
    if _takes_fast_path(t, freqs, config, cu_seqlens):
        return rotate_half_pairs(t, freqs, mscale)
    return _megatron_apply(t, freqs, config=config, cu_seqlens=cu_seqlens, mscale=mscale, cp_group=cp_group)
