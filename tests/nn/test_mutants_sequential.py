"""Mutation-testing gaps of lipnet.nn.sequential: a stack of Gram layers must check and normalize
each layer as that layer alone would, whichever layers opted out of the finiteness check."""

import pytest
import torch

from torch import nn

from lipnet.nn import GramResidualConv2d, GramSequential, stacked_normalized_weights


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


def test_a_child_with_a_forward_pre_hook_runs_itself():
    """A forward pre-hook may replace the child's input: a stacked call (``_forward_normalized``
    with a weight bounded with the others) would skip it. The hooked child runs as a module, so
    the hook sees, and here doubles, its input, and the network's output is the plain one's."""
    torch.manual_seed(0)
    layers = [GramResidualConv2d(4, 3).double() for _ in range(3)]
    plain = nn.Sequential(*layers)
    stacked = GramSequential(*layers, stack_bounds=True)
    calls = []
    layers[1].register_forward_pre_hook(lambda module, args: calls.append(1) or (2 * args[0],))
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    out = stacked(x)
    assert len(calls) == 1
    torch.testing.assert_close(out, plain(x), rtol=1e-12, atol=1e-14)
