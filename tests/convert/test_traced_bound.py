"""lipnet.convert: the traced bound never certifies less than what the forward computes.

Each refused pattern below was bounded below its true Lipschitz constant before (a security
audit's repros): writes into buffers (``out=``, in-place methods on them), in-place updates
through a second name for the same tensor (``contiguous()``, ``nn.Identity``, no-op reshapes),
values a child changes in place or replaces, bit reinterpretation by ``view(dtype)``, and
positional ``inplace`` arguments. The last tests are sound patterns that stay accepted.
"""

import importlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lipnet import convert
from lipnet.certify import LipschitzBoundError, certified_accuracy, lipschitz_bound, register_lipschitz_bound
from lipnet.convert import traced_lipschitz_bound
from lipnet.nn import GramConv2d, GramLinear


#: Relative float32 rounding error of a finite-difference slope over distances of about 1e-3.
SLOPE_ROUNDING = 1e-3


def largest_slope(module, shape, pairs=32, scale=1e-3, seed=0):
    """The largest ratio ``|f(a) - f(b)| / |a - b|`` over nearby random pairs (each evaluated on
    fresh copies): a lower bound on the Lipschitz constant of ``module`` up to SLOPE_ROUNDING."""
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(pairs, *shape, generator=generator)
    b = a + scale * torch.randn(pairs, *shape, generator=generator)
    with torch.no_grad():
        ratio = (module(a.clone()) - module(b.clone())).flatten(1).norm(dim=1) / (a - b).flatten(1).norm(dim=1)
    return float(ratio.max())


def assert_sound_or_refused(module, shape):
    """The traced bound either raises or is at least the largest slope the module shows."""
    try:
        bound = traced_lipschitz_bound(module, shape)
    except LipschitzBoundError as error:
        return error
    slope = largest_slope(module, shape)
    assert slope <= bound * (1 + SLOPE_ROUNDING), f"false certificate: traced bound {bound} < observed slope {slope}"
    return None


class Container(nn.Module):
    """A module with children (so that convert traces it) and a forward given per test."""

    def __init__(self, forward, buffer=None):
        super().__init__()
        self.inner = nn.Identity()
        self.other = nn.Identity()
        if buffer is not None:
            self.register_buffer("buf", buffer)
        self._forward = forward

    def forward(self, x):
        return self._forward(self, x)


# ----------------------------------------------------------------------------- F1: writes into buffers

WRITES_INTO_BUFFERS = {
    "tanh out=buf": lambda self, x: (torch.tanh(self.inner(x), out=self.buf),
                                     torch.add(x * 1e-3, self.buf, alpha=1e3))[1],
    "cat out=buf": lambda self, x: torch.add(torch.cat([self.inner(x)], 1, out=self.buf) * 1e-3, self.buf, alpha=1e3),
    "neg out=buf": lambda self, x: torch.add(x * 1e-3, torch.neg(self.inner(x), out=self.buf) * 0 + self.buf,
                                             alpha=-1e3),
    "resize_ zero_ add_": lambda self, x: (self.buf.resize_(x.shape).zero_().add_(self.inner(x)),
                                           torch.add(x * 1e-3, self.buf, alpha=1e3))[1],
}


@pytest.mark.parametrize("name", WRITES_INTO_BUFFERS)
def test_a_forward_that_writes_into_a_buffer_is_refused(name):
    block = Container(WRITES_INTO_BUFFERS[name], buffer=torch.empty(0))
    assert largest_slope(block, (4,)) > 100  # the buffer carries 1000 x past the bound
    with pytest.raises(LipschitzBoundError, match=r"writes into|out=|resize_"):
        traced_lipschitz_bound(block, (4,))


def test_a_refused_write_leaves_the_buffer_alone():
    block = Container(lambda self, x: self.buf.add_(self.inner(x)) * 1.0, buffer=torch.zeros(2, 4))
    with pytest.raises(LipschitzBoundError, match="in-place operation that writes into its parameter or buffer 'buf'"):
        traced_lipschitz_bound(block, (4,))
    assert not block.buf.any()


