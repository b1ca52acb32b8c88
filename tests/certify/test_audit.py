"""AutoAttack audit: a sound model passes, a falsely registered layer makes the audit fail."""

import importlib

import pytest
import torch
from torch import nn

from lipnet.certify import SoundnessError, SoundnessWarning, audit, certified_accuracy, register_lipschitz_bound
from lipnet.certify.lipschitz import _REGISTRY
from lipnet.nn import GramConv2d, GramLinear


class Amplify(nn.Module):
    """Multiplies by 20 but is (falsely) registered as 1-Lipschitz by the fixture ``amplify``."""

    def forward(self, x):
        return 20 * x


@pytest.fixture
def amplify():
    """Registers the false bound of ``Amplify`` for one test, then restores the registry."""
    assert Amplify not in _REGISTRY
    register_lipschitz_bound(Amplify, lambda module, shape: 1.0)
    try:
        yield Amplify
    finally:
        del _REGISTRY[Amplify]


def test_sound_model_passes_and_the_attack_is_not_toothless(trained_net, blobs):
    x, y = blobs(48, seed=11)
    result = audit(trained_net, x, y, 0.1, version="apgd")
    assert result.sound and result.n_failures == 0
    assert result.certified_accuracy > 0.3
    assert result.robust_accuracy >= result.certified_accuracy
    assert result.n_attacked == round(result.clean_accuracy * 48)
    # At a radius far beyond the certificates the same attack does break points.
    large = audit(trained_net, x, y, 3.0, version="apgd")
    assert large.n_broken > 0 and large.sound and large.certified_accuracy < large.clean_accuracy


def test_a_falsely_certified_layer_makes_the_audit_fail(trained_net, blobs, amplify):
    broken = nn.Sequential(*list(trained_net)[:-1], amplify(), trained_net[-1]).eval()
    x, y = blobs(32, seed=12)
    certification = certified_accuracy(broken, (x, y), eps=[1.0], progress=False)
    assert certification.certified[0] > 0.5  # the false bound certifies a lot
    with pytest.raises(SoundnessError, match="SOUNDNESS FAILURE"):
        audit(broken, x, y, 1.0, version="apgd", certification=certification)
    with pytest.warns(SoundnessWarning, match="broke"):
        result = audit(broken, x, y, 1.0, version="apgd", on_failure="warn")
    assert not result.sound and result.n_failures > 0
    assert result.robust_accuracy < result.certified_accuracy
    assert torch.all(result.failure_distances < result.failure_radii)
    assert torch.all(result.failure_distances <= 1.0 * (1 + 1e-5))
    assert result.to_dict()["n_certified_broken"] == result.n_failures


def test_parameters_and_modes_are_restored_and_the_eval_cache_is_used(trained_net, blobs):
    net = trained_net.train()
    net[1].weight.requires_grad_(False)
    x, y = blobs(16, seed=13)
    audit(net, x, y, 0.1, version="apgd", attack="certified")
    assert net.training
    assert not net[1].weight.requires_grad and net[3].weight.requires_grad
    assert all(p.grad is None for p in net.parameters())
    assert isinstance(net[3], GramConv2d) and net[3]._eval_cache  # normalized weight cached during the attack


def test_attack_only_certified_points(trained_net, blobs):
    x, y = blobs(32, seed=14)
    result = audit(trained_net, x, y, 0.1, version="apgd", attack="certified")
    assert result.robust_accuracy is None and result.n_attacked == result.n_certified
    assert result.sound


def test_uint8_images_are_scaled(trained_net, blobs):
    x, y = blobs(16, seed=15)
    images = (x * 255).round().to(torch.uint8)
    result = audit(trained_net, images, y, 0.1, version="apgd", attack="certified")
    reference = certified_accuracy(trained_net, (images.float() / 255, y), eps=[0.1], progress=False)
    assert result.certified_accuracy == reference.certified[0]


@pytest.mark.slow
def test_standard_autoattack_on_a_few_points(trained_net, blobs):
    x, y = blobs(8, seed=16)
    result = audit(trained_net, x, y, 0.3, version="standard")
    assert result.version == "standard" and result.sound


def test_bad_arguments(trained_net, blobs):
    x, y = blobs(8)
    with pytest.raises(ValueError, match="version"):
        audit(trained_net, x, y, 0.1, version="fast")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        audit(trained_net, x * 2 - 1, y, 0.1)
    with pytest.raises(ValueError, match="eps"):
        audit(trained_net, x, y, 0.0)
    with pytest.raises(ValueError, match="on_failure"):
        audit(trained_net, x, y, 0.1, on_failure="ignore")
    other = certified_accuracy(trained_net, blobs(9), eps=[0.1], progress=False)
    with pytest.raises(ValueError, match="9 examples"):
        audit(trained_net, x, y, 0.1, certification=other)


def test_breaks_just_past_eps_by_float32_projection_count(trained_net, blobs, monkeypatch):
    audit_module = importlib.import_module("lipnet.certify.audit")  # the package exports the function audit

    x, y = blobs(32, seed=17)
    j = int((y != y[0]).nonzero()[0])  # an example of another class: misclassified as y[0]
    distance = (x[j].double() - x[0].double()).norm().item()
    monkeypatch.setattr(audit_module, "_run_autoattack", lambda model, xs, *args: (x[j:j + 1].clone(), ("apgd-ce",)))
    x0, y0 = x[:1], y[:1]
    just_past = audit(trained_net, x0, y0, distance * (1 - 1e-7), version="apgd")
    assert just_past.n_broken == 1 and just_past.robust_accuracy == 0.0 and just_past.sound
    beyond = audit(trained_net, x0, y0, distance * (1 - 1e-3), version="apgd")
    assert beyond.n_broken == 0 and beyond.robust_accuracy == 1.0


