"""Mutation-testing follow-ups for lipnet.training.config: boundaries of the checks, what may
change on resume, and the parsing of command-line values."""

import math

import pytest

from lipnet.training import TrainConfig


def test_only_operational_settings_may_change_on_resume():
    """Each of these changes what is reported or how, not what is trained."""
    base = TrainConfig()
    changes = dict(data_dir="elsewhere", download=True, threads=2, device="cpu", compile=True,
                   compile_mode="max-autotune", out_dir="other", resume=True, certify=False, progress=False,
                   eval_batch_size=7, eval_eps=(0.3,), eval_every=4, test_subset=5, save_every=3)
    for name, value in changes.items():
        assert base.changed_fields(base.replace(**{name: value})) == [], name
    assert TrainConfig.OPERATIONAL == frozenset(changes)
    assert base.changed_fields(base.replace(weight_decay=0.1, seed=3, flip=True)) == ["flip", "weight_decay", "seed"]


@pytest.mark.parametrize("bad, message", [
    ({"lr": True}, "lr must be a number, got True"), ({"temperature": False}, "temperature must be a number"),
    ({"lr": 0.0}, "lr and temperature must be > 0"), ({"time_budget": 0.0}, "time_budget must be > 0 seconds"),
    ({"time_budget": -1.0}, "time_budget must be > 0 seconds"), ({"epochs": 0}, "epochs must be >= 1, got 0"),
    ({"batch_size": 0}, "batch_size must be >= 1"), ({"model_kwargs": {"scale": math.inf}}, "plain Python"),
    ({"model_kwargs": {"scale": math.nan}}, "plain Python"),
])
def test_values_at_or_past_the_limits_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**bad)


def test_the_smallest_allowed_values_pass():
    config = TrainConfig(epochs=1, batch_size=1, eval_batch_size=1, eval_every=1, save_every=1, time_budget=1e-9,
                         seed=2 ** 63 - 1, crop_padding=0, train_eps=0.0, input_std=2.0 ** -126)
    assert config.seed == 2 ** 63 - 1 and config.input_std == 2.0 ** -126


def test_the_config_keeps_its_own_copy_of_model_kwargs():
    """A caller's dict changed later does not change the config (nor its stored settings)."""
    kwargs = {"width": 8}
    config = TrainConfig(model_kwargs=kwargs)
    kwargs["width"] = 16
    assert config.model_kwargs == {"width": 8} and config.to_dict()["model_kwargs"] == {"width": 8}


@pytest.mark.parametrize("text, value", [("yes", True), ("1", True), ("TRUE", True), ("no", False), ("0", False),
                                         ("False", False)])
def test_boolean_values_take_yes_no_1_0_true_false(text, value):
    assert TrainConfig().with_overrides(["--flip", text]).flip is value
