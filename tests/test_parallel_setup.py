"""Launch environment parsing (torchrun, Slurm) and the CPU compatibility module."""

from __future__ import annotations

import pytest
import torch

from ebpo_megatron.parallel.distributed import ParallelConfig, first_host, launch_info, process_group_backend
from mp_utils import run_ranks


def test_torchrun_environment():
    info = launch_info({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.2",
                        "MASTER_PORT": "6000"})
    assert (info.rank, info.world_size, info.local_rank, info.master_addr, info.master_port) == (3, 8, 1, "10.0.0.2", 6000)


def test_slurm_environment_takes_master_from_the_node_list():
    info = launch_info({"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
                        "SLURM_JOB_NODELIST": "gpu[003-004,010]"})
    assert (info.rank, info.world_size, info.local_rank, info.master_addr, info.master_port) == (9, 16, 1, "gpu003", 29500)
    assert first_host("node7") == "node7" and first_host("a[10-12],b1") == "a10"


def test_single_process_default():
    info = launch_info({})
    assert (info.rank, info.world_size) == (0, 1) and info.master_port > 0


def test_process_group_backend_keeps_host_tensors_on_gloo_with_cuda():
    """With CUDA, NCCL carries CUDA tensors and gloo the host ones (metric sums, the estimator's
    group table, the prior); torch parses the per-device form."""
    assert process_group_backend(False) == "gloo"
    mixed = process_group_backend(True)
    assert mixed == "cpu:gloo,cuda:nccl"
    config = torch.distributed.distributed_c10d.BackendConfig(torch.distributed.Backend(mixed))
    assert config.get_device_backend_map() == {"cpu": "gloo", "cuda": "nccl"}


def test_parallel_config_rules():
    with pytest.raises(ValueError, match="sequence_parallel needs tensor_parallel > 1"):
        ParallelConfig(sequence_parallel=True)
    with pytest.raises(ValueError, match="virtual_pipeline"):
        ParallelConfig(virtual_pipeline=1)


def _attention(rank, world):
    from megatron.core.transformer.enums import AttnMaskType

    from ebpo_megatron.parallel.cpu_compat import SDPACoreAttention

    class Cfg:
        attention_dropout = 0.0

    attn = SDPACoreAttention(Cfg(), 1, AttnMaskType.causal, "self").eval()
    g = torch.Generator().manual_seed(0)
    s, b, heads, kv, d = 6, 2, 4, 2, 8
    q, k, v = (torch.randn(s, b, n, d, generator=g) for n in (heads, kv, kv))
    full = attn(q, k, v)
    # decode: the last query against all keys, mask type no_mask (as Megatron passes it)
    last = attn(q[-1:], k, v, attn_mask_type=AttnMaskType.no_mask)
    # chunked: the last 2 queries against all keys, causal, bottom-right aligned
    tail = attn(q[-2:], k, v, attn_mask_type=AttnMaskType.causal)
    return float((last[0] - full[-1]).abs().max()), float((tail - full[-2:]).abs().max())


def test_sdpa_core_attention_is_right_in_prefill_decode_and_chunks():
    decode_diff, chunk_diff = run_ranks(_attention, 1)[0]
    assert decode_diff < 1e-6 and chunk_diff < 1e-6
