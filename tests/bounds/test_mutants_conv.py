"""Mutation-testing gaps of lipnet.bounds.conv and symbol_gram: a float64 bound is computed in float64
whatever was bounded before it; dead taps take no part in the autocorrelation."""

import pytest
import torch

from lipnet.bounds import conv2d_spectral_norm
from lipnet.bounds.reference import exact_conv2d_spectral_norm


def test_a_float64_bound_after_a_float32_one_of_the_same_geometry_keeps_float64_accuracy():
    """The tap DFT is cached per geometry; a float64 bound must not reuse the complex64 DFT a
    float32 bound of the same geometry cached (its rounding, ~1e-7 relative, is far above what the
    float64 rounding margin of certification allows for). On a circular 'same' convolution the Gram
    bound is the exact norm (a circulant), so the float64 bound must match the exact one, computed
    from an SVD per frequency, to float64 accuracy."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(3, 2, 3, 3, generator=generator, dtype=torch.float64)
    kwargs = dict(padding=(1, 2), padding_mode="circular", dilation=(1, 2))
    size = (11, 13)  # a geometry no other test bounds first
    conv2d_spectral_norm(weight.float(), size, **kwargs)
    bound = float(conv2d_spectral_norm(weight, size, n_iter=14, **kwargs))
    exact = exact_conv2d_spectral_norm(weight, size, **kwargs)
    assert abs(bound - exact) <= 1e-12 * exact


def test_taps_that_read_only_padding_take_no_part_in_the_autocorrelation():
    """On inputs of height 1 with padding 1, the top and bottom rows of a 3 x 3 kernel read only zero
    padding (dead taps): the operator is the middle row's alone. With more frequencies than the 81
    pairs of taps (width 200) the first Gram iterate comes from the kernel's autocorrelation, whose
    pairs of taps must leave out
    every pair with a dead tap on either side: the bound is that of the same kernel with its dead rows
    zeroed (the same operator), and above the exact norm (float64 SVD of the dense operator)."""
    from lipnet.bounds.reference import conv2d_operator_matrix

    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(2, 4, 3, 3, generator=generator, dtype=torch.float64)
    weight[:, :, 0] *= 50  # large dead rows: any of their products in the Gram matrix shows
    weight[:, :, 2] *= -30
    exact = float(torch.linalg.matrix_norm(conv2d_operator_matrix(weight, (1, 200), padding=1), ord=2))
    bound = float(conv2d_spectral_norm(weight, (1, 200), padding=1, n_iter=14))
    live = weight.clone()
    live[:, :, 0] = 0
    live[:, :, 2] = 0
    assert torch.equal(conv2d_operator_matrix(live, (1, 200), padding=1),
                       conv2d_operator_matrix(weight, (1, 200), padding=1))
    assert bound == pytest.approx(float(conv2d_spectral_norm(live, (1, 200), padding=1, n_iter=14)), rel=1e-12)
    assert bound >= exact
