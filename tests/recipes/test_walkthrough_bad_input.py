"""A new user's walk through ``python -m recipes.train`` with bad input: every mistake is a one-line
error with exit status 1 or 2, before anything is written, and nothing already on disk is lost."""

import warnings
from pathlib import Path

import pytest

from lipnet.data import DatasetError, load_dataset, synthetic_dataset, write_npz
from recipes.train import main

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
TINY = ["--model", "convnet", "--model-kwargs", '{"widths": [4], "depths": [0], "dense": [8]}', "--epochs", "1",
        "--batch-size", "16", "--progress", "false", "--threads", "1", "--eval-eps", "0.1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Synthetic Fashion-MNIST and MNIST side by side, each in its own subfolder (data/<name>)."""
    folder = tmp_path_factory.mktemp("data")
    for name in ("fashion-mnist", "mnist"):
        write_npz(synthetic_dataset(name, 32, split="train", seed=0), folder / name / "train.npz")
        write_npz(synthetic_dataset(name, 16, split="test", seed=1), folder / name / "test.npz")
    return folder


@pytest.fixture(scope="module")
def finished_run(data, tmp_path_factory):
    """A finished (tiny) fashion-mnist run."""
    out = tmp_path_factory.mktemp("runs") / "fashion"
    assert main(["fashion-mnist", "--data-dir", str(data), "--out-dir", str(out), *TINY]) == 0
    return out


@pytest.mark.parametrize("args, status, message", [
    (["fashoin-mnist"], 2, "unknown recipe 'fashoin-mnist'; available: fashion-mnist"),
    (["--epoch", "2"], 2, "unknown setting --epoch; known:"),
    (["--epochs", "-1"], 2, "epochs must be >= 1, got -1"),
    (["--epochs", "0"], 2, "epochs must be >= 1, got 0"),
    (["--epochs", "1.5"], 2, "--epochs: cannot parse '1.5'"),
    (["--batch-size", "0"], 2, "batch_size must be >= 1, got 0"),
    (["--eval-eps", "0.1;0.2"], 2, "--eval-eps: cannot parse '0.1;0.2'"),
    (["--eval-eps", "0.1,,0.2"], 2, "an empty item"),
    (["--eval-eps=-1"], 2, "eval_eps must be one or more finite radii >= 0"),
    (["--eval-eps", "1/0"], 2, "the fraction's denominator is 0"),
    (["--train-subset", "4"], 1, "fewer than one batch of 16"),
    (["--model", "convnet-xxl"], 1, "unknown model 'convnet-xxl'"),
    (["--dataset", "fashion"], 1, "unknown data set 'fashion'"),
])
def test_bad_settings_exit_with_one_line_and_write_nothing(data, tmp_path, capsys, args, status, message):
    out = tmp_path / "run"
    assert main(["--data-dir", str(data), "--out-dir", str(out), *TINY, *args]
                if args[0].startswith("-") else [*args, "--out-dir", str(out)]) == status
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err, err
    assert not out.exists()


def test_resuming_another_recipes_checkpoint_names_the_settings_and_keeps_it(data, finished_run, tmp_path, capsys):
    out = tmp_path / "mnist-run"
    out.mkdir()
    checkpoint = (finished_run / "checkpoint.pt").read_bytes()
    (out / "checkpoint.pt").write_bytes(checkpoint)
    assert main(["mnist", "--data-dir", str(data), "--out-dir", str(out), *TINY, "--resume"]) == 1
    err = capsys.readouterr().err
    assert "--resume with different settings" in err and "dataset: 'fashion-mnist' -> 'mnist'" in err
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt"]
    assert (out / "checkpoint.pt").read_bytes() == checkpoint


@pytest.mark.parametrize("damage, message", [
    (lambda run: (run / "checkpoint.pt").read_bytes()[:50_000], "truncated, corrupt"),
    (lambda run: (run / "model.pt").read_bytes(), "a model checkpoint without training state"),
    (lambda run: b"", "truncated, corrupt"),
])
def test_resuming_a_damaged_or_wrong_checkpoint_is_named_and_the_file_kept(data, finished_run, tmp_path, capsys,
                                                                          damage, message):
    out = tmp_path / "run"
    out.mkdir()
    bad = damage(finished_run)
    (out / "checkpoint.pt").write_bytes(bad)
    assert main(["fashion-mnist", "--data-dir", str(data), "--out-dir", str(out), *TINY, "--resume"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err, err
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt"]  # no model, report or lock left
    assert (out / "checkpoint.pt").read_bytes() == bad


def test_running_twice_into_a_finished_run_overwrites_nothing(data, finished_run, capsys):
    before = {p.name: p.read_bytes() for p in finished_run.iterdir()}
    assert main(["fashion-mnist", "--data-dir", str(data), "--out-dir", str(finished_run), *TINY]) == 1
    assert "holds an earlier run" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in finished_run.iterdir()} == before


@pytest.mark.skipif(not (FASHION_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_the_fashion_mnist_files_are_not_taken_for_mnist():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            load_dataset("mnist", "test", data_dir=FASHION_DIR)
        except DatasetError:
            return  # refused: right
    assert any("mnist" in str(w.message).lower() for w in caught), [str(w.message) for w in caught]


@pytest.mark.skipif(not (FASHION_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_the_fashion_mnist_files_read_as_fashion_mnist_raise_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(load_dataset("fashion-mnist", "test", data_dir=FASHION_DIR)) == 10000
