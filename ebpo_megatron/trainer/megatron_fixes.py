"""Fixes to Megatron-Core 0.16.x for loading the distributed optimizer when it falls back to
torch's AdamW (no Transformer Engine / apex): not CPU-specific, measured in
../shared/probes/megatron_cpu and covered by tests/test_checkpoint.py.

1. ``DistributedOptimizer._set_main_param_and_optimizer_states`` (distrib_optimizer.py:936-940)
   copies every key of the destination state, including torch AdamW's ``step``, which the
   fully reshardable checkpoint does not hold (it restores ``step`` from the param groups):
   KeyError. The fix copies the keys the checkpoint has, under ``torch.no_grad()`` (the main
   params are views of parameters that require grad).
2. ``load_state_dict`` gives every parameter *one shared* ``step`` tensor
   (distrib_optimizer.py:817-822); torch's in-place ``step += 1`` then advances it once per
   parameter and Adam's bias correction silently drifts on resume. :func:`unshare_adam_steps`
   gives each parameter its own copy after a load.
"""

from __future__ import annotations

from typing import Any

import torch

_applied = False


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
