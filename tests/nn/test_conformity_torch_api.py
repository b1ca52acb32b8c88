"""Conformity of the Gram layers with the torch.nn modules they replace, as a PyTorch user relies on them.

Each situation where the layer produces an output is also checked for soundness: the operator it
applies (its normalized weight put into torch's own functional, or its Jacobian, in float64) has an
exact operator norm (SVD of the dense matrix) of at most 1 (``1e-10`` relative in float64, ``1e-5``
in float32). Complements test_torch_integration.py, test_layer_protocol.py and the audit files:
what they test is not repeated here.
"""

import copy
import functools
import inspect
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lipnet.nn import (
    GramConv1d,
    GramConv2d,
    GramConvTranspose2d,
    GramLinear,
    GramResidualConv2d,
    GramSequential,
    GroupSort,
    MaxMin,
)

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}

# (Gram layer, torch layer it replaces, input shape); same weight shapes and geometry.
LAYERS = {
    "linear": (functools.partial(GramLinear, 5, 4), functools.partial(nn.Linear, 5, 4), (2, 5)),
    "conv2d": (functools.partial(GramConv2d, 2, 3, 3, padding=1), functools.partial(nn.Conv2d, 2, 3, 3, padding=1),
               (2, 2, 5, 5)),
    "conv1d": (functools.partial(GramConv1d, 2, 3, 3, padding=1), functools.partial(nn.Conv1d, 2, 3, 3, padding=1),
               (2, 2, 6)),
    "conv_transpose2d": (functools.partial(GramConvTranspose2d, 2, 3, 3, stride=2),
                         functools.partial(nn.ConvTranspose2d, 2, 3, 3, stride=2), (2, 2, 3, 3)),
}


def dense_norm(fn, shape) -> float:
    """Exact operator norm of the linear map ``fn`` on inputs of ``shape`` (float64 Jacobian, SVD)."""
    x = torch.zeros(shape, dtype=torch.float64)
    jacobian = torch.autograd.functional.jacobian(lambda v: fn(v.reshape(shape)).reshape(-1), x.reshape(-1))
    return float(torch.linalg.matrix_norm(jacobian.reshape(-1, x.numel()), 2))


def applied(layer, weight):
    """The bias-free map of ``layer``'s class (torch's own functional) with ``weight``, in float64."""
    weight = weight.detach().double()
    if isinstance(layer, nn.Linear):
        return lambda v: F.linear(v, weight)
    if isinstance(layer, nn.ConvTranspose2d):
        return lambda v: F.conv_transpose2d(v, weight, None, layer.stride, layer.padding, layer.output_padding,
                                            layer.groups, layer.dilation)
    return lambda v: layer._conv_forward(v, weight, None)


def applied_norm(layer, shape) -> float:
    """Exact norm of what ``layer`` applies to one input of ``shape`` (its last forward's size)."""
    return dense_norm(applied(layer, layer.normalized_weight()), (1, *shape[1:]))


def affine_norm(fn, shape) -> float:
    """Exact norm of the linear part of the affine map ``fn`` (float64)."""
    return dense_norm(lambda v: fn(v) - fn(torch.zeros_like(v)), (1, *shape[1:]))


# Constructor and state ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", LAYERS)
def test_constructor_and_forward_signatures_extend_torchs(name):
    gram, plain, _ = LAYERS[name]
    ours, theirs = inspect.signature(gram.func), inspect.signature(plain.func)
    expected = [(p.name, p.default, p.kind) for p in theirs.parameters.values()]
    got = [(p.name, p.default, p.kind) for p in ours.parameters.values()]
    assert got[:len(expected)] == expected
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in list(ours.parameters.values())[len(expected):])
    assert list(inspect.signature(gram.func.forward).parameters) == list(inspect.signature(plain.func.forward).parameters)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("name", LAYERS)
