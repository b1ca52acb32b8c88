"""Mutation-testing gaps of lipnet.certify.audit and lipnet.certify.modes.

The existing audit tests run AutoAttack on a trained network: they see whether a falsely certified
layer is caught, but not the edges of the bookkeeping. Here the attack is replaced by a fixed map
(so each adversarial point, its distance and the certified radius are chosen exactly) and these
properties are pinned: a radius equal to ``eps`` is no certificate at ``eps`` (it is not attacked
under ``attack="certified"``); a point misclassified at exactly its radius is no failure; a break
past a certified point's radius is not counted within the float32 projection tolerance, nor one
past that tolerance; failures are reported by their index in ``x`` (not in the attacked subset),
with their radii; a float64 misclassification that the rounding bound does not prove (a tie) is
no failure; "provably misclassified" means a margin above twice the rounding bound; the attack
configuration per number of classes; ``eps`` of ``inf``/``nan``, bool, complex or misshaped labels
and negative inputs are refused; no attack runs when nothing is to be attacked; and the model
state managers (``evaluating``, ``frozen``) restore the state after an exception.
"""

import importlib
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lipnet.certify import SoundnessError, SoundnessWarning, audit, certified_accuracy
from lipnet.certify.modes import evaluating, frozen

audit_module = importlib.import_module("lipnet.certify.audit")  # the package exports the function audit
registry = importlib.import_module("lipnet.certify.lipschitz")._REGISTRY


@pytest.fixture
def linear_bound():
    """Registers ``nn.Linear`` with bound 1 for one test: true for the weights used here (identity,
    or a matrix scaled to spectral norm <= 1)."""
    assert nn.Linear not in registry
    registry[nn.Linear] = lambda module, shape: 1.0
    try:
        yield
    finally:
        del registry[nn.Linear]


def identity_net(bias=0.0, dtype=torch.float32):
    net = nn.Sequential(nn.Linear(2, 2)).to(dtype).eval()
    with torch.no_grad():
        net[0].weight.copy_(torch.eye(2))
        net[0].bias.fill_(bias)
    return net


def fixed_attack(monkeypatch, fn):
    """Replace AutoAttack by ``fn(xs) -> x_adv`` on the attacked points."""
    monkeypatch.setattr(audit_module, "_run_autoattack", lambda model, xs, *args: (fn(xs).clone(), ("apgd-ce",)))


def run(monkeypatch, net, x, y, eps, radii, attack_fn, **kwargs):
    """Audit with the certified radii replaced by ``radii`` and the attack by ``attack_fn``."""
    certification = certified_accuracy(net, (x, y), eps=[eps], progress=False)
    certification.radii[:] = torch.as_tensor(radii, dtype=certification.radii.dtype)
    fixed_attack(monkeypatch, attack_fn)
    return audit(net, x, y, eps, version="apgd", certification=certification, **kwargs)


def swap(xs):
    """The mirror image of each point of the unit square: the other class for the identity net."""
    return xs.flip(1)


X, Y = torch.tensor([[0.8, 0.2]]), torch.tensor([0])
DISTANCE = float((X.double() - X.flip(1).double()).norm())  # how the audit measures it (float64)


def test_a_radius_equal_to_eps_is_not_certified_and_not_attacked(monkeypatch, linear_bound):
    """Certified at eps means radius > eps: a radius of exactly eps counts as uncertified and, under
    attack='certified', is not attacked."""
    result = run(monkeypatch, identity_net(), X, Y, 0.25, [0.25], swap, attack="certified")
    assert result.n_certified == 0 and result.n_attacked == 0 and result.n_broken == 0
    above = run(monkeypatch, identity_net(), X, Y, 0.25, [math.nextafter(0.25, 1)], lambda xs: xs, attack="certified")
    assert above.n_certified == 1 and above.n_attacked == 1


def test_a_break_at_exactly_the_radius_is_no_failure_but_is_counted(monkeypatch, linear_bound):
    """A certificate covers distances below the radius: a misclassified point at exactly the radius
    (and exactly eps) breaks no certificate, and as the point is not certified at eps it counts as
    broken within eps."""
    result = run(monkeypatch, identity_net(), X, Y, DISTANCE, [DISTANCE], swap, on_failure="raise")
    assert result.sound and result.n_failures == 0
    assert result.n_broken == 1 and result.n_robust == 0 and result.n_certified == 0


