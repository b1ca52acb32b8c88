"""``GramConv2d`` bounds the convolution it applies: every geometry argument reaches the bound.

The layer's bound must be :func:`lipnet.bounds.conv2d_spectral_norm` called with the layer's
own stride, padding, dilation, groups and padding mode; a layer that forgot one would
normalize by the norm of another operator, and certify that other operator too. The
soundness tests against the exact norm catch this only where the forgotten argument happens
to change the norm, so the wiring is checked directly, one argument at a time and combined,
and then on geometries where a bound without the dilation fell below the exact norm.
"""

import pytest
import torch

from lipnet import GramConv2d
from lipnet.bounds import conv2d_spectral_norm, exact_conv2d_spectral_norm

DEFAULTS = dict(stride=1, padding=0, dilation=1, groups=1, padding_mode="zeros")
GEOMETRY = tuple(DEFAULTS)

# Each argument away from its default alone, then together (input size 8 x 7).
LAYERS = [
    dict(kernel_size=3),
    dict(kernel_size=3, stride=2),
    dict(kernel_size=3, stride=(1, 3), padding=1),
    dict(kernel_size=3, padding=2),
    dict(kernel_size=(3, 2), padding=(1, 0)),
    dict(kernel_size=(2, 3), padding="same"),
    dict(kernel_size=3, dilation=2, padding=1),
    dict(kernel_size=(2, 2), dilation=(3, 2), padding=(3, 4)),
    dict(kernel_size=3, groups=2),
    dict(kernel_size=3, padding=1, padding_mode="circular"),
    dict(kernel_size=3, padding=2, padding_mode="reflect"),
    dict(kernel_size=3, padding=1, padding_mode="replicate"),
    dict(kernel_size=(2, 3), padding="same", dilation=(1, 2)),
    dict(kernel_size=(2, 3), stride=(2, 1), padding=(1, 2), dilation=(3, 2), groups=2),
    dict(kernel_size=3, stride=2, padding=1, dilation=(2, 3), groups=4, padding_mode="circular"),
    dict(kernel_size=(3, 2), stride=(2, 3), padding=1, dilation=(1, 3), padding_mode="replicate"),
    dict(kernel_size=3, stride=2, padding=1, dilation=(2, 3), groups=2, padding_mode="reflect"),
]


@pytest.mark.parametrize("cfg", LAYERS, ids=lambda cfg: ",".join(f"{k}={v}" for k, v in cfg.items()))
def test_the_bound_is_conv2d_spectral_norm_with_the_layers_geometry(cfg):
    layer = GramConv2d(4, 4, **cfg).double()
    with torch.no_grad():  # signs alternating over the taps move the norm away from the zero frequency,
        # whose symbol (the sum of the taps) no padding or FFT size changes
        k_h, k_w = layer.weight.shape[-2:]
        layer.weight.mul_((-1.0) ** (torch.arange(k_h)[:, None] + torch.arange(k_w)))
    size = (8, 7)
    geometry = {k: v for k, v in cfg.items() if k in GEOMETRY}
    expected = conv2d_spectral_norm(layer.weight, size, n_iter=layer.n_iter, screen_iter=layer.screen_iter,
                                    **geometry)
    assert torch.equal(layer.weight_norm_bound(size), expected)
    # The check can fail: each argument changes the bound here, except the padding and stride of
    # a circular convolution, whose output rows are a subset of one circulant's whatever they are.
    for name, value in geometry.items():
        if geometry.get("padding_mode") == "circular" and name in ("padding", "stride"):
            continue
        other = conv2d_spectral_norm(layer.weight, size, n_iter=layer.n_iter, screen_iter=layer.screen_iter,
                                     **{**geometry, name: DEFAULTS[name]})
        assert not torch.equal(other, expected), f"{name}={value!r} does not change the bound: choose another case"
    # The normalized weight is divided by exactly that bound, so it is 1-Lipschitz on this operator.
    torch.testing.assert_close(layer.normalized_weight(size), layer.weight / expected, rtol=0, atol=0)


# Geometries on which a bound computed without the dilation was below the exact norm of the
# dilated convolution (2 input and 2 output channels).
DILATED = [
    dict(kernel_size=(2, 2), size=(8, 7), stride=3, padding=(3, 4), dilation=(3, 2)),
    dict(kernel_size=(3, 2), size=(8, 9), stride=(1, 3), padding=0, dilation=(1, 3), padding_mode="replicate"),
    dict(kernel_size=(4, 2), size=(7, 9), stride=2, padding=(0, 3), dilation=(1, 2)),
]


@pytest.mark.parametrize("case", DILATED, ids=range(len(DILATED)))
def test_dilated_layers_certify_at_least_the_exact_norm(case):
    cfg = {k: v for k, v in case.items() if k != "size"}
    size = case["size"]
    geometry = {k: v for k, v in cfg.items() if k in GEOMETRY}
    torch.manual_seed(0)
    for _ in range(3):
        layer = GramConv2d(2, 2, bias=False, **cfg).double()
        exact = exact_conv2d_spectral_norm(layer.normalized_weight(size), size, **geometry)
        assert exact <= 1 + 1e-12
        assert layer.lipschitz_bound(size) >= exact
