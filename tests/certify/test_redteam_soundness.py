"""Soundness red team of lipnet.certify: models whose certificate describes another function than the
one the model computes. Each xfail test is a bug (a false certificate) that currently passes silently;
the passing ones are attacks that the library handles and no other test covers."""

import pytest
import torch
from torch import nn

from lipnet.certify import LipschitzBoundError, certified_accuracy, lipschitz_bound
from lipnet.nn import GramLinear, MaxMin


def small_net(last=GramLinear, out=2):
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), GramLinear(4, 4), MaxMin(), last(4, out)).eval()


def difference_quotient(model, shape, scale=1e-3, seed=0):
    """``||f(x + d) - f(x)|| / ||d||`` at a random point: a lower bound on the Lipschitz constant."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand((1, *shape), generator=gen)
    d = scale * torch.randn((1, *shape), generator=gen)
    with torch.no_grad():
        return float((model(x + d) - model(x)).norm() / d.norm())


def assert_refused_or_sound(model, x, attack):
    """Either certification refuses the model, or no point of ``attack(x, radius)`` (one candidate
    within the certified radius of ``x``) changes the model's prediction."""
    with torch.no_grad():
        label = model(x).argmax(1)
    try:
        result = certified_accuracy(model, (x, label), eps=[0.0], progress=False)
    except LipschitzBoundError:
        return
    radius = float(result.radii[0])
    assert radius > 0  # the point is certified
    for candidate in attack(x, radius):
        assert float((candidate - x).norm()) < radius
        with torch.no_grad():
            assert int(model(candidate).argmax(1)) == int(label), (
                f"certified radius {radius:.4g}, but a point at distance {float((candidate - x).norm()):.4g} "
                "changes the prediction")


def along_ones(fraction=0.1):
    """Two candidates at ``fraction`` of the radius, along +-(1, ..., 1)."""
    def attack(x, radius):
        d = torch.ones_like(x) / x.numel() ** 0.5 * radius * fraction
        return [x + d, x - d]
    return attack


# ----------------------------------------------------------------------------- bugs


def _sum_trigger(x0):
    """A hook adding ``1000 (sum(x) - sum(x0)) * (-1, 1)`` to the logits: 0 at ``x0``, and a
    gain of about 2000 along (1, 1, 1, 1)."""
    s0 = float(x0.sum())

    def hook(module, args, out):
        return out + 1e3 * (args[0].flatten(1).sum(1, keepdim=True) - s0) * torch.tensor([-1.0, 1.0])
    return hook


