"""Mutation-testing gaps of lipnet.certify.cli (``python -m lipnet.certify``).

The existing CLI tests run a sound model: no test saw exit status 1. Here AutoAttack is replaced
by a fixed map (each attacked image becomes an image the model puts in another class) on a
synthetic data set whose labels are the model's predictions, so these properties are pinned: a
broken certificate (radii inflated a millionfold) exits 1 with a SOUNDNESS FAILURE message, the
audit checks the very certificates the CLI computed, and the JSON says which points; points broken
within eps but not certified exit 0; the attack version reaches the audit; the documented defaults
(radii 36/255, 72/255, 108/255, the test split, 1000 attacked examples); --attack-limit, --batch-size
and --threads below 1, and an --out that is a file, are refused by name; --threads is applied; the
split and a data set other than the training one are reported; the screening notes; the table's
robust/certified/broken columns and its eps labels; and errors raised while loading data or
certifying exit 2.
"""

import dataclasses
import importlib
import json

import pytest
import torch

from lipnet.certify.accuracy import certified_accuracy
from lipnet.certify.audit import AuditResult
from lipnet.certify.cli import build_parser, format_table, main
from lipnet.checkpoint import load_model, save_model
from lipnet.data import synthetic_dataset, write_npz
from lipnet.models import build_model

cli = importlib.import_module("lipnet.certify.cli")
audit_module = importlib.import_module("lipnet.certify.audit")


@pytest.fixture
def predicted(tmp_path, checkpoint):
    """A synthetic Fashion-MNIST test split labelled with the model's own predictions (every point
    correct), and an 'attack' that replaces each image by one the model puts in another class."""
    data = synthetic_dataset("fashion-mnist", 16, split="test")
    model, _ = load_model(checkpoint)
    images = data.images.float() / 255
    with torch.no_grad():
        labels = model(images).argmax(dim=1)
    assert labels.unique().numel() >= 2  # the premise: another class to move to
    write_npz(dataclasses.replace(data, labels=labels), tmp_path / "data" / "test.npz")

    def attack(model, xs, ys, *args):
        return torch.stack([images[int((labels != label).nonzero()[0])] for label in ys.tolist()]), ("apgd-ce",)

    return tmp_path / "data", attack


def run_main(checkpoint, data_dir, *flags):
    return main(["--checkpoint", str(checkpoint), "--data", "fashion-mnist", "--data-dir", str(data_dir),
                 "--no-progress", "--device", "cpu", *flags])


def test_a_broken_certificate_exits_1_and_is_reported(tmp_path, checkpoint, predicted, monkeypatch, capsys):
    """With every radius inflated a millionfold (false certificates), the audit of those very
    certificates finds each attacked point broken inside its radius: exit 1, the SOUNDNESS FAILURE
    line, a warning, and certify.json with sound false and the failures."""
    data_dir, attack = predicted
    monkeypatch.setattr(audit_module, "_run_autoattack", attack)

    def inflated(*args, **kwargs):
        result = certified_accuracy(*args, **kwargs)
        result.radii.mul_(1e6)
        return result

    monkeypatch.setattr(cli, "certified_accuracy", inflated)
    out = tmp_path / "out"
    with pytest.warns(audit_module.SoundnessWarning):
        code = run_main(checkpoint, data_dir, "--eps", "0.5", "--autoattack", "--attack-version", "apgd",
                        "--attack-limit", "8", "--out", str(out))
    captured = capsys.readouterr()
    assert code == 1, captured.err
    assert "SOUNDNESS FAILURE: AutoAttack broke 8 certified prediction(s)" in captured.err
    (attack_summary,) = json.loads((out / "certify.json").read_text())["autoattack"]
    assert attack_summary["sound"] is False and attack_summary["n_certified_broken"] == 8
    assert attack_summary["failures"] == list(range(8))
    row = [line for line in captured.out.splitlines() if line.lstrip().startswith("0.5 ")][0]
    assert row.split()[-1] == "8"  # the cert. broken column


