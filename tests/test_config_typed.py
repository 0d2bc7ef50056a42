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
