"""``parallel.megatron_patches``: the Megatron-Core version check (a clear error on an untested
release, a warning with ``EBPO_ALLOW_UNTESTED_MEGATRON=1``), and ``parallel.initialize`` as the
one place the patches are switched on: once, before any model, which then runs on them."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch
from mp_utils import run_ranks

from ebpo_megatron.models import ModelConfig
from ebpo_megatron.parallel import megatron_patches

TINY = ModelConfig(family="llama", num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
                   num_kv_heads=2, vocab_size=128, max_position_embeddings=32)


def _fake_megatron_version(monkeypatch: pytest.MonkeyPatch, version: str) -> None:
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda name: version if name == "megatron-core" else real(name))


def test_installed_megatron_core_is_supported() -> None:
    assert megatron_patches.check_megatron_version().startswith(megatron_patches.SUPPORTED_MEGATRON_CORE)
    assert megatron_patches.TESTED_MEGATRON_CORE.startswith(megatron_patches.SUPPORTED_MEGATRON_CORE)


def test_untested_megatron_core_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EBPO_ALLOW_UNTESTED_MEGATRON", raising=False)
    _fake_megatron_version(monkeypatch, "0.17.0")
    with pytest.raises(RuntimeError) as err:
        megatron_patches.check_megatron_version()
    message = str(err.value)
    for part in ("megatron-core 0.17.0 is installed", "0.16.x", "pip install megatron-core==0.16.1",
                 "EBPO_ALLOW_UNTESTED_MEGATRON=1"):
        assert part in message


def test_env_override_warns_instead(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_megatron_version(monkeypatch, "0.15.3")
    monkeypatch.setenv("EBPO_ALLOW_UNTESTED_MEGATRON", "1")
    with pytest.warns(RuntimeWarning, match="megatron-core 0.15.3 is installed"):
        assert megatron_patches.check_megatron_version() == "0.15.3"


def _patched_state() -> dict[str, bool]:
    from megatron.core.distributed import param_and_grad_buffer as buffers
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.transformer import attention

    from ebpo_megatron.parallel import rope

    return {
        "rope": attention.apply_rotary_pos_emb is rope.apply_rotary_pos_emb,
        "cpu": schedules.torch is megatron_patches._CPU_TORCH,
        "optimizer_load": DistributedOptimizer._set_main_param_and_optimizer_states.__module__
        == megatron_patches.__name__,
        # wrapped exactly once: the wrapper's __wrapped__ is torch's own collective
        "collectives_once": getattr(buffers.dist_all_gather_func, "__wrapped__", None)
        in (torch.distributed.all_gather_into_tensor, torch.distributed._all_gather_base),
    }


def _apply_then_build(rank: int, world: int) -> dict:
    import os
    import warnings

    from megatron.core.transformer.mlp import MLP

    from ebpo_megatron.models import build_policy
    from ebpo_megatron.parallel import ParallelConfig, cpu_compat, initialize, rope

    out = {}
    real = importlib.metadata.version
    importlib.metadata.version = lambda name: "0.17.0" if name == "megatron-core" else real(name)
    os.environ.pop("EBPO_ALLOW_UNTESTED_MEGATRON", None)
    try:
        initialize(ParallelConfig(), TINY)
    except RuntimeError as err:
        out["refused"] = str(err)
    out["after_refusal"] = _patched_state()  # the check comes before any patch or process group
    out["groups_after_refusal"] = torch.distributed.is_initialized()
    importlib.metadata.version = real

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        initialize(ParallelConfig(), TINY)
    out["warnings"] = [str(w.message) for w in caught if "megatron-core" in str(w.message)]
    out["after_initialize"] = _patched_state()
    megatron_patches.apply_megatron_patches()  # again: nothing changes
    out["after_second_apply"] = _patched_state()

    cpu_compat.set_seed(0)
    model = build_policy(TINY, ParallelConfig())[0]
    rotations = []
    fast = rope.rotate_half_pairs
    rope.rotate_half_pairs = lambda *args, **kwargs: rotations.append(1) or fast(*args, **kwargs)
    tokens = torch.randint(0, TINY.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    model(tokens, torch.arange(8).expand_as(tokens), None).sum().backward()
    out["rotations"] = len(rotations)  # queries and keys of each layer: our RoPE
    out["mlp"] = sorted({type(m).__name__ for m in model.modules() if isinstance(m, MLP)})
    out["core_attention"] = sorted({type(layer.self_attention.core_attention).__name__
                                    for layer in model.decoder.layers})
    return out


@pytest.mark.skipif(torch.cuda.is_available(), reason="patch A (Megatron on the CPU) is installed only without CUDA")
def test_initialize_applies_the_patches_once_and_models_run_on_them() -> None:
    out = run_ranks(_apply_then_build, 1)[0]
    assert "megatron-core 0.17.0 is installed" in out["refused"]
    assert not any(out["after_refusal"].values()) and not out["groups_after_refusal"]
    assert out["warnings"] == []
    assert all(out["after_initialize"].values()), out["after_initialize"]
    assert out["after_second_apply"] == out["after_initialize"]
    assert out["rotations"] == 2 * TINY.num_layers
    assert out["mlp"] == ["SwiGLUMLP"] and out["core_attention"] == ["SDPACoreAttention"]
