"""The Gram layers keep the protocol of the torch.nn layers they replace: copies, pickles, ``.to()``,
tracing, constructor arguments and dtypes, with the eval cache and the 1-Lipschitz guarantee intact."""

import copy
import io
import pickle

import pytest
import torch
from torch import nn

from lipnet.bounds import exact_conv1d_spectral_norm, exact_conv2d_spectral_norm, exact_conv_transpose2d_spectral_norm
from lipnet.certify import lipschitz_bound
from lipnet.nn import GramConv1d, GramConv2d, GramConvTranspose2d, GramLinear, InputNormalization

LAYERS = [
    pytest.param(lambda **kw: GramLinear(6, 4, **kw), (3, 6), id="linear"),
    pytest.param(lambda **kw: GramConv2d(2, 3, 3, padding=1, **kw), (2, 2, 6, 6), id="conv2d"),
    pytest.param(lambda **kw: GramConv1d(2, 3, 3, padding=1, **kw), (2, 2, 7), id="conv1d"),
    pytest.param(lambda **kw: GramConvTranspose2d(2, 3, 4, stride=2, padding=1, **kw), (2, 2, 5, 5),
                 id="conv_transpose2d"),
]


def evaluated(make, shape, **kw):
    """A layer in eval mode whose cache holds the normalized weight for ``x``, and ``x``."""
    layer = make(**kw).eval()
    x = torch.randn(shape, dtype=layer.weight.dtype)
    with torch.no_grad():
        layer(x)
    assert layer._eval_cache
    return layer, x


def uncached(layer, x):
    """The output of a copy of ``layer`` built anew with its weights (nothing cached)."""
    fresh = copy.deepcopy(layer)
    fresh._eval_cache.clear()
    with torch.no_grad():
        return fresh.train()(x)


def applied_norm(layer, input_size):
    """The exact operator norm (float64) of the weight ``layer`` applies on inputs of ``input_size``."""
    weight = layer.normalized_weight(input_size).detach().double()
    if isinstance(layer, GramLinear):
        return float(torch.linalg.matrix_norm(weight, 2))
    if isinstance(layer, GramConvTranspose2d):
        return exact_conv_transpose2d_spectral_norm(weight, input_size, stride=layer.stride, padding=layer.padding,
                                                    output_padding=layer.output_padding, dilation=layer.dilation,
                                                    groups=layer.groups)
    geometry = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups,
                    padding_mode=layer.padding_mode)
    if isinstance(layer, GramConv1d):
        return exact_conv1d_spectral_norm(weight, input_size[0], **geometry)
    return exact_conv2d_spectral_norm(weight, input_size, **geometry)


@pytest.mark.parametrize("make, shape", LAYERS)
def test_complex_dtypes_are_refused_at_construction(make, shape):
    with pytest.raises(TypeError, match="complex"):
        make(dtype=torch.complex64)


@pytest.mark.parametrize("make, shape", LAYERS)
def test_conversion_to_a_complex_dtype_is_refused(make, shape):
    with pytest.raises(TypeError, match="complex"):
        make().to(torch.complex64)


@pytest.mark.parametrize("make, shape", LAYERS)
def test_a_complex_weight_written_into_the_layer_is_refused_by_the_forward(make, shape):
    layer = make()
    layer.weight.data = torch.complex(layer.weight.data, torch.randn_like(layer.weight.data))
    x = torch.randn(shape, dtype=torch.complex64)
    for mode in (layer.train, layer.eval):
        mode()
        with pytest.raises(TypeError, match="complex"):
            layer(x)


@pytest.mark.parametrize("make, shape, name, value", [
    pytest.param(LAYERS[1].values[0], (2, 2, 5, 5), name, value, id=f"conv2d-{name}-{value}")
    for name, value in [("padding", 3), ("padding", 0), ("stride", 2), ("dilation", 3)]
] + [
    pytest.param(LAYERS[2].values[0], (2, 2, 5), name, value, id=f"conv1d-{name}-{value}")
    for name, value in [("stride", 2), ("dilation", 3)]
])
def test_geometry_changed_after_an_eval_forward_is_seen(make, shape, name, value):
    layer, x = evaluated(make, shape)
    setattr(layer, name, (value,) * len(layer.kernel_size))
    with torch.no_grad():
        served = layer(x)
    torch.testing.assert_close(served, uncached(layer, x), rtol=0, atol=0)


