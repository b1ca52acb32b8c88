"""CI slice of tests/fuzz_convert.py: random traced forwards are certified soundly or refused
cleanly, and the fuzz catches a traced rule 0.1% too small."""

import operator

import pytest
import torch
from torch import nn

import fuzz_convert

from lipnet import convert
from lipnet.certify import LipschitzBoundError, lipschitz_bound
from lipnet.convert.bound_interpreter import _BoundInterpreter


SEEDS = range(150)


@pytest.mark.parametrize("seed", SEEDS)
def test_a_random_traced_forward_is_certified_soundly_or_refused(seed):
    case = fuzz_convert.run_case(seed)
    assert not case.failures, fuzz_convert.report(case)


def test_the_slice_certifies_some_and_refuses_some():
    outcomes = [fuzz_convert.run_case(seed).outcome for seed in range(12)]
    assert "certified" in outcomes and "refused" in outcomes


def test_the_fuzz_catches_an_add_rule_slightly_too_small(monkeypatch):
    original = _BoundInterpreter._node_bound

    def shrunk(self, node, value):
        bound = original(self, node, value)
        return bound * 0.999 if node.target in (operator.add, "add") else bound

    monkeypatch.setattr(_BoundInterpreter, "_node_bound", shrunk)
    assert any(fuzz_convert.run_case(seed).failures for seed in range(40))


class _ScaledByBatchSize(nn.Module):
    """``x * x.shape[0]``: the factor is the batch size, which the traced bound read at batch 3."""

    def __init__(self):
        super().__init__()
        self.spare = nn.Conv2d(1, 1, 1)

    def forward(self, x):
        return x * x.shape[0]


class _ScaledByBatchSizeTensor(_ScaledByBatchSize):
    """The batch size as a tensor: ``torch.tensor(x.shape)[0]`` (a number read through a tensor)."""

    def forward(self, x):
        return x * torch.tensor(x.shape, dtype=x.dtype)[0]


@pytest.mark.parametrize("module", [_ScaledByBatchSize, _ScaledByBatchSizeTensor], ids=["shape", "tensor"])
def test_a_factor_computed_from_the_batch_size_is_not_certified_at_the_tracing_batch(module):
    converted, _ = convert(module().double(), input_shape=(2, 2, 2))
    try:
        bound = lipschitz_bound(converted, (2, 2, 2))
    except LipschitzBoundError:
        return
    x, y = torch.randn(2, 100, 2, 2, 2, dtype=torch.float64)
    slope = float(((converted(x) - converted(y)).flatten(1).norm(dim=1) / (x - y).flatten(1).norm(dim=1)).max())
    assert slope <= bound * (1 + 1e-9)