def test_the_projection_tolerance_never_carries_a_certified_point_past_its_radius(monkeypatch, linear_bound):
    """eps < radius < distance <= eps (1 + tolerance): the break lies outside the certificate and
    beyond eps, so it is neither a failure nor a break within eps (robust stays >= certified)."""
    eps = DISTANCE * (1 - 5e-6)
    radius = DISTANCE * (1 - 2e-6)
    result = run(monkeypatch, identity_net(), X, Y, eps, [radius], swap)
    assert result.n_certified == 1 and result.sound
    assert result.n_broken == 0 and result.n_robust == 1
    assert result.robust_accuracy >= result.certified_accuracy


def test_a_break_beyond_the_projection_tolerance_is_not_within_eps(monkeypatch, linear_bound):
    """An uncertified point misclassified at 1e-4 relative beyond eps (10 times the tolerance) is not
    broken within eps; at 1e-6 beyond (inside the tolerance) it is."""
    beyond = run(monkeypatch, identity_net(), X, Y, DISTANCE * (1 - 1e-4), [0.0], swap)
    assert beyond.n_broken == 0 and beyond.n_robust == 1
    inside = run(monkeypatch, identity_net(), X, Y, DISTANCE * (1 - 1e-6), [0.0], swap)
    assert inside.n_broken == 1 and inside.n_robust == 0


def test_failures_are_named_by_their_index_in_x_with_distance_and_radius(monkeypatch, linear_bound):
    """Only points 1 and 2 are certified (and attacked): their breaks, inside a radius of 5, are
    failures #1 and #2 of x (not #0 and #1 of the attacked subset), with their own radii and
    distances; the message names both; on_failure='raise' raises, 'warn' warns."""
    x = torch.tensor([[0.6, 0.4], [0.9, 0.1], [0.3, 0.7]])
    y = torch.tensor([0, 0, 1])
    radii = [0.0, 5.0, 4.0]
    with pytest.raises(SoundnessError, match=r"#1 at distance .*#2 at distance"):
        run(monkeypatch, identity_net(), x, y, 0.05, radii, swap, attack="certified")
    with pytest.warns(SoundnessWarning, match=r"broke 2 certified"):
        result = run(monkeypatch, identity_net(), x, y, 0.05, radii, swap, attack="certified", on_failure="warn")
    assert result.n_attacked == 2 and result.failures.tolist() == [1, 2] and not result.sound
    assert result.failure_radii.tolist() == [5.0, 4.0]
    expected = (x[1:].double() - x[1:].flip(1).double()).norm(dim=1)
    torch.testing.assert_close(result.failure_distances, expected, rtol=0, atol=0)
    assert result.to_dict()["failures"] == [1, 2] and result.to_dict()["sound"] is False


def test_a_float64_tie_inside_a_certificate_is_no_failure(monkeypatch, linear_bound):
    """At (1/2, 1/2 + 2^-24) with biases 2^30, the exact logits favour class 1, but float64 rounds both
    to 2^30 + 1/2 and argmax picks class 0. That misclassification is not proven by the error bound,
    so even inside a (here inflated) certificate it is no soundness failure, nor a break."""
    net = identity_net(bias=2.0 ** 30)
    tie = torch.tensor([[0.5, 0.5 + 2.0 ** -24]])
    assert tie[0, 1].item() == 0.5 + 2.0 ** -24  # exact in float32
    x, y = torch.tensor([[0.5, 0.6]]), torch.tensor([1])
    misclassified, provably = audit_module._exact_misclassification(net, tie, y, 4, torch.device("cpu"))
    assert misclassified.tolist() == [True] and provably.tolist() == [False]  # the premise
    result = run(monkeypatch, net, x, y, 0.5, [1.0], lambda xs: tie, attack="certified", on_failure="raise")
    assert result.sound and result.n_attacked == 1 and result.n_broken == 0


class FakeExactLogits:
    """Stands in for ExactLogits: input row ``i`` (its first entry) gets ``LOGITS[i]`` and ``ROUNDING[i]``."""

    LOGITS = torch.tensor([[1.0, 2.5, 0.0], [1.0, 3.0, 0.0], [1.0, 3.5, 0.0], [5.0, 1.0, 0.0], [1.0, 2.5, 0.0]],
                          dtype=torch.float64)
    ROUNDING = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.5], dtype=torch.float64)

    def __init__(self, model, last_layer="auto"):
        assert last_layer == "none"

    def __call__(self, x):
        rows = x[:, 0].long()
        return self.LOGITS[rows], self.ROUNDING[rows]


