"""CPU compatibility for Megatron-Core: CPU seeding and SDPA core attention.

Everything here is active only when CUDA is absent (``torch.cuda.is_available()`` is False); on
a GPU machine :func:`set_seed` takes Megatron's CUDA path and :func:`adapt_layer_spec` changes
nothing. The process-wide patches that let Megatron-Core run on the CPU at all (CUDA call
sites, ``Tensor.type()``/``.cuda()``, the optimizer state gather, the RNG state of activation
recomputation) are patch A of ``parallel.megatron_patches``, installed by ``parallel.initialize``;
tests/test_cpu_compat.py covers both.

:class:`SDPACoreAttention` replaces the local spec's ``DotProductAttention`` (it needs CUDA
buffers) via :func:`adapt_layer_spec`; :func:`set_seed` replaces
``model_parallel_cuda_manual_seed`` (needs CUDA) by a tracker of CPU generator states seeded
with Megatron's offsets, installed as Megatron's tracker as that function installs its own.
"""

from __future__ import annotations

import contextlib
import functools
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


def cuda_absent() -> bool:
    """True when this process has no usable CUDA device: the only switch of the CPU code."""
    return not torch.cuda.is_available()


def use_cpu_initialization() -> bool:
    """Megatron's ``use_cpu_initialization``: parameters are created on the CPU without CUDA."""
    return cuda_absent()


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

    A single query position per sequence (a decode step) without dropout is computed as two
    products per KV group instead of by SDPA: the n/n_kv query heads of group g are the rows of
    softmax(c·Q_g K_gᵀ + M) V_g, so the cached keys are neither copied per query head (SDPA's
    GQA) nor passed through its flash kernel, whose set-up dominates at one query: SmolLM2's
    shape (32 sequences, 9 query / 3 KV heads, 75 cached float32 keys, caches larger than the
    CPU's), 0.6 → 0.42 ms per layer.

    Half-precision q, k, v (bf16 / fp16) are computed in float32 and the output cast back, as
    Megatron's ``attention_softmax_in_fp32`` does for the softmax. On CPUs without AMX PyTorch's
    bf16 CPU attention kernels are slower than its fp32 ones (AMD EPYC, AVX-512-bf16, 2 threads:
    one decode step of 32 × 9 heads over 91 keys 3.7 ms in bf16, 0.37 ms upcast; forward +
    backward of 8 × 94 tokens 11.6 vs 6.9 ms), and the casts cost less than that difference.
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
        if q.dtype in (torch.bfloat16, torch.float16):
            q, k, v = q.float(), k.float(), v.float()
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        keep: torch.Tensor | None = None  # True = takes part (SDPA's convention)
        causal = attention_mask is None and mask_type == AttnMaskType.causal and s_q > 1
        if attention_mask is not None:
            keep = ~attention_mask
        elif causal and s_q != s_k:  # chunked prefill on top of a KV cache
            keep = torch.ones(s_q, s_k, dtype=torch.bool, device=q.device).tril(diagonal=s_k - s_q)
        dropout = self.dropout if self.training else 0.0
        if s_q == 1 and dropout == 0.0 and (keep is None or keep.dim() == 4 and keep.shape[1] == 1):
            out = single_query_attention(q, k, v, keep, self.softmax_scale)
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=keep, is_causal=causal and keep is None, dropout_p=dropout,
                scale=self.softmax_scale, enable_gqa=k.shape[1] != heads,
            )
        return out.to(query.dtype).permute(2, 0, 1, 3).reshape(s_q, batch, heads * dim)


def single_query_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           keep: torch.Tensor | None, scale: float | None) -> torch.Tensor:
    """Attention of one query position: query [b, n, 1, d], key/value [b, n_kv, s_k, d], ``keep``
    (True = takes part) broadcastable to [b, 1, 1, s_k] or None; out [b, n, 1, d] with
    out_h = Σ_j softmax_j(c·q_h·k_{g,j} + M_j) v_{g,j}, g = h // (n/n_kv), c = ``scale`` or 1/√d.
    The query heads of a group are the rows of one product with its keys; a query with no key
    to attend to gets 0 (as ``SDPACoreAttention``'s contract says)."""
    batch, heads, _, dim = query.shape
    groups = key.shape[1]
    rows = query.reshape(batch, groups, heads // groups, dim)
    scores = torch.matmul(rows, key.transpose(-1, -2)).mul_(dim ** -0.5 if scale is None else scale)
    if keep is not None:
        scores.masked_fill_(~keep, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    if keep is not None:
        weights = weights.nan_to_num_(0.0)
    return torch.matmul(weights, value).reshape(batch, heads, 1, dim)


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
