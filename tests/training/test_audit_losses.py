"""Audit of the certified-margin losses against their definitions: exact references in float64,
the EMMA raise and where its gradient goes, precision, and the inputs each loss refuses."""

import math

import pytest
import torch
from torch.autograd import gradcheck
from torch.nn import functional as F

from lipnet.training import (
    CertifiedMarginLoss,
    margin_for,
    multi_margin_hinge,
    offset_cross_entropy,
    pairwise_lipschitz,
    pairwise_margin_cross_entropy,
)


def _orthonormal_rows(classes: int, features: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(features, classes, dtype=torch.float64,
                                       generator=torch.Generator().manual_seed(seed)))
    return q.T  # (classes, features), ||w_y - w_j|| = sqrt(2) for every pair


@pytest.mark.parametrize("temperature", [1.0, 0.25, 0.05])
def test_ce_is_torch_cross_entropy_with_the_true_logit_lowered_by_the_offset(temperature):
    g = torch.Generator().manual_seed(3)
    z, y = 4 * torch.randn(64, 7, dtype=torch.float64, generator=g), torch.randint(0, 7, (64,), generator=g)
    lowered = z.clone()
    lowered[torch.arange(64), y] -= 1.3
    expected = temperature * F.cross_entropy(lowered / temperature, y)
    torch.testing.assert_close(offset_cross_entropy(z, y, 1.3, temperature), expected, rtol=1e-13, atol=0)
    loss = CertifiedMarginLoss("ce", eps=0.5, lipschitz=1.3 / (0.5 * math.sqrt(2)), temperature=temperature)
    torch.testing.assert_close(loss(z, y), expected, rtol=1e-13, atol=0)


def test_hinge_is_the_mean_over_wrong_classes_of_the_margin_shortfall():
    g = torch.Generator().manual_seed(4)
    z, y = torch.randn(32, 5, dtype=torch.float64, generator=g), torch.randint(0, 5, (32,), generator=g)
    expected = sum(max(0.0, 0.7 - float(z[i, y[i]] - z[i, j])) for i in range(32) for j in range(5) if j != y[i])
    torch.testing.assert_close(multi_margin_hinge(z, y, 0.7), torch.tensor(expected / (32 * 4), dtype=torch.float64))


