"""Red-team audit: what users do to torch layers after construction, done to the Gram layers.

Settings changed after construction (in train mode and in eval mode after the cache was filled),
weights replaced, tied or parametrized, copies mutated, inputs of unusual sizes. For each the
layer either refuses with an error naming the problem, or the operator its forward applies
(the dense matrix of its impulse responses in float64, minus the bias) has norm <= 1 (1 + 1e-5)
and ``lipnet.certify.lipschitz_bound`` is at least that norm.
"""

import copy
import pickle

import pytest
import torch
import torch.nn.utils.parametrize as parametrize
from torch import nn
from torch.func import functional_call
from torch.nn.utils import parametrizations

from lipnet.bounds import affine_map_matrix
from lipnet.certify import lipschitz_bound
from lipnet.nn import (
    ConvexResidual,
    GramConv1d,
    GramConv2d,
    GramConvTranspose2d,
    GramLinear,
    GramResidualConv2d,
    GramSequential,
    stacked_normalized_weights,
)

F64 = torch.float64
SLACK = 1 + 1e-5


def dense_norm(apply, shape) -> float:
    """The spectral norm of the linear part of ``apply`` on inputs of ``shape`` (no batch), from
    its impulse responses in float64."""
    with torch.no_grad():
        return float(torch.linalg.matrix_norm(affine_map_matrix(apply, shape), 2))


def assert_sound(layer, shape):
    """The operator ``layer`` applies on ``shape`` is 1-Lipschitz and its certificate covers it."""
    applied = dense_norm(layer, shape)
    assert 0.05 < applied <= SLACK, applied
    assert lipschitz_bound(layer, shape) >= applied


def cached(layer, shape):
    """``layer`` in eval mode with its eval cache filled for inputs of ``shape``."""
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(1, *shape, dtype=F64))
    assert layer._eval_cache
    return layer


def in_mode(layer, shape, mode):
    return cached(layer, shape) if mode == "eval" else layer.train()


MODES = ["train", "eval"]


# ----------------------------------------------------------------------------- findings (fixed)

def test_a_stacked_layer_whose_padding_was_changed_is_not_bounded_as_its_neighbour():
    # A circular-padded layer built with padding 2, then given padding 1, still pads by 2 (nn.Conv2d
    # fixes that at construction); alone it is refused, but its stack key equalled that of a layer
    # built with padding 1, so GramSequential bounded it with that layer's geometry: applied 1.539
    # in training, certified nowhere.
    torch.manual_seed(1)
    built_with_one = GramConv2d(2, 2, 3, padding=1, padding_mode="circular", dtype=F64)
    changed = GramConv2d(2, 2, 3, padding=2, padding_mode="circular", dtype=F64)
    changed.padding = (1, 1)
    assert built_with_one.stack_key() != changed.stack_key()
    with pytest.raises(ValueError, match="same stack_key|share one stack_key"):
        stacked_normalized_weights([built_with_one, changed], (5, 5))
    net = GramSequential(built_with_one, changed, stack_bounds=True).train()
    with pytest.raises(ValueError, match="padding was changed"):
        net(torch.randn(1, 2, 5, 5, dtype=F64))


def test_a_mixing_weight_per_channel_is_refused():
    # One alpha per channel mixes coordinates differently: with alpha near 0 and 1 on two channels
    # that the branch swaps, the block applied an operator of norm 1.4107.
    branch = GramConv2d(2, 2, 1, bias=False, dtype=F64)
    with torch.no_grad():
        branch.weight.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=F64).view(2, 2, 1, 1))
    block = ConvexResidual(branch).eval()
    block.alpha_logit = nn.Parameter(torch.tensor([-6.0, 6.0], dtype=F64).view(2, 1, 1))
    with pytest.raises(ValueError, match="one number"):
        block(torch.randn(1, 2, 3, 3, dtype=F64))
    with pytest.raises(ValueError, match="one number"):
        lipschitz_bound(block, (2, 3, 3))
    block.alpha_logit = nn.Parameter(torch.tensor([0.3], dtype=F64))  # one number in a 1-element tensor: fine
    assert_sound(block, (2, 3, 3))