def test_state_dicts_load_both_ways_strictly_and_by_assignment(name, bias):
    gram, plain, shape = LAYERS[name]
    torch_layer, layer = plain(bias=bias), gram(bias=bias)
    assert list(layer.state_dict()) == list(torch_layer.state_dict())
    assert dict(layer.named_buffers()) == {}  # nothing for DDP to broadcast, nothing a plain checkpoint lacks
    layer.load_state_dict(torch_layer.state_dict(), strict=True)
    back = plain(bias=bias)
    back.load_state_dict(layer.state_dict(), strict=True)
    assert torch.equal(back.weight, torch_layer.weight)
    assigned = gram(bias=bias)
    assigned.load_state_dict(torch_layer.state_dict(), strict=True, assign=True)
    assert assigned.weight is not torch_layer.weight and isinstance(assigned.weight, nn.Parameter)
    x = torch.randn(shape)
    torch.testing.assert_close(assigned(x), layer(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", LAYERS)
def test_a_shallow_copy_shares_the_parameters_and_follows_their_updates(name):
    gram, _, shape = LAYERS[name]
    layer = gram().eval()
    x = torch.randn(shape)
    with torch.no_grad():
        layer(x)
        twin = copy.copy(layer)
        assert twin.weight is layer.weight
        layer.weight.add_(torch.randn_like(layer.weight))
        fresh = copy.deepcopy(layer).train()
        torch.testing.assert_close(twin(x), fresh(x), rtol=0, atol=0)
        torch.testing.assert_close(layer(x), fresh(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", LAYERS)
def test_moving_to_meta_after_an_eval_forward_infers_torchs_shapes(name):
    gram, plain, shape = LAYERS[name]
    layer = gram().eval()
    x = torch.randn(shape)
    with torch.no_grad():
        layer(x)
    layer.to("meta")
    out = layer(x.to("meta"))
    assert out.is_meta and out.shape == plain()(x).shape


@pytest.mark.parametrize("name", LAYERS)
def test_forward_hooks_and_pre_hooks_apply_as_on_torchs_layers(name):
    gram, _, shape = LAYERS[name]
    layer, x = gram(), torch.randn(shape)
    plain_output = layer(2 * x) / 2
    layer.register_forward_pre_hook(lambda module, args: (2 * args[0],))
    layer.register_forward_hook(lambda module, args, output: output / 2)
    torch.testing.assert_close(layer(x), plain_output)


# Weight rewrites by torch.nn.utils ------------------------------------------------------------------------------------

def _old_weight_norm(layer):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return nn.utils.weight_norm(layer)


NORM_UTILITIES = {
    "spectral_norm_hooks": nn.utils.spectral_norm,
    "weight_norm_hooks": _old_weight_norm,
    "spectral_norm_parametrization": nn.utils.parametrizations.spectral_norm,
    "weight_norm_parametrization": nn.utils.parametrizations.weight_norm,
}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("utility", NORM_UTILITIES)
@pytest.mark.parametrize("name", LAYERS)
def test_torch_weight_normalizations_on_top_leave_the_layer_1_lipschitz(name, utility, training):
    """torch's own spectral_norm and weight_norm (hooks or parametrizations) recompute ``weight`` per
    forward; the Gram layer normalizes whatever they give, in train and eval mode."""
    gram, _, shape = LAYERS[name]
    layer = gram(dtype=torch.float64)
    with torch.no_grad():
        layer.weight.mul_(5)
    layer = NORM_UTILITIES[utility](layer).train(training)
    x = torch.randn(shape, dtype=torch.float64)
    with torch.no_grad():
        layer(x)
        layer(x)  # a second pass: in eval mode, any cache is used
    assert affine_norm(layer, shape) <= 1 + TOL[torch.float64]


# Autograd and transforms ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", LAYERS)
def test_second_derivatives_with_respect_to_the_input(name):
    gram, _, shape = LAYERS[name]
    layer = gram(dtype=torch.float64)
    x = torch.randn(shape, dtype=torch.float64)[:1].requires_grad_()
    assert torch.autograd.gradgradcheck(lambda v: F.softplus(layer(v)), (x,))
    energy = lambda v: F.softplus(layer(v[None]))[0].sum()  # noqa: E731
    torch.testing.assert_close(torch.func.hessian(energy)(x[0].detach()),
                               torch.autograd.functional.hessian(energy, x[0].detach()))


@pytest.mark.parametrize("name", LAYERS)
def test_gradcheck_with_forward_mode_and_batched_gradients(name):
    gram, _, shape = LAYERS[name]
    layer = gram(dtype=torch.float64)
    x = torch.randn(shape, dtype=torch.float64)[:1].requires_grad_()
    weight = layer.weight.detach().clone().requires_grad_()

    def fn(v, w):
        return F.softplus(torch.func.functional_call(layer, {"weight": w}, (v,)))

    assert torch.autograd.gradcheck(fn, (x, weight), check_batched_grad=True, check_forward_ad=True)


@pytest.mark.parametrize("name", LAYERS)
def test_input_gradient_penalties_train_the_weight(name):
    gram, _, shape = LAYERS[name]
    layer = gram(dtype=torch.float64)
    x = torch.randn(shape, dtype=torch.float64).requires_grad_()
    (grad_x,) = torch.autograd.grad(F.softplus(layer(x)).sum(), x, create_graph=True)
    grad_x.pow(2).sum().backward()
    assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()
    assert layer.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", LAYERS)
def test_anomaly_detection_deterministic_algorithms_and_saving_on_cpu(name):
    gram, _, shape = LAYERS[name]
    layer, x = gram(), torch.randn(shape)
    layer(x).sum().backward()
    expected = layer.weight.grad.clone()
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        with torch.autograd.set_detect_anomaly(True), torch.autograd.graph.save_on_cpu():
            layer.weight.grad = None
            out = layer(x).sum()
            out.backward(retain_graph=True)
            out.backward()
    finally:
        torch.use_deterministic_algorithms(deterministic)
    torch.testing.assert_close(layer.weight.grad, 2 * expected)


@pytest.mark.parametrize("name", ["conv1d", "conv_transpose2d"])
def test_compiled_with_fullgraph_follows_weight_updates_in_eval_mode(name):
    gram, _, shape = LAYERS[name]
    layer, x = gram().eval(), torch.randn(shape)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), copy.deepcopy(layer).train()(x))
        layer.weight.add_(torch.randn_like(layer.weight))
        torch.testing.assert_close(compiled(x), copy.deepcopy(layer).train()(x))


@pytest.mark.parametrize("name", ["conv2d", "conv1d", "conv_transpose2d"])
def test_jit_trace_of_convolutions_is_refused_with_the_way_out(name):
    gram, _, shape = LAYERS[name]
    with pytest.raises(TypeError, match="lipnet.export"):
        torch.jit.trace(gram(), torch.randn(shape))


def test_distributed_data_parallel_trains_as_the_plain_model(tmp_path):
    dist = torch.distributed
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed without a process group")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = GramSequential(GramConv2d(2, 4, 3, padding=1), MaxMin(), GramConv2d(4, 4, 3, padding=1), nn.Flatten(),
                               GramLinear(4 * 5 * 5, 3), stack_bounds=True)
        reference = copy.deepcopy(model)
        wrapped = nn.parallel.DistributedDataParallel(model)
        x = torch.randn(2, 2, 5, 5)
        for net in (wrapped, reference):
            optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
            net(x).square().sum().backward()
            optimizer.step()
        wrapped.eval(), reference.eval()
        with torch.no_grad():
            torch.testing.assert_close(wrapped(x), reference(x))
    finally:
        dist.destroy_process_group()


# Soundness in unusual geometries and weights ---------------------------------------------------------------------------

GEOMETRIES = {
    "conv2d kernel 5 on a 1x1 input": (lambda dt: GramConv2d(2, 3, 5, padding=2, dtype=dt), (1, 2, 1, 1)),
    "conv2d kernel 7 circular on 3x3": (lambda dt: GramConv2d(2, 3, 7, padding=3, padding_mode="circular", dtype=dt),
                                        (1, 2, 3, 3)),
    "conv2d kernel 5 replicate on 3x3": (lambda dt: GramConv2d(2, 3, 5, padding=2, padding_mode="replicate",
                                                               dtype=dt), (1, 2, 3, 3)),
    "conv2d reflect on 2x2": (lambda dt: GramConv2d(2, 3, 3, padding=1, padding_mode="reflect", dtype=dt),
                              (1, 2, 2, 2)),
    "conv2d depthwise, multiplier 2": (lambda dt: GramConv2d(3, 6, 3, padding=1, groups=3, dtype=dt), (1, 3, 5, 5)),
    "conv2d depthwise, same, even": (lambda dt: GramConv2d(3, 3, 4, padding="same", groups=3, dtype=dt),
                                     (1, 3, 5, 5)),
    "conv2d same, even, dilated, circular": (lambda dt: GramConv2d(2, 2, (2, 4), padding="same", dilation=2,
                                                                   padding_mode="circular", dtype=dt), (1, 2, 5, 6)),
    "conv2d stride above kernel": (lambda dt: GramConv2d(2, 3, 2, stride=3, dtype=dt), (1, 2, 7, 7)),
    "conv1d kernel 9 on length 2": (lambda dt: GramConv1d(2, 3, 9, padding=4, dtype=dt), (1, 2, 2)),
    "conv1d depthwise replicate": (lambda dt: GramConv1d(4, 4, 3, groups=4, padding=1, padding_mode="replicate",
                                                         dtype=dt), (1, 4, 5)),
    "conv_transpose2d kernel 5 on 1x1": (lambda dt: GramConvTranspose2d(2, 3, 5, dtype=dt), (1, 2, 1, 1)),
    "conv_transpose2d groups, dilation, output padding": (
        lambda dt: GramConvTranspose2d(4, 2, 3, stride=2, padding=1, output_padding=1, groups=2, dilation=2, dtype=dt),
        (1, 4, 3, 3)),
    "conv_transpose2d output padding from the dilation": (
        lambda dt: GramConvTranspose2d(2, 2, 3, dilation=3, output_padding=2, dtype=dt), (1, 2, 3, 3)),
    "conv_transpose2d depthwise": (lambda dt: GramConvTranspose2d(3, 3, 4, stride=2, padding=1, groups=3, dtype=dt),
                                   (1, 3, 3, 3)),
    "linear 1x1": (lambda dt: GramLinear(1, 1, dtype=dt), (1, 1)),
}


def _constant(w):
    return torch.ones_like(w)


def _one_tap(w):
    return torch.zeros_like(w).flatten().index_fill(0, torch.tensor([0]), 1.0).reshape(w.shape)


def _checkerboard(w):
    return (torch.arange(w.numel()) % 2 * 2 - 1).reshape(w.shape).to(w.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_unusual_geometries_apply_a_1_lipschitz_operator_equal_to_torchs(geometry, dtype):
    make, shape = GEOMETRIES[geometry]
    for fill in (torch.randn_like, _constant, _one_tap, _checkerboard):
        for training in (True, False):
            layer = make(dtype).train(training)
            with torch.no_grad():
                layer.weight.copy_(fill(layer.weight))
            x = torch.randn(shape, dtype=dtype)
            with torch.no_grad():
                out = layer(x)
            weight = layer.normalized_weight()
            bias = layer.bias.detach().double().view(-1, *[1] * (len(shape) - 2))
            torch.testing.assert_close(out.double(), applied(layer, weight)(x.double()) + bias,
                                       rtol=1e-5, atol=1e-5)
            assert applied_norm(layer, shape) <= 1 + TOL[dtype], (fill, training)


@pytest.mark.parametrize("scale", [1e-30, 1e30])
@pytest.mark.parametrize("name", LAYERS)
def test_tiny_and_huge_weights_give_finite_outputs_of_norm_at_most_1(name, scale):
    gram, _, shape = LAYERS[name]
    for dtype in (torch.float32, torch.float64):
        layer = gram(dtype=dtype)
        with torch.no_grad():
            layer.weight.mul_(scale)
        x = torch.randn(shape, dtype=dtype)
        out = layer(x)
        assert torch.isfinite(out).all()
        assert applied_norm(layer, shape) <= 1 + TOL[dtype]
        out.sum().backward()
        assert torch.isfinite(layer.weight.grad).all()


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", LAYERS)
def test_zero_and_nan_weights(name, training):
    gram, _, shape = LAYERS[name]
    layer, x = gram().train(training), torch.randn(shape)
    with torch.no_grad():
        layer.weight.zero_()
        out = layer(x)  # the zero map: the bias alone
    torch.testing.assert_close(out, layer.bias.view(-1, *[1] * (len(shape) - 2)).expand_as(out))
    with pytest.raises(ValueError, match="zero"):
        layer(x).sum().backward()
    with torch.no_grad():
        layer.weight.normal_()
        layer(x)  # cached in eval mode
        layer.weight[0].fill_(float("nan"))
        with pytest.raises(FloatingPointError, match="NaN"):
            layer(x)


# GramSequential as an nn.Sequential ------------------------------------------------------------------------------------

def test_gram_sequential_edits_keep_its_class_and_setting():
    net = GramSequential(GramConv2d(2, 2, 3, padding=1), MaxMin(), stack_bounds=True)
    assert type(net.append(GramConv2d(2, 2, 3, padding=1))) is GramSequential
    assert type(net.insert(0, MaxMin())) is GramSequential and len(net) == 4
    head = net[1:]
    assert type(head) is GramSequential and head.stack_bounds is True
    x = torch.randn(1, 2, 5, 5)
    torch.testing.assert_close(head(x), nn.Sequential(*head)(x))


# Found bugs, fixed (each test asserts the behaviour torch's own module has) ----------------------------------------

NUMPY_INTEGER_SETTINGS = {
    "conv2d kernel_size": (lambda: GramConv2d(2, 4, np.int64(3)), lambda: nn.Conv2d(2, 4, np.int64(3)), (1, 2, 6, 6)),
    "conv2d kernel_size pair": (lambda: GramConv2d(2, 4, (np.int64(3), np.int64(2))),
                                lambda: nn.Conv2d(2, 4, (np.int64(3), np.int64(2))), (1, 2, 6, 6)),
    "conv2d groups": (lambda: GramConv2d(2, 4, 3, groups=np.int64(2)), lambda: nn.Conv2d(2, 4, 3, groups=np.int64(2)),
                      (1, 2, 6, 6)),
    "conv1d kernel_size": (lambda: GramConv1d(2, 4, np.int64(3)), lambda: nn.Conv1d(2, 4, np.int64(3)), (1, 2, 6)),
    "conv_transpose2d kernel_size": (lambda: GramConvTranspose2d(2, 4, np.int64(3)),
                                     lambda: nn.ConvTranspose2d(2, 4, np.int64(3)), (1, 2, 4, 4)),
    "conv_transpose2d padding": (lambda: GramConvTranspose2d(2, 4, 3, padding=np.int64(1)),
                                 lambda: nn.ConvTranspose2d(2, 4, 3, padding=np.int64(1)), (1, 2, 4, 4)),
    "residual kernel_size": (lambda: GramResidualConv2d(2, np.int64(3)),
                             lambda: nn.Conv2d(2, 2, np.int64(3), padding="same"), (1, 2, 5, 5)),
}


@pytest.mark.parametrize("setting", NUMPY_INTEGER_SETTINGS)
def test_numpy_integer_settings_are_accepted_as_torch_accepts_them(setting):
    make, make_plain, shape = NUMPY_INTEGER_SETTINGS[setting]
    x = torch.randn(shape)
    expected_shape = make_plain()(x).shape
    layer = make()
    out = layer(x)
    assert out.shape == expected_shape
    assert layer.lipschitz_bound() <= 1 + 1e-5


def test_group_sort_takes_a_numpy_integer_group_size():
    x = torch.randn(2, 4, 3)
    torch.testing.assert_close(GroupSort(np.int64(2))(x), GroupSort(2)(x))


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_a_float8_layer_is_refused_with_the_supported_dtypes(dtype):
    x = torch.randn(2, 6).to(dtype)
    nn.Linear(6, 4).to(dtype)(x)  # torch's own layer runs on the CPU in float8
    with pytest.raises(TypeError, match="float8.*Use float32, float64, bfloat16 or float16"):
        GramLinear(6, 4).to(dtype)
    with pytest.raises(TypeError, match="float8"):
        GramConv2d(2, 2, 3).to(dtype)
    layer = GramLinear(6, 4)
    with torch.no_grad():
        layer.weight = nn.Parameter(layer.weight.to(dtype), requires_grad=False)  # past .to()'s check
    with pytest.raises(TypeError, match="float8"):
        layer(x.float())


WRONG_RANK = {
    "conv2d 1-D": (lambda: GramConv2d(2, 3, 3), lambda: nn.Conv2d(2, 3, 3), (5,)),
    "conv2d 0-D": (lambda: GramConv2d(2, 3, 3), lambda: nn.Conv2d(2, 3, 3), ()),
    "residual 1-D": (lambda: GramResidualConv2d(2, 3), lambda: nn.Conv2d(2, 2, 3, padding="same"), (5,)),
    "conv1d 0-D": (lambda: GramConv1d(2, 3, 3), lambda: nn.Conv1d(2, 3, 3), ()),
    "conv_transpose2d 1-D": (lambda: GramConvTranspose2d(2, 3, 3), lambda: nn.ConvTranspose2d(2, 3, 3), (5,)),
}


@pytest.mark.parametrize("case", WRONG_RANK)
def test_an_input_of_too_few_dimensions_is_refused_as_torch_refuses_it(case):
    make, make_plain, shape = WRONG_RANK[case]
    x = torch.randn(shape)
    with pytest.raises(RuntimeError, match=r"[234]D"):
        make_plain()(x)
    with pytest.raises((RuntimeError, ValueError), match=r"[234]D|dimension"):
        make()(x)


def test_input_normalization_reads_a_3d_input_as_a_batch_of_1d_signals_as_documented():
    # Batched inputs only, channels in dim 1 (as nn.BatchNorm2d): (C, H, W) with H != C is refused
    # and (N, C, L) normalized per channel of dim 1; an unbatched image is given as x[None].
    from lipnet.nn import InputNormalization

    mean, std = torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.2, 0.3, 0.4])
    norm, signals = InputNormalization(mean, std), torch.rand(3, 3, 3)
    with pytest.raises(ValueError, match="3 channel"):
        norm(torch.rand(3, 4, 4))
    torch.testing.assert_close(norm(signals), (signals - mean.view(1, 3, 1)) / std.view(1, 3, 1))
    torch.testing.assert_close(norm(signals[None])[0], (signals - mean.view(3, 1, 1)) / std.view(3, 1, 1))
    assert "x[None]" in InputNormalization.__doc__
