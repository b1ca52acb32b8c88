import pytest
import torch
from torch import nn

import lipnet
from lipnet.bounds import exact_conv1d_spectral_norm
from lipnet.nn import GramConv1d, GramLinear, GramSequential, MaxMin

CONFIGS = [
    dict(in_channels=3, out_channels=8, kernel_size=3, padding=1),
    dict(in_channels=4, out_channels=2, kernel_size=4, stride=2, padding=(1,), bias=False),
    dict(in_channels=4, out_channels=6, kernel_size=3, padding="same", padding_mode="circular"),
    dict(in_channels=4, out_channels=4, kernel_size=2, padding="same", dilation=3, groups=2),
    dict(in_channels=2, out_channels=3, kernel_size=3, stride=3, padding=2, padding_mode="reflect"),
    dict(in_channels=2, out_channels=2, kernel_size=5, padding=1, padding_mode="replicate"),
]
GEOMETRY = ("stride", "padding", "dilation", "groups", "padding_mode")


@pytest.mark.parametrize("cfg", CONFIGS)
def test_is_a_conv1d_with_the_same_state_dict(cfg):
    layer, plain = GramConv1d(**cfg), nn.Conv1d(**cfg)
    assert isinstance(layer, nn.Conv1d)
    assert list(layer.state_dict()) == list(plain.state_dict())
    layer.load_state_dict(plain.state_dict())
    torch.testing.assert_close(layer.weight, plain.weight)
    plain.load_state_dict(layer.state_dict())
    assert (layer.kernel_size, layer.stride, layer.padding) == (plain.kernel_size, plain.stride, plain.padding)


@pytest.mark.parametrize("cfg", CONFIGS)
def test_forward_applies_the_normalized_weight(cfg):
    layer = GramConv1d(**cfg)
    x = torch.randn(2, cfg["in_channels"], 19)
    plain = nn.Conv1d(**cfg)
    plain.load_state_dict(layer.state_dict())
    with torch.no_grad():
        plain.weight.copy_(layer.normalized_weight(19))
    torch.testing.assert_close(layer(x), plain(x))
    torch.testing.assert_close(layer(x[0]), plain(x[0]))  # unbatched (C, L), as nn.Conv1d takes


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("n", [7, 16, 33])
def test_normalized_operator_norm_is_at_most_one(cfg, n):
    layer = GramConv1d(**cfg).double()
    weight = layer.normalized_weight(n)
    exact = exact_conv1d_spectral_norm(weight, n, **{k: v for k, v in cfg.items() if k in GEOMETRY})
    assert exact <= 1 + 1e-12
    assert exact <= layer.lipschitz_bound(n) <= 1 + 1e-5
    assert layer.lipschitz_bound((n,)) == layer.lipschitz_bound(n)


def test_bound_follows_the_input_length():
    layer = GramConv1d(2, 4, 3, padding=1)
    layer(torch.randn(1, 2, 5))
    short = layer.lipschitz_bound()
    layer(torch.randn(1, 2, 50))
    assert layer._last_input_size == (50,)
    assert layer.lipschitz_bound() == layer.lipschitz_bound(50)
    assert short == layer.lipschitz_bound(5)


def test_clear_errors():
    with pytest.raises(ValueError, match="input's length"):
        GramConv1d(2, 2, 3).lipschitz_bound()
    with pytest.raises(ValueError, match="length n"):
        GramConv1d(2, 2, 3).normalized_weight((4, 4))
    for size in (8.7, True, (8.7,)):  # not bounded as a length of 8 or 1
        with pytest.raises(ValueError, match=r"input size \(its length n\) must be an int"):
            GramConv1d(2, 2, 3).lipschitz_bound(size)
    layer = GramConv1d(2, 2, 3, padding=1, padding_mode="reflect")
    layer.padding = (2,)
    with pytest.raises(ValueError, match="after construction"):
        layer(torch.randn(1, 2, 8))
    with pytest.raises(ValueError, match="smaller than the input"):
        GramConv1d(2, 2, 3, padding=4, padding_mode="reflect")(torch.randn(1, 2, 3))
    with pytest.raises(TypeError, match="lipnet.export"):
        torch.jit.trace(GramConv1d(2, 2, 3), torch.randn(1, 2, 8))


def test_geometry_set_as_an_int_after_construction_is_certified():
    """``layer.stride = 2`` is what ``nn.Conv1d`` runs (F.conv1d takes an int); the forward and
    the bound took it, but the certified bound raised ``TypeError: 'int' object is not
    subscriptable`` (its rounding margin read ``stride[0]``)."""
    layer = GramConv1d(2, 3, 3, padding=1, dtype=torch.float64)
    layer.stride, layer.dilation = 2, 2
    assert layer(torch.randn(1, 2, 9, dtype=torch.float64)).shape[-1] == 4
    weight = layer.normalized_weight(9)
    exact = exact_conv1d_spectral_norm(weight, 9, stride=2, padding=1, dilation=2)
    assert exact <= layer.lipschitz_bound(9) <= 1 + 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_weight_that_reads_only_padding_is_the_zero_map_in_every_dtype(dtype):
    """As for GramConv2d: the outer taps on a length-1 input read only padding (bound 0), and
    float16 once overflowed the normalized weight to inf and the forward to NaN."""
    layer = GramConv1d(2, 2, 3, padding=1, dtype=dtype)
    with torch.no_grad():
        layer.weight.zero_()
        layer.weight[:, :, 0] = 1.0
    x = torch.randn(3, 2, 1, dtype=dtype)
    assert layer.weight_norm_bound(1).item() == 0.0
    assert layer(x).sub(layer.bias.view(1, -1, 1)).abs().max().item() == 0.0


