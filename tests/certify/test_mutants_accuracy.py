"""Mutation-testing gaps of lipnet.certify.accuracy: the bound of a plain nn.Linear last layer
against an exact lower bound of its norm."""

from fractions import Fraction

import torch
from torch import nn

from lipnet.certify import certified_accuracy


def exact_norm_lower_bound_squared(weight: torch.Tensor) -> Fraction:
    """``||W v||^2 / ||v||^2`` in rational arithmetic, ``v`` the computed top right singular vector:
    at most ``||W||^2``."""
    v = [Fraction(x) for x in torch.linalg.svd(weight)[2][0].tolist()]
    wv = [sum((Fraction(a) * b for a, b in zip(row, v)), Fraction(0)) for row in weight.tolist()]
    return sum(x * x for x in wv) / sum(x * x for x in v)


def test_a_plain_linear_last_layer_is_bounded_above_its_exact_norm():
    """The Gram bound of a weight, computed in float64, falls an ulp or two below the exact norm for
    about half of these matrices (a separated top singular value, to which it converges): the
    certified constant must carry its rounding margin."""
    generator = torch.Generator().manual_seed(0)
    for i in range(12):
        n = (2, 4, 8)[i % 3]
        weight = torch.randn(n, n, generator=generator, dtype=torch.float64)
        weight[0] *= 10
        model = nn.Sequential(nn.Linear(n, n, bias=False, dtype=torch.float64)).eval()
        with torch.no_grad():
            model[0].weight.copy_(weight)
        x = torch.randn(2, n, generator=generator, dtype=torch.float64)
        result = certified_accuracy(model, [(x, torch.zeros(2, dtype=torch.long))], eps=0.1)
        assert Fraction(result.lipschitz) ** 2 >= exact_norm_lower_bound_squared(weight), i
