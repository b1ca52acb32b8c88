"""lipschitz_bound: never below the empirical or exact Lipschitz constant; unknown modules raise."""

import math
import random
from fractions import Fraction

import pytest
import torch
from torch import nn

from lipnet.certify import LipschitzBoundError, UnknownModuleError, lipschitz_bound, register_lipschitz_bound
from lipnet.certify.lipschitz import add_up, mul_up
from lipnet.nn import (
    ConvexResidual,
    GlobalL2NormPool2d,
    GlobalScaledAvgPool2d,
    GramConv2d,
    GramLinear,
    GramResidualConv2d,
    InputNormalization,
    L2NormPool2d,
    MaxMin,
    ScaledAvgPool2d,
)


def zoo():
    """Networks covering every built-in bound, with input shapes."""
    return {
        "convnet": (nn.Sequential(
            InputNormalization([0.4, 0.5], [0.5, 0.3]),
            GramConv2d(2, 8, 3, padding=1), MaxMin(),
            GramConv2d(8, 8, 2, stride=2), nn.ReLU(),
            nn.Flatten(), nn.Dropout(0.5), GramLinear(8 * 4 * 4, 16), nn.Tanh(), GramLinear(16, 5),
        ), (2, 8, 8)),
        "pooling": (nn.Sequential(
            GramConv2d(1, 6, 3, padding=1), nn.LeakyReLU(0.1),
            L2NormPool2d(2), GramConv2d(6, 6, 3, padding=1, padding_mode="circular"), MaxMin(),
            ScaledAvgPool2d(3, 1, 1), nn.MaxPool2d(2, 1), nn.AvgPool2d(2), GlobalL2NormPool2d(),
            nn.Flatten(), GramLinear(6, 4),
        ), (1, 9, 9)),
        "residual": (nn.Sequential(
            GramConv2d(3, 8, 3, padding=1), MaxMin(),
            GramResidualConv2d(8, 3), nn.ELU(),
            ConvexResidual(nn.Sequential(GramConv2d(8, 8, 3, padding=1), MaxMin(), GramResidualConv2d(8, 3)), 0.3),
            nn.AdaptiveAvgPool2d((3, 2)), nn.AdaptiveMaxPool2d(2), GlobalScaledAvgPool2d(), nn.Flatten(),
            nn.Identity(), GramLinear(8, 6),
        ), (3, 7, 6)),
        "expanding": (nn.Sequential(  # Lipschitz constant above 1: normalization and overlapping pools
            InputNormalization([0.0], [0.2]), nn.LeakyReLU(1.5), ScaledAvgPool2d(2, 1),
            GramConv2d(1, 4, 3), nn.Sigmoid(), nn.Flatten(), GramLinear(4 * 3 * 3, 3),
        ), (1, 6, 6)),
    }


def empirical_lipschitz(net, shape, n=32, steps=40):
    """A lower bound on Lip(net): Jacobian norms (power iteration) and ascent on pair ratios."""
    net = net.double().eval().requires_grad_(False)  # Gram layers then cache their normalized weights
    x = torch.randn(n, *shape, dtype=torch.float64) * 0.5 + 0.5
    best = 0.0
    v = torch.randn_like(x)
    for _ in range(steps):  # power iteration on J^T J at every point
        v = v / v.flatten(1).norm(dim=1).view(-1, *[1] * len(shape))
        jv = torch.autograd.functional.jvp(net, x, v)[1]
        best = max(best, jv.flatten(1).norm(dim=1).max().item())
        v = torch.autograd.functional.vjp(net, x, jv)[1]
    a = x.clone()
    b = (a + 0.05 * torch.randn_like(a)).requires_grad_()
    opt = torch.optim.Adam([b], lr=1e-2)
    for _ in range(steps):
        ratio = (net(a) - net(b)).flatten(1).norm(dim=1) / (a - b).flatten(1).norm(dim=1)
        opt.zero_grad()
        (-ratio.sum()).backward()
        opt.step()
    with torch.no_grad():
        ratio = (net(a) - net(b)).flatten(1).norm(dim=1) / (a - b).flatten(1).norm(dim=1)
    return max(best, ratio.max().item())


