"""Red-team audit of :func:`lipnet.convert`: adversarial models are certified soundly or refused.

Each model is converted with an ``input_shape`` and certified with
:func:`lipnet.certify.lipschitz_bound`; either that raises a
:class:`~lipnet.certify.LipschitzBoundError`, or the bound is at least a lower bound on the
true Lipschitz constant of the converted model: the largest singular value of its float64
Jacobian at random, tiny, large and adversarial inputs, and the slopes of random pairs.

The first tests are the findings ("found"), each failing before its fix (certified vs true
constant in their docstrings); the rest are patterns that were already right, kept as
regression tests.
"""

import threading
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.parametrize as parametrize
from torch import nn

from lipnet import convert
from lipnet.certify import LipschitzBoundError, certified_accuracy, lipschitz_bound, register_lipschitz_bound
from lipnet.convert import traced_lipschitz_bound
from lipnet.convert.attribute_writes import _AttributeWrites


F64 = torch.float64
#: Relative allowance for float64 rounding in a Jacobian or a finite difference.
SLACK = 1e-9


#: convert registers traced bounds process-wide: each test restores the registry (tests/convert/conftest.py).
pytestmark = pytest.mark.usefixtures("registry")


def jacobian_norm(model, x):
    """The largest singular value of the Jacobian of ``model`` at one example ``x`` (float64)."""
    jac = torch.autograd.functional.jacobian(lambda v: model(v.unsqueeze(0)).flatten(), x)
    return float(torch.linalg.matrix_norm(jac.reshape(-1, x.numel()), 2))


def lower_bound(model, shape, points=(), seed=0):
    """A lower bound on the Lipschitz constant of ``model``: Jacobian norms at random points of
    several scales, at zero and at ``points``, and the slopes of random close and far pairs."""
    generator = torch.Generator().manual_seed(seed)
    xs = [scale * torch.randn(shape, generator=generator, dtype=F64) for scale in (1.0, 1e-3, 30.0, 300.0)]
    best = max(jacobian_norm(model, x) for x in [*xs, torch.zeros(shape, dtype=F64), *points])
    with torch.no_grad():
        for scale in (1e-4, 1e-1, 3.0):
            a = torch.randn(16, *shape, generator=generator, dtype=F64)
            b = a + scale * torch.randn(16, *shape, generator=generator, dtype=F64)
            ratio = (model(a.clone()) - model(b.clone())).flatten(1).norm(dim=1) / (a - b).flatten(1).norm(dim=1)
            best = max(best, float(ratio.max()))
    return best


def converted_bound(model, shape):
    """``(converted model, its certified bound)``; raises LipschitzBoundError where it is refused."""
    converted, _ = convert(model.double().eval(), input_shape=shape)
    converted = converted.double().eval()
    return converted, lipschitz_bound(converted, shape)


def traced(model, shape):
    """:func:`traced_lipschitz_bound` of ``model`` with its layers converted."""
    converted, _ = convert(model.double().eval())
    return traced_lipschitz_bound(converted, shape)


def assert_sound_or_refused(model, shape, points=()):
    """The converted model's certified bound is at least its true constant, or certification raises.
    Returns the bound (None where refused)."""
    try:
        converted, bound = converted_bound(model, shape)
    except LipschitzBoundError:
        return None
    true = lower_bound(converted, shape, points)
    assert true <= bound * (1 + SLACK), f"false certificate: bound {bound!r} < true Lipschitz constant >= {true!r}"
    return bound


class Container(nn.Module):
    """A module with a child (so that convert traces it), buffers and a forward given per test."""

    def __init__(self, forward, **buffers):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        for name, value in buffers.items():
            if isinstance(value, nn.Parameter):
                self.register_parameter(name, value)
            else:
                self.register_buffer(name, value)
        self._forward = forward

    def forward(self, x):
        return self._forward(self, x)


# ----------------------------------------------------------------------------- found: c.mul_(y)


@pytest.mark.parametrize("factor, scale", [(100.0, 1e-3), (1e3, 1e-6)])
def test_an_in_place_product_into_a_constant_is_bounded_by_the_constant(factor, scale):
    """``torch.full(x.shape, c).mul_(y)`` leaves ``c * y`` in the constant, and the factor was read
    after the product: max |c y| instead of c. Certified 1.1e-4 for a true constant of 0.1
    (c = 100, y = 1e-3 lin(x)), 9.5e-10 for 1e-3 (c = 1000, y = 1e-6 lin(x))."""
    torch.manual_seed(0)
    model = Container(lambda self, x: torch.full(x.shape, factor, dtype=x.dtype).mul_(self.lin(x) * scale))
    converted, bound = converted_bound(model, (4,))
    true = lower_bound(converted, (4,))
    assert true == pytest.approx(factor * scale, rel=1e-6)
    assert true <= bound * (1 + SLACK)


