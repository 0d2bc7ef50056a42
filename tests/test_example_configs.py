"""Every examples/*.yaml loads, passes the layout validation for the world it is sized for, and
fits in GPU memory by the planner. The world is read from the ebpo-plan / planner command in
the file's header (``--nodes N [--gpus-per-node G]``); a file without one is a 1-process config.
The paper-reproduction configs (``*_dapo_math.yaml``) also carry the paper's settings."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ebpo_megatron.config.schema import load_config
from ebpo_megatron.parallel.distributed import validate_layout
from ebpo_megatron.planner import make_plan, plan_inputs_from_config

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
PAPER = sorted((ROOT / "examples").glob("*_dapo_math.yaml"))
ARCH_KEYS = ("family", "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_kv_heads",
             "kv_channels", "vocab_size", "rope_theta")
ARCHITECTURES = {  # the published architectures (Hugging Face config.json of each model)
    "qwen3_8b": ("qwen3", 36, 4096, 12288, 32, 8, 128, 151936, 1e6),
    "qwen3_14b": ("qwen3", 40, 5120, 17408, 40, 8, 128, 151936, 1e6),
    "llama3.1_8b": ("llama", 32, 4096, 14336, 32, 8, 128, 128256, 5e5),
}


def sized_for(path: Path) -> tuple[int, int]:
    """(nodes, GPUs per node) named by the header's planner command; (1, 1) when there is none."""
    match = re.search(r"--nodes (\d+)(?: --gpus-per-node (\d+))?", path.read_text())
    if match is None:
        return 1, 1
    return int(match.group(1)), int(match.group(2) or 8)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_loads_validates_and_fits(path):
    config = load_config(path)
    nodes, gpus = sized_for(path)
    dp = validate_layout(nodes * gpus, config.parallel, config.model)
    assert (config.data.prompts_per_step * config.rollout.n) % (dp * config.train.step.mini_batches) == 0, \
        "each mini-batch splits evenly over the data-parallel ranks"
    plan = make_plan(plan_inputs_from_config(config, nodes=nodes, gpus_per_node=gpus))
    assert plan.fits, plan.problems


def test_the_paper_configs_exist():
    assert {"llama3.1_8b_dapo_math.yaml", "qwen3_14b_dapo_math.yaml", "qwen3_8b_dapo_math.yaml"} <= {p.name for p in PAPER}


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.name)
def test_paper_settings(path):
    config = load_config(path)
    assert sized_for(path) == (1, 8)
    assert config.rollout.n == 4 and config.data.prompts_per_step * config.rollout.n == 512  # global batch
    assert 512 // config.train.step.mini_batches == 128  # responses per optimizer step
    assert config.train.step.ppo_epochs == 1
    assert config.train.optim.lr == 1e-6 and config.algorithm.loss.kl_coef == 0.001
    assert config.algorithm.estimator == "ebpo" and config.data.order == "topic" and config.run.steps == 1000
    assert config.run.eval_every < config.run.steps and config.data.eval_files
    assert config.rollout.engine == "vllm" and config.model.precision == "bf16"
    assert all(f.startswith("data/") for f in config.data.train_files + config.data.eval_files)
    model = config.model
    expected = dict(zip(ARCH_KEYS, ARCHITECTURES[path.name.removesuffix("_dapo_math.yaml")]))
    assert {key: getattr(model, key) for key in ARCH_KEYS} == expected
    assert not model.tie_word_embeddings
    if model.family == "llama":
        assert model.rope_scaling is not None and model.rope_scaling.factor == 8.0
    else:
        assert model.rope_scaling is None and model.qk_norm
