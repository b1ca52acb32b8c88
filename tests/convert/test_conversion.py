"""lipnet.convert: layer swaps, the obstacle report, traced bounds of custom containers."""

import pytest
import torch
import torchvision
from torch import nn

from lipnet import convert, export
from lipnet.certify import LipschitzBoundError, certified_accuracy, lipschitz_bound
from lipnet.convert import Conversion, ConversionReport, traced_lipschitz_bound
from lipnet.nn import GramConv2d, GramConvTranspose2d, GramLinear, L2NormPool2d, MaxMin


def small_cnn():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                         nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))


def no_bn(module):
    return nn.Identity()


def obstacle(report, module_name):
    return [o for o in report.obstacles if o.module == module_name]


class Block(nn.Module):
    """A residual block written the torchvision way: relu(f(x) + x)."""

    def __init__(self, channels):
        super().__init__()
        self.conv1 = GramConv2d(channels, channels, 3, padding=1)
        self.conv2 = GramConv2d(channels, channels, 3, padding=1)
        self.act = MaxMin()

    def forward(self, x):
        out = self.conv2(self.act(self.conv1(x)))
        out += x
        return self.act(out)


def test_swaps_layers_and_carries_everything_over():
    net = small_cnn().double()
    net[2].weight.requires_grad_(False)
    net.eval()
    original = {k: v.clone() for k, v in net.state_dict().items()}
    converted, report = convert(net, input_shape=(3, 8, 8))
    assert [type(m) for m in converted] == [GramConv2d, MaxMin, GramConv2d, MaxMin, nn.Flatten, GramLinear]
    for key, value in converted.state_dict().items():
        assert torch.equal(value, original[key]) and value.dtype == torch.float64
    assert converted[0].stride == (1, 1) and converted[2].stride == (2, 2) and converted[2].padding == (1, 1)
    assert not converted[2].weight.requires_grad and converted[0].weight.requires_grad
    assert not any(m.training for m in converted.modules())
    # The input is untouched.
    assert [type(m) for m in net] == [nn.Conv2d, nn.ReLU, nn.Conv2d, nn.ReLU, nn.Flatten, nn.Linear]
    assert all(torch.equal(v, original[k]) for k, v in net.state_dict().items())
    assert [c.path for c in report.changes] == ["0", "1", "2", "3", "5"]
    assert report.changes[0].old.startswith("Conv2d(3, 8") and report.changes[0].new.startswith("GramConv2d(3, 8")
    assert report.obstacles == [] and report.certifiable and report.lipschitz_bound <= 1 + 1e-5
    assert isinstance(report, ConversionReport) and "Converted 5 module(s)" in str(report)


def test_transposed_convolutions_of_a_decoder_are_swapped_and_certified():
    decoder = nn.Sequential(nn.Linear(8, 64), nn.Unflatten(1, (4, 4, 4)),
                            nn.ConvTranspose2d(4, 8, 4, stride=2, padding=1, groups=2), nn.ReLU(),
                            nn.ConvTranspose2d(8, 3, 3, stride=2, padding=1, output_padding=1, bias=False))
    converted, report = convert(decoder, input_shape=(8,))
    for index in (2, 4):
        old, new = decoder[index], converted[index]
        assert type(new) is GramConvTranspose2d
        for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "output_padding", "groups",
                     "dilation"):
            assert getattr(new, name) == getattr(old, name)
        torch.testing.assert_close(new.weight, old.weight, rtol=0, atol=0)
    assert converted[4].bias is None and type(converted[3]) is MaxMin and converted[3].dim == -3
    assert report.certifiable and 1 - 1e-3 <= report.lipschitz_bound <= 1 + 1e-4
    assert converted(torch.randn(2, 8)).shape == decoder(torch.randn(2, 8)).shape == (2, 3, 16, 16)


def test_inplace_converts_the_model_itself():
    net = small_cnn()
    converted, _ = convert(net, inplace=True)
    assert converted is net and isinstance(net[0], GramConv2d)