# ----------------------------------------------------------------------------- found: batch-size arithmetic


class Regroups(nn.Module):
    """Reshapes to ``((B - 1) % 3 + 1, -1)``: the batch size B at B = 2 and 3 (the batches the
    graph is traced at), 1 at B = 4, where it puts four examples in one row; the roll that
    follows then moves an entry of one example into another's output."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        y = self.lin(x)
        rows = y.reshape((y.shape[0] - 1) % 3 + 1, -1)
        rolled = torch.cat([rows[:, 1:], rows[:, :1]], 1)
        return rolled.reshape(y.shape[0], -1)


def test_a_size_computed_from_the_batch_size_is_refused():
    model = Regroups().double().eval()
    x = torch.randn(4, 4, dtype=F64)
    moved = x.clone()
    moved[0] += 1.0
    with torch.no_grad():  # only example 0 moved, and example 3's output moved with it
        assert float((model(x)[3] - model(moved)[3]).norm()) > 1e-3
    with pytest.raises(LipschitzBoundError, match="computed from the batch size"):
        traced(model, (4,))
    converted, report = convert(model, input_shape=(4,))
    assert not report.certifiable


@pytest.mark.parametrize("forward", [
    lambda self, x: self.lin(x).split(5, 0)[0],  # every example at B <= 5, the first five at B = 8
    lambda self, x: self.lin(x).chunk(1, -2)[0],
    lambda self, x: self.lin(x).split(x.shape[0], 1)[0],  # B features of each example
    lambda self, x: self.lin(x).view(x.numel() // 4, 4),
], ids=["split(5, 0)", "chunk(1, -2)", "split(B, 1)", "view(numel // 4)"])
def test_splits_along_the_batch_and_sizes_from_the_batch_are_refused(forward):
    """``y.split(5, 0)[0]`` keeps the whole batch at the traced batches (2 and 3) and drops
    examples from 6 on: it was certified (bound 1) though its output has 5 rows at a batch of 8."""
    model = Container(forward).double().eval()
    with pytest.raises(LipschitzBoundError, match="batch"):
        traced(model, (4,))


def test_the_batch_size_read_as_it_is_stays_accepted():
    def forward(self, x):
        y = self.lin(x)
        b, features = x.shape
        y = y.view(x.size(0), features // 2, 2).reshape(x.shape).view(b, -1)
        return torch.reshape(y, (x.shape[0], 2, -1)).flatten(1).split(2, dim=1)[1] * 3.0

    model = Container(forward).double().eval()
    assert 3.0 <= traced(model, (4,)) <= 3.0 * (1 + 1e-5)


class DoublesAtBatchOne(nn.Module):
    """``y = x[:, 1:2].contiguous(); y += y``: a copy at every batch but 1, where ``contiguous()``
    returns the slice itself and the sum doubles what the child then reads (found by
    tests/fuzz_convert.py, seed 526264: certified 1.000001, Jacobian norm 1.72 at batch 1)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(1, 2)

    def forward(self, x):
        v = x[:, 1:2]
        y = v.contiguous()
        y += y
        return self.lin(v)


def test_an_alias_that_only_a_batch_of_one_makes_is_refused():
    model = DoublesAtBatchOne().double().eval()
    x = torch.randn(2, 3, dtype=F64)
    with torch.no_grad():  # the same example, alone or with another: another output
        assert not torch.allclose(model(x[:1].clone()), model(x.clone())[:1])
    with pytest.raises(LipschitzBoundError, match="in-place"):
        traced(model, (3,))


def test_a_squeeze_that_drops_a_batch_of_one_is_refused():
    model = Container(lambda self, x: self.lin(x[:, None].squeeze()))
    with pytest.raises(LipschitzBoundError):
        traced(model.double().eval(), (4,))


# ----------------------------------------------------------------------------- found: Python state


class Gate(nn.Module):
    """Returns its input, and notes in a Python attribute whether it is large."""

    def __init__(self):
        super().__init__()
        self.large = False

    def forward(self, x):
        self.large = bool(x.abs().max() > 50)
        return x


