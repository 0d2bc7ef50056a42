"""HF <-> Megatron checkpoint conversion (tools/convert_*.py, ebpo_megatron/conversion/).

Tiny random HF models built from configs (no download) for Llama (with Llama-3 RoPE scaling),
Qwen2 (QKV bias, tied embeddings) and Qwen3 (QK-norm): HF -> Megatron -> loaded by the trainer's
``load_model`` at TP=2 x PP=2 -> logits equal the HF model's (fp32, 1e-4) -> saved again by
Megatron at TP=2 x PP=2 -> HF is bit-exact with the original tensors; a training checkpoint
converts to the trainer's own weights; bad inputs give clear errors; peak memory of a ~200M
model's conversion stays within a small multiple of its largest tensor.
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mp_utils import run_ranks
from test_checkpoint import batch_for
from test_weight_export import FAMILIES
from test_weight_export import tiny as tiny_2_layers

from ebpo_megatron.models import ModelConfig

pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]
def tiny(family: str) -> ModelConfig:
    """The weight-export test's tiny model of ``family``, with 4 layers so PP=2 splits them."""
    return dataclasses.replace(tiny_2_layers(family), num_layers=4)


def tokens() -> torch.Tensor:
    return torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(5))


def hf_state(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state = {}
    for shard in sorted(directory.glob("*.safetensors")):
        state.update(load_file(shard))
    return state


def save_random_hf(cfg: ModelConfig, directory: Path, seed: int = 0):
    from hf_reference import hf_model

    model = hf_model(cfg)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(0.2 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(directory, max_shard_size="100KB")
    return model


def _load_check_resave(rank, world, tp, pp, families_dirs):
    from megatron_forward import megatron_logits

    from ebpo_megatron.config.schema import load_config
    from ebpo_megatron.models import build_policy
    from ebpo_megatron.parallel import ParallelConfig, cpu_compat, initialize
    from ebpo_megatron.trainer.checkpoint import load_model, save_model

    parallel = ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp)
    out = {}
    for index, (family, megatron_dir, resave_dir) in enumerate(families_dirs):
        cfg = load_config(Path(megatron_dir) / "model.yaml").model
        if index == 0:
            initialize(parallel, cfg)
        cpu_compat.set_seed(3)
        chunks = build_policy(cfg, parallel)
        load_model(Path(megatron_dir), chunks)
        out[family] = megatron_logits(chunks, tokens(), cfg.vocab_size)
        save_model(Path(resave_dir), chunks)
    return out


def test_round_trip_through_megatron_tp2_pp2_is_bit_exact_and_logits_match(tmp_path):
    import transformers

    from ebpo_megatron.conversion import convert_hf_to_megatron, convert_megatron_to_hf

    jobs, references = [], {}
    for family in FAMILIES:
        model = save_random_hf(tiny(family), tmp_path / family / "hf")
        with torch.no_grad():
            references[family] = model(tokens()).logits
        report = convert_hf_to_megatron(tmp_path / family / "hf", tmp_path / family / "megatron", tp=2, pp=2)
        assert report.model.family == family and report.model.kv_channels == tiny(family).kv_channels
        jobs.append((family, str(tmp_path / family / "megatron"), str(tmp_path / family / "resaved")))

    results = run_ranks(_load_check_resave, 4, 2, 2, jobs)
    for family, megatron_dir, resave_dir in jobs:
        logits = next(r[family] for r in results if r[family] is not None)
        assert torch.allclose(logits, references[family], atol=1e-4), float((logits - references[family]).abs().max())
        back = tmp_path / family / "hf_back"
        convert_megatron_to_hf(Path(resave_dir), back, config_file=Path(megatron_dir) / "model.yaml",
                               max_shard_bytes=60_000)
        original, returned = hf_state(tmp_path / family / "hf"), hf_state(back)
        if tiny(family).tie_word_embeddings:
            original.pop("lm_head.weight", None)
        assert sorted(returned) == sorted(original)
        assert all(torch.equal(returned[k], original[k]) for k in original), family
        assert len(list(back.glob("*.safetensors"))) > 1  # sharded, with an index
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(back).float().eval()
        with torch.no_grad():
            assert torch.equal(reloaded(tokens()).logits, references[family])


def _train_and_save(rank, world, run_dir):
    from ebpo_megatron.config.schema import load_config
    from ebpo_megatron.models import build_policy
    from ebpo_megatron.models.weights import full_weights
    from ebpo_megatron.parallel import ParallelConfig, cpu_compat, initialize
    from ebpo_megatron.trainer.checkpoint import load_model, save_checkpoint
    from ebpo_megatron.config.training import LossConfig, OptimConfig, StepConfig
    from ebpo_megatron.trainer.policy_trainer import PolicyTrainer

    config = load_config(Path(run_dir) / "config.yaml")
    parallel = ParallelConfig(tensor_parallel=2)
    initialize(parallel, config.model)
    cpu_compat.set_seed(0)
    trainer = PolicyTrainer(build_policy(config.model, parallel), OptimConfig(lr=1e-2), LossConfig(kl_coef=0.0),
                            StepConfig(micro_batch_size=2, step_kl=False))
    trainer.train_step(batch_for(1))  # one real step: weights move, Adam state exists
    step_dir = save_checkpoint(Path(run_dir) / "checkpoints", 7, trainer, {})
    fresh = build_policy(config.model, parallel)
    load_model(step_dir, fresh)  # the trainer's model loader takes a training checkpoint too
    trained, loaded = full_weights(trainer.chunks), full_weights(fresh)
    assert all(torch.equal(trained[k], loaded[k]) for k in trained)
    return trained


def test_training_checkpoint_converts_to_the_trainers_weights(tmp_path):
    from ebpo_megatron.conversion import convert_megatron_to_hf
    from ebpo_megatron.models.hf_mapping import Layout, megatron_to_hf

    cfg = tiny("qwen3")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    model_block = {k: v for k, v in vars(cfg).items() if k not in ("rope_scaling",)}
    (run_dir / "config.yaml").write_text(json.dumps({"model": model_block}))
    weights = run_ranks(_train_and_save, 2, str(run_dir))[0]
    out = tmp_path / "hf"
    convert_megatron_to_hf(run_dir / "checkpoints" / "step_000007", out)  # config found above step_N
    expected = dict(pair for name, tensor in weights.items()
                    for pair in megatron_to_hf(name, tensor, Layout.from_model_config(cfg)))
    returned = hf_state(out)
    assert sorted(returned) == sorted(expected)
    assert all(torch.equal(returned[k], expected[k]) for k in expected)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Qwen3ForCausalLM"]


def _cli(tool: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / tool), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


@pytest.fixture(scope="module")
def llama_hf(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("llama") / "hf"
    save_random_hf(tiny("llama"), directory)
    return directory


def _edited_copy(src: Path, dst: Path, **config_changes) -> Path:
    import shutil

    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(config_changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_wrong_architecture_is_a_clear_error(llama_hf, tmp_path):
    from ebpo_megatron.conversion import convert_hf_to_megatron

    bad = _edited_copy(llama_hf, tmp_path / "gpt2", architectures=["GPT2LMHeadModel"])
    with pytest.raises(ValueError, match=r"config.json: architectures \['GPT2LMHeadModel'\] is not supported"):
        convert_hf_to_megatron(bad, tmp_path / "out")


def test_missing_shard_is_a_clear_error_and_cli_exits_2(llama_hf, tmp_path):
    import shutil

    bad = tmp_path / "missing"
    shutil.copytree(llama_hf, bad)
    victim = sorted(bad.glob("model-*.safetensors"))[1]
    victim.unlink()
    result = _cli("convert_hf_to_megatron.py", "--hf", str(bad), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert victim.name in result.stderr and "missing" in result.stderr
    assert not (tmp_path / "out").exists()


def test_shape_mismatch_names_the_tensor(llama_hf, tmp_path):
    from ebpo_megatron.conversion import convert_hf_to_megatron

    bad = _edited_copy(llama_hf, tmp_path / "wide", intermediate_size=128)
    with pytest.raises(ValueError, match=r"mlp.gate_proj.weight has shape \(96, 64\), expected \(128, 64\)"):
        convert_hf_to_megatron(bad, tmp_path / "out")


def test_tp_that_does_not_divide_the_heads_is_a_clear_error(llama_hf, tmp_path):
    result = _cli("convert_hf_to_megatron.py", "--hf", str(llama_hf), "--out", str(tmp_path / "out"), "--tp", "3")
    assert result.returncode == 2
    assert "3" in result.stderr and "heads" in result.stderr


def test_megatron_checkpoint_of_another_architecture_is_a_clear_error(llama_hf, tmp_path):
    import shutil

    from ebpo_megatron.conversion import (
        MegatronCheckpointError,
        convert_hf_to_megatron,
        convert_megatron_to_hf,
    )

    convert_hf_to_megatron(llama_hf, tmp_path / "megatron")
    other = tmp_path / "other.yaml"
    other.write_text(json.dumps({"model": {"family": "llama", "num_layers": 4, "hidden_size": 64,
                                           "ffn_hidden_size": 128, "num_attention_heads": 4, "num_kv_heads": 2,
                                           "vocab_size": 100, "max_position_embeddings": 64}}))
    with pytest.raises(MegatronCheckpointError, match=r"template's architecture differs .* \['ffn_hidden_size'\]"):
        convert_megatron_to_hf(tmp_path / "megatron", tmp_path / "back", config_file=other)
    shutil.rmtree(tmp_path / "megatron" / "hf")  # no template: the checkpoint itself is checked
    with pytest.raises(MegatronCheckpointError, match=r"linear_fc1.weight has shape \(4, 192, 64\).*\(4, 256, 64\)"):
        convert_megatron_to_hf(tmp_path / "megatron", tmp_path / "back", config_file=other)


MEMORY_PROBE = r"""
import json, resource, sys, torch
from pathlib import Path
torch.set_num_threads(1)
from ebpo_megatron.conversion import convert_hf_to_megatron, convert_megatron_to_hf
import ebpo_megatron.conversion.megatron_schema, megatron.core  # imports counted in the baseline
def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
root = Path(sys.argv[1])
base = peak()
convert_hf_to_megatron(root / "hf", root / "megatron")
to_megatron = peak() - base
convert_megatron_to_hf(root / "megatron", root / "back", max_shard_bytes=int(sys.argv[2]))
print(json.dumps({"base": base, "to_megatron": to_megatron, "total": peak() - base}))
"""


def test_peak_memory_of_a_200m_model_is_a_small_multiple_of_its_largest_tensor(tmp_path):
    """~207M parameters in bf16 (414 MB): the conversions may not hold the model in memory."""
    from safetensors.torch import save_file

    from ebpo_megatron.conversion.hf_config import hf_config_from_model_config
    from ebpo_megatron.models.hf_mapping import Layout, expected_hf_shapes

    cfg = ModelConfig(family="llama", num_layers=12, hidden_size=1024, ffn_hidden_size=2816, num_attention_heads=16,
                      num_kv_heads=8, vocab_size=32000, max_position_embeddings=512)
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    shapes = expected_hf_shapes(Layout.from_model_config(cfg))
    weight_map = {}
    for i, (name, shape) in enumerate(shapes.items()):  # one tensor per shard: the test stays small too
        shard = f"model-{i:05d}.safetensors"
        save_file({name: torch.full(shape, 0.01 * (i % 7), dtype=torch.bfloat16)}, str(hf_dir / shard))
        weight_map[name] = shard
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    hf_config_from_model_config(cfg).save_pretrained(hf_dir)
    params = sum(torch.Size(s).numel() for s in shapes.values())
    largest = max(torch.Size(s).numel() for s in shapes.values()) * 2
    shard_limit = 64 * 2**20
    result = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(tmp_path), str(shard_limit)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    peak = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"params {params}, largest tensor {largest} B, peak RSS growth {peak}")
    assert 200e6 < params < 215e6 and largest == 32000 * 1024 * 2
    assert peak["to_megatron"] <= 4 * largest, (peak, largest)
    assert peak["total"] <= 4 * largest + shard_limit, (peak, largest)
    assert torch.equal(hf_state(tmp_path / "back")["model.layers.11.mlp.down_proj.weight"],
                       torch.full(shapes["model.layers.11.mlp.down_proj.weight"], 0.01 * (list(shapes).index(
                           "model.layers.11.mlp.down_proj.weight") % 7), dtype=torch.bfloat16))


# --------------------------------------------------------------------------------------------
# --out never destroys what it names, nor the input (ebpo_megatron/conversion/output_dir.py)
def _snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` (relative path -> bytes)."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _error_line(stderr: str) -> str:
    """The tool's one ``error:`` line (library warnings may precede it; no traceback)."""
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return errors[0]


def test_non_empty_out_is_refused_without_overwrite(llama_hf, tmp_path):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "my_notes.txt").write_text("keep me")
    result = _cli("convert_hf_to_megatron.py", "--hf", str(llama_hf), "--out", str(out))
    assert result.returncode == 2, result.stderr[-2000:]
    assert str(out) in _error_line(result.stderr) and "--overwrite" in result.stderr
    assert _snapshot(out) == {"my_notes.txt": b"keep me"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"]  # no temporary folder left beside

    from ebpo_megatron.conversion import convert_hf_to_megatron

    convert_hf_to_megatron(llama_hf, out, overwrite=True)  # the tool's --overwrite
    assert (out / "COMPLETE").is_file() and not (out / "my_notes.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"]


@pytest.mark.parametrize("where", ["same", "inside", "parent", "symlink"])
def test_out_overlapping_the_hf_input_is_refused_even_with_overwrite(llama_hf, tmp_path, where):
    import shutil

    hf = tmp_path / "models" / "hf"
    shutil.copytree(llama_hf, hf)
    (tmp_path / "link").symlink_to(hf)
    out = {"same": hf, "inside": hf / "megatron", "parent": tmp_path / "models", "symlink": tmp_path / "link"}[where]
    before = _snapshot(tmp_path / "models")
    result = _cli("convert_hf_to_megatron.py", "--hf", str(hf), "--out", str(out), "--overwrite")
    assert result.returncode == 2, result.stderr[-2000:]
    assert str(out) in _error_line(result.stderr) and str(hf) in result.stderr
    assert _snapshot(tmp_path / "models") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "models"]


def test_megatron_to_hf_never_writes_over_the_run_folder(llama_hf, tmp_path):
    from ebpo_megatron.conversion import convert_hf_to_megatron, convert_megatron_to_hf

    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "step_000001"
    convert_hf_to_megatron(llama_hf, ckpt)
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    before = _snapshot(run)
    result = _cli("convert_megatron_to_hf.py", "--ckpt", str(ckpt), "--out", str(run), "--overwrite")
    assert result.returncode == 2, result.stderr[-2000:]
    assert str(run) in _error_line(result.stderr)
    with pytest.raises(ValueError, match=re.escape(f"{run}: the output directory contains the input {ckpt}")):
        convert_megatron_to_hf(ckpt, run)
    assert _snapshot(run) == before

    notes = tmp_path / "hf_out"
    notes.mkdir()
    (notes / "my_notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match=re.escape(str(notes)) + ": .* not empty; --overwrite replaces it"):
        convert_megatron_to_hf(ckpt, notes)
    assert _snapshot(notes) == {"my_notes.txt": b"keep me"}
    convert_megatron_to_hf(ckpt, notes, overwrite=True)
    assert (notes / "config.json").is_file() and not (notes / "my_notes.txt").exists()
    assert _snapshot(run) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf_out", "run"]


def test_empty_out_is_used_and_its_neighbours_are_left_alone(llama_hf, tmp_path):
    from ebpo_megatron.conversion import convert_hf_to_megatron

    (tmp_path / "out").mkdir()
    (tmp_path / "out.tmp").mkdir()  # a user's folder that happens to have the old temporary name
    (tmp_path / "out.tmp" / "mine.txt").write_text("mine")
    convert_hf_to_megatron(llama_hf, tmp_path / "out")
    assert (tmp_path / "out" / "COMPLETE").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "out.tmp"]
    assert _snapshot(tmp_path / "out.tmp") == {"mine.txt": b"mine"}
    bad = _edited_copy(llama_hf, tmp_path / "wide", intermediate_size=128)
    with pytest.raises(ValueError, match="shape"):
        convert_hf_to_megatron(bad, tmp_path / "failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "out.tmp", "wide"]


# --------------------------------------------------------------------------------------------
# damaged input files: one message naming the file, exit 2
@pytest.mark.parametrize("text", ["{\"architectures\": [", "[1, 2]", "\udcff"], ids=["cut", "list", "not-utf8"])
def test_malformed_config_json_names_the_file(llama_hf, tmp_path, text):
    import shutil

    bad = tmp_path / "hf"
    shutil.copytree(llama_hf, bad)
    (bad / "config.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    result = _cli("convert_hf_to_megatron.py", "--hf", str(bad), "--out", str(tmp_path / "out"))
    assert result.returncode == 2, result.stderr[-2000:]
    assert str(bad / "config.json") in _error_line(result.stderr)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("single", [False, True], ids=["shard", "model.safetensors"])
def test_truncated_safetensors_names_the_file(llama_hf, tmp_path, single):
    import shutil

    from safetensors.torch import save_file

    bad = tmp_path / "hf"
    shutil.copytree(llama_hf, bad)
    if single:  # one model.safetensors instead of shards + index
        state = hf_state(bad)
        for shard in [*bad.glob("model-*.safetensors"), bad / "model.safetensors.index.json"]:
            shard.unlink()
        save_file(state, str(bad / "model.safetensors"), metadata={"format": "pt"})
    victim = bad / "model.safetensors" if single else sorted(bad.glob("model-*.safetensors"))[1]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    result = _cli("convert_hf_to_megatron.py", "--hf", str(bad), "--out", str(tmp_path / "out"))
    assert result.returncode == 2, result.stderr[-2000:]
    assert str(victim) in _error_line(result.stderr)
    assert not (tmp_path / "out").exists()