def test_in_place_writes_into_a_view_of_a_buffer_are_refused():
    # The factor doubles at every call: no bound taken from one call holds for the next.
    block = Container(lambda self, x: (self.buf.view(x.shape[1]).mul_(2.0), x * self.buf)[1], buffer=torch.ones(4))
    with pytest.raises(LipschitzBoundError, match="writes into its parameter or buffer 'buf'"):
        traced_lipschitz_bound(block, (4,))
    assert (block.buf == 1).all()


def test_the_out_keyword_repro_is_not_certified_end_to_end():
    net = nn.Sequential(Container(WRITES_INTO_BUFFERS["tanh out=buf"], buffer=torch.empty(0)), nn.Linear(4, 2))
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor([[1.0, 0, 0, 0], [-1.0, 0, 0, 0]]))
        net[1].bias.zero_()
    converted, report = convert(net, input_shape=(4,))
    assert not report.certifiable
    x, y = torch.tensor([[0.01, 0.0, 0.0, 0.0]]), torch.tensor([0])
    with torch.no_grad():  # at distance 0.02 the class flips: no radius above 0.02 holds
        assert int(converted.eval()(torch.tensor([[-0.01, 0.0, 0.0, 0.0]])).argmax()) == 1
    with pytest.raises(LipschitzBoundError):
        certified_accuracy(converted, (x, y), eps=[0.5], progress=False)


# ----------------------------------------------------------------------------- F2: in-place through an alias

ALIASES = {
    "contiguous() mul_": lambda self, x: (x.contiguous().mul_(100.0), self.inner(x))[1],
    "nn.Identity mul_": lambda self, x: (self.inner(x).mul_(100.0), self.other(x))[1],
    "no-op flatten(1) mul_": lambda self, x: (x.flatten(1).mul_(100.0), self.inner(x))[1],
    "contiguous() div_": lambda self, x: (x.contiguous().div_(0.01), self.inner(x))[1],
    "alias of an intermediate": lambda self, x: (lambda h: (h.contiguous().mul_(100.0), self.inner(h))[1])(x * 1.0),
    "Identity of an intermediate": lambda self, x: (lambda h: (self.inner(h).mul_(100.0), h + 0.0)[1])(x * 1.0),
    "in-place child on an alias": lambda self, x: (lambda h: (nn.functional.relu(self.inner(h), inplace=True),
                                                              h * 1.0)[1])(x - 10.0),
}


@pytest.mark.parametrize("name", ALIASES)
def test_in_place_updates_through_an_alias_are_refused(name):
    block = Container(ALIASES[name])
    error = assert_sound_or_refused(block, (4,))
    assert error is not None and "in-place" in error.reason


def test_the_alias_repro_is_not_certified_end_to_end():
    net = nn.Sequential(Container(ALIASES["contiguous() mul_"]), nn.Linear(4, 2))
    converted, report = convert(net, input_shape=(4,))
    assert not report.certifiable
    with pytest.raises(LipschitzBoundError):
        lipschitz_bound(converted.eval(), (4,))


def test_an_in_place_child_on_an_alias_of_the_input_is_refused():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.same = nn.Identity()
            self.act = nn.ReLU(inplace=True)

        def forward(self, x):
            return self.act(self.same(x))  # writes into the caller's tensor

    with pytest.raises(LipschitzBoundError, match="in-place"):
        traced_lipschitz_bound(Block(), (4,))


class ScalesInPlace(nn.Module):
    """A leaf that multiplies its input by 100 in place and returns it (registered with the true bound 100)."""

    def forward(self, x):
        return x.mul_(100.0)