register_lipschitz_bound(Gate, lambda module, shape: 1.0)  # true: it returns its input


class Gated(nn.Module):
    """Scales by 100 where its gate saw a large input: the trace froze ``self.gate.large``."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.gate = Gate()

    def forward(self, x):
        y = self.gate(self.lin(x))
        if self.gate.large:
            y = y * 100.0
        return y


class Counted(nn.Module):
    """Scales by 100 from its 1000th call on (a warm-up schedule kept in forward)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.lin(x) * (100.0 if self.calls > 1000 else 1.0)


def test_a_flag_a_child_sets_from_its_input_is_refused():
    """Certified 1.000001; the Jacobian at an input of norm 400 is 100."""
    torch.manual_seed(0)
    large = 200 * torch.randn(4, dtype=F64)
    assert assert_sound_or_refused(Gated(), (4,), points=[large]) is None


def test_a_call_counter_is_refused():
    """Certified 1.000001; from the 1000th call on the slope is 100."""
    torch.manual_seed(0)
    model = Counted()
    try:
        converted, bound = converted_bound(model, (4,))
    except LipschitzBoundError as error:
        assert "assigns the attribute 'calls'" in error.reason
        return
    converted.calls = 1000
    assert lower_bound(converted, (4,)) <= bound * (1 + SLACK), f"certified {bound}, slope 100 after 1000 calls"


class CountedOnAChild(nn.Module):
    """The same counter, kept on a torch child: ``self.spare.calls``."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.spare = nn.Identity()

    def forward(self, x):
        self.spare.calls = getattr(self.spare, "calls", 0) + 1
        return self.lin(x) * (100.0 if self.spare.calls > 1000 else 1.0)


class SetsAChildsMode(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.drop = nn.Dropout(1e-12)

    def forward(self, x):
        self.drop.train()
        return self.drop(self.lin(x))


def test_state_kept_on_a_torch_child_or_its_mode_is_refused():
    """Certified 1.000001 while the attribute checks spared torch's modules; slope 100 later."""
    for model in (CountedOnAChild().double(), SetsAChildsMode().double()):
        with pytest.raises(LipschitzBoundError, match="assigns the attribute '(calls|training)'"):
            traced(model, (4,))


def test_two_threads_watching_attribute_writes_take_turns():
    """The watch patches nn.Module.__setattr__ process-wide: a second thread patching while the
    first watched was undone by the first's restore (its writes unseen), and its own restore put
    the first's wrapper back for good."""
    original = nn.Module.__setattr__
    first = _AttributeWrites(nn.Linear(2, 2))
    second = _AttributeWrites(nn.Linear(2, 2))
    entered = threading.Event()

    def watch_second():
        with second.watching():
            entered.set()

    with first.watching():
        other = threading.Thread(target=watch_second)
        other.start()
        assert not entered.wait(0.3)  # the second waits for the first
    other.join(5)
    assert entered.is_set() and nn.Module.__setattr__ is original


def test_lipnet_layers_that_note_their_input_size_stay_accepted():
    """A Gram convolution notes its input size in forward, here two sizes in turn."""
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 3, padding=1)

        def forward(self, x):
            return torch.cat([self.conv(x).flatten(1), self.conv(x[:, :, :2, :2]).flatten(1)], 1)

    assert assert_sound_or_refused(Block(), (2, 4, 4)) is not None


# ----------------------------------------------------------------------------- found: the certified logits


class Latch(nn.Module):
    """Returns its input; notes (for good) that it saw a large one: no write on small inputs."""

    def __init__(self):
        super().__init__()
        self.large = False

    def forward(self, x):
        if x.abs().max() > 50:
            self.large = True
        return x


register_lipschitz_bound(Latch, lambda module, shape: 1.0)

#: Python state outside any module, set by a child and read by its parent.
SEEN = {"large": False}


class Notes(nn.Module):
    """Returns its input; notes in a global dictionary whether it was large."""

    def forward(self, x):
        SEEN["large"] = bool(x.abs().max() > 50)
        return x


register_lipschitz_bound(Notes, lambda module, shape: 1.0)


class FlipsAfterLatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.latch = Latch()

    def forward(self, x):
        y = self.latch(x)
        return -y if self.latch.large else y