def test_emma_with_all_row_distances_sqrt2_is_the_generic_offset_ce_once_the_margins_exceed_it():
    w, body, eps, t = _orthonormal_rows(6, 9, seed=0), 1.7, 0.4, 0.3
    margin = margin_for(eps, body)
    assert torch.allclose(pairwise_lipschitz(w, body) + body * math.sqrt(2) * torch.eye(6, dtype=torch.float64),
                          torch.full((6, 6), body * math.sqrt(2), dtype=torch.float64))
    g = torch.Generator().manual_seed(5)
    y = torch.randint(0, 6, (40,), generator=g)
    z = torch.randn(40, 6, dtype=torch.float64, generator=g)
    z[torch.arange(40), y] = z.max(1).values + margin + 0.01 + torch.rand(40, dtype=torch.float64, generator=g)
    emma = CertifiedMarginLoss("emma", eps=eps, lipschitz=body, temperature=t)(z, y, last_weight=w)
    torch.testing.assert_close(emma, offset_cross_entropy(z, y, margin, t), rtol=1e-13, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_emma_never_raises_a_wrong_logit_past_the_true_one(dtype):
    # Two classes, every margin below the pair's reach: each wrong logit is raised exactly to the
    # true one, a tie whose loss is T log 2; a raise one rounding past it shows at this temperature.
    g = torch.Generator().manual_seed(6)
    n, t = 4000, 1e-6 if dtype == torch.float64 else 1e-3
    k = (0.5 + 3 * torch.rand(2, 2, generator=g)).to(dtype)
    k = (k + k.T).fill_diagonal_(0)
    y = torch.randint(0, 2, (n,), generator=g)
    wrong = (10 * torch.randn(n, generator=g)).to(dtype)
    gap = (torch.rand(n, generator=g) * float(k[0, 1]) * 0.999).to(dtype)
    z = torch.stack([wrong, wrong], 1)
    z[torch.arange(n), y] += gap
    each = torch.stack([pairwise_margin_cross_entropy(z[i:i + 1], y[i:i + 1], 1.0, k, t) for i in range(n)])
    tie = torch.tensor(t * math.log(2), dtype=dtype)
    assert (each <= tie * (1 + 8 * torch.finfo(dtype).eps)).all(), float(each.max() / tie - 1)


def test_emma_holds_the_raise_constant_and_lets_the_gradient_reach_the_pair_constant():
    # y = 0, margin 1 below the reach eps K = 2 * 3: class 1 is raised to a tie. With the radius
    # e = margin / K held constant the raised logit is z_1 + e K: dL/dz = softmax - onehot =
    # (-1/2, 1/2) at the tie, and dL/dK = e / 2. Without the stop-gradient it would be z_0 itself.
    z = torch.tensor([[2.0, 1.0]], dtype=torch.float64, requires_grad=True)
    k = torch.tensor([[0.0, 3.0], [3.0, 0.0]], dtype=torch.float64, requires_grad=True)
    pairwise_margin_cross_entropy(z, torch.tensor([0]), 2.0, k, temperature=0.1).backward()
    torch.testing.assert_close(z.grad, torch.tensor([[-0.5, 0.5]], dtype=torch.float64))
    torch.testing.assert_close(k.grad, torch.tensor([[0.0, 1 / 6], [0.0, 0.0]], dtype=torch.float64))


def _below_every_tie(z: torch.Tensor, y: torch.Tensor, k: torch.Tensor) -> float:
    """An eps at which no pair is raised to its tie: there the held-constant raise e_j of EMMA
    is locally constant, and its gradient is the derivative gradcheck measures."""
    margins, pairs = z.gather(1, y[:, None]) - z, k.index_select(0, y)
    radii = (margins / pairs)[(margins > 0) & (pairs > 0)]
    return 0.5 * float(radii.min())


@pytest.mark.parametrize("kind", CertifiedMarginLoss.KINDS)
def test_certified_margin_loss_keeps_float64_and_passes_gradcheck(kind):
    g = torch.Generator().manual_seed(7)
    z = torch.randn(6, 5, dtype=torch.float64, generator=g).requires_grad_(True)
    w = torch.randn(5, 4, dtype=torch.float64, generator=g).requires_grad_(True)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    eps = _below_every_tie(z.detach(), y, pairwise_lipschitz(w.detach(), 1.5))
    assert eps > 1e-3  # far beyond the finite differences of gradcheck (1e-6)
    loss = CertifiedMarginLoss(kind, eps=eps, lipschitz=1.5, temperature=0.5)
    assert loss(z, y, last_weight=w).dtype == torch.float64
    assert gradcheck(lambda z, w: loss(z, y, last_weight=w), (z, w))


def test_the_functional_losses_pass_gradcheck_in_float64():
    g = torch.Generator().manual_seed(8)
    z = torch.randn(5, 4, dtype=torch.float64, generator=g).requires_grad_(True)
    w = torch.randn(4, 3, dtype=torch.float64, generator=g).requires_grad_(True)
    y = torch.tensor([3, 0, 1, 2, 1])
    assert gradcheck(lambda z: offset_cross_entropy(z, y, 0.8, 0.3), (z,))
    assert gradcheck(lambda z: multi_margin_hinge(z, y, 0.8), (z,))
    eps = _below_every_tie(z.detach(), y, pairwise_lipschitz(w.detach(), 2.0))
    assert eps > 1e-3  # far beyond the finite differences of gradcheck (1e-6)
    assert gradcheck(lambda z, w: pairwise_margin_cross_entropy(z, y, eps, pairwise_lipschitz(w, 2.0), 0.3), (z, w))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_logits_are_scored_in_float32(dtype):
    # The offset is not rounded to the logits' 8 or 11 bits, and logits / T does not overflow float16.
    g = torch.Generator().manual_seed(9)
    z, y = (300 * torch.randn(16, 10, generator=g)).to(dtype), torch.randint(0, 10, (16,), generator=g)
    k = pairwise_lipschitz(torch.randn(10, 8, generator=g), 1.0)
    for low, full in ((offset_cross_entropy(z, y, 0.37, 0.01), offset_cross_entropy(z.float(), y, 0.37, 0.01)),
                      (multi_margin_hinge(z, y, 0.37), multi_margin_hinge(z.float(), y, 0.37)),
                      (pairwise_margin_cross_entropy(z, y, 0.37, k, 0.01),
                       pairwise_margin_cross_entropy(z.float(), y, 0.37, k, 0.01))):
        assert low.dtype == torch.float32 and torch.isfinite(low)
        torch.testing.assert_close(low, full)


@pytest.mark.parametrize("kind", CertifiedMarginLoss.KINDS)
def test_the_loss_is_the_same_inside_bfloat16_autocast(kind):
    g = torch.Generator().manual_seed(10)
    z, y, w = torch.randn(8, 5, generator=g), torch.randint(0, 5, (8,), generator=g), torch.randn(5, 6, generator=g)
    loss = CertifiedMarginLoss(kind, eps=0.3, lipschitz=2.0, temperature=0.25)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = loss(z, y, last_weight=w)
    torch.testing.assert_close(inside, loss(z, y, last_weight=w))


@pytest.mark.parametrize("kind", CertifiedMarginLoss.KINDS)
def test_a_single_class_is_refused_not_a_silent_nan_or_zero(kind):
    loss = CertifiedMarginLoss(kind)
    with pytest.raises(ValueError, match="2 classes"):
        loss(torch.randn(3, 1), torch.zeros(3, dtype=torch.long), last_weight=torch.randn(1, 4))
    with pytest.raises(ValueError, match="2 classes"):
        multi_margin_hinge(torch.randn(3, 1), torch.zeros(3, dtype=torch.long), 1.0)


@pytest.mark.parametrize("kind", CertifiedMarginLoss.KINDS)
def test_a_label_of_minus_100_is_an_error_not_a_dropped_example(kind):
    # F.cross_entropy's ignore_index would silently leave the example out of "ce" and "emma".
    z, y = torch.randn(4, 3), torch.tensor([0, 1, -100, 2])
    with pytest.raises((IndexError, RuntimeError)):
        CertifiedMarginLoss(kind)(z, y, last_weight=torch.randn(3, 5))


def test_a_last_weight_with_other_rows_than_classes_is_refused_by_name():
    loss = CertifiedMarginLoss("emma")
    with pytest.raises(ValueError, match="last_weight"):
        loss(torch.randn(2, 3), torch.tensor([0, 1]), last_weight=torch.randn(4, 3))
    with pytest.raises(ValueError, match="pair_lipschitz"):
        pairwise_margin_cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]), 0.5, torch.ones(4, 4))