@pytest.mark.parametrize("mode", MODES)
def test_a_one_element_output_padding_set_after_construction_is_certified_as_applied(mode):
    # The forward expands (1,) to both axes as torch does; the certificate refused it.
    torch.manual_seed(2)
    layer = in_mode(GramConvTranspose2d(2, 3, 4, stride=2, padding=1, dtype=F64), (2, 4, 4), mode)
    layer.output_padding = (1,)
    assert layer(torch.zeros(1, 2, 4, 4, dtype=F64)).shape[-2:] == (9, 9)
    assert_sound(layer, (2, 4, 4))


# ----------------------------------------------------------------------------- settings changed

CONV2D_CHANGES = [("padding", 0), ("padding", 2), ("padding", (0, 2)), ("padding", "same"), ("padding", "valid"),
                  ("stride", 2), ("stride", (1, 2)), ("dilation", 2), ("padding_mode", "circular"),
                  ("padding_mode", "reflect"), ("padding_mode", "replicate"), ("n_iter", 1), ("screen_iter", 0)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name, value", CONV2D_CHANGES)
def test_conv2d_settings_changed_after_construction(name, value, mode):
    torch.manual_seed(3)
    layer = in_mode(GramConv2d(2, 3, 3, padding=1, dtype=F64), (2, 5, 5), mode)
    setattr(layer, name, value)
    assert_sound(layer, (2, 5, 5))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name, value, error", [
    ("padding", -1, "padding must be"), ("padding", 1.5, "int or a pair"), ("stride", 0, "stride must be"),
    ("stride", 2.0, "int or a pair"), ("dilation", -1, "dilation must be"), ("padding_mode", "bogus", "padding_mode"),
    ("n_iter", -1, "n_iter"), ("n_iter", 1.5, "n_iter"), ("screen_iter", -1, "screen_iter"),
    ("groups", 2, "describe"), ("kernel_size", (5, 5), "describe"), ("in_channels", 4, "describe"),
    ("groups", 0, "groups must be"), ("groups", True, "groups must be"), ("groups", 1.0, "groups must be"),
    ("kernel_size", 3, "kernel_size must be"), ("kernel_size", (3,), "kernel_size must be"),
])
def test_conv2d_bad_settings_after_construction_are_refused(name, value, error, mode):
    layer = in_mode(GramConv2d(2, 3, 3, padding=1, dtype=F64), (2, 5, 5), mode)
    setattr(layer, name, value)
    with pytest.raises((ValueError, TypeError), match=error):
        layer(torch.randn(1, 2, 5, 5, dtype=F64))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("padding_mode, error", [("zeros", None), ("circular", "padding was changed")])
def test_same_padding_set_on_an_even_kernel(padding_mode, error, mode):
    torch.manual_seed(4)
    layer = in_mode(GramConv2d(2, 3, (2, 4), padding=1, padding_mode=padding_mode, dtype=F64), (2, 5, 6), mode)
    layer.padding = "same"
    if error is None:
        assert_sound(layer, (2, 5, 6))
    else:
        with pytest.raises(ValueError, match=error):
            layer(torch.randn(1, 2, 5, 6, dtype=F64))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name, value", [("padding", "same"), ("padding", 3), ("stride", (2,)), ("dilation", 2),
                                         ("padding_mode", "circular"), ("padding_mode", "reflect")])
def test_conv1d_settings_changed_after_construction(name, value, mode):
    torch.manual_seed(5)
    layer = in_mode(GramConv1d(2, 3, 4, padding=1, dtype=F64), (2, 9), mode)
    setattr(layer, name, value)
    assert_sound(layer, (2, 9))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name, value", [("output_padding", 1), ("output_padding", (1, 0)), ("stride", 3),
                                         ("stride", 1), ("padding", 2), ("dilation", 2)])
def test_conv_transpose2d_settings_changed_after_construction(name, value, mode):
    torch.manual_seed(6)
    layer = in_mode(GramConvTranspose2d(2, 3, 4, stride=2, padding=1, dtype=F64), (2, 4, 4), mode)
    setattr(layer, name, value)
    assert_sound(layer, (2, 4, 4))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name, value, error", [("padding", "same", "int or a pair"),
                                                ("padding_mode", "circular", "'zeros' only"),
                                                ("output_padding", 2, "smaller than the stride"),
                                                ("kernel_size", (3, 3), "describe"),
                                                ("groups", 0, "groups must be"),
                                                ("kernel_size", 4, "kernel_size must be")])
