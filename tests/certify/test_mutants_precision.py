"""Mutation-testing gaps of lipnet.certify.precision: each test compares the proven error bound of
the float64 pass with the exact distance, in rational arithmetic, on a case built to need the
full allowance."""

from fractions import Fraction

import pytest
import torch
from torch import nn

from lipnet.nn import GramConv1d, GramLinear

from lipnet.certify import LipschitzBoundError, certified_accuracy
from lipnet.certify.lipschitz import module_lipschitz_bounds
from lipnet.certify.precision import exact_kernels, forward_with_error_bound


def exact_linear(weight: torch.Tensor, x: torch.Tensor) -> list[list[Fraction]]:
    w = [[Fraction(float(v)) for v in row] for row in weight.tolist()]
    return [[sum((wi * Fraction(float(v)) for wi, v in zip(row, example)), Fraction(0)) for row in w]
            for example in x.tolist()]


def squared_distance(computed: torch.Tensor, exact: list[list[Fraction]]) -> list[Fraction]:
    return [sum(((Fraction(float(c)) - e) ** 2 for c, e in zip(row, ex)), Fraction(0))
            for row, ex in zip(computed.tolist(), exact)]


def test_underflow_of_every_product_of_every_output_is_covered():
    """A GramLinear whose entries are all equal applies ``w ~ 2^-6`` (its norm is 1); every product
    ``w * 31 2^-1074`` (a subnormal input) is just below half the smallest subnormal and rounds to
    0: each of the ``n`` outputs is off by ``(31 / 64) n 2^-1074``, ``0.48 n^1.5 2^-1074`` in L2,
    while the relative model of rounding sees nothing (every output is 0). The allowance for
    underflow must grow as ``K^1.5`` (``K`` outputs of ``K`` products), not as ``K``."""
    n = 64
    layer = GramLinear(n, n, bias=False).double()
    with torch.no_grad():
        layer.weight.fill_(1.0)
    model = nn.Sequential(layer).eval()
    x = torch.full((1, n), 31 * 2.0 ** -1074, dtype=torch.float64)
    _, bounds = module_lipschitz_bounds(model, (n,))
    with exact_kernels(), torch.no_grad():
        y, err = forward_with_error_bound(model, x, bounds)
    assert bool((y == 0).all())  # every product underflowed to 0
    (distance2,) = squared_distance(y, exact_linear(layer.normalized_weight(), x))
    assert distance2 > (Fraction(2) ** -1074 * 200) ** 2  # the case needs more than K 2^-1074 (K = 65)
    assert Fraction(float(err[0])) ** 2 >= distance2


def test_tiny_activations_keep_their_relative_rounding_in_the_bound():
    """Inputs near ``1e-170``: their squares underflow to 0, so norms computed naively are 0 and the
    relative term ``4 u K^1.5 (lam ||h|| + ||y||)`` would vanish, leaving only the underflow term
    (``~1e-321``), while the rounding of the products and sums is relative (``~1e-186``)."""
    torch.manual_seed(0)
    n = 16
    layer = GramLinear(n, n, bias=False).double()
    model = nn.Sequential(layer).eval()
    x = torch.randn(3, n, dtype=torch.float64) * 1e-170
    _, bounds = module_lipschitz_bounds(model, (n,))
    with exact_kernels(), torch.no_grad():
        y, err = forward_with_error_bound(model, x, bounds)
    distances = squared_distance(y, exact_linear(layer.normalized_weight(), x))
    assert max(distances) > (Fraction(10) ** -200) ** 2  # the case has rounding far above the underflow term
    for e, d2 in zip(err.tolist(), distances):
        assert Fraction(e) ** 2 >= d2


