"""The rounding bound of the certification forward pass where kernel taps read one input sample.

``lipnet.certify.precision`` bounds a linear module's float64 rounding by
``gamma_K |A| |h|`` with ``A`` the module's matrix, then ``|| |A| || <= sqrt(K) ||A||``. A
convolution does not compute ``A h`` from the entries of ``A``: it sums one product per tap, and
where several taps read the same input sample (circular, reflect or replicate padding copies,
or dilation wrapping around a small input) an entry of ``A`` is their sum. The rounding is then
``gamma_K`` times the convolution with ``|W|`` applied to ``|h|``, which is not bounded by
``||A||`` when the taps cancel: a normalized kernel with nearly opposite taps on an input of
length 1 has taps of size ~7e8 and an operator of norm 1, and ``certified_accuracy`` then
certifies (at radius 1.5e-9) a point that the exact model, on the weights it applies, misclassifies.

lipnet's layer bounds never add aliased taps: zero padding has none, and reflect, replicate and
(on inputs shorter than the kernel's reach) circular padding are bounded by the valid
convolution on the padded input times the copies, which bounds every tap, so normalized taps
stay <= 1 and the argument above holds with the valid convolution's matrix
(``tests/bounds/test_circular_aliasing.py``). ``K`` also counts the products of each output,
``c_in / groups * k_h * k_w``, which exceeds ``numel(h) + 1`` for a kernel larger than its input
(a 3x3 kernel with circular padding on a 1x1 input sums 9 products).
"""

from fractions import Fraction

import torch
from torch import nn

from lipnet.certify import certified_accuracy
from lipnet.certify.lipschitz import module_lipschitz_bounds
from lipnet.certify.precision import exact_kernels, float64_copy, forward_with_error_bound
from lipnet.nn import GramConv1d, GramLinear


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


def test_certified_points_are_classified_correctly_in_exact_arithmetic():
    conv = GramConv1d(1, 1, 2, padding=1, padding_mode="circular", bias=False, dtype=torch.float64)
    fc = GramLinear(2, 2, dtype=torch.float64)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[[1.0, -1.0 + 1e-9]]], dtype=torch.float64))
        fc.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=torch.float64))
        fc.bias.zero_()
    model = nn.Sequential(conv, nn.Flatten(), fc).eval()
    x = torch.full((1, 1, 1), 0.1234567890123, dtype=torch.float64)
    with torch.no_grad(), exact_kernels():
        computed = Fraction(float(float64_copy(model).eval()(x)[0, 0]))
    w0, w1 = (Fraction(float(v)) for v in conv.normalized_weight((1,)).flatten())
    a = [[Fraction(float(v)) for v in row] for row in fc.normalized_weight().tolist()]
    y = (w0 + w1) * Fraction(float(x))  # both outputs of the convolution, exactly
    exact0 = (a[0][0] + a[0][1]) * y
    # Class 1's logit between the exact and the computed logit of class 0: the float64 pass and
    # exact arithmetic then predict different classes (where the rounding is that large).
    bias = float((exact0 + computed) / 2)
    if not min(exact0, computed) < Fraction(bias) < max(exact0, computed):
        return  # the rounding is below the logits' resolution: no such point
    with torch.no_grad():
        fc.bias[1] = bias
    label = 0 if computed > Fraction(bias) else 1  # the float64 prediction
    assert (exact0 > Fraction(bias)) != (label == 0)  # exact arithmetic predicts the other class
    result = certified_accuracy(model, (x, torch.tensor([label])), eps=[1e-10], progress=False)
    # The float64 argmax may be wrong within rounding, but no radius may be certified for it
    # (without the fix: 1.5e-9).
    assert float(result.radii[0]) == 0 and result.certified[0] == 0
