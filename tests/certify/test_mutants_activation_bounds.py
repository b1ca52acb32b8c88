"""Mutation-testing gaps of lipnet.certify.activation_bounds: a fast, cleanly failing check of every
smooth constant against torch's own derivative.

The rigorous grid check of test_activation_bounds refines cells until each is settled; for a constant
below the true supremum that never happens, and the test ran out of time or memory instead of
failing (a GELU-tanh constant computed with ``c = 0.04`` instead of ``0.044715``). Here the largest
slope torch's analytic backward gives on a fine grid, near where each maximum lies, must not exceed
the constant, which must also be within ``1e-6`` of it."""

import pytest
import torch
from torch import nn

from lipnet.certify import lipschitz_bound

SMOOTH = [nn.GELU(), nn.GELU(approximate="tanh"), nn.SiLU(), nn.Mish(), nn.SELU(), nn.ELU(), nn.CELU(2.0)]


@pytest.mark.parametrize("module", SMOOTH, ids=repr)
def test_smooth_constants_are_at_least_the_sampled_slope_and_close_to_it(module):
    x = torch.cat([torch.linspace(-8, 8, 400_001, dtype=torch.float64), -torch.logspace(-12, 1, 2000, dtype=torch.float64)])
    x.requires_grad_()
    (slope,) = torch.autograd.grad(module(x).sum(), x)
    sampled = float(slope.abs().max())
    bound = lipschitz_bound(nn.Sequential(module), (3,))
    assert bound >= sampled
    assert bound - sampled <= 1e-6 * bound
