"""Mutation-testing gaps of lipnet.bounds.conv: a float64 bound is computed in float64 whatever was
bounded before it."""

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
