"""Red team of the numbers a recipe run reports (helper 73).

Every figure of ``report.json``, ``metrics.jsonl``, the radius histogram and the audit is
recomputed here from first principles, in float64, with code that does not call lipnet's
bounds: the weights each layer applies are read from the saved ``model.pt`` (and checked to
reproduce the model's own forward pass), each layer's exact operator norm comes from the SVD
of its explicit matrix on the run's input size, and the radii from the logit margins.

The last section holds the bugs it found, fixed since; each test failed before its fix.
"""

from __future__ import annotations

import importlib
import json
import math
import re

import matplotlib.axes
import numpy as np
import pytest
import torch
from torch.nn import functional as F

from lipnet.certify import CertificationResult, certified_accuracy
from lipnet.certify.audit import audit
from lipnet.certify.cli import main as certify_main
from lipnet.checkpoint import CheckpointError, load_model
from lipnet.data import dataset_info, load_dataset, synthetic_dataset, write_npz
from lipnet.training import build_run_model, train
from recipes import RECIPES

#: A small ConvNet: 1x28x28 -> 4x14x14 -> 4x14x14 -> 8x7x7 -> 8x7x7 -> 16 -> 10; every
#: explicit operator is at most 784 x 784, so its SVD takes milliseconds.
SMALL = {"widths": [4, 8], "depths": [1, 1], "dense": [16]}
EPS = (0.05, 0.1, 0.25, 0.5)


def quiet(message):
    pass


def tiny(data_dir, out_dir, **changes):
    settings = dict(data_dir=str(data_dir), out_dir=str(out_dir), epochs=2, batch_size=32, progress=False, threads=1,
                    model="convnet", model_kwargs=SMALL, eval_eps=EPS, crop_padding=0, flip=False)
    settings.update(changes)
    return RECIPES["mnist"].replace(**settings)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    write_npz(synthetic_dataset("mnist", 128, split="train", seed=0), folder / "train.npz")
    write_npz(synthetic_dataset("mnist", 96, split="test", seed=1), folder / "test.npz")
    return folder


@pytest.fixture(scope="module")
def emma_run(data_dir, tmp_path_factory):
    """A finished run (EMMA loss, last-layer certificate, a test subset of 64 of the 96)."""
    out = tmp_path_factory.mktemp("run") / "emma"
    result = train(tiny(data_dir, out, loss="emma", test_subset=64, lr=3e-3), log=quiet)
    return out, result


# -- an independent float64 model ------------------------------------------------------------


def applied_ops(model):
    """What each layer applies, in float64: read from the layers after a forward pass (eval mode)."""
    ops = []
    with torch.no_grad():
        for layer in model:
            name = type(layer).__name__
            if name == "InputNormalization":
                ops.append(("norm", layer.mean.detach().double().flatten(), layer.std.detach().double().flatten()))
            elif name == "GramConv2d":
                bias = None if layer.bias is None else layer.bias.detach().double()
                ops.append(("conv", layer.normalized_weight().detach().double(), bias, layer.stride, layer.padding))
            elif name == "GramLinear":
                bias = None if layer.bias is None else layer.bias.detach().double()
                ops.append(("linear", layer.normalized_weight().detach().double(), bias))
            elif name == "MaxMin":
                assert layer.dim == 1
                ops.append(("maxmin",))
            elif name == "Flatten":
                ops.append(("flatten",))
            else:
                raise TypeError(f"no independent model of {name}")
    return ops


def apply(op, x):
    kind = op[0]
    if kind == "norm":
        return (x - op[1].view(1, -1, 1, 1)) / op[2].view(1, -1, 1, 1)
    if kind == "conv":
        return F.conv2d(x, op[1], op[2], op[3], op[4])
    if kind == "linear":
        return F.linear(x, op[1], op[2])
    if kind == "maxmin":  # (a, b) -> (max, min), halves of the channels
        a, b = x.chunk(2, dim=1)
        return torch.cat([torch.maximum(a, b), torch.minimum(a, b)], 1)
    return x.flatten(1)


