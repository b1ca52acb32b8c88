"""The Gram layers under the torch.nn and torch.func machinery a PyTorch user relies on: deferred
initialization, functional calls and transforms, parametrizations, pruning, memory formats, state
dicts, compilation, dtype conversions, frozen weights, activation checkpointing and weight averaging.

Each test checks values: outputs equal those of a fresh layer holding the same weight (nothing
cached), and where a weight reaches the layer by another path than its parameter, the exact
operator norm of the map applied (from its Jacobian, in float64) is at most 1."""

import copy
import functools
from typing import NamedTuple

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jacfwd, jacrev, jvp, vjp, vmap
from torch.nn.utils import parametrize, prune
from torch.utils.checkpoint import checkpoint

from lipnet.nn import GramConv1d, GramConv2d, GramConvTranspose2d, GramLinear, GramResidualConv2d, MaxMin


class Spec(NamedTuple):
    gram: functools.partial  # the Gram layer's class and constructor arguments
    plain: functools.partial  # the torch layer it replaces, with the same weight shape and geometry
    shape: tuple  # an input batch


SPECS = {
    "linear": Spec(functools.partial(GramLinear, 6, 4), functools.partial(nn.Linear, 6, 4), (3, 6)),
    "conv2d": Spec(functools.partial(GramConv2d, 2, 3, 3, padding=1), functools.partial(nn.Conv2d, 2, 3, 3, padding=1),
                   (2, 2, 6, 6)),
    "conv1d": Spec(functools.partial(GramConv1d, 2, 3, 3, padding=1), functools.partial(nn.Conv1d, 2, 3, 3, padding=1),
                   (2, 2, 7)),
    "conv_transpose2d": Spec(functools.partial(GramConvTranspose2d, 2, 3, 4, stride=2, padding=1),
                             functools.partial(nn.ConvTranspose2d, 2, 3, 4, stride=2, padding=1), (2, 2, 5, 5)),
    "residual": Spec(functools.partial(GramResidualConv2d, 3, 3), functools.partial(nn.Conv2d, 3, 3, 3, padding="same"),
                     (2, 3, 6, 6)),
}


def specs(*names, xfail=None, xfail_names=()):
    """``pytest.param`` of the specs ``names`` (all by default); those in ``xfail_names`` marked
    ``xfail(strict=True, reason=xfail)``."""
    return [pytest.param(SPECS[name], id=name,
                         marks=[pytest.mark.xfail(strict=True, reason=xfail)] if name in xfail_names else [])
            for name in names or SPECS]


def inputs(spec, dtype=torch.float32):
    return torch.randn(spec.shape, dtype=dtype)


def reference(spec, weight, bias, x):
    """The output for ``x`` of a new layer of ``spec`` holding ``weight`` and ``bias`` as plain
    parameters (train mode: nothing cached)."""
    fresh = spec.gram(dtype=weight.dtype)
    with torch.no_grad():
        fresh.weight.copy_(weight)
        fresh.bias.copy_(bias)
        return fresh(x)


def operator_norm(fn, x):
    """The exact operator norm (float64 SVD) of the linear part of the affine map ``fn``, from its
    Jacobian at the first example of ``x``."""
    example = x[:1].detach().double()
    jacobian = torch.autograd.functional.jacobian(fn, example)
    return float(torch.linalg.matrix_norm(jacobian.reshape(fn(example).numel(), example.numel()), 2))


# Deferred initialization --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", specs())
def test_construction_on_the_meta_device_then_to_empty_and_reset_parameters(spec):
    with torch.device("meta"):
        layer = spec.gram()
    assert layer.weight.is_meta
    layer.to_empty(device="cpu")
    layer.reset_parameters()
    assert list(layer.state_dict()) == list(spec.plain().state_dict())
    x = inputs(spec)
    torch.testing.assert_close(layer(x), reference(spec, layer.weight, layer.bias, x), rtol=0, atol=0)
    layer.double()
    assert operator_norm(layer, x) <= 1 + 1e-9


@pytest.mark.parametrize("spec", specs())
def test_skip_init_then_reset_parameters(spec):
    layer = nn.utils.skip_init(spec.gram.func, *spec.gram.args, **spec.gram.keywords)
    assert type(layer) is spec.gram.func and not layer.weight.is_meta
    layer.reset_parameters()
    x = inputs(spec)
    torch.testing.assert_close(layer(x), reference(spec, layer.weight, layer.bias, x), rtol=0, atol=0)


