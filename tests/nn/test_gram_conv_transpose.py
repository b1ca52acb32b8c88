"""GramConvTranspose2d: a drop-in nn.ConvTranspose2d whose applied weight is 1-Lipschitz for the
output size of each forward, checked against the exact norm of the dense operator."""

import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lipnet.bounds import exact_conv_transpose2d_spectral_norm
from lipnet.certify import lipschitz_bound
from lipnet.nn import GramConvTranspose2d, GramSequential, MaxMin


def geometry(layer):
    return dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups)


def random_layer(rng):
    groups = rng.choice([1, 1, 2])
    stride, dilation = (rng.randint(1, 3), rng.randint(1, 3)), (rng.choice([1, 1, 2]), rng.choice([1, 1, 2]))
    return GramConvTranspose2d(
        groups * rng.randint(1, 3), groups * rng.randint(1, 3), (rng.randint(1, 4), rng.randint(1, 4)), stride=stride,
        padding=(rng.randint(0, 2), rng.randint(0, 2)), groups=groups, dilation=dilation,
        output_padding=tuple(rng.randrange(max(s, d)) for s, d in zip(stride, dilation)), dtype=torch.float64)


@pytest.mark.parametrize("seed", range(6))
def test_the_applied_weight_is_1_lipschitz_on_each_input_size(seed):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    tested = 0
    while tested < 6:
        layer = random_layer(rng)
        n = (rng.randint(1, 6), rng.randint(1, 6))
        x = torch.randn(2, layer.in_channels, *n, dtype=torch.float64)
        try:
            y = layer(x)
        except ValueError:  # an input too small for an output
            continue
        weight = layer.normalized_weight(n).detach()
        torch.testing.assert_close(y, F.conv_transpose2d(x, weight, layer.bias, output_padding=layer.output_padding,
                                                         **geometry(layer)))
        exact = exact_conv_transpose2d_spectral_norm(weight, n, output_padding=layer.output_padding, **geometry(layer))
        assert exact <= 1 + 1e-12
        assert layer.lipschitz_bound(n) >= exact
        tested += 1


def test_an_upsampling_layer_is_nearly_an_isometry_at_its_top():
    """2x upsampling (kernel 4, stride 2, padding 1) on 16 x 16: the applied weight's norm is
    within a few per cent of 1 (the zero-padding embedding's slack), never above."""
    torch.manual_seed(0)
    layer = GramConvTranspose2d(4, 3, 4, stride=2, padding=1, dtype=torch.float64)
    weight = layer.normalized_weight((16, 16)).detach()
    exact = exact_conv_transpose2d_spectral_norm(weight, 16, stride=2, padding=1)
    assert 0.95 <= exact <= 1 + 1e-12


def test_forward_with_an_output_size_normalizes_for_that_output():
    torch.manual_seed(1)
    layer = GramConvTranspose2d(3, 2, 3, stride=2, padding=1, dtype=torch.float64)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    y = layer(x, output_size=[10, 9])
    assert y.shape == (2, 2, 10, 9)
    weight = layer.normalized_weight().detach()  # the last forward's
    exact = exact_conv_transpose2d_spectral_norm(weight, 5, stride=2, padding=1, output_padding=(1, 0))
    assert exact <= 1 + 1e-12
    torch.testing.assert_close(y, F.conv_transpose2d(x, weight, layer.bias, 2, 1, (1, 0)))
    assert layer.lipschitz_bound() >= exact
    # an explicit input size uses the layer's own output padding (0): the 9 x 9 output
    assert layer(x).shape == (2, 2, 9, 9)
    assert not torch.equal(layer.normalized_weight((5, 5)), weight)


def test_it_is_a_drop_in_for_nn_conv_transpose2d():
    plain = nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2, dilation=1)
    layer = GramConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2, dilation=1)
    assert isinstance(layer, nn.ConvTranspose2d)
    assert layer.state_dict().keys() == plain.state_dict().keys()
    layer.load_state_dict(plain.state_dict())
    x = torch.randn(2, 4, 6, 6)
    y = layer(x)
    bound = layer.weight_norm_bound((6, 6))
    torch.testing.assert_close(y, F.conv_transpose2d(x, plain.weight / bound, plain.bias, 2, 1, 1, 2))
    assert y.shape == plain(x).shape
    assert layer(x[0]).shape == plain(x[0]).shape  # unbatched
    assert "output_padding=(1, 1)" in repr(layer) and "n_iter=" in repr(layer)


def test_the_gradient_flows_through_the_bound():
    torch.manual_seed(2)
    layer = GramConvTranspose2d(2, 2, 3, stride=2, dtype=torch.float64)
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64)
    torch.autograd.gradcheck(lambda w: F.conv_transpose2d(x, w / layer._operator_norm(w, (4, 4), 12, True), None, 2),
                             (layer.weight.detach().requires_grad_(),))
    layer(x).square().sum().backward()
    assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()


