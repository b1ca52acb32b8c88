"""A fixed-seed slice of the network fuzz (``tests/fuzz_networks.py``), and what it found.

Two seeds per type of the zoo and trap (``fuzz.rotation()``): seed ``s`` forces its type into a
random small float64 network, which is checked against its certificate (Jacobians at random
and adversarial points, the dense operator of affine networks, pairs of points against the
rounding bound of certification). Every type lipnet.certify accepts must be exercised, so a
new rule is fuzzed as soon as it is registered. The seeds are fixed and the budget small;
``python tests/fuzz_networks.py --minutes 10`` runs more. The ``detects`` tests show that
the fuzz fails when a rule is 0.1% too small.
"""

import math

import pytest
import torch
from torch import nn

from lipnet.certify import LipschitzBoundError, lipschitz_bound
from lipnet.certify.lipschitz import _REGISTRY
from lipnet.nn import ConvexResidual, GramConv2d
from lipnet.nn.normalized import GramNormalized

import fuzz_networks as fuzz  # tests/ is on sys.path: tests/conftest.py

#: Each type and trap is forced into this many networks.
ROUNDS = 2


@pytest.fixture(scope="module")
def slice_results():
    """``(results, failures)`` of ``ROUNDS`` seeds per type of the rotation, on the CI budget."""
    results, failures = [], []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for seed in range(ROUNDS * len(fuzz.rotation())):
            try:
                results.append(fuzz.run_case(seed, fuzz.CI_BUDGET))
            except fuzz.Violation as violation:
                failures.append(f"seed {seed}: {violation}")
    finally:
        torch.set_num_threads(threads)
    return results, failures


def test_certificates_hold_on_the_slice(slice_results):
    _, failures = slice_results
    assert not failures, "\n".join(failures)


def test_every_accepted_type_is_exercised(slice_results):
    """Every public torch.nn / lipnet.nn type that certify accepts (and every type registered
    from torch or lipnet) was in a certified network, or refused where all its modules must be
    (``fuzz.ALWAYS_REFUSED``); every trap was refused. A new rule without a builder in
    ``fuzz.ZOO`` is drawn by its default constructor; if that fails, add a builder."""
    results, failures = slice_results
    missing = {what: names for what, names in fuzz.coverage(results).items() if names}
    assert not missing or failures, f"never exercised by the CI slice: {missing}"


def test_the_registry_is_enumerated():
    """The zoo is the registry's: each registered key from torch or lipnet resolves from a type
    the fuzz draws (a base class like _BatchNorm from its subclasses)."""
    drawn = {fuzz.rule_of(cls) for cls in fuzz.zoo()}
    registered = {key for key in _REGISTRY if key.__module__.split(".")[0] in ("torch", "lipnet")}
    assert registered <= drawn


# ---------------------------------------------------------------------------------- the fuzz can fail


def _caught(forced, seeds, paths=("jacobian", "dense", "pairs", "slope")) -> bool:
    """Whether a case of ``seeds`` forcing ``forced`` fails one of the checks named ``paths``."""
    for seed in seeds:
        try:
            fuzz.run_case(seed, fuzz.CI_BUDGET, forced=forced)
        except fuzz.Violation as violation:
            if str(violation).startswith(paths):
                return True
    return False


def _shrunk(monkeypatch, module_type, factor=0.999):
    rule = _REGISTRY[module_type]
    monkeypatch.setitem(_REGISTRY, module_type, lambda module, shape: factor * rule(module, shape))


@pytest.mark.parametrize("module_type", [nn.GELU, nn.MaxPool2d, nn.Upsample, nn.BatchNorm2d, nn.ReflectionPad2d])
def test_detects_a_rule_too_small(monkeypatch, module_type):
    """GELU is caught at its steepest point (x = sqrt 2) or on its grid, overlapping max pooling at
    a spike (the maximum of every window holding it), the others anywhere."""
    _shrunk(monkeypatch, fuzz.rule_of(module_type))
    assert _caught(module_type, range(12))


def test_detects_a_gram_bound_too_small(monkeypatch):
    original = GramNormalized.lipschitz_bound
    monkeypatch.setattr(GramNormalized, "lipschitz_bound", lambda self, *args: 0.999 * original(self, *args))
    assert _caught(GramConv2d, range(12))


def test_detects_a_jump(monkeypatch):
    """Softplus below its threshold bound: the switch to the identity jumps, and the slope check
    on the module's grid (or the pairs straddling it) sees it."""
    monkeypatch.setitem(_REGISTRY, nn.Softplus, lambda module, shape: 1.0)
    assert _caught(nn.Softplus, range(12), ("slope", "pairs"))


def test_detects_an_accepted_trap(monkeypatch):
    monkeypatch.setitem(_REGISTRY, nn.Softmax, lambda module, shape: 1.0)
    assert _caught("Softmax", range(3), ("refusal",))


def _ratio(model, x, y) -> float:
    with torch.no_grad():
        return float((model(x.clone()) - model(y.clone())).norm() / (x - y).norm())


def test_convex_residual_whose_branch_overwrites_its_input():
    """``x + f(relu_(x))`` is the pre-activation block's classic in-place slip: with
    LeakyReLU(5, inplace=True) the block computes ``leaky(x)`` (Lipschitz 5), certified 3.
    Refused since: the dry run's input to the branch must keep its version counter."""
    model = nn.Sequential(ConvexResidual(nn.LeakyReLU(5.0, inplace=True), alpha=0.5, dtype=torch.float64))
    x, y = -torch.ones(1, 3, dtype=torch.float64), -2 * torch.ones(1, 3, dtype=torch.float64)
    assert _ratio(model, x, y) == pytest.approx(5.0)
    with pytest.raises(LipschitzBoundError, match="in place"):
        lipschitz_bound(model, (3,))


