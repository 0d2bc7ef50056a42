"""CPU compatibility for Megatron-Core 0.16.x: the only module of the package that special-cases CPU.

Everything here is active only when CUDA is absent (``torch.cuda.is_available()`` is False);
on a GPU machine :func:`enable` does nothing and :func:`set_seed` takes Megatron's CUDA path.
Each change below names the Megatron-Core line that fails on CPU; tests/test_cpu_compat.py covers them.

What :func:`enable` changes, all inside Megatron-Core, never in ``torch`` itself:

1. **CUDA call sites.** The Megatron modules listed in :data:`CUDA_CALL_SITES` (schedules, pipeline
   p2p, DDP buffers, optimizer, grad clipping, RoPE, static KV cache, TP gathers, dist-checkpoint
   save) see, as their module-global name ``torch``, a thin proxy of ``torch`` in which

   * ``torch.cuda.current_device()`` is the CPU device and ``torch.cuda.synchronize()`` a no-op;
   * tensor factories (``torch.zeros(..., device="cuda")`` and friends) build on the CPU.

   Every other attribute is the real one, and code outside those modules is untouched.
2. **Tensor methods.** A few Megatron functions compare the argument-less ``Tensor.type()`` with
   ``'torch.cuda.FloatTensor'`` (distrib_optimizer.py:361/420/582, optimizer.py:671/690,
   clip_grads.py:167) or call ``Tensor.cuda()`` (language_module.py:244, the tied embedding of
   the last pipeline stage). Only while one of them runs, a CPU tensor passes for a CUDA one:
   ``.type()`` reports the ``torch.cuda.*`` name and ``.cuda()`` returns the tensor
   (:func:`_cpu_passes_for_cuda`).
3. **Optimizer state gather.** ``DistributedOptimizer.get_parameter_state_dp_zero`` moves its
   send buffer with ``.cuda()`` unless it gathers over the gloo group (distrib_optimizer.py:1089);
   on CPU every group is gloo, so it is always asked to (``use_gloo_comm=True``).
4. **RNG state for activation recomputation.** ``_get_cuda_rng_state``/``_set_cuda_rng_state``
   (tensor_parallel/random.py:41/72), saved and restored around each recomputed block, act on
   the CPU generator.

:class:`SDPACoreAttention` replaces the local spec's ``DotProductAttention`` (it needs CUDA
buffers) via :func:`adapt_layer_spec`; :func:`set_seed` replaces
``model_parallel_cuda_manual_seed`` (needs CUDA) by a tracker of CPU generator states seeded
with Megatron's offsets.

Not covered (not on this project's paths): CPU offloading of optimizer state (optimizer.py:375),
``tensor_parallel.broadcast_data`` (data.py:84), the fully parallel *load* exchange
(exchange_utils.py:336/499), CUDA graphs, MoE, FSDP.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

#: Megatron-Core modules whose global ``torch`` becomes the CPU proxy, and why (0.16.1 file:line).
CUDA_CALL_SITES: dict[str, str] = {
    "megatron.core.pipeline_parallel.schedules": "zeros(device='cuda') token counters (schedules.py:596/983/2138)",
    "megatron.core.pipeline_parallel.p2p_communication": "PP buffers on current_device, synchronize (p2p_communication.py:190-398)",
    "megatron.core.distributed.param_and_grad_buffer": "DDP buffers on current_device (param_and_grad_buffer.py:783/800/806)",
    "megatron.core.optimizer.optimizer": "tensor(device='cuda') scalars (optimizer.py:473/481/485/907/1141)",
    "megatron.core.optimizer.distrib_optimizer": "state buffers on current_device (distrib_optimizer.py:791/1077)",
    "megatron.core.optimizer.clip_grads": "zeros/tensor(device='cuda') (clip_grads.py:90/103/115/174/207)",
    "megatron.core.optimizer.grad_scaler": "loss scale tensors (grad_scaler.py:15/88-94)",
    "megatron.core.utils": "GlobalMemoryBuffer and l2-norm tensors (utils.py:631/1207)",
    "megatron.core.models.common.embeddings.rotary_pos_embedding": "inv_freq moved to current_device (rotary_pos_embedding.py:162)",
    "megatron.core.models.gpt.gpt_model": "static-batch decode offsets (gpt_model.py:415)",
    "megatron.core.transformer.attention": "static KV cache on current_device (attention.py:430)",
    "megatron.core.tensor_parallel.mappings": "TP gather/scatter buffers (mappings.py:91/141/148/181/442)",
    "megatron.core.tensor_parallel.layers": "sequence-parallel gather buffers (layers.py:552/597/607)",
    "megatron.core.tensor_parallel.data": "broadcast_data buffers (data.py:37/86)",
    "megatron.core.tensor_parallel.utils": "split/gather buffers (tensor_parallel/utils.py:70/91)",
    "megatron.core.dist_checkpointing.strategies.filesystem_async": "synchronize before writing (filesystem_async.py:230)",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver": "failure flags on current_device (state_dict_saver.py:204/252)",
    "megatron.core.dist_checkpointing.strategies.async_utils": "liveness flags (async_utils.py:165/212/604)",
    "megatron.core.dist_checkpointing.strategies.fully_parallel": "synchronize (fully_parallel.py:272/281)",
    "megatron.core.dist_checkpointing.exchange_utils": "empty_like(device='cuda') (exchange_utils.py:104/110/326)",
}

_FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "as_tensor", "arange", "zeros_like",
              "ones_like", "empty_like", "full_like", "rand", "randn", "randint")
_enabled = False


def cuda_absent() -> bool:
    """True when this process has no usable CUDA device: the only switch of this module."""
    return not torch.cuda.is_available()


def use_cpu_initialization() -> bool:
    """Megatron's ``use_cpu_initialization``: parameters are created on the CPU without CUDA."""
    return cuda_absent()