class FlipsAfterNote(nn.Module):
    def __init__(self):
        super().__init__()
        self.notes = Notes()

    def forward(self, x):
        y = self.notes(x)
        return -y if SEEN["large"] else y


@pytest.mark.parametrize("block", [FlipsAfterLatch, FlipsAfterNote])
def test_logits_certified_through_a_graph_are_the_forwards(block):
    """The certification pass takes a traced container's logits from its graph, which froze the
    flag at False: certified_accuracy reported x = (100, 0, 0, 0) correct and certified at radius 1
    while the model itself (which negates large inputs) predicts the other class there."""
    net = nn.Sequential(block(), nn.Linear(4, 2, bias=False))
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor([[1.0, 0.0, 0.0, 0.0], [-1.0, 0.0, 0.0, 0.0]]))
    net, report = convert(net.double(), input_shape=(4,))
    assert report.certifiable  # the flag is not set by the inputs the bound is checked on
    x, label = torch.tensor([[100.0, 0.0, 0.0, 0.0]], dtype=F64), torch.tensor([0])
    try:
        result = certified_accuracy(net, (x, label), eps=[0.0, 1.0], progress=False)
    except LipschitzBoundError:
        return
    with torch.no_grad():
        predicted = int(net.eval()(x).argmax())
    assert result.certified[1] == 0.0 or predicted == 0, f"certified class 0, the model predicts {predicted}"


# ----------------------------------------------------------------------------- found: factors as applied


class HalfPrecisionScale(nn.Module):
    """A bfloat16 module (its first buffer) scaled by a float32 0-dim buffer: torch casts the
    factor to bfloat16, 1.005 to 1.0078125."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Identity()
        self.register_buffer("unused", torch.zeros(1, dtype=torch.bfloat16))
        self.register_buffer("scale", torch.tensor(1.005))

    def forward(self, x):
        return self.inner(x) * self.scale


class TimesOneTenth(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Identity()

    def forward(self, x):
        return self.inner(x) * 0.1


class AddsOneTenth(TimesOneTenth):
    def forward(self, x):
        return torch.add(torch.zeros(x.shape, dtype=x.dtype), self.inner(x), alpha=0.1)


@pytest.mark.parametrize("module, dtype", [(HalfPrecisionScale, torch.bfloat16), (TimesOneTenth, torch.float32),
                                           (AddsOneTenth, torch.float32)],
                         ids=["bfloat16 x float32 buffer", "float32 x 0.1", "float32 add alpha=0.1"])
def test_a_factor_is_bounded_as_the_product_applies_it(module, dtype):
    """The bound read the factor as given: 1.005 for a bfloat16 model that multiplies by 1.0078125
    (0.28% more), 0.1 for a float32 one that multiplies by float32's 0.1 (0.10000000149), and so
    for torch.add's alpha."""
    model = module().eval()
    with torch.no_grad():
        applied = float(model(torch.ones(1, 4, dtype=dtype))[0, 0])
    assert applied in (1.0078125, float(torch.tensor(0.1)))
    assert traced_lipschitz_bound(model, (4,)) >= applied


# ----------------------------------------------------------------------------- found: underflow in a graph


class Underflows(nn.Module):
    """``lin(bn(x / 64))``: on inputs ``2^-1070`` the traced node ``x / 64`` underflows to 0."""

    def __init__(self, features):
        super().__init__()
        self.bn = nn.BatchNorm1d(features, eps=0.25)
        self.lin = nn.Linear(features, 1, bias=False)

    def forward(self, x):
        return self.lin(self.bn(x / 64))