@pytest.mark.parametrize("name", list(zoo()))
def test_bound_at_least_empirical_on_random_models(name):
    net, shape = zoo()[name]
    bound = lipschitz_bound(net, shape)
    empirical = empirical_lipschitz(net, shape)
    assert empirical <= bound
    assert empirical > 0.02 * bound  # the check is not vacuous


@pytest.mark.parametrize("name", ["convnet", "residual"])
def test_bound_at_least_empirical_after_training(name):
    net, shape = zoo()[name]
    x = torch.rand(64, *shape)
    y = torch.randint(0, net[-1].out_features, (64,))
    opt = torch.optim.Adam(net.parameters(), lr=3e-2)
    for _ in range(15):
        loss = nn.functional.cross_entropy(net(x) * 10, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    bound = lipschitz_bound(net, shape)
    assert empirical_lipschitz(net, shape) <= bound
    assert bound <= (1 / 0.3 if name == "convnet" else 1.0) * (1 + 1e-4)


def test_bound_of_a_linear_network_is_between_its_exact_norm_and_1():
    """A product of per-layer bounds, so not tight for a composition (here the exact norm is ~0.28 and
    the bound ~1): at least the norm of the network's Jacobian, and at most 1 (1-Lipschitz layers)."""
    net = nn.Sequential(GramConv2d(2, 4, 3, padding=1), ScaledAvgPool2d(2), GramConv2d(4, 4, 3, stride=2, padding=1),
                        nn.Flatten(), GramLinear(16, 3)).double()
    jac = torch.autograd.functional.jacobian(net, torch.zeros(1, 2, 8, 8, dtype=torch.float64))
    exact = torch.linalg.matrix_norm(jac.reshape(3, -1), ord=2).item()
    bound = lipschitz_bound(net, (2, 8, 8))
    assert exact <= bound <= 1 + 1e-4


def test_bound_is_the_rounded_up_product_at_the_sizes_each_layer_sees():
    conv1, conv2, fc = GramConv2d(3, 4, 3, padding=1), GramConv2d(4, 4, 3, stride=2, padding=1), GramLinear(64, 2)
    net = nn.Sequential(InputNormalization([0.5] * 3, [0.2, 0.25, 0.5]), conv1, MaxMin(), conv2, nn.Flatten(), fc)
    factors = [net[0].lipschitz_bound(), conv1.lipschitz_bound((8, 8)), conv2.lipschitz_bound((8, 8)), fc.lipschitz_bound()]
    bound = lipschitz_bound(net, (3, 8, 8))
    exact_product = math.prod(Fraction(f) for f in factors)
    assert Fraction(bound) >= exact_product
    assert bound == pytest.approx(float(exact_product), rel=1e-14)


def test_leaky_relu_with_a_large_slope_and_input_normalization():
    assert lipschitz_bound(nn.LeakyReLU(3.0), (4,)) == 3.0
    assert lipschitz_bound(nn.Sequential(InputNormalization([0.0], [0.5]), nn.LeakyReLU(-2.0)), (1, 2, 2)) >= 4.0


def test_rounding_helpers_round_up():
    rng = random.Random(0)
    for _ in range(1000):
        a, b = rng.uniform(0, 3), rng.uniform(0, 3)
        assert Fraction(mul_up(a, b)) >= Fraction(a) * Fraction(b)
        assert Fraction(add_up(a, b)) >= Fraction(a) + Fraction(b)
    assert mul_up(0.0, 5.0) == 0.0


class Mystery(nn.Module):
    def forward(self, x):
        return 3 * x


class Combine(nn.Module):
    """A container whose forward combines its children: its bound is not a product."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.ReLU(), nn.ReLU()

    def forward(self, x):
        return self.a(x) + self.b(x)


def test_unknown_module_raises_with_its_path_type_and_a_fix():
    net = nn.Sequential(nn.ReLU(), nn.Sequential(nn.Flatten(), Mystery()))
    with pytest.raises(UnknownModuleError) as info:
        lipschitz_bound(net, (3,))
    message = str(info.value)
    assert "'1.1'" in message and "Mystery" in message and "register_lipschitz_bound(Mystery" in message
    assert "lipschitz_bound(input_size)" in message
    with pytest.raises(UnknownModuleError, match="Combine"):
        lipschitz_bound(nn.Sequential(Combine()), (3,))
    with pytest.raises(UnknownModuleError, match="Conv2d"):  # plain layers are not assumed 1-Lipschitz
        lipschitz_bound(nn.Conv2d(1, 1, 3), (1, 5, 5))


def test_subclasses_inherit_a_bound_only_if_they_keep_forward():
    class PlainReLU(nn.ReLU):
        pass

    class DoubledReLU(nn.ReLU):
        def forward(self, x):
            return 2 * super().forward(x)

    assert lipschitz_bound(PlainReLU(), (3,)) == 1.0
    with pytest.raises(UnknownModuleError, match="DoubledReLU"):
        lipschitz_bound(DoubledReLU(), (3,))

    class Stack(nn.Sequential):
        def forward(self, x):
            return super().forward(x) + x

    with pytest.raises(UnknownModuleError, match="Stack"):
        lipschitz_bound(Stack(nn.ReLU()), (3,))


def test_registration_as_decorator_and_method_protocol():
    class Scale(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.c = c

        def forward(self, x):
            return self.c * x

    @register_lipschitz_bound(Scale)
    def _scale(module, shape):
        return abs(module.c)

    class SizeAware(nn.Module):
        def forward(self, x):
            return x

        def lipschitz_bound(self, input_size):
            self.seen = input_size
            return 1.0

    net = nn.Sequential(Scale(-2.5), SizeAware())
    assert lipschitz_bound(net, (2, 5, 7)) == 2.5
    assert net[1].seen == (5, 7)
    with pytest.raises(TypeError, match="nn.Module subclass"):
        register_lipschitz_bound(int, _scale)


@pytest.mark.parametrize("bad", [float("nan"), -1.0, float("inf"), "one", torch.ones(2)])
def test_invalid_bounds_are_rejected_with_the_module_path(bad):
    class Bad(nn.Module):
        def forward(self, x):
            return x

        def lipschitz_bound(self):
            return bad

    with pytest.raises(LipschitzBoundError, match=r"'0'.*Bad"):
        lipschitz_bound(nn.Sequential(Bad()), (2,))


def test_avg_pool_configurations():
    pool = nn.AvgPool2d(3, 2, 1)
    bound = lipschitz_bound(pool, (1, 9, 9))
    jac = torch.autograd.functional.jacobian(pool, torch.zeros(1, 1, 9, 9, dtype=torch.float64))
    assert torch.linalg.matrix_norm(jac.reshape(25, 81), ord=2).item() <= bound
    assert lipschitz_bound(nn.AvgPool2d(2), (1, 4, 4)) == pytest.approx(0.5)
    assert lipschitz_bound(nn.AvgPool2d(2, divisor_override=1), (1, 4, 4)) == pytest.approx(2.0)
    with pytest.raises(LipschitzBoundError, match="ceil_mode"):
        lipschitz_bound(nn.AvgPool2d(2, ceil_mode=True), (1, 5, 5))


def test_modes_are_restored_and_bad_shapes_rejected():
    net, shape = zoo()["convnet"]
    net.train()
    net[1].eval()
    lipschitz_bound(net, shape)
    assert net.training and not net[1].training and net[2].training
    assert all(p.grad is None for p in net.parameters())
    with pytest.raises(ValueError, match="without the batch dimension"):
        lipschitz_bound(net, ())


def test_an_inherited_method_is_refused_when_forward_changes():
    class Doubled(GramConv2d):
        def forward(self, x):
            return 2 * super().forward(x)

    class DoubledWithBound(Doubled):
        def lipschitz_bound(self, input_size=None):
            return 2 * super().lipschitz_bound(input_size)

    with pytest.raises(LipschitzBoundError, match="overrides GramConv2d.forward"):
        lipschitz_bound(nn.Sequential(Doubled(1, 2, 3, padding=1)), (1, 5, 5))
    layer = DoubledWithBound(1, 2, 3, padding=1)
    assert lipschitz_bound(layer, (1, 5, 5)) == 2 * GramConv2d.lipschitz_bound(layer, (5, 5))
    # GramResidualConv2d keeps GramConv2d.forward (it changes the weight the bound sees).
    assert lipschitz_bound(GramResidualConv2d(2, 3), (2, 5, 5)) <= 1 + 1e-5


def test_compiled_and_data_parallel_wrappers_are_unwrapped():
    net, shape = zoo()["convnet"]
    expected = lipschitz_bound(net, shape)
    assert lipschitz_bound(nn.DataParallel(net), shape) == expected
    assert lipschitz_bound(torch.compile(net), shape) == expected


@pytest.mark.parametrize("kind", ["forward", "pre", "global"])
def test_forward_hooks_are_refused(kind):
    from torch.nn.modules.module import register_module_forward_hook

    net = nn.Sequential(nn.Flatten(), GramLinear(4, 4), MaxMin(), GramLinear(4, 3))
    assert lipschitz_bound(net, (4,)) <= 1 + 1e-5
    if kind == "forward":
        handle = net[1].register_forward_hook(lambda module, inputs, output: 100 * output)
    elif kind == "pre":
        handle = net[3].register_forward_pre_hook(lambda module, inputs: (100 * inputs[0],))
    else:
        handle = register_module_forward_hook(lambda module, inputs, output: output)
    try:
        with pytest.raises(LipschitzBoundError, match="hooks"):
            lipschitz_bound(net, (4,))
    finally:
        handle.remove()
    assert lipschitz_bound(net, (4,)) <= 1 + 1e-5


@pytest.mark.parametrize("helper", ["_conv_forward", "_operator_norm"])
def test_overriding_a_helper_the_bound_relies_on_is_refused(helper):
    def scaled(self, *args, **kwargs):
        return 10 * getattr(GramConv2d, helper)(self, *args, **kwargs)

    Tampered = type("Tampered", (GramConv2d,), {helper: scaled})
    with pytest.raises(LipschitzBoundError, match=f"overrides GramConv2d.{helper}"):
        lipschitz_bound(nn.Sequential(Tampered(2, 2, 3, padding=1)), (2, 6, 6))


@pytest.mark.parametrize("dims", [1, 2])
def test_overriding_the_input_size_of_a_convolution_bound_is_refused(dims):
    """A subclass bounding (and so normalizing for) a smaller input than the forward applies to
    would be certified ~1 while its operator on the real input is larger."""
    from lipnet.nn import GramConv1d

    base = GramConv2d if dims == 2 else GramConv1d
    Smaller = type("Smaller", (base,), {"_input_size": lambda self, input_size: (1,) * dims})
    layer = Smaller(2, 2, 3, padding=1, bias=False, dtype=torch.float64)
    nn.init.ones_(layer.weight)  # low-pass: its norm on 8 points per axis is well above its norm on 1
    shape = (2,) + (8,) * dims
    x = torch.randn(shape, dtype=torch.float64)
    jacobian = torch.autograd.functional.jacobian(lambda v: layer(v[None])[0], x).reshape(-1, x.numel())
    assert float(torch.linalg.matrix_norm(jacobian, 2)) > 1.5
    with pytest.raises(LipschitzBoundError, match=f"overrides {base.__name__}._input_size"):
        lipschitz_bound(nn.Sequential(layer), shape)


def test_a_pool_subclass_with_its_own_forward_is_refused():
    from lipnet.nn import L2NormPool2d, ScaledAvgPool2d

    for base in (ScaledAvgPool2d, L2NormPool2d):
        class Loud(base):
            def forward(self, x):
                return 100 * super().forward(x)

        with pytest.raises(LipschitzBoundError, match="defines its own forward"):
            lipschitz_bound(nn.Sequential(Loud(2)), (1, 4, 4))
        assert lipschitz_bound(nn.Sequential(type("Quiet", (base,), {})(2)), (1, 4, 4)) <= 1 + 1e-12


def test_a_registered_rule_that_cannot_read_a_module_names_it():
    pool = nn.AvgPool2d(2)
    pool.kernel_size = "2"  # torch would fail too; the rule's failure is named
    with pytest.raises(LipschitzBoundError, match="registered bound failed"):
        lipschitz_bound(nn.Sequential(pool), (1, 4, 4))


@pytest.mark.parametrize("make, shape", [
    (lambda: nn.MaxPool2d((3,)), (1, 6, 6)),
    (lambda: nn.MaxPool2d(2, stride=(1,)), (1, 6, 6)),
    (lambda: nn.MaxPool2d(2, stride=[]), (1, 6, 6)),
    (lambda: nn.AvgPool2d(2, stride=(1,)), (1, 6, 6)),
    (lambda: nn.AvgPool2d((2,), stride=[]), (1, 6, 6)),
    (lambda: nn.MaxPool1d(2, stride=[]), (1, 7)),
    (lambda: nn.MaxPool1d((3,), stride=(1,)), (1, 7)),
    (lambda: nn.AvgPool1d(2, stride=[]), (1, 7)),
])
def test_pooling_shorthands_torch_runs_are_bounded_as_torch_reads_them(make, shape):
    """``(3,)`` for both axes and an empty stride for the kernel size, as torch's functional pooling
    reads them (refused or a raw IndexError before); the bound holds for the Jacobian."""
    pool = make()
    bound = lipschitz_bound(nn.Sequential(pool), shape)
    x = torch.randn(shape, dtype=torch.float64)
    jacobian = torch.autograd.functional.jacobian(lambda v: pool(v[None])[0], x).reshape(-1, x.numel())
    assert float(torch.linalg.matrix_norm(jacobian, 2)) <= bound * (1 + 1e-12)


def test_global_scaled_average_pooling_allows_for_its_rounded_scale():
    import math

    from lipnet.nn import GlobalScaledAvgPool2d

    pool = GlobalScaledAvgPool2d()
    bound = Fraction(lipschitz_bound(nn.Sequential(pool), (1, 3, 5)))
    assert bound == Fraction(pool.lipschitz_bound())
    for h, w in ((1, 2), (3, 5), (2, 3)):  # sqrt(hw) is irrational: its float rounds one way or the other
        for dtype in (torch.float32, torch.float64):
            # The scale as the layer applies it (the mean of ones is exactly 1), not math.sqrt(h * w): the
            # layer rounds sqrt(hw) to float32, downwards, so a float64 square root is not what it multiplies by.
            scale = Fraction(float(pool(torch.ones(1, 1, h, w, dtype=dtype))))
            assert scale != Fraction(math.sqrt(h * w))
            assert bound ** 2 >= scale ** 2 / (h * w), (h, w, dtype)


class _Scale(nn.Module):
    """``x -> s x`` with a float64 factor, bounded by its own ``lipschitz_bound``."""

    def __init__(self, factor: float):
        super().__init__()
        self.factor = nn.Parameter(torch.tensor(factor, dtype=torch.float64))

    def forward(self, x):
        return x * self.factor

    def lipschitz_bound(self):
        return abs(float(self.factor))


def test_a_composed_bound_beyond_the_largest_float_rounds_up_to_inf():
    """Each module's bound is finite, their product is not a float: rounded upwards it is inf
    (sound), and a further product or sum with it stays inf. The exact rounding converted the
    inf to a Fraction and raised ``OverflowError: cannot convert Infinity to integer ratio``."""
    assert mul_up(1e200, 1e200) == math.inf
    assert mul_up(math.inf, 2.0) == mul_up(0.5, math.inf) == add_up(math.inf, 1.0) == add_up(1.0, math.inf) == math.inf
    assert lipschitz_bound(nn.Sequential(_Scale(1e200), _Scale(1e200), _Scale(1e-300)), (3,)) == math.inf
    assert lipschitz_bound(ConvexResidual(nn.Sequential(_Scale(1e200), _Scale(1e200)), 0.5), (3,)) == math.inf


def test_a_bound_below_the_smallest_normal_float_survives_flushed_denormals(flushed_denormals):
    """Two eval-mode BatchNorms of gain 1e-160: the network is (1e-160)^2 / (1 + 1e-5)-Lipschitz, a
    subnormal constant, which flushing denormals to 0 made a bound of 0."""
    def batch_norm():
        layer = nn.BatchNorm1d(2).double().eval()
        with torch.no_grad():
            layer.weight.fill_(1e-160)
        return layer

    bound = lipschitz_bound(nn.Sequential(batch_norm(), batch_norm()), (2,))
    assert float(torch.tensor(2.0 ** -1022, dtype=torch.float64) / 2) == 0.0  # still flushing after
    torch.set_flush_denormal(False)  # to compare: a flushing CPU reads the subnormal bound as 0
    exact_squared = (Fraction(1e-160) ** 2) ** 2 / Fraction(1 + 1e-5) ** 2  # of (|w| / sqrt(var + eps))^2
    assert bound > 0 and Fraction(bound) ** 2 >= exact_squared


def test_a_module_applied_to_a_complex_value_is_refused_by_path():
    """A module that makes its output complex (``x * 1j``, bound 1) followed by ``nn.Tanh``: the
    module bounds hold for real inputs (tanh(1j * x) = 1j * tan(x) has slope 200 at x = 1.5, where
    nn.Tanh's bound is 1), and the rules see only shapes, so the product 1 was wrong; refused."""
    class TimesI(nn.Module):
        def forward(self, x):
            return x * 1j

        def lipschitz_bound(self):
            return 1.0

    assert lipschitz_bound(TimesI(), (4,)) == 1.0  # a complex output of a real input is fine
    with pytest.raises(LipschitzBoundError, match="applied to a complex value") as info:
        lipschitz_bound(nn.Sequential(TimesI(), nn.Tanh()), (4,))
    assert info.value.path == "1"


def test_a_plain_last_linear_of_a_sequential_is_bounded_by_its_weight_and_nowhere_else():
    torch.manual_seed(0)
    last = nn.Linear(8, 3)
    with torch.no_grad():
        last.weight.mul_(5)  # an unnormalized last layer: its norm counts
    model = nn.Sequential(GramLinear(6, 8), MaxMin(), last)
    exact = float(torch.linalg.matrix_norm(last.weight.double(), 2))
    bound = lipschitz_bound(model, (6,))
    assert exact * 0.999 <= bound <= exact * 1.001  # the body's bound is 1 up to 1e-5
    with pytest.raises(UnknownModuleError):  # a plain Linear before another module
        lipschitz_bound(nn.Sequential(nn.Linear(6, 8), MaxMin(), GramLinear(8, 3)), (6,))
    torch.nn.utils.parametrize.register_parametrization(last, "weight", Doubled())
    with pytest.raises(UnknownModuleError):  # each read of a parametrized weight computes it anew
        lipschitz_bound(model, (6,))


class Doubled(nn.Module):
    def forward(self, weight):
        return 2 * weight


def _weights_hard_for_gram_iteration():
    generator = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(64, 64, generator=generator, dtype=torch.float64))
    u, v = torch.randn(40, 1, generator=generator, dtype=torch.float64), torch.randn(1, 70, generator=generator,
                                                                                     dtype=torch.float64)
    a = torch.randn(30, 30, generator=generator, dtype=torch.float64)
    return {
        "orthogonal (flat spectrum)": q,
        "rank one": u @ v,
        "two equal top singular values": torch.diag(torch.tensor([1.0, 1.0, 1 - 1e-9, 0.5], dtype=torch.float64)),
        "ill-conditioned": a @ torch.diag(torch.logspace(0, -12, 30, dtype=torch.float64)) @ a.T,
        "wide": torch.randn(3, 500, generator=generator, dtype=torch.float64),
        "tall": torch.randn(500, 3, generator=generator, dtype=torch.float64),
    }


@pytest.mark.parametrize("kind", list(_weights_hard_for_gram_iteration()))
def test_the_plain_last_linear_bound_is_at_least_the_exact_norm(kind):
    from lipnet.certify.lipschitz import plain_linear_lipschitz_bound

    weight = _weights_hard_for_gram_iteration()[kind]
    layer = nn.Linear(weight.shape[1], weight.shape[0], dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(weight)
    exact = float(torch.linalg.svdvals(weight)[0])
    bound = plain_linear_lipschitz_bound(layer)
    assert exact <= bound <= exact * (1 + 1e-4)
