"""Typed config loading: unknown keys, wrong types, Literal choices, overrides."""

from dataclasses import dataclass, field
from typing import Literal

import pytest

from ebpo_megatron.config.typed import ConfigError, apply_overrides, from_dict, load_yaml, to_dict


@dataclass
class Optim:
    lr: float = 1e-6
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine"] = "constant"


@dataclass
class Root:
    name: str
    optim: Optim = field(default_factory=Optim)
    tags: list[str] = field(default_factory=list)
    limit: int | None = None


def test_round_trip_and_int_to_float():
    cfg = from_dict(Root, {"name": "x", "optim": {"lr": 1, "schedule": "cosine"}, "tags": ["a"]})
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert to_dict(cfg) == {"name": "x", "optim": {"lr": 1.0, "warmup_steps": 0, "schedule": "cosine"},
                            "tags": ["a"], "limit": None}


def test_unknown_key_suggests_closest():
    with pytest.raises(ConfigError, match=r"optim\.warmup_step: unknown key\. Did you mean 'optim\.warmup_steps'"):
        from_dict(Root, {"name": "x", "optim": {"warmup_step": 3}})


def test_wrong_type_names_key_value_and_type():
    with pytest.raises(ConfigError, match=r"optim\.warmup_steps: got 'ten', expected an integer"):
        from_dict(Root, {"name": "x", "optim": {"warmup_steps": "ten"}})
    with pytest.raises(ConfigError, match=r"optim\.schedule: got 'linear', expected one of \['constant', 'cosine'\]"):
        from_dict(Root, {"name": "x", "optim": {"schedule": "linear"}})
    with pytest.raises(ConfigError, match=r"missing required key\(s\) \['name'\]"):
        from_dict(Root, {})


def test_overrides_parse_yaml_scalars():
    data = apply_overrides({"name": "x"}, ["optim.lr=3e-5", "limit=7", "tags=[a, b]"])
    assert load_yaml("lr: 1e-6\nwd: .5\nn: 3")  == {"lr": 1e-6, "wd": 0.5, "n": 3}
    cfg = from_dict(Root, data)
    assert cfg.optim.lr == 3e-5 and cfg.limit == 7 and cfg.tags == ["a", "b"]
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        apply_overrides({}, ["nonsense"])


@dataclass
class Sampling:
    n: int = 4
    temperature: float = 1.0


@dataclass
class Loss:
    kl_coef: float = 0.0


@dataclass
class Algorithm:
    estimator: str = "ebpo"
    loss: Loss = field(default_factory=Loss)


@dataclass
class Trainer:
    KEY_ALIASES = {"group_size": "rollout.n"}  # a plain class attribute, not a field
    rollout: Sampling = field(default_factory=Sampling)
    algorithm: Algorithm = field(default_factory=Algorithm)


@pytest.mark.parametrize(
    "data,suggestion",
    [
        ({"algorithm": {"estimatr": "x"}}, "'algorithm.estimator'"),  # a close name in the same section
        ({"algorithm": {"group_size": 8}}, "'rollout.n'"),  # a well-known alias
        ({"rollout": {"kl_coef": 0.1}}, "'algorithm.loss.kl_coef'"),  # the same name in another section
        ({"algorithm": {"temprature": 0.7}}, "'rollout.temperature'"),  # a close name in another section
    ],
)
def test_unknown_key_searches_every_section(data, suggestion):
    with pytest.raises(ConfigError, match=rf"unknown key\. Did you mean {suggestion}\?"):
        from_dict(Trainer, data)


def test_the_trainer_config_points_other_frameworks_names_at_its_own():
    from ebpo_megatron.config.schema import Config, load_config

    for override, ours in (("algorithm.group_size=8", "rollout.n"), ("algorithm.num_generations=8", "rollout.n"),
                           ("rollout.kl_coef=0.1", "algorithm.loss.kl_coef"),
                           ("data.max_response_length=64", "rollout.max_new_tokens"),
                           ("algorithm.learning_rate=1e-5", "train.optim.lr"), ("sft.learning_rate=1e-5", "sft.lr")):
        with pytest.raises(ConfigError, match=rf"{override.split('=')[0]}: unknown key\. Did you mean '{ours}'\?"):
            load_config(None, [override])
    for alias, ours in Config.KEY_ALIASES.items():  # every alias names a real key
        node: object = Config()
        for part in ours.split("."):
            node = getattr(node, part)