def exact_norm(op, shape):
    """The operator norm of the layer's linear part on inputs of ``shape``: SVD of its matrix."""
    kind = op[0]
    if kind in ("maxmin", "flatten"):
        return 1.0  # a permutation on each pair / a reshape
    if kind == "norm":
        return float((1 / op[2]).max())
    n = math.prod(shape)
    basis = torch.eye(n, dtype=torch.float64).reshape(n, *shape)
    linear_part = (kind, op[1], None, *op[3:])
    matrix = apply(linear_part, basis).reshape(n, -1)
    return float(torch.linalg.matrix_norm(matrix, 2))


class Independent:
    """Logits, exact per-layer norms and last-layer radii of a saved model, in float64."""

    def __init__(self, model_path, images, labels):
        model, self.info = load_model(model_path)
        model.eval()
        x32 = images.float() / 255
        with torch.no_grad():
            self.float32_logits = model(x32).double()
        self.ops = applied_ops(model)
        h, shapes = images.double() / 255, []
        for op in self.ops:
            shapes.append(tuple(h.shape[1:]))
            h = apply(op, h)
        self.logits, self.labels = h, labels.long()
        self.norms = [exact_norm(op, shape) for op, shape in zip(self.ops, shapes)]
        self.body = math.prod(self.norms[:-1])
        self.lipschitz = self.body * self.norms[-1]
        y = self.labels
        gaps = self.logits.gather(1, y[:, None]) - self.logits  # f_y - f_j
        distances = torch.cdist(self.ops[-1][1], self.ops[-1][1])[y]  # ||w_y - w_j||
        own = F.one_hot(y, self.logits.shape[1]).bool()
        self.correct = self.logits.argmax(1) == y
        self.radii = torch.where(own, math.inf, gaps / (self.body * distances)).amin(1).clamp_min(0)
        self.generic = (gaps.masked_fill(own, math.inf).amin(1) / (math.sqrt(2) * self.lipschitz)).clamp_min(0)
        self.min_gap = gaps.masked_fill(own, math.inf).amin(1)


def test_the_report_is_an_independent_float64_recomputation_from_model_pt(emma_run):
    out, result = emma_run
    report = json.loads((out / "report.json").read_text())
    test = load_dataset("mnist", "test", data_dir=report["config"]["data_dir"]).subset(report["config"]["test_subset"])
    mine = Independent(out / "model.pt", test.images, test.labels)
    # The weights read are those the model applies.
    assert float((mine.logits - mine.float32_logits).abs().max()) < 1e-4
    # Every module bound of the report is at least the exact operator norm of what the layer applies.
    bounds = report["module_bounds"]
    assert [b["module"] for b in bounds] == [str(i) for i in range(len(mine.norms))]
    for entry, norm in zip(bounds, mine.norms):
        assert entry["lipschitz"] >= norm * (1 - 1e-12), entry
        assert entry["lipschitz"] <= norm * 1.05 + 1e-12, entry  # and not absurdly loose
    assert report["body_lipschitz"] >= mine.body * (1 - 1e-12) and report["lipschitz"] >= mine.lipschitz * (1 - 1e-12)
    assert report["radius"] == "last-layer" and report["n"] == len(test) == 64
    # Clean accuracy: the float64 argmax (no example within 1e-9 of a tie here).
    assert float(mine.min_gap.abs().min()) > 1e-9
    assert report["clean_accuracy"] == float(mine.correct.double().mean())
    # lipnet's radii: never above the truly certifiable radius, and the report counts them (radius > eps).
    lipnet = certified_accuracy(result.model, (test.images, test.labels), EPS, progress=False)
    assert torch.equal(lipnet.correct, mine.correct)
    assert bool((lipnet.radii <= mine.radii * (1 + 1e-12)).all())
    assert bool((lipnet.radii >= mine.radii * 0.9 - 1e-9).all())  # and not far below it
    assert bool((lipnet.radii[~mine.correct] == 0).all())
    assert bool((mine.radii >= mine.generic * (1 - 1e-12)).all())  # the last-layer radius is the tighter one
    for entry, eps in zip(report["certified_accuracy"], EPS):
        assert entry["eps"] == eps
        assert entry["accuracy"] * 64 == pytest.approx(int((lipnet.radii > eps).sum()), abs=1e-9)
        certified = lipnet.radii > eps
        assert bool((certified <= (mine.radii > eps)).all())  # a subset of what is truly certifiable
    assert any(0 < e["accuracy"] < report["clean_accuracy"] for e in report["certified_accuracy"])  # not trivial
    # The radius histogram counts those radii: correct ones in [edge_i, edge_i+1), beyond the range in the last bin.
    histogram = report["radius_histogram"]
    edges = np.array(histogram["edges"])
    assert edges[0] == 0 and edges[-1] >= 2 * max(EPS) and len(histogram["counts"]) == len(edges) - 1
    radii = lipnet.radii[lipnet.correct].numpy()
    expected = [int(((radii >= a) & (radii < b)).sum()) for a, b in zip(edges[:-2], edges[1:-1])]
    expected.append(int((radii >= edges[-2]).sum()))
    assert histogram["counts"] == expected
    assert histogram["misclassified"] == int((~mine.correct).sum())
    assert sum(histogram["counts"]) + histogram["misclassified"] == 64


