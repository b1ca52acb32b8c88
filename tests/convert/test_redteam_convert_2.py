"""Second soundness red team of lipnet.convert's traced bounds: xfail tests are false bounds or false
certificates (bugs), the others attacks that held and that no other test covers."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lipnet
from lipnet.certify import LipschitzBoundError, certified_accuracy
from lipnet.convert import traced_lipschitz_bound


def _next_call_slope(module, n, h=1e-3):
    """The difference quotient of ``module`` at 0 along the first coordinate, from one call on a
    batch of two points (both computed with the same state of the module)."""
    x = torch.zeros(2, n)
    x[1, 0] = h
    with torch.no_grad():
        y = module(x)
    return float((y[1] - y[0]).norm()) / h


# ------------------------------------------------------------------------------------------- bugs


class GrowingAttribute(nn.Module):
    """A scale kept as a plain tensor attribute and doubled in place by every call. torch.fx reads
    ``self.s`` as a constant (get_attr) but runs ``self.s.mul_(2)`` on the real tensor while it
    traces, so the graph holds no write; the check of the graph against the forward still agrees
    (both read ``s`` before the forward doubles it)."""

    def __init__(self):
        super().__init__()
        self.act = nn.Tanh()
        self.s = torch.tensor(1.0)

    def forward(self, x):
        y = self.act(x) * self.s
        self.s.mul_(2)
        return y


class GrowingBuffer(nn.Module):
    """The same with a registered buffer: torch.fx proxies parameters, not buffers, so an operation
    on the buffer alone (``self.s.mul_(2)``, no proxy among its arguments) runs while it traces and is
    not recorded."""

    def __init__(self):
        super().__init__()
        self.act = nn.Tanh()
        self.register_buffer("s", torch.tensor(1.0))

    def forward(self, x):
        y = self.act(x) * self.s
        self.s.mul_(2)
        return y


_GLOBAL_SCALE = torch.tensor(1.0)


class GrowingGlobal(nn.Module):
    """The same with a global tensor (torch.fx keeps it as a constant attribute of the graph)."""

    def __init__(self):
        super().__init__()
        self.act = nn.Tanh()
        _GLOBAL_SCALE.fill_(1.0)

    def forward(self, x):
        y = self.act(x) * _GLOBAL_SCALE
        _GLOBAL_SCALE.mul_(2)
        return y


@pytest.mark.parametrize("kind", [GrowingAttribute, GrowingBuffer, GrowingGlobal])
def test_state_written_in_place_outside_the_graph_is_refused(kind):
    module = kind()
    try:
        bound = traced_lipschitz_bound(module, (2,))
    except LipschitzBoundError:
        return
    # bound 4 (s at the batch-3 run), while the next call applies s = 16
    assert _next_call_slope(module, 2) <= bound


def test_a_certificate_of_a_forward_writing_its_attribute_in_place_has_no_counterexample(registry):
    model, report = lipnet.convert(nn.Sequential(GrowingAttribute()), input_shape=(2,))
    x, y = torch.tensor([[0.3, 0.0]]), torch.tensor([0])
    try:
        radius = float(certified_accuracy(model, (x, y), eps=[0.0], progress=False, last_layer="none").radii[0])
    except LipschitzBoundError:
        return
    # tanh is increasing and s > 0: class 0 wins exactly where x0 > x1, so the true radius is
    # 0.3 / sqrt(2) = 0.212 whatever s is; the certificate says about 3.3.
    step = 0.3 / math.sqrt(2) + 1e-3
    adversarial = x + step * torch.tensor([[-1.0, 1.0]]) / math.sqrt(2)
    with torch.no_grad():
        flipped = int(model(adversarial).argmax(1)) != 0
    assert not (flipped and step < radius)


class FourthOnNumpy(nn.Module):
    """A factor of the input's shape, ones for the first three examples of a batch and 100 from the
    fourth on: written through a numpy view of the constant, a write that the graph's checks (in
    place writes, constants that depend on the position in the batch) do not see, since its first
    argument is not a tensor. The batches traced (1 to 3) never reach the fourth example."""

    def __init__(self):
        super().__init__()
        self.act = nn.Tanh()

    def forward(self, x):
        c = torch.ones(x.shape)
        c.numpy()[3:].fill(100.0)
        return self.act(x) * c


class FourthOnStorage(nn.Module):
    """The same through the constant's untyped storage: the bytes from the fourth example on (two
    float32 entries each) are set to 0x42, which makes those entries 48.56."""

    def __init__(self):
        super().__init__()
        self.act = nn.Tanh()

    def forward(self, x):
        c = torch.ones(x.shape)
        c.untyped_storage()[24:].fill_(0x42)
        return self.act(x) * c


class BufferScaledThroughNumpy(nn.Module):
    """A buffer doubled in the graph itself, through a numpy view: no version counter moves, so the
    check of writes into parameters and buffers does not see it."""

    def __init__(self):
        super().__init__()
        self.act = nn.Tanh()
        self.register_buffer("s", torch.ones(1))

    def forward(self, x):
        y = self.act(x) * self.s
        self.s.numpy().__imul__(2)
        return y


class FourthOnForeach(nn.Module):
    """The same through ``torch._foreach_mul_``, whose first argument is a list of tensors."""

    def __init__(self):
        super().__init__()
        self.act = nn.Tanh()

    def forward(self, x):
        c = torch.ones(x.shape)
        torch._foreach_mul_([c[3:]], 100.0)
        return self.act(x) * c


class FourthOnAtenOverload(nn.Module):
    """The same through an aten overload: ``torch.ops.aten.mul_.Scalar.__name__`` is
    ``'mul_.Scalar'``, which does not end in ``_``, so the write is not recognized as one."""

    def __init__(self):
        super().__init__()
        self.act = nn.Tanh()

    def forward(self, x):
        c = torch.ones(x.shape)
        torch.ops.aten.mul_.Scalar(c[3:], 100.0)
        return self.act(x) * c


def _slope_of_the_fourth_example(module, h=1e-3):
    x = torch.zeros(4, 2)
    moved = x.clone()
    moved[3, 0] = h
    with torch.no_grad():
        return float((module(moved)[3] - module(x)[3]).norm()) / h


@pytest.mark.parametrize("kind", [FourthOnNumpy, FourthOnStorage, FourthOnForeach, FourthOnAtenOverload])
def test_a_constant_written_through_a_numpy_or_storage_view_is_refused(kind):
    module = kind()
    try:
        bound = traced_lipschitz_bound(module, (2,))
    except LipschitzBoundError:
        return
    # bound 1; the fourth example of a batch is scaled by 100 (48.56)
    assert _slope_of_the_fourth_example(module) <= bound


def test_a_buffer_written_through_numpy_in_the_graph_is_refused():
    module = BufferScaledThroughNumpy()
    try:
        bound = traced_lipschitz_bound(module, (2,))
    except LipschitzBoundError:
        return
    # bound 4, next call 16
    assert _next_call_slope(module, 2) <= bound


def test_a_certificate_of_the_fourth_example_has_no_counterexample(registry):
    model, report = lipnet.convert(nn.Sequential(FourthOnNumpy()), input_shape=(2,))
    x, y = torch.tensor([[0.3, 0.0]]).repeat(4, 1), torch.zeros(4, dtype=torch.long)
    try:
        radius = float(certified_accuracy(model, (x, y), eps=[0.0], progress=False, last_layer="none").radii[3])
    except LipschitzBoundError:
        return
    # class 0 wins exactly where tanh(x0) > tanh(x1) whatever the positive factor: the true radius is
    # 0.3 / sqrt(2) = 0.212; the fourth example is certified at about 20.6
    step = 0.3 / math.sqrt(2) + 1e-3
    adversarial = x.clone()
    adversarial[3] += step * torch.tensor([-1.0, 1.0]) / math.sqrt(2)
    with torch.no_grad():
        flipped = int(model(adversarial)[3].argmax()) != 0
    assert not (flipped and step < radius)


class GradModeBranch(nn.Module):
    """A branch on the grad mode: certification traces and checks the forward under
    ``torch.no_grad()`` only, so the branch that a plain call (gradients on) takes is never seen."""

    def __init__(self):
        super().__init__()
        self.ident = nn.Identity()
        self.relu = nn.ReLU()

    def forward(self, x):
        y = self.ident(x)
        if torch.is_grad_enabled():
            y = y + 100 * self.relu(x - 10).flip(1)
        return y


def test_a_certificate_holds_for_the_model_called_with_gradients_on(registry):
    model, _ = lipnet.convert(nn.Sequential(GradModeBranch()), input_shape=(2,), activation=None)
    x, y = torch.tensor([[0.0, 9.9]]), torch.tensor([1])
    try:
        radius = float(certified_accuracy(model, (x, y), eps=[0.0], progress=False, last_layer="none").radii[0])
    except LipschitzBoundError:
        return
    adversarial = torch.tensor([[0.0, 10.2]])  # 0.3 away; the radius certified is 7.0
    flipped = int(model(adversarial).argmax(1)) != 1  # a plain call: logits (20, 10.2)
    assert not (flipped and float((adversarial - x).norm()) < radius)


# ------------------------------------------------------------------------------ attacks that held


class Wrapped(nn.Module):
    def __init__(self, child):
        super().__init__()
        self.child = child

    def forward(self, x):
        return self.child(x)


@pytest.mark.parametrize("child, shape", [
    (nn.ZeroPad2d((0, 0, 1, -1)), (2,)),  # on (N, L): shifts the examples down by one, same shape
    (nn.ConstantPad2d((0, 0, 1, -1), 3.0), (2,)),
    (lipnet.nn.MaxMin(dim=-2), (4,)),  # pairs example i with example i + N/2
    (lipnet.nn.GroupSort(2, dim=-2), (4,)),
    (nn.PixelShuffle(1), (1, 2)),
    (nn.ChannelShuffle(2), (4,)),
], ids=["zeropad-shift", "constpad-shift", "maxmin-batch", "groupsort-batch", "pixelshuffle", "channelshuffle"])
def test_a_child_that_would_act_along_the_batch_at_the_same_shape_is_refused(child, shape):
    with pytest.raises((LipschitzBoundError, ValueError, RuntimeError)):
        traced_lipschitz_bound(Wrapped(child).eval(), shape)


class FourthThroughData(nn.Module):
    def __init__(self):
        super().__init__()
        self.act = nn.Tanh()

    def forward(self, x):
        c = torch.ones(x.shape)
        c.data[3:].mul_(100.0)  # through a tensor alias: seen
        return self.act(x) * c


class CounterInAList(nn.Module):
    def __init__(self):
        super().__init__()
        self.act = nn.Tanh()
        self.calls = [1.0]

    def forward(self, x):
        self.calls[0] *= 2  # not an attribute assignment; the graph freezes the float
        return self.act(x) * self.calls[0]


class FxTracingBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.act = nn.Tanh()

    def forward(self, x):
        y = self.act(x)
        return y if torch.fx._symbolic_trace.is_fx_tracing() else 3 * y


@pytest.mark.parametrize("kind", [FourthThroughData, CounterInAList, FxTracingBranch])
def test_state_and_branches_that_the_checks_see_are_refused(kind):
    with pytest.raises(LipschitzBoundError, match="factor computed from the shape|does not reproduce|another graph"):
        traced_lipschitz_bound(kind(), (2,))


class Hardtanhs(nn.Module):
    """hardtanh with bounds given in any order or equal, relu on a negated copy, dropout off by
    position: all 1-Lipschitz, so the bound is the sum of the four branches."""

    def __init__(self):
        super().__init__()
        self.act = nn.Identity()

    def forward(self, x):
        y = self.act(x)
        return F.hardtanh(y, -0.5, 2.0) + F.hardtanh(y, 1.0, 1.0) + torch.relu(-y) + F.dropout(y, 0.5, False)


def test_odd_hardtanh_bounds_and_positional_dropout_are_bounded_soundly():
    module = Hardtanhs()
    bound = traced_lipschitz_bound(module, (3,))
    assert bound == 4.0  # the constant hardtanh(y, 1, 1) counts as 1-Lipschitz
    x = torch.randn(64, 3, dtype=torch.float64)
    jacobians = torch.func.vmap(torch.func.jacrev(lambda v: module(v[None])[0]))(x)
    assert float(torch.linalg.matrix_norm(jacobians, 2).max()) <= bound


class Forwarded(nn.Module):
    def __init__(self, forward):
        super().__init__()
        self.act = nn.Tanh()
        self._forward = forward

    def forward(self, x):
        return self._forward(self, x)


@pytest.mark.parametrize("forward", [
    lambda self, x: torch.ops.aten.mul.Tensor(self.act(x), 3.0),  # an overload: no rule, even for a scaling
    lambda self, x: (lambda y: (torch.ops.aten.mul_.Scalar(y, 100.0), y)[1])(self.act(x)),
    lambda self, x: (lambda y: (torch._foreach_mul_([y], 100.0), y)[1])(self.act(x)),
    lambda self, x: self.act(x) * torch.ones(x.shape).cumsum(1)[:, :1],
    lambda self, x: self.act(x) * (1 + torch.ones(x.shape).numpy().sum()),
], ids=["aten-overload", "aten-in-place-on-input-dependent", "foreach-on-input-dependent", "cumsum-of-batch-constant",
        "numpy-of-batch-constant"])
def test_writes_and_numbers_the_rules_see_are_refused(forward):
    with pytest.raises(LipschitzBoundError,
                       match=r"no Lipschitz rule|factor computed from the shape|in-place operation|takes \.numpy\(\)"):
        traced_lipschitz_bound(Forwarded(forward), (2,))
