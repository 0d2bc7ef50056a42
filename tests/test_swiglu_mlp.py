"""``models.swiglu_mlp``: silu(y₁) ⊙ y₂ and its gradient equal a float64 autograd reference and
gradcheck; an ``MLP`` turned into a ``SwiGLUMLP`` gives Megatron's output and input / weight
gradients for the same weights; ``build_policy`` turns every layer's MLP; a clamped SwiGLU falls
back to Megatron's forward."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from mp_utils import run_ranks

from ebpo_megatron.models.swiglu_mlp import swiglu


def _reference(y: torch.Tensor) -> torch.Tensor:
    gate, up = y.double().chunk(2, -1)
    return gate * torch.sigmoid(gate) * up


def test_swiglu_and_gradient_equal_float64_reference() -> None:
    torch.manual_seed(0)
    y = (3 * torch.randn(5, 3, 2 * 24)).requires_grad_()
    y_ref = y.detach().double().requires_grad_()
    out = swiglu(y)
    ref = _reference(y_ref)
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-6)
    upstream = torch.randn(out.shape)
    (out * upstream).sum().backward()
    (ref * upstream.double()).sum().backward()
    torch.testing.assert_close(y.grad.double(), y_ref.grad, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(swiglu(y).double(), ref.detach(), rtol=1e-6, atol=1e-6)


def test_gradcheck_float64() -> None:
    y = torch.randn(4, 2, 10, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(swiglu, (y,))


def _compare_with_megatron_mlp(rank: int, world: int) -> dict[str, float]:
    from megatron.core.transformer.mlp import MLP

    from ebpo_megatron.models import ModelConfig, build_policy
    from ebpo_megatron.models.builder import layer_spec, transformer_config
    from ebpo_megatron.models.swiglu_mlp import SwiGLUMLP, use_swiglu_mlp
    from ebpo_megatron.parallel import ParallelConfig, initialize, launch_info

    model = ModelConfig(num_layers=2, hidden_size=16, ffn_hidden_size=24, num_attention_heads=2,
                        num_kv_heads=2, vocab_size=32, max_position_embeddings=8)
    initialize(ParallelConfig(), model, launch_info())
    built = build_policy(model, ParallelConfig())[0]
    config = transformer_config(model, ParallelConfig())
    submodules = layer_spec(model).submodules.mlp.submodules
    ours, theirs = MLP(config, submodules), MLP(config, submodules)
    ours.load_state_dict(theirs.state_dict())
    use_swiglu_mlp(ours)
    x = torch.randn(6, 2, 16)
    x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ours, bias_ours = ours(x_ours)
    out_theirs, bias_theirs = theirs(x_theirs)
    upstream = torch.randn(out_ours.shape)
    (out_ours * upstream).sum().backward()
    (out_theirs * upstream).sum().backward()
    diffs = {"out": float((out_ours - out_theirs).abs().max()),
             "x_grad": float((x_ours.grad - x_theirs.grad).abs().max()),
             "bias_none": float(bias_ours is None and bias_theirs is None),
             "plain": float(ours.plain_swiglu), "converted": float(type(ours) is SwiGLUMLP),
             "built": float(sum(type(m) is SwiGLUMLP for m in built.modules()))}
    for (name, p_ours), p_theirs in zip(ours.named_parameters(), theirs.parameters()):
        diffs[f"{name}.grad"] = float((p_ours.grad - p_theirs.grad).abs().max())
    config.activation_func_clamp_value = 1.0  # not plain SwiGLU: Megatron's forward
    diffs["clamped_plain"] = float(ours.plain_swiglu)
    assert ours.activation_func is F.silu
    return diffs


def test_swiglu_mlp_equals_megatron_mlp() -> None:
    diffs = run_ranks(_compare_with_megatron_mlp, 1)[0]
    assert diffs.pop("plain") == 1.0 and diffs.pop("clamped_plain") == 0.0 and diffs.pop("bias_none") == 1.0
    assert diffs.pop("converted") == 1.0 and diffs.pop("built") == 2.0  # build_policy: every layer's MLP
    assert len(diffs) == 4, diffs  # out, x_grad, fc1 and fc2 weight gradients
    for name, diff in diffs.items():
        assert diff < 1e-5, (name, diff)
