"""``python -m lipnet.certify`` on a tiny checkpoint and the Fashion-MNIST test set."""

import argparse
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from lipnet.certify.cli import format_table, main, parse_eps
from lipnet.checkpoint import save_model
from lipnet.data import DatasetNotFoundError, load_dataset
from lipnet.nn import GramConv2d
from lipnet.models import build_model


def fashion_mnist_available():
    try:
        load_dataset("fashion-mnist", "test")
        return True
    except DatasetNotFoundError:
        return False


needs_data = pytest.mark.skipif(not fashion_mnist_available(), reason="Fashion-MNIST not found")


def test_parse_eps():
    assert parse_eps("36/255, 0.5,1") == [36 / 255, 0.5, 1.0]
    for bad in ("abc", "1/0", "-0.1", "0", "inf"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_eps(bad)


@needs_data
def test_cli_writes_table_json_and_plot(checkpoint, tmp_path, capsys):
    out = tmp_path / "certify"
    code = main(["--checkpoint", str(checkpoint), "--data", "fashion-mnist", "--eps", "36/255,0.5", "--limit", "64",
                 "--autoattack", "--attack-version", "apgd", "--attack-limit", "16", "--out", str(out),
                 "--no-progress", "--device", "cpu", "--threads", "1"])
    captured = capsys.readouterr()
    printed = captured.out
    assert code == 0
    assert "36/255" in printed and "0.5" in printed and "clean accuracy" in printed and "AutoAttack" in printed
    # Each radius is logged as it is audited (a log cut off by a time limit keeps them).
    logged = [line for line in captured.err.splitlines() if line.startswith("AutoAttack at eps")]
    assert len(logged) == 2 and all(", 0 certified point(s) broken (" in line for line in logged), captured.err
    # ... with the attacks that ran (none when the untrained model classifies none of the 16 right).
    assert all(re.match(rf"AutoAttack at eps {eps} \((apgd-ce, apgd-t|no attack)\): ", line)
               for line, eps in zip(logged, ["0.141176", "0.5"])), logged
    summary = json.loads((out / "certify.json").read_text())
    assert summary["n"] == 64 and summary["data"] == "fashion-mnist"
    assert [e["eps"] for e in summary["certified_accuracy"]] == [36 / 255, 0.5]
    assert len(summary["autoattack"]) == 2
    for attack, certified in zip(summary["autoattack"], summary["certified_accuracy"]):
        assert attack["n"] == 16 and attack["n_certified_broken"] == 0 and attack["sound"]
        assert attack["attacks"] == (["apgd-ce", "apgd-t"] if attack["n_attacked"] else [])
    png = (out / "certified_accuracy.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000


@needs_data
def test_module_entry_point(checkpoint, tmp_path):
    run = subprocess.run([sys.executable, "-m", "lipnet.certify", "--checkpoint", str(checkpoint), "--data",
                          "fashion-mnist", "--limit", "32", "--no-progress", "--device", "cpu"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr
    assert "108/255" in run.stdout


def test_errors_exit_with_status_2_and_a_message(tmp_path, checkpoint, capsys):
    assert main(["--checkpoint", str(tmp_path / "missing.pt"), "--data", "fashion-mnist"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert main(["--checkpoint", str(checkpoint), "--data", "imagenet-21k"]) == 2
    assert "imagenet-21k" in capsys.readouterr().err
    assert main(["--checkpoint", str(checkpoint), "--data", "fashion-mnist", "--limit", "0"]) == 2
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(checkpoint), "--data", "fashion-mnist", "--eps", "x"])


def test_format_table_without_attacks(small_net, blobs):
    from lipnet.certify import certified_accuracy

    result = certified_accuracy(small_net, blobs(10), eps=[72 / 255, 0.3], progress=False)
    table = format_table(result)
    assert "72/255" in table and "0.3" in table and "AutoAttack" not in table


def test_plot_with_infinite_radii(tmp_path, small_net, blobs):
    from lipnet.certify import certified_accuracy
    from lipnet.certify.cli import plot_certified_accuracy

    result = certified_accuracy(small_net, blobs(10), eps=[0.1], progress=False)
    result.radii[0] = float("inf")
    plot_certified_accuracy(result, [], tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes().startswith(b"\x89PNG")


def test_nothing_certifiable_exits_2_never_1(tmp_path, capsys):
    """Exit status 1 means a soundness failure and nothing else."""
    from lipnet.data import synthetic_dataset, write_npz

    data = tmp_path / "data"
    write_npz(synthetic_dataset("fashion-mnist", 16, split="test"), data / "test.npz")
    three = build_model("convnet", in_channels=3, num_classes=10, input_size=28, widths=[8], depths=[0], dense=[16])
    path = save_model(tmp_path / "rgb.pt", three, dataset="cifar10")
    # A 3-channel model on 1-channel data: broadcasting would break the bound, so it is refused.
    assert main(["--checkpoint", str(path), "--data", "fashion-mnist", "--data-dir", str(data), "--no-progress"]) == 2
    assert "channel" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["--checkpoint", str(path), "--data", "fashion-mnist", "--data-dir", str(data),
                     "--device", "cuda"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err
    assert main(["--checkpoint", str(path), "--data", "fashion-mnist", "--device", "bogus"]) == 2
    (tmp_path / "file").write_text("")
    assert main(["--checkpoint", str(path), "--data", "fashion-mnist", "--out", str(tmp_path / "file")]) == 2
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(path), "--data", "fashion-mnist", "--eps", "1e400"])


@needs_data
def test_checkpoints_trained_with_screened_bounds_are_certified_as_trained(tmp_path, capsys):
    """A GPU or compiled training step screens its bounds alone; its checkpoint says so, and
    the CPU then computes the same function (a flat-spectrum layer: the refined bound is
    lower, so the two functions differ); --screening-alone forces it."""
    torch.manual_seed(0)
    model = build_model("convnet", in_channels=1, num_classes=10, input_size=28, widths=[16], depths=[1],
                        dense=[16], mean=[0.29], std=[0.35])
    conv = [m for m in model.modules() if isinstance(m, GramConv2d) and m.kernel_size == (3, 3)][0]
    with torch.no_grad():
        conv.weight.copy_(0.003 * torch.randn_like(conv.weight) / 12)
        conv.weight[torch.arange(16), torch.arange(16), 1, 1] += 1
    paths = {screened: save_model(tmp_path / f"{screened}.pt", model, dataset="fashion-mnist",
                                  bounds_screened_alone=screened) for screened in (False, True)}

    def certify(path, *flags):
        out = tmp_path / f"out-{path.stem}-{len(flags)}"
        assert main(["--checkpoint", str(path), "--data", "fashion-mnist", "--limit", "8", "--no-progress",
                     "--device", "cpu", "--out", str(out), *flags]) == 0
        return json.loads((out / "certify.json").read_text())

    refined = certify(paths[False])
    assert "screened alone" not in capsys.readouterr().err
    screened = certify(paths[True])
    assert "screened alone in training" in capsys.readouterr().err
    forced = certify(paths[False], "--screening-alone")
    assert not refined["screening_alone"] and screened["screening_alone"] and forced["screening_alone"]
    assert forced["lipschitz"] == screened["lipschitz"] < refined["lipschitz"] * (1 - 1e-3)


def test_results_that_cannot_be_written_exit_2_and_leave_no_part(tmp_path, checkpoint, capsys):
    from lipnet.data import synthetic_dataset, write_npz

    write_npz(synthetic_dataset("fashion-mnist", 16, split="test"), tmp_path / "data" / "test.npz")
    common = ["--checkpoint", str(checkpoint), "--data", "fashion-mnist", "--data-dir", str(tmp_path / "data"),
              "--eps", "0.5", "--no-progress", "--device", "cpu"]
    (tmp_path / "afile").write_text("")
    assert main([*common, "--out", str(tmp_path / "afile" / "sub")]) == 2
    assert "cannot write the results" in capsys.readouterr().err
    (tmp_path / "out" / "certified_accuracy.png").mkdir(parents=True)
    assert main([*common, "--out", str(tmp_path / "out")]) == 2
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["certified_accuracy.png"]  # no summary, no part
    assert main([*common, "--out", str(tmp_path / "good")]) == 0
    assert sorted(p.name for p in (tmp_path / "good").iterdir()) == ["certified_accuracy.png", "certify.json"]


def test_plot_with_the_largest_float_as_radius(tmp_path, small_net, blobs):
    """A constant logit gap (identical last-layer rows, a zero last layer) certifies the largest
    float64; 1.05 times it overflowed the axis to inf and matplotlib raised a ValueError."""
    from lipnet.certify import certified_accuracy
    from lipnet.certify.cli import plot_certified_accuracy

    result = certified_accuracy(small_net, blobs(10), eps=[0.1], progress=False)
    result.radii[0] = torch.finfo(torch.float64).max
    plot_certified_accuracy(result, [], tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes().startswith(b"\x89PNG")


@needs_data
def test_data_set_and_radii_default_to_what_the_checkpoint_records(tmp_path, capsys):
    torch.manual_seed(0)
    model = build_model("convnet", in_channels=1, num_classes=10, input_size=28, widths=[8], depths=[0], dense=[16])
    recorded = save_model(tmp_path / "recorded.pt", model, dataset={"name": "fashion-mnist"},
                          config={"eval_eps": [0.1, 0.25]})
    common = ["--limit", "8", "--no-progress", "--device", "cpu", "--threads", "1"]
    assert main(["--checkpoint", str(recorded), *common, "--out", str(tmp_path / "a")]) == 0
    summary = json.loads((tmp_path / "a" / "certify.json").read_text())
    assert summary["data"] == "fashion-mnist" and [e["eps"] for e in summary["certified_accuracy"]] == [0.1, 0.25]
    err = capsys.readouterr().err
    assert "the data set the checkpoint was trained on" in err and "radii the checkpoint's recipe reported" in err
    # Given explicitly, --eps wins; without recorded radii the CIFAR ones are the default.
    bare = save_model(tmp_path / "bare.pt", model, dataset="fashion-mnist")
    assert main(["--checkpoint", str(bare), *common, "--out", str(tmp_path / "b")]) == 0
    summary = json.loads((tmp_path / "b" / "certify.json").read_text())
    assert [e["eps"] for e in summary["certified_accuracy"]] == [36 / 255, 72 / 255, 108 / 255]
    assert main(["--checkpoint", str(recorded), "--eps", "0.5", *common, "--out", str(tmp_path / "c")]) == 0
    assert [e["eps"] for e in json.loads((tmp_path / "c" / "certify.json").read_text())["certified_accuracy"]] == [0.5]


def test_data_is_required_when_the_checkpoint_does_not_record_it(tmp_path, capsys):
    model = build_model("convnet", in_channels=1, num_classes=10, input_size=28, widths=[8], depths=[0], dense=[16])
    path = save_model(tmp_path / "anonymous.pt", model)
    assert main(["--checkpoint", str(path), "--no-progress", "--device", "cpu"]) == 2
    assert "--data is required" in capsys.readouterr().err
