"""Red team of certificates of networks built from lipnet's own modules.

Each bug found is an ``xfail(strict=True)`` test asserting the correct behaviour; the other
tests are attacks that held and that no other test covers.
"""

import math

import pytest
import torch
from torch import nn

from lipnet.certify import LipschitzBoundError, certified_accuracy, lipschitz_bound
from lipnet.nn import (ConvexResidual, GlobalL2NormPool2d, GlobalScaledAvgPool2d, GramConv2d, GramConvTranspose2d,
                       GramLinear, GramResidualConv2d, GroupSort, InputNormalization, L2NormPool2d, MaxMin,
                       ScaledAvgPool2d)
from lipnet.nn.activations import max_min


def _mixed_dtype_convex_residual_model():
    """bf16 layers around a ConvexResidual whose branch has no parameters: its alpha_logit is
    float32 (torch's default dtype), and its forward casts the coefficients to bf16."""
    first = GramLinear(2, 2, bias=False, dtype=torch.bfloat16)
    block = ConvexResidual(MaxMin(), alpha=0.33)
    last = GramLinear(2, 2, bias=False, dtype=torch.bfloat16)
    with torch.no_grad():
        first.weight.copy_(torch.eye(2))
        last.weight.copy_(torch.tensor([[1.0, -0.5], [0.0, 0.0]]))
    return nn.Sequential(first, block, last).eval()


def test_convex_residual_coefficients_are_applied_as_held_and_certified_so():
    """Found by the red team (helper 70): the forward cast float32 coefficients to bfloat16
    activations (0.671875 + 0.330078 = 1.00195), while certification mixed with the float32 ones:
    the model predicted class 1 at a point certified for class 0. The forward now mixes in the
    widest dtype with the coefficients as held, which is what certification computes."""
    model = _mixed_dtype_convex_residual_model()
    block = model[1]
    assert block.alpha_logit.dtype == torch.float32
    keep, alpha = (float(c.detach().double()) for c in block.coefficients())
    w1 = model[0].normalized_weight().detach().double()
    w2 = model[2].normalized_weight().detach().double()
    x = torch.tensor([[0.0078125, 0.6796875]], dtype=torch.bfloat16)  # exactly representable

    h = x.double() @ w1.T
    mixed = keep * h + alpha * max_min(h)
    with torch.no_grad():
        applied = block(h.to(torch.bfloat16))
    torch.testing.assert_close(applied.double(), mixed, rtol=2 ** -8, atol=0)  # the output rounded to bfloat16
    exact = int((mixed @ w2.T).argmax(1))
    result = certified_accuracy(model, (x.float(), torch.tensor([exact])), eps=[0.0], progress=False)
    assert float(result.radii[0]) > 0  # the label the model in exact arithmetic predicts
    result = certified_accuracy(model, (x.float(), torch.tensor([1 - exact])), eps=[0.0], progress=False)
    assert float(result.radii[0]) == 0
    jacobian_norm = float(torch.linalg.matrix_norm(w2 @ ((keep + alpha) * w1), 2))
    assert lipschitz_bound(model, (2,)) >= jacobian_norm and result.lipschitz >= jacobian_norm


def test_a_compiled_model_is_certified_as_the_compiled_forward_computes():
    """On the CPU an eager Gram bound refines every frequency whose screened bound exceeds the
    candidates' maximum, a compiled one does not (lipnet.bounds.gram.refines_exceeding): for a flat
    spectrum the compiled convolution applies W / 1.0089 ||W||. certified_accuracy(compiled) certifies
    the eager module inside, so a point it certifies is misclassified by the model it was given."""
    conv = GramConv2d(16, 16, 3, padding=1, dtype=torch.float64)
    last = GramLinear(16 * 6 * 6, 2, dtype=torch.float64)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[:, :, 1, 1] = torch.diag(torch.linspace(1, 0.85, 16, dtype=torch.float64))
        conv.bias.zero_()
        last.weight.copy_(torch.linspace(-1, 1, 2 * 576, dtype=torch.float64).view(2, 576))
        last.bias.copy_(torch.tensor([-1.0, 0.0], dtype=torch.float64))
    model = nn.Sequential(conv, nn.Flatten(), last).eval()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    origin = torch.zeros(1, 16, 6, 6, dtype=torch.float64, requires_grad=True)
    logits = model(origin)
    (direction,) = torch.autograd.grad(logits[0, 0] - logits[0, 1], origin)
    # the eager margin is 1e-3 at x (the model is affine: margin -1 at 0, slope |direction|)
    x = ((1e-3 + 1.0) * direction / direction.norm() ** 2).detach()
    with torch.no_grad():
        applied = compiled(x)
    assert applied[0, 0] - applied[0, 1] < -5e-3  # the compiled model predicts class 1 at x itself
    result = certified_accuracy(compiled, (x, torch.tensor([0])), eps=[1e-6], progress=False)
    assert result.certified == (0.0,)  # currently 1.0: radius 7e-4 for class 0