def test_a_network_of_them_is_certified_above_its_jacobian_norm():
    torch.manual_seed(3)
    net = nn.Sequential(GramConvTranspose2d(2, 4, 4, stride=2, padding=1), MaxMin(),
                        GramConvTranspose2d(4, 2, 3, padding=1, dilation=2, output_padding=1, stride=2)).double()
    bound = lipschitz_bound(net, (2, 3, 3))
    x = torch.randn(2, 3, 3, dtype=torch.float64)
    jacobian = torch.autograd.functional.jacobian(lambda v: net(v[None])[0], x).reshape(-1, x.numel())
    assert float(torch.linalg.matrix_norm(jacobian, 2)) <= bound <= 1 + 1e-5


def test_stacked_bounds_in_gram_sequential_give_the_layers_own_output():
    torch.manual_seed(4)
    layers = [GramConvTranspose2d(4, 4, 3, stride=1, padding=1) for _ in range(3)]
    stacked = GramSequential(*layers, stack_bounds=True).train()
    x = torch.randn(2, 4, 6, 6)
    torch.testing.assert_close(stacked(x), nn.Sequential(*layers)(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kw, match", [
    (dict(padding="same"), "no 'same'"),
    (dict(stride=2, output_padding=2), "output_padding 2"),
    (dict(padding_mode="reflect"), "zeros"),
])
def test_settings_it_cannot_apply_are_refused_at_construction(kw, match):
    with pytest.raises(ValueError, match=match):
        GramConvTranspose2d(2, 2, 3, **kw)


def test_a_padding_mode_set_after_construction_is_refused():
    layer = GramConvTranspose2d(2, 2, 3)
    layer.padding_mode = "circular"
    with pytest.raises(ValueError, match="'zeros' only"):
        layer(torch.randn(1, 2, 4, 4))


def test_an_input_without_output_is_refused_with_the_reason():
    layer = GramConvTranspose2d(2, 2, 3, padding=2)  # crops 4 of the 3 + n - 1 output samples
    with pytest.raises(ValueError, match="output of size 0"):
        layer(torch.randn(1, 2, 2, 2))


def test_the_bound_needs_a_size_before_the_first_forward():
    with pytest.raises(ValueError, match="input_size"):
        GramConvTranspose2d(2, 2, 3).lipschitz_bound()


def test_a_subclass_that_bounds_another_size_than_it_applies_is_refused_by_certify():
    """``_input_size`` says which output size the bound is for; a subclass that overrides it (here to a
    smaller size, whose norm is lower) would be certified ~1 while it applies more than 1."""
    from lipnet.certify import LipschitzBoundError
    from lipnet.nn.gram_conv_transpose import OutputSize

    class Smaller(GramConvTranspose2d):
        def _input_size(self, input_size):
            return OutputSize(1, 1)  # where only the centre tap acts

    layer = Smaller(2, 2, 3, padding=1, bias=False, dtype=torch.float64)
    nn.init.ones_(layer.weight)  # a low-pass kernel: its norm grows with the input size
    x = torch.randn(2, 8, 8, dtype=torch.float64)
    jacobian = torch.autograd.functional.jacobian(lambda v: layer(v[None])[0], x).reshape(-1, x.numel())
    assert float(torch.linalg.matrix_norm(jacobian, 2)) > 1.5  # what it applies on 8 x 8
    with pytest.raises(LipschitzBoundError, match="_input_size"):
        lipschitz_bound(nn.Sequential(layer), (2, 8, 8))


def test_an_output_padding_set_as_an_int_after_construction_works_as_in_torch():
    """``nn.ConvTranspose2d`` reads ``output_padding = 1`` as ``(1, 1)`` (its ``_output_padding``
    returns ``(1,)``, which ``F.conv_transpose2d`` expands)."""
    torch.manual_seed(5)
    plain = nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1)
    layer = GramConvTranspose2d(2, 3, 3, stride=2, padding=1)
    layer.load_state_dict(plain.state_dict())
    plain.output_padding = layer.output_padding = 1
    x = torch.randn(2, 2, 5, 5)
    y = layer(x)
    assert y.shape == plain(x).shape == (2, 3, 10, 10)
    weight = layer.normalized_weight((5, 5)).detach()
    torch.testing.assert_close(y, F.conv_transpose2d(x, weight, layer.bias, 2, 1, 1))
    assert exact_conv_transpose2d_spectral_norm(weight.double(), 5, stride=2, padding=1, output_padding=1) <= 1 + 1e-6
    assert layer.lipschitz_bound((5, 5)) >= 1 - 1e-3


def test_an_int_stride_set_after_construction_is_bounded_as_torch_applies_it():
    """``layer.stride = 2`` runs in torch; the certificate once crashed on ``self.stride[0]``."""
    torch.manual_seed(0)
    layer = GramConvTranspose2d(2, 3, 3, stride=(1, 1), padding=(1, 1), dtype=torch.float64)
    layer.stride = 2
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    y = layer(x)
    weight = layer.normalized_weight((5, 5)).detach()
    torch.testing.assert_close(y, F.conv_transpose2d(x, weight, layer.bias, 2, 1))
    exact = exact_conv_transpose2d_spectral_norm(weight, (5, 5), stride=2, padding=1)
    assert exact <= 1 + 1e-9
    assert lipschitz_bound(nn.Sequential(layer), (2, 5, 5)) >= exact
