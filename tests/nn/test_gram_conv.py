import copy

import pytest
import torch
from torch import nn

from lipnet import GramConv2d
from lipnet.nn import GramResidualConv2d, GramSequential
from lipnet.bounds import exact_conv2d_spectral_norm
from lipnet.nn.normalized import TINY

CONFIGS = [
    dict(in_channels=3, out_channels=8, kernel_size=3, padding=1),
    dict(in_channels=4, out_channels=2, kernel_size=(3, 2), stride=2, padding=(1, 0), bias=False),
    dict(in_channels=4, out_channels=6, kernel_size=3, padding="same", padding_mode="circular"),
    dict(in_channels=4, out_channels=4, kernel_size=2, padding="same", dilation=2, groups=2),
    dict(in_channels=2, out_channels=3, kernel_size=3, stride=3, padding=2, padding_mode="reflect"),
    dict(in_channels=2, out_channels=2, kernel_size=4, padding=1, padding_mode="replicate"),
]


@pytest.mark.parametrize("cfg", CONFIGS)
def test_is_a_conv2d_with_the_same_state_dict(cfg):
    layer = GramConv2d(**cfg)
    plain = nn.Conv2d(**cfg)
    assert isinstance(layer, nn.Conv2d)
    assert list(layer.state_dict()) == list(plain.state_dict())
    layer.load_state_dict(plain.state_dict())
    torch.testing.assert_close(layer.weight, plain.weight)
    plain.load_state_dict(layer.state_dict())
    assert layer.kernel_size == plain.kernel_size and layer.padding == plain.padding


@pytest.mark.parametrize("cfg", CONFIGS)
def test_forward_applies_the_normalized_weight(cfg):
    layer = GramConv2d(**cfg)
    x = torch.randn(2, cfg["in_channels"], 9, 9)
    out = layer(x)
    plain = nn.Conv2d(**cfg)
    plain.load_state_dict(layer.state_dict())
    with torch.no_grad():
        plain.weight.copy_(layer.normalized_weight((9, 9)))
    torch.testing.assert_close(out, plain(x))


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("size", [(5, 5), (9, 7), (13, 14)])  # (13, 14): the autocorrelation path on the CPU
def test_normalized_operator_norm_is_at_most_one(cfg, size):
    layer = GramConv2d(**cfg).double()
    weight = layer.normalized_weight(size)
    kw = {k: v for k, v in cfg.items() if k in ("stride", "padding", "dilation", "groups", "padding_mode")}
    exact = exact_conv2d_spectral_norm(weight, size, **kw)
    assert exact <= 1 + 1e-12
    certified = layer.lipschitz_bound(size)
    assert exact <= certified <= 1 + 1e-5


def test_train_and_eval_agree_and_eval_is_cached():
    layer = GramConv2d(3, 5, 3, padding=1)
    x = torch.randn(4, 3, 8, 8)
    train_out = layer(x)
    layer.eval()
    calls = []
    original = layer._checked_bound
    layer._checked_bound = lambda *a: calls.append(1) or original(*a)
    with torch.no_grad():
        first = layer(x)
        second = layer(x)
    torch.testing.assert_close(first, train_out)
    torch.testing.assert_close(second, train_out)
    assert len(calls) == 1  # computed once, then cached
    with torch.no_grad():
        layer(torch.randn(1, 3, 6, 6))  # another input size gets its own bound
    assert len(calls) == 2


def test_eval_cache_refreshes_when_weights_change():
    layer = GramConv2d(3, 5, 3, padding=1)
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    x = torch.randn(4, 3, 8, 8)
    layer(x).square().sum().backward()
    layer.eval()
    with torch.no_grad():
        before = layer(x)
    opt.step()
    with torch.no_grad():
        after_step = layer(x)
    assert not torch.allclose(before, after_step)
    layer.train()
    torch.testing.assert_close(after_step, layer(x).detach())
    layer.eval()
    layer.load_state_dict(nn.Conv2d(3, 5, 3, padding=1).state_dict())
    with torch.no_grad():
        after_load = layer(x)
    layer.train()
    torch.testing.assert_close(after_load, layer(x).detach())