def test_underflow_in_a_traced_node_is_in_the_rounding_bound():
    """Each ``x_i / 64 = 2^-1076`` rounds to 0 in float64; BatchNorm then scales by ``2^1023``, so the
    exact hidden value is ``sqrt(4096) 2^-53 = 2^-47`` and the float64 one 0, and biases of ``2^-47``
    put the exact decision on class 1 and the float64 one on class 0. The traced rounding bound had no
    underflow term: class 0 was certified (radius 2.2e-321, at eps 0) for an exact prediction of 1."""
    features = 4096
    net = convert(nn.Sequential(Underflows(features), nn.Linear(1, 2)), input_shape=(features,),
                  activation=None).model.double().eval()
    block, head = net
    with torch.no_grad():
        block.bn.running_mean.zero_()
        block.bn.running_var.fill_(0.75)  # (0.75 + eps) ** -0.5 = 1
        block.bn.weight.fill_(2.0 ** 1023)
        block.bn.bias.zero_()
        block.lin.weight.fill_(1.0)  # normalized: 1 / 64 each
        head.weight.copy_(torch.tensor([[-1.0], [1.0]]))  # normalized: +-1 / sqrt(2)
        head.bias.copy_(torch.tensor([0.75 * 2.0 ** -47, 0.0]))
        x = torch.full((1, features), 2.0 ** -1070, dtype=F64)
        assert int(net(x).argmax()) == 0
        hidden = sum(Fraction(w) for w in block.lin.normalized_weight()[0].tolist()) * Fraction(2) ** (1023 - 1076)
        exact = [Fraction(b) + Fraction(w) * hidden
                 for b, w in zip(head.bias.tolist(), head.normalized_weight()[:, 0].tolist())]
    assert exact[1] > exact[0]
    result = certified_accuracy(net, (x, torch.tensor([0])), eps=[0.0], progress=False)
    assert float(result.radii[0]) == 0.0


# ----------------------------------------------------------------------------- found: parametrized containers


class Exp(nn.Module):
    def forward(self, value):
        return value.exp()


class Mixes(nn.Module):
    """A parametrization with a layer in it: it computes a weight, it is not a layer on the data path."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, value):
        return self.lin(value)


class ScaledByParameters(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.scale = nn.Parameter(torch.tensor(2.0))
        self.mix = nn.Parameter(torch.randn(4))

    def forward(self, x):
        return self.lin(x) * self.scale * self.mix


def test_parametrizations_are_neither_converted_nor_diagnosed_as_layers():
    """convert diagnosed the parametrization exp(scale) as a layer called on a batch, and raised
    ValueError ("input_shape must be the shape of one input ..., got ()") for a 0-dim parameter; it
    also swapped the nn.Linear inside a parametrization for a GramLinear, changing the weight."""
    torch.manual_seed(0)
    model = ScaledByParameters().double()
    parametrize.register_parametrization(model, "scale", Exp())
    parametrize.register_parametrization(model, "mix", Mixes().double())
    with torch.no_grad():
        mix = model.mix.clone()
    converted, report = convert(model, input_shape=(4,))
    assert type(converted.lin).__name__ == "GramLinear"
    assert type(converted.parametrizations.mix[0].lin) is nn.Linear
    with torch.no_grad():
        assert torch.equal(converted.mix, mix)
    bound = assert_sound_or_refused(model, (4,))
    assert bound is not None and bound >= float(torch.tensor(2.0).exp()) * float(mix.abs().max()) * 0.99


# ----------------------------------------------------------------------------- unfixed: constants of the graph


class LearnedScale(nn.Module):
    """``x * exp(log_scale)``: a constant the forward computes from a parameter, in the model's dtype."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Identity()
        self.log_scale = nn.Parameter(torch.tensor(0.02734375))  # exp: 1.02772 exactly, 1.03125 in bfloat16

    def forward(self, x):
        return self.inner(x) * self.log_scale.exp()


def test_constants_a_graph_computes_are_certified_in_exact_arithmetic():
    """A bfloat16 model applies ``x * 1.03125`` (``exp`` rounded to bfloat16); the certificate is,
    as for every value a forward computes outside the Gram layers' weights, one of exact arithmetic
    on the stored parameter: ``x * exp(0.02734375) = x * 1.02772...`` (docs/math.md)."""
    from lipnet.certify.precision import float64_copy

    model, _ = convert(LearnedScale().bfloat16().eval(), input_shape=(4,))
    exact = torch.tensor(0.02734375, dtype=F64).exp()
    x = torch.randn(3, 4, dtype=F64)
    assert torch.equal(float64_copy(model)(x), x * exact)  # the function certification evaluates
    assert lipschitz_bound(float64_copy(model), (4,)) >= float(exact)


# ----------------------------------------------------------------------------- already right


