"""Megatron-Core's tensor-parallel linear layers with a direct forward for when autograd is off.

Megatron's ``ColumnParallelLinear`` and ``RowParallelLinear`` route every forward through
autograd functions (the TP copy / reduce regions and
``LinearWithGradAccumulationAndAsyncCommunication``) plus group look-ups and a deprecation
warning per row-parallel call. With autograd off (rollout decoding, the old-policy and reference
log-probs of a train step) none of it does anything, yet at one token per sequence it cost ~8%
of a decode step of the 26M bench model. Here, with W_i this rank's shard:

* column parallel: Y_i = X W_iᵀ + b_i, all-gathered over the TP ranks along the last axis only
  when the layer (or the caller, ``runtime_gather_output``) asks for the full output;
* row parallel: Y = Σ_i X_i W_iᵀ + b, the sum an all-reduce over the TP ranks;

computed with one ``F.linear`` (from oneDNN-prepacked weights inside
``models.prepacked_linear.prepacked_weights``) and at most one collective. A column-parallel
layer may be given its weight (the output layer tied to the embedding). With autograd on, or
with a feature this path does not cover (sequence parallelism, expert layers, a row-parallel
input that is not yet split), Megatron's own forward runs unchanged.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

from .prepacked_linear import PrepackableLinear


class NoGradColumnParallelLinear(PrepackableLinear, ColumnParallelLinear):
    """``ColumnParallelLinear`` whose forward without autograd is Y_i = X W_iᵀ + b_i (module docstring)."""

    def forward(self, input_: torch.Tensor, weight: torch.Tensor | None = None,
                runtime_gather_output: bool | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if torch.is_grad_enabled() or self.sequence_parallel or self.explicit_expert_comm:
            return super().forward(input_, weight, runtime_gather_output)
        output = self.no_grad_linear(input_, self.weight if weight is None else weight,
                                     None if self.skip_bias_add else self.bias)
        gather = self.gather_output if runtime_gather_output is None else runtime_gather_output
        if gather and self.tp_group.size() > 1:
            output = gather_from_tensor_model_parallel_region(output, group=self.tp_group)
        return output, self.bias if self.skip_bias_add else None


class NoGradRowParallelLinear(PrepackableLinear, RowParallelLinear):
    """``RowParallelLinear`` whose forward without autograd is Y = Σ_i X_i W_iᵀ + b (module docstring)."""

    def forward(self, input_: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if (torch.is_grad_enabled() or self.sequence_parallel or self.explicit_expert_comm
                or not self.input_is_parallel):
            return super().forward(input_)
        output = self.no_grad_linear(input_, self.weight, None)
        if self.tp_group.size() > 1:
            torch.distributed.all_reduce(output, group=self.tp_group)
        if self.skip_bias_add or self.bias is None:
            return output, self.bias if self.skip_bias_add else None
        return output + self.bias, None


def use_no_grad_output_layer(model: torch.nn.Module) -> None:
    """The output layer of a ``GPTModel`` becomes a :class:`NoGradColumnParallelLinear` (same
    parameters; only ``forward`` differs). ``GPTModel`` builds it as a plain
    ``ColumnParallelLinear`` itself, outside the layer spec."""
    layer = getattr(model, "output_layer", None)
    if type(layer) is ColumnParallelLinear:
        layer.__class__ = NoGradColumnParallelLinear
