"""Soundness red team of lipnet.convert's traced bounds: xfail tests are false certificates (bugs),
the others attacks that held and that no other test covers."""

import pytest
import torch
from torch import nn

import lipnet
from lipnet.certify import LipschitzBoundError, certified_accuracy, lipschitz_bound
from lipnet.certify import register_lipschitz_bound
from lipnet.convert import traced_lipschitz_bound
from lipnet.nn import GramLinear


class CancellingOffset(nn.Module):
    """``x * ((a + 1) - a)`` with ``a = (2^24, 0)``: in float32 ``2^24 + 1`` rounds to ``2^24``, so the
    float32 model applies the factors (0, 1); in float64 (1, 1)."""

    def __init__(self):
        super().__init__()
        self.linear = GramLinear(2, 2)
        self.register_buffer("a", torch.tensor([2.0 ** 24, 0.0]))

    def forward(self, x):
        return x * ((self.a + 1.0) - self.a)


def test_constants_of_a_traced_forward_are_certified_in_exact_arithmetic_as_documented(registry):
    # docs/math.md: a constant a forward derives from its buffers is taken in exact arithmetic, as
    # the rest of the forward. Here float32 cancellation makes the float32 model differ from the
    # exact one by far more than one rounding: the certificate is the exact model's.
    model, _ = lipnet.convert(nn.Sequential(CancellingOffset()), input_shape=(2,))
    model.eval()
    x = torch.tensor([[1.0, 0.9]])
    with torch.no_grad():
        assert int(model(x).argmax(1)) == 1  # float32: logits (0, 0.9)
        assert int(model.double()(x.double()).argmax(1)) == 0  # exact: (1, 0.9)
    model.float()
    certified = [float(certified_accuracy(model, (x, torch.tensor([label])), eps=[0.0], progress=False).radii[0])
                 for label in (0, 1)]
    assert certified[0] > 0.05 and certified[1] == 0


# ----------------------------------------------------------------------------- attacks that held


class Twice(nn.Module):
    """A child applied twice (weight sharing): bounded as the composition of both calls."""

    def __init__(self):
        super().__init__()
        self.torch_linear = nn.Linear(4, 4)
        self.act = nn.Tanh()

    def forward(self, x):
        return self.act(self.torch_linear(self.act(self.torch_linear(x))))


class ChunkedSum(nn.Module):
    def forward(self, x):
        a, b = x.chunk(2, 1)
        return a + b + torch.cat([a, a], 1)[:, :2]


class Broadcast(nn.Module):
    def forward(self, x):
        return x + x[:, :1]  # the first column copied to every entry: refused


class ExpandSum(nn.Module):
    def forward(self, x):
        return x.unsqueeze(1).expand(x.shape[0], 5, x.shape[1]).sum(1)


class MaskedFill(nn.Module):
    def forward(self, x):
        return x.masked_fill(x > 0, 0.0)


class Gather(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("index", torch.tensor([0, 0, 0, 0]))

    def forward(self, x):
        return torch.index_select(x, 1, self.index) + x[:, self.index]  # x0 copied 4 times, twice


class InplaceOnView(nn.Module):
    def forward(self, x):
        y = x * 1.0
        y[:, :2].mul_(100.0)
        return y


class DetachedScale(nn.Module):
    def forward(self, x):
        return x * x.detach().abs().amax()  # a factor computed from the input's values: refused


def _empirical(model, shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((1, *shape), generator=gen)
    d = 1e-4 * torch.randn((1, *shape), generator=gen)
    with torch.no_grad():
        return float((model(x + d) - model(x)).norm() / d.norm())


def test_a_shared_child_applied_twice_is_bounded_as_both_calls(registry):
    model, _ = lipnet.convert(nn.Sequential(Twice()), input_shape=(4,))
    model.eval()
    assert lipschitz_bound(model, (4,)) >= _empirical(model, (4,))


def test_chunks_summed_and_concatenated_are_bounded(registry):
    register_lipschitz_bound(ChunkedSum, traced_lipschitz_bound)  # no children: convert leaves it alone
    model = nn.Sequential(ChunkedSum()).eval()
    bound = lipschitz_bound(model, (4,))
    # a + b + a: the sum of three 1-Lipschitz selections, of norm sqrt(4 + 1) = 2.24 along (1, 1, 1/2, 1/2)
    assert bound >= 2.2360679 and bound >= _empirical(model, (4,))


@pytest.mark.parametrize("module", [Broadcast(), ExpandSum(), MaskedFill(), Gather(), InplaceOnView(),
                                    DetachedScale()], ids=lambda m: type(m).__name__)
def test_copying_masking_and_value_dependent_operations_are_refused(registry, module):
    register_lipschitz_bound(type(module), traced_lipschitz_bound)
    with pytest.raises(LipschitzBoundError, match="node"):  # refused by a rule of the graph, not as unknown
        lipschitz_bound(nn.Sequential(module).eval(), (4,))


_NON_LIPSCHITZ_OR_COPYING = {
    "square": lambda x: x.square(),  # not Lipschitz
    "softmax": lambda x: 100 * x.softmax(1),
    "repeat": lambda x: x.repeat(1, 2),  # copies: gain sqrt(2)
    "stack": lambda x: torch.stack([x, x], 1).flatten(1),
    "where": lambda x: torch.where(x > 0, x, 3 * x),
    "topk": lambda x: x.topk(2, 1).values,
    "cumsum": lambda x: x.cumsum(1),  # gain about 2.6 on 4 entries
    "matmul": lambda x: x @ torch.ones(4, 4),
}


@pytest.mark.parametrize("name", sorted(_NON_LIPSCHITZ_OR_COPYING))
def test_operations_without_a_rule_are_refused(registry, name):
    op = _NON_LIPSCHITZ_OR_COPYING[name]
    module_type = type(f"Op_{name}", (nn.Module,), {"forward": lambda self, x: op(x)})
    register_lipschitz_bound(module_type, traced_lipschitz_bound)
    with pytest.raises(LipschitzBoundError, match="node"):
        lipschitz_bound(nn.Sequential(module_type()).eval(), (4,))
