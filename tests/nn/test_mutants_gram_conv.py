"""Mutation-testing gaps of lipnet.nn.gram_conv: GramConv2d must bound the operator it applies, for
the input size it is told (an int is a square input)."""

import pytest
import torch
from torch import nn

from lipnet.bounds.reference import affine_map_matrix, exact_conv2d_spectral_norm
from lipnet.nn import GramConv2d


def test_an_int_input_size_is_a_square_input():
    """``normalized_weight(8)`` is the weight for 8 x 8 inputs, as ``nn.Conv2d``'s int arguments
    mean both axes: its exact operator norm (float64, dense) on 8 x 8 inputs is at most 1, and it
    is the weight that ``normalized_weight((8, 8))`` gives. A bound for another size, e.g. 8 x 1
    inputs (where a 3 x 3 kernel reads a third of its columns), is smaller and would leave the
    weight above 1 on the inputs it is applied to."""
    torch.manual_seed(0)
    conv = GramConv2d(2, 3, 3, padding=1, bias=False).double()
    with torch.no_grad():
        square = conv.normalized_weight(8)
        torch.testing.assert_close(square, conv.normalized_weight((8, 8)), rtol=0, atol=0)
        assert exact_conv2d_spectral_norm(square, (8, 8), padding=1) <= 1 + 1e-9
        assert conv.lipschitz_bound(8) >= exact_conv2d_spectral_norm(square, (8, 8), padding=1)


def _applied_norm(layer, shape):
    """Exact operator norm of the linear part of ``layer``'s forward on inputs of ``shape`` (float64)."""
    with torch.no_grad():
        return float(torch.linalg.matrix_norm(affine_map_matrix(layer, shape), ord=2))


def test_a_non_square_input_is_bounded_on_its_own_height_and_width():
    """A 1 x 3 kernel with padding (0, 1) on 1 x 6 inputs: each output reads three columns. On
    6 x 1 inputs (height and width exchanged) it reads only its middle tap, another operator of a
    smaller norm. The forward must normalize for ``(h, w) = (1, 6)``: the dense operator it applies
    has norm at most 1, and close to 1; the weight normalized for 6 x 1 inputs exceeds 1 on these."""
    torch.manual_seed(0)
    conv = GramConv2d(2, 2, (1, 3), padding=(0, 1)).double()
    norm = _applied_norm(conv, (2, 1, 6))
    assert 0.95 <= norm <= 1 + 1e-9
    with torch.no_grad():
        assert exact_conv2d_spectral_norm(conv.normalized_weight((6, 1)), (1, 6), padding=(0, 1)) > 1.2


def test_the_last_input_size_is_recorded_as_height_then_width():
    """After a forward pass on 1 x 6 inputs, ``normalized_weight()`` and ``lipschitz_bound()``
    (``input_size=None``: the last forward's) are those of ``(1, 6)``: the weight that forward
    applied, and its certificate."""
    torch.manual_seed(0)
    conv = GramConv2d(2, 2, (1, 3), padding=(0, 1)).double()
    with torch.no_grad():
        conv(torch.randn(1, 2, 1, 6, dtype=torch.float64))
        torch.testing.assert_close(conv.normalized_weight(), conv.normalized_weight((1, 6)), rtol=0, atol=0)
        assert conv.lipschitz_bound() == conv.lipschitz_bound((1, 6))


@pytest.mark.parametrize("padding_mode", ["circular", "reflect", "replicate"])
def test_a_padding_mode_with_other_paddings_per_axis_runs_and_is_1_lipschitz(padding_mode):
    """With a non-zero padding mode the layer checks, at each bound, that ``padding`` still matches
    the padding ``nn.Conv2d`` fixed at construction (``(left, right, top, bottom)``). A layer built
    with padding ``(1, 0)`` (rows, then columns) and never changed must pass that check, and the
    operator its forward applies (dense, float64) must have norm at most 1."""
    torch.manual_seed(0)
    conv = GramConv2d(2, 2, (3, 1), padding=(1, 0), padding_mode=padding_mode).double()
    assert _applied_norm(conv, (2, 4, 3)) <= 1 + 1e-9


@pytest.mark.parametrize("setting", [dict(stride=0), dict(padding=-1), dict(dilation=0)])
def test_geometry_that_nn_conv2d_accepts_until_its_first_batch_is_refused_at_construction(setting):
    """``nn.Conv2d`` stores a zero stride, a negative padding or a zero dilation and fails only at
    the first forward; the Gram layer, whose bound needs a valid geometry, says so when it is built."""
    nn.Conv2d(2, 2, 3, **setting)
    with pytest.raises(ValueError, match=next(iter(setting))):
        GramConv2d(2, 2, 3, **setting)
