"""What certification must refuse, or describe as the model computes it, in unusual uses: forwards
replaced on an instance or around ``__call__``, modules acting on the batch dimension, and
low-precision models whose applied coefficients differ from their float64 recomputation."""

import math
import types
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lipnet.certify import LipschitzBoundError, certified_accuracy, lipschitz_bound
from lipnet.certify.precision import float64_copy
from lipnet.nn import ConvexResidual, GlobalScaledAvgPool2d, GramConv2d, GramLinear, MaxMin

# ----------------------------------------------------------------------------- forward overrides


class LoudReLU(nn.ReLU):
    def __call__(self, x):
        return 100 * super().__call__(x)


def loud_tanh():
    tanh = nn.Tanh()
    tanh.forward = lambda x: 100 * torch.tanh(x)
    return tanh


def loud_linear():
    linear = GramLinear(2, 2)
    linear.forward = types.MethodType(lambda self, x: F.linear(x, 100 * self.normalized_weight(), self.bias), linear)
    return linear


@pytest.mark.parametrize("make, override", [
    (loud_tanh, "has its own forward"),
    (loud_linear, "has its own forward"),
    (LoudReLU, "overrides nn.Module.__call__"),
])
def test_a_call_that_runs_another_forward_is_refused(make, override):
    net = nn.Sequential(nn.Identity(), make())
    with pytest.raises(LipschitzBoundError, match=f"module '1' .*{override}"):
        lipschitz_bound(net, (2,))
    with pytest.raises(LipschitzBoundError, match=override):
        certified_accuracy(net, (torch.zeros(1, 2), torch.zeros(1, dtype=torch.long)), progress=False)


# ----------------------------------------------------------------------------- the batch dimension


@pytest.mark.parametrize("module, shape", [
    (nn.Flatten(0, 1), (2, 2)), (nn.Flatten(-2, -1), (4,)), (nn.Unflatten(0, (-1, 1)), (4,)),
    (nn.Unflatten(-2, (-1, 1)), (4,)), (MaxMin(dim=0), (4,)), (MaxMin(dim=-2), (4,)), (MaxMin(dim=-3), (2, 4)),
])
def test_a_module_acting_on_the_batch_dimension_is_refused(module, shape):
    with pytest.raises(LipschitzBoundError, match="batch dimension"):
        lipschitz_bound(nn.Sequential(module), shape)


def test_the_same_modules_within_one_example_are_accepted_where_batch_ones_are_refused():
    for module, shape in ((nn.Flatten(), (2, 2)), (nn.Flatten(0, 0), (2, 2)), (nn.Unflatten(1, (2, 2)), (4,)),
                          (MaxMin(dim=-1), (4,)), (MaxMin(dim=-3), (2, 4, 4))):
        assert lipschitz_bound(nn.Sequential(module), shape) == 1.0
    with pytest.raises(LipschitzBoundError, match="batch dimension"):
        lipschitz_bound(nn.Sequential(MaxMin(dim=-3)), (2, 4))


def test_certified_accuracy_refuses_a_model_that_mixes_examples():
    net = nn.Sequential(nn.Flatten(0, 1), MaxMin(dim=0), nn.Unflatten(0, (-1, 2)), nn.Flatten(), GramLinear(4, 2))
    x, y = torch.randn(4, 2, 2), torch.zeros(4, dtype=torch.long)
    with pytest.raises(LipschitzBoundError, match="module '0' .*start_dim=0 acts on the batch dimension"):
        certified_accuracy(net, (x, y), progress=False)


def test_maxmin_without_its_dim_says_how_to_count_it():
    with pytest.raises(ValueError, match="dim counts the batch dimension.*count dim from the end"):
        nn.Sequential(GramLinear(4, 6), MaxMin())(torch.randn(4))
    net = nn.Sequential(GramConv2d(2, 4, 3, padding=1), MaxMin(dim=-3), GramConv2d(4, 2, 3, padding=1))
    x = torch.randn(2, 6, 6)
    torch.testing.assert_close(net(x), net(x[None])[0])


# ----------------------------------------------------------------------------- low precision


def gaining_logit(dtype):
    """A logit whose ``1 - sigmoid`` and ``sigmoid``, computed in ``dtype``, sum to more than 1."""
    for logit in torch.linspace(-8, 0, 4001, dtype=dtype):
        block = ConvexResidual(nn.Identity(), learnable=False).to(dtype)
        block.alpha_logit.fill_(logit)
        keep, alpha = block.coefficients()
        if Fraction(float(keep)) + Fraction(float(alpha)) > 1:
            return logit
    raise AssertionError(f"no logit in {dtype} whose coefficients sum to more than 1")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_the_float64_copy_mixes_with_the_coefficients_the_model_applies(dtype):
    logit = gaining_logit(dtype)
    blocks = [ConvexResidual(nn.Identity(), learnable=False) for _ in range(100)]
    net = nn.Sequential(*blocks).to(dtype).eval()
    with torch.no_grad():
        for block in blocks:
            block.alpha_logit.fill_(logit)
    for block, copy in zip(blocks, float64_copy(net)):
        applied = block.coefficients()
        assert all(c.dtype == torch.float64 and c == a.double() for c, a in zip(copy.coefficients(), applied))
    # The gain of the model on every input: each block scales it by the keep + alpha it applies.
    gain = math.prod(sum(Fraction(float(c)) for c in block.coefficients()) for block in blocks)
    result = certified_accuracy(net, (torch.zeros(1, 2), torch.zeros(1, dtype=torch.long)), progress=False)
    assert Fraction(result.lipschitz) >= gain
    assert Fraction(lipschitz_bound(net, (2,))) >= gain


# ----------------------------------------------------------------------------- rounded scales


def test_global_scaled_average_pooling_bounds_the_multiplier_it_applies_in_float32():
    pool = GlobalScaledAvgPool2d()
    for n in range(1, 200):
        x = torch.zeros(1, 1, 1, n)
        x[..., 0] = n
        assert float(F.avg_pool2d(x, (1, n))) == 1.0  # so the output is the multiplier itself
        multiplier = pool(x)
        bound = lipschitz_bound(nn.Sequential(pool), (1, 1, n))
        assert Fraction(float(multiplier)) ** 2 <= n * Fraction(bound) ** 2
        assert float64_copy(pool)(x.double()) == multiplier.double()  # certification sees the same function


# ----------------------------------------------------------------------------- modules that stay in training mode


class MCDropout(nn.Dropout):
    """Monte-Carlo dropout: ``train`` keeps it in training mode, so eval() leaves it random."""

    def train(self, mode=True):
        return super().train(True)


def test_a_module_that_stays_in_training_mode_is_refused():
    """Dropout kept in training mode (p = 0.5 doubles what it keeps) was bounded by 1 as in
    eval mode, and the random model certified at 38% for eps = 0.01."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), GramLinear(4, 16), MCDropout(0.5), GramLinear(16, 3))
    x, y = torch.rand(50, 1, 2, 2), torch.randint(0, 3, (50,))
    with pytest.raises(ValueError, match=r"'2' \(MCDropout\) stays in training mode"):
        certified_accuracy(net, (x, y), eps=[0.01], progress=False)
    with pytest.raises(ValueError, match="stays in training mode"):
        lipschitz_bound(net, (1, 2, 2))
    assert all(m.training for m in net.modules())  # modes restored
