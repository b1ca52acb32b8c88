"""Certified radii against hand-made logits and the exact distances of linear classifiers."""

import math

import pytest
import torch
from torch import nn

from lipnet.certify import certified_radius, logit_rounding_margin
from lipnet.certify.radius import LOGIT_ROUNDING_ULPS, row_distance_upper_bound
from lipnet.nn import GramConv2d, GramLinear, MaxMin


def test_hand_made_logits_generic_form():
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 1.0, 0.0], [-1.0, -4.0, -2.0]])
    labels = torch.tensor([0, 0, 0, 0])
    radii = certified_radius(logits, labels, lipschitz=2.0)
    delta = LOGIT_ROUNDING_ULPS * torch.finfo(torch.float32).eps * torch.tensor([3.0, 2.0, 1.0, 4.0]).double()
    # margin f_y - max_{j != y} f_j over sqrt(2) L, margins reduced by 2 delta
    expected = torch.tensor([2.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    expected = torch.where(expected > 0, (expected - 2 * delta) / (math.sqrt(2) * 2.0), expected)
    assert radii[1] == 0 and radii[2] == 0  # wrong, and tied
    assert torch.all(radii <= expected) and torch.allclose(radii, expected, rtol=1e-12, atol=0)
    assert radii[0] < 2.0 / (math.sqrt(2) * 2.0)


def test_generic_radius_is_exact_for_the_worst_lipschitz_map():
    """f(x) = L x on R^K is L-Lipschitz; its exact minimal adversarial distance is the generic radius."""
    torch.manual_seed(0)
    L = 1.7
    x = torch.randn(200, 4, dtype=torch.float64)
    y = x.argmax(dim=1)
    radii = certified_radius(L * x, y, lipschitz=L)
    top2 = (L * x).topk(2, dim=1).values
    exact = (top2[:, 0] - top2[:, 1]) / (math.sqrt(2) * L)  # distance to the hyperplane x_y = x_j
    assert torch.all(radii <= exact) and torch.allclose(radii, exact, rtol=1e-9, atol=1e-12)
    # Brute force: no perturbation within the radius flips the prediction, the worst one just beyond does.
    directions = torch.randn(200, 2000, 4, dtype=torch.float64)
    directions = directions / directions.norm(dim=2, keepdim=True)
    moved = x[:, None, :] + radii[:, None, None] * directions
    assert torch.all(moved.argmax(dim=2) == y[:, None])
    runner_up = (L * x).topk(2, dim=1).indices[:, 1]
    worst = torch.zeros_like(x)
    worst[torch.arange(200), y] = -1 / math.sqrt(2)
    worst[torch.arange(200), runner_up] = 1 / math.sqrt(2)
    beyond = x + (exact * (1 + 1e-6) + 1e-12)[:, None] * worst
    assert torch.all(beyond.argmax(dim=1) != y)


def test_last_layer_radius_is_exact_for_linear_classifiers():
    torch.manual_seed(1)
    weight, bias = torch.randn(5, 8, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    h = torch.randn(300, 8, dtype=torch.float64)
    logits = h @ weight.T + bias
    y = logits.argmax(dim=1)
    radii = certified_radius(logits, y, last_layer=weight, body_lipschitz=1.0)
    gaps = logits.gather(1, y[:, None]) - logits
    dists = (weight[y][:, None, :] - weight[None, :, :]).norm(dim=2)
    exact = torch.where(gaps > 0, gaps / dists, math.inf).amin(dim=1)  # distance to the nearest facet
    assert torch.all(radii <= exact) and torch.allclose(radii, exact, rtol=1e-9)
    generic = certified_radius(logits, y, lipschitz=torch.linalg.matrix_norm(weight, 2).item())
    assert torch.all(generic <= radii)
    assert (generic < 0.9 * radii).any()  # strictly tighter in general
    # Stepping just past the nearest facet flips the prediction.
    j = torch.where(gaps > 0, gaps / dists, math.inf).argmin(dim=1)
    normal = weight[j] - weight[y]
    normal = normal / normal.norm(dim=1, keepdim=True)
    flipped = (h + (exact * (1 + 1e-6))[:, None] * normal) @ weight.T + bias
    assert torch.all(flipped.argmax(dim=1) != y)


def test_body_lipschitz_scales_the_last_layer_radius():
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    logits = torch.tensor([[2.0, 0.0]], dtype=torch.float64)
    one = certified_radius(logits, torch.tensor([0]), last_layer=weight, body_lipschitz=1.0)
    four = certified_radius(logits, torch.tensor([0]), last_layer=weight, body_lipschitz=4.0)
    assert one.item() == pytest.approx(2 / math.sqrt(2), rel=1e-10) and four.item() == pytest.approx(one.item() / 4)


def test_gram_linear_contributes_its_applied_weight():
    layer = GramLinear(6, 4)
    h = torch.randn(50, 6)
    with torch.no_grad():
        logits = layer(h)
    y = logits.argmax(dim=1)
    from_layer = certified_radius(logits, y, last_layer=layer, body_lipschitz=1.0)
    from_weight = certified_radius(logits, y, last_layer=layer.normalized_weight().detach(), body_lipschitz=1.0)
    assert torch.equal(from_layer, from_weight)
    raw = certified_radius(logits, y, last_layer=layer.weight.detach(), body_lipschitz=1.0)
    assert not torch.equal(from_layer, raw)


def test_identical_rows_with_a_positive_bias_gap_do_not_limit_the_radius():
    weight = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    logits = torch.tensor([[3.0, 2.0, 0.0]], dtype=torch.float64)  # f_0 - f_1 = b_0 - b_1 = 1 everywhere
    radius = certified_radius(logits, torch.tensor([0]), last_layer=weight, body_lipschitz=1.0)
    assert radius.item() == pytest.approx(3 / math.sqrt(2), rel=1e-10)


def test_rounding_margin_removes_margins_below_float_precision():
    logits = torch.tensor([[1e6 + 64, 1e6, 0.0]])  # float32 spacing at 1e6 is 0.0625
    assert certified_radius(logits, torch.tensor([0]), lipschitz=1.0).item() == 0.0
    assert certified_radius(logits.double(), torch.tensor([0]), lipschitz=1.0).item() > 0
    assert logit_rounding_margin(logits).item() == pytest.approx(LOGIT_ROUNDING_ULPS * 2.0**-23 * (1e6 + 64))


def test_float32_forward_error_is_far_below_the_rounding_margin():
    torch.manual_seed(2)
    layers = [GramConv2d(3, 32, 3, padding=1), MaxMin()]
    for _ in range(6):
        layers += [GramConv2d(32, 32, 3, padding=1), MaxMin()]
    net = nn.Sequential(*layers, GramConv2d(32, 32, 4, stride=4), nn.Flatten(), GramLinear(32 * 8 * 8, 256), MaxMin(),
                        GramLinear(256, 10)).eval()
    x = torch.rand(16, 3, 32, 32)
    with torch.no_grad():
        single = net(x * 40)  # large activations
        double = net.double()(x.double() * 40)
    error = (single.double() - double).abs().amax(dim=1)
    assert torch.all(error * 100 <= logit_rounding_margin(single))


def test_row_distance_upper_bound():
    weight = torch.randn(7, 300, dtype=torch.float64)
    exact = torch.cdist(weight, weight)
    bound = row_distance_upper_bound(weight)
    assert torch.all(bound >= exact * (1 - 1e-15)) and torch.allclose(bound, exact, rtol=1e-12)


def test_bad_arguments_say_what_to_do():
    logits, labels = torch.randn(3, 4), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="either lipschitz"):
        certified_radius(logits, labels)
    with pytest.raises(ValueError, match="either lipschitz"):
        certified_radius(logits, labels, 1.0, last_layer=torch.randn(4, 2))
    with pytest.raises(ValueError, match="body_lipschitz"):
        certified_radius(logits, labels, last_layer=torch.randn(4, 2))
    with pytest.raises(ValueError, match="4 classes"):
        certified_radius(logits, labels, last_layer=torch.randn(3, 2), body_lipschitz=1.0)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        certified_radius(logits, torch.tensor([0, 1, 4]), lipschitz=1.0)
    with pytest.raises(ValueError, match="NaN"):
        certified_radius(torch.full((3, 4), math.nan), labels, lipschitz=1.0)
    with pytest.raises(ValueError, match=">= 0"):
        certified_radius(logits, labels, lipschitz=-1.0)
    with pytest.raises(ValueError, match="K >= 2"):
        certified_radius(torch.randn(3, 1), labels, lipschitz=1.0)
    with pytest.raises(ValueError, match="NaN or inf"):
        certified_radius(logits, labels, last_layer=torch.tensor([[1.0], [math.nan], [0.0], [2.0]]), body_lipschitz=1.0)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32])
