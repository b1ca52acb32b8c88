"""Red team (helper 71): the map a Gram layer *applies* during training and in unusual settings.

Every test measures the operator that the layer's forward actually hands to torch: a
``TorchFunctionMode`` records each ``conv1d`` / ``conv2d`` / ``conv_transpose2d`` / ``linear``
call (weight, settings, the ``F.pad`` before it for non-zero padding modes), and the call is
replayed in float64 on every basis input; the largest singular value of that dense matrix is
the exact norm of what was applied, independent of lipnet's bounds. The promise checked is
``norm <= 1 + 1e-5`` (float32 rounding), and for the eval-mode cache that the weight applied is
the one a fresh training-mode forward of the same layer would apply (no stale normalized weight).

Attacks that held are kept as regression tests, and so are the four bugs it found (fixed since):
a warm eval cache that ignored a changed applied padding, DFT constants cached under inference mode
or FakeTensorMode that broke later training, and a stacked bound under a float16 autocast region.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state, vmap
from torch.overrides import TorchFunctionMode

import lipnet.bounds.conv as conv_bounds
from lipnet.nn import GramConv1d, GramConv2d, GramConvTranspose2d, GramLinear, GramResidualConv2d, GramSequential

TOL = 1e-5
_OPS = {"conv1d", "conv2d", "conv_transpose2d", "linear"}


class _Record(TorchFunctionMode):
    """Records ``(function, unpadded input shape, weight, settings, kwargs, pad)`` of each
    convolution or linear call made inside it."""

    def __init__(self):
        super().__init__()
        self.calls, self._pad = [], None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name == "pad":
            self._pad = (tuple(args[1:]), dict(kwargs))
        elif name in _OPS and len(args) >= 2 and isinstance(args[1], torch.Tensor):
            pad, self._pad = self._pad, None
            shape = list(args[0].shape)
            if pad is not None:  # the layer padded the input itself: the operator starts before the pad
                amounts = pad[0][0] if pad[0] else pad[1]["pad"]
                for axis in range(len(amounts) // 2):
                    shape[-1 - axis] -= amounts[2 * axis] + amounts[2 * axis + 1]
            rest = {k: v for k, v in kwargs.items() if k != "bias"}
            self.calls.append((func, tuple(shape), args[1].detach().clone(), tuple(args[3:]), rest, pad))
        return func(*args, **kwargs)


def _norm_of_call(call) -> float:
    """Exact float64 operator norm of one recorded call (batched input, bias dropped)."""
    func, shape, weight, rest, kwargs, pad = call
    shape = shape[1:]
    n = math.prod(shape)
    x = torch.eye(n, dtype=torch.float64).reshape(n, *shape)
    if pad is not None:
        x = F.pad(x, *pad[0], **pad[1])
    y = func(x, weight.double(), None, *rest, **kwargs)
    return float(torch.linalg.matrix_norm(y.reshape(n, -1).T, ord=2))


def recorded(fn, *args):
    with _Record() as record, torch.no_grad():
        fn(*args)
    return record.calls


def applied_norms(fn, *args) -> list[float]:
    return [_norm_of_call(call) for call in recorded(fn, *args)]


def fresh_weight(layer, *args) -> torch.Tensor:
    """The weight a training-mode forward of a copy of ``layer`` applies (nothing cached)."""
    twin = copy.deepcopy(layer).train()
    return recorded(twin, *args)[-1][2]


# --------------------------------------------------------------------------- eval cache

def _train_step(opt_class, **kwargs):
    def change(layer, x):
        layer.requires_grad_(True)
        opt = opt_class(layer.parameters(), **kwargs)
        with torch.enable_grad():
            layer(x).square().sum().backward()
        opt.step()
    return change


def _lbfgs(layer, x):
    opt = torch.optim.LBFGS(layer.parameters(), lr=0.5, max_iter=3)

    def closure():
        opt.zero_grad()
        with torch.enable_grad():
            loss = (layer(x) - 1).square().sum()
            loss.backward()
        return loss
    opt.step(closure)


def _numpy_write(layer, x):
    layer.weight.detach().numpy()[0, 0, 1, 1] += 5  # no version counter bump at all


def _set_(layer, x):
    with torch.no_grad():
        layer.weight.set_(torch.randn(layer.weight.shape))


def _swap_tensors(layer, x):
    torch.utils.swap_tensors(layer.weight, nn.Parameter(torch.randn(layer.weight.shape)))


def _stride_list_element(layer, x):
    layer.stride = [1, 1]
    layer.stride[0] = 2  # an in-place edit of the list the layer holds


def _half_round_trip_with_edit(layer, x):
    layer.half()
    with torch.no_grad():
        layer.weight[0, 0, 0, 0] = 3
    layer.float()


CHANGES = {
    "nadam_foreach": _train_step(torch.optim.NAdam, lr=0.5, foreach=True),
    "rprop": _train_step(torch.optim.Rprop, lr=0.5),
    "lbfgs_closure": _lbfgs,
    "numpy_write": _numpy_write,
    "set_": _set_,
    "swap_tensors": _swap_tensors,
    "stride_list_element": _stride_list_element,
    "half_round_trip_with_edit": _half_round_trip_with_edit,
}


@pytest.mark.parametrize("change", CHANGES)
def test_a_cached_eval_layer_applies_the_weight_of_a_fresh_forward_after_each_change(change):
    layer = GramConv2d(3, 4, 3, padding=1).eval()
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        layer(x)
        layer(x)  # served from the cache
    CHANGES[change](layer, x)
    (call,) = recorded(layer, x)
    want = fresh_weight(layer, x)
    assert torch.equal(call[2], want), "a stale normalized weight was applied"
    assert _norm_of_call(call) <= 1 + TOL


def _rank_one_circular(kind):
    """A circular layer with a rank-one weight (tight bound) and an input for it."""
    layer, x = {
        "conv2d": (lambda: GramConv2d(2, 2, 3, padding=1, padding_mode="circular", bias=False), (1, 2, 4, 4)),
        "conv1d": (lambda: GramConv1d(2, 2, 3, padding=1, padding_mode="circular", bias=False), (1, 2, 6)),
        "residual": (lambda: GramResidualConv2d(2, 3, padding_mode="circular", bias=False), (1, 2, 4, 4)),
    }[kind]
    layer = layer()
    w = layer.weight
    with torch.no_grad():
        w.copy_(torch.randn(w.shape[0], *([1] * (w.dim() - 1))) * torch.randn(1, *w.shape[1:]))
    return layer, torch.randn(x)


def _wider_padding(layer):
    """The padding nn.Conv2d / nn.Conv1d apply for non-zero padding modes, widened (wraps twice)."""
    layer._reversed_padding_repeated_twice = tuple(2 for _ in layer._reversed_padding_repeated_twice)


CIRCULAR = ["conv2d", "conv1d", "residual"]


@pytest.mark.parametrize("kind", CIRCULAR)
@pytest.mark.parametrize("mode", ["train", "cold_eval"])
def test_padding_applied_by_the_forward_changed_after_construction_is_refused(mode, kind):
    layer, x = _rank_one_circular(kind)
    layer.train(mode == "train")
    _wider_padding(layer)
    with torch.no_grad(), pytest.raises(ValueError, match="padding"):
        layer(x)


@pytest.mark.parametrize("kind", CIRCULAR)
def test_padding_applied_by_the_forward_changed_after_a_cached_eval_forward_is_refused_or_bounded(kind):
    layer, x = _rank_one_circular(kind)
    layer.eval()
    assert max(applied_norms(layer, x)) <= 1 + TOL  # and cached
    _wider_padding(layer)
    try:
        norms = applied_norms(layer, x)
    except ValueError:
        return  # refused, as a training forward does
    assert max(norms) <= 1 + TOL, f"applied norm {max(norms)}"


# --------------------------------------------------------------------------- training paths

def _rank_one(layer, scale=1.0):
    """A weight of rank one across output channels (the Gram bound converges to the norm: tight)."""
    w = layer.weight
    with torch.no_grad():
        outer = torch.randn(w.shape[0], *([1] * (w.dim() - 1))) * torch.randn(1, *w.shape[1:])
        w.copy_((scale * outer / outer.abs().max()).to(w.dtype))
    return layer


STACKABLE = {
    "conv2d": (lambda dtype: GramConv2d(4, 4, 3, padding=1, dtype=dtype, bias=False), (1, 4, 5, 5)),
    "conv1d": (lambda dtype: GramConv1d(4, 4, 3, padding=2, dilation=2, padding_mode="circular", dtype=dtype,
                                        bias=False), (1, 4, 7)),
    "conv_transpose2d": (lambda dtype: GramConvTranspose2d(4, 4, 3, padding=1, dtype=dtype, bias=False), (1, 4, 4, 4)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", STACKABLE)
def test_a_stacked_bound_of_layers_of_wildly_different_scales_keeps_each_layer_at_norm_one(kind, dtype):
    """GramSequential bounds equal layers in one stacked computation: each layer's bound must stay
    its own when the stack mixes weights 1e-30 to 1e30 apart (float16: its whole range)."""
    make, shape = STACKABLE[kind]
    scales = [1e-4, 6e4, 1e-7, 1.0] if dtype == torch.float16 else [1e-20, 1e20, 1e-30, 1.0, 1e30]
    layers = [_rank_one(make(dtype), scale) for scale in scales]
    x = torch.randn(shape, dtype=dtype)
    stacked = applied_norms(GramSequential(*layers, stack_bounds=True).train(), x)
    alone = [applied_norms(layer.train(), x)[0] for layer in layers]
    assert len(stacked) == len(layers)
    assert max(stacked) <= 1 + TOL and max(alone) <= 1 + TOL
    # every layer bounded as a layer of its scale: the tight ones close to 1 in both paths
    for s, a, scale in zip(stacked, alone, scales):
        if scale >= 1e-4:
            assert s > 0.5 and a > 0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_stack_of_residual_and_plain_convolutions_shares_one_key_and_keeps_each_bound(dtype):
    """GramResidualConv2d(C, k) and GramConv2d(C, C, k, padding='same') have one stack key (their
    bound is GramConv2d's): each must still be divided by the bound of its own operator (W + I or W)."""
    layers = [_rank_one(GramResidualConv2d(4, 3, dtype=dtype, bias=False), 0.05),
              _rank_one(GramConv2d(4, 4, 3, padding="same", dtype=dtype, bias=False)),
              _rank_one(GramResidualConv2d(4, 3, dtype=dtype, bias=False), 3.0)]
    assert layers[0].stack_key() == layers[1].stack_key() == layers[2].stack_key()
    x = torch.randn(1, 4, 5, 5, dtype=dtype)
    seq = GramSequential(*layers, stack_bounds=True).train()
    stacked = recorded(seq, x)
    assert len(stacked) == 3
    for call, layer in zip(stacked, layers):
        assert _norm_of_call(call) <= 1 + TOL
        alone = recorded(layer, x)[0][2]
        torch.testing.assert_close(call[2].double(), alone.double(), rtol=2 ** -7, atol=1e-6)


@pytest.mark.parametrize("training", [True, False])
def test_an_ensemble_under_vmap_applies_norm_at_most_one_in_every_copy(training):
    """torch.func.stack_module_state + vmap(functional_call): the bound is computed per copy under
    vmap (no cache, no checks of values); copies of very different spectra must not share a bound."""
    models = [GramConv2d(4, 4, 3, padding=1) for _ in range(4)]
    _rank_one(models[0])
    with torch.no_grad():
        models[1].weight.mul_(1e3)
        models[2].weight.zero_()
        models[2].weight.view(-1)[0] = 1
    for model in models:
        model.train(training)
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    shape = (4, 5, 5)
    n = math.prod(shape)
    xs = torch.cat([torch.eye(n).reshape(n, *shape), torch.zeros(1, *shape)])
    with torch.no_grad():
        out = vmap(lambda p, b: functional_call(base, (p, b), (xs,)))(params, buffers).double()
    for copy_out in out:
        matrix = (copy_out[:n] - copy_out[n:]).reshape(n, -1).T
        assert float(torch.linalg.matrix_norm(matrix, ord=2)) <= 1 + TOL


@pytest.mark.parametrize("default", [torch.bfloat16, torch.float16])
def test_a_half_precision_default_dtype_does_not_lower_the_precision_of_the_bounds(default):
    """torch.set_default_dtype(bfloat16) makes every tensor created without a dtype half precision:
    a bound that created one internally would lose 16 bits and could fall below the norm."""
    linear = GramLinear(32, 24)
    with torch.no_grad():
        q, _ = torch.linalg.qr(torch.randn(32, 32))
        linear.weight.copy_(q[:24] * torch.linspace(1, 0.999, 24)[:, None])  # nearly flat: a tight bound
    cases = [(linear, torch.randn(2, 32)), (_rank_one(GramConv2d(4, 4, 3, padding=1, padding_mode="circular")),
                                            torch.randn(1, 4, 4, 4)),
             (_rank_one(GramConv1d(3, 5, 3, stride=2)), torch.randn(1, 3, 9))]
    before = torch.get_default_dtype()
    torch.set_default_dtype(default)
    try:
        for layer, x in cases:
            for training in (True, False):
                layer.train(training)
                assert max(applied_norms(layer, x)) <= 1 + TOL
    finally:
        torch.set_default_dtype(before)


WIDE_ON_TINY = [
    # (in, out, kernel, stride, padding, dilation, padding_mode, input h, w)
    (32, 48, 5, 1, 2, 1, "zeros", 1, 1),
    (48, 16, 4, 3, 2, 1, "zeros", 2, 3),
    (16, 32, 3, 2, 2, 2, "zeros", 1, 2),
    (32, 32, 3, 1, 1, 1, "circular", 1, 1),
    (16, 48, 5, 2, 2, 1, "circular", 2, 2),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("config", WIDE_ON_TINY)
def test_wide_layers_on_inputs_smaller_than_their_kernel(config, dtype):
    """Many channels, an input smaller than the kernel (most taps read only padding), a rank-one
    weight (tight bound): the operator is a few taps of the kernel, and must still have norm <= 1."""
    c_in, c_out, k, s, p, d, mode, h, w = config
    layer = _rank_one(GramConv2d(c_in, c_out, k, stride=s, padding=p, dilation=d, padding_mode=mode, dtype=dtype,
                                 bias=False))
    x = torch.randn(1, c_in, h, w, dtype=dtype)
    for training in (True, False):
        assert max(applied_norms(layer.train(training), x)) <= 1 + TOL


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_transposed_convolution_with_output_padding_beyond_its_stride(dtype):
    """output_padding may reach max(stride, dilation) - 1: with dilation 3 and stride 1 the transposed
    convolution is not the exact adjoint of the convolution on its output size (it drops outputs of
    that convolution), so the adjoint's bound must still hold, in training and from the eval cache."""
    layer = _rank_one(GramConvTranspose2d(3, 2, (2, 3), stride=1, padding=1, output_padding=(2, 1), dilation=3,
                                          dtype=dtype, bias=False))
    tol = 1e-10 if dtype == torch.float64 else TOL
    for size in [(1, 3), (3, 2), (2, 2)]:
        x = torch.randn(1, 3, *size, dtype=dtype)
        for training in (True, False):
            assert max(applied_norms(layer.train(training), x)) <= 1 + tol


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["conv2d", "linear", "conv1d", "conv_transpose2d", "residual"])
def test_under_cpu_autocast_the_weight_handed_to_torch_has_norm_at_most_one(kind, autocast_dtype):
    """Autocast rounds the weight inside the convolution (documented); the weight lipnet hands it
    must still be normalized by a bound computed in float32, not in the autocast dtype."""
    layer, shape = {
        "conv2d": (GramConv2d(8, 8, 3, padding=1), (2, 8, 6, 6)),
        "linear": (GramLinear(32, 16), (2, 32)),
        "conv1d": (GramConv1d(4, 6, 3, stride=2), (2, 4, 9)),
        "conv_transpose2d": (GramConvTranspose2d(4, 4, 3, stride=2), (1, 4, 3, 3)),
        "residual": (GramResidualConv2d(4, 3), (1, 4, 5, 5)),
    }[kind]
    _rank_one(layer, 0.5)
    x = torch.randn(shape)
    for training in (True, False):
        layer.train(training)
        with torch.autocast("cpu", dtype=autocast_dtype):
            (call,) = recorded(layer, x)
        assert call[2].dtype == torch.float32
        assert _norm_of_call(call) <= 1 + TOL


def test_a_stacked_sequential_of_bfloat16_layers_runs_under_float16_autocast():
    layers = [_rank_one(GramConv2d(4, 4, 3, padding=1, dtype=torch.bfloat16)) for _ in range(2)]
    x = torch.randn(1, 4, 5, 5, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.float16):
        nn.Sequential(*layers)(x)  # works
        norms = applied_norms(GramSequential(*layers, stack_bounds=True).train(), x)
    assert max(norms) <= 1 + TOL


def test_a_module_repeated_in_a_stacked_sequential_is_bounded_for_each_input_size_it_sees():
    """The same GramConv2d twice in one GramSequential (weight tying by reuse), a padding between
    them that changes the second input's size: the stacked weight computed for the first size must
    not be applied at the second (it is bounded again), and both applications have norm <= 1."""
    conv = _rank_one(GramConv2d(3, 3, 3, stride=2, padding=1, padding_mode="circular", bias=False))
    seq = GramSequential(conv, nn.ZeroPad2d((0, 3, 1, 0)), conv, stack_bounds=True).train()
    x = torch.randn(1, 3, 4, 4)
    calls = recorded(seq, x)
    assert [call[1][-2:] for call in calls] == [(4, 4), (3, 5)]
    norms = [_norm_of_call(call) for call in calls]
    assert max(norms) <= 1 + TOL and min(norms) > 0.5
    assert not torch.equal(calls[0][2], calls[1][2])  # another input size, another bound


def test_a_compiled_forward_under_cpu_autocast_normalizes_with_a_float32_bound():
    """Under torch.compile the bound's own autocast exit (autocast_disabled) must be traced too: a bound
    computed in bfloat16 would leave the float32 weight handed to the product above norm 1 by ~1e-3
    (measured: the compiled normalized weight equals the eager one exactly)."""
    layer = GramLinear(64, 48, bias=False)
    with torch.no_grad():
        q, _ = torch.linalg.qr(torch.randn(64, 64))
        layer.weight.copy_(q[:48] * torch.linspace(1, 0.99, 48)[:, None])  # nearly flat: a tight bound
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = layer.normalized_weight().detach()
        compiled = torch.compile(lambda: layer.normalized_weight(), fullgraph=True)().detach()
    assert compiled.dtype == torch.float32
    assert float(torch.linalg.matrix_norm(compiled.double(), ord=2)) <= 1 + TOL
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=0)


