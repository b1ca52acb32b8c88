"""The certification's float64 pass and radii against the networks' logits in exact arithmetic.

:func:`lipnet.certify.certified_accuracy` claims radii that hold for the model in exact
arithmetic on the weights it applies: it evaluates a float64 copy
(:func:`~lipnet.certify.precision.float64_copy`) and subtracts a proven bound on that pass's
rounding (:func:`~lipnet.certify.precision.forward_with_error_bound`). Here the exact logits of
small networks are computed with :class:`fractions.Fraction` (every float64 is a rational):

* linear layers as ``W x + b`` (``GramLinear``: the weight it applies);
* convolutions (every padding mode, strided, dilated, grouped, transposed, 1-d) as ``A x + b``,
  ``A`` assembled tap by tap from the layer run with a one-hot weight on the identity (integer
  counts, exact);
* weight-free linear maps (pooling averages, nearest upsampling, padding, reshapes) from their
  run on the identity, entries rationalized (``1/9`` from its float64);
* order-based maps (ReLU, MaxMin, GroupSort, max pooling) from their run on the ranks of the
  exact values (0 kept at rank 0): each output is one of the inputs or 0;
* BatchNorm with ``running_var + eps`` a square of a rational, input normalization and convex
  residual blocks by their formulas.

Each case asserts ``||float64 logits - exact||^2 <= err^2`` and that every certified radius
``r`` satisfies ``(f_y - f_j)^2 >= 2 r^2 L^2`` (generic form) or ``>= r^2 L_body^2 ||w_y - w_j||^2``
(last-layer form) for the exact logits, with ``f_y - f_j > 0``.
"""

import copy
import math
import random
from fractions import Fraction

import pytest
import torch
from torch import nn

from lipnet.certify import LipschitzBoundError, certified_accuracy
from lipnet.certify.accuracy import ExactLogits
from lipnet.certify.precision import UpsampleAsApplied, exact_kernels, float64_copy, forward_with_error_bound
from lipnet.nn import ConvexResidual, GramConv1d, GramConv2d, GramConvTranspose2d, GramLinear, GramResidualConv2d, \
    GroupSort, InputNormalization, MaxMin
from lipnet.nn.normalized import GramNormalized

ORDER_BASED = (nn.ReLU, MaxMin, GroupSort, nn.MaxPool1d, nn.MaxPool2d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool1d)
WEIGHT_FREE = (nn.Flatten, nn.Unflatten, nn.Identity, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Upsample,
               UpsampleAsApplied, nn.ZeroPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d, nn.CircularPad2d, nn.PixelShuffle)


# ---------------------------------------------------------------------------------------------
# Exact evaluation
# ---------------------------------------------------------------------------------------------

def out_shape(module, shape):
    with torch.no_grad():
        return tuple(module(torch.zeros((1, *shape), dtype=torch.float64)).shape[1:])


