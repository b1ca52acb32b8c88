"""A Gram layer's bound reads its settings (kernel size, channels) besides its weight: a
weight of another shape than they describe is refused, not bounded as another operator."""

import pytest
import torch
from torch import nn

from lipnet.bounds.reference import exact_conv_transpose2d_spectral_norm
from lipnet.certify import lipschitz_bound
from lipnet.nn import GramConv1d, GramConv2d, GramConvTranspose2d, GramLinear, GramResidualConv2d, GramSequential


def test_a_transposed_convolution_given_a_larger_kernel_is_refused_not_under_bounded():
    # found by the soundness audit: certified 1.000001 while the applied operator has norm 1.32
    torch.manual_seed(0)
    layer = GramConvTranspose2d(2, 2, 2, stride=3, padding=2, bias=False, dtype=torch.float64)
    layer.weight = nn.Parameter(torch.randn(2, 2, 5, 5, dtype=torch.float64))
    layer.eval()
    with pytest.raises(ValueError, match=r"shape \(2, 2, 5, 5\).*describe \(2, 2, 2, 2\)"):
        lipschitz_bound(layer, (2, 3, 2))
    with pytest.raises(ValueError, match="describe"):
        layer(torch.randn(1, 2, 3, 2, dtype=torch.float64))
    layer.kernel_size = (5, 5)  # settings that describe the weight again: bounded, and soundly
    normalized = layer.normalized_weight((3, 2))
    exact = exact_conv_transpose2d_spectral_norm(normalized, (3, 2), stride=3, padding=2)
    assert lipschitz_bound(layer, (2, 3, 2)) >= exact


@pytest.mark.parametrize("make, weight_shape", [
    (lambda: GramConv2d(4, 6, 3, padding=1), (6, 4, 5, 5)),
    (lambda: GramConv2d(4, 6, 3, padding=1, groups=2), (6, 4, 3, 3)),
    (lambda: GramConv1d(4, 6, 3, padding=1), (6, 4, 5)),
    (lambda: GramLinear(4, 6), (6, 5)),
    (lambda: GramResidualConv2d(4, 3), (4, 4, 5, 5)),
])
def test_every_gram_layer_refuses_a_weight_its_settings_do_not_describe(make, weight_shape):
    layer = make()
    layer.weight = nn.Parameter(torch.randn(weight_shape))
    with pytest.raises(ValueError, match="describe"):
        layer.weight_norm_bound((8, 8) if layer.weight.dim() == 4 else (8,) if layer.weight.dim() == 3 else None)
    layer.eval()
    x = torch.randn(2, *((weight_shape[1] * getattr(layer, "groups", 1), 8, 8) if len(weight_shape) == 4
                         else (weight_shape[1], 8) if len(weight_shape) == 3 else (weight_shape[1],)))
    with pytest.raises(ValueError, match="describe"):
        layer(x)


def test_a_setting_changed_after_an_evaluation_is_not_served_from_the_cache():
    layer = GramConv2d(4, 4, 3, padding=1).eval()
    x = torch.randn(1, 4, 8, 8)
    layer(x)  # cached
    layer.out_channels = 8  # the rounding margins read the channel counts
    with pytest.raises(ValueError, match="describe"):
        layer(x)


def test_stacked_layers_check_each_weight():
    convs = [GramConv2d(4, 4, 3, padding=1) for _ in range(2)]
    for conv in convs:
        conv.kernel_size = (5, 5)  # the weights stay 3 x 3
    with pytest.raises(ValueError, match="describe"):
        GramSequential(*convs)(torch.randn(1, 4, 8, 8))
