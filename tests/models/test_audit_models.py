"""Audit of lipnet.models (init, parts, registry): bad arguments, grouped convolutions, specs."""

import pytest
import torch

from lipnet.models import build_model, model_spec, orthogonal_init_
from lipnet.nn import GramConv2d

SMALL = dict(in_channels=3, num_classes=10, input_size=16, widths=(4, 8), depths=(1, 1), dense=(16,))


@pytest.mark.parametrize("kernel_size, stride, groups", [(3, 1, 2), (3, 1, 8), (2, 2, 2), (2, 2, 4), (1, 1, 2)])
def test_orthogonal_init_makes_grouped_convolutions_isometries(kernel_size, stride, groups):
    torch.manual_seed(0)
    padding = kernel_size // 2 if stride == 1 else 0
    out_channels = 8 * stride * stride  # a patchifying convolution keeps every pixel's value
    layer = orthogonal_init_(GramConv2d(8, out_channels, kernel_size, stride=stride, padding=padding, groups=groups))
    x = torch.randn(4, 8, 8, 8, dtype=torch.float32)
    raw = layer._conv_forward(x, layer.weight, None)
    torch.testing.assert_close(raw.flatten(1).norm(dim=1), x.flatten(1).norm(dim=1))


@pytest.mark.parametrize("changes, message", [
    (dict(in_channels=0), "in_channels"),
    (dict(widths=(0, 8)), "width"),
    (dict(dense=(0,)), "dense"),
    (dict(num_classes=0), "num_classes"),
    (dict(num_classes=1), "num_classes"),
    (dict(mean=(0.5, 0.5), std=(0.2, 0.2)), "channel"),
    (dict(stem_stride=True), "stem_stride"),
])
def test_bad_sizes_are_refused_when_the_model_is_built_not_at_its_first_forward(changes, message):
    with pytest.raises(ValueError, match=message):
        build_model("convnet", **{**SMALL, **changes})


@pytest.mark.parametrize("changes, message", [(dict(width=0), "width"), (dict(neck_width=0), "neck_width|width"),
                                              (dict(dense=(0,)), "dense")])
def test_bad_liresnet_sizes_are_refused_when_built(changes, message):
    with pytest.raises(ValueError, match=message):
        build_model("liresnet", in_channels=3, num_classes=10, input_size=16, **{"width": 8, "depth": 1, **changes})


def test_the_spec_of_a_rebuilt_sized_model_equals_the_original_spec():
    model = build_model("convnet-xs", in_channels=1, num_classes=10, input_size=28)
    spec = model_spec(model)
    assert spec["kwargs"]["widths"] == [16, 32]  # plain lists, as for explicit arguments
    assert model_spec(build_model(spec["name"], **spec["kwargs"])) == spec


def test_changing_a_returned_spec_does_not_change_the_model_s_spec():
    model = build_model("convnet", **SMALL)
    spec = model_spec(model)
    spec["kwargs"]["dense"].append(64)
    assert model_spec(model)["kwargs"]["dense"] == [16]


def test_init_is_deterministic_under_a_seed_and_parameter_counts_follow_the_sizes():
    def make():
        torch.manual_seed(7)
        return build_model("convnet", **SMALL)

    a, b = make(), make()
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    # stem 3->4 (2x2), conv 4->4 (3x3), down 4->8 (2x2), conv 8->8 (3x3), 8*4*4 -> 16 -> 10
    expected = (4 * 3 * 4 + 4) + (4 * 4 * 9 + 4) + (8 * 4 * 4 + 8) + (8 * 8 * 9 + 8) + (128 * 16 + 16) + (16 * 10 + 10)
    assert sum(p.numel() for p in a.parameters()) == expected


def test_a_size_error_names_the_model_it_came_from():
    with pytest.raises(ValueError, match="model 'convnet-xs': dense width must be an integer >= 1, got -2"):
        build_model("convnet-xs", in_channels=1, num_classes=10, input_size=28, dense=(-2,))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_orthogonal_init_of_a_low_precision_model(dtype):
    conv = orthogonal_init_(GramConv2d(4, 4, 3, padding=1).to(dtype))
    linear = orthogonal_init_(torch.nn.Linear(4, 6).to(dtype))
    for matrix in (conv.weight[:, :, 1, 1], linear.weight):
        gram = matrix.float().T @ matrix.float()
        torch.testing.assert_close(gram, torch.eye(4), atol=2e-2, rtol=0)
    assert conv.weight.dtype == dtype


@pytest.mark.parametrize("name, kwargs, message", [
    ("convnet-xs", {"depths": (-1, 1)}, "each of depths must be an integer >= 0, got -1"),
    ("convnet-xs", {"depths": (1.5, 1)}, "each of depths must be an integer >= 0, got 1.5"),
    ("liresnet-xs", {"depth": -1}, "depth must be an integer >= 0, got -1"),
])
def test_a_negative_block_count_is_refused_not_built_with_fewer_layers(name, kwargs, message):
    # range(-1) is empty: the network was built without the stage's convolutions
    with pytest.raises(ValueError, match=f"model '{name}': {message}"):
        build_model(name, in_channels=3, num_classes=10, input_size=32, **kwargs)
    zero = {k: (0, 1) if k == "depths" else 0 for k in kwargs}  # no blocks is a valid choice
    build_model(name, in_channels=3, num_classes=10, input_size=32, **zero)