def test_the_certify_command_and_the_final_checkpoint_give_the_reports_numbers(emma_run, tmp_path):
    """``python -m lipnet.certify`` on model.pt and the same test images, and the model of the final
    checkpoint.pt: the same function, the same clean and certified accuracies as report.json."""
    out, result = emma_run
    report = json.loads((out / "report.json").read_text())
    data_dir = report["config"]["data_dir"]
    assert certify_main(["--checkpoint", str(out / "model.pt"), "--data", "mnist", "--data-dir", data_dir,
                         "--eps", ",".join(map(str, EPS)), "--limit", "64", "--no-progress",
                         "--out", str(tmp_path / "cert")]) == 0
    again = json.loads((tmp_path / "cert" / "certify.json").read_text())
    for key in ("n", "clean_accuracy", "certified_accuracy", "lipschitz", "body_lipschitz", "radius"):
        assert again[key] == report[key], key
    final, _ = load_model(out / "checkpoint.pt")
    saved, _ = load_model(out / "model.pt")
    test = load_dataset("mnist", "test", data_dir=data_dir).subset(64)
    x = test.images.float() / 255
    with torch.no_grad():
        assert torch.equal(final.eval()(x), saved.eval()(x))


def test_the_certified_accuracy_plot_draws_the_reports_points_and_the_radii_curve(emma_run, tmp_path, monkeypatch):
    """certified_accuracy.png as the report draws it (lipnet.training.report calls the certify
    command's plot): its dots are report.json's certified accuracies, its curve the fraction of
    radii > eps at every eps of its grid, its dashed line the clean accuracy (in %)."""
    from lipnet.training import report as report_module

    out, result = emma_run
    report = json.loads((out / "report.json").read_text())
    test = load_dataset("mnist", "test", data_dir=report["config"]["data_dir"]).subset(64)
    lipnet = certified_accuracy(result.model, (test.images, test.labels), EPS, progress=False)
    drawn, lines = [], []
    original_plot, original_axhline = matplotlib.axes.Axes.plot, matplotlib.axes.Axes.axhline

    def plot(self, *args, **kwargs):
        drawn.append((list(args[0]), list(args[1])))
        return original_plot(self, *args, **kwargs)

    def axhline(self, y=0, *args, **kwargs):
        lines.append(y)
        return original_axhline(self, y, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", plot)
    monkeypatch.setattr(matplotlib.axes.Axes, "axhline", axhline)
    report_module.plot_certified_accuracy(lipnet, [], tmp_path / "plot.png")
    (grid, curve), (dots_x, dots_y) = drawn
    assert dots_x == list(EPS)
    assert dots_y == pytest.approx([100 * e["accuracy"] for e in report["certified_accuracy"]], abs=1e-9)
    radii = lipnet.radii.numpy()
    assert curve == pytest.approx([100 * float((radii > e).mean()) for e in grid], abs=1e-9)
    assert grid[0] == 0 and grid[-1] >= max(EPS) and grid[-1] >= float(radii.max())
    assert lines == [pytest.approx(100 * report["clean_accuracy"])]


def test_the_subset_and_the_epochs_are_named_in_the_report(emma_run):
    out, result = emma_run
    report = json.loads((out / "report.json").read_text())
    assert report["data"]["test"]["examples"] == 64 and "(first 64)" in report["data"]["test"]["source"]
    assert report["config"]["test_subset"] == 64 and report["epochs"] == 2
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2] and lines == result.history


