"""The certification forward pass: float64 on the applied weights, and its rounding bound holds."""

from fractions import Fraction

import pytest
import torch
from torch import nn

from lipnet.certify import certified_accuracy, lipschitz_bound
from lipnet.certify.lipschitz import module_lipschitz_bounds
from lipnet.certify.precision import exact_kernels, float64_copy, forward_with_error_bound
from lipnet.nn import GramConv2d, GramLinear, MaxMin


def test_the_float64_copy_applies_the_original_weights(small_net, blobs):
    net = small_net.eval()
    x, _ = blobs(16)
    twin = float64_copy(net)
    assert all(p.dtype == torch.float64 for p in twin.parameters())
    assert all(p.dtype == torch.float32 for p in net.parameters())  # the original is untouched
    with torch.no_grad():
        torch.testing.assert_close(twin(x.double()), net(x).double(), rtol=1e-5, atol=1e-6)
        for original, copy in zip(net.modules(), twin.modules()):
            if isinstance(original, GramLinear):
                assert torch.equal(copy.normalized_weight(), original.normalized_weight().double())
    assert lipschitz_bound(twin, (1, 8, 8)) == lipschitz_bound(net, (1, 8, 8))


def _exact_logits(layers, x):
    """Two affine layers in rational arithmetic on the float64 values (exact)."""
    h = [[Fraction(float(v)) for v in row] for row in x]
    for weight, bias in layers:
        w = [[Fraction(float(v)) for v in row] for row in weight]
        b = [Fraction(float(v)) for v in bias.detach()]
        h = [[sum(wi * hi for wi, hi in zip(w_row, row)) + bj for w_row, bj in zip(w, b)] for row in h]
    return h


def test_the_error_bound_holds_against_exact_rational_arithmetic():
    torch.manual_seed(0)
    first, second = GramLinear(6, 6).double(), GramLinear(6, 3).double()
    net = nn.Sequential(first, MaxMin(), second).eval()
    with torch.no_grad():  # huge activations that cancel in the logits: a hard case for rounding
        first.bias.fill_(1e12)
        second.bias.copy_(-(second.normalized_weight() @ first.bias))
    net = nn.Sequential(first, second).eval()
    x = torch.randn(20, 6, dtype=torch.float64)
    _, bounds = module_lipschitz_bounds(net, (6,))
    with torch.no_grad(), exact_kernels():
        logits, err = forward_with_error_bound(net, x, bounds)
        layers = [(layer.normalized_weight(), layer.bias) for layer in (first, second)]
    exact = _exact_logits(layers, x.tolist())
    for i in range(len(x)):
        actual = sum((Fraction(float(v)) - e) ** 2 for v, e in zip(logits[i], exact[i]))
        assert actual <= Fraction(float(err[i])) ** 2
    assert float(err.max()) > 1e-6  # the bound sees the 1e12 activations, not just the O(1) logits


def test_cancelling_biases_never_inflate_a_certificate():
    torch.manual_seed(0)
    first, last = GramLinear(64, 64), GramLinear(64, 2)
    net = nn.Sequential(first, last).eval()
    with torch.no_grad():
        first.bias.fill_(1e6)
        last.bias.copy_(-(last.normalized_weight() @ first.bias))
        w1, w2 = first.normalized_weight().double(), last.normalized_weight().double()
    x = torch.randn(500, 64) * 0.05
    exact = (x.double() @ w1.T + first.bias.double()) @ w2.T + last.bias.double()
    y = exact.argmax(1)
    result = certified_accuracy(net, (x, y), eps=[0.0], progress=False)
    distance = (exact[:, 0] - exact[:, 1]).abs() / (w2[0] - w2[1]).norm()
    assert torch.all(result.radii <= distance)
    assert result.certified[0] > 0.9  # and the allowance still leaves real certificates


def test_exact_kernels_restores_the_settings():
    before = (torch.get_float32_matmul_precision(), torch.backends.cudnn.enabled)
    torch.set_float32_matmul_precision("high")
    try:
        with exact_kernels():
            assert torch.backends.cuda.matmul.fp32_precision == "ieee" and not torch.backends.cudnn.enabled
        assert torch.get_float32_matmul_precision() == "high"
        assert torch.backends.cudnn.enabled == before[1]
    finally:
        torch.set_float32_matmul_precision(before[0])


def test_certification_works_with_precision_set_through_the_new_api():
    """``torch.backends.cuda.matmul.fp32_precision = "tf32"`` (the API torch recommends) made the
    legacy reads of exact_kernels raise 'you have used mix of the legacy and new APIs'. In a
    fresh process: once used, the new API leaves the legacy reads raising for later tests."""
    import subprocess
    import sys

    script = """
import torch
from torch import nn
from lipnet.certify import certified_accuracy
from lipnet.nn import GramConv2d, GramLinear
torch.manual_seed(0)
net = nn.Sequential(GramConv2d(1, 2, 3, padding=1), nn.Flatten(), GramLinear(2 * 4 * 4, 3)).eval()
x, y = torch.rand(6, 1, 4, 4), torch.randint(0, 3, (6,))
expected = certified_accuracy(net, (x, y), eps=[0.1], progress=False).radii
torch.backends.cuda.matmul.fp32_precision = "tf32"
torch.backends.mkldnn.matmul.fp32_precision = "bf16"
radii = certified_accuracy(net, (x, y), eps=[0.1], progress=False).radii
assert torch.backends.cuda.matmul.fp32_precision == "tf32" and torch.backends.mkldnn.matmul.fp32_precision == "bf16"
assert torch.equal(radii, expected), (radii, expected)
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_inputs_must_be_float64_and_bounds_recorded():
    net = nn.Sequential(GramConv2d(1, 2, 3, padding=1)).double().eval()
    with pytest.raises(TypeError, match="float64"):
        forward_with_error_bound(net, torch.zeros(1, 1, 4, 4), {})
    with pytest.raises(ValueError, match="no Lipschitz bound was recorded"):
        forward_with_error_bound(net, torch.zeros(1, 1, 4, 4, dtype=torch.float64), {})


@pytest.mark.parametrize("module, shape", [
    (nn.Conv2d(6, 4, 3, padding=1, groups=2), (6, 5, 5)),
    (nn.Conv2d(3, 4, (2, 3), padding=1, padding_mode="reflect"), (3, 4, 4)),
    (nn.ConvTranspose2d(6, 2, 3, groups=2), (6, 4, 4)),
    (nn.ConvTranspose2d(4, 8, 3, stride=2, padding=1), (4, 3, 3)),
    (nn.Conv1d(5, 2, 4, dilation=2, padding=3), (5, 9)),
], ids=["grouped", "reflect", "transposed-grouped", "transposed-strided", "1d"])
def test_products_per_output_counts_at_least_the_products_of_any_output(module, shape):
    """The number of nonzero entries in a row of the operator (all weights 1: no cancellation), i.e. of
    products summed into that output, is at most products_per_output (a transposed convolution's weight
    is (c_in, c_out / groups, ...): its shape[1] is not the inputs per output)."""
    from lipnet.bounds import affine_map_matrix
    from lipnet.certify.precision import products_per_output

    with torch.no_grad():
        module.weight.fill_(1.0)
        matrix = affine_map_matrix(module.double(), shape)
    assert int((matrix != 0).sum(dim=1).max()) <= products_per_output(module)
