"""The one name/layout table between Megatron-Core GPTModel parameters and Hugging Face
Llama / Qwen2 / Qwen3 checkpoints, shared by the weight export (rollout sync) and the
checkpoint converters in ``tools/``.

Megatron layouts (per layer i; n_q query heads, n_kv KV heads, d = head dim, h = hidden, f = FFN):
- ``self_attention.linear_qkv.weight`` [(n_q + 2 n_kv)·d, h], grouped per KV head g as
  [q heads of group g (n_q/n_kv of them), k_g, v_g]; bias likewise (Qwen2).
- ``mlp.linear_fc1.weight`` [2f, h] = [gate; up] (SwiGLU), and a TP rank r holds
  [gate_r; up_r], so TP shards must be split and re-joined, not concatenated.
- embeddings and the output layer are vocabulary-parallel and padded to a multiple of TP.
- norms: ``input_layernorm`` / ``pre_mlp_layernorm`` in the local spec, fused into
  ``linear_qkv.layer_norm_weight`` / ``linear_fc1.layer_norm_weight`` in the TE spec.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class Layout:
    """The shape facts the mapping needs (from ``ModelConfig``)."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int  # real vocabulary (HF); Megatron's may be padded
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool

    @classmethod
    def from_model_config(cls, cfg) -> "Layout":
        head_dim = cfg.head_dim or cfg.hidden_size // cfg.num_attention_heads
        return cls(cfg.num_layers, cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_attention_heads,
                   cfg.num_kv_heads, head_dim, cfg.vocab_size, cfg.tie_word_embeddings,
                   cfg.qkv_bias, cfg.qk_norm)

    @property
    def q_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads


# ------------------------------------------------------------------------- TP sharding
def tp_partition(megatron_name: str) -> str:
    """How a Megatron parameter is split over TP ranks: 'vocab', 'rows', 'cols', 'gated_rows'
    (fc1: [gate_r; up_r] per rank) or 'replicated'."""
    suffix = _LAYER.sub(r"\2", megatron_name)
    if suffix in ("embedding.word_embeddings.weight", "output_layer.weight"):
        return "vocab"
    if suffix.startswith("self_attention.linear_qkv.") and not suffix.endswith("layer_norm_weight"):
        return "rows"
    if suffix == "mlp.linear_fc1.weight":
        return "gated_rows"
    if suffix in ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight"):
        return "cols"
    return "replicated"


def merge_tp_shards(megatron_name: str, shards: list[torch.Tensor]) -> torch.Tensor:
    """The full tensor from the TP shards in rank order (inverse of :func:`shard_for_rank`)."""
    kind = tp_partition(megatron_name)
    if kind == "replicated" or len(shards) == 1:
        return shards[0]
    if kind == "cols":
        return torch.cat(shards, dim=1)
    if kind == "gated_rows":
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(shards, dim=0)


def shard_for_rank(megatron_name: str, full: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """TP rank ``rank``'s shard of a full Megatron tensor (vocab rows must be padded already)."""
    kind = tp_partition(megatron_name)
    if kind == "replicated" or size == 1:
        return full
    if kind == "cols":
        return full.chunk(size, dim=1)[rank]
    if kind == "gated_rows":
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(size, dim=0)[rank], up.chunk(size, dim=0)[rank]], dim=0)
    return full.chunk(size, dim=0)[rank]


# ------------------------------------------------------------------- Megatron -> HF
_LAYER_SIMPLE = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "post_attention_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
    "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}


def _layer_parts(name: str) -> tuple[str, str]:
    """(HF prefix ``model.layers.<i>.``, Megatron suffix) of a global layer parameter name."""
    match = _LAYER.match(name)
    if not match:
        raise KeyError(f"{name}: no Hugging Face mapping for this Megatron parameter")
    layer, suffix = match.groups()
    return f"model.layers.{layer}.", suffix


def _split_qkv(tensor: torch.Tensor, layout: Layout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    d, g, qg = layout.head_dim, layout.num_kv_heads, layout.q_per_group
    grouped = tensor.reshape(g, (qg + 2) * d, *tensor.shape[1:])
    q = grouped[:, : qg * d].reshape(g * qg * d, *tensor.shape[1:])
    k = grouped[:, qg * d: (qg + 1) * d].reshape(g * d, *tensor.shape[1:])
    v = grouped[:, (qg + 1) * d:].reshape(g * d, *tensor.shape[1:])
    return q, k, v


def _join_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Layout) -> torch.Tensor:
    d, g, qg = layout.head_dim, layout.num_kv_heads, layout.q_per_group
    rest = q.shape[1:]
    grouped = torch.cat(
        [q.reshape(g, qg * d, *rest), k.reshape(g, d, *rest), v.reshape(g, d, *rest)], dim=1
    )
    return grouped.reshape(g * (qg + 2) * d, *rest)