def test_relu_on_odd_channel_counts_is_kept():
    net = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
    converted, report = convert(net, input_shape=(3, 4, 4))
    assert type(converted[1]) is nn.ReLU and type(converted[3]) is MaxMin
    assert any("ReLU at '1' kept" in note and "3 channel" in note for note in report.notes)
    converted(torch.randn(2, 3, 4, 4))
    # Without an input shape the counts cannot be checked: all ReLUs are replaced, and the report says so.
    converted, report = convert(net)
    assert type(converted[1]) is MaxMin and any("not checked" in note for note in report.notes)
    converted, _ = convert(net, activation=None)
    assert type(converted[3]) is nn.ReLU


class ConvReLU(nn.Module):
    """A ReLU outside an nn.Sequential: its layout is known only from input_shape."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.conv(x))


@pytest.mark.parametrize("given", [False, True], ids=["without_input_shape", "with_input_shape"])
@pytest.mark.parametrize("make, shape, dim", [
    pytest.param(lambda: nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1),
                                       nn.Dropout(), nn.ReLU()), (3, 5, 5), -3, id="conv2d"),
    pytest.param(lambda: nn.Sequential(nn.Conv1d(2, 6, 3, padding=1), nn.ReLU()), (2, 7), -2, id="conv1d"),
    pytest.param(lambda: nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 4), nn.ReLU())), (6,),
                 -1, id="linear"),
])
def test_maxmin_pairs_the_channels_of_batched_and_unbatched_inputs_alike(make, shape, dim, given):
    """nn.Conv2d, nn.Conv1d and nn.Linear take inputs without a batch dimension; MaxMin(dim=1) paired
    the height, the length or nothing (an error) of those."""
    torch.manual_seed(0)
    converted, report = convert(make(), input_shape=shape if given else None)
    converted.eval()
    assert {m.dim for m in converted.modules() if isinstance(m, MaxMin)} == {dim}
    assert not any("MaxMin(dim=1)" in note for note in report.notes)
    x = torch.randn(shape)
    torch.testing.assert_close(converted(x), converted(x[None])[0])


def test_maxmin_after_an_unknown_layout_pairs_dim_1_and_the_report_says_so():
    torch.manual_seed(0)
    converted, report = convert(ConvReLU())
    assert converted.relu.dim == 1
    assert any("'relu' replaced by MaxMin(dim=1)" in note and "without a batch dimension" in note
               for note in report.notes)
    converted, report = convert(ConvReLU(), input_shape=(3, 5, 5), certify=False)  # the rank of its input: (N, C, H, W)
    assert converted.relu.dim == -3 and not any("MaxMin(dim=1)" in note for note in report.notes)
    x = torch.randn(3, 5, 5)
    torch.testing.assert_close(converted.eval()(x), converted(x[None])[0])


def test_report_names_batchnorm_and_maxpool_with_their_fixes():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
                        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 2 * 2, 10))
    for shape in (None, (3, 8, 8)):
        _, report = convert(net, input_shape=shape)
        # Bounded by its running statistics (1 / sqrt(1 + eps) as initialized), which training changes freely.
        (bn,) = obstacle(report, "torch.nn.BatchNorm2d")
        assert bn.path == "1" and not bn.blocking and "nn.Identity()" in bn.fix and "bound 1 " in bn.problem
        (pool,) = obstacle(report, "torch.nn.MaxPool2d")  # the 2x2 stride-2 one is 1-Lipschitz
        assert pool.path == "3" and not pool.blocking and "bound 2" in pool.problem and "L2NormPool2d" in pool.fix
        assert "BatchNorm2d" in str(report) and "MaxPool2d" in str(report)
    assert report.certifiable and report.lipschitz_bound <= 2 * (1 + 1e-5)
    # Without running statistics BatchNorm normalizes by its batch even in eval mode: no bound.
    net[1] = nn.BatchNorm2d(8, track_running_stats=False)
    for shape in (None, (3, 8, 8)):
        _, report = convert(net, input_shape=shape)
        (bn,) = obstacle(report, "torch.nn.BatchNorm2d")
        assert bn.blocking and "no running statistics" in bn.problem and "nn.Identity()" in bn.fix
    assert not report.certifiable and "BatchNorm2d" in report.bound_error


def test_activations_with_bounds_are_reported_by_their_bounds():
    net = nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 4), nn.Hardsigmoid(), nn.Linear(4, 4),
                        nn.Softplus(), nn.Linear(4, 4), nn.Softplus(threshold=40.0), nn.Linear(4, 4), nn.Softmax(-1))
    for shape in (None, (4,)):
        _, report = convert(net, input_shape=shape)
        found = {o.path: o for o in report.obstacles}
        assert set(found) == {"1", "5", "9"}  # Hardsigmoid (1/6) and Softplus with threshold 40 (1) are 1-Lipschitz
        assert not found["1"].blocking and "bound 1.129" in found["1"].problem and "MaxMin" in found["1"].fix
        assert found["5"].blocking and "threshold >= 34" in found["5"].problem
        assert found["9"].blocking and "no bound" in found["9"].problem
    assert not report.certifiable and "Softplus" in report.bound_error


def test_replace_removes_the_obstacles():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
                        nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
    converted, report = convert(net, input_shape=(3, 8, 8),
                                replace={nn.BatchNorm2d: no_bn, nn.MaxPool2d: lambda m: L2NormPool2d(2)})
    assert type(converted[1]) is nn.Identity and type(converted[3]) is L2NormPool2d
    assert {c.path for c in report.changes} == {"0", "1", "2", "3", "5"}
    assert report.obstacles == [] and report.lipschitz_bound <= 1 + 1e-5


def test_torchvision_resnet18_report_names_batchnorm_maxpool_and_residuals():
    net = torchvision.models.resnet18(weights=None, num_classes=10)
    converted, report = convert(net)
    assert not any(type(m) in (nn.Conv2d, nn.Linear, nn.ReLU) for m in converted.modules())
    assert sum(isinstance(m, GramConv2d) for m in converted.modules()) == 20
    assert torch.equal(converted.layer3[0].downsample[0].weight, net.layer3[0].downsample[0].weight)
    bns = obstacle(report, "torch.nn.BatchNorm2d")
    assert len(bns) == 20 and not any(o.blocking for o in bns)
    (pool,) = obstacle(report, "torch.nn.MaxPool2d")
    assert pool.path == "maxpool" and "bound 2" in pool.problem
    blocks = obstacle(report, "torchvision.models.resnet.BasicBlock")
    assert len(blocks) == 8 and all("1 + Lip(f)" in o.problem and not o.blocking for o in blocks)


def test_torchvision_vgg():
    net = torchvision.models.vgg11(weights=None, num_classes=10)
    converted, report = convert(net)
    kinds = [type(m) for m in converted.modules()]
    assert kinds.count(GramConv2d) == 8 and kinds.count(GramLinear) == 3 and kinds.count(MaxMin) == 10
    assert nn.Conv2d not in kinds and nn.Linear not in kinds and nn.ReLU not in kinds
    assert torch.equal(converted.classifier[6].weight, net.classifier[6].weight)
    # 2x2 stride-2 max pooling is 1-Lipschitz: not an obstacle; dropout only matters in train mode.
    assert obstacle(report, "torch.nn.MaxPool2d") == []
    assert {o.path for o in obstacle(report, "torch.nn.Dropout")} == {"classifier.2", "classifier.5"}


@pytest.mark.slow
def test_vgg_with_a_small_input_gets_an_honest_bound():
    """Adaptive pooling of a 1x1 map to 7x7 copies each input 49 times: Lipschitz 7."""
    net = torchvision.models.vgg11(weights=None, num_classes=10)
    net.classifier = nn.Sequential(nn.Linear(512 * 7 * 7, 10))
    converted, report = convert(net, input_shape=(3, 32, 32), certify=False)
    assert "torchvision.models.vgg.VGG" in report.registered
    (pool,) = obstacle(report, "torch.nn.AdaptiveAvgPool2d")
    assert "bound 7" in pool.problem


@pytest.mark.slow
def test_torchvision_resnet18_convert_train_certify():
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None, num_classes=10)
    converted, report = convert(net, input_shape=(3, 32, 32), replace={nn.BatchNorm2d: no_bn}, certify=False)
    assert {"torchvision.models.resnet.ResNet", "torchvision.models.resnet.BasicBlock"} <= set(report.registered)
    assert [o.module for o in report.obstacles].count("torchvision.models.resnet.BasicBlock") == 8
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    opt = torch.optim.SGD(converted.parameters(), lr=0.05)
    converted.train()
    for _ in range(2):
        loss = nn.functional.cross_entropy(converted(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    result = certified_accuracy(converted, (x, y), eps=[0.0, 36 / 255], progress=False)
    # Max pooling (2) times eight residual blocks (1 + 1 each): at most 2^9, a sound but loose bound.
    assert 1 <= result.lipschitz <= 2**9 * (1 + 1e-4)
    assert result.certified[1] <= result.certified[0] <= result.clean_accuracy
    # Soundness spot check: the local gradient norm of a logit difference never exceeds sqrt(2) L.
    x.requires_grad_(True)
    logits = converted.eval()(x)
    (grad,) = torch.autograd.grad((logits[:, 0] - logits[:, 1]).sum(), x)
    assert grad.flatten(1).norm(dim=1).max() <= 2**0.5 * result.lipschitz
    # The trained model exports to plain PyTorch (its bound was just checked above).
    exported = export(converted, (3, 32, 32), certify=False)
    with torch.no_grad():
        assert float((exported(x) - converted(x)).abs().max()) <= 1e-6


def test_traced_bound_of_a_residual_block_is_one_plus_the_branch():
    block = Block(4)
    shape = (4, 6, 6)
    branch = block.conv1.lipschitz_bound((6, 6)) * block.conv2.lipschitz_bound((6, 6))
    bound = traced_lipschitz_bound(block, shape)
    assert branch + 1 <= bound <= (branch + 1) * (1 + 1e-12)
    # Sound: no pair of inputs is further apart at the output than the bound allows.
    a, b = torch.randn(64, *shape), torch.randn(64, *shape)
    ratio = (block(a) - block(b)).flatten(1).norm(dim=1) / (a - b).flatten(1).norm(dim=1)
    assert ratio.max() <= bound


class Ops(nn.Module):
    """Scaling by constants, concatenation, slicing, flatten, view with a size query."""

    def __init__(self):
        super().__init__()
        self.conv = GramConv2d(2, 2, 3, padding=1)
        self.register_buffer("scale", torch.tensor([0.5, -2.0]).view(1, 2, 1, 1))

    def forward(self, x):
        y = torch.cat([x, self.conv(x) * self.scale], dim=1) / 4
        y = torch.relu(y[:, :3])
        return y.view(y.size(0), -1) - 1.0


def test_traced_bound_rules():
    module = Ops()
    conv = module.conv.lipschitz_bound((5, 5))
    expected = (1 + (2 * conv) ** 2) ** 0.5 / 4
    bound = traced_lipschitz_bound(module, (2, 5, 5))
    assert expected <= bound <= expected * (1 + 1e-12)


class Square(nn.Module):
    def forward(self, x):
        return x * x


class MixesExamples(nn.Module):
    def forward(self, x):
        return x.flatten().view(x.shape[0], -1)


class Broadcast(nn.Module):
    def forward(self, x):
        return x[:, :1] + x


class SharedInPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        y = x * 1.0
        return self.relu(y) + y


class InPlaceThroughView(nn.Module):
    def forward(self, x):
        h = x * 1.0
        view = h[:, :]
        view.mul_(10)  # scales h as well
        return h


class InPlaceOnInput(nn.Module):
    def forward(self, x):
        x.mul_(10)
        return x


class DataDependent(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x


@pytest.mark.parametrize("module, message", [
    (Square(), "two values that depend on the input"),
    (MixesExamples(), "batch"),
    (Broadcast(), "broadcast"),
    (SharedInPlace(), "in-place"),
    (InPlaceThroughView(), "view of another value"),
    (InPlaceOnInput(), "in-place"),
    (DataDependent(), "cannot be traced"),
])
def test_traced_bound_refuses_what_it_cannot_bound(module, message):
    with pytest.raises(LipschitzBoundError, match=message):
        traced_lipschitz_bound(module, (2, 4, 4))


def test_custom_containers_get_registered_bounds():
    net = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), Block(4), nn.Flatten(), nn.Linear(64, 3))
    converted, report = convert(net, input_shape=(4, 4, 4))
    assert f"{__name__}.Block" in report.registered or Block in _registered_types()
    (residual,) = obstacle(report, f"{__name__}.Block")
    assert not residual.blocking and "1 + Lip(f)" in residual.problem
    expected = converted[0].lipschitz_bound((4, 4)) * traced_lipschitz_bound(converted[1], (4, 4, 4))
    expected *= converted[3].lipschitz_bound()
    assert report.lipschitz_bound == pytest.approx(expected, rel=1e-12)
    assert report.lipschitz_bound == lipschitz_bound(converted, (4, 4, 4))


def _registered_types():
    from lipnet.convert.conversion import _TRACED_TYPES

    return _TRACED_TYPES


def test_untraceable_containers_are_blocking_obstacles():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 1)

        def forward(self, x):
            return self.conv(x) if x.mean() > 0 else x

    net = nn.Sequential(Branchy())
    _, report = convert(net, input_shape=(2, 3, 3))
    (found,) = [o for o in report.obstacles if o.module.endswith("Branchy")]
    assert found.blocking and "torch.fx" in found.problem
    assert not report.certifiable


def test_modules_left_alone_are_reported():
    from torch.nn.utils import parametrizations

    class MyConv(nn.Conv2d):
        def forward(self, x):
            return super().forward(x) * 2

    hooked = nn.Conv2d(2, 2, 1)
    hooked.register_forward_hook(lambda *args: None)
    normalized = parametrizations.spectral_norm(nn.Linear(2, 2))
    net = nn.Sequential(MyConv(2, 2, 1), hooked, nn.GELU(), nn.Conv3d(2, 2, 1), nn.Flatten(), normalized)
    converted, report = convert(net)
    assert type(converted[0]) is MyConv and type(converted[1]) is nn.Conv2d
    assert type(converted[5]) is type(normalized) and any("parametrizations" in note for note in report.notes)
    assert any("'1' not converted" in note and "hooks" in note for note in report.notes)
    assert any("'0' not converted" in note and "MyConv" in note for note in report.notes)
    names = {o.module for o in report.obstacles}
    assert {"torch.nn.Conv2d", "torch.nn.GELU", "torch.nn.Conv3d"} <= names


def test_attention_is_reported_and_left_whole():
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True)
    converted, report = convert(layer)
    assert type(converted.self_attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert type(converted.linear1) is GramLinear
    assert any(o.module == "torch.nn.TransformerEncoderLayer" and o.blocking and "attention" in o.problem
               for o in report.obstacles)


def test_shared_modules_stay_shared():
    conv = nn.Conv2d(2, 2, 3, padding=1)
    net = nn.Sequential(conv, nn.ReLU(), conv)
    converted, report = convert(net)
    assert converted[0] is converted[2] and isinstance(converted[0], GramConv2d)


def test_bad_arguments_raise_and_change_nothing():
    net = small_cnn()
    with pytest.raises(ValueError, match="activation"):
        convert(net, activation="relu")
    with pytest.raises(ValueError, match="input_shape"):
        convert(net, input_shape=(3, -1, 8))
    with pytest.raises(TypeError, match="replace"):
        convert(net, replace={"Conv2d": no_bn})
    with pytest.raises(ValueError, match="n_iter"):
        convert(net, n_iter=0)
    with pytest.raises(TypeError, match="nn.Module"):
        convert(lambda x: x)
    with pytest.raises(ValueError, match=r"does not accept inputs of shape \(batch, 1, 8, 8\)"):
        convert(net, input_shape=(1, 8, 8))

    def broken(module):
        raise RuntimeError("user error")

    with pytest.raises(RuntimeError, match="user error"):
        convert(net, replace={nn.Flatten: broken}, inplace=True)
    assert type(net[0]) is nn.Conv2d and type(net[1]) is nn.ReLU  # nothing was half-converted
    with pytest.raises(TypeError, match="not an nn.Module"):
        convert(net, replace={nn.ReLU: lambda m: "relu"})


def test_result_unpacks_and_converted_models_train():
    result = convert(small_cnn())
    assert isinstance(result, Conversion)
    model, report = result
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = model(torch.randn(4, 3, 8, 8)).square().mean()
    loss.backward()
    opt.step()
    assert lipschitz_bound(model, (3, 8, 8)) <= 1 + 1e-5


def test_an_in_place_module_inside_a_child_container_is_refused():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.act = nn.Sequential(nn.LeakyReLU(10, inplace=True))

        def forward(self, x):
            y = 2 * x
            return self.act(y) + y  # the child writes into y before the sum reads it

    with pytest.raises(LipschitzBoundError, match="in-place"):
        traced_lipschitz_bound(Block(), (4,))


def test_integer_results_of_the_input_are_not_lipschitz():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.pool = nn.MaxPool2d(3, 1, 1, return_indices=True)

        def forward(self, x):
            return x + self.pool(x)[1]  # argmax indices jump under tiny perturbations

    with pytest.raises(LipschitzBoundError, match="torch.int64 result"):
        traced_lipschitz_bound(Block(), (1, 4, 4))


def test_the_rounding_of_a_traced_container_is_propagated_node_by_node():
    class Shift(nn.Module):  # the identity in exact arithmetic; in float64 it keeps no digit of x below 1
        def __init__(self):
            super().__init__()
            self.register_buffer("c", torch.tensor(2.0 ** 52, dtype=torch.float64))
            self.inner = nn.Identity()

        def forward(self, x):
            return self.inner((x + self.c) - self.c)

    linear = nn.Linear(2, 2, bias=False).double()
    with torch.no_grad():
        linear.weight.copy_(torch.eye(2))
    converted, report = convert(nn.Sequential(Shift(), linear).double(), input_shape=(2,))
    assert report.registered and report.lipschitz_bound < 1.01
    x, y = torch.tensor([[0.6, 0.4]], dtype=torch.float64), torch.tensor([0])
    radius = float(certified_accuracy(converted.eval(), (x, y), eps=[0.1], progress=False).radii[0])
    assert radius <= 0.2 / 2 ** 0.5  # the exact margin's radius; the lost digits make it 0 here
    with torch.no_grad():  # a point at distance 0.21 is misclassified, so no radius above that holds
        assert int(converted(x + torch.tensor([[-0.15, 0.15]], dtype=torch.float64)).argmax()) == 1


class Amplifies(nn.Module):
    """A container whose own forward scales (3 x) or copies (``torch.cat([y, y])``: sqrt 2) its child's output."""

    def __init__(self, how):
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.how = how

    def forward(self, x):
        y = self.linear(x)
        return 3 * y if self.how == "scale" else torch.cat([y, y], 1)