@pytest.mark.parametrize("spec", specs())
def test_a_forward_on_the_meta_device_infers_shapes_as_torch_does(spec):
    """Shape inference on the meta device (no memory, no values), then materialization: what
    ``nn.Conv2d`` and ``nn.Linear`` allow."""
    layer = spec.gram(device="meta")
    x = torch.randn(spec.shape, device="meta")
    expected = spec.plain(device="meta")(x)
    out = layer(x)  # train mode, a graph to the meta weight
    assert (out.shape, out.dtype, out.device) == (expected.shape, expected.dtype, expected.device)
    layer.eval()
    with torch.no_grad():
        assert layer(x).shape == expected.shape  # cached in eval mode: a meta normalized weight
    layer.to_empty(device="cpu")
    layer.reset_parameters()
    x = inputs(spec)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), reference(spec, layer.weight, layer.bias, x), rtol=0, atol=0)


# torch.func ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("spec", specs())
def test_functional_call_normalizes_the_weight_it_is_given(spec, training):
    """The bound comes from the weight passed in, not the stored one (else the map would not be
    1-Lipschitz), and the stored weight's cache is neither used nor overwritten."""
    layer = spec.gram(dtype=torch.float64).train(training)
    x = inputs(spec, torch.float64)
    with torch.no_grad():
        own = layer(x)
    weight = 50 * torch.randn_like(layer.weight)

    def call(w, z):
        return functional_call(layer, {"weight": w}, (z,))
    for context in (torch.enable_grad, torch.no_grad):
        with context():
            out = call(weight, x)
            torch.testing.assert_close(out, reference(spec, weight, layer.bias, x))
            if not isinstance(layer, GramResidualConv2d):  # W / bound(W) does not see the scale (I + W does)
                torch.testing.assert_close(out, call(weight / 50, x))
    norm = operator_norm(lambda z: call(weight, z), x)
    assert 0.5 < norm <= 1 + 1e-9
    with torch.no_grad():
        torch.testing.assert_close(layer(x), own, rtol=0, atol=0)


@pytest.mark.parametrize("spec", specs())
def test_vmap_over_examples_and_per_example_jacobians(spec):
    layer = spec.gram(dtype=torch.float64)
    x = inputs(spec, torch.float64)
    torch.testing.assert_close(vmap(layer)(x), layer(x))  # each example unbatched, as torch's layers take it
    per_example = vmap(grad(lambda z: layer(z).sin().sum()))(x)
    leaf = x.clone().requires_grad_()
    layer(leaf).sin().sum().backward()
    torch.testing.assert_close(per_example, leaf.grad)
    reverse, forward = vmap(jacrev(layer))(x), vmap(jacfwd(layer))(x)
    torch.testing.assert_close(forward, reverse)
    example = x[0]
    flat = reverse.reshape(len(x), layer(example).numel(), example.numel())
    assert float(torch.linalg.matrix_norm(flat.detach(), 2).max()) <= 1 + 1e-9


@pytest.mark.parametrize("spec", specs("conv1d", "residual"))  # linear, conv2d: tests/nn/test_normalized.py
def test_vmap_over_a_batch_of_weights(spec):
    layer = spec.gram(dtype=torch.float64).eval()
    x = inputs(spec, torch.float64)
    weight = layer.weight.detach()
    stack = torch.stack([weight, 100 * weight, torch.randn_like(weight)])

    def run(w):
        return functional_call(layer, {"weight": w}, (x,))
    with torch.no_grad():
        outputs = vmap(run)(stack)
        torch.testing.assert_close(outputs, torch.stack([reference(spec, w, layer.bias, x) for w in stack]))


@pytest.mark.parametrize("spec", specs())
def test_func_grad_over_the_parameters_equals_backward(spec):
    layer = spec.gram(dtype=torch.float64)
    x = inputs(spec, torch.float64)
    params = {name: p.detach() for name, p in layer.named_parameters()}
    grads = grad(lambda p: functional_call(layer, p, (x,)).sin().sum())(params)
    layer(x).sin().sum().backward()
    for name, p in layer.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, msg=name)


@pytest.mark.parametrize("spec", specs())
def test_gradcheck_through_the_layer_with_respect_to_weight_and_input(spec):
    layer = spec.gram(dtype=torch.float64)
    x = inputs(spec, torch.float64)[:1].requires_grad_()
    weight = layer.weight.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda w, z: functional_call(layer, {"weight": w}, (z,)), (weight, x), fast_mode=True)