# Forwards that use parameters, buffers and Python values directly, and operations lipnet has no
# rule for (refused), or a rule that must hold (certified).
FORWARDS = {
    "x @ w": (lambda s, x: s.lin(x) @ s.w, dict(w=nn.Parameter(10 * torch.randn(4, 4)))),
    "x * parameter": (lambda s, x: s.lin(x) * s.w, dict(w=nn.Parameter(torch.tensor(10.0)))),
    "x + parameter": (lambda s, x: s.lin(x) + s.w, dict(w=nn.Parameter(torch.randn(4)))),
    "x / buffer": (lambda s, x: s.lin(x) / s.w, dict(w=torch.tensor([1.0, 1.0, 1.0, 0.01]))),
    "x * 2": (lambda s, x: s.lin(x) * 2, {}),
    "x * x": (lambda s, x: s.lin(x) * s.lin(x), {}),
    "x / x.norm()": (lambda s, x: s.lin(x) / s.lin(x).norm(), {}),
    "cat([x, x])": (lambda s, x: torch.cat([s.lin(x), s.lin(x)], 1), {}),
    "expand": (lambda s, x: s.lin(x).unsqueeze(1).expand(-1, 3, -1).flatten(1), {}),
    "repeat": (lambda s, x: s.lin(x).repeat(1, 3), {}),
    "stack": (lambda s, x: torch.stack([s.lin(x), s.lin(x)], 1).flatten(1), {}),
    "x[:, [0, 0, 1]]": (lambda s, x: s.lin(x)[:, [0, 0, 1]], {}),
    "x[..., :2]": (lambda s, x: s.lin(x)[..., :2], {}),
    "pad reflect": (lambda s, x: F.pad(s.lin(x).view(-1, 1, 4), (2, 2), mode="reflect").flatten(1), {}),
    "pad value": (lambda s, x: F.pad(s.lin(x), (1, 1), value=3.0), {}),
    "interpolate": (lambda s, x: F.interpolate(s.lin(x).view(-1, 1, 4), scale_factor=2).flatten(1), {}),
    "roll": (lambda s, x: torch.roll(s.lin(x), 1, 1), {}),
    "roll over the batch": (lambda s, x: torch.roll(s.lin(x), 1, 0), {}),
    "sum": (lambda s, x: s.lin(x).sum(1, keepdim=True), {}),
    "mean": (lambda s, x: s.lin(x).mean(1, keepdim=True), {}),
    "max(dim)": (lambda s, x: torch.max(s.lin(x), 1, keepdim=True).values, {}),
    "where": (lambda s, x: torch.where(x > 0, s.lin(x), 3 * s.lin(x)), {}),
    "clamp": (lambda s, x: torch.clamp(s.lin(x) * 5, -1, 1), {}),
    "mul_(3)": (lambda s, x: s.lin(x).mul_(3), {}),
    "abs": (lambda s, x: s.lin(x).abs() * 2, {}),
    "sort": (lambda s, x: torch.sort(s.lin(x), 1).values, {}),
    "normalize": (lambda s, x: F.normalize(s.lin(x)), {}),
    "detach": (lambda s, x: s.lin(x).detach() * 5, {}),
    "x.data": (lambda s, x: s.lin(x).data * 5, {}),
    "rsub alpha": (lambda s, x: torch.rsub(s.lin(x), 1.0, alpha=5), {}),
    "add(alpha=-3)": (lambda s, x: torch.add(s.lin(x), s.lin(x), alpha=-3), {}),
    "add(const, x, alpha=7)": (lambda s, x: torch.add(s.w, s.lin(x), alpha=7), dict(w=torch.ones(4))),
    "add(other=x)": (lambda s, x: torch.add(s.lin(x), other=s.lin(x), alpha=5), {}),
    "sub_(alpha=5)": (lambda s, x: (s.lin(x) * 1.0).sub_(s.lin(x), alpha=5), {}),
    "add_ into a constant then mul_": (lambda s, x: torch.full(x.shape, 2.0, dtype=x.dtype).add_(s.lin(x)).mul_(5), {}),
    "div_ by a buffer": (lambda s, x: (s.lin(x) * 1.0).div_(s.w), dict(w=torch.tensor([1.0, 2.0, 0.01, 4.0]))),
    "x.T": (lambda s, x: s.lin(x).T.T, {}),
    "einsum": (lambda s, x: torch.einsum("bi,ij->bj", s.lin(x), s.w), dict(w=5 * torch.randn(4, 4))),
    "F.linear": (lambda s, x: F.linear(s.lin(x), s.w), dict(w=5 * torch.randn(4, 4))),
    "flip": (lambda s, x: s.lin(x).flip(1), {}),
    "narrow": (lambda s, x: s.lin(x).narrow(1, 0, 2), {}),
    "sigmoid * 4": (lambda s, x: torch.sigmoid(s.lin(x)) * 4, {}),
    "lerp": (lambda s, x: torch.lerp(s.lin(x), x, 5.0), {}),
    "aten.mul": (lambda s, x: torch.ops.aten.mul(s.lin(x), 100), {}),
    "__rmul__": (lambda s, x: s.lin(x).__rmul__(100), {}),
    "half": (lambda s, x: s.lin(x).half().double() * 3, {}),
    "complex factor": (lambda s, x: torch.view_as_real(s.lin(x) * s.w).flatten(1), dict(w=torch.tensor(3 + 4j))),
    "training branch": (lambda s, x: s.lin(x) * (1.0 if s.training else 50.0), {}),
    "Python attribute factor": (lambda s, x: s.lin(x) * s.k, {}),
    "lambda attribute": (lambda s, x: s.g(s.lin(x)), {}),
    "residual x + 3 f(x)": (lambda s, x: x + 3 * s.lin(x), {}),
    "child called twice": (lambda s, x: s.lin(s.lin(x) * 2) - s.lin(x), {}),
}