class Stash(nn.Module):
    """A leaf that keeps a copy of its input in a buffer and returns the input (bound 1)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("saved", torch.zeros(1, 4))

    def forward(self, x):
        self.saved = x * 1.0
        return x


register_lipschitz_bound(ScalesInPlace, lambda module, shape: 100.0)
register_lipschitz_bound(Stash, lambda module, shape: 1.0)


class ScalesThenReads(nn.Module):
    def __init__(self, returns_the_sum):
        super().__init__()
        self.scale = ScalesInPlace()
        self.returns_the_sum = returns_the_sum

    def forward(self, x):
        h = x * 1.0
        y = self.scale(h)  # also scales h
        return y + h if self.returns_the_sum else h  # 200 h, bounded as 100 + 1 / 100 h, bounded as 1


@pytest.mark.parametrize("returns_the_sum", [True, False])
def test_a_value_changed_by_a_child_before_it_is_read_is_refused(returns_the_sum):
    block = ScalesThenReads(returns_the_sum)
    assert largest_slope(block, (4,)) > 99
    with pytest.raises(LipschitzBoundError, match="reads %mul after an in-place operation"):
        traced_lipschitz_bound(block, (4,))


def test_a_child_writing_into_the_input_is_refused():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = ScalesInPlace()

        def forward(self, x):
            return self.scale(x)

    with pytest.raises(LipschitzBoundError, match="writes into the input"):
        traced_lipschitz_bound(Block(), (4,))


def test_an_attribute_a_child_replaces_is_not_a_constant():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.stash = Stash()  # tracing sees its buffer as a constant

        def forward(self, x):
            y = self.stash(x)
            return torch.add(y * 1e-3, self.stash.saved, alpha=1e3)  # the buffer holds x when it is read

    block = Block()
    assert largest_slope(block, (4,)) > 100
    with pytest.raises(LipschitzBoundError, match="replaces while it runs"):
        traced_lipschitz_bound(block, (4,))


# ----------------------------------------------------------------------------- F3: reinterpreting bits

REINTERPRETATIONS = {
    "view(float64)": lambda self, x: torch.relu(self.inner(x).view(torch.float64)).view(torch.float32),
    "view(dtype=float64)": lambda self, x: torch.relu(self.inner(x).view(dtype=torch.float64)).view(torch.float32),
    "view(float16)": lambda self, x: torch.relu(self.inner(x).view(torch.float16)).view(torch.float32),
    "view(float32) of float32": lambda self, x: self.inner(x).view(torch.float32),
}


@pytest.mark.parametrize("name", REINTERPRETATIONS)
def test_view_with_a_dtype_is_refused(name):
    with pytest.raises(LipschitzBoundError, match="dtype"):
        traced_lipschitz_bound(Container(REINTERPRETATIONS[name]), (4,))


def test_the_reinterpretation_repro_is_not_certified_end_to_end():
    net = nn.Sequential(Container(REINTERPRETATIONS["view(float64)"]), GramLinear(4, 2))
    converted, report = convert(net, input_shape=(4,))
    assert not report.certifiable
    x, nearby = torch.tensor([[-5.0, -1e-30, 0.0, 0.0]]), torch.tensor([[-5.0, 1e-30, 0.0, 0.0]])
    with torch.no_grad():  # a perturbation of 2e-30 moves the output by about |x| = 5
        assert float((converted.eval()(x) - converted(nearby)).norm()) > 1
    with pytest.raises(LipschitzBoundError, match="dtype"):
        lipschitz_bound(converted, (4,))


# ----------------------------------------------------------------------------- F9: positional inplace

@pytest.mark.parametrize("forward", [
    lambda self, x: F.relu(self.inner(x), True),
    lambda self, x: F.hardtanh(self.inner(x), -1.0, 1.0, True),
    lambda self, x: (lambda y: F.relu(y, True) + y)(x * 2.0),
    lambda self, x: (lambda y: F.hardtanh(y, -1.0, 1.0, True) - y)(x * 2.0),
    lambda self, x: (lambda y: F.dropout(y, 0.5, False, True) + y)(x * 2.0),
])
def test_in_place_functionals_on_the_input_or_on_shared_values_are_refused(forward):
    # torch.functional passes ``inplace`` on to torch.fx by keyword, however it was given.
    with pytest.raises(LipschitzBoundError, match="in-place"):
        traced_lipschitz_bound(Container(forward), (4,))


def test_positional_inplace_in_a_graph_is_checked_like_the_keyword(monkeypatch):
    """torch.fx passes F.hardtanh's ``inplace`` by keyword; a graph built otherwise gives it by position."""
    module = importlib.import_module("lipnet.convert.traced_bound")  # where _traced_bound looks _trace up

    def forward(self, x):
        y = x * 2.0
        return F.hardtanh(y, -1.0, 1.0, True) + y  # 2 hardtanh(2x): slope 4, bounded as 1 * 2 + 2 if not in place

    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    y = graph.call_function(torch.mul, (x, 2.0))
    clipped = graph.call_function(F.hardtanh, (y, -1.0, 1.0, True))
    graph.output(graph.call_function(torch.add, (clipped, y)))
    monkeypatch.setattr(module, "_trace", lambda module: torch.fx.GraphModule(module, graph))
    block = Container(forward)
    with pytest.raises(LipschitzBoundError, match="in-place operation on a value that is also used elsewhere"):
        traced_lipschitz_bound(block, (4,))