@pytest.mark.parametrize("settings", [dict(temperature=0.0), dict(temperature=-1.0), dict(temperature=math.inf),
                                      dict(temperature=math.nan), dict(eps=-0.1), dict(eps=math.nan),
                                      dict(eps=math.inf), dict(lipschitz=-2.0), dict(lipschitz=0.0),
                                      dict(lipschitz=math.nan), dict(offset=math.inf)])
def test_settings_that_make_no_margin_are_refused(settings):
    name = next(iter(settings))
    with pytest.raises(ValueError, match=name):
        CertifiedMarginLoss("ce", **settings)


def test_the_functions_refuse_a_temperature_or_radius_that_makes_no_loss():
    z, y = torch.tensor([[3.0, 0.0]]), torch.tensor([0])
    with pytest.raises(ValueError, match="temperature"):
        offset_cross_entropy(z, y, 1.0, temperature=0.0)
    with pytest.raises(ValueError, match="eps"):
        pairwise_margin_cross_entropy(z, y, -1.0, torch.ones(2, 2))
    with pytest.raises(ValueError, match="margin"):
        multi_margin_hinge(z, y, math.nan)


def test_an_infinite_true_logit_has_zero_hinge_loss():
    assert float(multi_margin_hinge(torch.tensor([[math.inf, 0.0, -1.0]]), torch.tensor([0]), 1.0)) == 0.0


def test_eps_zero_and_a_batch_of_one_are_plain_cross_entropy():
    z, y, w = torch.tensor([[0.3, 1.2, -0.4]], dtype=torch.float64), torch.tensor([1]), torch.randn(3, 2).double()
    for kind in ("ce", "emma"):
        torch.testing.assert_close(CertifiedMarginLoss(kind, eps=0.0)(z, y, last_weight=w), F.cross_entropy(z, y))