def test_points_broken_within_eps_but_not_certified_exit_0(tmp_path, checkpoint, predicted, monkeypatch, capsys):
    """At eps 30 (beyond every true radius) all 8 attacked points are broken, none certified: no
    soundness failure, exit 0; the JSON records the version asked for and the breaks."""
    data_dir, attack = predicted
    monkeypatch.setattr(audit_module, "_run_autoattack", attack)
    out = tmp_path / "out"
    code = run_main(checkpoint, data_dir, "--eps", "30", "--autoattack", "--attack-version", "apgd",
                    "--attack-limit", "8", "--out", str(out))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "AutoAttack at eps 30 (apgd-ce): 8 of 8 attacked broken within eps, 0 certified point(s) broken" in (
        captured.err)
    (attack_summary,) = json.loads((out / "certify.json").read_text())["autoattack"]
    assert attack_summary["version"] == "apgd" and attack_summary["n_broken"] == 8
    assert attack_summary["robust_accuracy"] == 0.0 and attack_summary["sound"] is True


def test_documented_defaults():
    """Radii and data set from the checkpoint (None here: main reads them from it, else the radii
    36/255, 72/255, 108/255: test_cli), the test split, standard AutoAttack on the first 1000
    examples, batches of 500, no limit, no attack."""
    args = build_parser().parse_args(["--checkpoint", "c.pt"])
    assert args.eps is None and args.data is None
    assert (args.split, args.attack_version, args.attack_limit, args.batch_size) == ("test", "standard", 1000, 500)
    assert args.limit is None and not args.autoattack and not args.screening_alone


@pytest.mark.parametrize("option", ["--limit", "--attack-limit", "--batch-size", "--threads"])
def test_counts_below_1_are_refused_by_name(tmp_path, checkpoint, option, capsys):
    """Each count option below 1 exits 2, naming the option (before anything is loaded)."""
    assert main(["--checkpoint", str(checkpoint), "--data", "fashion-mnist", option, "0"]) == 2
    assert f"{option} must be >= 1, got 0" in capsys.readouterr().err


def test_threads_are_applied(tmp_path, monkeypatch):
    """--threads N sets torch's CPU threads (here before the missing checkpoint is noticed)."""
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    assert main(["--checkpoint", str(tmp_path / "missing.pt"), "--data", "fashion-mnist", "--threads", "3"]) == 2
    assert calls == [3]