# ----------------------------------------------------------------------------- still accepted

class TorchvisionBlock(nn.Module):
    """torchvision's BasicBlock with BatchNorm removed: in-place ReLU and ``out += identity``."""

    def __init__(self, channels):
        super().__init__()
        self.conv1 = GramConv2d(channels, channels, 3, padding=1)
        self.bn1 = nn.Identity()  # returns its input object: the ReLU then writes into conv1's output
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = GramConv2d(channels, channels, 3, padding=1)
        self.bn2 = nn.Identity()

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


def test_torchvision_style_in_place_updates_are_still_bounded():
    block = TorchvisionBlock(3)
    shape = (3, 5, 5)
    branch = block.conv1.lipschitz_bound((5, 5)) * block.conv2.lipschitz_bound((5, 5))
    bound = traced_lipschitz_bound(block, shape)
    assert 1 + branch <= bound <= (1 + branch) * (1 + 1e-12)
    assert largest_slope(block, shape) <= bound * (1 + SLOPE_ROUNDING)


class Rearranges(nn.Module):
    """Reshapes given sizes only, constants built in place, a buffer read as a factor."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Identity()
        self.register_buffer("scale", torch.tensor(3.0))

    def forward(self, x):
        y = self.inner(x).reshape(x.shape[0], 2, -1).transpose(1, 2).contiguous()
        y = y.view(y.size(0), -1).flatten(1).clone(memory_format=torch.contiguous_format)
        mask = torch.full(y.shape, 2.0)
        mask.sub_(0.5)  # a constant written in place before it is read
        out = (y * mask * self.scale).relu_()  # in place on a fresh value
        return F.relu(out, inplace=True) - 1.0


def test_rearrangements_with_sizes_and_in_place_on_fresh_values_are_still_bounded():
    module = Rearranges()
    bound = traced_lipschitz_bound(module, (4,))
    assert 4.5 <= bound <= 4.5 * (1 + 1e-12)
    assert largest_slope(module, (4,)) <= bound * (1 + SLOPE_ROUNDING)
    assert float(module.scale) == 3.0



# ----------------------------------------------------------------------------- the module computes its graph


def wiggle(x):
    """A term of Lipschitz constant 1 below the graph check's tolerance (|term| <= 1e-7)."""
    return 1e-7 * torch.sin(1e7 * x)


def test_a_forward_hook_is_refused():
    """A hook changes the output outside the graph; a change below the check's tolerance
    doubled the slope of a module bounded as 1."""
    module = Container(lambda self, x: x * 1.0).double()
    module.register_forward_hook(lambda m, args, out: out + wiggle(args[0]))
    with pytest.raises(LipschitzBoundError, match="hook"):
        traced_lipschitz_bound(module, (4,))


def test_a_forward_pre_hook_is_refused():
    module = Container(lambda self, x: x * 1.0).double()
    module.register_forward_pre_hook(lambda m, args: (args[0] + wiggle(args[0]),))
    with pytest.raises(LipschitzBoundError, match="hook"):
        traced_lipschitz_bound(module, (4,))


def test_a_forward_assigned_to_the_instance_is_refused():
    """torch.fx traces the class's forward; the module runs the instance's."""
    module = Container(lambda self, x: x * 1.0).double()
    module.forward = lambda x: x + wiggle(x)
    with pytest.raises(LipschitzBoundError, match="forward"):
        traced_lipschitz_bound(module, (4,))


# ----------------------------------------------------------------------------- constants built from the batch


def batch_slope(module, shape, batch=10):
    """The slope of the last example of a batch of ``batch``: perturbing it alone."""
    x = torch.randn(batch, *shape, dtype=torch.float64)
    step = torch.zeros_like(x)
    step[-1] = 1e-3
    with torch.no_grad():
        return float((module(x + step) - module(x))[-1].norm() / step[-1].norm())