def exact_forward(module, xs, shape):
    """``(ys, out_shape)``: the exact outputs of ``module`` (float64, eval mode) for the examples
    ``xs`` (lists of Fractions, one flattened input of ``shape`` each)."""
    if isinstance(module, nn.Sequential):
        for child in module:
            xs, shape = exact_forward(child, xs, shape)
        return xs, shape
    if isinstance(module, ConvexResidual):
        keep, alpha = (Fraction(float(c)) for c in module.coefficients())
        outs, _ = exact_forward(module.branch, xs, shape)
        return [[keep * h + alpha * o for h, o in zip(x, out)] for x, out in zip(xs, outs)], shape
    if isinstance(module, ORDER_BASED):
        return order_based(module, xs, shape), out_shape(module, shape)
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return batch_norm(module, xs, shape), shape
    if isinstance(module, InputNormalization):
        mean, std = ([Fraction(float(v)) for v in t.flatten()] for t in (module.mean, module.std))
        per = math.prod(shape[1:])
        return [[(v - mean[i // per]) / std[i // per] for i, v in enumerate(x)] for x in xs], shape
    if isinstance(module, WEIGHT_FREE):
        matrix, bias, new_shape = weight_free_matrix(module, shape)
    elif isinstance(module, nn.Linear):
        with torch.no_grad():
            weight = module.normalized_weight() if isinstance(module, GramNormalized) else module.weight
        matrix = fractions_of(weight)
        bias = [Fraction(0)] * len(matrix) if module.bias is None else [Fraction(v) for v in module.bias.tolist()]
        new_shape = (len(matrix),)
    elif isinstance(module, nn.modules.conv._ConvNd):
        matrix, bias, new_shape = weighted_matrix(module, shape)
    else:
        raise NotImplementedError(type(module).__name__)
    return [[b + sum((a * v for a, v in zip(row, x) if a), Fraction(0)) for row, b in zip(matrix, bias)]
            for x in xs], new_shape


def order_based(module, xs, shape):
    """Run ``module`` on the ranks of the exact values (0 at rank 0) and map the ranks back."""
    outs = []
    for x in xs:
        values = sorted(set(x) | {Fraction(0)})
        zero = values.index(Fraction(0))
        rank = {v: i - zero for i, v in enumerate(values)}
        keys = torch.tensor([float(rank[v]) for v in x], dtype=torch.float64).reshape(1, *shape)
        with torch.no_grad():
            out = module(keys).flatten().tolist()
        assert all(o == int(o) for o in out)
        outs.append([values[int(o) + zero] for o in out])
    return outs


def batch_norm(module, xs, shape):
    eps = Fraction(float(module.eps))
    stats = [[Fraction(float(v)) for v in t.detach().flatten()]
             for t in (module.running_mean, module.running_var, module.weight, module.bias)]
    scales = []
    for var, gamma in zip(stats[1], stats[2]):
        root = rational_sqrt(var + eps)
        scales.append(gamma / root)
    per = math.prod(shape[1:])
    return [[(v - stats[0][i // per]) * scales[i // per] + stats[3][i // per] for i, v in enumerate(x)] for x in xs]


def rational_sqrt(q: Fraction) -> Fraction:
    num, den = math.isqrt(q.numerator), math.isqrt(q.denominator)
    assert Fraction(num, den) ** 2 == q, f"{q} is not a square: choose running_var + eps a square"
    return Fraction(num, den)


def identity_batch(shape):
    n = math.prod(shape)
    return torch.eye(n, dtype=torch.float64).reshape(n, *shape)


def weight_free_matrix(module, shape):
    with torch.no_grad():
        columns = module(identity_batch(shape))
    new_shape = tuple(columns.shape[1:])
    columns = columns.flatten(1).tolist()
    matrix = []
    for o in range(len(columns[0])):
        row = []
        for column in columns:
            q = Fraction(column[o]).limit_denominator(4096)
            assert abs(Fraction(column[o]) - q) <= abs(q) * Fraction(1, 2**50)
            row.append(q)
        matrix.append(row)
    return matrix, [Fraction(0)] * len(matrix), new_shape


def weighted_matrix(module, shape):
    """``(A, b, out_shape)`` of a layer applying a weight: ``A = sum_t W_t C_t`` from runs with one-hot weights."""
    probe = copy.deepcopy(module)
    current = {}
    if isinstance(module, GramNormalized):
        applied = module.normalized_weight

        def spy(*args, **kwargs):
            current["weight"] = applied(*args, **kwargs)
            return current["weight"]

        probe.normalized_weight = spy
        with torch.no_grad():
            probe(torch.zeros((1, *shape), dtype=torch.float64))
        weight = current["weight"].detach().double().clone()
        probe.normalized_weight = lambda *args, **kwargs: current["weight"]
    else:
        weight = module.weight.detach().double().clone()

    def run(w, x):
        current["weight"] = w
        if not isinstance(module, GramNormalized):
            probe.weight.data = w
        with torch.no_grad():
            return probe(x)

    eye = identity_batch(shape)
    bias_out = run(torch.zeros_like(weight), torch.zeros((1, *shape), dtype=torch.float64))
    new_shape = tuple(bias_out.shape[1:])
    bias = [Fraction(v) for v in bias_out.flatten().tolist()]
    if probe.bias is not None:  # the counts below would be lost next to a large bias
        probe.bias.data.zero_()
    base = run(torch.zeros_like(weight), eye).flatten(1)
    n_in, n_out = base.shape
    matrix = [[Fraction(base[i, o].item()) for i in range(n_in)] for o in range(n_out)]
    flat = weight.flatten()
    for t in torch.nonzero(flat).flatten().tolist():
        onehot = torch.zeros_like(flat)
        onehot[t] = 1.0
        counts = run(onehot.reshape(weight.shape), eye).flatten(1) - base
        assert bool((counts == counts.round()).all())
        w = Fraction(flat[t].item())
        for i, o in torch.nonzero(counts).tolist():
            matrix[o][i] += w * int(counts[i, o].item())
    return matrix, bias, new_shape


# ---------------------------------------------------------------------------------------------
# The checks
# ---------------------------------------------------------------------------------------------

def fractions_of(x):
    return [[Fraction(v) for v in row] for row in x.flatten(1).tolist()]


def check_error_bound(model, x):
    """``||logits - exact||^2 <= err^2`` per example for the float64 pass of ``model`` on ``x``; returns ``err``."""
    x = x.double()
    with exact_kernels(), torch.no_grad():
        certification = ExactLogits(model)
        certification(x)  # records the bounds (a plain nn.Linear head: its Gram bound)
        twin = certification.model
        logits, err = forward_with_error_bound(twin, x, certification.bounds["modules"])
    exact, _ = exact_forward(twin, fractions_of(x), tuple(x.shape[1:]))
    for computed, reference, e in zip(fractions_of(logits), exact, err.tolist()):
        distance = sum((c - r) ** 2 for c, r in zip(computed, reference))
        assert distance <= Fraction(e) ** 2, (float(distance) ** 0.5, e)
    return err


def check_radii(model, x, labels, last_layer="auto"):
    """Every radius of :func:`certified_accuracy` holds for the exact logits; returns the result."""
    result = certified_accuracy(model, (x, labels), eps=[0.0], last_layer=last_layer, progress=False)
    twin = float64_copy(model).eval()
    exact, _ = exact_forward(twin, fractions_of(x.double()), tuple(x.shape[1:]))
    head = None
    if result.body_lipschitz is not None:
        last = twin[-1]
        with torch.no_grad():
            weight = last.normalized_weight() if isinstance(last, GramNormalized) else last.weight
        head = fractions_of(weight)
    for f, label, radius in zip(exact, labels.tolist(), result.radii.tolist()):
        if radius == 0:
            continue
        r = Fraction(radius)
        for j in range(len(f)):
            if j == label:
                continue
            margin = f[label] - f[j]
            assert margin > 0, f"radius {radius} for label {label}, but the exact logits {[float(v) for v in f]}"
            if head is None:
                assert margin ** 2 >= 2 * r ** 2 * Fraction(result.lipschitz) ** 2
            else:
                distance = sum((a - b) ** 2 for a, b in zip(head[label], head[j]))
                assert margin ** 2 >= r ** 2 * Fraction(result.body_lipschitz) ** 2 * distance
    return result


def exact_labels(model, x):
    """The exact prediction of each example, and the runner-up (to ask for a label it does not have)."""
    twin = float64_copy(model).eval()
    exact, _ = exact_forward(twin, fractions_of(x.double()), tuple(x.shape[1:]))
    order = [sorted(range(len(f)), key=lambda j: f[j], reverse=True) for f in exact]
    return torch.tensor([o[0] for o in order]), torch.tensor([o[1] for o in order])


# ---------------------------------------------------------------------------------------------
# Builders (float64 networks with adversarial scales)
# ---------------------------------------------------------------------------------------------

def batch_norm_module(rng, channels, dims=1, scale_exponent=0):
    """BatchNorm in eval mode with ``running_var + eps`` squares of dyadic rationals."""
    bn = (nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d)(channels, eps=0.25).double().eval()
    roots = [rng.choice([0.75, 1.5, 2.5, 3.0]) * 2.0 ** rng.randint(0, 3) for _ in range(channels)]
    with torch.no_grad():
        bn.running_var.copy_(torch.tensor([r * r - 0.25 for r in roots]))
        bn.running_mean.copy_(torch.tensor([rng.uniform(-4, 4) * 2.0 ** rng.randint(-2, 20) for _ in roots]))
        bn.weight.copy_(torch.tensor([rng.uniform(-2, 2) * 2.0 ** scale_exponent for _ in roots]))
        bn.bias.copy_(torch.tensor([rng.uniform(-4, 4) * 2.0 ** rng.randint(-2, 20) for _ in roots]))
    return bn


def cancel_biases(model, x):
    """Set the bias of every layer that has one so that its output on ``x[0]`` is about 0
    (``b = -W h``): outputs tiny next to ``|W h|`` and ``|b|``, the rounding bound's worst case."""
    h = x[:1].double()
    for module in model:
        if isinstance(module, nn.Linear | nn.modules.conv._ConvNd) and module.bias is not None:
            with torch.no_grad():
                module.bias.zero_()
                out = module(h)
                dims = [0] + list(range(2, out.dim()))
                module.bias.copy_(-out.mean(dim=dims) + 1e-9 * torch.randn_like(module.bias))
        with torch.no_grad():
            h = module(h)


def mlp_case(seed):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    width = rng.choice([2, 4, 4, 8, 32])
    depth = rng.randint(1, 8 if width <= 8 else 3)
    n_in = rng.choice([3, 6, 16])
    layers = [InputNormalization([rng.uniform(-1e6, 1e6)], [2.0 ** rng.randint(-12, 4)]), nn.Flatten()]
    features = n_in
    for _ in range(depth):
        layers.append(GramLinear(features, width))
        features = width
        kind = rng.choice(["maxmin", "relu", "groupsort", "bn", "residual"])
        if kind == "maxmin":
            layers.append(MaxMin())
        elif kind == "relu":
            layers.append(nn.ReLU())
        elif kind == "groupsort":
            layers.append(GroupSort(2 if width % 4 else 4))
        elif kind == "bn":
            layers.append(batch_norm_module(rng, width, scale_exponent=rng.randint(-4, 30)))
        else:
            layers.append(ConvexResidual(nn.Sequential(GramLinear(width, width), MaxMin()), alpha=rng.random()))
    classes = rng.choice([2, 3, 5])
    head = GramLinear(features, classes) if rng.random() < 0.5 else nn.Linear(features, classes)
    if isinstance(head, nn.Linear) and not isinstance(head, GramLinear):
        with torch.no_grad():
            head.weight.mul_(2.0 ** rng.randint(-20, 40))
    model = nn.Sequential(*layers, head).double().eval()
    magnitude = rng.choice([0.0, 1e-300, 1e-5, 1.0, 1e6, 1e150])
    x = (torch.randn(3, 1, n_in, dtype=torch.float64) * magnitude + model[0].mean.item())
    if rng.random() < 0.3:
        x[1] = x[0]  # ties in every order-based activation: two equal examples
        x[2] = x[0] + 2.0 ** -30 * x[0].abs().max()
    if rng.random() < 0.7:
        cancel_biases(model, x)
    return model, x


def conv_case(seed):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    size = rng.choice([1, 2, 3, 4])
    mode = rng.choice(["zeros", "reflect", "replicate", "circular"])
    kernel = rng.choice([1, 2, 3, 5])
    if mode == "reflect":
        kernel = min(kernel, 2 * size - 1 if size > 1 else 1)
    if mode == "circular":
        kernel = min(kernel, 2 * size + 1)
    pad = kernel // 2
    c = rng.choice([2, 4])
    groups = rng.choice([1, 2])
    layers = [GramConv2d(2, c, kernel, padding=pad, padding_mode=mode, groups=groups,
                         dilation=rng.choice([1, 1, 2]) if mode == "zeros" else 1), MaxMin()]
    spatial = out_shape(layers[0].double(), (2, size, size))
    shape = (c, *spatial[1:])
    extra = rng.choice(["transpose", "pool", "maxpool", "adaptive", "upsample", "bn", "stride"])
    if extra == "transpose":
        layers += [GramConvTranspose2d(c, 2, 2, stride=2), nn.ReLU()]
    elif extra == "pool" and min(shape[1:]) >= 2:
        layers.append(nn.AvgPool2d(2, stride=1))
    elif extra == "maxpool" and min(shape[1:]) >= 2:
        layers.append(nn.MaxPool2d(2, stride=1))
    elif extra == "adaptive":
        layers.append(nn.AdaptiveAvgPool2d(1))
    elif extra == "upsample":
        layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
    elif extra == "bn":
        layers.append(batch_norm_module(rng, c, dims=2, scale_exponent=rng.randint(0, 20)))
    else:
        layers += [GramConv2d(c, c, 3, stride=2, padding=1), GroupSort(2)]
    body = nn.Sequential(*layers).double()
    features = math.prod(out_shape(body, (2, size, size)))
    model = nn.Sequential(*layers, nn.Flatten(), GramLinear(features, 3)).double().eval()
    magnitude = rng.choice([0.0, 1e-300, 1.0, 1e100])
    x = torch.randn(3, 2, size, size, dtype=torch.float64) * magnitude
    if rng.random() < 0.6:
        cancel_biases(model, x)
    return model, x


def conv1d_case(seed):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    length = rng.choice([1, 2, 5])
    mode = rng.choice(["zeros", "replicate", "circular", "reflect"])
    kernel = rng.choice([1, 3, 5])
    if mode == "reflect":
        kernel = min(kernel, 2 * length - 1)
    if mode == "circular":
        kernel = min(kernel, 2 * length + 1)
    layers = [GramConv1d(2, 4, kernel, padding=kernel // 2, padding_mode=mode), MaxMin()]
    if length >= 2:
        layers.append(nn.AvgPool1d(2, stride=1))
    body = nn.Sequential(*layers).double()
    features = math.prod(out_shape(body, (2, length)))
    model = nn.Sequential(*layers, nn.Flatten(), nn.Linear(features, 4)).double().eval()
    with torch.no_grad():
        model[-1].weight.mul_(2.0 ** rng.randint(-10, 60))
    x = torch.randn(4, 2, length, dtype=torch.float64) * rng.choice([1e-200, 1.0, 1e120])
    cancel_biases(model, x)
    return model, x


def copy_padding_case(seed):
    """Padding that copies on inputs at most the kernel's size (taps reading one sample several times),
    strided and dilated, a residual convolution, Unflatten and adaptive max pooling."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    size = rng.choice([1, 2, 3])
    mode = rng.choice(["replicate", "circular", "reflect"] if size > 1 else ["replicate", "circular"])
    kernel = 3
    dilation = rng.choice([1, 2]) if mode == "replicate" else 1
    pad = dilation
    if mode == "reflect":
        pad = min(pad, size - 1)
    if mode == "circular":
        pad = min(pad, size)
    layers = [GramConv2d(2, 4, kernel, padding=pad, dilation=dilation, padding_mode=mode,
                         stride=rng.choice([1, 2])), GroupSort(2)]
    shape = out_shape(nn.Sequential(*layers).double(), (2, size, size))
    layers += [GramResidualConv2d(4, 3, padding_mode=rng.choice(["zeros", "replicate", "circular"])), MaxMin()]
    layers += [nn.Flatten(), nn.Unflatten(1, shape), nn.AdaptiveMaxPool2d(1), nn.Flatten(), GramLinear(4, 3)]
    model = nn.Sequential(*layers).double().eval()
    x = torch.randn(3, 2, size, size, dtype=torch.float64) * rng.choice([1e-3, 1.0, 1e200])
    cancel_biases(model, x)
    return model, x


def deep_or_wide_case(seed):
    """A stack of 40 layers of width 2 (MaxMin, BatchNorm gains up to 2^8, cancelling biases), or one
    GramLinear of width 192 (``K = 193`` in the rounding bound) between large cancelling biases."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    if seed % 2:
        layers = [GramLinear(192, 192), MaxMin(), GramLinear(192, 3)]
        x = torch.randn(2, 192, dtype=torch.float64) * 1e3
    else:
        layers = []
        for _ in range(20):
            layers += [GramLinear(2, 2), MaxMin() if rng.random() < 0.5 else nn.ReLU()]
            if rng.random() < 0.4:
                layers.append(batch_norm_module(rng, 2, scale_exponent=rng.randint(0, 8)))
        layers.append(GramLinear(2, 2))
        x = torch.randn(3, 2, dtype=torch.float64)
    model = nn.Sequential(*layers).double().eval()
    cancel_biases(model, x)
    return model, x


CASES = [(builder, seed) for builder in (mlp_case, conv_case, conv1d_case, copy_padding_case) for seed in range(14)]
CASES += [(deep_or_wide_case, seed) for seed in range(4)]


@pytest.mark.parametrize("builder, seed", CASES, ids=[f"{b.__name__}-{s}" for b, s in CASES])
def test_error_bound_and_radii_hold_in_exact_arithmetic(builder, seed):
    model, x = builder(seed)
    err = check_error_bound(model, x)
    assert bool(torch.isfinite(err).all())
    right, wrong = exact_labels(model, x)
    check_radii(model, x, right)
    result = check_radii(model, x, wrong)
    assert bool((result.radii == 0).all())  # a label the exact model does not predict is never certified
    if isinstance(model[-1], GramLinear):  # (a plain nn.Linear has a bound only as the last layer)
        check_radii(model, x, right, last_layer="none")


# ---------------------------------------------------------------------------------------------
# Underflow: products below the smallest normal float have an absolute, not relative, error
# ---------------------------------------------------------------------------------------------

def underflow_network(n=4096):
    """``x -> s <w, x> -> (y_0, y_1)``: ``<w, x>`` of products ``2^-1070 / 64`` that each round to 0, scaled
    by ``s = 2^1016`` (BatchNorm) into the last layer, whose biases put the exact decision just past the
    computed one."""
    gram = GramLinear(n, 1, bias=False).double()
    with torch.no_grad():
        gram.weight.fill_(1.0)
    bn = nn.BatchNorm1d(1, eps=0.25).double()
    with torch.no_grad():
        bn.running_mean.zero_()
        bn.running_var.fill_(0.75)  # s = gamma / sqrt(0.75 + 0.25) = gamma
        bn.weight.fill_(2.0 ** 1016)
        bn.bias.zero_()
    head = nn.Linear(1, 2).double()
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[-1.0], [1.0]]))
        head.bias.copy_(torch.tensor([1.5 * 2.0 ** -48, 0.0]))
    return nn.Sequential(gram, bn, head).eval(), torch.full((1, n), 2.0 ** -1070, dtype=torch.float64)


def test_underflowing_products_are_in_the_error_bound():
    """Every product ``w x_i`` (``w = 2^-6``, ``x_i = 2^-1070``) underflows to 0: the float64 logits are
    ``(1.5 2^-48, 0)``, the exact ones ``(1.5 2^-48 - 2^-48, 2^-48)`` with ``2^-48 = 4096 * 2^-1076 * 2^1016``
    (up to the Gram bound's margin). The relative model of rounding saw no error at all (every norm in its
    bound underflows), and class 0 was certified at radius 3e-321 although the exact model predicts class 1."""
    model, x = underflow_network()
    err = check_error_bound(model, x)
    assert float(err[0]) >= 2.0 ** -49
    right, wrong = exact_labels(model, x)
    assert (int(right), int(wrong)) == (1, 0)
    with torch.no_grad():
        assert int(model(x).argmax()) == 0  # the float64 pass predicts the other class
    result = check_radii(model, x, wrong)
    assert float(result.radii[0]) == 0.0


def test_underflowing_convex_residual_mix_is_in_the_error_bound():
    """``(1 - a) h + a g(h)`` with ``a = 2^-40`` and ``h_i = 3 2^-1036``: both products round by a quarter of
    the smallest subnormal, in the same direction (``g`` negates), and the relative model of the block's
    own three roundings covers ``2^-11`` of that."""
    n = 64
    branch = GramLinear(n, n, bias=False).double()
    with torch.no_grad():
        branch.weight.copy_(-torch.eye(n, dtype=torch.float64))
    block = ConvexResidual(branch, alpha=2.0 ** -40, learnable=False).double().eval()
    keep, alpha = (float(c) for c in block.coefficients())
    assert alpha == 2.0 ** -40 and keep == 1 - 2.0 ** -40
    x = torch.full((1, n), 3 * 2.0 ** -1036, dtype=torch.float64)
    check_error_bound(block, x)


# ---------------------------------------------------------------------------------------------
# Non-finite intermediates, dtypes, modes, hooks, devices
# ---------------------------------------------------------------------------------------------

def overflowing_network():
    """BatchNorm scales by ``+-2^1000``: inputs of size 1e10 overflow to ``+-inf``, and a ReLU maps ``-inf`` to 0."""
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(2, eps=0.25).double()
    with torch.no_grad():
        bn.running_mean.zero_()
        bn.running_var.fill_(0.75)
        bn.weight.copy_(torch.tensor([2.0 ** 1000, -(2.0 ** 1000)], dtype=torch.float64))
        bn.bias.zero_()
    return nn.Sequential(GramLinear(4, 2), bn, nn.ReLU(), GramLinear(2, 3)).double().eval()


def test_an_overflow_inside_the_network_certifies_nothing():
    """The logits of an example whose hidden values are ``-inf`` (then 0 after the ReLU) are finite, and
    the float64 pass predicts a class; its error bound is infinite, so its radius is 0. Logits that are
    themselves infinite or NaN are refused."""
    model = overflowing_network()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, dtype=torch.float64, generator=gen) * 1e10
    with torch.no_grad():
        hidden, logits = model[:2](x), model(x)
    finite = [i for i in range(len(x)) if bool((hidden[i] == -math.inf).all())]
    assert finite and bool(torch.isfinite(logits[finite]).all())
    result = certified_accuracy(model, (x[finite], logits[finite].argmax(dim=1)), eps=[0.0], progress=False)
    assert bool(result.correct.all()) and bool((result.radii == 0).all())
    with pytest.raises(ValueError, match="NaN or inf"):
        certified_accuracy(model, (x, logits.argmax(dim=1)), eps=[0.0], progress=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_radii_of_low_precision_models_hold_for_their_applied_weights(dtype):
    """A model in ``dtype`` is certified on its inputs cast to ``dtype`` (what it sees), for the function its
    weights define exactly (Gram layers: the normalized weights it applies, rounded in ``dtype``)."""
    for seed in range(4):
        model, x = conv_case(seed)
        model = model.to(dtype)
        x = (x / x.abs().max().clamp_min(1e-30)).to(dtype)  # inputs the dtype can hold
        right, wrong = exact_labels(model, x)
        check_radii(model, x, right)
        assert bool((check_radii(model, x, wrong).radii == 0).all())


def test_training_mode_and_gradients_do_not_change_the_certificate():
    """A model in training mode with parameters that require grad is certified as in eval mode (BatchNorm
    with its running statistics), and left in training mode without gradients accumulated."""
    model, x = mlp_case(3)
    labels, _ = exact_labels(model, x)
    expected = certified_accuracy(model, (x, labels), eps=[0.0], progress=False).radii
    model.train()
    assert any(p.requires_grad for p in model.parameters())
    result = check_radii(model, x, labels)
    assert torch.equal(result.radii, expected)
    assert model.training and all(p.grad is None for p in model.parameters())


def test_hooks_and_meta_tensors_are_refused():
    model, x = mlp_case(3)
    labels, _ = exact_labels(model, x)
    # The refusal is lipnet's, naming the module and its hooks: pytest.raises(Exception, match="hook")
    # also passed for any error that mentions a hook (torch's own hook machinery failing, say).
    handle = model[2].register_forward_hook(lambda module, inputs, output: 4 * output)
    with pytest.raises(LipschitzBoundError, match="GramLinear has forward hooks"):
        certified_accuracy(model, (x, labels), eps=[0.0], progress=False)
    handle.remove()
    handle = model[2].register_forward_pre_hook(lambda module, inputs: (4 * inputs[0],))
    with pytest.raises(LipschitzBoundError, match="GramLinear has forward hooks"):
        certified_accuracy(model, (x, labels), eps=[0.0], progress=False)
    handle.remove()
    meta = nn.Sequential(nn.Flatten(), GramLinear(x[0].numel(), 3)).to("meta")
    for data in (x, x.to("meta")):  # it failed deep in the Gram bound: "Tensor.item() cannot be called on meta tensors"
        with pytest.raises(ValueError, match="meta device"):
            certified_accuracy(meta, (data, labels.to(data.device)), eps=[0.0], progress=False)


class _ScaledThenAmplified(nn.Module):
    """A container with its own forward, ``lin(bn(x / 64))``: bounded by ``lipnet.convert``'s traced bound,
    whose elementwise ``x / 64`` node underflows for inputs ``2^-1070``."""

    def __init__(self, n):
        super().__init__()
        self.bn = nn.BatchNorm1d(n, eps=0.25)
        self.lin = nn.Linear(n, 1, bias=False)

    def forward(self, x):
        return self.lin(self.bn(x * 0.015625))


def test_underflow_in_a_traced_container_is_in_the_error_bound():
    """As :func:`test_underflowing_products_are_in_the_error_bound`, the underflow in a node of a traced
    graph: ``x_i / 64 = 2^-1076`` rounds to 0, BatchNorm scales by ``2^1023``, the sum gives ``2^-47``
    exactly (0 in float64), and the last layer's biases put the exact decision on the other side. Class 0
    was certified at radius 2.2e-321 (``lipnet.convert``'s elementwise nodes had no underflow term)."""
    from lipnet.convert import convert

    n = 4096
    net = convert(nn.Sequential(_ScaledThenAmplified(n), nn.Linear(1, 2)), input_shape=(n,), activation=None).model
    net = net.double().eval()
    inner, head = net[0], net[1]
    with torch.no_grad():
        inner.bn.running_mean.zero_()
        inner.bn.running_var.fill_(0.75)
        inner.bn.weight.fill_(2.0 ** 1023)
        inner.bn.bias.zero_()
        inner.lin.weight.fill_(1.0)
        head.weight.copy_(torch.tensor([[-1.0], [1.0]]))
        head.bias.copy_(torch.tensor([0.75 * 2.0 ** -47, 0.0]))
        x = torch.full((1, n), 2.0 ** -1070, dtype=torch.float64)
        assert int(net(x).argmax()) == 0
        hidden = sum(Fraction(w) for w in inner.lin.normalized_weight()[0].tolist()) * Fraction(2 ** (1023 - 1076))
        exact = [Fraction(b) + Fraction(w) * hidden for b, w in zip(head.bias.tolist(), head.normalized_weight()[:, 0].tolist())]
    assert exact[1] > exact[0]  # the exact model predicts class 1
    result = certified_accuracy(net, (x, torch.tensor([0])), eps=[0.0], progress=False)
    assert float(result.radii[0]) == 0.0


def test_complex_inputs_are_refused():
    """Cast to float64 they lost their imaginary parts (with a warning only) and their real parts were
    certified, although the model itself refuses complex inputs."""
    model = nn.Sequential(GramLinear(4, 3)).eval()
    x = torch.randn(5, 4, dtype=torch.complex64, generator=torch.Generator().manual_seed(0))
    with pytest.raises(TypeError, match="real"):
        certified_accuracy(model, (x, torch.zeros(5, dtype=torch.long)), eps=[0.0], progress=False)


def test_an_in_place_first_module_leaves_the_data_alone():
    """A float64 model on float64 data got the data's own slices (``x.to(float64)`` is ``x``): a leading
    ``ReLU(inplace=True)`` zeroed the caller's negative inputs."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, dtype=torch.float64, generator=gen)
    data = x.clone()
    torch.manual_seed(0)
    model = nn.Sequential(nn.ReLU(inplace=True), GramLinear(4, 3)).double().eval()
    labels, _ = exact_labels(nn.Sequential(nn.ReLU(), model[1]), x)
    result = check_radii(model, data, labels)
    assert torch.equal(data, x)
    assert bool((result.radii > 0).any())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_nearest_upsampling_is_certified_as_the_model_applies_it(dtype):
    """Two samples upsampled to 82: output 41 copies the first in float32 index arithmetic (torch's CPU
    kernel for every dtype but float64) and the second in float64. A head reading output 41 only made the
    float32 model predict class 1 (logits -0.71, 0.71) while its float64 copy predicted class 0, which
    was certified at radius 0.154."""
    torch.manual_seed(0)
    head = GramLinear(82, 2)
    with torch.no_grad():
        head.weight.zero_()
        head.weight[0, 41], head.weight[1, 41] = 1.0, -1.0
        head.bias.zero_()
    model = nn.Sequential(nn.Upsample(size=82, mode="nearest"), nn.Flatten(), head).to(dtype).eval()
    x = torch.tensor([[[-1.0, 1.0]]], dtype=dtype)
    with torch.no_grad():
        predicted = int(model(x).argmax())
    assert predicted == (0 if dtype == torch.float64 else 1)
    right, wrong = exact_labels(model, x)
    assert int(right) == predicted
    assert float(check_radii(model, x, right).radii[0]) > 0.1
    assert float(check_radii(model, x, wrong).radii[0]) == 0.0


def test_a_bare_nearest_upsampling_model_is_copied_as_applied():
    """The model itself an ``nn.Upsample``: its float64 copy (run on float64 inputs) copies what the
    float32 module copies."""
    model = nn.Upsample(size=82, mode="nearest")
    x = torch.arange(2.0).reshape(1, 1, 2)
    twin = float64_copy(model)
    with torch.no_grad():
        assert torch.equal(twin(x.double()), model(x).double())
        assert not torch.equal(model(x.double()), model(x).double())  # the float64 map differs