def test_conv_transpose2d_bad_settings_are_refused(name, value, error, mode):
    layer = in_mode(GramConvTranspose2d(2, 3, 4, stride=2, padding=1, dtype=F64), (2, 4, 4), mode)
    setattr(layer, name, value)
    with pytest.raises(ValueError, match=error):
        layer(torch.randn(1, 2, 4, 4, dtype=F64))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name, value", [("padding", (0, 0)), ("padding", (2, 2)), ("dilation", (2, 2)),
                                         ("padding_mode", "circular")])
def test_residual_settings_changed_after_construction(name, value, mode):
    # No longer x + conv(x) then, but the operator applied is the one bounded.
    torch.manual_seed(7)
    layer = in_mode(GramResidualConv2d(2, 3, dtype=F64), (2, 5, 5), mode)
    setattr(layer, name, value)
    assert_sound(layer, (2, 5, 5))


def test_a_strided_residual_is_refused():
    layer = cached(GramResidualConv2d(2, 3, dtype=F64), (2, 5, 5))
    layer.stride = (2, 2)
    with pytest.raises(ValueError, match="strided"):
        layer(torch.randn(1, 2, 5, 5, dtype=F64))


@pytest.mark.parametrize("mode", MODES)
def test_new_groups_or_kernel_with_a_matching_weight(mode):
    torch.manual_seed(8)
    grouped = in_mode(GramConv2d(4, 4, 3, padding=1, dtype=F64), (4, 5, 5), mode)
    grouped.groups = 2
    grouped.weight = nn.Parameter(3 * torch.randn(4, 2, 3, 3, dtype=F64))
    assert_sound(grouped, (4, 5, 5))
    wider = in_mode(GramConv2d(2, 3, 3, padding=1, dtype=F64), (2, 5, 5), mode)
    wider.kernel_size = (5, 5)
    wider.weight = nn.Parameter(3 * torch.randn(3, 2, 5, 5, dtype=F64))
    assert_sound(wider, (2, 5, 5))
    linear = in_mode(GramLinear(5, 4, dtype=F64), (5,), mode)
    linear.in_features = 7
    linear.weight = nn.Parameter(torch.randn(4, 7, dtype=F64))
    assert_sound(linear, (7,))


# ----------------------------------------------------------------------------- weights replaced

def _weight(kind):
    if kind == "transposed_view":
        return torch.randn(2, 3, 3, 3, dtype=F64).transpose(0, 1)
    if kind == "channels_last":
        return torch.randn(3, 2, 3, 3, dtype=F64).to(memory_format=torch.channels_last)
    if kind == "expanded":
        return torch.randn(1, 1, 3, 3, dtype=F64).expand(3, 2, 3, 3)
    return torch.randn(3, 2, 1, 3, dtype=F64).expand(3, 2, 3, 3)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["transposed_view", "channels_last", "expanded", "zero_stride_rows"])
def test_weights_of_unusual_layout(kind, mode):
    torch.manual_seed(9)
    layer = in_mode(GramConv2d(2, 3, 3, padding=1, dtype=F64), (2, 5, 5), mode)
    layer.weight = nn.Parameter(10 * _weight(kind))
    assert_sound(layer, (2, 5, 5))


@pytest.mark.parametrize("tie", ["same_parameter", "view", "parameter_of_detached", "parameter_of_data"])
def test_tied_weights_changed_through_the_other_layer(tie):
    # Edits through the other layer are either seen or leave the previous normalized weight in
    # place; either way what is applied is a normalized weight, and the certificate is of it.
    torch.manual_seed(10)
    first, second = GramConv2d(3, 3, 3, padding=1, dtype=F64), GramConv2d(3, 3, 3, padding=1, dtype=F64)
    if tie == "same_parameter":
        second.weight = first.weight
    elif tie == "view":
        del second.weight
        second.weight = first.weight.view(3, 3, 3, 3)
    elif tie == "parameter_of_detached":
        second.weight = nn.Parameter(first.weight.detach())
    else:
        second.weight = nn.Parameter(first.weight.data)
    cached(first, (3, 5, 5))
    cached(second, (3, 5, 5))
    with torch.no_grad():
        first.weight.mul_(5)
        first.weight[0].add_(10 * torch.randn(3, 3, 3, dtype=F64))
    assert_sound(second, (3, 5, 5))
    assert_sound(first, (3, 5, 5))


