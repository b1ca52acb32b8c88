import pytest
from torch import nn
from torch.nn.utils import parametrize


class CountReads(nn.Module):
    """An identity parametrization that counts how often the weight is computed."""

    def __init__(self):
        super().__init__()
        self.reads = 0

    def forward(self, weight):
        self.reads += 1
        return weight


@pytest.fixture
def count_weight_reads():
    """``register(layer) -> counter``: puts an identity parametrization on ``layer.weight`` that counts
    each computation of the weight (``counter.reads``, 0 after registering, which computes it once)."""

    def register(layer: nn.Module) -> CountReads:
        counter = CountReads()
        parametrize.register_parametrization(layer, "weight", counter)
        counter.reads = 0
        return counter

    return register
