"""Circular padding on inputs smaller than the kernel's reach: taps that read one sample.

With circular padding, two taps whose offsets agree modulo the input length (a kernel wider
than the input, or dilated around it) read the same input sample, and the operator adds them.
Summed in floating point inside the symbol, nearly cancelling taps lose all their digits
(``2^40 + 2^-20 - 2^40`` is 0 in float64), so a bound computed on the circulant can be far below
the operator's norm, or 0, and the rounding margin, which presumes that every tap is a separate
entry of the circulant (``sigma_max >= ||W||_F / sqrt(rank)``), does not cover it. The exact
norms here sum the taps one at a time in rational arithmetic.

Such an axis is therefore bounded like reflect and replicate padding
(``lipnet.bounds.circulant``: the padding's copies, ``input_copies = max`` count of ``j mod n``,
then the valid convolution on the padded length, whose taps are distinct), at the cost of
tightness on inputs smaller than the kernel's reach.
"""

from fractions import Fraction

import torch
from torch import nn

from lipnet.bounds import conv1d_spectral_norm, conv2d_spectral_norm
from lipnet.certify import lipschitz_bound
from lipnet.nn import GramConv1d, GramConv2d

CANCELLING = [2.0**40, 2.0**-20, -(2.0**40)]

def exact_norm(conv: nn.Module, weight: torch.Tensor, in_shape) -> float:
    """The operator norm of ``conv`` with ``weight``: its matrix summed tap by tap in fractions
    (each tap's matrix is exact: one product per entry), then the SVD of the rounded sum."""
    dim = torch.Size(in_shape).numel()
    basis = torch.eye(dim, dtype=torch.float64).reshape(dim, *in_shape)
    total = None
    for index in range(weight.numel()):
        single = torch.zeros(weight.numel(), dtype=torch.float64)
        single[index] = weight.flatten()[index].double()
        with torch.no_grad():
            conv.weight.copy_(single.view_as(weight))
            matrix = conv(basis).reshape(dim, -1).T.tolist()
        fractions = [[Fraction(v) for v in row] for row in matrix]
        total = fractions if total is None else [[a + b for a, b in zip(r, s)] for r, s in zip(total, fractions)]
    exact = torch.tensor([[float(v) for v in row] for row in total], dtype=torch.float64)
    return float(torch.linalg.matrix_norm(exact, ord=2))


def plain1d(n_taps=3, **kwargs):
    return nn.Conv1d(1, 1, n_taps, bias=False, dtype=torch.float64, padding_mode="circular", **kwargs)


def test_public_bound_of_cancelling_aliased_taps():
    weight = torch.tensor([[CANCELLING]], dtype=torch.float64)
    exact = exact_norm(plain1d(padding=1), weight, (1, 1))
    assert exact == 2.0**-20
    assert float(conv1d_spectral_norm(weight, 1, padding=1, padding_mode="circular", n_iter=14)) >= exact


def test_normalized_layer_and_certificate_with_cancelling_aliased_taps():
    layer = GramConv1d(1, 1, 3, padding=1, padding_mode="circular", bias=False, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[CANCELLING]], dtype=torch.float64))
    applied = layer.normalized_weight(1).detach()
    exact = exact_norm(plain1d(padding=1), applied, (1, 1))
    assert exact <= 1 + 1e-10  # was 953674.3 (2^-20 / 1e-12) with a bound of 0
    assert lipschitz_bound(nn.Sequential(layer), (1, 1)) >= exact


def test_2d_kernel_wrapping_around_a_2x2_input():
    """A 3x3 kernel with circular padding 1 on a 2x2 input: taps at offsets -1 and +1 read one
    sample on each axis."""
    weight = torch.zeros(1, 1, 3, 3, dtype=torch.float64)
    weight[0, 0, 0, 1], weight[0, 0, 1, 1], weight[0, 0, 2, 1] = CANCELLING
    plain = nn.Conv2d(1, 1, 3, padding=1, padding_mode="circular", bias=False, dtype=torch.float64)
    exact = exact_norm(plain, weight, (1, 2, 2))
    assert exact > 0
    assert float(conv2d_spectral_norm(weight, 2, padding=1, padding_mode="circular", n_iter=14)) >= exact
    layer = GramConv2d(1, 1, 3, padding=1, padding_mode="circular", bias=False, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(weight)
    applied = layer.normalized_weight((2, 2)).detach()
    applied_exact = exact_norm(plain, applied, (1, 2, 2))
    assert applied_exact <= 1 + 1e-10
    assert lipschitz_bound(nn.Sequential(layer), (1, 2, 2)) >= applied_exact