def test_provably_misclassified_means_a_margin_above_twice_the_rounding_bound(monkeypatch):
    """Label 0 throughout. Another logit above the label's by 1.5 (bound 1: within 2 * 1), by exactly 2
    (a tie is possible) or 2.5 (proven), the label's own the largest, and 1.5 above with bound 0.5
    (proven). Batches of 2 cover all five rows in order."""
    monkeypatch.setattr(audit_module, "ExactLogits", FakeExactLogits)
    x = torch.arange(5, dtype=torch.float32)[:, None]
    y = torch.zeros(5, dtype=torch.long)
    misclassified, provably = audit_module._exact_misclassification(nn.Identity(), x, y, 2, torch.device("cpu"))
    assert misclassified.tolist() == [True, True, True, False, True]
    assert provably.tolist() == [False, False, True, False, True]


class FakeAutoAttack:
    """Records how the audit configures AutoAttack; the 'attack' returns the points unchanged."""

    made = []

    def __init__(self, model, norm, eps, version, seed, device, attacks):
        self.model, self.kwargs = model, dict(norm=norm, eps=eps, version=version, seed=seed, attacks=attacks)
        self.apgd, self.apgd_targeted = SimpleNamespace(), SimpleNamespace()
        self.fab, self.square = SimpleNamespace(), SimpleNamespace()
        FakeAutoAttack.made.append(self)

    def run_standard_evaluation(self, x, y, batch_size):
        self.logits = self.model(x)
        return x.clone(), None


def scaled_linear(classes, dtype=torch.float32):
    """A random 2 -> ``classes`` linear map with spectral norm 1/2 (bound 1 holds)."""
    layer = nn.Linear(2, classes).to(dtype)
    with torch.no_grad():
        torch.manual_seed(classes)
        layer.weight.copy_(torch.randn(classes, 2))
        layer.weight.div_(2 * torch.linalg.matrix_norm(layer.weight, ord=2))
        layer.bias.zero_()
    return nn.Sequential(layer).eval()


@pytest.mark.parametrize("classes, version, attacks, targets", [
    (4, "standard", ["apgd-ce", "apgd-t", "fab-t"], 3),  # vectors: no Square (it attacks images)
    (3, "standard", ["apgd-ce", "fab-t"], 2),
    (12, "standard", ["apgd-ce", "apgd-t", "fab-t"], 9),
    (4, "apgd", ["apgd-ce", "apgd-t"], 3),
    (3, "apgd", ["apgd-ce"], 2),
])
def test_the_attacks_and_their_targets_follow_the_number_of_classes(monkeypatch, linear_bound, classes, version,
                                                                   attacks, targets):
    """APGD-T's DLR loss needs 4 classes; the targeted attacks aim at every other class, at most 9;
    one restart each and Square with 5000 queries (AutoAttack's standard L2 settings); L2 norm, the
    given eps and seed."""
    pyautoattack = pytest.importorskip("pyautoattack")
    monkeypatch.setattr(pyautoattack, "AutoAttack", FakeAutoAttack)
    FakeAutoAttack.made.clear()
    net = scaled_linear(classes)
    x = torch.rand(6, 2, generator=torch.Generator().manual_seed(0))
    y = net(x).argmax(dim=1)
    result = audit(net, x, y, 0.3, version=version, seed=7)
    assert result.n_attacked == 6 and result.n_broken == 0
    (adversary,) = FakeAutoAttack.made
    assert adversary.kwargs == dict(norm="L2", eps=0.3, version="custom", seed=7, attacks=attacks)
    assert adversary.apgd_targeted.n_target_classes == targets and adversary.fab.n_target_classes == targets
    assert adversary.apgd.n_restarts == adversary.apgd_targeted.n_restarts == adversary.fab.n_restarts == 1
    assert adversary.square.n_queries == 5000


def test_autoattack_sees_float32_logits_of_a_float64_model(monkeypatch, linear_bound):
    """AutoAttack works in float32: a float64 model is run on its inputs cast to float64, and its
    logits are handed back in float32."""
    pyautoattack = pytest.importorskip("pyautoattack")
    monkeypatch.setattr(pyautoattack, "AutoAttack", FakeAutoAttack)
    FakeAutoAttack.made.clear()
    net = scaled_linear(4, torch.float64)
    x = torch.rand(3, 2, generator=torch.Generator().manual_seed(1))
    y = net(x.double()).argmax(dim=1)
    audit(net, x, y, 0.3, version="apgd")
    (adversary,) = FakeAutoAttack.made
    assert adversary.logits.dtype == torch.float32
    torch.testing.assert_close(adversary.logits, net(x.double()).float())


