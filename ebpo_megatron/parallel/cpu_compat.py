"""CPU compatibility for Megatron-Core 0.16.x — the only module that special-cases CPU.

Active only when CUDA is absent (``torch.cuda.is_available()`` is False); on a GPU machine
:func:`enable` does nothing. Measured needs (../shared/probes/megatron_cpu, file:line in
megatron-core 0.16.1):

* ``torch.cuda.current_device()`` is used as a device in the schedules, DDP buffers
  (param_and_grad_buffer.py:800), RoPE (rotary_pos_embedding.py:162), the static KV cache
  (attention.py:430), the TP logit gather (mappings.py:91) and the checkpoint saver
  (state_dict_saver.py:252): it returns the CPU device here.
* ``torch.cuda.synchronize()`` (schedules, filesystem_async.py:230): a no-op here.
* Tensor factories called with ``device="cuda"`` (optimizer.py:481, schedules.py:596,
  clip_grads.py:103/174, utils.py:1207) and ``Tensor.cuda()`` / ``Tensor.to("cuda")``
  (distrib_optimizer.py:1089): redirected to the CPU. Each of these would raise on a CPU-only
  build, so redirecting changes no call that works today.
* ``Tensor.type()`` without arguments is compared to ``'torch.cuda.FloatTensor'`` by the
  distributed optimizer and grad clipping (distrib_optimizer.py:361/420/431/582,
  clip_grads.py:167): for CPU tensors it reports the ``torch.cuda.*`` name. This is the one
  redirect that changes a working call; code that needs the true type uses ``tensor.dtype``.
* The local layer spec's ``DotProductAttention`` needs CUDA buffers: :class:`SDPACoreAttention`
  replaces it (see :func:`local_layer_spec`).
* ``model_parallel_cuda_manual_seed`` needs CUDA: :func:`set_seed` seeds the CPU generators.
* Activation recomputation saves and restores "the CUDA RNG state" around each recomputed
  block (tensor_parallel/random.py:55 and :72): here that is the CPU generator's state.
"""

from __future__ import annotations

import random
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

_FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "arange", "zeros_like", "ones_like",
              "empty_like", "full_like", "rand", "randn", "randint")
_enabled = False


def cuda_absent() -> bool:
    return not torch.cuda.is_available()


def _is_cuda(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


def _redirect_factory(fn: Callable) -> Callable:
    def factory(*args: Any, **kwargs: Any) -> Any:
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return fn(*args, **kwargs)

    factory.__wrapped__ = fn  # type: ignore[attr-defined]
    return factory


def enable() -> bool:
    """Install the redirects when CUDA is absent (idempotent); returns whether they are active."""
    global _enabled
    if _enabled or not cuda_absent():
        return _enabled
    torch.cuda.current_device = lambda: torch.device("cpu")  # type: ignore[assignment]
    torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]
    for name in _FACTORIES:
        setattr(torch, name, _redirect_factory(getattr(torch, name)))

    original_type = torch.Tensor.type
    original_to = torch.Tensor.to

    def tensor_type(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        name = original_type(self, *args, **kwargs)
        if not args and not kwargs and self.device.type == "cpu" and name.startswith("torch."):
            return "torch.cuda." + name[len("torch."):]
        return name

    def tensor_to(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if args and _is_cuda(args[0]):
            args = ("cpu",) + args[1:]
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return original_to(self, *args, **kwargs)

    torch.Tensor.type = tensor_type  # type: ignore[method-assign]
    torch.Tensor.to = tensor_to  # type: ignore[method-assign]
    torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]

    from megatron.core.tensor_parallel import random as megatron_random

    megatron_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    megatron_random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    _enabled = True
    return True


def set_seed(seed: int) -> None:
    """Seed python, numpy and torch; on GPU also Megatron's model-parallel CUDA RNG tracker."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if not cuda_absent():
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(seed)


class SDPACoreAttention(torch.nn.Module):
    """Core attention via ``torch.nn.functional.scaled_dot_product_attention``.

    Inputs in Megatron's layout: query [s_q, b, n_q/TP, d], key/value [s_k, b, n_kv/TP, d];
    output [s_q, b, n_q·d/TP]. Masking follows Megatron's contract: an explicit boolean
    ``attention_mask`` (True = masked out) wins; otherwise a causal mask type gives a causal
    mask aligned to the *last* s_q keys (bottom-right), and ``no_mask`` (KV-cache decode)
    none. Always passing ``is_causal=True`` would be silently wrong in decode, where s_q = 1
    and PyTorch aligns the causal mask top-left.
    """

    def __init__(self, config: Any, layer_number: int, attn_mask_type: Any, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection: Any = None, **_: Any) -> None:
        super().__init__()
        self.config = config
        self.attn_mask_type = attn_mask_type
        self.softmax_scale = softmax_scale
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None = None, attn_mask_type: Any = None,
                attention_bias: Any = None, packed_seq_params: Any = None, **_: Any) -> torch.Tensor:
        from megatron.core.transformer.enums import AttnMaskType

        s_q, batch, heads, dim = query.shape
        s_k = key.shape[0]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, n, s, d]
        if k.shape[1] != heads:
            k = k.repeat_interleave(heads // k.shape[1], dim=1)
            v = v.repeat_interleave(heads // v.shape[1], dim=1)
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        dropout = self.dropout if self.training else 0.0
        if attention_mask is not None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=~attention_mask,
                                                 dropout_p=dropout, scale=self.softmax_scale)
        elif mask_type == AttnMaskType.causal and s_q > 1:
            keep = torch.ones(s_q, s_k, dtype=torch.bool).tril(diagonal=s_k - s_q) if s_q != s_k else None
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, is_causal=keep is None,
                                                 dropout_p=dropout, scale=self.softmax_scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=self.softmax_scale)
        return out.permute(2, 0, 1, 3).reshape(s_q, batch, heads * dim)


def adapt_layer_spec(spec: Any) -> Any:
    """Without CUDA, swap the local spec's core attention for :class:`SDPACoreAttention`."""
    if cuda_absent():
        spec.submodules.self_attention.submodules.core_attention = SDPACoreAttention
    return spec
