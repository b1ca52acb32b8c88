"""Soundness failures of lipnet.certify found by the network fuzz (``tests/fuzz_networks.py``)."""

import math

import pytest
import torch
from torch import nn

from lipnet.certify import LipschitzBoundError, lipschitz_bound
from lipnet.nn import ConvexResidual


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
    tensor. The pooling alone keeps the bound of its values (lipnet.convert bounds
    ``pool(x)[0]`` with it, and refuses ``pool(x)[1]``, an integer result)."""
    for follower in (nn.Identity(), nn.ReLU()):
        with pytest.raises(LipschitzBoundError, match="not a tensor"):
            lipschitz_bound(nn.Sequential(pool, follower), shape)
    assert 1 <= lipschitz_bound(pool, shape) < 1.01


@pytest.mark.parametrize("module", [nn.LeakyReLU(math.nan), nn.ELU(math.nan), nn.Hardtanh(math.nan, 1.0)])
def test_activation_with_a_nan_parameter_is_refused(module):
    """NaN outputs were bounded by ``max(1, nan) = 1``; since, the rules refuse NaN parameters (after
    Hardsigmoid the dry run sees 0.5, where LeakyReLU(nan) and ELU(nan) are still finite)."""
    assert bool(module(torch.tensor([-1.0, 0.5])).isnan().any())
    with pytest.raises(LipschitzBoundError, match="NaN"):
        lipschitz_bound(nn.Sequential(nn.Hardsigmoid(), module), (2,))


def test_module_with_non_finite_output_is_refused():
    """A NaN mean was bounded by ``1 / min(std)``; since, a module's dry-run output must be finite."""
    from lipnet.nn import InputNormalization

    model = nn.Sequential(InputNormalization([math.nan, 0.0], [1.0, 1.0]))
    assert bool(model(torch.zeros(1, 2, 3)).isnan().any())
    with pytest.raises(LipschitzBoundError, match="not finite"):
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
