"""Recipes: every one constructs; the default trains end to end on tiny synthetic data."""

import json
import re

import pytest

from lipnet.certify.cli import main as certify_main
from lipnet.checkpoint import load_checkpoint
from lipnet.data import DATASETS, synthetic_dataset, write_npz
from lipnet.models import MODELS, model_spec
from lipnet.training import build_run_model
from recipes import DEFAULT, RECIPES, get_recipe
from recipes.train import main, parse


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_constructs(name):
    config = RECIPES[name]
    info = DATASETS[config.dataset]
    assert config.model in MODELS and config.eval_eps and config.out_dir.endswith(name)
    model = build_run_model(config, info)
    assert model_spec(model)["name"] == config.model
    assert model[-1].out_features == info.num_classes
    assert model[0].mean.tolist() == pytest.approx(list(info.mean))


def test_command_line_picks_the_recipe_and_applies_overrides():
    assert parse([]) == ("fashion-mnist", RECIPES[DEFAULT])
    name, config = parse(["cifar10", "--epochs", "2", "--eval-eps", "36/255"])
    assert name == "cifar10" and config.epochs == 2 and config.eval_eps == (36 / 255,)
    assert config.model == get_recipe("cifar10").model
    with pytest.raises(ValueError, match="available: fashion-mnist"):
        get_recipe("imagenet")


