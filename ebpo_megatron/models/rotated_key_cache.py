"""``RotatedKeyCacheAttention``: Megatron-Core's ``SelfAttention`` whose static KV cache holds
keys *after* RoPE.

Megatron stores keys before the rotation and, at every decode step, rotates the whole cached
prefix again: O(t) extra work per layer at step t (``apply_rotary_pos_emb`` over keys 0..t). The
rotation of key j depends only on its own position j, R(j)·k_j, so rotating each key once, when it
is written to the cache, gives the same keys: this class rotates the new keys at their positions
[offset, offset + n) before Megatron stores them and tells the rest of ``forward`` that the keys
need no rotation (key embedding ``None``). Queries are rotated as before. Training (no inference
context) and the dynamic-batching context are unchanged.

Where the core attention computes half-precision inputs in float32 anyway (``SDPACoreAttention``
on the CPU, ``parallel.cpu_compat``), the rotated keys and the values are cast to float32 before
they are cached, so the cache is float32: the same numbers that attention would otherwise get by
casting the whole cached prefix at every decode step (SmolLM2 bf16, 8 prompts x 4 samples x 32
tokens: 60 casts of [32, 3, ~75, 64] per step, ~0.4 s of a 3.5 s rollout).
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core.transformer.attention import SelfAttention, _yarn_get_concentration_factor_from_config

from ..parallel.cpu_compat import SDPACoreAttention
from ..parallel.rope import apply_rotary_pos_emb


class RotatedKeyCacheAttention(SelfAttention):
    """``SelfAttention`` with a cache of rotated keys under static batching (module docstring)."""

    def _adjust_key_value_for_inference(self, inference_context: Any, query: Any, key: Any, value: Any,
                                        rotary_pos_emb: Any, *args: Any, **kwargs: Any) -> tuple:
        if (inference_context is None or not inference_context.is_static_batching()
                or rotary_pos_emb is None or self.config.flash_decode):
            return super()._adjust_key_value_for_inference(
                inference_context, query, key, value, rotary_pos_emb, *args, **kwargs)
        q_pos_emb, k_pos_emb = rotary_pos_emb
        start = inference_context.sequence_len_offset
        key = apply_rotary_pos_emb(
            key, k_pos_emb[start: start + key.size(0)], config=self.config,
            mscale=_yarn_get_concentration_factor_from_config(self.config), cp_group=self.pg_collection.cp)
        if key.dtype in (torch.bfloat16, torch.float16) and isinstance(self.core_attention, SDPACoreAttention):
            key, value = key.float(), value.float()  # the cache takes their dtype
        query, key, value, (q_pos_emb, _), mask_type, block_table = super()._adjust_key_value_for_inference(
            inference_context, query, key, value, (q_pos_emb, k_pos_emb), *args, **kwargs)
        return query, key, value, (q_pos_emb, None), mask_type, block_table
