"""Margin losses: hand-computed values and the margin they ask for."""

import math

import pytest
import torch
from torch.nn import functional as F

from lipnet.training import CertifiedMarginLoss, margin_for, multi_margin_hinge, offset_cross_entropy


def test_offset_cross_entropy_matches_its_definition():
    torch.manual_seed(0)
    z, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 0, 1])
    assert torch.allclose(offset_cross_entropy(z, y, 0.0, 1.0), F.cross_entropy(z, y))
    shifted = z.clone()
    shifted[torch.arange(6), y] -= 1.5
    assert torch.allclose(offset_cross_entropy(z, y, 1.5, 0.5), 0.5 * F.cross_entropy(shifted / 0.5, y))


def test_offset_cross_entropy_keeps_pushing_below_the_offset():
    y = torch.tensor([0])
    small, large = torch.tensor([[1.0, 0.0]]), torch.tensor([[5.0, 0.0]])
    # Without offset a margin of 1 is already fairly good; with offset 4 it is still penalized.
    assert offset_cross_entropy(small, y, 4.0, 0.25) > 2.5
    assert offset_cross_entropy(large, y, 4.0, 0.25) < 0.1


def test_multi_margin_hinge_by_hand():
    z = torch.tensor([[2.0, 1.5, -1.0], [0.0, 1.0, 0.0]])
    y = torch.tensor([0, 0])
    # row 0: gaps 0.5, 3.0 -> relu(1 - 0.5) + relu(1 - 3) = 0.5 ; row 1: gaps -1, 0 -> 2 + 1 = 3
    expected = ((0.5 + 0.0) / 2 + (2.0 + 1.0) / 2) / 2
    assert math.isclose(float(multi_margin_hinge(z, y, 1.0)), expected, rel_tol=1e-6)
    assert float(multi_margin_hinge(torch.tensor([[3.0, 0.0, 1.0]]), torch.tensor([0]), 2.0)) == 0.0


def test_certified_margin_loss_turns_eps_into_a_logit_margin():
    loss = CertifiedMarginLoss("hinge", eps=0.5, lipschitz=4.0)
    assert math.isclose(loss.offset, math.sqrt(2) * 2.0) and math.isclose(margin_for(0.5, 4.0), loss.offset)
    assert CertifiedMarginLoss("ce", eps=0.5, offset=0.3).offset == 0.3
    z = torch.tensor([[10.0, 0.0]])
    assert float(loss(z, torch.tensor([0]))) == 0.0
    with pytest.raises(ValueError, match="kind"):
        CertifiedMarginLoss("mse")