@pytest.mark.parametrize("make, shape", LAYERS)
def test_pickle_and_torch_save_after_an_eval_forward(make, shape):
    layer, x = evaluated(make, shape)
    with torch.no_grad():
        expected = layer(x)
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    for loaded in (pickle.loads(pickle.dumps(layer)), torch.load(buffer, weights_only=False)):
        assert not loaded._eval_cache
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)


@pytest.fixture
def swap_on_conversion():
    """``.to()`` and friends swap the parameters' contents in place (``torch.utils.swap_tensors``)."""
    before = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    yield
    torch.__future__.set_swap_module_params_on_conversion(before)


@pytest.mark.parametrize("make, shape", LAYERS)
def test_conversion_with_swapped_parameters_after_an_eval_forward(make, shape, swap_on_conversion):
    layer, x = evaluated(make, shape)
    weight = layer.weight
    layer.double()
    assert layer.weight is weight and weight.dtype == torch.float64
    with torch.no_grad():
        torch.testing.assert_close(layer(x.double()), uncached(layer, x.double()), rtol=0, atol=0)


@pytest.mark.parametrize("make, shape", LAYERS)
def test_conversion_with_swapped_parameters_after_a_deepcopy(make, shape, swap_on_conversion):
    layer, x = evaluated(make, shape)
    twin = copy.deepcopy(layer)
    layer.train().double()
    with torch.no_grad():
        torch.testing.assert_close(twin(x), uncached(twin, x), rtol=0, atol=0)
    assert twin.weight.dtype == torch.float32


@pytest.mark.parametrize("make, shape", LAYERS)
def test_swap_tensors_on_the_weight_after_an_eval_forward(make, shape):
    layer, x = evaluated(make, shape)
    replacement = nn.Parameter(torch.randn_like(layer.weight))
    torch.utils.swap_tensors(layer.weight, replacement)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), uncached(layer, x), rtol=0, atol=0)


@pytest.mark.parametrize("training", [False, True])
def test_jit_trace_of_a_linear_layer_is_refused_with_the_way_out(training):
    layer = GramLinear(6, 4).train(training)
    with pytest.raises(TypeError, match="lipnet.export"):
        torch.jit.trace(layer, torch.randn(3, 6))


LOW_PRECISION_LAYERS = [
    pytest.param(lambda: GramLinear(48, 32), None, id="linear"),
    pytest.param(lambda: GramConv2d(6, 6, 3, padding=1, padding_mode="circular"), (6, 6), id="conv2d"),
    pytest.param(lambda: GramConv2d(4, 6, 3, stride=2, padding=1, padding_mode="circular"), (6, 6), id="conv2d-strided"),
    pytest.param(lambda: GramConv1d(6, 6, 3, padding=1, padding_mode="circular"), (12,), id="conv1d"),
    pytest.param(lambda: GramConvTranspose2d(6, 4, 4, stride=2, padding=1), (4, 4), id="conv_transpose2d"),
]