def test_a_transposed_convolution_tied_to_a_convolution():
    torch.manual_seed(11)
    encoder = GramConv2d(3, 2, 4, stride=2, padding=1, dtype=F64)
    decoder = GramConvTranspose2d(2, 3, 4, stride=2, padding=1, dtype=F64)
    decoder.weight = encoder.weight
    cached(encoder, (3, 8, 8))
    cached(decoder, (2, 4, 4))
    with torch.no_grad():
        encoder.weight.mul_(7)
    assert_sound(decoder, (2, 4, 4))


class Scale(nn.Module):
    def __init__(self, factor):
        super().__init__()
        self.factor = factor

    def forward(self, weight):
        return weight * self.factor


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("how", ["scale", "spectral_norm", "weight_norm"])
def test_parametrizations_of_the_weight(how, mode):
    torch.manual_seed(12)
    layer = in_mode(GramConv2d(2, 3, 3, padding=1, dtype=F64), (2, 5, 5), mode)
    if how == "scale":
        scale = Scale(10.0)
        parametrize.register_parametrization(layer, "weight", scale)
    else:
        getattr(parametrizations, how)(layer)
    assert_sound(layer, (2, 5, 5))
    with parametrize.cached():
        assert_sound(layer, (2, 5, 5))
    if how == "scale":
        scale.factor = 100.0  # the parametrization changed: a new weight tensor at every access
        assert_sound(layer, (2, 5, 5))


def test_functional_call_with_a_larger_weight_is_normalized_and_another_shape_refused():
    torch.manual_seed(13)
    layer = cached(GramConv2d(2, 3, 3, padding=1, dtype=F64), (2, 5, 5))
    weight = 50 * torch.randn(3, 2, 3, 3, dtype=F64)
    applied = dense_norm(lambda x: functional_call(layer, {"weight": weight}, (x,)), (2, 5, 5))
    assert 0.05 < applied <= SLACK
    with pytest.raises(ValueError, match="describe"):
        functional_call(layer, {"weight": torch.randn(3, 2, 5, 5, dtype=F64)}, (torch.randn(1, 2, 5, 5, dtype=F64),))


def test_copies_mutated_after_an_eval_forward():
    torch.manual_seed(14)
    original = cached(GramConv2d(2, 3, 3, padding=1, dtype=F64), (2, 5, 5))
    deep = copy.deepcopy(original)
    deep.padding, deep.stride = (3, 3), (2, 2)
    with torch.no_grad():
        deep.weight.mul_(9)
    assert_sound(deep, (2, 5, 5))
    pickled = pickle.loads(pickle.dumps(original))
    pickled.dilation = (2, 2)
    assert_sound(pickled, (2, 5, 5))
    assert_sound(original, (2, 5, 5))


def test_fused_batch_norm_is_still_normalized():
    # fuse_conv_bn_eval deep-copies the Gram layer and scales its weight: the copy normalizes it
    # again (the batch norm's scale is lost, the layer stays 1-Lipschitz).
    torch.manual_seed(15)
    conv = GramConv2d(2, 3, 3, padding=1, dtype=F64).eval()
    norm = nn.BatchNorm2d(3, dtype=F64).eval()
    norm.running_var.fill_(1e-3)
    fused = torch.nn.utils.fusion.fuse_conv_bn_eval(conv, norm)
    assert isinstance(fused, GramConv2d)
    assert_sound(fused, (2, 5, 5))


def test_reset_parameters_and_inference_mode_edits_after_caching():
    torch.manual_seed(16)
    layer = cached(GramConv2d(2, 3, 3, padding=1, dtype=F64), (2, 5, 5))
    layer.reset_parameters()
    assert_sound(layer, (2, 5, 5))
    layer.requires_grad_(False)
    with torch.inference_mode():
        layer(torch.randn(1, 2, 5, 5, dtype=F64))
        layer.weight.mul_(7)
        layer.weight[0].add_(3)
        applied = dense_norm(layer, (2, 5, 5))
    assert applied <= SLACK
    assert_sound(layer, (2, 5, 5))


