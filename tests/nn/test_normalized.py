"""The eval-mode cache of normalized weights (lipnet.nn.normalized) sees every change it depends on."""

import pytest
import torch
from torch.func import functional_call
from torch.nn.utils import parametrize

from lipnet.bounds import refine_exceeding
from lipnet.nn import GramConv2d, GramLinear

LAYERS = [
    pytest.param(lambda: GramLinear(6, 4), (3, 6), id="linear"),
    pytest.param(lambda: GramConv2d(2, 3, 3, padding=1), (2, 2, 6, 6), id="conv"),
]


def fresh(make, shape, seed=0):
    torch.manual_seed(seed)
    return make().eval(), torch.randn(shape)


def reference(layer, x):
    """The output of a fresh copy of the layer (nothing cached)."""
    copy = type(layer).__new__(type(layer))
    copy.__dict__ = {**layer.__dict__, "_eval_cache": {}}
    with torch.no_grad():
        return copy(x)


@pytest.mark.parametrize("make, shape", LAYERS)
@pytest.mark.parametrize("fused", [False, True])
def test_optimizer_steps_in_eval_mode_refresh_the_cache(make, shape, fused):
    layer, x = fresh(make, shape)
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.1, fused=fused)
    with torch.no_grad():
        before = layer(x)
    layer(x).square().sum().backward()
    optimizer.step()  # fused steps leave the version counter as it was
    with torch.no_grad():
        after = layer(x)
    assert not torch.equal(before, after) and torch.equal(after, reference(layer, x))


@pytest.mark.parametrize("make, shape", LAYERS)
@pytest.mark.parametrize("edit", ["row", "whole", "copy"])
def test_in_place_edits_of_the_weight_in_eval_mode_refresh_the_cache(make, shape, edit):
    """Same tensor, same memory, no optimizer step: only the version counter changes."""
    layer, x = fresh(make, shape)
    with torch.no_grad():
        before = layer(x)
        if edit == "row":
            layer.weight[0].mul_(5)
        elif edit == "whole":
            layer.weight.mul_(-1)
        else:
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=torch.Generator().manual_seed(1)))
        after = layer(x)
    assert not torch.equal(before, after)
    twin, _ = fresh(make, shape)
    twin.load_state_dict(layer.state_dict())
    with torch.no_grad():
        assert torch.equal(after, twin(x))


@pytest.mark.parametrize("make, shape", LAYERS)
def test_a_new_weight_tensor_is_never_served_an_old_one(make, shape):
    layer, x = fresh(make, shape)
    with torch.no_grad():
        for seed in range(10):  # each new tensor may reuse the memory and version number of the last
            weight = torch.randn(layer.weight.shape, generator=torch.Generator().manual_seed(seed))
            out = functional_call(layer, {"weight": weight, "bias": layer.bias}, (x,))
            if isinstance(layer, GramLinear):
                normalized = weight / layer._operator_norm(weight, None, layer.n_iter)
                expected = torch.nn.functional.linear(x, normalized, layer.bias)
            else:
                normalized = weight / layer._operator_norm(weight, tuple(x.shape[-2:]), layer.n_iter)
                expected = torch.nn.functional.conv2d(x, normalized, layer.bias, padding=1)
            torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("make, shape", LAYERS)
def test_parametrized_weights_are_recomputed(make, shape):
    layer, x = fresh(make, shape)

    class Scale(torch.nn.Module):
        def forward(self, w):
            return w * 2

    parametrize.register_parametrization(layer, "weight", Scale())
    with torch.no_grad():
        before = layer(x)
        layer.parametrizations.weight.original.mul_(-1).add_(0.5)
        after = layer(x)
    assert not torch.equal(before, after)


@pytest.mark.parametrize("make, shape", LAYERS)
def test_inference_mode_outputs_do_not_leak_into_autograd(make, shape):
    layer, x = fresh(make, shape)
    layer.requires_grad_(False)
    with torch.inference_mode():
        layer(x)
    x = x.clone().requires_grad_(True)
    layer(x).square().sum().backward()  # e.g. an attack on a frozen model after an evaluation
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_the_refinement_setting_is_part_of_the_key():
    torch.manual_seed(0)
    layer = GramConv2d(16, 16, 3, padding=1, bias=False).eval()
    with torch.no_grad():  # a near-isometry: screening alone gives a bound above the refined one
        layer.weight.zero_()
        layer.weight[:, :, 1, 1] = torch.eye(16)
        layer.weight.add_(0.003 * torch.randn_like(layer.weight))
        x = torch.randn(1, 16, 12, 12)
        refined = layer(x)
        with refine_exceeding(False):
            screened = layer(x)
            fresh_screened = reference(layer, x)
        again = layer(x)
    assert torch.equal(screened, fresh_screened) and torch.equal(again, refined)
    assert not torch.equal(screened, refined)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # torch's own, for nn.Linear(0, n) too
def test_layers_without_features_are_the_zero_map_as_in_torch():
    linear = GramLinear(0, 4)
    out = linear(torch.randn(2, 0))
    assert torch.equal(out, linear.bias.expand(2, 4)) and linear.lipschitz_bound() == 0.0
    out.sum().backward()
    assert torch.equal(linear.bias.grad, torch.full((4,), 2.0))
    conv, plain = GramConv2d(0, 4, 3), torch.nn.Conv2d(0, 4, 3)
    x = torch.randn(2, 0, 5, 5)
    assert conv(x).shape == plain(x).shape and conv.lipschitz_bound((5, 5)) == 0.0


