"""The certified bound of a ``ConvexResidual`` block is at least its exact Lipschitz constant.

``(1 - alpha) x + alpha f(x)`` is ``(1 - alpha) + alpha Lip(f)``-Lipschitz by the triangle
inequality, and no less in general: when ``f`` is the identity the block is the identity.
Random networks do not show a bound that is too small (their empirical constants lie far
below any bound), so the block is checked on linear branches, whose exact constant is the
largest singular value of the Jacobian.
"""

import pytest
import torch
from torch import nn

from lipnet.certify import LipschitzBoundError, lipschitz_bound
from lipnet.nn import ConvexResidual, GramConv2d, GramResidualConv2d

ALPHAS = [0.05, 0.3, 0.5, 0.8, 0.97]


def exact_lipschitz(module, shape):
    """Largest singular value of the Jacobian of a linear ``module`` at 0, in float64."""
    x = torch.zeros(1, *shape, dtype=torch.float64)
    jacobian = torch.autograd.functional.jacobian(lambda t: module(t).flatten(), x).reshape(-1, x.numel())
    return float(torch.linalg.matrix_norm(jacobian, ord=2))


@pytest.mark.parametrize("alpha", ALPHAS)
def test_a_block_around_the_identity_is_certified_at_least_one(alpha):
    block = ConvexResidual(nn.Identity(), alpha).double()
    bound = lipschitz_bound(block, (4,))
    assert exact_lipschitz(block.eval(), (4,)) == pytest.approx(1.0, rel=1e-15)
    assert 1.0 <= bound <= 1 + 1e-15


@pytest.mark.parametrize("alpha", ALPHAS)
def test_a_residual_block_that_is_the_identity_is_certified_at_least_one(alpha):
    branch = GramResidualConv2d(3, 3, bias=False).double()
    with torch.no_grad():
        branch.weight.zero_()  # applies the identity kernel divided by its own bound
    block = ConvexResidual(branch, alpha).double().eval()
    exact = exact_lipschitz(block, (3, 5, 5))
    assert exact == pytest.approx(1.0, rel=1e-6)  # the identity over its Gram bound, just above 1
    assert lipschitz_bound(block, (3, 5, 5)) >= exact


@pytest.mark.parametrize("alpha", ALPHAS)
def test_a_block_with_an_aligned_linear_branch_is_certified_soundly(alpha):
    """A branch with a positive kernel: its top singular vector is nearly constant, as is the
    identity's, so the exact constant is close to the sum ``(1 - alpha) + alpha ||f||``."""
    torch.manual_seed(0)
    branch = GramConv2d(2, 2, 3, padding=1, bias=False).double()
    with torch.no_grad():
        branch.weight.abs_()
    block = ConvexResidual(nn.Sequential(branch, ConvexResidual(nn.Identity(), 0.5)), alpha).double().eval()
    exact = exact_lipschitz(block, (2, 6, 6))
    assert lipschitz_bound(block, (2, 6, 6)) >= exact


def test_a_nan_mixing_weight_is_refused_with_the_blocks_path():
    """A diverged ``alpha_logit`` (NaN) makes the block output NaN: no Lipschitz constant. The
    bound's exact rounding raised ``ValueError: cannot convert NaN to integer ratio`` instead."""
    block = nn.Sequential(ConvexResidual(nn.Identity(), 0.5))
    with torch.no_grad():
        block[0].alpha_logit.fill_(float("nan"))
    with pytest.raises(LipschitzBoundError, match=r"module '0' .*alpha_logit is NaN"):
        lipschitz_bound(block, (4,))