# -- the per-epoch metrics ---------------------------------------------------------------------


@pytest.mark.parametrize("loss, temperature", [("ce", 1.0), ("ce", 0.25), ("hinge", 1.0), ("emma", 0.5)])
def test_epoch_metrics_are_the_pre_step_train_batch_and_the_post_epoch_eval_model(data_dir, tmp_path, loss,
                                                                                   temperature):
    """One step per epoch (the whole 128 training images in one batch, no augmentation): the
    training loss and accuracies are those of the model before the step, in train mode, on the
    training images, with the margin and the loss the docs describe; the test estimates are the
    float32 eval-mode accuracies of the model after the epoch on the test subset."""
    config = tiny(data_dir, tmp_path / loss, epochs=1, batch_size=128, loss=loss, certify=False, test_subset=48,
                  train_eps=0.1, temperature=temperature)
    torch.manual_seed(config.seed)
    before = build_run_model(config, dataset_info("mnist"))
    record = train(config, log=quiet).history[0]
    after, _ = load_model(tmp_path / loss / "checkpoint.pt")
    train_set = load_dataset("mnist", "train", data_dir=data_dir)
    x, y = train_set.images.float() / 255, train_set.labels.long()
    before.train()
    logits = before(x).detach().double()
    std = float(before[0].std.min())
    margin = math.sqrt(2) * config.train_eps / std  # sqrt(2) L train_eps, L = 1 / std
    true = logits.gather(1, y[:, None])
    gaps = (true - logits).masked_fill(F.one_hot(y, 10).bool(), math.inf).amin(1)
    if loss == "ce":
        expected = F.cross_entropy((logits - margin * F.one_hot(y, 10)) / temperature, y) * temperature
    elif loss == "hinge":
        expected = (F.relu(margin - (true - logits)).sum(1) - margin).div(9).mean()  # the true class adds `margin`
    else:  # f_j + min(eps, max(0, (f_y - f_j) / K_yj)) K_yj, K_yj = L ||w_y - w_j||, never past f_y
        with torch.no_grad():
            weight = before[-1].normalized_weight().double()
        pairs = torch.cdist(weight, weight)[y] / std
        reach = ((true - logits) / pairs).nan_to_num(0.0).clamp(0, config.train_eps)
        raised = torch.where(true >= logits, torch.minimum(logits + reach * pairs, true), logits)
        expected = F.cross_entropy(raised / temperature, y) * temperature
    assert record["margin"] == pytest.approx(margin, rel=1e-6)
    assert record["train_loss"] == pytest.approx(float(expected), rel=1e-5)
    assert record["train_acc"] == float((gaps > 0).double().mean())
    assert record["train_margin_acc"] == float((gaps >= margin).double().mean())
    test_set = load_dataset("mnist", "test", data_dir=data_dir).subset(48)
    after.eval()
    with torch.no_grad():
        test_logits = after(test_set.images.float() / 255).double()
    yt = test_set.labels.long()
    test_gaps = (test_logits.gather(1, yt[:, None]) - test_logits).masked_fill(F.one_hot(yt, 10).bool(),
                                                                                math.inf).amin(1)
    assert record["test_acc"] == float((test_gaps > 0).double().mean())
    assert record["test_margin_acc"] == float((test_gaps >= record["margin"]).double().mean())


