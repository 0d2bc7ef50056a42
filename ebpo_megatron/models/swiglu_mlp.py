"""``SwiGLUMLP``: Megatron-Core's ``MLP`` whose SwiGLU is one autograd function.

The fused first layer gives y = [y₁; y₂] = [x W_gateᵀ; x W_upᵀ] (halves of width F per TP rank)
and the activation is a = silu(y₁) ⊙ y₂. Megatron's unfused path computes
silu(chunk(y)[0]) * (chunk(y)[1] + glu_linear_offset): with the default offset 0 the addition
copies y₂, and autograd joins the two halves of ∂L/∂y with a ``torch.cat``. Here the backward
pass writes both halves of ∂L/∂y into one buffer,

    ∂L/∂y₂ = g ⊙ silu(y₁),    ∂L/∂y₁ = (g ⊙ y₂) ⊙ silu′(y₁),

saving the same tensors autograd saves (y and silu(y₁)). Every other case (a clamp, a non-zero
offset, per-token scales, fused or Transformer Engine activations, another activation) runs
Megatron's forward unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.transformer.mlp import MLP


class _SwiGLU(torch.autograd.Function):
    """a = silu(y₁) ⊙ y₂ for y = [y₁; y₂] split on the last dimension."""

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor) -> torch.Tensor:
        y1, y2 = torch.chunk(y, 2, dim=-1)
        gate = F.silu(y1)
        ctx.save_for_backward(y, gate)
        return gate * y2

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        y, gate = ctx.saved_tensors
        y1, y2 = torch.chunk(y, 2, dim=-1)
        grad_y = torch.empty(y.shape, dtype=grad.dtype, device=grad.device)
        grad_y1, grad_y2 = torch.chunk(grad_y, 2, dim=-1)
        torch.ops.aten.silu_backward.grad_input(grad * y2, y1, grad_input=grad_y1)
        torch.mul(grad, gate, out=grad_y2)
        return grad_y


def swiglu(y: torch.Tensor) -> torch.Tensor:
    """silu(y₁) ⊙ y₂ for y = [y₁; y₂] (last dimension), differentiable in y."""
    if torch.is_grad_enabled() and y.requires_grad:
        return _SwiGLU.apply(y)
    y1, y2 = torch.chunk(y, 2, dim=-1)
    return F.silu(y1) * y2


class SwiGLUMLP(MLP):
    """``MLP`` with :func:`swiglu` as its activation when the configuration is plain SwiGLU.
    It adds no state: :func:`use_swiglu_mlp` turns built ``MLP`` modules into it."""

    @property
    def plain_swiglu(self) -> bool:
        config = self.config
        return (config.gated_linear_unit and self.activation_func is F.silu
                and not config.use_te_activation_func and not config.bias_activation_fusion
                and config.activation_func_clamp_value is None and config.glu_linear_offset == 0.0)

    def forward(self, hidden_states: torch.Tensor, per_token_scale: torch.Tensor | None = None,
                **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.plain_swiglu or per_token_scale is not None:
            return super().forward(hidden_states, per_token_scale, **kwargs)
        fc1_out, fc1_bias = self.linear_fc1(hidden_states)
        if fc1_bias is not None:
            fc1_out = fc1_out + fc1_bias
        return self.linear_fc2(swiglu(fc1_out))


def use_swiglu_mlp(module: torch.nn.Module) -> None:
    """Every Megatron ``MLP`` in ``module`` becomes a :class:`SwiGLUMLP` (same parameters and
    buffers; only ``forward`` differs). Done on built modules rather than through the layer spec
    because ``TransformerLayer`` recognizes ``MLP`` by identity: a subclass in the spec is built
    without the layer's TP group argument, with an "Unknown MLP type" warning per layer."""
    for submodule in module.modules():
        if type(submodule) is MLP:
            submodule.__class__ = SwiGLUMLP