def test_eval_after_writes_through_data_uses_the_new_weight():
    layer = GramConv2d(3, 5, 3, padding=1).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        before = layer(x)
    layer.weight.data.mul_(-1)  # bypasses the version counter the cache watches
    layer.eval()  # documented: eval() again after such writes
    with torch.no_grad():
        torch.testing.assert_close(layer(x), -before + 2 * layer.bias[:, None, None])


def test_eval_with_weight_gradients_is_not_cached():
    layer = GramConv2d(2, 2, 3, padding=1).eval()
    layer(torch.randn(1, 2, 5, 5)).sum().backward()
    assert layer.weight.grad is not None and layer._eval_cache == {}


def test_gradient_flows_through_the_bound():
    layer = GramConv2d(2, 3, 3, padding=1).double()
    x = torch.randn(2, 2, 6, 6, dtype=torch.float64)
    fn = lambda w: nn.functional.conv2d(x, w / layer._operator_norm(w, (6, 6), 8), padding=1)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (layer.weight.detach().clone().requires_grad_(),))
    # The layer's own gradient equals the one through the bound, not through W alone.
    out = layer(x).sum()
    (g_layer,) = torch.autograd.grad(out, layer.weight)
    w = layer.weight.detach().clone().requires_grad_()
    (g_manual,) = torch.autograd.grad(fn(w).sum(), w)
    assert torch.allclose(g_layer, g_manual, rtol=1e-6, atol=1e-9)


def test_gradcheck_wrt_input_and_weight():
    layer = GramConv2d(2, 2, 3, stride=2, padding=1).double()
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda inp: layer(inp), (x,))
    params = (layer.weight,)
    assert torch.autograd.gradcheck(
        lambda w: nn.functional.conv2d(x.detach(), w / layer._operator_norm(w, (5, 5), 10), stride=2, padding=1),
        params,
    )


def test_tiny_weights_stay_finite_and_zero_weights_are_the_zero_map_without_gradient():
    layer = GramConv2d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 6, 6)
    for scale in [1e-30, 1e-20]:
        with torch.no_grad():
            layer.weight.copy_(torch.randn_like(layer.weight) * scale)
        out = layer(x)
        out.sum().backward()
        assert torch.isfinite(out).all() and torch.isfinite(layer.weight.grad).all()
        layer.weight.grad = None
    assert layer.lipschitz_bound((6, 6)) <= 1 + 1e-5
    with torch.no_grad():
        layer.weight.zero_()
    with torch.no_grad():
        assert layer.weight_norm_bound((6, 6)).item() == 0.0
        assert layer.normalized_weight((6, 6)).abs().max().item() == 0.0
        assert layer(x).sub(layer.bias.view(1, -1, 1, 1)).abs().max().item() == 0.0
    assert layer.eval().requires_grad_(False)(x).sub(layer.bias.view(1, -1, 1, 1)).abs().max().item() == 0.0
    assert TINY > 0


@pytest.mark.parametrize("dtype, value", [(torch.float32, 1.0), (torch.bfloat16, 1.0), (torch.float16, 1.0),
                                          (torch.float32, 1e30), (torch.float64, 1e300), (torch.bfloat16, 1e30)])