def test_the_bound_of_a_compiled_bfloat16_layer_covers_the_weight_it_applies():
    """A bfloat16 Gram layer rounds its quotient and, eagerly, rescales it until its bound is <= 1
    (GramNormalized._divide); compiled, can_check_values is False and the rounded quotient is
    applied as it is. lipschitz_bound(compiled) bounds the eager module inside: 0.99506, below the
    exact norm 1.00129 of the weight the compiled layer applies (read off its outputs on the basis)."""
    torch.manual_seed(0)
    layer = GramLinear(64, 64, bias=False, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        layer.weight.copy_(torch.linalg.qr(torch.randn(64, 64, dtype=torch.float64))[0])
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    with torch.no_grad():  # each output on a basis vector is one product: exact in bfloat16
        applied = compiled(torch.eye(64, dtype=torch.bfloat16)).double().T
    exact = float(torch.linalg.matrix_norm(applied, 2))
    assert exact > 1.001
    with pytest.raises(LipschitzBoundError, match="compiled .* bfloat16"):  # refused, naming what to certify
        lipschitz_bound(compiled, (64,))
    with torch.no_grad():  # the layer inside applies the checked weight, which its bound covers
        eager = float(torch.linalg.matrix_norm(layer(torch.eye(64, dtype=torch.bfloat16)).double().T, 2))
    assert eager <= lipschitz_bound(compiled._orig_mod, (64,)) <= 1 + 1e-5


# ----------------------------------------------------------------------------- attacks that held


def _jacobian(model, x):
    shape = x.shape[1:]
    return torch.autograd.functional.jacobian(lambda z: model(z.view(1, *shape)).flatten(), x.flatten(),
                                              create_graph=torch.is_grad_enabled())


_UNUSUAL_NETWORKS = {
    # a strided convolution whose zero padding exceeds its kernel, then a non-square global pool
    "padding_beyond_kernel": (lambda: nn.Sequential(
        GramConv2d(2, 4, 2, stride=3, padding=3), MaxMin(), GlobalScaledAvgPool2d(), nn.Flatten(), GramLinear(4, 3)),
        (2, 5, 7)),
    # a transposed convolution with dilation above its stride and an output padding, then L2-norm pooling
    "dilated_transpose": (lambda: nn.Sequential(
        GramConvTranspose2d(3, 2, 3, stride=2, padding=2, output_padding=1, dilation=2), MaxMin(dim=-1),
        L2NormPool2d(2, padding=1), nn.Flatten(), GramLinear(32, 3)), (3, 3, 3)),
    # grouped circular and replicate residual convolutions, a convex residual around a 1-D convolution's
    # neighbour, scaled average pooling and GroupSort along the height
    "residual_mix": (lambda: nn.Sequential(
        GramResidualConv2d(4, 3, groups=2, padding_mode="circular"), GroupSort(2, dim=2),
        ConvexResidual(nn.Sequential(GramResidualConv2d(4, 2, padding_mode="replicate"), MaxMin()), alpha=0.8),
        ScaledAvgPool2d((1, 2), stride=(1, 1)), nn.Flatten(), GramLinear(4 * 4 * 4, 4)), (4, 4, 5)),
}


@pytest.mark.parametrize("name", sorted(_UNUSUAL_NETWORKS))
def test_weights_trained_to_maximize_the_jacobian_stay_below_the_certificate(name):
    """Gradient ascent on every parameter (mixing weight included) of the norm of the exact float64
    Jacobian at a point, for unusual geometries in one network: the certified bound stays above
    the norm of the Jacobian (computed exactly by an SVD) of the model as it then applies."""
    make, shape = _UNUSUAL_NETWORKS[name]
    torch.manual_seed(0)
    model = make().double()
    x = torch.randn(1, *shape, dtype=torch.float64)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-2)
    for _ in range(40):
        model.train()
        loss = -torch.linalg.matrix_norm(_jacobian(model, x), 2)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    bound = lipschitz_bound(model, shape)
    with torch.no_grad():
        exact = float(torch.linalg.matrix_norm(_jacobian(model, x), 2))
    assert 0.5 < exact <= bound


