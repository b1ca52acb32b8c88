"""Soundness red team of lipnet.export: the exported model's ``lipschitz_bound`` must hold for the
function it computes."""

import pytest
import torch
from torch import nn

import lipnet
from lipnet.certify import LipschitzBoundError
from lipnet.nn import GramLinear, MaxMin


class Amplified(nn.Module):
    """A user wrapper that names its child ``_orig_mod``, as torch.compile's wrapper does."""

    def __init__(self, inner):
        super().__init__()
        self._orig_mod = inner

    def forward(self, x):
        return self._orig_mod(100 * x)


class Gated(Amplified):
    """Gain 100 only where x > 10: the runtime's check of the bound, at one normal input, misses it."""

    def forward(self, x):
        return self._orig_mod(x) + 100 * torch.relu(x[:, :2] - 10)


def inner():
    torch.manual_seed(0)
    return nn.Sequential(GramLinear(4, 4), MaxMin(), GramLinear(4, 2))


def test_a_wrapper_taken_for_a_compiled_model_is_caught_by_the_runtime_check():
    # lipschitz_bound unwraps the wrapper (bound 1.000002), but the archive's check of the bound
    # against the Jacobian at a random input (norm 73) refuses it.
    with pytest.raises((ValueError, LipschitzBoundError), match="is false|_orig_mod|forward"):
        lipnet.export(Amplified(inner()), (4,))


def test_the_exported_bound_holds_away_from_the_checked_input():
    try:
        exported = lipnet.export(Gated(inner()), (4,))
    except (ValueError, LipschitzBoundError):
        return
    x, d = torch.full((1, 4), 11.0), 1e-3 * torch.randn(1, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        quotient = float((exported(x + d) - exported(x)).norm() / d.norm())  # about 93
    assert exported.lipschitz_bound >= quotient  # 1.000002


def test_an_exported_model_does_not_keep_its_bound_for_other_weights():
    exported = lipnet.export(inner(), (4,))
    louder = {name: 10 * value for name, value in exported.state_dict().items()}
    try:
        exported.load_state_dict(louder)
    except (RuntimeError, ValueError, TypeError):
        return
    gen = torch.Generator().manual_seed(0)
    x, d = torch.rand(1, 4, generator=gen), 1e-3 * torch.randn(1, 4, generator=gen)
    with torch.no_grad():
        quotient = float((exported(x + d) - exported(x)).norm() / d.norm())  # about 22
    assert exported.lipschitz_bound >= quotient  # 1.000002


def test_an_exported_model_reloads_its_own_weights_and_lets_its_holder_load_others():
    exported = lipnet.export(inner(), (4,))
    exported.load_state_dict(exported.state_dict())
    holder = nn.Sequential(exported, nn.Linear(2, 2))
    holder.load_state_dict({"1.weight": torch.zeros(2, 2), "1.bias": torch.zeros(2)}, strict=False)
    assert bool((holder[1].weight == 0).all())