def test_a_bound_without_input_size_is_for_the_last_size_seen_not_an_earlier_cached_one():
    torch.manual_seed(0)
    layer = GramConv2d(1, 1, 3, dilation=3, padding=3, bias=False).eval()
    with torch.no_grad():
        layer(torch.randn(1, 1, 16, 16))
        layer(torch.randn(1, 1, 2, 2))  # at 2 x 2 only the centre tap touches the input
    assert layer.lipschitz_bound() == layer.lipschitz_bound((2, 2))
    assert torch.equal(layer.normalized_weight(), layer.normalized_weight((2, 2)))
    assert 1 - 1e-6 < layer.lipschitz_bound() <= 1 + 1e-6


def test_padding_changed_after_construction_is_refused_where_the_forward_ignores_it():
    layer = GramConv2d(1, 1, 3, padding=2, padding_mode="replicate")
    layer.padding = (0, 0)  # nn.Conv2d would still pad by 2 in this mode
    with pytest.raises(ValueError, match="changed .* after construction"):
        layer(torch.randn(1, 1, 5, 5))
    zeros = GramConv2d(1, 1, 3, padding=2)
    zeros.padding = (0, 0)  # honoured by F.conv2d, and by the bound
    assert zeros(torch.randn(1, 1, 5, 5)).shape == (1, 1, 3, 3)


def test_no_screening_steps_are_allowed_whatever_path_the_bound_takes():
    layer = GramConv2d(1, 1, (1, 2), stride=(2, 1), screen_iter=0)
    assert torch.isfinite(layer(torch.randn(1, 1, 8, 6))).all()


def test_torch_func_over_the_input_of_a_frozen_model_uses_the_cached_weights():
    from torch.func import jacrev, vmap

    from lipnet.models import build_model

    torch.manual_seed(0)
    net = build_model("convnet", in_channels=1, num_classes=4, input_size=8, widths=(4,), depths=(1,),
                      dense=(8,)).eval().requires_grad_(False)
    x = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        net(x)  # fills the cache of normalized weights
    jacobians = vmap(jacrev(lambda z: net(z[None])[0]))(x)
    for z, jacobian in zip(x, jacobians):
        expected = torch.autograd.functional.jacobian(lambda v: net(v[None])[0], z)
        torch.testing.assert_close(jacobian, expected)


@pytest.mark.parametrize("make, shape", LAYERS)
def test_torch_func_over_the_weights_bypasses_the_cache_and_checks_what_it_can(make, shape):
    from torch.func import grad, vmap

    layer, x = fresh(make, shape)
    with torch.no_grad():
        before = layer(x)  # fills the cache
    stack = torch.stack([layer.weight.detach(), 3 * layer.weight.detach(), torch.randn_like(layer.weight)])

    def run(weight):
        return functional_call(layer, {"weight": weight, "bias": layer.bias}, (x,))
    with torch.no_grad():
        outputs = vmap(run)(stack)
        torch.testing.assert_close(outputs, torch.stack([reference(layer, x) if i < 2 else run(w)
                                                         for i, w in enumerate(stack)]))
        assert torch.equal(layer(x), before)
    nan = layer.weight.detach().clone()
    nan[0] = float("nan")
    with pytest.raises(FloatingPointError, match="contains NaN"):
        grad(lambda w: run(w).sum())(nan)
    with torch.no_grad():  # under vmap a copy cannot steer Python: its bound is NaN, not an error
        assert vmap(run)(torch.stack([nan, stack[0]]))[0].isnan().all()


@pytest.mark.parametrize("make, shape", LAYERS)
def test_torchscript_is_refused_with_the_way_out(make, shape):
    layer, _ = fresh(make, shape)
    with pytest.raises(TypeError, match="lipnet.export"):
        torch.jit.script(torch.nn.Sequential(layer))


def test_tracing_a_conv_layer_is_refused_with_the_way_out():
    layer, x = fresh(lambda: GramConv2d(2, 3, 3, padding=1), (2, 2, 6, 6))
    with pytest.raises(TypeError, match="lipnet.export"):
        torch.jit.trace(layer, x)


@pytest.mark.parametrize("make, shape", LAYERS)
def test_weight_data_assigned_twice_between_forwards_is_never_served_the_first_weight(make, shape):
    """``weight.data = t`` keeps the parameter's version counter; after two such assignments the
    second tensor may sit in the memory the first (cached) one freed, so its address is no
    evidence of a new weight unless the cache keeps that memory from being reused."""
    layer, x = fresh(make, shape)
    generator = torch.Generator().manual_seed(1)
    stale = 0
    with torch.no_grad():
        for _ in range(30):
            layer(x)
            first = torch.randn(layer.weight.shape, generator=generator)
            layer.weight.data = first
            del first
            second = torch.randn(layer.weight.shape, generator=generator)
            layer.weight.data = second
            del second
            stale += not torch.equal(layer(x), reference(layer, x))
    assert stale == 0


def test_weight_data_set_to_its_own_transpose_is_seen():
    """Same memory, same version, other strides: another operator."""
    layer, x = fresh(lambda: GramLinear(6, 6), (3, 6))
    with torch.no_grad():
        before = layer(x)
        layer.weight.data = layer.weight.data.t()
        after = layer(x)
    assert not torch.equal(before, after) and torch.equal(after, reference(layer, x))


def test_a_weight_cached_without_the_finite_check_is_checked_once_it_is_on():
    """``check_finite`` is part of the cache key: a NaN weight cached while the check was off
    (the trainer turns it off on CUDA) raises once it is back on, instead of serving NaN outputs."""
    layer = GramLinear(4, 3).eval().requires_grad_(False)
    layer.check_finite = False
    with torch.no_grad():
        layer.weight[0, 0] = float("nan")
    assert torch.isnan(layer(torch.randn(2, 4))).all()
    layer.check_finite = True
    with pytest.raises(FloatingPointError, match="NaN"):
        layer(torch.randn(2, 4))
