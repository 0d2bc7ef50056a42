"""The trainer's YAML config: examples load, mistakes are named."""

from __future__ import annotations

from pathlib import Path

import pytest

from ebpo_megatron.config.schema import dump_config, load_config
from ebpo_megatron.config.typed import ConfigError, load_yaml

EXAMPLES = sorted(Path(__file__).resolve().parents[1].joinpath("examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_config_validates(path):
    config = load_config(path)
    assert load_config(None, []) is not None
    assert load_yaml(dump_config(config))["run"]["name"] == config.run.name


def test_mistakes_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"algorithm\.loss\.clip_hgh: unknown key\. Did you mean 'algorithm\.loss\.clip_high'"):
        load_config(EXAMPLES[0], ["algorithm.loss.clip_hgh=0.3"])
    with pytest.raises(ConfigError, match=r"rollout\.n: got 'four', expected an integer"):
        load_config(EXAMPLES[0], ["rollout.n=four"])
    with pytest.raises(ConfigError, match=r"algorithm\.estimator: got 'gpro', expected one of"):
        load_config(None, ["algorithm.estimator=gpro"])
    with pytest.raises(ConfigError, match=r"data\.order: got 'easy', expected one of \['random', 'topic', 'difficulty'\]"):
        load_config(None, ["data.order=easy"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="train_files"):
        load_config(None, ["data.task=math"])