@pytest.mark.parametrize("make, input_size", LOW_PRECISION_LAYERS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rounding_to_low_precision_keeps_the_applied_weight_1_lipschitz(make, input_size, dtype):
    for seed in range(12):
        torch.manual_seed(seed)
        layer = make().to(dtype)
        in_float32 = copy.deepcopy(layer).float()  # the same weight, normalized without rounding
        for mode in (layer.train, layer.eval):
            mode()
            norm = applied_norm(layer, input_size)
            # at float32's accuracy, as a float32 layer; rounding alone lifts it by up to a few 1e-3
            assert norm <= 1 + 1e-6
            # scaled down by a few rounding units at most
            assert norm >= applied_norm(in_float32, input_size) - 4 * torch.finfo(dtype).eps


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_constant_weight_whose_quotient_rounds_up_stays_1_lipschitz(dtype):
    # all-equal n x n: W / ||W|| = 1/n everywhere; for this n, rounded 1/n is above it and n fl(1/n) > 1
    n = next(n for n in range(2, 100) if n * float(torch.tensor(1 / n, dtype=dtype)) > 1)
    linear = GramLinear(n, n, dtype=dtype)
    conv = GramConv2d(n, n, 1, dtype=dtype)
    for layer, input_size in ((linear, None), (conv, (4, 4))):
        with torch.no_grad():
            layer.weight.fill_(0.5)
        assert applied_norm(layer, input_size) <= 1


@pytest.mark.parametrize("name, value", [("stride", (2,)), ("padding", (1,)), ("dilation", (2,)), ("padding", [2])])
def test_one_element_sequences_of_conv2d_geometry_are_accepted(name, value):
    torch.manual_seed(0)
    gram = GramConv2d(2, 3, 3, **{name: value})
    native = nn.Conv2d(2, 3, 3, **{name: value})
    x = torch.randn(2, 2, 9, 9)
    out = gram(x)
    with torch.no_grad():
        native.weight.copy_(gram.normalized_weight((9, 9)))
        native.bias.copy_(gram.bias)
        torch.testing.assert_close(out, native(x), rtol=0, atol=0)
    assert applied_norm(gram, (9, 9)) <= gram.lipschitz_bound((9, 9)) <= 1 + 1e-5


@pytest.mark.parametrize("std", [0.0, -0.5, float("nan")])
def test_a_bad_std_written_into_input_normalization_is_named(std):
    norm = InputNormalization([0.5, 0.5], [0.25, 0.25])
    with torch.no_grad():
        norm.std[1] = std
    with pytest.raises(ValueError, match="InputNormalization: std must be positive"):
        norm.lipschitz_bound()
    with pytest.raises(ValueError, match="InputNormalization"):
        lipschitz_bound(nn.Sequential(norm, nn.Flatten()), (2, 3, 3))


@pytest.mark.parametrize("mean", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_mean_in_input_normalization_is_refused_everywhere(mean):
    """Its outputs would be NaN or infinite: no bound holds for them."""
    with pytest.raises(ValueError, match="mean must be finite"):
        InputNormalization([0.5, mean], [0.25, 0.25])
    norm = InputNormalization([0.5, 0.5], [0.25, 0.25])
    with pytest.raises(ValueError, match="mean loaded from the state_dict must be finite"):
        norm.load_state_dict({"mean": torch.tensor([0.5, mean]), "std": torch.tensor([0.25, 0.25])})
    with torch.no_grad():
        norm.mean[1] = mean
    with pytest.raises(ValueError, match="InputNormalization: mean must be finite"):
        norm.lipschitz_bound()


@pytest.mark.parametrize("make, shape, name", [
    pytest.param(LAYERS[1].values[0], (2, 2, 8, 8), "stride", id="conv2d-stride"),
    pytest.param(LAYERS[2].values[0], (2, 2, 8), "stride", id="conv1d-stride"),
])
def test_geometry_set_as_a_list_and_then_edited_in_place_is_seen(make, shape, name):
    """torch's convolutions take a list (``conv.stride = [2, 2]``), which may then be edited in place:
    the cache must not key on the list object itself. From stride 2 down to 1 the bound served was
    the strided operator's, below the norm of the one applied (by a third for an all-ones kernel)."""
    layer = make().eval()
    setattr(layer, name, [2] * len(layer.kernel_size))
    x = torch.randn(shape)
    with torch.no_grad():
        layer.weight.fill_(1)
        layer(x)
        getattr(layer, name)[0] = 1
        served = layer(x)
        assert applied_norm(layer, tuple(shape[2:])) <= 1 + 1e-5  # the weight the cache serves
    torch.testing.assert_close(served, uncached(layer, x), rtol=0, atol=0)
