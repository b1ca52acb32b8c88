"""Mutation-testing gaps of lipnet.nn.gram_conv1d: GramConv1d must bound the operator it applies
with all of its geometry (stride, groups, asymmetric padding) and refuse invalid geometry when built."""

import pytest
import torch
from torch import nn

from lipnet.nn import GramConv1d
from lipnet.bounds.reference import affine_map_matrix


def _applied_norm(layer, shape):
    """Exact operator norm of the linear part of ``layer``'s forward on inputs of ``shape`` (float64)."""
    with torch.no_grad():
        return float(torch.linalg.matrix_norm(affine_map_matrix(layer, shape), ord=2))


@pytest.mark.parametrize("setting", [dict(stride=3), dict(groups=4)], ids=["stride", "depthwise"])
def test_the_bound_is_for_the_strided_or_grouped_operator_the_forward_applies(setting):
    """The dense operator a strided (or depthwise) layer applies has norm at most 1, and near 1:
    its bound is that of the strided (grouped) convolution. A bound of the stride-1 convolution
    (which reads every window) or of all groups as one convolution is sound but up to ``sqrt(3)``
    or 2 times too large, and the layer would apply a contraction."""
    torch.manual_seed(0)
    conv = GramConv1d(4, 4, 3, padding=1, **setting).double()
    assert 0.95 <= _applied_norm(conv, (4, 9)) <= 1 + 1e-9


def test_an_asymmetric_same_padding_in_a_non_zero_mode_runs_and_is_1_lipschitz():
    """``padding='same'`` with an even kernel pads one sample more on the right than on the left.
    With a circular padding mode the layer checks, at each bound, that this padding is still the
    one ``nn.Conv1d`` fixed at construction: an unchanged layer passes, and applies an operator of
    norm at most 1 (a circular convolution's bound is exact: norm 1)."""
    torch.manual_seed(0)
    conv = GramConv1d(2, 2, 4, padding="same", padding_mode="circular").double()
    assert _applied_norm(conv, (2, 8)) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("setting", [dict(stride=0), dict(padding=-1), dict(dilation=0)])
def test_geometry_that_nn_conv1d_accepts_until_its_first_batch_is_refused_at_construction(setting):
    """``nn.Conv1d`` stores a zero stride, a negative padding or a zero dilation and fails only at
    the first forward; the Gram layer, whose bound needs a valid geometry, says so when it is built."""
    nn.Conv1d(2, 2, 3, **setting)
    with pytest.raises(ValueError, match=next(iter(setting))):
        GramConv1d(2, 2, 3, **setting)