@pytest.mark.parametrize("how, bound", [("scale", 3.0), ("copy", 2 ** 0.5)])
def test_a_container_whose_forward_amplifies_is_an_obstacle(how, bound):
    """The model's bound was 3 (or sqrt 2) with its 1-Lipschitz Gram layer, and no obstacle said why."""
    _, report = convert(nn.Sequential(Amplifies(how)), input_shape=(4,))
    assert report.lipschitz_bound == pytest.approx(bound, rel=1e-5)
    (found,) = obstacle(report, f"{__name__}.Amplifies")
    assert not found.blocking and f"{bound:.4g}" in found.problem


def test_maxmin_never_pairs_along_the_batch_dimension():
    """MaxPool2d on (N, H, W) pools each example as one channel; the MaxMin after it got dim=-3
    from the pooling's layout, the batch dimension of its (N, H/2, W/2) input: example 0's output
    changed with example 1, and the converted model was not certifiable."""
    net = nn.Sequential(nn.MaxPool2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(16, 10))
    converted, report = convert(net, input_shape=(8, 8))
    x = torch.randn(4, 8, 8)
    others = x.clone()
    others[1:] += 1
    assert torch.equal(converted(x)[0], converted(others)[0])
    assert report.certifiable, report.bound_error


@pytest.mark.parametrize("layer", [nn.Flatten(0, -1), MaxMin(dim=0)], ids=["Flatten(0, -1)", "MaxMin(dim=0)"])
def test_a_layer_acting_on_the_batch_is_a_blocking_obstacle(layer):
    """They are 1-Lipschitz types, skipped by the diagnosis: the report listed no obstacle for a
    model lipnet.certify refuses because of them."""
    _, report = convert(nn.Sequential(nn.Linear(4, 4), layer), input_shape=(4,), activation=None)
    assert not report.certifiable
    (found,) = [o for o in report.obstacles if o.path == "1"]
    assert found.blocking and "batch dimension" in found.problem