@pytest.mark.parametrize("pool,shape", [(nn.MaxPool2d(2, return_indices=True), (1, 4, 4)),
                                        (nn.MaxPool1d(2, return_indices=True), (2, 4)),
                                        (nn.AdaptiveMaxPool2d(1, return_indices=True), (1, 4, 4))])
def test_max_pooling_that_returns_indices_to_the_next_module_is_refused(pool, shape):
    """``(values, indices)`` passed on was bounded as if it were the values (a module that takes
    the tuple, like nn.Identity, runs), and the next module's bound crashed with an
    AttributeError. Since, nn.Sequential refuses a child that passes on something else than a
    tensor. The pooling alone, as a model, is refused too: its indices jump (lipnet.convert bounds
    ``pool(x)[0]`` with the bound of the values, and refuses ``pool(x)[1]``, an integer result)."""
    for follower in (nn.Identity(), nn.ReLU()):
        with pytest.raises(LipschitzBoundError, match="not a tensor"):
            lipschitz_bound(nn.Sequential(pool, follower), shape)
    with pytest.raises(LipschitzBoundError, match="returns a tuple, not one tensor"):
        lipschitz_bound(pool, shape)


@pytest.mark.parametrize("module", [nn.LeakyReLU(math.nan), nn.ELU(math.nan), nn.Hardtanh(math.nan, 1.0)])
def test_activation_with_a_nan_parameter_is_refused(module):
    """NaN outputs were bounded by ``max(1, nan) = 1``; since, the rules refuse NaN parameters (after
    Hardsigmoid the dry run sees 0.5, where LeakyReLU(nan) and ELU(nan) are still finite)."""
    assert bool(module(torch.tensor([-1.0, 0.5])).isnan().any())
    with pytest.raises(LipschitzBoundError, match="NaN"):
        lipschitz_bound(nn.Sequential(nn.Hardsigmoid(), module), (2,))


def test_module_with_non_finite_output_is_refused():
    """A NaN mean was bounded by ``1 / min(std)``; since, InputNormalization refuses it (and
    certify refuses any module whose dry-run output is not finite)."""
    from lipnet.nn import InputNormalization

    model = nn.Sequential(InputNormalization([0.0, 0.0], [1.0, 1.0]))
    with torch.no_grad():  # the constructor and load_state_dict refuse it; written into the buffer since
        model[0].mean[0] = math.nan
    assert bool(model(torch.zeros(1, 2, 3)).isnan().any())
    with pytest.raises(ValueError, match="mean must be finite"):  # its own lipschitz_bound refuses it
        lipschitz_bound(model, (2, 3))


@pytest.mark.parametrize("threshold,dtype", [(100.0, torch.float32), (1000.0, torch.float64)])
def test_softplus_whose_exp_overflows_below_its_threshold_is_refused(threshold, dtype):
    """Softplus computes ``log1p(exp(beta x)) / beta`` below its threshold; above log(float32 max)
    ~ 88.7 (709.8 in float64) ``exp`` overflows and the output is inf, where 1 was certified.
    Since, thresholds above 88 are refused."""
    module = nn.Softplus(beta=1.0, threshold=threshold)
    assert math.isinf(float(module(torch.tensor([threshold - 1], dtype=dtype))))
    with pytest.raises(LipschitzBoundError, match="overflow"):
        lipschitz_bound(module, (1,))


@pytest.mark.parametrize("lower,upper", [(-2.0, math.inf), (-math.inf, 0.5), (math.nan, 0.5)])
def test_rrelu_with_a_bound_that_is_not_finite_is_refused(lower, upper):
    """The rule took ``Fraction(upper)``, which raised an OverflowError for an infinite bound (a
    NaN one raised a ValueError, wrapped as a refusal); since, both are refused by name."""
    with pytest.raises(LipschitzBoundError, match="RReLU"):
        lipschitz_bound(nn.RReLU(lower, upper), (3,))


def test_celu_with_an_infinite_alpha_is_refused():
    """The rule checked ``alpha > 0`` only, and bounded a CELU whose outputs for ``x <= 0`` are
    ``inf * 0 = NaN`` by 1 (the dry run after Hardsigmoid sees only positive inputs)."""
    module = nn.CELU(math.inf)
    assert bool(module(torch.tensor([-1.0])).isnan().all())
    with pytest.raises(LipschitzBoundError, match="CELU"):
        lipschitz_bound(nn.Sequential(nn.Hardsigmoid(), module), (2,))


@pytest.mark.parametrize("module,shape", [(nn.CircularPad1d((1, -1)), (3, 1)),
                                          (nn.CircularPad3d((1, -1, -1, 0, -1, 0)), (2, 2, 1))])
def test_circular_padding_that_crops_is_refused(module, shape):
    """torch's circular padding with negative (cropping) padding reads memory outside its input in
    some configurations: the output is not a function of the input, and an example's output
    changed with its batch; certify bounded it where that memory happened to hold a valid index.
    Since, negative circular padding is refused."""
    with pytest.raises(LipschitzBoundError, match="negative"):
        lipschitz_bound(module, shape)
