"""A registered estimator owns its options: ``algorithm.options`` is checked against its signature.

The options of an estimator are the keyword parameters of its function other than the per-call
inputs (``table``, ``prior``); their defaults are the signature's, and ``compute_advantages`` gets
exactly the options the config resolved.
"""

from __future__ import annotations

import pytest
import torch

from ebpo_megatron.algorithms import (
    EBPOPrior,
    GroupAffine,
    GroupTable,
    compute_advantages,
    estimator_options,
    register_estimator,
)
from ebpo_megatron.algorithms import estimators
from ebpo_megatron.config.schema import dump_config, load_config
from ebpo_megatron.config.typed import ConfigError, load_yaml

REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.5])
GROUP_IDS = torch.tensor([3, 3, 3, 8, 8, 8, 5, 5])


@pytest.fixture
def scaled_estimator(monkeypatch: pytest.MonkeyPatch) -> str:
    """Registers ``scaled_test``: A = scale · (r − μ_m), with its own option ``scale``, in a copy of
    the registry that the test's end restores."""
    monkeypatch.setattr(estimators, "_REGISTRY", dict(estimators._REGISTRY))

    @register_estimator("scaled_test")
    def scaled(table: GroupTable, *, prior: object = None,
               scale: float = 1.0) -> tuple[GroupAffine, dict[str, float]]:
        factor = torch.full_like(table.mean, scale)
        return GroupAffine(factor, -factor * table.mean), {"scaled/scale": scale}

    return "scaled_test"