class Times100(torch.autograd.Function):
    """Forward ``100 x``; its backward tells the truth, so that the Jacobian does too."""

    @staticmethod
    def forward(ctx, x):
        return x * 100

    @staticmethod
    def backward(ctx, grad):
        return grad * 100


FORWARDS["autograd.Function"] = (lambda s, x: Times100.apply(s.lin(x)), {})


@pytest.mark.parametrize("name", FORWARDS)
def test_adversarial_forwards_are_certified_soundly_or_refused(name):
    forward, buffers = FORWARDS[name]
    torch.manual_seed(0)
    model = Container(forward, **buffers)
    model.k = 7.0
    model.g = lambda t: t * 9.0
    assert_sound_or_refused(model, (4,))


def test_the_bounds_are_not_vacuous():
    """The harness catches a bound that is too small: ``x * 10`` against a bound of 10 is tight."""
    model = Container(lambda s, x: s.lin(x) * s.w, w=nn.Parameter(torch.tensor(10.0)))
    converted, bound = converted_bound(model, (4,))
    assert bound == pytest.approx(10.0, rel=1e-5)
    assert lower_bound(converted, (4,)) == pytest.approx(bound, rel=1e-5)


class Shared(nn.Module):
    """One module in two containers, and a residual with a scaled branch."""

    def __init__(self, shared):
        super().__init__()
        self.f = shared

    def forward(self, x):
        return x + 2.0 * self.f(x)


def test_a_module_shared_between_two_containers():
    torch.manual_seed(0)
    shared = nn.Linear(4, 4)
    model = nn.Sequential(Shared(shared), nn.ReLU(), Shared(shared))
    bound = assert_sound_or_refused(model, (4,))
    assert bound is not None and bound >= 9.0 * (1 - 1e-6)  # (1 + 2) ** 2
    converted, _ = convert(model, input_shape=(4,))
    assert converted[0].f is converted[2].f


def conv_net():
    return nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32, 2))


class TimesHundred(nn.Module):
    def forward(self, w):
        return 100 * w


CHANGES_AFTER_CONVERSION = {
    "padding_mode reflect": lambda net: setattr(net[0], "padding_mode", "reflect"),
    "padding_mode circular": lambda net: setattr(net[0], "padding_mode", "circular"),
    "padding_mode replicate": lambda net: setattr(net[0], "padding_mode", "replicate"),
    "dilation 2, padding 2": lambda net: (setattr(net[0], "padding", (2, 2)), setattr(net[0], "dilation", (2, 2))),
    "weight * 100": lambda net: net[0].weight.data.mul_(100),
    "bias 1e6": lambda net: net[3].bias.data.fill_(1e6),
    "parametrization scaling a conv weight": lambda net: parametrize.register_parametrization(
        net[0], "weight", TimesHundred()),
    "parametrization scaling a linear weight": lambda net: parametrize.register_parametrization(
        net[3], "weight", TimesHundred()),
    "spectral_norm": lambda net: torch.nn.utils.parametrizations.spectral_norm(net[3]),
    "weight_norm": lambda net: torch.nn.utils.parametrizations.weight_norm(net[3]),
    "forward hook": lambda net: net[3].register_forward_hook(lambda m, args, out: 100 * out),
}


