"""Mutation-testing follow-ups for lipnet.training.losses: shapes that are refused, and the
gradient of a raise capped at the true logit."""

import pytest
import torch

from lipnet.training.losses import CertifiedMarginLoss, pairwise_margin_cross_entropy


@pytest.mark.parametrize("kind", CertifiedMarginLoss.KINDS)
@pytest.mark.parametrize("targets", [torch.tensor([0]), torch.tensor([0, 1, 2]), torch.tensor([[0], [1]])])
def test_targets_that_are_not_one_per_example_are_refused(kind, targets):
    """(1,) would broadcast over a batch of 2, (3,) or (2, 1) index past it or oddly: each is
    an error naming the shape expected."""
    loss = CertifiedMarginLoss(kind, eps=0.5)
    with pytest.raises(ValueError, match=r"targets must be \(N,\) = \(2,\) class indices"):
        loss(torch.zeros(2, 3), targets, last_weight=torch.eye(3))


def test_a_raise_rounded_past_the_true_logit_keeps_its_gradient():
    """(f_y - f_j) / K * K rounds above f_y for these float32 values: the raised logit is set to
    f_y, but with the gradient of f_j + e_j K (1 for f_j, e_j for K), as for an exact raise:
    at the tie the loss is T log 2 and its gradient (p - onehot) = (-1/2, 1/2)."""
    fy, fj, k = 2.4324724674224854, 0.7905631065368652, 1.5798275470733643
    z = torch.tensor([[fy, fj]], requires_grad=True)
    pairs = torch.tensor([[0.0, k], [k, 0.0]], requires_grad=True)
    assert bool(z[0, 1] + (z[0, 0] - z[0, 1]) / k * k > z[0, 0])  # the rounding this test is about
    loss = pairwise_margin_cross_entropy(z, torch.tensor([0]), 10.0, pairs, temperature=1.0)
    loss.backward()
    assert loss.item() == pytest.approx(0.6931471805599453, abs=1e-7)
    assert z.grad.tolist() == [[-0.5, 0.5]]
    reach = float((z[0, 0] - z[0, 1]).detach() / k)
    assert pairs.grad[0, 1].item() == pytest.approx(0.5 * reach, rel=1e-6)
    assert pairs.grad[0, 0].item() == 0 and pairs.grad[1].tolist() == [0.0, 0.0]


def test_the_hinge_ignores_the_temperature():
    """The temperature belongs to the cross-entropies; the hinge's margin is the offset itself:
    margins 0.5 and 2.5 against an offset of 1 cost (0.5 + 0 + ... ) / 2 wrong classes."""
    z, y = torch.tensor([[1.0, 0.5, -1.5]]), torch.tensor([0])
    for temperature in (1.0, 0.25, 4.0):
        loss = CertifiedMarginLoss("hinge", offset=1.0, temperature=temperature)
        assert loss(z, y).item() == 0.25
