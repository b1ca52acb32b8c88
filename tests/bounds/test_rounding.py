"""``relative_rounding_margin``: ten times the documented worst cases, never below ``1e-6``;
and the certified bounds of layers that are exactly isometries stay above their exact norms.

A layer's certified bound is its float64 Gram bound times ``1 + margin``. For an isometry the
Gram bound is tight, so only the margin stands between it and rounding below the exact
norm; there the exact norm is checked in rational arithmetic (``L^2 I - A^T A`` positive
definite), and the ``1e-6`` floor is visible in the certified value.
"""

import math
from fractions import Fraction

import pytest
import torch

from lipnet.bounds.reference import conv2d_operator_matrix
from lipnet.bounds.rounding import MIN_RELATIVE_MARGIN, flushes_denormals, gradual_underflow, relative_rounding_margin
from lipnet.nn import GramConv2d, GramLinear
from lipnet.nn.normalized import CERTIFICATION_N_ITER


def documented_worst_case(dtype, inner, rank, taps, n_iter, log_bound):
    """The sum of the relative worst cases the module docstring lists (``u`` times a count)."""
    u = torch.finfo(dtype).eps / 2
    symbol = (taps + 2) * math.sqrt(rank)
    autocorrelation = math.sqrt(2) * taps * rank * (inner + 2 * taps**2)
    gram_steps = 2 * (2 * inner * rank)  # the steps, and once more through the roots
    final = rank
    logs = (n_iter + 3) * abs(log_bound)
    return u * (symbol + autocorrelation + gram_steps + final + logs)


def test_the_floor_holds_for_small_layers():
    assert MIN_RELATIVE_MARGIN == 1e-6
    for shape in [dict(inner=1, rank=1, taps=1), dict(inner=10, rank=3, taps=1), dict(inner=64, rank=16, taps=9)]:
        margin = relative_rounding_margin(torch.float64, n_iter=CERTIFICATION_N_ITER, **shape)
        assert margin == MIN_RELATIVE_MARGIN
        assert margin >= 10 * documented_worst_case(torch.float64, n_iter=CERTIFICATION_N_ITER, log_bound=0.0,
                                                    **shape)


@pytest.mark.parametrize("dtype, shape", [
    (torch.float32, dict(inner=512, rank=256, taps=9)),
    (torch.float32, dict(inner=64, rank=64, taps=1)),
    (torch.float64, dict(inner=20000, rank=10000, taps=9)),
    (torch.float64, dict(inner=8192, rank=8192, taps=25)),
])
@pytest.mark.parametrize("log_bound", [0.0, 30.0])
def test_large_layers_get_ten_times_the_worst_case(dtype, shape, log_bound):
    worst = documented_worst_case(dtype, n_iter=6, log_bound=log_bound, **shape)
    margin = relative_rounding_margin(dtype, n_iter=6, log_bound=log_bound, **shape)
    assert worst > MIN_RELATIVE_MARGIN / 10  # the floor is not what is tested here
    assert margin >= 10 * worst
    assert margin <= 20 * worst  # and not vacuous: a margin of 1 would certify nothing useful


def is_positive_definite(matrix):
    """Whether a symmetric matrix of Fractions is positive definite (all pivots of Gaussian
    elimination positive), exactly."""
    a = [row[:] for row in matrix]
    n = len(a)
    for k in range(n):
        if a[k][k] <= 0:
            return False
        for i in range(k + 1, n):
            factor = a[i][k] / a[k][k]
            if factor:
                for j in range(k, n):
                    a[i][j] -= factor * a[k][j]
    return True


def certifies_exactly(operator, bound):
    """``bound`` exceeds the exact spectral norm of the float64 ``operator`` (rational arithmetic)."""
    entries = [[Fraction(v) for v in row] for row in operator.tolist()]
    columns = list(zip(*entries))
    square = Fraction(bound) ** 2
    gram = [[(square if i == j else 0) - sum(a * b for a, b in zip(columns[i], columns[j]))
             for j in range(len(columns))] for i in range(len(columns))]
    return is_positive_definite(gram)


def orthogonal(n, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=gen))[0]


def test_an_orthogonal_linear_layer_is_certified_above_its_exact_norm_with_the_floor():
    layer = GramLinear(12, 12, bias=False).double()
    with torch.no_grad():
        layer.weight.copy_(orthogonal(12, 0))
    applied = layer.normalized_weight().detach()
    bound = layer.lipschitz_bound()
    assert certifies_exactly(applied, bound)
    # The Gram bound of an isometry is tight, so the certified value shows the floor.
    exact = float(torch.linalg.matrix_norm(applied, ord=2))
    assert bound >= exact * (1 + MIN_RELATIVE_MARGIN) * (1 - 1e-12)
    assert bound <= exact * (1 + 2 * MIN_RELATIVE_MARGIN)


def test_an_orthogonal_circular_convolution_is_certified_above_its_exact_norm_with_the_floor():
    layer = GramConv2d(3, 3, 3, padding="same", padding_mode="circular", bias=False).double()
    with torch.no_grad():
        layer.weight.zero_()
        layer.weight[:, :, 1, 1] = orthogonal(3, 1)  # a centre tap only: an orthogonal operator
    size = (3, 4)
    applied = conv2d_operator_matrix(layer.normalized_weight(size).detach(), size, padding="same",
                                     padding_mode="circular")
    bound = layer.lipschitz_bound(size)
    assert certifies_exactly(applied, bound)
    exact = float(torch.linalg.matrix_norm(applied, ord=2))
    assert bound >= exact * (1 + MIN_RELATIVE_MARGIN) * (1 - 1e-12)
    assert bound <= exact * (1 + 2 * MIN_RELATIVE_MARGIN)


def test_gradual_underflow_keeps_subnormals_and_gives_the_setting_back(flushed_denormals):
    tiny = torch.tensor(2.0 ** -1022, dtype=torch.float64)
    assert flushes_denormals() and float(tiny / 2) == 0.0
    with gradual_underflow():
        assert not flushes_denormals() and float(tiny / 2) == 2.0 ** -1023
    assert flushes_denormals()
    with gradual_underflow():  # nested, as certified_accuracy runs lipschitz_bound and certified_radius
        with gradual_underflow():
            pass
        assert not flushes_denormals()
    assert flushes_denormals()