@pytest.mark.parametrize("name", CHANGES_AFTER_CONVERSION)
def test_changes_to_converted_layers_are_certified_soundly_or_refused(name):
    torch.manual_seed(0)
    converted, _ = convert(conv_net().double().eval(), input_shape=(2, 4, 4))
    CHANGES_AFTER_CONVERSION[name](converted)
    try:
        bound = lipschitz_bound(converted.eval(), (2, 4, 4))
    except LipschitzBoundError:
        return
    assert lower_bound(converted, (2, 4, 4)) <= bound * (1 + SLACK)


LAYERS = {
    "Conv2d padding same, kernel 4": (lambda: nn.Conv2d(2, 3, 4, padding="same"), (2, 5, 5)),
    "Conv2d padding same, dilation 2": (lambda: nn.Conv2d(2, 3, 3, padding="same", dilation=2), (2, 5, 5)),
    "Conv2d stride 2": (lambda: nn.Conv2d(2, 4, 3, stride=2), (2, 7, 7)),
    "Conv2d circular": (lambda: nn.Conv2d(2, 2, 3, padding=1, padding_mode="circular"), (2, 4, 4)),
    "Conv2d reflect": (lambda: nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"), (2, 4, 4)),
    "Conv2d replicate": (lambda: nn.Conv2d(2, 2, 3, padding=2, padding_mode="replicate"), (2, 4, 4)),
    "Conv2d groups": (lambda: nn.Conv2d(4, 4, 3, padding=1, groups=2), (4, 4, 4)),
    "Conv2d asymmetric": (lambda: nn.Conv2d(2, 2, (3, 1), padding=(2, 0), stride=(1, 2)), (2, 4, 4)),
    "Conv1d circular": (lambda: nn.Conv1d(2, 3, 3, padding=1, padding_mode="circular"), (2, 6)),
    "Conv1d reflect stride 2": (lambda: nn.Conv1d(2, 3, 3, padding=2, stride=2, padding_mode="reflect"), (2, 7)),
    "ConvTranspose2d output_padding": (lambda: nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1, output_padding=1),
                                       (2, 4, 4)),
    "ConvTranspose2d dilation groups": (lambda: nn.ConvTranspose2d(4, 4, 3, stride=2, dilation=2, groups=2),
                                        (4, 3, 3)),
    "Linear on (3, 4)": (lambda: nn.Linear(4, 6), (3, 4)),
}


@pytest.mark.parametrize("name", LAYERS)
def test_converted_layers_keep_their_settings_soundly(name):
    torch.manual_seed(0)
    make, shape = LAYERS[name]
    layer = make()
    with torch.no_grad():
        for p in layer.parameters():
            p.mul_(10)
    assert assert_sound_or_refused(nn.Sequential(layer, nn.Flatten()), shape) is not None


@pytest.mark.parametrize("wrap", [
    lambda layer: torch.nn.utils.parametrizations.spectral_norm(layer),
    lambda layer: torch.nn.utils.parametrizations.weight_norm(layer),
    lambda layer: parametrize.register_parametrization(layer, "weight", TimesHundred()),
], ids=["spectral_norm", "weight_norm", "scaling"])
def test_parametrized_layers_are_left_alone_and_not_certified(wrap):
    torch.manual_seed(0)
    net = conv_net()
    wrap(net[3])
    converted, report = convert(net.double(), input_shape=(2, 4, 4))
    assert type(converted[3]).__name__.startswith("Parametrized")
    assert not report.certifiable and any(o.path == "3" and o.blocking for o in report.obstacles)


def test_a_model_that_cannot_be_copied_is_refused_with_a_clear_error():
    """The deprecated torch.nn.utils.weight_norm leaves a non-leaf weight: copy.deepcopy's RuntimeError
    came out of convert as it was."""
    net = conv_net()
    with pytest.warns(FutureWarning):
        torch.nn.utils.weight_norm(net[3])
    with pytest.raises(ValueError, match="cannot be copied.*inplace=True"):
        convert(net, input_shape=(2, 4, 4))
    converted, report = convert(net, input_shape=(2, 4, 4), inplace=True)
    assert not report.certifiable


def test_a_compiled_child_is_refused():
    torch.manual_seed(0)
    net = nn.Sequential(torch.compile(nn.Linear(4, 4), backend="eager"), nn.Linear(4, 2))
    converted, report = convert(net.double(), input_shape=(4,))
    assert not report.certifiable
    with pytest.raises(LipschitzBoundError, match="forward"):
        lipschitz_bound(converted, (4,))