BATCH_POSITION_FACTORS = {
    # the factor of example i is i + 1: 3 at the tracing batch of 3, 10 at a batch of 10
    "cumsum": lambda self, x: x * torch.ones(x.shape, dtype=x.dtype).cumsum(0),
    # 1 for the first three examples (both tracing batches), 101 from the fourth on
    "threshold": lambda self, x: x * (1 + 100 * (torch.ones(x.shape, dtype=x.dtype).cumsum(0) > 3)),
    # the batch size read back from a tensor of the batch's shape
    "sum over the batch": lambda self, x: x * torch.zeros(x.shape, dtype=x.dtype).add(1).sum(0),
    # written in place: the batch size into a constant, a factor into the fourth example on
    "mul_ by the batch size": lambda self, x: (lambda c: (c.mul_(x.shape[0]), x * c)[1])(torch.ones(4, dtype=x.dtype)),
    "mul_ through a view": lambda self, x: (lambda c: (c[3:].mul_(100), x * c)[1])(torch.ones(x.shape, dtype=x.dtype)),
    "mul_ by a cumsum": lambda self, x: (lambda c: (c.mul_(torch.ones(x.shape, dtype=x.dtype).cumsum(0)), x * c)[1])(
        torch.ones(x.shape, dtype=x.dtype)),
}


@pytest.mark.parametrize("name", BATCH_POSITION_FACTORS)
def test_a_factor_that_depends_on_the_position_in_the_batch_is_refused(name):
    module = Container(BATCH_POSITION_FACTORS[name]).double()
    try:
        bound = traced_lipschitz_bound(module, (4,))
    except LipschitzBoundError:
        return
    slope = batch_slope(module, (4,))
    assert slope <= bound * (1 + 1e-9), f"false certificate: traced bound {bound} < slope {slope} at a batch of 10"


def test_factors_of_the_batch_shape_built_elementwise_stay_accepted():
    module = Container(lambda self, x: x * (torch.full(x.shape, 2.0, dtype=x.dtype) * 3 - 1)).double()
    assert traced_lipschitz_bound(module, (4,)) == 5.0
    assert batch_slope(module, (4,)) <= 5.0 * (1 + 1e-9)



# ----------------------------------------------------------------------------- refused cleanly, not crashing


def test_a_boolean_mask_is_a_factor_of_one():
    """``x * mask`` with a boolean buffer raised NotImplementedError ("abs_cpu" not implemented for 'Bool')."""
    module = Container(lambda self, x: x * self.buf, buffer=torch.tensor([True, False, True, True])).double()
    assert traced_lipschitz_bound(module, (4,)) == 1.0
    assert largest_slope(module, (4,)) <= 1 + SLOPE_ROUNDING


SEQUENCE_OPERATIONS = {
    # tuple concatenation and repetition are operator.add / operator.mul on the chunks
    "tuple + tuple": lambda self, x: (lambda t: torch.cat([t[0], t[2]], 1))(x.chunk(2, 1) + x.chunk(2, 1)),
    "tuple * 2": lambda self, x: (lambda t: torch.cat([t[0], t[2]], 1))(x.chunk(2, 1) * 2),
    "child given a tuple": lambda self, x: self.inner(x.chunk(2, 1))[0],
}


@pytest.mark.parametrize("name", SEQUENCE_OPERATIONS)
def test_operations_on_sequences_are_refused_with_a_lipschitz_bound_error(name):
    """They raised AttributeError ('tuple' object has no attribute 'shape'), which convert does not catch."""
    module = Container(SEQUENCE_OPERATIONS[name]).double()
    with pytest.raises(LipschitzBoundError):
        traced_lipschitz_bound(module, (4,))
    _, report = convert(module, input_shape=(4,))
    assert report.lipschitz_bound is None and report.bound_error


# ----------------------------------------------------------------------------- arguments with defaults


