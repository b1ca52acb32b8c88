"""Margin losses: hand-computed values and the margin they ask for."""

import math
import subprocess
import sys

import pytest
import torch
from torch.nn import functional as F

from lipnet.certify import certified_radius
from lipnet.training import (
    CertifiedMarginLoss,
    margin_for,
    multi_margin_hinge,
    offset_cross_entropy,
    pairwise_lipschitz,
    pairwise_margin_cross_entropy,
)


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


def test_pairwise_lipschitz_is_the_constant_of_each_logit_difference():
    torch.manual_seed(0)
    w = torch.randn(5, 7, dtype=torch.float64)
    k = pairwise_lipschitz(w, 3.0)
    for y in range(5):
        for j in range(5):
            # f_y - f_j = <w_y - w_j, h> is exactly 3 ||w_y - w_j||-Lipschitz in h for a 3-Lipschitz body
            assert math.isclose(float(k[y, j]), 3.0 * float((w[y] - w[j]).norm()), rel_tol=1e-12, abs_tol=1e-300)
    w = w.clone().requires_grad_(True)
    pairwise_lipschitz(torch.cat([w, w[:1]]), 1.0).sum().backward()  # equal rows and the diagonal: zero distances
    assert torch.isfinite(w.grad).all()


def test_pairwise_lipschitz_is_exact_for_close_rows():
    # ||w_y||^2 + ||w_j||^2 - 2 <w_y, w_j> would cancel to rounding noise here
    w = torch.full((2, 64), 1000.0, dtype=torch.float64)
    w[1, 0] += 1e-6
    assert math.isclose(float(pairwise_lipschitz(w, 1.0)[0, 1]), 1e-6, rel_tol=1e-6)
    half = torch.randn(3, 4).bfloat16().requires_grad_(True)
    k = pairwise_lipschitz(half, 1.0)
    k.sum().backward()
    assert k.dtype == torch.float32 and half.grad.dtype == torch.bfloat16
    assert torch.allclose(k, pairwise_lipschitz(half.detach().float(), 1.0))
    with pytest.raises(ValueError, match=r"\(classes, features\)"):
        pairwise_lipschitz(torch.ones(3), 1.0)


_PEAK_MEMORY = """
import resource, torch
from lipnet.training import pairwise_lipschitz
w = torch.randn(1000, 512, requires_grad=True)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
pairwise_lipschitz(w, 1.0).sum().backward()
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


def test_pairwise_lipschitz_takes_memory_of_the_pairs_not_of_their_differences():
    # 1000 classes of 512 features: a (K, K, features) tensor of differences is 2 GB in float32
    done = subprocess.run([sys.executable, "-c", _PEAK_MEMORY], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.split()[-1]) < 200  # MiB above the peak before the call


def test_pairwise_margin_cross_entropy_raises_each_logit_as_far_as_the_radius_allows():
    z = torch.tensor([[4.0, 3.0, 0.0, 5.0]])
    y = torch.tensor([0])
    k = torch.tensor([[0.0, 2.0, 1.0, 1.0]]).expand(4, 4)  # only row y = 0 is read
    # class 1: margin 1, K 2: radius 0.5 < eps, raised to f_y; class 2: radius 4 > eps = 1, raised by 1;
    # class 3 beats class 0 (negative margin): not raised
    expected = F.cross_entropy(torch.tensor([[4.0, 4.0, 1.0, 5.0]]) / 0.5, y) * 0.5
    assert torch.allclose(pairwise_margin_cross_entropy(z, y, 1.0, k, temperature=0.5), expected)
    assert torch.allclose(pairwise_margin_cross_entropy(z, y, 0.0, k), F.cross_entropy(z, y))


def test_pairwise_margin_cross_entropy_is_small_exactly_when_the_last_layer_certificate_holds():
    torch.manual_seed(1)
    w = torch.randn(3, 6)
    w = w / torch.linalg.matrix_norm(w, 2)
    h = torch.randn(200, 6)
    z = 10 * h @ w.T
    y = z.argmax(1)
    loss = CertifiedMarginLoss("emma", eps=0.5, lipschitz=2.0, temperature=0.05)
    each = torch.stack([loss(z[i:i + 1], y[i:i + 1], last_weight=w) for i in range(len(y))])
    # The library's last-layer certificate for logits W h' + b with a 2-Lipschitz body (h' = 10 h).
    radii = certified_radius(z, y, last_layer=w, body_lipschitz=2.0, rounding=torch.zeros(len(y)))
    certified_at_eps = radii >= 0.5
    assert certified_at_eps.any() and (~certified_at_eps).any()
    # Certified pairs are raised by eps K_yj and stay below f_y: a small loss; any other pair is
    # raised to f_y, a tie that costs at least T log 2 (in float32: up to its rounding below).
    tie = 0.05 * math.log(2)
    assert each[certified_at_eps].max() < tie and each[~certified_at_eps].min() >= tie * (1 - 1e-6)


def test_the_emma_loss_needs_the_last_weight_and_no_offset():
    loss = CertifiedMarginLoss("emma", eps=0.5, lipschitz=4.0)
    assert loss.needs_last_weight and not CertifiedMarginLoss("ce").needs_last_weight
    with pytest.raises(ValueError, match="last_weight"):
        loss(torch.tensor([[1.0, 0.0]]), torch.tensor([0]))
    with pytest.raises(ValueError, match="offset"):
        CertifiedMarginLoss("emma", eps=0.5, offset=1.0)
    w = torch.eye(2)
    # K_01 = 4 sqrt 2 = the generic constant sqrt(2) L when the rows are orthonormal: the same margin as "ce"
    z = torch.tensor([[10.0, 0.0]])
    assert torch.allclose(loss(z, torch.tensor([0]), last_weight=w),
                          CertifiedMarginLoss("ce", eps=0.5, lipschitz=4.0)(z, torch.tensor([0])))


@pytest.mark.parametrize("kind", CertifiedMarginLoss.KINDS)
def test_per_example_gradients_under_vmap_equal_one_example_at_a_time(kind):
    from torch.func import grad, vmap

    torch.manual_seed(0)
    loss = CertifiedMarginLoss(kind, eps=0.3, lipschitz=1.5)
    logits, targets, weight = torch.randn(5, 4), torch.tensor([0, 3, 1, 1, 2]), torch.randn(4, 6)
    extra = {"last_weight": weight} if kind == "emma" else {}

    def one(z, y):
        return loss(z[None], y[None], **extra)
    per_example = vmap(grad(one))(logits, targets)
    for z, y, g in zip(logits, targets, per_example):
        z = z.clone().requires_grad_(True)
        (expected,) = torch.autograd.grad(one(z, y), z)
        torch.testing.assert_close(g, expected)
