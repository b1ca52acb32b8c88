"""Mutation tests of lipnet.models: each test pins a behaviour that a hand-made mutant of the
architectures, their presets, the initialization or the registry broke without any other test
failing."""

import pytest
import torch
from torch import nn

from lipnet.models import MODELS, build_model, model_spec, register_model, unwrap
from lipnet.nn import GramConv2d, GramLinear, GramResidualConv2d, InputNormalization


def layers(model):
    """One line per layer: the type and, for the Gram layers, (in, out, kernel, stride, padding)."""
    rows = []
    for layer in model:
        if isinstance(layer, GramLinear):
            rows.append(("GramLinear", layer.in_features, layer.out_features))
        elif isinstance(layer, GramConv2d):
            rows.append((type(layer).__name__, layer.in_channels, layer.out_channels, layer.kernel_size[0],
                         layer.stride[0], layer.padding if isinstance(layer.padding, str) else layer.padding[0]))
        else:
            rows.append(type(layer).__name__)
    return rows


def test_the_sized_presets():
    """The presets behind the registered sizes: the recipes and the published benchmark figures
    name them (the cifar10 recipe's liresnet-s, fashion-mnist's convnet-s), so changing one
    changes what those figures mean."""
    presets = {name: getattr(MODELS[name], "preset", None) for name in MODELS}
    assert presets == {
        "convnet": None,
        "convnet-xs": dict(widths=(16, 32), depths=(1, 1), dense=(128,), stem_stride=2),
        "convnet-s": dict(widths=(32, 64), depths=(1, 1), dense=(512,), stem_stride=2),
        "convnet-m": dict(widths=(32, 64, 128), depths=(2, 2, 2), dense=(512,), stem_stride=1),
        "convnet-l": dict(widths=(64, 128, 256), depths=(3, 3, 3), dense=(1024,), stem_stride=1),
        "liresnet": None,
        "liresnet-xs": dict(width=32, depth=4, stem_stride=2, neck_stride=2, dense=(256,)),
        "liresnet-s": dict(width=64, depth=6, neck_stride=4, dense=(512,)),
        "liresnet-m": dict(width=128, depth=12, neck_stride=4, dense=(1024,)),
        "liresnet-l": dict(width=256, depth=18, neck_stride=4, dense=(2048,)),
    }


def test_liresnet_s_on_cifar10_layer_by_layer():
    """The cifar10 recipe's network: 3x3 stem, six 3x3 residual blocks each followed by MaxMin,
    a 4x4 stride-4 neck to 8x8, then 4096 -> 512 -> 10."""
    model = build_model("liresnet-s", in_channels=3, num_classes=10, input_size=32)
    assert layers(model) == (["InputNormalization", ("GramConv2d", 3, 64, 3, 1, 1), "MaxMin"]
                             + [("GramResidualConv2d", 64, 64, 3, 1, "same"), "MaxMin"] * 6
                             + [("GramConv2d", 64, 64, 4, 4, 0), "MaxMin", "Flatten", ("GramLinear", 4096, 512),
                                "MaxMin", ("GramLinear", 512, 10)])


def test_convnet_s_on_fashion_mnist_layer_by_layer():
    """The fashion-mnist recipe's network: a 2x2 stride-2 stem to 14x14, a 3x3 convolution, a 2x2
    stride-2 downsampling to 7x7, a 3x3 convolution, each followed by MaxMin, then 3136 -> 512 -> 10."""
    model = build_model("convnet-s", in_channels=1, num_classes=10, input_size=28)
    assert layers(model) == ["InputNormalization", ("GramConv2d", 1, 32, 2, 2, 0), "MaxMin",
                             ("GramConv2d", 32, 32, 3, 1, 1), "MaxMin", ("GramConv2d", 32, 64, 2, 2, 0), "MaxMin",
                             ("GramConv2d", 64, 64, 3, 1, 1), "MaxMin", "Flatten", ("GramLinear", 3136, 512), "MaxMin",
                             ("GramLinear", 512, 10)]