@pytest.mark.parametrize("cfg", [dict(padding=1), dict(padding=4, dilation=4)], ids=["corners", "dilated"])
def test_a_weight_that_reads_only_padding_is_the_zero_map_in_every_dtype(dtype, value, cfg):
    """On a 1x1 input, the corner taps of a 3x3 kernel read only zero padding: the operator is
    zero (bound 0) though the weight is not. float16 (largest value 65504) once overflowed
    W / TINY to inf and the forward to inf * 0 = NaN, and so did float32 for entries above
    about 3e26 (and float64 above 1e296)."""
    layer = GramConv2d(2, 2, 3, dtype=dtype, **cfg)
    with torch.no_grad():
        layer.weight.zero_()
        layer.weight[:, :, 0, 0] = value
    x = torch.randn(3, 2, 1, 1, dtype=dtype, requires_grad=True)
    assert layer.weight_norm_bound((1, 1)).item() == 0.0
    assert torch.isfinite(layer.normalized_weight((1, 1))).all()
    out = layer(x)
    assert out.sub(layer.bias.view(1, -1, 1, 1)).abs().max().item() == 0.0
    (grad_x,) = torch.autograd.grad(out.sum(), x)
    assert grad_x.abs().max().item() == 0.0
    with torch.no_grad():
        layer.weight[:, :, 1, 1] = 1e-3  # a tiny operator beside a large ignored tap: finite, still <= 1
    assert torch.isfinite(layer(x)).all()
    assert layer.lipschitz_bound((1, 1)) <= 1 + 1e-5


@pytest.mark.parametrize("stacked", [False, True], ids=["alone", "stacked"])
def test_a_zero_weight_refuses_its_gradient_with_a_clear_error(stacked):
    """W / ||W|| has no derivative at W = 0 (the clamp would make it 1e12 times the incoming one);
    the forward, input gradients and the other layers' gradients are unaffected."""
    convs = [GramConv2d(4, 4, 3, padding=1) for _ in range(3)]
    with torch.no_grad():
        convs[1].weight.zero_()
    model = GramSequential(*convs, stack_bounds=stacked)
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    out = model(x)
    (grad_x,) = torch.autograd.grad(out.sum(), x, retain_graph=True)  # an input gradient (attacks, saliency)
    assert torch.isfinite(grad_x).all()
    with pytest.raises(ValueError, match="the weight is zero.*reset_parameters"):
        out.sum().backward()
    convs[1].weight.requires_grad_(False)  # frozen: nothing asks for its gradient
    model(x).sum().backward()
    assert convs[1].weight.grad is None and torch.isfinite(convs[0].weight.grad).all()
    convs[1].weight.requires_grad_(True)
    convs[1].reset_parameters()
    model.zero_grad()
    model(x).sum().backward()
    assert torch.isfinite(convs[1].weight.grad).all()


def test_a_zero_residual_weight_is_the_identity_and_trains():
    block = GramResidualConv2d(4, 3, bias=False)
    with torch.no_grad():
        block.weight.zero_()
    x = torch.randn(2, 4, 6, 6)
    out = block(x)
    torch.testing.assert_close(out, x, rtol=1e-4, atol=1e-4)  # the bound of I is 1 up to its smoothing
    out.square().sum().backward()
    assert torch.isfinite(block.weight.grad).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_raise(bad):
    layer = GramConv2d(3, 4, 3, padding=1)
    with torch.no_grad():
        layer.weight[0, 0, 0, 0] = bad
    with pytest.raises(FloatingPointError, match="diverged"):
        layer(torch.randn(1, 3, 5, 5))


def test_bound_needs_an_input_size():
    layer = GramConv2d(3, 4, 3, padding=1)
    with pytest.raises(ValueError, match="input_size"):
        layer.lipschitz_bound()
    layer(torch.randn(1, 3, 7, 7))
    assert layer.lipschitz_bound() == layer.lipschitz_bound((7, 7))


def test_unsupported_geometry_fails_at_construction():
    with pytest.raises(ValueError):
        GramConv2d(3, 3, 3, padding="same", stride=2)
    with pytest.raises(ValueError):
        GramConv2d(3, 3, 3, padding_mode="mirror")


