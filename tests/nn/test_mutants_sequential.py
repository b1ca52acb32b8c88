"""Mutation-testing gaps of lipnet.nn.sequential: a stack of Gram layers must check and normalize
each layer as that layer alone would, whichever layers opted out of the finiteness check."""

import pytest
import torch

from lipnet.nn import GramResidualConv2d, stacked_normalized_weights


def test_a_diverged_layer_after_one_that_opted_out_of_the_check_is_named():
    """The first layer of the stack opted out of the finiteness check (``check_finite = False``),
    the third has a NaN weight: the stack checks the layers that opted in, and must report the
    third (the one whose bound is NaN), not the one at the same position among the checked."""
    convs = [GramResidualConv2d(4, 3) for _ in range(3)]
    convs[0].check_finite = False
    with torch.no_grad():
        convs[2].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="the weight contains NaN"):
        stacked_normalized_weights(convs, (6, 6))