def test_the_liresnet_neck_keeps_the_trunk_width_unless_told():
    """The neck maps the trunk to neck_width channels (default: the trunk's), and the head reads
    neck_width x size x size features."""
    small = dict(in_channels=3, num_classes=10, input_size=8, width=8, depth=1, neck_stride=4, dense=(16,))
    assert layers(build_model("liresnet", **small))[-6:-4] == [("GramConv2d", 8, 8, 4, 4, 0), "MaxMin"]
    wide = build_model("liresnet", **small, neck_width=12)
    assert layers(wide)[-6:] == [("GramConv2d", 8, 12, 4, 4, 0), "MaxMin", "Flatten", ("GramLinear", 48, 16),
                                 "MaxMin", ("GramLinear", 16, 10)]
    assert wide(torch.rand(2, 3, 8, 8)).shape == (2, 10)


@pytest.mark.parametrize("name", ["convnet", "liresnet"])
def test_the_input_normalization_is_the_data_set_s_mean_and_std_per_channel(name):
    """The first layer computes (x - mean[c]) / std[c] for each channel c in the given order
    (std also sets the network's Lipschitz constant, 1 / min(std)); none means 0 and 1."""
    sizes = dict(widths=(4, 8), depths=(1, 1), dense=(16,)) if name == "convnet" else dict(width=8, depth=1,
                                                                                          dense=(16,))
    mean, std = (0.5, 0.25, 0.125), (0.25, 0.5, 2.0)
    x = torch.rand(2, 3, 16, 16)
    model = build_model(name, in_channels=3, num_classes=10, input_size=16, mean=mean, std=std, **sizes)
    assert isinstance(model[0], InputNormalization)
    expected = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(model[0](x), expected, rtol=0, atol=1e-6)
    plain = build_model(name, in_channels=3, num_classes=10, input_size=16, **sizes)
    assert torch.equal(plain[0](x), x)


def test_built_models_start_orthogonal_with_zero_biases_and_identity_residual_blocks():
    """As orthogonal_init_ promises and the models apply: a 3x3 convolution's only non-zero tap is
    the central one (an orthogonal matrix), every residual branch is zero, every bias is zero."""
    torch.manual_seed(0)
    convnet = build_model("convnet", in_channels=3, num_classes=10, input_size=16, widths=(4, 8), depths=(1, 1),
                          dense=(16,))
    conv = convnet[3]
    assert conv.kernel_size == (3, 3)
    centre = conv.weight[:, :, 1, 1]
    torch.testing.assert_close(centre @ centre.T, torch.eye(4), rtol=0, atol=1e-5)
    assert torch.count_nonzero(conv.weight) == torch.count_nonzero(centre) > 0
    liresnet = build_model("liresnet", in_channels=3, num_classes=10, input_size=16, width=8, depth=2, dense=(16,))
    residual = [m for m in liresnet.modules() if isinstance(m, GramResidualConv2d)]
    assert len(residual) == 2 and all(torch.count_nonzero(m.weight) == 0 for m in residual)
    for model in (convnet, liresnet):
        biases = [m.bias for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None]
        assert biases and all(torch.count_nonzero(b) == 0 for b in biases)


def test_the_caller_s_arguments_override_a_preset_in_the_model_and_its_spec():
    model = build_model("convnet-xs", in_channels=1, num_classes=10, input_size=28, widths=(8, 16), dense=(32,))
    assert layers(model)[1] == ("GramConv2d", 1, 8, 2, 2, 0) and layers(model)[-1] == ("GramLinear", 32, 10)
    assert model_spec(model)["kwargs"] == {"widths": [8, 16], "depths": [1, 1], "dense": [32], "stem_stride": 2,
                                           "in_channels": 1, "num_classes": 10, "input_size": 28}


def test_a_name_registered_twice_is_refused_and_the_first_kept():
    factory = MODELS["convnet"]
    with pytest.raises(ValueError, match="a model named 'convnet' is already registered"):
        register_model("convnet")(lambda **kwargs: nn.Identity())
    assert MODELS["convnet"] is factory


def test_unwrap_sees_through_data_parallel():
    model = build_model("convnet", in_channels=1, num_classes=2, input_size=4, widths=(2,), depths=(0,), dense=())
    assert unwrap(nn.DataParallel(model)) is model
    assert unwrap(nn.DataParallel(nn.DataParallel(model))) is model
    assert model_spec(nn.DataParallel(model))["name"] == "convnet"