def test_a_budgeted_run_reports_the_epochs_it_trained_everywhere(data_dir, tmp_path, monkeypatch):
    """A time budget that leaves 2 of 3 epochs (the plan forced): the report, the final model, the
    checkpoint and the metrics all say 2, and the schedule still ends at 0; resuming the finished
    run trains nothing more and reports the same."""
    monkeypatch.setattr("lipnet.training.trainer.plan_epochs", lambda *args, **kwargs: 2)
    config = tiny(data_dir, tmp_path / "run", epochs=3, time_budget=60.0, eval_eps=(0.1,))
    result = train(config, log=quiet)
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    _, info = load_model(tmp_path / "run" / "model.pt")
    from lipnet.checkpoint import load_checkpoint

    training = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["training"]
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert report["epochs"] == info["epoch"] == training["epochs_done"] == training["epochs"] == len(lines) == 2
    assert result.history[-1]["lr"] == pytest.approx(0, abs=1e-12) and result.history[-1]["test_acc"] is not None
    again = train(config.replace(resume=True), log=quiet)
    assert again.history == result.history
    assert json.loads((tmp_path / "run" / "report.json").read_text())["certified_accuracy"] == \
        report["certified_accuracy"]


# -- the audit -----------------------------------------------------------------------------------


def test_the_audit_counts_mean_what_they_say(emma_run, monkeypatch):
    """A real APGD audit at one radius, its adversarial examples intercepted: they lie in [0, 1]
    and within eps in pixel space; its broken count is the attacked points that the float64 model
    misclassifies there (recounted independently), its certified count the report's rule (radius
    > eps) and a subset of what is truly certifiable, robust >= certified, no certified point broken."""
    audit_module = importlib.import_module("lipnet.certify.audit")  # the package's `audit` is the function

    out, result = emma_run
    test = load_dataset("mnist", "test", data_dir=json.loads((out / "report.json").read_text())["config"]["data_dir"])
    x, y = test.images[:12], test.labels[:12]
    mine = Independent(out / "model.pt", x, y)
    eps = 0.2
    captured, original = [], audit_module._run_autoattack

    def intercepted(model, inputs, labels, *args, **kwargs):
        adversarial, attacks = original(model, inputs, labels, *args, **kwargs)
        captured.append((inputs.clone(), labels.clone(), adversarial.clone()))
        return adversarial, attacks

    monkeypatch.setattr(audit_module, "_run_autoattack", intercepted)
    summary = audit(result.model, x, y, eps, version="apgd", batch_size=12, on_failure="warn").to_dict()
    (inputs, labels, adversarial), = captured
    assert torch.equal(inputs, x[mine.correct].float() / 255) and torch.equal(labels, y[mine.correct].long())
    assert float(adversarial.min()) >= 0 and float(adversarial.max()) <= 1
    distances = (adversarial.double() - inputs.double()).flatten(1).norm(dim=1)
    assert bool((distances <= eps * (1 + 1e-5)).all())
    h = adversarial.double()
    for op in mine.ops:
        h = apply(op, h)
    broken = h.argmax(1) != labels
    assert 0 < int(broken.sum()) < len(labels)  # the attack has teeth, and not everything breaks
    lipnet = certified_accuracy(result.model, (x, y), [eps], progress=False)
    assert summary["n"] == 12 and summary["n_correct"] == int(mine.correct.sum())
    assert summary["n_certified"] == int((lipnet.radii > eps).sum()) <= int((mine.radii > eps).sum())
    assert summary["n_broken"] == int(broken.sum())
    assert summary["n_certified_broken"] == 0 and summary["sound"] and summary["failures"] == []
    assert summary["n_attacked"] == summary["n_correct"]
    assert summary["n_certified"] <= summary["n_robust"] == summary["n_correct"] - summary["n_broken"]
    assert summary["robust_accuracy"] == summary["n_robust"] / 12
    assert summary["certified_accuracy"] == summary["n_certified"] / 12


