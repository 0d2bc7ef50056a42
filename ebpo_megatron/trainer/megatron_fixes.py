"""Fixes to Megatron-Core 0.16.x, none of them CPU-specific.

Loading the distributed optimizer when it falls back to torch's AdamW (no Transformer Engine /
apex), covered by tests/test_checkpoint.py:

1. ``DistributedOptimizer._set_main_param_and_optimizer_states`` (distrib_optimizer.py:936-940)
   copies every key of the destination state, including torch AdamW's ``step``, which the
   fully reshardable checkpoint does not hold (it restores ``step`` from the param groups):
   KeyError. The fix copies the keys the checkpoint has, under ``torch.no_grad()`` (the main
   params are views of parameters that require grad).
2. ``load_state_dict`` gives every parameter *one shared* ``step`` tensor
   (distrib_optimizer.py:817-822); torch's in-place ``step += 1`` then advances it once per
   parameter and Adam's bias correction silently drifts on resume. :func:`unshare_adam_steps`
   gives each parameter its own copy after a load.

The data-parallel collectives of a single-rank group (covered by tests/test_policy_trainer.py):

3. With one rank in the distributed optimizer's group, that rank's shard of a DDP bucket is the
   whole bucket, so the gradient reduce-scatter (param_and_grad_buffer.py:443) and the parameter
   all-gather (param_and_grad_buffer.py:285) map a buffer onto itself; the backends still run
   them (gloo copies the buffer: ~3% of a CPU train step of a 26M model).
   :func:`skip_single_rank_bucket_collectives` skips them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

_applied = False
_single_rank_skipped = False


def apply() -> None:
    """Install fix 1 (idempotent)."""
    global _applied
    if _applied:
        return
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states

    def set_states(self: Any, model_param: torch.nn.Parameter, tensors: dict[str, torch.Tensor]) -> None:
        if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return original(self, model_param, tensors)
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        destination = {"param": main_param, **self.optimizer.state[main_param]}
        with torch.no_grad():
            for key, tensor in destination.items():
                if key in tensors:
                    tensor.copy_(tensors[key])

    DistributedOptimizer._set_main_param_and_optimizer_states = set_states
    _applied = True


def unshare_adam_steps(optimizer: Any) -> None:
    """Fix 2: one ``step`` tensor per parameter after a load."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            continue
        for state in inner.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].detach().clone()


def _identity_on_one_rank(collective: Callable[..., Any]) -> Callable[..., Any]:
    """``collective(output, input, group=..., async_op=...)`` that returns at once when the
    group has one rank and ``output`` and ``input`` are the same memory (then it is the identity
    for a gather and for a SUM or AVG reduce-scatter). Asynchronous calls are left alone: their
    handle is waited on."""

    @functools.wraps(collective)
    def call(output: torch.Tensor, input: torch.Tensor, *args: Any, group: Any = None,
             async_op: bool = False, **kwargs: Any) -> Any:
        same_memory = output.data_ptr() == input.data_ptr() and output.numel() == input.numel()
        if not async_op and group is not None and group.size() == 1 and same_memory:
            return None
        return collective(output, input, *args, group=group, async_op=async_op, **kwargs)

    return call


def skip_single_rank_bucket_collectives() -> None:
    """Fix 3 (idempotent)."""
    global _single_rank_skipped
    if _single_rank_skipped:
        return
    from megatron.core.distributed import param_and_grad_buffer as buffers

    buffers.dist_all_gather_func = _identity_on_one_rank(buffers.dist_all_gather_func)
    buffers.dist_reduce_scatter_func = _identity_on_one_rank(buffers.dist_reduce_scatter_func)
    _single_rank_skipped = True
