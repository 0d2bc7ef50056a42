"""fp32 main parameters of the warm start (trainer/main_params.py): a bf16 weight follows the
fp32 trajectory (rounded) where updating the bf16 weight itself would not move it at all."""

from __future__ import annotations

import torch

from ebpo_megatron.trainer.main_params import MainParams


def _train(weight: torch.Tensor, steps: int, main_params: bool) -> torch.Tensor:
    param = torch.nn.Parameter(weight.clone())
    main = MainParams([param]) if main_params else None
    optimizer = torch.optim.SGD(main.main if main else [param], lr=1e-3)
    for _ in range(steps):
        param.grad = None
        (param.float() * 1.0).sum().backward()  # gradient 1: each step moves the weight by -1e-3
        if main:
            main.grads_to_main()
        optimizer.step()
        if main:
            main.main_to_params()
    return param.detach()


def test_bf16_weight_follows_the_fp32_main_weight():
    start = torch.ones(4, dtype=torch.bfloat16)  # bf16 spacing at 1 is 2^-7: a 1e-3 step rounds away
    assert torch.equal(_train(start, 20, main_params=False), start)  # pure bf16: stuck
    moved = _train(start, 20, main_params=True)
    assert moved.dtype == torch.bfloat16
    torch.testing.assert_close(moved, torch.full((4,), 0.98).to(torch.bfloat16), rtol=0, atol=0)


def test_fp32_parameters_are_their_own_main_parameters():
    param = torch.nn.Parameter(torch.ones(3))
    main = MainParams([param])
    assert main.main[0] is param
