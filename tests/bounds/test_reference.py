"""The test oracle: the circulant fast path of ``exact_conv2d_spectral_norm`` equals the dense SVD.

Every soundness test compares a bound with ``exact_conv2d_spectral_norm``. For circular
stride-1 convolutions whose output has the input's size it does not build the dense operator
but wraps the (dilated) kernel onto the input and takes per-frequency SVDs; a mistake there
would hide bound bugs on exactly the cases where the bound is claimed tight. So the fast path
is checked against the largest singular value of ``conv2d_operator_matrix`` (impulse responses
of ``F.conv2d``) over dilations, groups, even kernels (odd 'same' totals) and non-square inputs.
"""

import itertools

import pytest
import torch

from lipnet.bounds import reference
from lipnet.bounds.reference import affine_map_matrix, conv2d_operator_matrix, exact_conv2d_spectral_norm


def circular_cases():
    """Kernel, dilation, groups, input size and padding ('same', or the integer that keeps the
    input's size when the total ``dilation * (kernel - 1)`` is even) of circular convolutions
    whose output has the input's size. Input sizes share factors with the dilations: a dilation
    coprime to the size only permutes the frequencies."""
    for (kernel, size), dilation, groups in itertools.product(
            [((3, 3), (6, 8)), ((2, 3), (9, 6)), ((2, 2), (6, 9)), ((1, 4), (5, 12))],
            [(1, 1), (2, 1), (1, 3), (3, 2), (2, 2)], [1, 2]):
        totals = [d * (k - 1) for d, k in zip(dilation, kernel)]
        if any(t > n for t, n in zip(totals, size)):
            continue  # circular padding may not wrap more than once
        paddings = ["same"] + ([tuple(t // 2 for t in totals)] if not any(t % 2 for t in totals) else [])
        for padding in paddings:
            yield pytest.param(kernel, dilation, groups, size, padding,
                               id=f"k{kernel}-d{dilation}-g{groups}-n{size}-p{padding}")


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")  # torch's own, for F.conv2d
@pytest.mark.parametrize("kernel, dilation, groups, size, padding", list(circular_cases()))
def test_circulant_fast_path_equals_the_dense_norm(kernel, dilation, groups, size, padding, monkeypatch):
    gen = torch.Generator().manual_seed(hash((kernel, dilation, groups)) % 2**31)
    weight = torch.randn(4, 4 // groups, *kernel, dtype=torch.float64, generator=gen)
    kw = dict(padding=padding, dilation=dilation, groups=groups, padding_mode="circular")
    matrix = conv2d_operator_matrix(weight, size, **kw)
    assert matrix.shape[0] == matrix.shape[1]  # output of the input's size: the fast path's case
    dense = float(torch.linalg.matrix_norm(matrix, ord=2))

    def no_dense(*args, **kwargs):
        raise AssertionError("exact_conv2d_spectral_norm built the dense operator instead of using the circulant")

    monkeypatch.setattr(reference, "conv2d_operator_matrix", no_dense)
    fast = exact_conv2d_spectral_norm(weight, size, **kw)
    assert fast == pytest.approx(dense, rel=1e-10, abs=0)


def test_affine_map_matrix_is_the_linear_part_in_float64():
    """Column j is fn(e_j) - fn(0): a dense layer's weight with its bias removed (float64), the
    weight itself when the map runs in float32 without a bias (each entry one exact product),
    differentiable, and a convolution module's matrix is the reference convolution's."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(6, 4).double()
    torch.nn.init.uniform_(layer.bias, 1.0, 2.0)
    torch.testing.assert_close(affine_map_matrix(layer, (6,)), layer.weight.detach(), rtol=1e-15, atol=0)
    plain = torch.nn.Linear(6, 4, bias=False)
    matrix = affine_map_matrix(plain, (6,), torch.float32)
    assert matrix.dtype == torch.float64
    torch.testing.assert_close(matrix, plain.weight.detach().double(), rtol=0, atol=0)
    matrix.sum().backward()
    torch.testing.assert_close(plain.weight.grad, torch.ones(4, 6))
    conv = torch.nn.Conv2d(2, 3, 3, padding=1, bias=False).double()
    torch.testing.assert_close(affine_map_matrix(conv, (2, 4, 5)), conv2d_operator_matrix(conv.weight, (4, 5), padding=1))