@pytest.mark.parametrize("spec", specs())
def test_forward_mode_derivative_with_respect_to_the_weight_equals_the_reverse_one(spec):
    layer = spec.gram(dtype=torch.float64)
    x = inputs(spec, torch.float64)
    weight = layer.weight.detach()
    tangent, cotangent = torch.randn_like(weight), torch.randn_like(layer(x))

    def run(w):
        return functional_call(layer, {"weight": w}, (x,))
    _, forward = jvp(run, (weight,), (tangent,))
    _, pullback = vjp(run, weight)
    (reverse,) = pullback(cotangent)
    torch.testing.assert_close((forward * cotangent).sum(), (reverse * tangent).sum())


# Parametrizations and pruning ---------------------------------------------------------------------------------------

class Affine(nn.Module):
    """A parametrization that scales the weight by 100 and flips its first axis."""

    def forward(self, weight):
        return 100 * weight.flip(0)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("spec", specs())
def test_a_parametrization_of_the_weight_is_what_gets_normalized(spec, training):
    layer = spec.gram(dtype=torch.float64).train(training)
    x = inputs(spec, torch.float64)
    parametrize.register_parametrization(layer, "weight", Affine())
    twin = spec.plain(dtype=torch.float64)
    parametrize.register_parametrization(twin, "weight", Affine())
    assert list(layer.state_dict()) == list(twin.state_dict())
    expected = reference(spec, 100 * layer.parametrizations.weight.original.detach().flip(0), layer.bias, x)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected)
        with parametrize.cached():
            torch.testing.assert_close(layer(x), expected)
    assert operator_norm(layer, x) <= 1 + 1e-9


def test_an_orthogonal_weight_is_applied_as_it_is():
    layer = GramLinear(6, 4, dtype=torch.float64)
    nn.utils.parametrizations.orthogonal(layer)
    weight = layer.weight.detach()
    torch.testing.assert_close(weight @ weight.T, torch.eye(4, dtype=torch.float64))
    for mode in (layer.train, layer.eval):
        mode()
        with torch.no_grad():
            torch.testing.assert_close(layer.normalized_weight(), weight, rtol=0, atol=1e-9)


@pytest.mark.parametrize("spec", specs())
def test_pruning_masks_the_weight_before_it_is_normalized(spec):
    layer = spec.gram(dtype=torch.float64).eval()
    x = inputs(spec, torch.float64)
    with torch.no_grad():
        before = layer(x)  # fills the cache with the unpruned weight
    prune.l1_unstructured(layer, "weight", amount=0.5)
    twin = spec.plain()
    prune.l1_unstructured(twin, "weight", amount=0.5)
    assert list(layer.state_dict()) == list(twin.state_dict())
    masked = layer.weight_orig.detach() * layer.weight_mask
    with torch.no_grad():
        pruned = layer(x)
        assert not torch.allclose(pruned, before)
        torch.testing.assert_close(pruned, reference(spec, masked, layer.bias, x))
        prune.remove(layer, "weight")
        torch.testing.assert_close(layer(x), pruned, rtol=0, atol=0)
    assert operator_norm(layer, x) <= 1 + 1e-9


# Memory format and state dict ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", specs("conv2d", "residual") + [pytest.param(Spec(
    functools.partial(GramConv2d, 4, 6, 3, stride=2, padding=1, padding_mode="circular"), None, (2, 4, 8, 6)),
    id="conv2d-strided-circular")])