def _is_cuda(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, str) and device.startswith("cuda")


def _on_cpu(factory: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    @functools.wraps(factory)
    def build(*args: Any, **kwargs: Any) -> torch.Tensor:
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return factory(*args, **kwargs)

    return build


class _CpuCuda:
    """``torch.cuda`` as the patched Megatron modules see it."""

    @staticmethod
    def current_device() -> torch.device:
        return torch.device("cpu")

    @staticmethod
    def synchronize(*_: Any, **__: Any) -> None:
        return None

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)


class _CpuTorch:
    """``torch`` as the patched Megatron modules see it: CUDA placements land on the CPU."""

    cuda = _CpuCuda()

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


for _name in _FACTORIES:
    setattr(_CpuTorch, _name, staticmethod(_on_cpu(getattr(torch, _name))))
_CPU_TORCH = _CpuTorch()


@contextlib.contextmanager
def _cpu_passes_for_cuda() -> Iterator[None]:
    """While active, ``cpu_tensor.type()`` (no arguments) reports ``torch.cuda.<Type>`` and
    ``cpu_tensor.cuda()`` returns the tensor itself."""
    original_type, original_cuda = torch.Tensor.type, torch.Tensor.cuda

    def type_name(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        name = original_type(self, *args, **kwargs)
        if args or kwargs or self.device.type != "cpu" or name.startswith("torch.cuda."):
            return name
        return "torch.cuda." + name[len("torch."):]

    def to_cuda(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self if self.device.type == "cpu" else original_cuda(self, *args, **kwargs)

    torch.Tensor.type, torch.Tensor.cuda = type_name, to_cuda  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.type, torch.Tensor.cuda = original_type, original_cuda  # type: ignore[method-assign]


def _run_with_cpu_as_cuda(owner: Any, attr: str) -> None:
    """Wrap ``owner.attr`` (function, method, static- or classmethod) in :func:`_cpu_passes_for_cuda`."""
    raw = owner.__dict__[attr] if isinstance(owner, type) else getattr(owner, attr)
    kind = type(raw) if isinstance(raw, (staticmethod, classmethod)) else None
    fn = raw.__func__ if kind else raw

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with _cpu_passes_for_cuda():
            return fn(*args, **kwargs)

    setattr(owner, attr, kind(wrapped) if kind else wrapped)


def enable() -> bool:
    """Install the CPU redirects into Megatron-Core when CUDA is absent; idempotent.

    Returns whether they are active (False on a GPU machine, where nothing is changed).
    """
    global _enabled
    if _enabled or not cuda_absent():
        return _enabled
    for module_name in CUDA_CALL_SITES:
        importlib.import_module(module_name).torch = _CPU_TORCH

    from megatron.core.models.common.language_module.language_module import LanguageModule
    from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer
    from megatron.core.tensor_parallel import random as megatron_random

    _run_with_cpu_as_cuda(distrib_optimizer.DistributedOptimizer, "_build_model_and_main_param_groups")
    _run_with_cpu_as_cuda(distrib_optimizer.DistributedOptimizer, "__init__")
    _run_with_cpu_as_cuda(optimizer.Float16OptimizerWithFloat16Params, "__init__")
    _run_with_cpu_as_cuda(clip_grads, "clip_grad_by_total_norm_fp32")
    optimizer.clip_grad_by_total_norm_fp32 = clip_grads.clip_grad_by_total_norm_fp32  # imported by name
    _run_with_cpu_as_cuda(LanguageModule, "setup_embeddings_and_output_layer")

    gather = distrib_optimizer.DistributedOptimizer.get_parameter_state_dp_zero

    @functools.wraps(gather)
    def gather_over_gloo(self: Any, use_gloo_comm: bool = True, *args: Any, **kwargs: Any) -> Any:
        return gather(self, True, *args, **kwargs)

    distrib_optimizer.DistributedOptimizer.get_parameter_state_dp_zero = gather_over_gloo

    megatron_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    megatron_random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    _enabled = True
    return True


@functools.cache
def _cpu_tracker_class() -> type:
    from megatron.core.tensor_parallel.random import CudaRNGStatesTracker

    class CpuRNGStatesTracker(CudaRNGStatesTracker):
        """Megatron's named RNG streams kept as states of the CPU generator: ``fork(name)`` swaps
        the CPU generator to the stream ``name`` and back, as the CUDA tracker does on a GPU."""

        def add(self, name: str, seed: int) -> None:
            if seed in self.seeds_ or name in self.states_:
                raise ValueError(f"RNG stream {name!r} or seed {seed} is already tracked")
            self._is_initialized = True
            self.seeds_.add(seed)
            outer = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)

        @contextlib.contextmanager
        def fork(self, name: str = "model-parallel-rng") -> Iterator[None]:
            if name not in self.states_:
                raise KeyError(f"RNG stream {name!r} is not tracked (call cpu_compat.set_seed)")
            outer = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(outer)

    return CpuRNGStatesTracker


def cpu_rng_tracker() -> Any:
    """A new, empty tracker of named CPU RNG streams (a ``CudaRNGStatesTracker`` subclass, built
    lazily because it needs Megatron)."""
    return _cpu_tracker_class()()


def _cpu_model_parallel_seed(seed: int) -> None:
    """``model_parallel_cuda_manual_seed`` on the CPU generator, with Megatron's offsets:
    default stream ``seed`` (the same on every TP rank), ``model-parallel-rng`` seed + 2718 +
    tp_rank, ``expert-parallel-rng`` seed + 1024 + 100·ep_rank + etp_rank."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import random as megatron_random

    ready = ps.model_parallel_is_initialized()
    tp_rank = ps.get_tensor_model_parallel_rank() if ready else 0
    ep_rank = ps.get_expert_model_parallel_rank() if ready else 0
    etp_rank = ps.get_expert_tensor_parallel_rank() if ready else 0
    tracker = cpu_rng_tracker()
    tracker.add(megatron_random._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(megatron_random._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(megatron_random._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024 + 100 * ep_rank + etp_rank)
    megatron_random._CUDA_RNG_STATE_TRACKER = tracker
    megatron_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True


def set_seed(seed: int) -> None:
    """Seed python, numpy and torch's default generator with ``seed``; then Megatron's tracked
    streams: ``model_parallel_cuda_manual_seed(seed)`` on a GPU, CPU generator states with the
    same offsets on the CPU. Call after ``parallel.initialize`` (the TP rank matters)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if cuda_absent():
        enable()
        _cpu_model_parallel_seed(seed)
    else:
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(seed)


class SDPACoreAttention(torch.nn.Module):
    """Core attention via ``torch.nn.functional.scaled_dot_product_attention``.

    Megatron's layout: query [s_q, b, n_q/TP, d], key/value [s_k, b, n_kv/TP, d] (GQA: query
    head j reads KV group j // (n_q/n_kv)); output [s_q, b, n_q·d/TP]. With scale
    c = ``softmax_scale`` or 1/√d, out_i = Σ_j softmax_j(c·q_i·k_j + M_ij) v_j, where M follows
    Megatron's contract:

    * an explicit boolean ``attention_mask`` (True = masked out, broadcastable to
      [b, n, s_q, s_k]) wins;
    * otherwise mask type ``causal`` masks keys j > i + (s_k − s_q), i.e. the queries are the
      *last* s_q positions (bottom-right; equal to the usual causal mask when s_q = s_k);
    * otherwise (``no_mask``: KV-cache decode, s_q = 1) nothing is masked.

    Always passing ``is_causal=True`` would be silently wrong in decode: PyTorch aligns its
    causal mask top-left, so a single query would see only the first key. A query whose keys
    are all masked gets a zero output.
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

        if attention_bias is not None or packed_seq_params is not None:
            raise NotImplementedError("SDPACoreAttention: attention_bias / packed sequences are not supported")
        s_q, batch, heads, dim = query.shape
        s_k = key.shape[0]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, n, s, d]
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        keep: torch.Tensor | None = None  # True = takes part (SDPA's convention)
        causal = attention_mask is None and mask_type == AttnMaskType.causal and s_q > 1
        if attention_mask is not None:
            keep = ~attention_mask
        elif causal and s_q != s_k:  # chunked prefill on top of a KV cache
            keep = torch.ones(s_q, s_k, dtype=torch.bool, device=q.device).tril(diagonal=s_k - s_q)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=keep, is_causal=causal and keep is None,
            dropout_p=self.dropout if self.training else 0.0,
            scale=self.softmax_scale, enable_gqa=k.shape[1] != heads,
        )
        return out.permute(2, 0, 1, 3).reshape(s_q, batch, heads * dim)


def adapt_layer_spec(spec: Any) -> Any:
    """Without CUDA, the local layer spec's core attention becomes :class:`SDPACoreAttention`
    (a ``ModuleSpec``); with CUDA, or for the Transformer Engine spec, ``spec`` is unchanged."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.spec_utils import ModuleSpec

    attention = spec.submodules.self_attention.submodules
    current = getattr(attention.core_attention, "module", attention.core_attention)
    if cuda_absent() and current is DotProductAttention:
        attention.core_attention = ModuleSpec(module=SDPACoreAttention)
    return spec
