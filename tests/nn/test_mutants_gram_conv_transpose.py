"""Mutation-testing gaps of lipnet.nn.gram_conv_transpose: GramConvTranspose2d must bound, for an
input size it is told, the operator its forward applies to inputs of that size (output padding
as torch reads it), and its bound must be that of the grouped operator."""

import pytest
import torch

from lipnet.bounds.reference import affine_map_matrix
from lipnet.nn import GramConvTranspose2d


def _applied_norm(layer, shape):
    """Exact operator norm of the linear part of ``layer``'s forward on inputs of ``shape`` (float64)."""
    with torch.no_grad():
        return float(torch.linalg.matrix_norm(affine_map_matrix(layer, shape), ord=2))


def test_the_bound_of_a_depthwise_layer_is_for_its_groups():
    """A depthwise transposed convolution (``groups`` = channels) applies one kernel per channel:
    its bound is the largest of theirs, and the dense operator the forward applies has norm at
    most 1 and near 1. A bound of all groups as one convolution is sound but up to ``sqrt(groups)``
    times too large, and the layer would apply a contraction."""
    torch.manual_seed(0)
    up = GramConvTranspose2d(4, 4, 3, stride=2, groups=4).double()
    assert 0.95 <= _applied_norm(up, (4, 6, 6)) <= 1 + 1e-9


def test_an_output_padding_set_as_a_one_element_tuple_is_read_for_both_axes():
    """``F.conv_transpose2d`` applies ``output_padding = (1,)`` to both axes (1 x 1 inputs give
    2 x 2 outputs at stride 2). ``normalized_weight((1, 1))`` and ``lipschitz_bound((1, 1))``,
    for inputs of 1 x 1, must be those of the forward on such inputs (the bound is for a 2 x 2
    output, not 2 x 1, where a 3 x 3 kernel reads fewer taps), and the operator it applies has
    norm at most 1."""
    torch.manual_seed(0)
    up = GramConvTranspose2d(2, 2, 3, stride=2, padding=1).double()
    up.output_padding = (1,)
    with torch.no_grad():
        assert up(torch.zeros(1, 2, 1, 1, dtype=torch.float64)).shape[-2:] == (2, 2)
        torch.testing.assert_close(up.normalized_weight((1, 1)), up.normalized_weight(), rtol=0, atol=0)
        assert up.lipschitz_bound((1, 1)) == up.lipschitz_bound()
    assert _applied_norm(up, (2, 1, 1)) <= 1 + 1e-9


def test_a_subclass_that_bounds_another_output_size_than_it_applies_is_refused_by_certify():
    """``_output_size`` says for which output size the forward normalizes its weight. A subclass
    that overrides it (here to a 1 x 1 output, where a 3 x 3 kernel with padding 1 acts by its
    centre tap only) applies on 8 x 8 inputs a weight whose operator has norm above 1:
    ``lipnet.certify`` must refuse the layer rather than certify the inherited bound."""
    from lipnet.certify import LipschitzBoundError, lipschitz_bound
    from lipnet.nn.gram_conv_transpose import OutputSize

    class Smaller(GramConvTranspose2d):
        def _output_size(self, input, output_size=None):
            _, output_padding = super()._output_size(input, output_size)
            return OutputSize(1, 1), output_padding

    layer = Smaller(2, 2, 3, padding=1, bias=False, dtype=torch.float64)
    torch.nn.init.ones_(layer.weight)  # a low-pass kernel: its norm grows with the input size
    assert _applied_norm(layer, (2, 8, 8)) > 1.5
    with pytest.raises(LipschitzBoundError, match="_output_size"):
        lipschitz_bound(torch.nn.Sequential(layer), (2, 8, 8))