@pytest.mark.parametrize("cls, torch_cls, shape", [(lipnet.nn.GramConv2d, "Conv2d", (1, 2, 8, 8)),
                                                     (GramConv1d, "Conv1d", (1, 2, 8))], ids=["2d", "1d"])
def test_both_convolutions_share_stack_keys_padding_checks_and_settings(cls, torch_cls, shape):
    """What GramConv2d and GramConv1d share (lipnet.nn.normalized.GramNormalizedConv)."""
    key = cls(2, 4, 3, padding=1).stack_key()
    assert key[0] is cls and key == cls(2, 4, 3, padding=1).stack_key()
    for other in (dict(padding=2), dict(padding=1, n_iter=6), dict(padding=1, screen_iter=7)):
        assert cls(2, 4, 3, **other).stack_key() != key
    assert "n_iter=10, screen_iter=7" in repr(cls(2, 4, 3, screen_iter=7))

    class OwnBound(cls):
        def _operator_norm(self, weight, input_size, n_iter, exhaustive=False):
            return super()._operator_norm(weight, input_size, n_iter, exhaustive) * 2

    assert OwnBound(2, 4, 3).stack_key() is None
    layer = cls(2, 4, 3, padding=1, padding_mode="circular")
    layer(torch.randn(shape))
    layer.padding = (0,) * (len(shape) - 2)
    with pytest.raises(ValueError, match=rf"padding was changed .* \(nn.{torch_cls} fixes it at construction\)"):
        layer(torch.randn(shape))
    with pytest.raises(ValueError, match="screen_iter must be an integer >= 0"):
        cls(2, 4, 3, screen_iter=-1)


def test_a_residual_convolution_stacks_with_plain_ones():
    assert lipnet.nn.GramResidualConv2d(4, 3).stack_key() == lipnet.nn.GramConv2d(4, 4, 3, padding="same").stack_key()


def test_trains_and_gradients_match_finite_differences():
    layer = GramConv1d(2, 3, 3, padding=1, dtype=torch.float64)
    x = torch.randn(2, 2, 10, dtype=torch.float64)
    torch.autograd.gradcheck(lambda w: nn.functional.conv1d(x, w / layer._operator_norm(w, 10, 14, exhaustive=True),
                                                            padding=1), (layer.weight.detach().requires_grad_(),))
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    before = layer.weight.detach().clone()
    layer(x).square().sum().backward()
    optimizer.step()
    assert not torch.equal(before, layer.weight)


def test_stacked_bounds_in_gram_sequential_equal_per_layer_bounds():
    torch.manual_seed(0)
    layers = [GramConv1d(4, 4, 3, padding=1), MaxMin(), GramConv1d(4, 4, 3, padding=1), MaxMin(),
              GramConv1d(4, 4, 3, padding=1), nn.Flatten(), GramLinear(4 * 12, 3)]
    stacked, alone = GramSequential(*layers, stack_bounds=True), GramSequential(*layers, stack_bounds=False)
    x = torch.randn(5, 4, 12)
    torch.testing.assert_close(stacked(x), alone(x))
    grads = []
    for net in (stacked, alone):
        net.zero_grad()
        net(x).sum().backward()
        grads.append([p.grad.clone() for p in net.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def one_d_network():
    torch.manual_seed(0)
    return nn.Sequential(GramConv1d(2, 8, 5, padding=2), MaxMin(), GramConv1d(8, 8, 3, stride=2, padding=1),
                         MaxMin(), nn.AvgPool1d(2), nn.Flatten(), GramLinear(8 * 8, 4)).eval()


def test_certified_bound_of_a_1d_network_holds_on_the_whole_network():
    net = one_d_network()
    bound = lipnet.certify.lipschitz_bound(net, (2, 32))
    assert bound <= 1 + 1e-5  # AvgPool1d(2): sqrt(2) / 2 < 1 times 1-Lipschitz layers
    x = torch.randn(64, 2, 32)
    delta = 1e-3 * torch.randn_like(x)
    ratios = (net(x + delta) - net(x)).flatten(1).norm(dim=1) / delta.flatten(1).norm(dim=1)
    assert float(ratios.max()) <= bound


def test_certified_accuracy_of_a_1d_network():
    net = one_d_network()
    x = torch.randn(20, 2, 32)
    y = net(x).argmax(1)
    result = lipnet.certify.certified_accuracy(net, [(x, y)], eps=(0.0, 0.01), progress=False)
    assert result.clean_accuracy == 1.0
    assert result.input_shape == (2, 32)
    assert result.certified[0] == 1.0 and result.certified_accuracy(0.0) == 1.0
    assert result.certified[1] <= 1.0 and (result.radii > 0).all()


def test_convert_and_export_a_1d_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 8, 5, padding=2), nn.ReLU(), nn.Conv1d(8, 8, 3, padding=1, padding_mode="circular"),
                          nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 3))
    converted, report = lipnet.convert(model, input_shape=(2, 16))
    assert [type(m).__name__ for m in converted] == ["GramConv1d", "MaxMin", "GramConv1d", "MaxMin", "Flatten",
                                                     "GramLinear"]
    assert report.certifiable and report.lipschitz_bound <= 1 + 1e-5
    torch.testing.assert_close(converted[2].weight, model[2].weight)
    exported = lipnet.export(converted.eval(), (2, 16))
    assert sorted(spec["type"] for spec in exported.archive()["modules"].values()) == [
        "torch.nn.Conv1d", "torch.nn.Conv1d", "torch.nn.Linear"]
    x = torch.randn(4, 2, 16)
    torch.testing.assert_close(exported(x), converted(x))
    assert exported.lipschitz_bound == lipnet.certify.lipschitz_bound(converted, (2, 16))