def test_channels_last_gives_the_outputs_of_contiguous_memory(spec):
    layer = spec.gram()
    x = inputs(spec)
    contiguous = copy.deepcopy(layer)
    layer.to(memory_format=torch.channels_last)
    assert layer.weight.is_contiguous(memory_format=torch.channels_last) and not layer.weight.is_contiguous()
    for train in (True, False):
        layer.train(train)
        contiguous.train(train)
        with torch.no_grad():
            expected = contiguous(x)
            for z in (x.to(memory_format=torch.channels_last), x):
                torch.testing.assert_close(layer(z), expected, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(layer.normalized_weight(x.shape[-2:]),
                                       contiguous.normalized_weight(x.shape[-2:]), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("spec", specs())
def test_state_dict_after_an_eval_forward_is_torchs_and_round_trips_strictly(spec):
    layer = spec.gram().eval()
    x = inputs(spec)
    with torch.no_grad():
        out = layer(x)
    state = layer.state_dict()
    torch_layer = spec.plain()
    assert list(state) == list(torch_layer.state_dict()) and not list(layer.buffers())
    assert torch.equal(state["weight"], layer.weight)  # the raw weight, not the normalized one
    assert not torch.allclose(state["weight"], layer.normalized_weight())
    torch_layer.load_state_dict(state, strict=True)
    again = spec.gram().eval()
    again.load_state_dict(torch_layer.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(again(x), out, rtol=0, atol=0)


# Compilation --------------------------------------------------------------------------------------------------------

@pytest.mark.skipif(not torch._dynamo.is_dynamo_supported(), reason="torch.compile is not supported here")
def test_torch_compile_matches_eager_in_train_and_eval_and_follows_weight_updates():
    """``aot_eager``: Dynamo's capture and AOTAutograd's graphs (forward and backward), without
    Inductor's code generation, which takes a minute on the CPU (tests/nn/test_network.py
    compiles with it)."""
    torch._dynamo.reset()
    net = nn.Sequential(GramConv2d(2, 4, 3, padding=1), MaxMin(), GramResidualConv2d(4, 3), nn.Flatten(),
                        GramLinear(4 * 6 * 6, 3))
    compiled = torch.compile(net, backend="aot_eager")
    x = torch.randn(2, 2, 6, 6)
    out = compiled(x)
    out.sin().sum().backward()
    compiled_grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    eager = net(x)
    eager.sin().sum().backward()
    torch.testing.assert_close(out, eager)
    for compiled_grad, p in zip(compiled_grads, net.parameters()):
        torch.testing.assert_close(compiled_grad, p.grad)
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), net(x))
        net[0].weight.mul_(-1).add_(0.1)
        net[4].weight.mul_(10)
        updated = compiled(x)
    net.train()
    with torch.no_grad():
        torch.testing.assert_close(updated, net(x))


# nn.Module conveniences ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", specs())
def test_repr_is_torchs_with_the_bound_settings(spec):
    layer, torch_layer = spec.gram(n_iter=7), spec.plain()
    assert repr(layer).startswith(type(layer).__name__ + "(")
    assert torch_layer.extra_repr() in layer.extra_repr() and layer.extra_repr().endswith(", n_iter=7")


@pytest.mark.parametrize("spec", specs())
def test_module_apply_and_weight_averaging_refresh_the_eval_cache(spec):
    """An ``apply(init_fn)``, an EMA step with ``torch._foreach_lerp_`` and
    ``AveragedModel.update_parameters`` all write the weight in place, in eval mode."""
    layer = spec.gram().eval().requires_grad_(False)
    x = inputs(spec)

    def check(module, previous):
        with torch.no_grad():
            out = module(x)
        assert not torch.allclose(out, previous)
        torch.testing.assert_close(out, reference(spec, module.weight, module.bias, x), rtol=0, atol=0)
        return out
    with torch.no_grad():
        out = layer(x)
    layer.apply(lambda m: nn.init.orthogonal_(m.weight) if hasattr(m, "weight") else None)
    out = check(layer, out)
    with torch.no_grad():
        torch._foreach_lerp_(list(layer.parameters()), list(spec.gram().parameters()), 0.5)
    out = check(layer, out)
    averaged = torch.optim.swa_utils.AveragedModel(layer).eval()
    with torch.no_grad():
        averaged(x)
    averaged.update_parameters(spec.gram())
    check(averaged.module, out)


@pytest.mark.parametrize("spec", specs())
def test_dtype_round_trips_after_an_eval_forward(spec):
    layer = spec.gram().eval()
    x = inputs(spec)
    with torch.no_grad():
        before = layer(x)
        layer.half().float()  # rounds the weight: the cached normalized weight is stale
        out = layer(x)
        assert not torch.equal(out, before)
        torch.testing.assert_close(out, reference(spec, layer.weight, layer.bias, x), rtol=0, atol=0)
        layer.double()
        assert layer(x.double()).dtype == torch.float64
        layer.bfloat16()
        out = layer(x.bfloat16())
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    layer.double()
    assert operator_norm(layer, x) <= 1 + 1e-9


@pytest.mark.parametrize("spec", specs())
def test_autocast_leaves_the_bound_in_the_weights_dtype(spec):
    layer = spec.gram()
    x = inputs(spec)
    outside = layer.weight_norm_bound(x.shape[2:] or None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16
        inside = layer.weight_norm_bound(x.shape[2:] or None)
    assert inside.dtype == torch.float32
    torch.testing.assert_close(inside, outside, rtol=0, atol=0)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("spec", specs())
def test_a_frozen_weight_is_still_normalized(spec, training):
    layer = spec.gram(dtype=torch.float64).train(training)
    layer.weight.requires_grad_(False)
    with torch.no_grad():
        layer.weight.mul_(100)
    x = inputs(spec, torch.float64).requires_grad_()
    out = layer(x)
    torch.testing.assert_close(out, reference(spec, layer.weight, layer.bias, x))
    out.sin().sum().backward()
    assert layer.weight.grad is None and layer.bias.grad is not None and x.grad is not None
    assert operator_norm(layer, x) <= 1 + 1e-9


@pytest.mark.parametrize("spec", specs())
def test_no_grad_and_inference_mode_forwards_in_train_mode(spec):
    layer = spec.gram()
    x = inputs(spec)
    expected = layer(x)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), expected.detach(), rtol=0, atol=0)
    assert not layer._eval_cache  # train mode computes the bound each time
    layer(x).sum().backward()  # no inference tensor leaked into the graph
    assert layer.weight.grad is not None


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("spec", specs())
def test_activation_checkpointing_gives_the_gradients_of_a_plain_backward(spec, use_reentrant):
    layer = spec.gram(dtype=torch.float64)
    x = inputs(spec, torch.float64).requires_grad_()
    checkpoint(layer, x, use_reentrant=use_reentrant).sin().sum().backward()
    recomputed = [layer.weight.grad.clone(), x.grad.clone()]
    layer.zero_grad()
    x.grad = None
    layer(x).sin().sum().backward()
    torch.testing.assert_close(recomputed[0], layer.weight.grad, rtol=0, atol=0)
    torch.testing.assert_close(recomputed[1], x.grad, rtol=0, atol=0)