def megatron_to_hf(name: str, tensor: torch.Tensor, layout: Layout) -> list[tuple[str, torch.Tensor]]:
    """HF (name, tensor) pairs for one *full* (TP-merged) Megatron tensor with a global layer
    index. Vocabulary padding is removed; the output layer is dropped when embeddings are tied."""
    if name == "embedding.word_embeddings.weight":
        return [("model.embed_tokens.weight", tensor[: layout.vocab_size])]
    if name == "output_layer.weight":
        return [] if layout.tie_word_embeddings else [("lm_head.weight", tensor[: layout.vocab_size])]
    if name == "decoder.final_layernorm.weight":
        return [("model.norm.weight", tensor)]
    prefix, suffix = _layer_parts(name)
    if suffix in _LAYER_SIMPLE:
        return [(prefix + _LAYER_SIMPLE[suffix], tensor)]
    if suffix in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        kind = suffix.rsplit(".", 1)[1]
        q, k, v = _split_qkv(tensor, layout)
        return [(f"{prefix}self_attn.{p}_proj.{kind}", t) for p, t in zip("qkv", (q, k, v))]
    if suffix == "mlp.linear_fc1.weight":
        gate, up = tensor.chunk(2, dim=0)
        return [(prefix + "mlp.gate_proj.weight", gate), (prefix + "mlp.up_proj.weight", up)]
    raise KeyError(f"{name}: no Hugging Face mapping for this Megatron parameter")


# ------------------------------------------------------------------- HF -> Megatron
def hf_to_megatron(
    name: str, get_hf: Callable[[str], torch.Tensor], layout: Layout, padded_vocab: int
) -> torch.Tensor:
    """The full Megatron tensor ``name`` (global layer index) built from HF tensors fetched one
    at a time with ``get_hf(hf_name)``; vocabulary rows are zero-padded to ``padded_vocab``."""
    if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        source = "model.embed_tokens.weight" if (
            name.startswith("embedding") or layout.tie_word_embeddings) else "lm_head.weight"
        weight = get_hf(source)
        if weight.shape[0] > padded_vocab:
            raise ValueError(f"{source}: {weight.shape[0]} rows exceed the padded vocabulary {padded_vocab}")
        pad = weight.new_zeros(padded_vocab - weight.shape[0], weight.shape[1])
        return torch.cat([weight, pad], dim=0)
    if name == "decoder.final_layernorm.weight":
        return get_hf("model.norm.weight")
    prefix, suffix = _layer_parts(name)
    if suffix in _LAYER_SIMPLE:
        return get_hf(prefix + _LAYER_SIMPLE[suffix])
    if suffix in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        kind = suffix.rsplit(".", 1)[1]
        q, k, v = (get_hf(f"{prefix}self_attn.{p}_proj.{kind}") for p in "qkv")
        return _join_qkv(q, k, v, layout)
    if suffix == "mlp.linear_fc1.weight":
        return torch.cat([get_hf(prefix + "mlp.gate_proj.weight"), get_hf(prefix + "mlp.up_proj.weight")], 0)
    raise KeyError(f"{name}: no Hugging Face mapping for this Megatron parameter")


def global_layer_name(local_name: str, layer_offset: int) -> str:
    """Megatron names a PP stage's layers from 0: shift them to the global index."""
    match = _LAYER.match(local_name)
    if not match:
        return local_name
    return f"decoder.layers.{int(match.group(1)) + layer_offset}.{match.group(2)}"


def expected_hf_shapes(layout: Layout) -> dict[str, tuple[int, ...]]:
    """Every tensor of the matching HF checkpoint and its shape, in checkpoint order."""
    h, f, d = layout.hidden_size, layout.ffn_hidden_size, layout.head_dim
    q, kv = layout.num_heads * d, layout.num_kv_heads * d
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (layout.vocab_size, h)}
    for i in range(layout.num_layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                       p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q)})
        if layout.qkv_bias:
            shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                           p + "self_attn.v_proj.bias": (kv,)})
        if layout.qk_norm:
            shapes.update({p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,)})
        shapes.update({p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                       p + "mlp.down_proj.weight": (h, f)})
    shapes["model.norm.weight"] = (h,)
    if not layout.tie_word_embeddings:
        shapes["lm_head.weight"] = (layout.vocab_size, h)
    return shapes


def expected_hf_names(layout: Layout) -> Iterator[str]:
    """Every tensor name of the matching HF checkpoint (for completeness checks)."""
    yield from expected_hf_shapes(layout)