# -- bugs found (fixed) ----------------------------------------------------------------------------


def test_the_median_radius_of_an_even_count_is_the_mean_of_the_two_middle_radii():
    result = CertificationResult(eps=(0.1,), clean_accuracy=1.0, certified=(1.0,),
                                 radii=torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64),
                                 correct=torch.ones(4, dtype=torch.bool), lipschitz=1.0, body_lipschitz=None,
                                 input_shape=(4,))
    assert result.to_dict()["median_radius_of_correct"] == 2.5  # is 2.0


def test_resuming_with_another_test_subset_keeps_each_estimates_test_set_named(data_dir, tmp_path):
    def stop(epoch, record):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tiny(data_dir, tmp_path / "run", certify=False, test_subset=8), on_epoch_end=stop, log=quiet)
    try:
        result = train(tiny(data_dir, tmp_path / "run", certify=False, test_subset=16, resume=True), log=quiet)
    except (ValueError, CheckpointError):
        return  # refusing the other test subset is a fix too
    first, second = result.history
    assert first["test_acc"] * 8 == round(first["test_acc"] * 8)  # (it was measured on 8 images)
    # Each record must say on how many test images its estimates were taken.
    assert any("test" in key and value == 8 for key, value in first.items() if key != "epoch")
    assert any("test" in key and value == 16 for key, value in second.items() if key != "epoch")


def test_certify_json_of_a_limit_says_it_is_the_first_n_examples(emma_run, tmp_path):
    out, _ = emma_run
    data_dir = json.loads((out / "report.json").read_text())["config"]["data_dir"]
    assert certify_main(["--checkpoint", str(out / "model.pt"), "--data", "mnist", "--data-dir", data_dir,
                         "--eps", "0.1", "--limit", "16", "--no-progress", "--out", str(tmp_path / "cert")]) == 0
    summary = json.loads((tmp_path / "cert" / "certify.json").read_text())
    assert summary["n"] == 16
    text = json.dumps(summary)
    split_size = any(type(value) is int and value == 96 for value in _values(summary))
    assert summary.get("limit") == 16 or "first 16" in text or split_size


def _values(tree):
    if isinstance(tree, dict):
        for value in tree.values():
            yield from _values(value)
    elif isinstance(tree, list):
        for value in tree:
            yield from _values(value)
    else:
        yield tree


def test_the_per_epoch_test_estimates_are_float32_as_documented_under_amp(data_dir, tmp_path, monkeypatch):
    from lipnet.training import TrainConfig
    from lipnet.training.trainer import _Run

    seen, original = [], _Run._test_metrics

    def recording(self):
        hook = self.model.register_forward_hook(
            lambda module, inputs, output: seen.append((torch.is_autocast_enabled("cpu"), output.dtype)))
        try:
            return original(self)
        finally:
            hook.remove()

    monkeypatch.setattr(_Run, "_test_metrics", recording)
    train(tiny(data_dir, tmp_path / "run", epochs=1, amp="bf16", certify=False), log=quiet)
    assert seen
    documented_float32 = "float32" in TrainConfig.__doc__.split("eval_every:")[1].split("Operations")[0]
    assert not documented_float32 or all(dtype == torch.float32 and not autocast for autocast, dtype in seen)


def test_the_training_curves_name_the_margin_an_offset_sets(data_dir, tmp_path, monkeypatch):
    titles = []
    original = matplotlib.axes.Axes.legend

    def legend(self, *args, **kwargs):
        titles.append(kwargs.get("title") or "")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "legend", legend)
    result = train(tiny(data_dir, tmp_path / "run", epochs=1, offset=3.0, eval_eps=(0.1,)), log=quiet)
    assert result.history[0]["margin"] == 3.0
    curve_titles = [t for t in titles if "margin" in t]
    assert curve_titles
    assert all("sqrt(2) L train_eps" not in t and re.search(r"(?<![\d.])3(\.0*)?(?![\d.])|offset", t)
               for t in curve_titles)