class Scaled(nn.Module):
    """``forward(x, scale=3.0)``: the extra argument takes its default."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Identity()

    def forward(self, x, scale=3.0):
        return self.inner(x) * scale


class Optional(nn.Module):
    """``forward(x, y=None)``: y defaults to x, so the output is x + 2 x."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Identity()

    def forward(self, x, y=None):
        if y is None:
            y = x
        return self.inner(x) + 2 * y


class Copies(nn.Module):
    """``forward(x, *, copies=4)``: ``torch.cat([x] * copies)``, bound sqrt(4)."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Identity()

    def forward(self, x, *, copies=4):
        return torch.cat([self.inner(x)] * copies, 1)


class TensorDefault(Scaled):
    def forward(self, x, scale=torch.tensor(5.0, dtype=torch.float64)):
        return self.inner(x) * scale


@pytest.mark.parametrize("module, bound", [(Scaled, 3.0), (Optional, 3.0), (Copies, 2.0)],
                         ids=["scale=3.0", "y=None", "copies=4"])
def test_extra_arguments_take_their_defaults(module, bound):
    """torch.fx guards each default (scale == 3.0, y is None) with a node reading its placeholder,
    which was bounded as a second input: every such module was refused."""
    module = module().double()
    assert bound <= traced_lipschitz_bound(module, (4,)) <= bound * (1 + 1e-12)
    assert largest_slope(module.float(), (4,)) <= bound * (1 + SLOPE_ROUNDING)


def test_a_tensor_default_is_refused_cleanly():
    """torch.fx cannot compile a graph whose placeholder defaults to a tensor: that raised NameError."""
    with pytest.raises(LipschitzBoundError, match="torch.fx"):
        traced_lipschitz_bound(TensorDefault().double(), (4,))


def test_tracing_leaves_no_attributes_on_the_module():
    """torch.fx stores the tensors a forward creates as attributes of the traced module: every
    bound added one (_tensor_constant0, 1, 2, ...: a leak that grew with each certified batch)."""
    module = Container(lambda self, x: x * torch.tensor([1.0, 2.0, 3.0, 4.0])).double()
    before = set(vars(module))
    for _ in range(3):
        assert traced_lipschitz_bound(module, (4,)) == 4.0
    assert set(vars(module)) == before


# ----------------------------------------------------------------------------- factors of every dtype


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32, torch.int64])
def test_the_most_negative_integer_factor_counts_in_full(dtype):
    """``abs`` of the most negative integer overflows to itself (int8: abs(-128) == -128), so the
    factor [-128, 0, 1, 1] was bounded as 1 (slope 128), and a quotient by [-128, -128] got a
    negative bound."""
    low = torch.iinfo(dtype).min
    module = Container(lambda self, x: x * self.buf, buffer=torch.tensor([low, 0, 1, 1], dtype=dtype)).double()
    assert traced_lipschitz_bound(module, (4,)) >= -float(low)
    quotient = Container(lambda self, x: x / self.buf, buffer=torch.tensor([low, low], dtype=dtype)).double()
    assert traced_lipschitz_bound(quotient, (2,)) >= 1 / -float(low)


# Functional sorting activations -------------------------------------------------------------------------------------

from lipnet.nn.activations import group_sort, max_min  # noqa: E402


class FunctionalSorts(nn.Module):
    """A hand-written block calling lipnet's functional activations on a channel dimension."""

    def __init__(self, dim: int = 1, scale: float = 3.0):
        super().__init__()
        self.conv = GramConv2d(2, 4, 3, padding=1)
        self.dim, self.scale = dim, scale

    def forward(self, x):
        return group_sort(max_min(self.conv(x), dim=self.dim), 2) * self.scale


register_lipschitz_bound(FunctionalSorts, traced_lipschitz_bound)  # as convert registers a traced container


def test_functional_max_min_and_group_sort_are_bounded_as_permutations():
    """Each is a permutation of the entries along a channel dimension: Lipschitz constant 1, so the
    block's bound is its convolution's times its scale (traced as leaves: tracing into them fails)."""
    torch.manual_seed(0)
    block = FunctionalSorts()
    assert traced_lipschitz_bound(block, (2, 5, 5)) == pytest.approx(3 * lipschitz_bound(block.conv, (2, 5, 5)),
                                                                        rel=1e-12)
    assert lipschitz_bound(nn.Sequential(block), (2, 5, 5)) == traced_lipschitz_bound(block, (2, 5, 5))


