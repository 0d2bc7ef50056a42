"""Host memory reuse (ebpo_megatron/host_memory.py): measured with the kernel's own page-fault
counter, in a fresh process (the setting is process-wide)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ebpo_megatron.config.schema import ConfigError, load_config
from ebpo_megatron.host_memory import apply_host_memory_reuse, glibc, user_tuned_malloc

ROOT = Path(__file__).resolve().parents[1]

CYCLES = """
import resource, torch
from ebpo_megatron.host_memory import keep_freed_memory

def faults_of_one_cycle():  # blocks of 64, 32 and 48 MiB, above glibc's largest mmap threshold
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = torch.ones(16 * 2**20); b = torch.ones(8 * 2**20); del a; c = torch.ones(12 * 2**20); del b, c
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

default = [faults_of_one_cycle() for _ in range(4)]
accepted = keep_freed_memory()
reused = [faults_of_one_cycle() for _ in range(16)]
print(default[-1], accepted, max(reused[-3:]))
"""


@pytest.mark.skipif(glibc() is None, reason="mallopt is glibc's: nothing to test on another C library")
def test_freed_blocks_are_reused_without_page_faults():
    """A step-like cycle of large blocks: by default every cycle faults all their pages in
    again; with reuse the heap settles after a few cycles and then faults nothing."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", CYCLES], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120, check=True).stdout.split()
    default, accepted, reused = int(out[0]), out[1] == "True", int(out[2])
    pages = (16 + 8 + 12) * 2**20 * 4 // 4096
    assert default >= pages // 2  # a fresh mmap per block, every page faulted in again
    assert accepted
    assert reused < pages // 50  # served from the memory the heap kept


def test_the_users_own_malloc_tuning_wins(monkeypatch):
    assert not user_tuned_malloc({})
    assert user_tuned_malloc({"MALLOC_MMAP_MAX_": "0"})
    assert user_tuned_malloc({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1"})
    assert not user_tuned_malloc({"GLIBC_TUNABLES": "glibc.cpu.x86_shstk=off"})
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    assert apply_host_memory_reuse(True) is False
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    assert apply_host_memory_reuse(False) is False


def test_the_setting_is_checked():
    config = ROOT / "examples/tiny_cpu.yaml"
    assert load_config(config).run.host_memory_reuse == "auto"
    assert load_config(config, ["run.host_memory_reuse=false"]).run.host_memory_reuse is False
    with pytest.raises(ConfigError, match="host_memory_reuse"):
        load_config(config, ["run.host_memory_reuse=sometimes"])
