"""TrainConfig: command-line overrides, validation, and what may change on resume."""

import pytest

from lipnet.training import TrainConfig, lr_factor


def test_overrides_are_parsed_by_field_type():
    config = TrainConfig(model_kwargs={"width": 8, "depth": 2}).with_overrides(
        ["--epochs", "3", "--lr", "1/1000", "--eval-eps", "36/255,0.5", "--flip", "--train_subset", "100",
         "--offset", "none", "--model-kwargs", '{"width": 16}', "--amp", "none", "--progress", "false"])
    assert config.epochs == 3 and config.lr == 0.001 and config.flip is True and config.train_subset == 100
    assert config.eval_eps == (36 / 255, 0.5) and config.offset is None and config.progress is False
    assert config.model_kwargs == {"width": 16, "depth": 2}


def test_model_kwargs_given_twice_are_merged():
    config = TrainConfig(model_kwargs={"width": 8, "depth": 2}).with_overrides(
        ["--model-kwargs", '{"width": 32, "dense": [16]}', "--model-kwargs={\"depth\": 3, \"width\": 64}"])
    assert config.model_kwargs == {"width": 64, "depth": 3, "dense": [16]}


@pytest.mark.parametrize("args, message", [
    (["--epoch", "3"], "unknown setting --epoch"),
    (["--epochs"], "needs a value"),
    (["--epochs", "three"], "cannot parse 'three'"),
    (["--train-eps", "36/0"], "cannot parse '36/0': the fraction's denominator is 0"),
    (["--train-eps", "1" + "0" * 400 + "/1"], "cannot parse '10000.*too large"),
    (["--flip", "maybe"], "expected true or false"),
    (["--loss", "mse"], "loss must be one of"),
    (["--model-kwargs", "[1]"], "JSON object"),
    (["epochs", "3"], "expected --key"),
])
def test_bad_overrides_are_explained(args, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig().with_overrides(args)


def test_changed_fields_ignore_operational_settings():
    a = TrainConfig()
    assert a.changed_fields(a.replace(out_dir="elsewhere", resume=True, device="cpu", progress=False,
                                      compile_mode="reduce-overhead")) == []
    assert a.changed_fields(a.replace(lr=0.5, epochs=2)) == ["epochs", "lr"]
    assert TrainConfig.from_dict(a.to_dict()) == a
    assert a.changed_fields(a.replace(test_subset=32)) == []  # evaluation only
    with pytest.raises(ValueError, match=r"does not know: \['new_field'\].*another version"):
        TrainConfig.from_dict({**a.to_dict(), "new_field": 1})


def test_lr_schedule_shapes():
    assert [lr_factor(s, 10, 0, "linear") for s in (0, 5, 10)] == [1.0, 0.5, 0.0]
    assert lr_factor(3, 10, 0, "constant") == 1.0
    assert lr_factor(0, 10, 4) == 0.25 and lr_factor(4, 10, 4) == 1.0
    with pytest.raises(ValueError, match="schedule"):
        lr_factor(5, 10, 0, "step")


def test_settings_are_validated_before_any_training():
    from pathlib import Path

    import numpy as np

    for bad, message in [({"time_budget": float("inf")}, "finite"), ({"eval_eps": (-1.0,)}, "eval_eps"),
                         ({"test_subset": 0}, "test_subset"), ({"train_eps": float("nan")}, "finite"),
                         ({"compile_mode": "fast"}, "compile_mode must be one of"),
                         ({"model_kwargs": {"width": np.int64(8)}}, "plain Python"),
                         ({"threads": 0}, "threads must be >= 1"), ({"crop_padding": -1}, "crop_padding"),
                         ({"warmup_epochs": -1}, "warmup_epochs"), ({"lr": 1e300}, "lr must be at most"),
                         ({"loss": "emma", "offset": 1.0}, "no offset"), ({"eval_eps": ()}, "one or more"),
                         ({"seed": 2 ** 63}, "seed must be"), ({"seed": -1}, "seed must be"),
                         ({"out_dir": ""}, "empty path")]:
        with pytest.raises(ValueError, match=message):
            TrainConfig(**bad)
    config = TrainConfig(data_dir=Path("/data"), out_dir=Path("runs/x"))
    assert config.data_dir == "/data" and config.out_dir == "runs/x"  # stored as text in checkpoints
    # The report's radii do not change what is trained: a resumed run may change them.
    assert TrainConfig(eval_eps=(0.1,)).changed_fields(TrainConfig(eval_eps=(0.2,))) == []


@pytest.mark.parametrize("bad, message", [
    ({"epochs": 2.5}, "epochs must be an int"), ({"batch_size": True}, "batch_size must be an int"),
    ({"lr": "0.1"}, "lr must be a number"), ({"resume": "false"}, "resume must be a bool"),
    ({"flip": 1}, "flip must be a bool"), ({"dataset": 10}, "dataset must be a str"),
    ({"train_subset": 10.0}, "train_subset must be an int"), ({"eval_eps": 0.5}, "eval_eps must be"),
    ({"model_kwargs": [("width", 8)]}, "model_kwargs must be a dict"), ({"offset": -1.0}, "offset must be >= 0"),
    ({"input_std": 0.0}, "input_std must be > 0"), ({"input_std": -0.5}, "input_std must be > 0"),
    ({"input_std": float("inf")}, "input_std must be a finite number"),
    ({"input_std": float("nan")}, "input_std must be a finite number"),
    ({"input_std": 1e-50}, "input_std 1e-50 is below the smallest normal float32"),
    ({"data_dir": " "}, "data_dir must name a folder"),
])
def test_settings_of_the_wrong_type_or_sign_are_refused_by_name(bad, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**bad)


def test_a_stored_config_with_a_value_of_the_wrong_type_is_a_clear_error():
    with pytest.raises(ValueError, match="epochs must be an int, got 'six'"):
        TrainConfig.from_dict({**TrainConfig().to_dict(), "epochs": "six"})


def test_the_report_radii_are_sorted_without_repeats():
    assert TrainConfig().with_overrides(["--eval-eps", "0.5,0.1,36/255,0.1"]).eval_eps == (0.1, 36 / 255, 0.5)
    for typo in ("0.1,,0.2", "0.1,0.2,", ",0.1", ""):  # an item lost to a typo is not silently dropped
        with pytest.raises(ValueError, match="empty item"):
            TrainConfig().with_overrides(["--eval-eps", typo])


def test_overrides_also_take_the_key_equals_value_form():
    config = TrainConfig().with_overrides(["--epochs=3", "--eval-eps=36/255,0.5", "--flip", "--data-dir=a=b"])
    assert config.epochs == 3 and config.eval_eps == (36 / 255, 0.5) and config.flip and config.data_dir == "a=b"
    with pytest.raises(ValueError, match="--epochs: cannot parse ''"):
        TrainConfig().with_overrides(["--epochs="])