def test_labels_of_any_integer_dtype_give_the_int64_radii(dtype):
    """uint8 and int32 labels (as data sets store them) crashed in gather or one_hot."""
    logits, labels = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0]]), torch.tensor([0, 1])
    expected = certified_radius(logits, labels, lipschitz=1.0)
    assert torch.equal(certified_radius(logits, labels.to(dtype), lipschitz=1.0), expected)
    weight = torch.randn(3, 2)
    assert torch.equal(certified_radius(logits, labels.to(dtype), last_layer=weight, body_lipschitz=1.0),
                       certified_radius(logits, labels, last_layer=weight, body_lipschitz=1.0))


def test_boolean_labels_are_refused():
    with pytest.raises(ValueError, match="integer labels"):
        certified_radius(torch.randn(2, 2), torch.tensor([True, False]), lipschitz=1.0)


def test_a_constant_body_certifies_every_right_prediction_at_any_radius():
    """``body_lipschitz=0``: the features, hence the logits, never change, so every right prediction holds
    everywhere (radius inf), also when the last layer's row distances overflow to inf (``0 * inf`` made
    the radius NaN, which no comparison counts as certified)."""
    weight = torch.tensor([[1e308, 0.0], [-1e308, 0.0], [0.0, 1.0]], dtype=torch.float64)
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 3.0]], dtype=torch.float64)
    radii = certified_radius(logits, torch.tensor([0, 0]), last_layer=weight, body_lipschitz=0.0)
    assert radii.tolist() == [math.inf, 0.0]


def test_complex_logits_are_refused():
    """A margin compares real scores: complex logits were cast to their real parts (with a
    warning) and given radii; they are refused."""
    logits = torch.tensor([[2.0 + 1j, 0.5], [0.1, 1.0 - 3j]])
    with pytest.raises(ValueError, match="logits must be real"):
        certified_radius(logits, torch.tensor([0, 1]), 1.0)
