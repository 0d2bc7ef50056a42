"""``models.no_grad_linear``: with autograd off, the column- and row-parallel layers give the
float64 full-matrix result Y = X Wᵀ + b and Megatron's own forward, for TP = 1 and 2 (spawned
gloo ranks), with and without the output gathered and the bias added; with autograd on they
run Megatron's forward (its autograd function, so the backward is Megatron's)."""

from __future__ import annotations

import pytest
import torch
from mp_utils import run_ranks

IN, OUT, TOKENS = 12, 8, (3, 2)  # X: [s, b, IN]


def _check_layers(rank: int, world: int) -> list[str]:
    import torch.distributed as dist

    from ebpo_megatron.models import ModelConfig
    from ebpo_megatron.models.builder import transformer_config
    from ebpo_megatron.models.no_grad_linear import NoGradColumnParallelLinear, NoGradRowParallelLinear
    from ebpo_megatron.parallel import ParallelConfig, initialize, launch_info

    model = ModelConfig(num_layers=1, hidden_size=IN, ffn_hidden_size=OUT, num_attention_heads=2,
                        num_kv_heads=2, vocab_size=16, max_position_embeddings=8)
    parallel = ParallelConfig(tensor_parallel=world)
    initialize(parallel, model, launch_info())  # patches Megatron's TP gather to allocate on the CPU
    config = transformer_config(model, parallel)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(*TOKENS, IN, generator=g)
    checked = []

    def randomize(layer: torch.nn.Module) -> None:
        """Random shards, different on each rank (Megatron initializes the bias to zero)."""
        with torch.no_grad():
            for i, p in enumerate(layer.parameters()):
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(100 * rank + i)))

    def gathered(t: torch.Tensor, dim: int) -> torch.Tensor:
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts, dim).double()

    for gather_output in (True, False):
        for skip_bias_add in (False, True):
            layer = NoGradColumnParallelLinear(IN, OUT, config=config, init_method=torch.nn.init.zeros_,
                                               bias=True, gather_output=gather_output,
                                               skip_bias_add=skip_bias_add)
            randomize(layer)
            weight, bias = gathered(layer.weight, 0), gathered(layer.bias, 0)
            with torch.no_grad():
                fast, fast_bias = layer(x)
            megatron, megatron_bias = layer(x)
            assert megatron.grad_fn is not None and fast.grad_fn is None
            full = x.double() @ weight.T + (0 if skip_bias_add else bias)
            mine = fast if gather_output else gathered(fast, -1)
            torch.testing.assert_close(mine.double(), full, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(fast, megatron.detach(), rtol=1e-6, atol=1e-6)
            assert (fast_bias is None) == (megatron_bias is None) == (not skip_bias_add)
            checked.append(f"column gather={gather_output} skip_bias_add={skip_bias_add}")

    for skip_bias_add in (False, True):
        layer = NoGradRowParallelLinear(OUT, IN, config=config, init_method=torch.nn.init.zeros_, bias=True,
                                        input_is_parallel=True, skip_bias_add=skip_bias_add)
        randomize(layer)
        with torch.no_grad():  # the row-parallel bias is replicated
            layer.bias.copy_(torch.randn(IN, generator=torch.Generator().manual_seed(5)))
        x_shard = torch.randn(*TOKENS, OUT // world, generator=torch.Generator().manual_seed(rank + 7))
        with torch.no_grad():
            fast, fast_bias = layer(x_shard)
        megatron, megatron_bias = layer(x_shard)
        assert megatron.grad_fn is not None and fast.grad_fn is None
        full = gathered(x_shard, -1) @ gathered(layer.weight, 1).T + (0 if skip_bias_add else layer.bias.double())
        torch.testing.assert_close(fast.double(), full, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(fast, megatron.detach(), rtol=1e-6, atol=1e-6)
        assert (fast_bias is None) == (megatron_bias is None) == (not skip_bias_add)
        checked.append(f"row skip_bias_add={skip_bias_add}")
    return checked


@pytest.mark.parametrize("tp", [1, 2])
def test_no_grad_forward_equals_full_matrix_and_megatron(tp: int) -> None:
    results = run_ranks(_check_layers, tp)
    assert all(len(r) == 6 for r in results)
