"""``model.precision: auto`` and ``algorithm.loss.tis_cap: auto`` (config/precision.py): the
native-bf16 detection from /proc/cpuinfo text, and resolution to concrete values at load."""

from __future__ import annotations

import pytest

from ebpo_megatron.config import precision
from ebpo_megatron.config.schema import dump_config, load_config

SAPPHIRE_RAPIDS = """processor\t: 0
vendor_id\t: GenuineIntel
flags\t\t: fpu vme sse2 avx2 avx512f avx512bw amx_bf16 amx_tile amx_int8 avx512_bf16
processor\t: 1
flags\t\t: fpu vme sse2 avx2 avx512f avx512bw amx_bf16 amx_tile amx_int8 avx512_bf16
"""
SKYLAKE = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) CPU avx512_bf16-free
flags\t\t: fpu vme sse2 avx2 avx512f avx512bw avx512vl
"""


def test_cpu_flags_with_and_without_native_bf16():
    assert precision.cpu_bf16_flags(SAPPHIRE_RAPIDS) == ["amx_bf16", "avx512_bf16"]
    assert precision.cpu_bf16_flags(SKYLAKE) == []  # only the flags line counts


@pytest.mark.parametrize("cpuinfo, bf16", [(SAPPHIRE_RAPIDS, True), (SKYLAKE, False)])
def test_native_bf16_reads_the_cpuinfo_file(cpuinfo, bf16, tmp_path, monkeypatch):
    (tmp_path / "cpuinfo").write_text(cpuinfo)
    monkeypatch.setattr(precision, "CPUINFO", tmp_path / "cpuinfo")
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert precision.native_bf16()[0] is bf16


@pytest.mark.parametrize("bf16, want", [(True, "bf16"), (False, "fp32")])
def test_auto_resolves_to_a_concrete_precision_at_load(bf16, want, monkeypatch, capsys):
    monkeypatch.setattr(precision, "native_bf16", lambda: (bf16, "test"))
    config = load_config(None, ["model.precision=auto"])
    assert config.model.precision == want
    assert f"model.precision auto -> {want}" in capsys.readouterr().err
    assert f"precision: {want}" in dump_config(config)  # what the run's config.yaml records
    assert config.algorithm.loss.tis_cap == (precision.BF16_TIS_CAP if bf16 else None)


@pytest.mark.parametrize("overrides, cap", [
    (["model.precision=bf16"], precision.BF16_TIS_CAP),
    (["model.precision=bf16", "train.step.old_logp=rollout"], None),  # pi_old is pi_rollout: weights 1
    (["model.precision=bf16", "algorithm.loss.tis_cap=null"], None),  # explicitly off
    (["model.precision=bf16", "algorithm.loss.tis_cap=5"], 5.0),
    (["model.precision=fp32"], None),
    (["model.precision=fp32", "algorithm.loss.tis_cap=1.5"], 1.5),
])
def test_tis_cap_auto_is_on_in_bf16_only_when_pi_old_is_recomputed(overrides, cap):
    assert load_config(None, overrides).algorithm.loss.tis_cap == cap


def test_unresolved_auto_is_refused_by_the_builder():
    from ebpo_megatron.models import ModelConfig
    from ebpo_megatron.models.builder import transformer_config
    from ebpo_megatron.parallel import ParallelConfig

    with pytest.raises(ValueError, match="unresolved"):
        transformer_config(ModelConfig(precision="auto"), ParallelConfig())