def test_default_recipe_trains_and_certifies_on_tiny_synthetic_data(tmp_path, capsys):
    data = tmp_path / "data"
    write_npz(synthetic_dataset("fashion-mnist", 64, split="train"), data / "train.npz")
    write_npz(synthetic_dataset("fashion-mnist", 32, split="test", seed=1), data / "test.npz")
    out = tmp_path / "run"
    code = main(["--data-dir", str(data), "--out-dir", str(out), "--epochs", "1", "--batch-size", "32",
                 "--progress", "false", "--threads", "1"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "certified" in printed and "0.25" in printed
    report = json.loads((out / "report.json").read_text())
    assert [c["eps"] for c in report["certified_accuracy"]] == [0.1, 0.25, 0.5, 1.0]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    # The checkpoint is self-describing: the certification CLI rebuilds the model from it alone.
    assert certify_main(["--checkpoint", str(out / "model.pt"), "--data", "fashion-mnist", "--data-dir", str(data),
                         "--eps", "0.1", "--no-progress", "--out", str(tmp_path / "cert")]) == 0
    again = json.loads((tmp_path / "cert" / "certify.json").read_text())
    assert again["clean_accuracy"] == report["clean_accuracy"]


def test_missing_data_and_bad_settings_exit_with_a_message(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LIPNET_DATA_DIR", raising=False)
    assert main(["mnist", "--data-dir", str(tmp_path / "none"), "--out-dir", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert "mnist (train split) not found" in err and str(tmp_path / "none") in err and "--download" in err
    assert not (tmp_path / "run").exists()
    assert main(["--epochs", "many"]) == 2
    assert "cannot parse 'many'" in capsys.readouterr().err
    assert main(["cifar10", "--help"]) == 0
    out = capsys.readouterr().out
    assert "cifar10-long" in out and "CUDA graphs)." in out  # each description whole, not its first line
    for key in RECIPES["cifar10"].to_dict():  # every setting, with the recipe's value
        assert f"--{key.replace('_', '-')}" in out
    assert re.search(r"--model\s+liresnet-s\n", out) and re.search(r"--epochs\s+300\n", out)
    assert main(["nope", "--help"]) == 2


def test_recipes_hold_plain_settings():
    for config in RECIPES.values():
        assert json.loads(json.dumps(config.to_dict())) == config.to_dict()


def test_an_out_dir_under_a_file_exits_with_a_message(tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    assert main(["mnist", "--out-dir", str(tmp_path / "a-file" / "run")]) == 1
    assert "a-file is a file" in capsys.readouterr().err


def test_sigterm_stops_a_run_like_ctrl_c(tmp_path):
    """A scheduler preempting the job sends SIGTERM: the run says where its last epoch is and exits 143."""
    import signal
    import subprocess
    import sys
    import time

    data = tmp_path / "data"
    write_npz(synthetic_dataset("mnist", 64, split="train"), data / "train.npz")
    write_npz(synthetic_dataset("mnist", 16, split="test", seed=1), data / "test.npz")
    out = tmp_path / "run"
    args = [sys.executable, "-m", "recipes.train", "mnist", "--data-dir", str(data), "--out-dir", str(out),
            "--epochs", "1000", "--batch-size", "32", "--progress", "false", "--threads", "1", "--certify", "false",
            "--model", "convnet", "--model-kwargs", '{"widths": [4], "depths": [1], "dense": []}']
    run = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (out / "metrics.jsonl").exists() and time.monotonic() < deadline and run.poll() is None:
        time.sleep(0.05)
    run.send_signal(signal.SIGTERM)
    _, err = run.communicate(timeout=60)
    assert run.returncode == 143, err
    assert "stopped by SIGTERM" in err and "--resume" in err
    saved = load_checkpoint(out / "checkpoint.pt")["training"]["epochs_done"]
    assert f"epoch {saved} is saved in" in err, err
    assert not list(out.glob(".*.tmp")) and not (out / ".lock").exists()


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_the_settings_help_shows_give_back_the_recipe_exactly(name):
    """Values copied from --help (train_eps 72/255 ...) must not make --resume refuse a changed setting."""
    from recipes.train import usage

    shown = re.findall(r"^  (--[a-z-]+) +(.+)$", usage(name).split("Settings of")[1].split("What they mean")[0], re.M)
    assert len(shown) == len(RECIPES[name].to_dict())
    args = [item for key, value in shown for item in (key, value)]
    assert parse([name, *args]) == (name, RECIPES[name])


def test_a_recipe_name_after_the_settings_is_explained(capsys):
    assert main(["--epochs", "2", "cifar10"]) == 2
    assert "the recipe name comes first: python -m recipes.train cifar10 --epochs 2" in capsys.readouterr().err
    assert main(["--epochs=2", "cifar10"]) == 2
    assert "the recipe name comes first: python -m recipes.train cifar10 --epochs=2" in capsys.readouterr().err


def test_under_torchrun_only_the_main_process_says_how_to_resume(tmp_path, capsys, monkeypatch):
    def interrupted(config):
        raise KeyboardInterrupt

    monkeypatch.setattr("recipes.train.train", interrupted)
    for rank, said in (("1", False), ("0", True)):
        monkeypatch.setenv("RANK", rank)
        assert main(["mnist", "--out-dir", str(tmp_path / "run")]) == 130
        assert ("interrupted before its first checkpoint was written" in capsys.readouterr().err) is said


def test_ctrl_c_while_torch_is_imported_exits_quietly(tmp_path):
    """Ctrl-C during the seconds torch takes to import: one line and exit 130, no traceback."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    importing = tmp_path / "importing-torch"
    # A start-up hook that holds the import of torch until the signal comes.
    (tmp_path / "sitecustomize.py").write_text(
        "import pathlib, sys, time\n"
        "class HoldTorch:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch':\n"
        f"            pathlib.Path({str(importing)!r}).touch()\n"
        "            time.sleep(60)\n"
        "sys.meta_path.insert(0, HoldTorch())\n")
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(root)])}
    # Ctrl-C's default action in the child even where this process ignores SIGINT (a background
    # job of a script inherits SIG_IGN, and Python then never raises KeyboardInterrupt).
    run = subprocess.Popen([sys.executable, "-m", "recipes.train", "mnist", "--epochs", "1"], cwd=root, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    while not importing.exists() and time.monotonic() < deadline and run.poll() is None:
        time.sleep(0.02)
    assert importing.exists(), run.communicate(timeout=60)
    run.send_signal(signal.SIGINT)
    out, err = run.communicate(timeout=60)
    assert run.returncode == 130, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and "interrupted" in err
    assert out == ""


@pytest.mark.parametrize("argv, cli", [
    (["python", "-m", "recipes.train", "mnist"], True), (["python", "-u", "-m", "recipes.train"], True),  # torchrun
    (["python", "-mrecipes.train"], True), (["python", "-m", "pytest", "tests/recipes"], False), (["python"], False),
])
def test_only_the_command_line_turns_ctrl_c_at_import_into_an_exit(argv, cli):
    """Imported as a library (a notebook, pytest), a Ctrl-C during the import stays the caller's KeyboardInterrupt."""
    from recipes import _started_as_command_line

    assert _started_as_command_line(argv) is cli