def test_constructor_signature_matches_conv2d():
    layer = GramConv2d(3, 6, 3, 1, 1, 1, 3, False, "circular", "cpu", torch.float64, n_iter=4)
    assert layer.groups == 3 and layer.bias is None and layer.weight.dtype == torch.float64
    assert layer.n_iter == 4 and "n_iter=4" in repr(layer)
    with pytest.raises(ValueError, match="n_iter"):
        GramConv2d(3, 3, 3, n_iter=0)


def test_deepcopy_and_pickle_state():
    layer = GramConv2d(3, 4, 3, padding=1)
    clone = copy.deepcopy(layer)
    x = torch.randn(1, 3, 5, 5)
    torch.testing.assert_close(layer(x), clone(x))


def test_autocast_keeps_bound_in_float32():
    layer = GramConv2d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
        assert layer.weight_norm_bound((8, 8)).dtype == torch.float32
    torch.testing.assert_close(out.float(), layer(x), atol=5e-2, rtol=5e-2)


def test_screen_iter_is_a_layer_setting():
    """More screening steps: still sound, at least as tight on a near-identity kernel, and a
    setting of the layer (its own stack key, its repr); the certified bound ignores it."""
    from lipnet.bounds import exact_conv2d_spectral_norm
    from lipnet.nn import GramResidualConv2d

    torch.manual_seed(0)
    layers = [GramResidualConv2d(16, 3, screen_iter=s) for s in (5, 9)]
    noise = 0.01 * torch.randn(16, 16, 3, 3) / 12
    for layer in layers:
        layer.weight.data.copy_(noise)
    exact = exact_conv2d_spectral_norm(layers[0]._operator_weight().detach().double(), (12, 12), padding="same")
    default, more = (layer.weight_norm_bound((12, 12)).item() for layer in layers)
    assert more >= exact * (1 - 1e-5) and default >= exact * (1 - 1e-5)
    assert more <= default * (1 + 1e-6)
    assert layers[0].stack_key() != layers[1].stack_key()
    assert "screen_iter=9" in repr(layers[1]) and "screen_iter" not in repr(layers[0])
    # Each applies W / its own bound; the float64 certificate sees the ratio.
    assert layers[0].lipschitz_bound((12, 12)) == pytest.approx(layers[1].lipschitz_bound((12, 12)) * more / default,
                                                                rel=1e-5)
    with pytest.raises(ValueError, match="screen_iter"):
        GramConv2d(4, 4, 3, screen_iter=-1)


def test_an_exported_program_runs_with_a_trainable_weight():
    x = torch.randn(2, 3, 8, 8)
    layer = GramConv2d(3, 4, 3, padding=1).eval()
    program = torch.export.export(layer, (x,))
    with torch.no_grad():
        expected = layer(x)
    torch.testing.assert_close(program.module()(x).detach(), expected)


@pytest.mark.parametrize("attr, value", [("stride", 2), ("padding", 2), ("dilation", 2)])
def test_an_int_geometry_set_after_construction_is_bounded_as_torch_applies_it(attr, value):
    """``nn.Conv2d`` stores pairs, but ``layer.stride = 2`` runs in torch (``F.conv2d`` takes ints);
    the certificate of such a layer once crashed on ``self.stride[0]``."""
    from lipnet.certify import lipschitz_bound

    torch.manual_seed(0)
    layer = GramConv2d(2, 3, 3, padding=1, dtype=torch.float64)
    setattr(layer, attr, value)
    x = torch.randn(2, 2, 7, 7, dtype=torch.float64)
    weight = layer.normalized_weight((7, 7)).detach()
    torch.testing.assert_close(layer(x), nn.functional.conv2d(x, weight, layer.bias, layer.stride, layer.padding,
                                                              layer.dilation))
    exact = exact_conv2d_spectral_norm(weight, (7, 7), stride=layer.stride, padding=layer.padding,
                                       dilation=layer.dilation)
    assert exact <= 1 + 1e-9
    assert lipschitz_bound(nn.Sequential(layer), (2, 7, 7)) >= exact