# --------------------------------------------------------------------------- inference mode first

INFERENCE_FIRST = {
    "conv2d": (lambda: GramConv2d(3, 4, 3, padding=1), (2, 3, 7, 13)),
    "conv1d": (lambda: GramConv1d(3, 4, 3, stride=2), (2, 3, 13)),
    "conv_transpose2d": (lambda: GramConvTranspose2d(3, 2, 3, stride=2, padding=1), (1, 3, 3, 5)),
    "residual": (lambda: GramResidualConv2d(3, 3), (2, 3, 7, 13)),
    "stacked": (lambda: GramSequential(GramConv2d(3, 3, 3, padding=1), GramConv2d(3, 3, 3, padding=1),
                                       stack_bounds=True), (2, 3, 7, 13)),
}


@pytest.mark.parametrize("training_first", [True, False])
@pytest.mark.parametrize("kind", INFERENCE_FIRST)
def test_a_first_forward_under_inference_mode_does_not_break_later_training(kind, training_first, monkeypatch):
    monkeypatch.setattr(conv_bounds, "_DFT_CACHE", {})  # as in a fresh process
    make, shape = INFERENCE_FIRST[kind]
    model = make().train(training_first)
    x = torch.randn(shape)
    with torch.inference_mode():
        model(x)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(x).square().sum().backward()
    opt.step()
    assert max(applied_norms(model, x)) <= 1 + TOL