class SortsAsAttributes(FunctionalSorts):
    """The same block calling the sorts through the packages that export them."""

    def forward(self, x):
        import lipnet.nn.activations

        return lipnet.nn.group_sort(lipnet.nn.activations.max_min(self.conv(x), dim=self.dim), 2) * self.scale


register_lipschitz_bound(SortsAsAttributes, traced_lipschitz_bound)


def test_functional_sorts_called_as_attributes_of_their_packages_are_bounded_as_permutations():
    """``lipnet.nn.max_min(x)`` is the same function as an imported ``max_min``: torch.fx must see it as
    the same leaf (tracing into it fails on its shape checks)."""
    torch.manual_seed(0)
    block = SortsAsAttributes()
    assert traced_lipschitz_bound(block, (2, 5, 5)) == pytest.approx(3 * lipschitz_bound(block.conv, (2, 5, 5)),
                                                                        rel=1e-12)
    with pytest.raises(LipschitzBoundError, match="sort along the batch dimension"):
        traced_lipschitz_bound(SortsAsAttributes(dim=0), (2, 5, 5))
    import lipnet.nn.activations

    assert lipnet.nn.max_min is max_min and lipnet.nn.activations.group_sort is group_sort  # unpatched after tracing


@pytest.mark.parametrize("dim", [0, -4])
def test_a_functional_sort_along_the_batch_dimension_is_refused(dim):
    with pytest.raises(LipschitzBoundError, match="sort along the batch dimension"):
        traced_lipschitz_bound(FunctionalSorts(dim=dim), (2, 5, 5))


def test_a_network_with_functional_sorts_is_certified_as_with_the_modules():
    """certified_accuracy's float64 pass propagates the rounding through the functional sorts
    (exact: a permutation), so its radii are those of the same network built from the modules."""
    from lipnet.nn import GroupSort, MaxMin

    torch.manual_seed(1)
    block = FunctionalSorts(scale=1.0)
    functional = nn.Sequential(block, nn.Flatten(), GramLinear(100, 3))
    modules = nn.Sequential(block.conv, MaxMin(), GroupSort(2), nn.Flatten(), functional[2])
    x, y = torch.rand(16, 2, 5, 5), torch.randint(0, 3, (16,))
    with torch.no_grad():
        torch.testing.assert_close(functional(x), modules(x), rtol=0, atol=0)
    radii = certified_accuracy(functional, (x, y), eps=[0.01], progress=False).radii
    expected = certified_accuracy(modules, (x, y), eps=[0.01], progress=False).radii
    assert (expected > 0).sum() >= 4
    torch.testing.assert_close(radii, expected, rtol=1e-9, atol=0)


class AliasedAtBatchOne(nn.Module):
    """A forward torch runs on batches of 2 and more but refuses on a batch of 1: there the reshape
    is a view of the split, and the in-place add reads memory it writes (found by fuzz_convert)."""

    def __init__(self):
        super().__init__()
        self.act = nn.ReLU()  # a child: convert diagnoses a container by tracing its forward

    def forward(self, x):
        part = x.split(2, dim=1)[1]
        part += part.flatten(1).view(-1, 2, 3, 3)
        return part + self.act(x[:, :2])


def test_a_forward_that_raises_on_one_batch_size_is_refused_with_that_size():
    module = AliasedAtBatchOne()
    module(torch.randn(2, 4, 3, 3))  # runs
    with pytest.raises(RuntimeError):
        module(torch.randn(1, 4, 3, 3))
    with pytest.raises(LipschitzBoundError, match="raises on a batch of 1 .*RuntimeError"):
        traced_lipschitz_bound(module, (4, 3, 3))
    _, report = convert(module, input_shape=(4, 3, 3))
    assert "raises on a batch of 1" in str(report)


def test_an_input_shape_of_floats_is_refused_not_truncated():
    # (3, 8.7) was bounded as (3, 8): lipschitz_bound, export, convert and this share one check.
    with pytest.raises(ValueError, match=r"input_shape must be .*got \(3, 8.7\)"):
        traced_lipschitz_bound(nn.ReLU(), (3, 8.7))