def test_a_kernel_reading_copies_is_covered_for_any_summation_order():
    """Replicate padding 150 on a one-sample input: the output sums the 301 products ``w_t x`` of
    copies of one sample. The kernel's summation order is unknown, so the allowance must cover
    Higham's bound for any order, ``gamma_301 sum |w_t x|`` (section 3.1), which counts the 301
    products, not the single input and output entries (with ``K = 2`` the allowance is ~0.7 of it)."""
    k = 301
    conv = GramConv1d(1, 1, k, padding=k // 2, padding_mode="replicate", bias=False).double()
    with torch.no_grad():
        conv.weight.fill_(1.0)
    model = nn.Sequential(conv).eval()
    x = torch.tensor([[[0.7]]], dtype=torch.float64)
    _, bounds = module_lipschitz_bounds(model, (1, 1))
    with exact_kernels(), torch.no_grad():
        y, err = forward_with_error_bound(model, x, bounds)
    assert y.shape == (1, 1, 1)
    u = Fraction(2) ** -53
    gamma = k * u / (1 - k * u)
    weights = conv.normalized_weight().flatten().tolist()
    worst = gamma * sum(abs(Fraction(w) * Fraction(0.7)) for w in weights)
    assert Fraction(float(err[0])) >= worst


def assert_doubled_upsampling_refused_or_bounded_by_4(model):
    """``model`` maps one pixel to four copies of twice its value (Lipschitz 4): certification refuses
    it or bounds it by at least 4, never by the bare upsampling's 2."""
    x = torch.ones(2, 1, 1, 1)
    with torch.no_grad():
        assert torch.equal(model(x), torch.full((2, 4), 2.0))
    try:
        result = certified_accuracy(model, [(x, torch.zeros(2, dtype=torch.long))], eps=0.1)
    except LipschitzBoundError:
        return
    assert result.lipschitz >= 4


def test_nearest_upsampling_with_a_forward_hook_is_not_certified_without_it():
    """A float32 model whose nearest upsampling has a hook doubling its output, on a one-pixel input
    (where the doubled indices are still the input's one index, 0): the model is ``x -> 2 U x``,
    Lipschitz exactly ``2 sqrt(4) = 4``. Certification must refuse it or bound that map, not the
    upsampling without its hook."""
    upsample = nn.Upsample(scale_factor=2, mode="nearest")
    upsample.register_forward_hook(lambda module, inputs, output: output * 2)
    model = nn.Sequential(upsample, nn.Flatten()).eval()
    assert_doubled_upsampling_refused_or_bounded_by_4(model)


class _DoublingUpsample(nn.Upsample):
    """Nearest upsampling whose own forward doubles the result."""

    def forward(self, x):
        return super().forward(x) * 2


def test_an_upsampling_subclass_with_its_own_forward_is_not_certified_as_nn_upsample():
    """As above, with the doubling in a subclass's forward: ``x -> 2 U x``, Lipschitz 4 on one pixel."""
    model = nn.Sequential(_DoublingUpsample(scale_factor=2, mode="nearest"), nn.Flatten()).eval()
    assert_doubled_upsampling_refused_or_bounded_by_4(model)


def flushed_underflow_network(n=4096):
    """``x -> s <w, x> -> (b - y, y)``: ``w ~ 2^-6`` (a GramLinear of ones), ``x_i = 2^-1017`` (normal), so
    every product is a subnormal ``~2^-1023`` and ``<w, x> ~ 2^-1011``; BatchNorm scales it by ``2^1000``
    to ``2^-11``, and the head's bias ``b = 1.5 2^-12`` puts the exact decision at class 1."""
    gram = GramLinear(n, 1, bias=False).double()
    with torch.no_grad():
        gram.weight.fill_(1.0)
    bn = nn.BatchNorm1d(1, eps=0.25).double()
    with torch.no_grad():
        bn.running_mean.zero_()
        bn.running_var.fill_(0.75)  # scale = weight / sqrt(0.75 + 0.25)
        bn.weight.fill_(2.0 ** 1000)
        bn.bias.zero_()
    head = nn.Linear(1, 2).double()
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[-1.0], [1.0]]))
        head.bias.copy_(torch.tensor([1.5 * 2.0 ** -12, 0.0]))
    return nn.Sequential(gram, bn, head).eval(), torch.full((1, n), 2.0 ** -1017, dtype=torch.float64)


def test_certification_with_denormals_flushed_to_zero_is_still_sound():
    """``torch.set_flush_denormal(True)`` (a CPU speed setting) makes every subnormal product 0, an
    error of up to ``2^-1022`` each, where the proven bound allows ``2^-1075``: the float64 pass then
    predicted class 0 with margin ``3 2^-12`` and an error bound of 0, certifying a radius where the
    exact model predicts class 1. Certification must run with gradual underflow whatever the
    setting, and leave the setting as it found it."""
    model, x = flushed_underflow_network()
    with torch.no_grad():
        w = Fraction(float(model[0].normalized_weight()[0, 0]))
    assert w * Fraction(2.0 ** -1017) < Fraction(2.0 ** -1022)  # every product is subnormal
    dot = w * Fraction(2.0 ** -1017) * x.shape[1]  # ~ 2^-1011
    scaled = dot * Fraction(2.0 ** 1000)  # BatchNorm, exactly (sqrt(1) = 1)
    exact_logits = (Fraction(1.5 * 2.0 ** -12) - scaled, scaled)
    assert exact_logits[1] > exact_logits[0]  # the exact model predicts class 1
    if not torch.set_flush_denormal(True):
        pytest.skip("flushing denormals is not supported on this CPU")
    try:
        result = certified_accuracy(model, [(x, torch.zeros(1, dtype=torch.long))], eps=0.0)
        still_flushing = bool(torch.tensor(2.0 ** -1022, dtype=torch.float64) / 2 == 0)
    finally:
        torch.set_flush_denormal(False)
    assert float(result.radii[0]) == 0.0  # label 0 is not the exact prediction: no radius
    assert still_flushing  # the caller's setting is restored
