"""Mutation tests of :mod:`lipnet.bounds.conv_transpose`: settings refused as PyTorch refuses
them, a clear error for stacked kernels, and the iteration settings passed on to the
adjoint's bound."""

import pytest
import torch
import torch.nn.functional as F

from lipnet.bounds import (
    conv2d_spectral_norm,
    conv_transpose2d_output_size,
    conv_transpose2d_spectral_norm,
    exact_conv_transpose2d_spectral_norm,
)


@pytest.mark.parametrize("kw", [dict(padding=(1, -1)), dict(padding=-1), dict(output_padding=(0, -1), stride=2),
                                dict(output_padding=-1)], ids=str)
def test_negative_padding_or_output_padding_is_refused_as_pytorch_refuses_it(kw):
    """``F.conv_transpose2d`` refuses negative ``padding`` and ``output_padding``; the output size
    must refuse them too instead of returning a size for an operator that does not exist (with
    padding 1 and a kernel of 3, a negative value still leaves a positive size)."""
    with pytest.raises(RuntimeError, match="negative"):
        F.conv_transpose2d(torch.zeros(1, 2, 4, 4), torch.zeros(2, 2, 3, 3), **kw)
    with pytest.raises(ValueError, match="padding and output_padding >= 0"):
        conv_transpose2d_output_size(4, 3, **kw)


@pytest.mark.parametrize("input_shape, weight_shape, kw", [
    ((1, 2, 0, 4), (2, 2, 3, 3), {}),
    ((1, 2, 4, 4), (2, 2, 0, 3), {}),
    ((1, 2, 4, 4), (2, 2, 3, 3), dict(dilation=(1, 0))),
    ((1, 2, 4, 4), (2, 2, 3, 3), dict(stride=(0, 1))),
], ids=["empty input", "empty kernel", "dilation 0", "stride 0"])
def test_empty_inputs_kernels_and_zero_dilations_or_strides_are_refused_as_pytorch_refuses_them(
        input_shape, weight_shape, kw):
    """``F.conv_transpose2d`` refuses an input or kernel of size 0 and a dilation or stride of 0;
    the output size refuses them too (each would otherwise still give a positive size here:
    with an empty input ``-s + d (k - 1) + 1 = 2``)."""
    with pytest.raises(RuntimeError, match="zero|non-positive"):
        F.conv_transpose2d(torch.zeros(input_shape), torch.zeros(weight_shape), **kw)
    with pytest.raises(ValueError, match="must be >= 1"):
        conv_transpose2d_output_size(input_shape[-2:], weight_shape[-2:], **kw)


def test_stacked_kernels_whose_in_channels_groups_do_not_divide_name_in_channels():
    """Stacked kernels ``(L, c_in, c_out // groups, k_h, k_w)`` get the same error as one kernel,
    naming ``in_channels`` (the first dimension of the transposed convolution's weight)."""
    with pytest.raises(ValueError, match=r"in_channels \(3.*divisible by groups \(2\)"):
        conv_transpose2d_spectral_norm(torch.randn(2, 3, 2, 3, 3), 6, padding=1, groups=2)


SETTINGS = [dict(n_iter=1), dict(n_iter=6, screen_iter=1, n_candidates=1),
            dict(n_iter=6, screen_iter=2, n_candidates=1), dict(n_iter=6, screen_iter=1, n_candidates=3)]


def test_iteration_settings_reach_the_adjoint_convolutions_bound():
    """With stride 1 and no padding the transposed convolution on ``7 x 7`` inputs is the adjoint
    of the convolution on ``8 x 8`` inputs (output size ``n + k - 1``), so its bound is that
    convolution's, for every ``n_iter``, ``screen_iter`` and ``n_candidates``; each is still at
    least the exact norm. The settings matter for this kernel (the bounds are not all equal:
    one step is looser, and one screening step with one candidate misses the maximizing
    frequency that two screening steps or three candidates refine), so a setting left at its
    default would show."""
    weight = torch.randn(4, 4, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    exact = exact_conv_transpose2d_spectral_norm(weight, 7)
    bounds = []
    for settings in SETTINGS:
        bound = conv_transpose2d_spectral_norm(weight, 7, **settings)
        assert bound.item() == conv2d_spectral_norm(weight, 8, **settings).item()
        assert bound.item() >= exact
        bounds.append(bound.item())
    assert bounds[0] > bounds[1] > bounds[2] == bounds[3]