def test_a_float32_misclassification_within_rounding_is_no_soundness_failure():
    """The certificate is about the model in exact arithmetic. At x = (1/2, 1/2 + 2^-20), with
    logits x + 1000, the exact model predicts class 1 with radius 6.7e-7, but float32 rounds
    both logits to the same number and predicts class 0: the audit called that a broken
    certificate (SoundnessError, distance 0 < radius) though no exact prediction changed.
    Predictions at the attack's points are now those of the exact model, as certified."""
    net = nn.Sequential(nn.Linear(2, 2)).eval()
    register = importlib.import_module("lipnet.certify.lipschitz")._REGISTRY
    with torch.no_grad():
        net[0].weight.copy_(torch.eye(2))
        net[0].bias.fill_(1000.0)
    x, y = torch.tensor([[0.5, 0.5 + 2.0 ** -20]]), torch.tensor([1])
    assert net(x).argmax(dim=1).item() == 0  # float32 ties and picks class 0
    register[nn.Linear] = lambda module, shape: 1.0  # exact for the identity
    try:
        certification = certified_accuracy(net, (x, y), eps=[0.1], progress=False)
        assert certification.correct.item() and certification.radii.item() > 6e-7  # true: x is exact there
        result = audit(net, x, y, 0.1, version="apgd", certification=certification)
    finally:
        del register[nn.Linear]
    assert result.sound and result.n_failures == 0 and result.n_broken == 0  # the exact prediction is right


def test_no_inputs_is_refused_with_a_message(trained_net, blobs):
    """An empty x raised RuntimeError: min(): Expected reduction dim ..."""
    x, y = blobs(4)
    with pytest.raises(ValueError, match="no inputs"):
        audit(trained_net, x[:0], y[:0], 0.1, version="apgd")


def test_labels_of_any_integer_dtype_are_audited_alike(trained_net, blobs):
    """uint8 labels (as data sets store them) crashed in AutoAttack: 'Index put requires the
    source and destination dtypes match, got Byte ... and Long'."""
    x, y = blobs(6, seed=18)
    expected = audit(trained_net, x, y, 0.2, version="apgd")
    result = audit(trained_net, x, y.to(torch.uint8), 0.2, version="apgd")
    assert (result.n_correct, result.n_certified, result.n_robust) == (
        expected.n_correct, expected.n_certified, expected.n_robust)
    with pytest.raises(ValueError, match="integer labels"):
        audit(trained_net, x, y.float(), 0.2, version="apgd")


def test_a_device_naming_the_models_device_is_accepted(trained_net, blobs, monkeypatch):
    """device='cpu:0' for a CPU model: certified_accuracy inside the audit refused it."""
    audit_module = importlib.import_module("lipnet.certify.audit")
    monkeypatch.setattr(audit_module, "_run_autoattack", lambda model, xs, *args: (xs.clone(), ("apgd-ce",)))
    x, y = blobs(4, seed=19)
    result = audit(trained_net, x, y, 0.1, version="apgd", device="cpu:0")
    assert result.sound and result.n_broken == 0


@pytest.mark.parametrize("example_shape, n_classes, expected", [
    ((3, 32, 32), 10, ("apgd-ce", "apgd-t", "fab-t", "square")),
    ((1, 5, 2), 10, ("apgd-ce", "apgd-t", "fab-t", "square")),
    ((1, 4, 4), 10, ("apgd-ce", "apgd-t", "fab-t")),
    ((64,), 10, ("apgd-ce", "apgd-t", "fab-t")),
    ((1, 1, 8, 8), 10, ("apgd-ce", "apgd-t", "fab-t")),
    ((3, 32, 32), 3, ("apgd-ce", "fab-t", "square")),
])
def test_attacks_that_cannot_run_on_the_inputs_are_left_out(example_shape, n_classes, expected):
    """Square's L2 initialization tiles images (C, H, W) in squares of side H // 5, and fails on
    anything else; APGD-T's targeted loss needs 4 classes."""
    audit_module = importlib.import_module("lipnet.certify.audit")
    assert audit_module._attacks("standard", n_classes, example_shape) == expected


@pytest.mark.parametrize("shape", [(16,), (1, 4, 4)])
def test_standard_audit_of_inputs_square_cannot_attack_runs_the_other_attacks(shape):
    """Vectors and images under 5 pixels high: the standard audit runs without Square, which
    failed inside AutoAttack on them (ZeroDivisionError, or a shape that does not unpack), and says so."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), GramLinear(16, 4)).eval()
    x = torch.rand(3, *shape, generator=torch.Generator().manual_seed(0))
    y = net(x).argmax(dim=1)
    result = audit(net, x, y, 0.05, version="standard")
    assert result.sound and result.n_attacked == 3
    assert result.attacks == ("apgd-ce", "apgd-t", "fab-t") and result.to_dict()["attacks"] == list(result.attacks)


def test_an_audit_that_attacks_no_point_ran_no_attack(trained_net, blobs):
    x, y = blobs(8, seed=3)
    wrong = (y + 1) % 4
    assert audit(trained_net, x, wrong, 0.1, version="apgd", attack="certified").attacks == ()
