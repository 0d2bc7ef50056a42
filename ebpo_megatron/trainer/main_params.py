"""fp32 main parameters for an optimizer that runs outside Megatron's (the warm start).

Mixed precision as Megatron's optimizer does it for ``precision: bf16``: the model keeps bf16
parameters and computes in bf16; the optimizer updates fp32 copies ("main" parameters) from the
bf16 gradients cast to fp32, and the model's parameters are those copies rounded after every
step. Updating bf16 parameters directly loses every update smaller than half a bf16 ulp of the
weight (8 significant bits: |Δw| < |w| / 512), so small learning rates would not train at all.
fp32 parameters are their own main parameters (no copy).
"""

from __future__ import annotations

import torch


class MainParams:
    """fp32 main copies of ``params`` (the same tensors where they are fp32 already)."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        self.params = params
        self.main = [p if p.dtype == torch.float32 else self._copy(p) for p in params]

    @staticmethod
    def _copy(param: torch.Tensor) -> torch.Tensor:
        main = param.detach().float()
        main.tensor_model_parallel = getattr(param, "tensor_model_parallel", False)  # for TP-aware clipping
        return main

    def grads_to_main(self) -> None:
        """Each main parameter's ``.grad``: its model parameter's gradient in fp32."""
        for param, main in zip(self.params, self.main):
            if main is not param:
                main.grad = param.grad.float()

    @torch.no_grad()
    def main_to_params(self) -> None:
        """The model's parameters := the main parameters (rounded to the model's dtype)."""
        for param, main in zip(self.params, self.main):
            if main is not param:
                param.copy_(main)