@pytest.mark.parametrize("kind", INFERENCE_FIRST)
def test_a_first_forward_under_no_grad_does_not_break_later_training(kind, monkeypatch):
    """The held counterpart: a first forward under torch.no_grad() leaves ordinary tensors behind."""
    monkeypatch.setattr(conv_bounds, "_DFT_CACHE", {})
    make, shape = INFERENCE_FIRST[kind]
    model = make()
    x = torch.randn(shape)
    with torch.no_grad():
        model(x)
    model(x).square().sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert max(applied_norms(model, x)) <= 1 + TOL


def test_a_forward_under_fake_tensor_mode_leaves_real_forwards_working(monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.setattr(conv_bounds, "_DFT_CACHE", {})
    layer = GramConv2d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 7, 11)
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            layer(torch.empty(2, 3, 7, 11))
    except Exception:  # noqa: BLE001 - the probe may fail; what matters is what it leaves behind
        pass
    layer(x).sum().backward()
    assert max(applied_norms(layer, x)) <= 1 + TOL


@pytest.mark.parametrize("first", ["autocast_bf16", "func_grad", "jacrev_over_input", "jvp"])
def test_constants_first_built_under_autocast_or_a_torch_func_transform_give_the_bound_of_a_fresh_process(
        first, monkeypatch):
    """The held counterparts of the inference-mode and fake-tensor cases: the process-wide DFT constants
    built first under autocast (they stay complex64), or inside torch.func.grad / jacrev / jvp (they are
    cached as functorch wrappers of a level that has exited, which later plain forwards unwrap), give
    later forwards exactly the normalized weight and gradient of freshly built ones."""
    from torch.func import grad, jacrev, jvp

    monkeypatch.setattr(conv_bounds, "_DFT_CACHE", {})
    layer = GramConv2d(4, 4, 3, padding=1)
    size = (20, 20)  # large enough for the symbol-lag constants too
    x = torch.randn(1, 4, *size)
    weight = layer.weight.detach().clone()
    if first == "autocast_bf16":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            layer(x)
    elif first == "func_grad":
        grad(lambda w: functional_call(layer, {"weight": w}, (x,)).square().sum())(weight)
    elif first == "jacrev_over_input":
        jacrev(lambda z: layer(z).sum())(x)
    else:
        jvp(lambda w: functional_call(layer, {"weight": w}, (x,)), (weight,), (torch.randn_like(weight),))

    def normalized_and_gradient():
        layer.weight.grad = None
        layer(x).square().sum().backward()
        return layer.normalized_weight(size).detach().clone(), layer.weight.grad.clone()

    after = normalized_and_gradient()
    monkeypatch.setattr(conv_bounds, "_DFT_CACHE", {})
    fresh = normalized_and_gradient()
    assert torch.equal(after[0], fresh[0]) and torch.equal(after[1], fresh[1])
    assert max(applied_norms(layer, x)) <= 1 + TOL
