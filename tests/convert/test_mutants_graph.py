"""Mutation-testing gaps of lipnet.convert.graph and lipnet.convert.attribute_writes as convert
uses them: forwards whose graph cannot be taken (their input is not one positional tensor) are
blocking obstacles that say why; a size read off the input is not a branch of a residual sum; and
the attribute writes of a forward (deletions included, and lipnet's own note only for lipnet's
convolutions) are refused, naming the first one."""

import pytest
from torch import nn

from lipnet import convert
from lipnet.certify import LipschitzBoundError
from lipnet.convert import traced_lipschitz_bound
from lipnet.nn import GramLinear


#: convert registers traced bounds process-wide: each test restores the registry (tests/convert/conftest.py).
pytestmark = pytest.mark.usefixtures("registry")


class VarArgs(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, *inputs):
        return self.linear(inputs[0])


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x, mask):
        return self.linear(x) * mask


@pytest.mark.parametrize("make, reason", [
    (VarArgs, "forward must take the input tensor as its first argument"),
    (TwoInputs, "forward takes a second required argument 'mask': only one input is supported"),
])
def test_a_forward_without_one_positional_input_is_a_blocking_obstacle(make, reason):
    """The graph of a forward is taken with its first positional argument as the input and the
    others at their defaults: ``forward(*inputs)`` or a second required argument is refused, and
    the report says which."""
    _, report = convert(nn.Sequential(make()))
    (found,) = report.obstacles
    assert found.path == "0" and found.blocking
    assert f"its forward cannot be traced by torch.fx (TypeError: {reason})" in found.problem


class PlusSize(nn.Module):
    """``linear(x) + n`` with ``n`` the size of the input's last dimension (4), read as it runs."""

    def __init__(self, read):
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.read = read

    def forward(self, x):
        return self.linear(x) + (x.size(-1) if self.read == "size" else x.shape[-1])


@pytest.mark.parametrize("read", ["size", "shape"])
def test_a_size_read_off_the_input_is_not_a_branch_of_a_sum(read):
    """``linear(x) + x.size(-1)`` adds a number, not a second function of the input: no residual
    connection is reported, and the converted model is 1-Lipschitz."""
    _, report = convert(nn.Sequential(PlusSize(read)), input_shape=(4,))
    assert report.obstacles == [] and report.lipschitz_bound <= 1 + 1e-5


class Forgets(nn.Module):
    """A forward that deletes an attribute at each call (put in place without ``__setattr__``)."""

    def __init__(self):
        super().__init__()
        self.linear = GramLinear(4, 4)

    def forward(self, x):
        self.__dict__["scratch"] = 1
        del self.scratch
        return self.linear(x)


class NotesItsSize(nn.Module):
    """A module that is no lipnet convolution, assigning the attribute lipnet's convolutions note."""

    def __init__(self):
        super().__init__()
        self.linear = GramLinear(4, 4)
        self._last_input_size = None

    def forward(self, x):
        self._last_input_size = (4,)
        return self.linear(x)


class TwoWrites(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = GramLinear(4, 4)
        self.gate = nn.Identity()

    def forward(self, x):
        self.calls = 1
        self.gate.seen = 1
        return self.gate(self.linear(x))


@pytest.mark.parametrize("make, name, owner", [
    (Forgets, "scratch", "Forgets"),
    (NotesItsSize, "_last_input_size", "NotesItsSize"),
    (TwoWrites, "calls", "TwoWrites"),
])
def test_a_forward_that_changes_its_attributes_is_refused_naming_the_first(make, name, owner):
    """Deleting an attribute is a write too; the attribute lipnet's convolutions note is allowed
    for them only; the error names the first attribute written and its owner."""
    with pytest.raises(LipschitzBoundError, match=f"its forward assigns the attribute '{name}' of a {owner} while"):
        traced_lipschitz_bound(make().eval(), (4,))