@pytest.mark.parametrize("settings", [
    # output padding 2 >= stride 2, allowed by a dilation of 3: the adjoint convolution on the output size
    # has more outputs than the transposed convolution's input
    dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 0), output_padding=(2, 0), dilation=(3, 1), groups=2),
    dict(kernel_size=4, stride=3, padding=3, output_padding=1, dilation=1, groups=1),
])
def test_a_transposed_convolution_trained_to_its_largest_norm_stays_below_its_certificate(settings):
    """Ascent on the weight of the exact norm of a transposed convolution (dense Jacobian) on a tiny
    input: the certified bound of the layer stays above the exact norm of what it then applies."""
    torch.manual_seed(1)
    layer = GramConvTranspose2d(2, 4, **settings, dtype=torch.float64)
    x = torch.randn(1, 2, 3, 2, dtype=torch.float64)
    optimizer = torch.optim.Adam(layer.parameters(), lr=5e-2)
    for _ in range(30):
        layer.train()
        loss = -torch.linalg.matrix_norm(_jacobian(layer, x), 2)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    layer.eval()
    with torch.no_grad():
        exact = float(torch.linalg.matrix_norm(_jacobian(layer, x), 2))
    bound = lipschitz_bound(layer, (2, 3, 2))
    assert 0.9 < exact <= bound <= 1 + 1e-5


def test_pgd_on_the_float64_model_finds_no_counterexample_within_the_certified_radius():
    """A small LiResNet from build_model with perturbed (non-orthogonal) weights and non-identity residual
    branches, certified on random inputs; projected gradient descent on the margin of its float64
    copy, inside 0.999 of each certified radius, never changes a certified prediction."""
    from lipnet.certify.precision import float64_copy
    from lipnet.models import build_model

    torch.manual_seed(0)
    model = build_model("liresnet", in_channels=1, num_classes=3, input_size=8, width=4, depth=2, stem_stride=1,
                        neck_stride=4, dense=[8])
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.5 * torch.randn_like(parameter))
    model.eval()
    x = torch.rand(32, 1, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(1)
    result = certified_accuracy(model, (x, y), eps=[0.0], progress=False)
    radii = result.radii.view(-1, 1, 1, 1)
    assert result.certified[0] == 1.0
    twin = float64_copy(model).eval()
    rows = torch.arange(len(y))
    delta = torch.zeros_like(x, dtype=torch.float64, requires_grad=True)
    for _ in range(30):
        logits = twin(x.double() + delta)
        others = logits.masked_fill(nn.functional.one_hot(y, 3).bool(), -math.inf)
        margin = logits[rows, y] - others.amax(1)
        (grad,) = torch.autograd.grad(margin.sum(), delta)
        with torch.no_grad():
            delta -= 0.2 * radii * grad / grad.flatten(1).norm(dim=1).clamp_min(1e-30).view(-1, 1, 1, 1)
            norms = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1).clamp_min(1e-30)
            delta *= (0.999 * radii / norms).clamp(max=1.0)
    with torch.no_grad():
        assert bool((twin(x.double() + delta).argmax(1) == y).all())


@pytest.mark.parametrize("pool", [GlobalL2NormPool2d, GlobalScaledAvgPool2d])
def test_extreme_stds_odd_activation_axes_and_non_square_global_pools(pool):
    """Input normalization with stds 1e-3 and 1e3, GroupSort in groups of 3 along the width and MaxMin
    along the height, a global pool over a 2 x 6 map: the certified bound (about 1000, the gain of
    the smaller std) stays above the exact Jacobian norm at random points."""
    torch.manual_seed(0)
    model = nn.Sequential(InputNormalization([0.5, -3.0], [1e-3, 1e3]), GramConv2d(2, 4, (1, 3), padding=(0, 1)),
                          GroupSort(3, dim=-1), MaxMin(dim=-2), pool(), nn.Flatten(), GramLinear(4, 3)).double()
    bound = lipschitz_bound(model, (2, 2, 6))
    assert 999 < bound < 1000 * (1 + 1e-4)
    with torch.no_grad():
        norms = [float(torch.linalg.matrix_norm(_jacobian(model, torch.randn(1, 2, 2, 6, dtype=torch.float64)), 2))
                 for _ in range(20)]
    assert 300 < max(norms) <= bound