def _centred(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    means = {int(g): float(rewards[group_ids == g].mean()) for g in group_ids.unique()}
    return rewards - torch.tensor([means[int(g)] for g in group_ids])


def test_registered_estimator_gets_its_option_from_yaml(tmp_path, scaled_estimator):
    path = tmp_path / "scaled.yaml"
    path.write_text(f"algorithm:\n  estimator: {scaled_estimator}\n  options:\n    scale: 2.5\n")
    algo = load_config(path).algorithm
    assert algo.options == {"scale": 2.5}
    adv, metrics = compute_advantages(algo.estimator, REWARDS, GROUP_IDS, **algo.options)
    torch.testing.assert_close(adv, 2.5 * _centred(REWARDS, GROUP_IDS))
    assert metrics["scaled/scale"] == 2.5

    # an override, an integer for a float option, and the signature's default
    assert load_config(path, ["algorithm.options.scale=3"]).algorithm.options == {"scale": 3.0}
    assert load_config(None, [f"algorithm.estimator={scaled_estimator}"]).algorithm.options == {"scale": 1.0}


def test_unknown_option_names_key_estimator_and_its_options(scaled_estimator):
    with pytest.raises(ConfigError, match=r"algorithm\.options\.scal: unknown key\. Did you mean "
                                          r"'algorithm\.options\.scale'\? Valid keys: \['scale'\] "
                                          r"\[options of estimator 'scaled_test'\]"):
        load_config(None, [f"algorithm.estimator={scaled_estimator}", "algorithm.options.scal=2"])
    with pytest.raises(ConfigError, match=r"algorithm\.options\.tau: unknown key\. Did you mean "
                                          r"'algorithm\.options\.tau2'\?.*estimator 'ebpo'"):
        load_config(None, ["algorithm.options.tau=raw"])


def test_option_of_another_estimator_is_named(scaled_estimator):
    with pytest.raises(ConfigError, match=r"algorithm\.options\.tau2: an option of estimator\(s\) \['ebpo'\], "
                                          r"not of 'grpo', whose options are \['eps'\]"):
        load_config(None, ["algorithm.estimator=grpo", "algorithm.options={eps: 1e-6, tau2: raw}"])
    with pytest.raises(ConfigError, match=r"algorithm\.options\.scale: an option of estimator\(s\) "
                                          r"\['scaled_test'\], not of 'dr_grpo', whose options are \[\]"):
        load_config(None, ["algorithm.estimator=dr_grpo", "algorithm.options.scale=2"])


@pytest.mark.parametrize("override, message", [
    ("algorithm.options.scale=big", r"algorithm\.options\.scale: got 'big', expected a number"),
    ("algorithm.options.scale=true", r"algorithm\.options\.scale: got True, expected a number"),
])
def test_wrong_type_of_registered_option(scaled_estimator, override, message):
    with pytest.raises(ConfigError, match=message + r" \[options of estimator 'scaled_test'\]"):
        load_config(None, [f"algorithm.estimator={scaled_estimator}", override])


@pytest.mark.parametrize("override, message", [
    ("algorithm.options.tau2=shrunk", r"algorithm\.options\.tau2: got 'shrunk', expected one of \['raw', 'bias_corrected'\]"),
    ("algorithm.options.batch_normalize=1", r"algorithm\.options\.batch_normalize: got 1, expected true or false"),
    ("algorithm.options.eps=small", r"algorithm\.options\.eps: got 'small', expected a number"),
    ("algorithm.options=[1]", r"algorithm\.options: got \[1\], expected a mapping"),
])
def test_wrong_type_of_builtin_option(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_required_option_must_be_given(monkeypatch):
    monkeypatch.setattr(estimators, "_REGISTRY", dict(estimators._REGISTRY))

    @register_estimator("needs_target")
    def needs_target(table: GroupTable, *, prior: object = None,
                     target: float) -> tuple[GroupAffine, dict[str, float]]:
        return GroupAffine(torch.ones_like(table.mean), torch.full_like(table.mean, -target)), {}

    with pytest.raises(ConfigError, match=r"algorithm\.options: missing required key\(s\) \['target'\]"):
        load_config(None, ["algorithm.estimator=needs_target"])
    assert load_config(None, ["algorithm.estimator=needs_target",
                              "algorithm.options.target=0.5"]).algorithm.options == {"target": 0.5}


@pytest.mark.parametrize("key", ["eps", "batch_normalize", "tau2"])
def test_moved_top_level_keys_name_their_new_place(tmp_path, key):
    with pytest.raises(ConfigError, match=rf"algorithm\.{key}: moved to algorithm\.options\.{key}$"):
        load_config(None, [f"algorithm.{key}=raw"])
    path = tmp_path / "old.yaml"
    path.write_text(f"algorithm:\n  estimator: ebpo\n  {key}: raw\n")
    with pytest.raises(ConfigError, match=rf"algorithm\.{key}: moved to algorithm\.options\.{key}$"):
        load_config(path)


def test_builtin_defaults_are_the_former_config_defaults():
    # the config's defaults before the options moved: eps 1e-6, batch_normalize True, tau2 "raw"
    expected = {
        "ebpo": {"eps": 1e-6, "batch_normalize": True, "tau2": "raw"},
        "grpo": {"eps": 1e-6},
        "dr_grpo": {},
        "rloo": {},
    }
    for name, options in expected.items():
        assert load_config(None, [f"algorithm.estimator={name}"]).algorithm.options == options
        assert {k: p.default for k, p in estimator_options(name).items()} == options
    assert load_config(None).algorithm.options == expected["ebpo"]


def test_resolved_options_are_recorded_and_reload():
    config = load_config(None, ["algorithm.options.tau2=bias_corrected"])
    saved = load_yaml(dump_config(config))["algorithm"]["options"]
    assert saved == {"eps": 1e-6, "batch_normalize": True, "tau2": "bias_corrected"}
    assert load_config(None, ["algorithm.options={eps: 1.0e-6, batch_normalize: true, tau2: bias_corrected}"]
                       ).algorithm.options == saved


def test_compute_advantages_gets_exactly_the_resolved_options():
    algo = load_config(None, ["algorithm.options.batch_normalize=false"]).algorithm
    got, _ = compute_advantages("ebpo", REWARDS, GROUP_IDS, prior=EBPOPrior(), **algo.options)
    want, _ = compute_advantages("ebpo", REWARDS, GROUP_IDS, prior=EBPOPrior(), eps=1e-6,
                                 batch_normalize=False, tau2="raw")
    assert torch.equal(got, want)
