"""oneDNN-prepacked bf16 weights of the no-grad linear layers (models.prepacked_linear): the same
products as ``F.linear``, packed only where they can be, for the native engine's generate only."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from ebpo_megatron.models import ModelConfig
from ebpo_megatron.models.prepacked_linear import can_prepack
from mp_utils import run_ranks

CFG = ModelConfig(family="llama", num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
                  num_kv_heads=2, vocab_size=90, max_position_embeddings=40, tie_word_embeddings=True,
                  precision="bf16")
PROMPTS = [[5, 9, 14, 3], [7, 2], [11, 12, 13, 14, 15, 16, 17], [4]]
needs_onednn = pytest.mark.skipif(not can_prepack(torch.zeros(1, dtype=torch.bfloat16)),
                                  reason="this PyTorch has no oneDNN (nothing is packed there)")


@needs_onednn
@pytest.mark.parametrize("shape", [(32, 576), (1, 8, 576), (59, 8, 576)])
def test_packed_product_equals_f_linear(shape):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(960, 576, generator=g).bfloat16()
    bias = torch.randn(960, generator=g).bfloat16()
    x = torch.randn(*shape, generator=g).bfloat16()
    packed = torch.ops.mkldnn._reorder_linear_weight(weight, 32)
    got = torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    want = x.double() @ weight.double().T + bias.double()
    assert torch.equal(got, F.linear(x, weight, bias))
    # one bf16 rounding of the output plus float32 accumulation over 576 terms
    bound = 2**-8 * want.abs() + 2**-20 * (x.double().abs() @ weight.double().abs().T + bias.double().abs())
    assert bool(((got.double() - want).abs() <= bound).all())


def test_only_bf16_cpu_weights_are_packed():
    assert can_prepack(torch.zeros(2, 2, dtype=torch.bfloat16)) == torch.backends.mkldnn.is_available()
    assert not can_prepack(torch.zeros(2, 2))
    assert not can_prepack(torch.zeros(2, 2, dtype=torch.float16))


def _packed_runs(rank, world, precision, tied):
    from ebpo_megatron.models import build_policy
    from ebpo_megatron.models.prepacked_linear import PrepackableLinear, prepacked_weights
    from ebpo_megatron.parallel import ParallelConfig, cpu_compat, initialize
    from ebpo_megatron.rollout import native_engine
    from ebpo_megatron.rollout.base import SamplingParams
    from ebpo_megatron.rollout.native_engine import NativeEngine

    cfg = dataclasses.replace(CFG, precision=precision, tie_word_embeddings=tied)
    initialize(ParallelConfig(), cfg)
    cpu_compat.set_seed(0)
    model = build_policy(cfg, ParallelConfig())[0]
    layers = [m for m in model.modules() if isinstance(m, PrepackableLinear)]
    tokens = torch.tensor([[5, 9, 14, 3, 7, 2]])
    positions = torch.arange(6).unsqueeze(0)
    with torch.no_grad():
        plain = model(tokens, positions, None)
        with prepacked_weights(model, rows=4) as packed:
            inside = model(tokens, positions, None)
            held = sum(layer.prepacked is not None for layer in layers)
    out = {"layers": len(layers), "packed": packed, "held": held,
           "left": sum(layer.prepacked is not None for layer in layers),
           "forward_equal": torch.equal(plain, inside)}
    engine = NativeEngine(model, pad_token_id=0, max_sequence_length=cfg.max_position_embeddings)
    params = SamplingParams(n=3, temperature=0.8, max_new_tokens=10, seed=4)
    runs = [engine.generate(PROMPTS, params)]
    native_engine.prepacked_weights = lambda model, rows: contextlib.nullcontext(0)
    runs.append(engine.generate(PROMPTS, params))
    out["same_samples"] = (runs[0].response_ids, runs[0].logprobs) == (runs[1].response_ids, runs[1].logprobs)
    out["sampled_tokens"] = sum(len(r) for r in runs[0].response_ids)
    return out


@needs_onednn
@pytest.mark.parametrize("tied", [True, False])
def test_bf16_model_generates_the_same_samples_from_packed_weights(tied):
    """Every linear layer of a bf16 model, the output layer included (from the embedding when
    tied), is packed inside ``prepacked_weights`` and released after it; the forward and the
    native engine's samples and log-probs are identical to the unpacked ones."""
    out = run_ranks(_packed_runs, 1, "bf16", tied)[0]
    assert out["layers"] == 4 * CFG.num_layers + 1
    assert out["packed"] == out["held"] == out["layers"] and out["left"] == 0
    assert out["forward_equal"] and out["same_samples"] and out["sampled_tokens"] > 20


def test_float32_model_packs_nothing():
    out = run_ranks(_packed_runs, 1, "fp32", True)[0]
    assert out["packed"] == out["held"] == 0 and out["forward_equal"] and out["same_samples"]
