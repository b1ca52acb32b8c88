"""Mutation tests of recipes/ and `python -m recipes.train`'s command line: each test pins a
behaviour (a recipe value the docs or the published figures rely on, a parsing rule) that a
hand-made mutant broke without any other test failing."""

import pytest

from recipes import RECIPES, describe
from recipes.train import _shown, parse

CIFAR10 = {
    "dataset": "cifar10", "data_dir": None, "download": False, "train_subset": None, "test_subset": None,
    "crop_padding": 4, "flip": True, "model": "liresnet-s", "model_kwargs": {}, "input_std": None, "epochs": 300,
    "batch_size": 512, "lr": 2e-3, "weight_decay": 0.0, "warmup_epochs": 2, "schedule": "cosine",
    "time_budget": None, "loss": "ce", "train_eps": 72 / 255, "offset": None, "temperature": 1.0,
    "eval_eps": [36 / 255, 72 / 255, 108 / 255], "eval_batch_size": 1000, "eval_every": 10, "seed": 0,
    "threads": None, "device": "auto", "amp": "auto", "compile": True, "compile_mode": "reduce-overhead",
    "out_dir": "runs/cifar10", "resume": False, "save_every": 10, "certify": True, "progress": True,
}


def test_the_cifar10_recipe_setting_by_setting():
    """The recipe behind the README's and docs/benchmarks.md's CIFAR-10 figures (random crops of
    4 pixels and flips, lr 2e-3, cross-entropy at temperature 1, the step compiled into CUDA
    graphs, estimates and checkpoints every 10 epochs): any change makes those figures stale."""
    assert RECIPES["cifar10"].to_dict() == CIFAR10


def test_cifar100_and_cifar10_long_are_the_cifar10_recipe_with_what_their_docs_say_changed():
    """cifar100: "same network, same budget", 100 classes; cifar10-long: liresnet-m, 600 epochs
    (a warm-up of 10); each writes to runs/<recipe>."""
    assert RECIPES["cifar100"].to_dict() == {**CIFAR10, "dataset": "cifar100", "out_dir": "runs/cifar100"}
    assert RECIPES["cifar10-long"].to_dict() == {**CIFAR10, "model": "liresnet-m", "epochs": 600,
                                                 "warmup_epochs": 10, "out_dir": "runs/cifar10-long"}


@pytest.mark.parametrize("name, changes", [
    ("fashion-mnist", {}),
    ("mnist", {"dataset": "mnist", "epochs": 10, "train_eps": 1.0, "eval_eps": [0.5, 1.0, 1.58, 2.0],
               "out_dir": "runs/mnist"}),
])
def test_the_cpu_recipes_setting_by_setting(name, changes):
    """The CPU recipes: convnet-s, no augmentation, lr 3e-3 with half an epoch of warm-up, nothing
    compiled, estimates and checkpoints after every epoch (docs/recipes.md: save_every 1)."""
    fashion = {**CIFAR10, "dataset": "fashion-mnist", "crop_padding": 0, "flip": False, "model": "convnet-s",
               "epochs": 8, "batch_size": 256, "lr": 3e-3, "warmup_epochs": 0.5, "train_eps": 0.5,
               "eval_eps": [0.1, 0.25, 0.5, 1.0], "eval_every": 1, "compile": False, "compile_mode": "default",
               "out_dir": "runs/fashion-mnist", "save_every": 1}
    assert RECIPES[name].to_dict() == {**fashion, **changes}


def test_settings_alone_run_the_default_recipe():
    name, config = parse(["--epochs", "2", "--lr", "1e-3"])
    assert name == "fashion-mnist" and config == RECIPES["fashion-mnist"].replace(epochs=2, lr=1e-3)


def test_a_flag_followed_by_another_option_is_set_to_true():
    name, config = parse(["cifar10", "--resume", "--epochs", "2"])
    assert name == "cifar10" and config.resume is True and config.epochs == 2


@pytest.mark.parametrize("argv, command", [
    (["--out-dir=runs/x", "cifar10"], "cifar10 --out-dir=runs/x"),
    (["mnist", "cifar10", "--resume"], "cifar10 --resume"),
    (["--resume", "cifar10"], "cifar10 --resume"),  # a flag takes no recipe name as its value
    (["--resume", "cifar10", "--epochs", "2"], "cifar10 --resume --epochs 2"),
])
def test_a_recipe_name_after_a_complete_setting_is_explained(argv, command):
    """``--key=value`` takes no next argument, and neither does the recipe's own slot: a recipe
    name there is a misplaced recipe, not a value."""
    with pytest.raises(ValueError, match=f"the recipe name comes first: python -m recipes.train {command}$"):
        parse(argv)


def test_describe_joins_the_first_paragraph_of_the_docstring():
    assert describe("cifar10") == ("CIFAR-10 in minutes on one GPU: a LiResNet certified at 36/255 (trained for "
                                   "72/255; bf16, data on the GPU, the compiled step replayed as CUDA graphs).")


def test_help_shows_model_kwargs_as_json_that_the_command_line_reads_back():
    shown = _shown({"width": 128, "dense": [256]})
    assert shown == '{"width": 128, "dense": [256]}'
    _, config = parse(["cifar10", "--model-kwargs", shown])
    assert config.model_kwargs == {"width": 128, "dense": [256]}


@pytest.mark.parametrize("value", [72 / 255, 72 / 255 + 1e-12, 0.002, 1.58, 1 / 3])
def test_help_shows_numbers_that_read_back_exactly(value):
    """A radius shown as k/255 only when it is exactly that float: a value one rounding away is
    shown in full, so that settings copied from --help resume the same run."""
    shown = _shown(value)
    _, config = parse(["cifar10", "--train-eps", shown])
    assert config.train_eps == value
    assert (shown == "72/255") == (value == 72 / 255)

