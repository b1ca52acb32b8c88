"""Registered architectures: construction, spec round trip, 1-Lipschitz, orthogonal start."""

import pytest
import torch
from torch import nn

from lipnet.models import MODELS, ConvNet, LiResNet, build_model, model_spec, orthogonal_init_
from lipnet.nn import GramConv2d, GramLinear, GramResidualConv2d, InputNormalization

CONVNET = dict(widths=(4, 8), depths=(1, 1), dense=(16,))
LIRESNET = dict(width=8, depth=2, dense=(16,))


def small(name):
    """Overrides that keep every registered model cheap to run (the real sizes only construct)."""
    return CONVNET if name.startswith("convnet") else LIRESNET


def build(name, **kwargs):
    return build_model(name, in_channels=3, num_classes=10, input_size=16, mean=(0.5, 0.4, 0.3),
                       std=(0.25, 0.2, 0.3), **kwargs)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_registered_size_constructs(name):
    model = build_model(name, in_channels=3, num_classes=100, input_size=16)
    assert model[-1].out_features == 100


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_registered_model_runs_and_rebuilds_from_its_spec(name):
    model = build(name, **small(name))
    x = torch.rand(2, 3, 16, 16)
    assert model(x).shape == (2, 10)
    spec = model_spec(model)
    assert spec["name"] == name
    clone = build_model(spec["name"], **spec["kwargs"])
    clone.load_state_dict(model.state_dict())
    model.eval(), clone.eval()
    assert torch.equal(model(x), clone(x))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_models_are_built_only_from_lipnet_layers(name):
    allowed = (GramConv2d, GramLinear, InputNormalization, nn.Flatten, nn.Sequential)
    for module in build(name, **small(name)).modules():
        assert isinstance(module, allowed) or type(module).__module__.startswith("lipnet."), type(module)


@pytest.mark.parametrize("name", ["convnet", "liresnet"])
def test_gradient_norm_never_exceeds_the_normalization_constant(name):
    torch.manual_seed(0)
    model = build(name, **small(name)).double()
    for p in model.parameters():  # away from the orthogonal start
        p.data.add_(0.3 * torch.randn_like(p))
    x = torch.rand(16, 3, 16, 16, dtype=torch.float64, requires_grad=True)
    worst = 0.0
    for _ in range(5):
        u = torch.nn.functional.normalize(torch.randn(16, 10, dtype=torch.float64), dim=1)
        (grad,) = torch.autograd.grad((model(x) * u).sum(), x)
        worst = max(worst, grad.flatten(1).norm(dim=1).max().item())
    assert 0 < worst <= 1 / 0.2 * (1 + 1e-9)


def test_orthogonal_init_makes_same_and_patchifying_convolutions_isometries():
    conv = orthogonal_init_(GramConv2d(8, 8, 3, padding=1))
    patch = orthogonal_init_(GramConv2d(4, 16, 2, stride=2))
    for layer, channels in ((conv, 8), (patch, 4)):
        x = torch.randn(3, channels, 10, 10)
        raw = layer._conv_forward(x, layer.weight, None)
        torch.testing.assert_close(raw.flatten(1).norm(dim=1), x.flatten(1).norm(dim=1))
    assert conv.bias.abs().max() == 0
    block = orthogonal_init_(GramResidualConv2d(4, 3))
    assert block.weight.abs().max() == 0  # the block starts as the identity, divided by its bound
    x = torch.randn(2, 4, 6, 6)
    torch.testing.assert_close(block(x), x / block.weight_norm_bound((6, 6)))


def test_spec_errors():
    with pytest.raises(ValueError, match="unknown model"):
        build_model("resnet-9000")
    with pytest.raises(TypeError, match="plain Python"):
        build_model("convnet-xs", in_channels=1, num_classes=10, input_size=28, mean=torch.zeros(1))
    with pytest.raises(ValueError, match="no spec"):
        model_spec(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="even"):
        ConvNet(1, 10, 28, widths=(5,), depths=(1,))
    with pytest.raises(ValueError, match="halved"):
        ConvNet(1, 10, 28, widths=(4, 4, 4, 4), depths=(1, 1, 1, 1))
    with pytest.raises(ValueError, match="stem_stride"):
        ConvNet(1, 10, 28, stem_stride=0)
    with pytest.raises(ValueError, match="divisible"):
        LiResNet(3, 10, 32, width=8, depth=1, neck_stride=3)


@pytest.mark.parametrize("family", ["convnet", "liresnet"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_torch_func_ensembles_and_per_example_gradients(family, training):
    """vmap over stacked parameters (torch.func.stack_module_state) runs each model; vmap of
    grad over examples gives each example's gradient of the whole model."""
    from torch.func import functional_call, grad, stack_module_state, vmap

    torch.manual_seed(0)
    models = [build(family, **small(family)).double().train(training) for _ in range(3)]
    x, y = torch.rand(4, 3, 16, 16, dtype=torch.float64), torch.tensor([0, 3, 5, 9])
    params, buffers = stack_module_state(models)
    base = models[0]

    def run(params, buffers, x):
        return functional_call(base, (params, buffers), (x,))
    outputs = vmap(run, in_dims=(0, 0, None))(params, buffers, x)
    with torch.no_grad():
        torch.testing.assert_close(outputs, torch.stack([model(x) for model in models]))

    def loss(params, x, y):
        return nn.functional.cross_entropy(functional_call(base, (params, {}), (x[None],)), y[None])
    own = {name: p.detach() for name, p in base.named_parameters()}
    per_example = vmap(grad(loss), in_dims=(None, 0, 0))(own, x, y)
    for i in range(len(x)):
        base.zero_grad()
        nn.functional.cross_entropy(base(x[i:i + 1]), y[i:i + 1]).backward()
        for name, p in base.named_parameters():
            torch.testing.assert_close(per_example[name][i], p.grad, msg=name)