def test_a_state_dict_of_another_shape_is_refused_even_when_not_strict():
    layer = cached(GramConv2d(2, 3, 3, padding=1, dtype=F64), (2, 5, 5))
    with pytest.raises(RuntimeError, match="size mismatch"):
        layer.load_state_dict(nn.Conv2d(2, 3, 5, dtype=F64).state_dict(), strict=False)


# ----------------------------------------------------------------------------- inputs

@pytest.mark.parametrize("make, cached_shape, shape", [
    (lambda: GramConv2d(2, 3, 3, padding=1, dtype=F64), (2, 8, 8), (2, 1, 1)),
    (lambda: GramConv2d(2, 3, 3, padding=1, dtype=F64), (2, 8, 8), (2, 2, 3)),
    (lambda: GramConv2d(2, 3, 5, dtype=F64), (2, 8, 8), (2, 5, 6)),
    (lambda: GramConv2d(2, 3, 5, padding=2, padding_mode="circular", dtype=F64), (2, 8, 8), (2, 2, 3)),
    (lambda: GramConv2d(2, 3, 3, padding=1, padding_mode="reflect", dtype=F64), (2, 8, 8), (2, 2, 2)),
    (lambda: GramConv2d(2, 3, 3, padding=1, padding_mode="replicate", dtype=F64), (2, 8, 8), (2, 1, 1)),
    (lambda: GramConv1d(2, 3, 5, padding=2, padding_mode="circular", dtype=F64), (2, 8), (2, 3)),
    (lambda: GramConvTranspose2d(2, 3, 4, stride=2, padding=1, dtype=F64), (2, 6, 6), (2, 1, 1)),
    (lambda: GramResidualConv2d(2, 3, dtype=F64), (2, 8, 8), (2, 1, 1)),
    (lambda: GramResidualConv2d(2, 3, padding_mode="circular", dtype=F64), (2, 8, 8), (2, 2, 2)),
])
def test_inputs_of_another_size_than_the_cached_one(make, cached_shape, shape):
    torch.manual_seed(17)
    assert_sound(cached(make(), cached_shape), shape)


@pytest.mark.parametrize("make, shape, error", [
    (lambda: GramConv2d(2, 3, 5, padding=2, padding_mode="circular", dtype=F64), (2, 1, 1), "wraps around"),
    (lambda: GramConv2d(2, 3, 3, stride=2, padding=1, dilation=2, dtype=F64), (2, 3, 2), "too small"),
])
def test_inputs_too_small_for_the_geometry_are_refused(make, shape, error):
    layer = cached(make(), (2, 8, 8))
    with pytest.raises(ValueError, match=error):
        layer(torch.randn(1, *shape, dtype=F64))


@pytest.mark.parametrize("mode", MODES)
def test_unbatched_empty_and_channels_last_inputs(mode):
    torch.manual_seed(18)
    layer = in_mode(GramConv2d(2, 3, 3, padding=1, dtype=F64), (2, 5, 5), mode)
    x = torch.randn(4, 2, 5, 5, dtype=F64)
    with torch.no_grad():
        batched = layer(x)
        torch.testing.assert_close(layer(x[0]), batched[0])
        torch.testing.assert_close(layer(x.to(memory_format=torch.channels_last)), batched)
        assert layer(x[:0]).shape == (0, 3, 5, 5)
    assert_sound(layer, (2, 5, 5))
    assert_sound(layer.to(memory_format=torch.channels_last), (2, 5, 5))


def test_a_bad_kernel_size_in_a_stacked_sequential_is_named():
    # The stacked path read len(kernel_size) of its first layer for the spatial size: TypeError "object of type
    # 'int' has no len()" instead of the layer's own refusal.
    convs = [GramConv2d(2, 2, 3, padding=1, dtype=F64) for _ in range(2)]
    convs[0].kernel_size = 3
    with pytest.raises(ValueError, match="kernel_size must be"):
        GramSequential(*convs, stack_bounds=True).train()(torch.randn(1, 2, 5, 5, dtype=F64))