class DropConnect(nn.Module):
    """A random parametrization: each access of ``layer.weight`` draws a new mask."""

    def forward(self, weight):
        return weight * torch.rand_like(weight).lt(0.5) * 2


@pytest.mark.parametrize("spec", specs())
def test_a_random_parametrization_is_bounded_and_divided_as_one_draw(spec):
    """The bound and the quotient must be of one read of the weight: dividing one draw by the
    bound of another applied operators of norm up to about 2 here."""
    torch.manual_seed(0)
    layer = spec.gram(dtype=torch.float64)
    parametrize.register_parametrization(layer, "weight", DropConnect())
    x = inputs(spec, torch.float64)
    worst = max(operator_norm(layer, x) for _ in range(10))
    assert worst <= 1 + 1e-9


@pytest.mark.parametrize("make, shape", [
    (lambda: GramLinear(4, 3), (2, 4)),
    (lambda: GramConv2d(3, 4, 3, padding=1), (2, 3, 7, 11)),
    (lambda: GramConv2d(3, 4, 3, stride=2, padding=1, padding_mode="circular"), (2, 3, 8, 8)),
    (lambda: GramConv1d(3, 4, 3), (2, 3, 9)),
    (lambda: GramConvTranspose2d(3, 4, 3, stride=2), (2, 3, 5, 5)),
], ids=["linear", "conv2d", "conv2d-circular", "conv1d", "transposed"])
def test_layers_run_under_fake_tensor_mode_as_shape_estimators_use_it(make, shape):
    """Shape and memory estimators run models on fake tensors, which hold no values: the bound's
    value checks and the CPU's refinement (which counts the frequencies to refine) are skipped there
    (once: aten.nonzero raised DynamicOutputShapeException)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    layer = make()
    expected = layer(torch.randn(*shape)).shape
    with FakeTensorMode(allow_non_fake_inputs=True):
        assert layer(torch.empty(*shape)).shape == expected
    assert layer(torch.randn(*shape)).shape == expected  # and real forwards still run


def test_a_forward_under_fake_tensor_mode_leaves_no_fake_weight_in_the_eval_cache():
    """Without the refinement (a GPU, or refine_exceeding(False)) a fake pass and a real one share a
    cache key: the fake normalized weight was kept, and the next real eval forward raised."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lipnet.bounds import refine_exceeding

    layer = GramConv2d(3, 4, 3, padding=1).eval()
    x = torch.randn(2, 3, 7, 11)
    with refine_exceeding(False), torch.no_grad():
        expected = layer(x)
        layer._eval_cache.clear()
        with FakeTensorMode(allow_non_fake_inputs=True):
            layer(torch.empty(2, 3, 7, 11))
        assert torch.equal(layer(x), expected)
