"""oneDNN-prepacked bf16 weights for the no-grad linear layers while the native engine generates
on a CPU.

A decode step multiplies one token per sequence by every weight: Y = X Wᵀ with X only B rows
(B = sequences in the batch). ``F.linear`` on a bf16 CPU tensor hands W to oneDNN in PyTorch's
plain layout, and oneDNN reorders it into its blocked layout inside every call; at B = 32 that
reorder is a large part of the product. ``torch.ops.mkldnn._reorder_linear_weight(W, B)`` does
it once, and ``torch.ops.mkldnn._linear_pointwise(X, W_packed, b)`` then computes the same
Y = X Wᵀ + b (the same oneDNN kernel: bitwise equal to ``F.linear`` in the tests) without it.
These are the ops PyTorch's own compiler uses for frozen bf16 linear layers on CPUs.

SmolLM2-135M, 30 layers + the tied output layer at B = 32, weights larger than the caches, 2
threads: 52 -> 40 ms per decode step's products; at 472 rows (a prefill) 1.63 -> 1.25 ms for one
[960, 576] weight. Packing all weights takes ~0.2 ms per MB, once per ``generate``: the trainer
changes them between rollouts, so the packed copies live only inside :func:`prepacked_weights`.
Only the layers' no-grad forward uses the copies; on GPUs, in float32, or where PyTorch has no
oneDNN, nothing is packed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F


def can_prepack(weight: torch.Tensor) -> bool:
    """Whether ``weight`` can be packed: a bf16 CPU tensor, PyTorch built with oneDNN."""
    return (weight.device.type == "cpu" and weight.dtype == torch.bfloat16
            and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


class PrepackableLinear:
    """Mixin of the no-grad linear layers: ``prepacked`` is (W, W in oneDNN's layout) inside
    :func:`prepacked_weights`, else None."""

    prepacked: tuple[torch.Tensor, torch.Tensor] | None = None

    def no_grad_linear(self, input_: torch.Tensor, weight: torch.Tensor,
                       bias: torch.Tensor | None) -> torch.Tensor:
        """Y = X Wᵀ + b, from the packed copy of ``weight`` when there is one."""
        if self.prepacked is not None and self.prepacked[0] is weight:
            return torch.ops.mkldnn._linear_pointwise(input_, self.prepacked[1], bias, "none", [], "")
        return F.linear(input_, weight, bias)


@contextmanager
def prepacked_weights(model: torch.nn.Module, rows: int) -> Iterator[int]:
    """Pack the weight of every :class:`PrepackableLinear` of ``model`` that :func:`can_prepack`
    for products of ``rows`` input rows (oneDNN's layout hint; other row counts give the same
    results), the tied output layer's from the embedding it shares; yields how many were packed
    and drops the copies on exit."""
    layers = [m for m in model.modules() if isinstance(m, PrepackableLinear)]
    packed = 0
    try:
        for layer in layers:  # only a tied output layer has no weight of its own: the embedding's
            weight = layer.weight if layer.weight is not None else model.shared_embedding_or_output_weight()
            if can_prepack(weight):
                layer.prepacked = (weight, torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows))
                packed += 1
        yield packed
    finally:
        for layer in layers:
            layer.prepacked = None
