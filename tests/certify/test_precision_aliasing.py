"""The rounding bound of the certification forward pass where kernel taps read one input sample.

``lipnet.certify.precision`` bounds a linear module's float64 rounding by
``gamma_K |A| |h|`` with ``A`` the module's matrix, then ``|| |A| || <= sqrt(K) ||A||``. A
convolution does not compute ``A h`` from the entries of ``A``: it sums one product per tap, and
where several taps read the same input sample (circular, reflect or replicate padding copies,
or dilation wrapping around a small input) an entry of ``A`` is their sum. The rounding is then
``gamma_K`` times the convolution with ``|W|`` applied to ``|h|``, which is not bounded by
``||A||`` when the taps cancel: a normalized kernel with nearly opposite taps on an input of
length 1 has taps of size ~7e8 and an operator of norm 1.

A sound bound replaces ``lam`` in the rounding term by ``max(lam, ||conv_|W| || / sqrt(K))``,
``||conv_|W| ||`` the bound of the same convolution with the kernel ``|W|``
(``conv2d_spectral_norm`` of ``|W|`` with the layer's geometry): equal to the present term
where no taps alias (every entry of ``A`` is then one tap). ``K`` must also count the products
of each output, ``c_in / groups * k_h * k_w``, which exceeds ``numel(h) + 1`` for a kernel larger
than its input (a 3x3 kernel with circular padding on a 1x1 input sums 9 products).
"""

from fractions import Fraction

import pytest
import torch
from torch import nn

from lipnet.certify.lipschitz import module_lipschitz_bounds
from lipnet.certify.precision import exact_kernels, float64_copy, forward_with_error_bound
from lipnet.nn import GramConv1d


@pytest.mark.xfail(strict=True, reason="precision.py bounds a convolution's rounding by |A| |h|; aliased taps "
                                       "that cancel round at the size of |W| |h| (see the module docstring)")
def test_rounding_bound_covers_cancelling_aliased_taps():
    conv = GramConv1d(1, 1, 2, padding=1, padding_mode="circular", bias=False, dtype=torch.float64)
    with torch.no_grad():  # on a length-1 input both taps read the one sample: A = w0 + w1
        conv.weight.copy_(torch.tensor([[[1.0, -1.0 + 1e-9]]], dtype=torch.float64))
    twin = float64_copy(nn.Sequential(conv).eval()).eval()
    _, bounds = module_lipschitz_bounds(twin, (1, 1))
    x = torch.tensor([[[0.1234567890123]]], dtype=torch.float64)
    with exact_kernels():
        y, err = forward_with_error_bound(twin, x, bounds)
    w0, w1 = (Fraction(float(v)) for v in conv.normalized_weight((1,)).flatten())
    exact = (w0 + w1) * Fraction(float(x))
    actual = float(sum((Fraction(float(v)) - exact) ** 2 for v in y.flatten())) ** 0.5
    assert actual <= float(err[0])  # 4.2e-9 against a claimed 5.7e-16