def test_the_cuda_generators_forked_are_those_autoattack_may_reseed(monkeypatch):
    """Every CUDA device once CUDA is initialized or the attack runs on CUDA; none for a CPU attack
    while CUDA is untouched."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    assert audit_module._cuda_devices("cuda:1") == [0, 1, 2]
    assert audit_module._cuda_devices("cpu") == []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    assert audit_module._cuda_devices("cpu") == [0, 1, 2]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert audit_module._cuda_devices("cpu") == []


def test_no_attack_runs_when_nothing_is_to_be_attacked(monkeypatch, linear_bound):
    """attack='certified' at an eps beyond every radius attacks nothing (AutoAttack is not called)."""
    def no_attack(*args):
        raise AssertionError("AutoAttack was run on no points")

    monkeypatch.setattr(audit_module, "_run_autoattack", no_attack)
    result = audit(identity_net(), X, Y, 5.0, version="apgd", attack="certified")
    assert result.n_attacked == 0 and result.n_broken == 0 and result.sound and result.n_certified == 0


def test_bad_eps_labels_and_inputs_are_refused(monkeypatch, linear_bound):
    """eps inf or nan; bool, complex or misshaped labels; inputs below 0 (within [-1, 1]) are refused
    with messages; inputs touching 0 and 1 are accepted."""
    fixed_attack(monkeypatch, lambda xs: xs)
    net, x, y = identity_net(), torch.tensor([[0.0, 1.0], [1.0, 0.0]]), torch.tensor([1, 0])
    for eps in (math.inf, math.nan, -0.1):
        with pytest.raises(ValueError, match="finite radius"):
            audit(net, x, y, eps, version="apgd")
    for labels in (torch.tensor([True, False]), torch.tensor([1, 0], dtype=torch.complex64), torch.tensor([1]),
                   torch.tensor([[1, 0]])):
        with pytest.raises(ValueError, match="integer labels"):
            audit(net, x, labels, 0.1, version="apgd")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        audit(net, x - 0.5, y, 0.1, version="apgd")
    result = audit(net, x, y, 0.1, version="apgd")
    assert result.n_correct == 2 and result.sound


def test_frozen_and_evaluating_restore_the_model_after_an_exception():
    """The attack may fail: each parameter's requires_grad and each module's training flag (a mix
    of train and eval) come back as they were."""
    net = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5), nn.Linear(2, 2))
    net[0].weight.requires_grad_(False)
    net[1].eval()
    flags = [p.requires_grad for p in net.parameters()]
    modes = [m.training for m in net.modules()]
    with pytest.raises(RuntimeError, match="attack failed"):
        with evaluating(net), frozen(net):
            assert not any(m.training for m in net.modules())
            assert not any(p.requires_grad for p in net.parameters())
            raise RuntimeError("attack failed")
    assert [p.requires_grad for p in net.parameters()] == flags
    assert [m.training for m in net.modules()] == modes


def test_distances_are_those_between_the_inputs_the_model_sees(monkeypatch, linear_bound):
    """A bfloat16 model sees its inputs rounded to bfloat16 (8 bits), as certified: the distance of an
    attack is measured there, not between the float32 points. With a radius between the two
    distances, only the one the model sees decides whether the break is a failure."""
    net = identity_net(dtype=torch.bfloat16)
    x_adv = torch.tensor([[0.2013, 0.8017]])
    seen = float((x_adv.to(torch.bfloat16).double() - X.to(torch.bfloat16).double()).norm())
    raw = float((x_adv.double() - X.double()).norm())
    assert seen < raw - 1e-4  # the premise: rounding to bfloat16 shortens the distance
    radius = (seen + raw) / 2
    with pytest.warns(SoundnessWarning, match="broke 1 certified"):
        result = run(monkeypatch, net, X, Y, 2.0, [radius], lambda xs: x_adv, on_failure="warn")
    assert result.failures.tolist() == [0] and float(result.failure_distances[0]) == seen


def test_the_attack_runs_on_the_frozen_eval_mode_model(monkeypatch, linear_bound):
    """During the attack every module is in eval mode (dropout off: the certified function) and no
    parameter requires grad (Gram layers then use their cached weights); afterwards both are back."""
    net = nn.Sequential(nn.Dropout(0.5), nn.Linear(2, 2)).train()
    with torch.no_grad():
        net[1].weight.copy_(torch.eye(2))
        net[1].bias.zero_()
    seen = []

    def attack(model, xs, *args):
        seen.append(([m.training for m in net.modules()], [p.requires_grad for p in model.parameters()]))
        return xs.clone(), ("apgd-ce",)

    monkeypatch.setattr(audit_module, "_run_autoattack", attack)
    audit(net, X, Y, 0.1, version="apgd")
    ((training, requires_grad),) = seen
    assert not any(training) and not any(requires_grad) and len(requires_grad) == 2
    assert all(m.training for m in net.modules()) and all(p.requires_grad for p in net.parameters())