def test_an_out_that_is_a_file_is_refused_before_certifying(tmp_path, checkpoint, monkeypatch, capsys):
    """The message names the problem, and no certification runs."""
    def no_certification(*args, **kwargs):
        raise AssertionError("certified before checking --out")

    monkeypatch.setattr(cli, "certified_accuracy", no_certification)
    (tmp_path / "file").write_text("")
    assert main(["--checkpoint", str(checkpoint), "--data", "fashion-mnist", "--out", str(tmp_path / "file")]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err


def test_the_split_and_another_data_set_are_reported(tmp_path, checkpoint, capsys):
    """A fashion-mnist checkpoint certified on the MNIST train split: one warning line (no progress
    bar with --no-progress), and certify.json says mnist, train."""
    write_npz(synthetic_dataset("mnist", 8, split="train"), tmp_path / "mnist" / "train.npz")
    out = tmp_path / "out"
    assert main(["--checkpoint", str(checkpoint), "--data", "mnist", "--data-dir", str(tmp_path / "mnist"),
                 "--split", "train", "--eps", "0.1", "--no-progress", "--device", "cpu", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["warning: the checkpoint was trained on 'fashion-mnist', certifying on 'mnist'"]
    summary = json.loads((out / "certify.json").read_text())
    assert (summary["data"], summary["split"], summary["n"]) == ("mnist", "train", 8)


def test_no_warning_for_the_training_data_set(tmp_path, checkpoint, capsys):
    write_npz(synthetic_dataset("fashion-mnist", 4, split="test"), tmp_path / "d" / "test.npz")
    assert run_main(checkpoint, tmp_path / "d", "--eps", "0.1") == 0
    assert "warning" not in capsys.readouterr().err


def test_screening_notes(tmp_path, capsys, monkeypatch):
    """--screening-alone on a checkpoint screened in training prints no note (nothing to explain);
    a checkpoint refined in training, certified where bounds are screened alone, gets the note."""
    write_npz(synthetic_dataset("fashion-mnist", 4, split="test"), tmp_path / "d" / "test.npz")
    model = build_model("convnet", in_channels=1, num_classes=10, input_size=28, widths=[8], depths=[0], dense=[16])
    screened = save_model(tmp_path / "s.pt", model, dataset="fashion-mnist", bounds_screened_alone=True)
    refined = save_model(tmp_path / "r.pt", model, dataset="fashion-mnist", bounds_screened_alone=False)
    assert run_main(screened, tmp_path / "d", "--eps", "0.1", "--screening-alone") == 0
    assert "note:" not in capsys.readouterr().err
    monkeypatch.setattr(cli, "refines_exceeding", lambda device: False)
    assert run_main(refined, tmp_path / "d", "--eps", "0.1") == 0
    assert "were refined in training (CPU)" in capsys.readouterr().err


def test_table_columns_of_an_audit(small_net, blobs):
    """The audited radius's row gives robust accuracy, then certified accuracy, then the number of
    certified points broken; a radius without audit has no such columns."""
    result = certified_accuracy(small_net, blobs(4), eps=[72 / 255, 0.3], progress=False)
    audited = AuditResult(eps=0.3, version="apgd", attacks=("apgd-ce", "apgd-t"), n=4, n_correct=4, n_certified=1, n_robust=3, n_attacked=4,
                          n_broken=1, failures=torch.tensor([2]), failure_distances=torch.tensor([0.1]),
                          failure_radii=torch.tensor([0.2]))
    lines = format_table(result, [audited]).splitlines()
    assert "AutoAttack on the first 4" in lines[-3]
    assert lines[-2].split() == ["72/255", f"{100 * result.certified[0]:.2f}%"]
    assert lines[-1].split() == ["0.3", f"{100 * result.certified[1]:.2f}%", "75.00%", "25.00%", "1"]


def test_eps_labels(small_net, blobs):
    """Multiples of 1/255 below 1 as fractions; whole numbers and other radii as decimals."""
    eps = [1.0, 36 / 255, 0.5, 2.0, 256 / 255, 0.1]
    result = certified_accuracy(small_net, blobs(2), eps=eps, progress=False)
    labels = [line.split()[0] for line in format_table(result).splitlines()[-len(eps):]]
    assert labels == ["1", "36/255", "0.5", "2", "256/255", "0.1"]


def test_errors_while_loading_or_certifying_exit_2(tmp_path, checkpoint, monkeypatch, capsys):
    """A ValueError from the data loader and a RuntimeError while certifying (out of memory, say)
    exit 2 with the message, never a traceback."""
    write_npz(synthetic_dataset("fashion-mnist", 4, split="test"), tmp_path / "d" / "test.npz")

    def runtime_error(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(cli, "certified_accuracy", runtime_error)
    assert run_main(checkpoint, tmp_path / "d", "--eps", "0.1") == 2
    assert "cannot certify" in (err := capsys.readouterr().err) and "out of memory" in err

    def value_error(*args, **kwargs):
        raise ValueError("labels must lie in [0, 10)")

    monkeypatch.setattr(importlib.import_module("lipnet.data"), "load_dataset", value_error)
    assert run_main(checkpoint, tmp_path / "d", "--eps", "0.1") == 2
    assert "labels must lie in [0, 10)" in capsys.readouterr().err


def test_the_plotted_curve_is_the_certified_accuracy_up_to_the_largest_finite_radius(tmp_path, small_net, blobs,
                                                                                     monkeypatch):
    """The curve is the share of radii strictly above each eps (radius 0 is not certified at 0), and
    the axis runs 5% past the largest finite radius (an infinite one is left out) or the largest eps."""
    from matplotlib.axes import Axes

    from lipnet.certify.cli import plot_certified_accuracy

    calls = []
    original = Axes.plot
    monkeypatch.setattr(Axes, "plot", lambda self, *args, **kwargs: calls.append(args) or original(self, *args, **kwargs))
    result = certified_accuracy(small_net, blobs(10), eps=[0.1], progress=False)
    result.radii[:] = torch.tensor([0, 0, 0.05, 0.05, 0.2, 0.2, 0.3, 0.3, 0.3, float("inf")], dtype=result.radii.dtype)
    plot_certified_accuracy(result, [], tmp_path / "plot.png")
    grid, curve = calls[0]
    assert grid[0] == 0 and grid[-1] == pytest.approx(0.3 * 1.05, rel=1e-12)
    assert curve[0] == 80.0 and curve[-1] == 10.0
    at = {e: c for e, c in zip(grid, curve)}
    assert all(c == 100 * sum(r > e for r in result.radii.tolist()) / 10 for e, c in at.items())