def test_forward_hook_on_a_sequential_with_a_plain_linear_last_layer():
    model = small_net(nn.Linear)
    x = torch.rand(1, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    model.register_forward_hook(_sum_trigger(x))
    assert_refused_or_sound(model, x, along_ones())


def test_forward_hook_on_a_sequential_with_a_gram_linear_last_layer_is_refused():
    # The same model with a GramLinear last layer is bounded as a whole, and refused.
    model = small_net(GramLinear)
    x = torch.rand(1, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    model.register_forward_hook(_sum_trigger(x))
    with pytest.raises(LipschitzBoundError, match="forward hooks"):
        certified_accuracy(model, (x, torch.zeros(1, dtype=torch.long)), progress=False)


def test_forward_pre_hook_on_a_sequential_with_a_plain_linear_last_layer():
    model = small_net(nn.Linear)
    x = torch.rand(1, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    model.register_forward_pre_hook(lambda module, args: (1e3 * (args[0] - x) + x,))
    assert_refused_or_sound(model, x, along_ones(0.01))


def test_instance_forward_on_a_sequential_with_a_plain_linear_last_layer():
    model = small_net(nn.Linear)
    x = torch.rand(1, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    model.forward = lambda inputs: nn.Sequential.forward(model, 1e3 * (inputs - x) + x)
    assert_refused_or_sound(model, x, along_ones(0.01))


class Amplified(nn.Module):
    """A user wrapper that happens to name its child ``_orig_mod`` (as torch.compile's does)."""

    def __init__(self, inner):
        super().__init__()
        self._orig_mod = inner

    def forward(self, x):
        return self._orig_mod(100 * x)


def test_a_module_with_an_orig_mod_child_is_not_taken_for_a_compiled_wrapper():
    model = Amplified(nn.Sequential(GramLinear(4, 4), MaxMin(), GramLinear(4, 2)).eval())
    empirical = difference_quotient(model, (4,))  # about 51
    try:
        bound = lipschitz_bound(model, (4,))  # 1.000002
    except LipschitzBoundError:
        return
    assert bound >= empirical


@pytest.mark.parametrize("kind", ["forward_hook", "forward_pre_hook"])
def test_hooks_on_a_compiled_wrapper_are_refused(kind):
    torch.manual_seed(0)
    compiled = torch.compile(nn.Sequential(GramLinear(4, 4), MaxMin(), GramLinear(4, 2)).eval(), backend="eager")
    if kind == "forward_hook":
        compiled.register_forward_hook(lambda module, args, out: 100 * out)
    else:
        compiled.register_forward_pre_hook(lambda module, args: (100 * args[0],))
    with pytest.raises(LipschitzBoundError, match="hooks"):
        lipschitz_bound(compiled, (4,))


class AmplifiedDataParallel(nn.DataParallel):
    def forward(self, x):
        return super().forward(100 * x)


def test_a_data_parallel_subclass_with_its_own_forward_is_not_unwrapped():
    inner = nn.Sequential(GramLinear(4, 4), MaxMin(), GramLinear(4, 2)).eval()
    model = AmplifiedDataParallel(inner)
    # What its forward computes (without running DataParallel, which wants the module on a GPU where there is one).
    empirical = difference_quotient(lambda x: inner(100 * x), (4,))  # about 42
    try:
        bound = lipschitz_bound(model, (4,))  # 1.000002
    except LipschitzBoundError:
        return
    assert bound >= empirical


# A BatchNorm whose per-channel scale gamma / sqrt(var) is subnormal: torch computes that scale first,
# rounded to a multiple of the smallest subnormal (3 * 2^-1074 / 2 becomes 2 * 2^-1074, a third too
# large), and then multiplies it by inputs of any size, where the error is no longer a few units of the
# output. BatchNorms of gain 2^1000 before it and 2^74 after make it the logits' scale.


def _subnormal_scale_net(dtype):
    tiny, big, back = ((2.0 ** -1074, 2.0 ** 1000, 2.0 ** 74) if dtype == torch.float64 else
                       (2.0 ** -149, 2.0 ** 100, 2.0 ** 49))

    def batch_norm(gammas, var):
        layer = nn.BatchNorm1d(2, eps=0.0).to(dtype).eval()
        with torch.no_grad():
            layer.running_var.fill_(var)
            layer.weight.copy_(torch.tensor(gammas, dtype=dtype))
            layer.bias.zero_()
        return layer

    # Exact logits (1.5 x0, 2 x1); channel 0's scale 1.5 * tiny rounds to 2 * tiny.
    return nn.Sequential(batch_norm([big, big], 1.0), batch_norm([3 * tiny, 4 * tiny], 4.0),
                         batch_norm([back, back], 1.0)).eval()


def test_rounding_bound_covers_a_batch_norm_with_a_subnormal_scale():
    from lipnet.certify.lipschitz import module_lipschitz_bounds
    from lipnet.certify.precision import forward_with_error_bound

    model = _subnormal_scale_net(torch.float64)
    x = torch.tensor([[1.0, 0.9]], dtype=torch.float64)
    exact = torch.tensor([[1.5, 1.8]], dtype=torch.float64)  # 1.5 x0 and 2 x1, in exact arithmetic
    try:
        _, bounds = module_lipschitz_bounds(model, (2,))
    except LipschitzBoundError as error:  # refused: no proven rounding bound to check
        assert "smallest normal" in str(error)
        return
    with torch.no_grad():
        logits, err = forward_with_error_bound(model, x, bounds)  # logits (2.0, 1.8), err 7e-15
    assert float((logits - exact).norm()) <= float(err[0])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_certified_prediction_of_a_batch_norm_with_a_subnormal_scale(dtype):
    model = _subnormal_scale_net(dtype)
    x = torch.tensor([[1.0, 0.9]], dtype=dtype)
    with torch.no_grad():
        applied = int(model(x).argmax(1))  # float64: class 0 (2.0 > 1.8); float32: class 0 as well
    exact = 1  # 1.5 < 1.8
    assert applied != exact
    for label in (0, 1):  # one of them would be certified for a model that does not predict it: refused
        with pytest.raises(LipschitzBoundError, match="smallest normal"):
            certified_accuracy(model, (x, torch.tensor([label])), eps=[0.0], progress=False)


# ----------------------------------------------------------------------------- scalars applied in float32


@pytest.mark.parametrize("make", [lambda: nn.LeakyReLU(1.1), lambda: nn.ELU(1.1), lambda: nn.RReLU(1.1, 1.1)],
                         ids=["LeakyReLU", "ELU", "RReLU"])
def test_a_slope_above_one_is_bounded_as_float32_applies_it(make):
    model = nn.Sequential(nn.Flatten(), make()).eval()  # no parameters: float32, torch's default dtype
    x, origin = torch.tensor([[-2.0 ** -30]]), torch.zeros(1, 1)  # products by 2^-30 are exact
    with torch.no_grad():
        quotient = float((model(x) - model(origin)).norm() / (x - origin).norm())  # 1.100000023841858
    assert lipschitz_bound(model, (1,)) >= quotient  # 1.1


def test_a_slope_below_one_applied_in_float32_needs_no_margin():
    # Slopes up to 1 leave the bound 1 (the identity's slope), whatever float32 makes of them.
    model = nn.Sequential(nn.Flatten(), nn.LeakyReLU(0.9999999999)).eval()
    x, origin = torch.tensor([[-2.0 ** -30]]), torch.zeros(1, 1)
    with torch.no_grad():
        quotient = float((model(x) - model(origin)).norm() / (x - origin).norm())
    assert lipschitz_bound(model, (1,)) >= quotient


# ----------------------------------------------------------------------------- state changed during certification


def test_weights_changed_between_batches_are_not_certified_with_stale_bounds():
    torch.manual_seed(0)
    model = nn.Sequential(GramLinear(4, 4), MaxMin(), GramLinear(4, 2)).eval()
    with torch.no_grad():
        model[0].weight.zero_()  # the body is constant: bound 0, radii infinite
    x = torch.rand(8, 4, generator=torch.Generator().manual_seed(0))

    def data():  # e.g. a training step taken between two batches (another thread, a loader with side effects)
        yield x[:4], torch.zeros(4, dtype=torch.long)
        with torch.no_grad():
            model[0].weight.normal_(generator=torch.Generator().manual_seed(1))
            labels = model(x[4:]).argmax(1)
        yield x[4:], labels

    try:
        result = certified_accuracy(model, data(), eps=[0.0], progress=False)
    except ValueError as error:  # refused: the model changed between batches
        assert "changed while it was being certified" in str(error)
        return
    for i in range(4, 8):  # a gradient step on the margin flips each prediction within distance 0.5
        point = x[i:i + 1].clone().requires_grad_(True)
        logits = model(point)
        label = int(logits.argmax(1))
        (logits[0, label] - logits[0, 1 - label]).backward()
        step = point.grad / point.grad.norm()
        with torch.no_grad():
            flips = [t for t in (0.1, 0.25, 0.5, 1.0) if int(model(point - t * step).argmax(1)) != label]
        if flips:
            assert float(result.radii[i]) <= flips[0]  # radius inf


@pytest.mark.parametrize("change", ["data", "setting", "residual"])
def test_changes_between_batches_that_count_no_version_are_refused(change):
    # Found by review (helper 68): a write through .data bumps no version counter, and a Gram
    # layer's n_iter is no tensor; the float64 copy reads the original's applied weights and
    # coefficients at every batch, while the bounds are those of the first batch.
    from lipnet.nn import ConvexResidual

    torch.manual_seed(0)
    if change == "residual":
        model = nn.Sequential(ConvexResidual(nn.Sequential(GramLinear(4, 4), MaxMin()), alpha=0.1),
                              GramLinear(4, 2)).eval()
    else:
        model = nn.Sequential(GramLinear(4, 4, n_iter=1), MaxMin(), GramLinear(4, 2)).eval()
    x = torch.rand(8, 4, generator=torch.Generator().manual_seed(0))

    def data():
        yield x[:4], torch.zeros(4, dtype=torch.long)
        if change == "data":
            model[0].weight.data.normal_()
        elif change == "setting":
            model[0].n_iter = 50
        else:
            model[0].alpha_logit.data.fill_(-2.0)
        yield x[4:], torch.zeros(4, dtype=torch.long)

    with pytest.raises(ValueError, match="changed while it was being certified"):
        certified_accuracy(model, data(), eps=[0.0], progress=False)


def test_a_model_that_does_not_change_is_certified_over_many_batches():
    model = small_net()
    x = torch.rand(12, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    batches = [(x[i:i + 3], model(x[i:i + 3]).argmax(1)) for i in range(0, 12, 3)]
    assert certified_accuracy(model, batches, eps=[0.0], progress=False).n == 12


# ----------------------------------------------------------------------------- outputs that are not one tensor


def _pool_with_indices():
    return nn.Sequential(nn.Flatten(), nn.AdaptiveMaxPool1d(2, return_indices=True)).eval()


def test_a_model_returning_max_pooling_indices_is_refused():
    model = _pool_with_indices()
    a, b = torch.tensor([[[1.0, 0.0, 0.0, 0.0]]]), torch.tensor([[[0.0, 1.0, 0.0, 0.0]]])
    with torch.no_grad():  # sqrt(2) apart, indices of the first window 0 and 1
        assert not torch.equal(model(a)[1], model(b)[1])
    with pytest.raises(LipschitzBoundError):
        lipschitz_bound(model, (1, 4))  # 1.0000000000000002


def test_certified_accuracy_of_a_model_returning_a_tuple_says_why():
    with pytest.raises((LipschitzBoundError, ValueError, TypeError)):
        certified_accuracy(_pool_with_indices(), (torch.rand(3, 1, 4), torch.zeros(3, dtype=torch.long)),
                           progress=False)


# ----------------------------------------------------------------------------- attacks that held


def _power_iteration(model, shape, steps=40, seed=0):
    """A lower bound on the Lipschitz constant of a float64 model: ||J v|| after power iteration on J^T J."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((1, *shape), generator=gen, dtype=torch.float64)
    v = torch.randn((1, *shape), generator=gen, dtype=torch.float64)
    for _ in range(steps):
        v = v / v.norm()
        _, jv = torch.autograd.functional.jvp(model, x, v)
        _, v = torch.autograd.functional.vjp(model, x, jv)
    v = v / v.norm()
    return float(torch.autograd.functional.jvp(model, x, v)[1].norm())


class Triple(nn.Module):
    def forward(self, weight):
        return 3 * weight


def _reused():
    layer = GramLinear(4, 4)
    return nn.Sequential(layer, nn.Tanh(), layer, nn.Tanh(), layer)


def _tied():
    first, second = GramLinear(4, 4), GramLinear(4, 4)
    second.weight = first.weight
    return nn.Sequential(first, MaxMin(), second)


def _parametrized_gram():
    layer = GramLinear(4, 4)
    torch.nn.utils.parametrize.register_parametrization(layer, "weight", Triple())
    return nn.Sequential(layer)


def _parametrized_batch_norm():
    layer = nn.BatchNorm1d(4)
    torch.nn.utils.parametrize.register_parametrization(layer, "weight", Triple())
    return nn.Sequential(layer)  # gain 3 / sqrt(1 + eps)


@pytest.mark.parametrize("make", [_reused, _tied, _parametrized_gram, _parametrized_batch_norm],
                         ids=["reused", "tied", "parametrized-gram", "parametrized-batchnorm"])
def test_shared_and_parametrized_layers_are_bounded_as_applied(make):
    torch.manual_seed(0)
    model = make().double().eval()
    bound = lipschitz_bound(model, (4,))
    assert bound >= _power_iteration(model, (4,)) * (1 - 1e-12)
    if make is _parametrized_batch_norm:
        assert bound >= 2.99998


def test_a_plain_data_parallel_and_averaged_model_are_bounded_as_their_module():
    from torch.optim.swa_utils import AveragedModel

    inner = small_net(GramLinear)
    expected = lipschitz_bound(inner, (1, 2, 2))
    assert lipschitz_bound(nn.DataParallel(inner), (1, 2, 2)) == expected
    assert lipschitz_bound(AveragedModel(inner), (1, 2, 2)) == expected


def test_a_hook_on_the_body_of_a_sequential_with_a_plain_linear_last_layer_is_refused():
    model = small_net(nn.Linear)
    model[2].register_forward_hook(lambda module, args, out: 100 * out)
    with pytest.raises(LipschitzBoundError, match="forward hooks"):
        certified_accuracy(model, (torch.rand(2, 1, 2, 2), torch.zeros(2, dtype=torch.long)), progress=False)


# ----------------------------------------------------------------------------- helpers a bound relies on


def test_an_input_normalization_overriding_its_channel_check_is_refused():
    from lipnet.nn import InputNormalization

    class Lenient(InputNormalization):
        def _check_channels(self):
            return self.mean.numel()

    layer = Lenient([0.0], [1.0])
    layer.std = torch.ones(4)  # one input channel broadcast to four outputs: gain 2
    model = nn.Sequential(layer).eval()
    empirical = difference_quotient(model, (1, 2, 2))  # 2.0
    try:
        bound = lipschitz_bound(model, (1, 2, 2))  # 1.0000000000000002
    except (LipschitzBoundError, ValueError):
        return
    assert bound >= empirical


# ----------------------------------------------------------------------------- subnormals on other threads

_FLUSHING_WORKERS = r"""
import torch
from torch import nn
torch.set_num_threads(2)
torch.set_flush_denormal(True)  # a speed setting, made at start-up: the intra-op threads start with it
_ = torch.ones(1 << 20, dtype=torch.float64) * 2.0
from lipnet.certify import certified_accuracy

def batch_norm(gain, bias=(0.0, 0.0)):
    layer = nn.BatchNorm2d(2, eps=0.0).double().eval()
    with torch.no_grad():
        layer.weight.fill_(gain)
        layer.bias.copy_(torch.tensor(bias, dtype=torch.float64))
        layer.running_var.fill_(1.0)
    return layer

# Channel 0 is scaled by 2^-1030 (subnormal) and back; channel 1 is the constant 0.9. Exact logits (1, 0.9).
model = nn.Sequential(batch_norm(2.0 ** -515), batch_norm(2.0 ** -515), batch_norm(2.0 ** 515),
                      batch_norm(2.0 ** 515, (0.0, 0.9)), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
x = torch.zeros(64, 2, 64, 64, dtype=torch.float64)
x[:, 0] = 1.0
result = certified_accuracy(model, (x, torch.ones(64, dtype=torch.long)), eps=[0.0], progress=False, batch_size=64)
print(int((result.radii > 0).sum()), float(result.radii.max()))
"""


def test_gradual_underflow_holds_on_intra_op_threads():
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", _FLUSHING_WORKERS], capture_output=True, text=True, env=env,
                          timeout=120, check=True)
    certified, radius = done.stdout.split()
    # The exact model (and the float64 model with gradual underflow) predicts class 0 on every example:
    # none may be certified as class 1 (32 of 64 are, at radius 40.7, from logits (0, 0.9)).
    assert int(certified) == 0, f"{certified} examples certified as class 1, up to radius {radius}"


def test_duplicate_and_zero_rows_of_a_plain_last_layer():
    model = small_net(nn.Linear, out=3)
    with torch.no_grad():
        model[3].weight[1] = model[3].weight[0]  # classes 0 and 1 tie everywhere
        model[3].bias[1] = model[3].bias[0]
        model[3].weight[2] = 0.0  # class 2 is the constant bias[2]
        model[3].bias[2] = -1e3
    x = torch.rand(8, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    for label in (0, 1, 2):
        result = certified_accuracy(model, (x, torch.full((8,), label)), eps=[0.0], progress=False)
        assert bool((result.radii == 0).all())  # a tie (0 and 1) or a wrong class (2) is never certified


# ----------------------------------------------------------------------------- review of the fixes (helper 68)


def test_a_slope_beyond_float16s_range_keeps_a_finite_bound_in_float64():
    model = nn.Sequential(GramLinear(2, 2), nn.LeakyReLU(7e4)).double()
    assert 7e4 <= lipschitz_bound(model, (2,)) < 7.1e4


def test_an_error_that_is_not_about_the_input_shape_is_not_dressed_as_one():
    class NoKernel(nn.Module):
        def forward(self, x):
            raise NotImplementedError("custom op has no CPU kernel")

    register = pytest.importorskip("lipnet.certify").register_lipschitz_bound
    register(NoKernel, lambda module, shape: 1.0)
    with pytest.raises(NotImplementedError, match="^custom op has no CPU kernel$"):
        lipschitz_bound(nn.Sequential(NoKernel()), (2,))


def test_a_subnormal_batch_norm_scale_met_by_certified_accuracy_names_its_path():
    model = _subnormal_scale_net(torch.float32)
    with pytest.raises(LipschitzBoundError, match="module '1'"):
        certified_accuracy(model, (torch.ones(1, 2), torch.zeros(1, dtype=torch.long)), progress=False)
