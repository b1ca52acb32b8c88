"""BatchNorm in eval mode: the bound is never below the exact operator norm; batch statistics are refused."""

import copy
import decimal
import math

import pytest
import torch
from torch import nn

from lipnet.bounds import affine_map_matrix
from lipnet.certify import LipschitzBoundError, certified_accuracy, lipschitz_bound
from lipnet.certify.batch_norm_bound import channel_scale_bound, shift_rounding_bound
from lipnet.certify.lipschitz import module_lipschitz_bounds
from lipnet.certify.precision import exact_kernels, float64_copy, forward_with_error_bound, local_rounding_bound
from lipnet.nn import GramConv2d, GramLinear


def dense_matrix(module: nn.Module, shape) -> torch.Tensor:
    """The matrix of an affine map in float64: responses to each basis vector minus the response to 0."""
    module = copy.deepcopy(module).double().eval()
    with torch.no_grad():
        return affine_map_matrix(module, shape)


def exact_norm(module, shape) -> float:
    return float(torch.linalg.matrix_norm(dense_matrix(module, shape), ord=2))


def with_statistics(bn, mean, var, weight=None, bias=None):
    with torch.no_grad():
        bn.running_mean.copy_(torch.as_tensor(mean))
        bn.running_var.copy_(torch.as_tensor(var))
        if weight is not None:
            bn.weight.copy_(torch.as_tensor(weight))
        if bias is not None:
            bn.bias.copy_(torch.as_tensor(bias))
    return bn


CASES = [
    ("random", lambda: with_statistics(nn.BatchNorm2d(4), torch.randn(4), torch.rand(4) + 0.1, torch.randn(4),
                                       torch.randn(4)), (4, 3, 5)),
    ("tiny variance", lambda: with_statistics(nn.BatchNorm2d(3), [0.0, 1.0, -2.0], [0.0, 1e-9, 1.0]), (3, 2, 2)),
    ("negative gamma", lambda: with_statistics(nn.BatchNorm1d(3), [0.5, 0.0, 0.0], [0.25, 4.0, 1.0],
                                               [-7.0, 0.5, 2.0], [1.0, 0.0, -3.0]), (3,)),
    ("1-d sequence", lambda: with_statistics(nn.BatchNorm1d(2, eps=0.1), [0.0, 3.0], [0.3, 0.01]), (2, 7)),
    ("3-d", lambda: with_statistics(nn.BatchNorm3d(2), [1.0, 2.0], [2.0, 0.5], [3.0, -1.0]), (2, 2, 3, 1)),
    ("no affine", lambda: with_statistics(nn.BatchNorm2d(2, affine=False), [1.0, -1.0], [1e-3, 9.0]), (2, 3, 3)),
    ("zero gamma", lambda: with_statistics(nn.BatchNorm1d(2), [0.0, 0.0], [1.0, 1.0], [0.0, 0.0]), (2,)),
]


@pytest.mark.parametrize(("make", "shape"), [(m, s) for _, m, s in CASES], ids=[name for name, _, _ in CASES])
def test_bound_is_at_least_the_exact_norm_and_tight(make, shape):
    torch.manual_seed(0)
    bn = make()
    bound = lipschitz_bound(bn, shape)
    exact = exact_norm(bn, shape)
    # Tight up to eps rounded to float32 (float32 modules add that one: 1e-5 (1 - 3e-8)) for tiny variances.
    assert exact <= bound <= exact * (1 + 1e-7) + 1e-300
    # The same for the float64 copy certification evaluates, and in a network.
    assert lipschitz_bound(float64_copy(bn), shape) == bound


def test_adversarial_variance_is_bounded_in_exact_arithmetic():
    # var + eps just above 0: the bound must not round the denominator up.
    for var in (-1e-5 + 1e-20, 5e-324, 0.0):
        scale = channel_scale_bound(1.0, var, 1e-5)
        exact = decimal.Decimal(1) / (decimal.Decimal(var) + decimal.Decimal(1e-5)).sqrt(decimal.Context(prec=60))
        assert decimal.Decimal(scale) >= exact


def test_float32_eps_is_accounted_for():
    # float32 modules add eps rounded to float32 (below 1e-5): the bound uses the smaller of the two.
    bn = with_statistics(nn.BatchNorm1d(1), [0.0], [0.0])
    eps32 = float(torch.tensor(1e-5, dtype=torch.float32))
    assert eps32 < 1e-5 and lipschitz_bound(bn, (1,)) >= 1 / math.sqrt(eps32)


def test_sync_batch_norm_and_in_a_network():
    sync = with_statistics(nn.SyncBatchNorm(3), [0.1, 0.2, 0.3], [0.5, 2.0, 0.25], [1.0, -2.0, 0.5])
    assert lipschitz_bound(sync, (3, 4, 4)) == pytest.approx(2 / math.sqrt(2 + 1e-5), rel=1e-12)
    assert lipschitz_bound(sync, (3, 4, 4)) >= exact_norm(sync, (3, 4, 4))
    net = nn.Sequential(GramConv2d(3, 3, 3, padding=1), sync, nn.Flatten(), GramLinear(48, 2))
    assert lipschitz_bound(net, (3, 4, 4)) <= lipschitz_bound(sync, (3, 4, 4)) * (1 + 1e-5)


def test_train_mode_model_is_bounded_in_eval_mode():
    bn = with_statistics(nn.BatchNorm1d(2), [0.0, 0.0], [0.25, 1.0]).train()
    assert lipschitz_bound(bn, (2,)) == pytest.approx(1 / math.sqrt(0.25 + 1e-5), rel=1e-12)
    assert bn.training


@pytest.mark.parametrize(("make", "match"), [
    (lambda: nn.BatchNorm2d(3, track_running_stats=False), "no running statistics"),
    (lambda: with_statistics(nn.BatchNorm2d(3), [0.0, float("nan"), 0.0], [1.0, 1.0, 1.0]), "running_mean has NaN"),
    (lambda: with_statistics(nn.BatchNorm2d(3), [0.0, 0.0, 0.0], [1.0, float("inf"), 1.0]), "running_var has NaN"),
    (lambda: with_statistics(nn.BatchNorm2d(3), [0.0] * 3, [1.0] * 3, [1.0, float("nan"), 1.0]), "weight has NaN"),
    (lambda: with_statistics(nn.BatchNorm2d(3), [0.0] * 3, [1.0, -1.0, 1.0]), "running_var has an entry"),
    (lambda: with_statistics(nn.BatchNorm2d(3, eps=0.0), [0.0] * 3, [1.0, 0.0, 1.0]), "running_var has an entry"),
    # A NaN eps was reported as "running_var has an entry 1.0 <= -eps".
    (lambda: nn.BatchNorm2d(3, eps=float("nan")), r"eps=nan, so its output is NaN"),
    (lambda: nn.LazyBatchNorm2d(), "forward hooks"),  # its initializing pre-hook; the bound itself refuses too
])
def test_refusals_name_the_module(make, match):
    net = nn.Sequential(GramConv2d(3, 3, 3, padding=1), make())
    with pytest.raises(LipschitzBoundError, match=match) as info:
        lipschitz_bound(net, (3, 4, 4))
    assert info.value.path == "1" and "BatchNorm2d" in str(info.value)


def test_lazy_module_is_refused_until_initialized():
    from lipnet.certify.batch_norm_bound import batch_norm_lipschitz_bound

    lazy = nn.LazyBatchNorm2d()
    with pytest.raises(LipschitzBoundError, match="run one forward pass first"):
        batch_norm_lipschitz_bound(lazy, (3, 4, 4))
    lazy(torch.randn(2, 3, 4, 4))
    assert lipschitz_bound(lazy, (3, 4, 4)) >= exact_norm(lazy, (3, 4, 4))


def test_without_running_statistics_outputs_depend_on_the_batch():
    # Why the refusal: in eval mode the module still normalizes by its batch.
    bn = nn.BatchNorm1d(2, track_running_stats=False).eval()
    x = torch.randn(4, 2)
    same_first = torch.cat((x[:1], 5 * x[1:]))
    assert not torch.allclose(bn(x)[0], bn(same_first)[0])


def exact_output(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> list[decimal.Decimal]:
    """``(x - mean) gamma / sqrt(var + eps) + beta`` with 60 significant digits, for inputs ``(N, C)``."""
    context = decimal.Context(prec=60)
    out = []
    for row in x.tolist():
        for c, value in enumerate(row):
            mean, var = (decimal.Decimal(float(t[c])) for t in (bn.running_mean, bn.running_var))
            gamma, beta = (decimal.Decimal(float(t[c])) for t in (bn.weight.detach(), bn.bias.detach()))
            scale = context.divide(gamma, context.sqrt(context.add(var, decimal.Decimal(bn.eps))))
            out.append(context.add(context.multiply(context.subtract(decimal.Decimal(value), mean), scale), beta))
    return out


def test_cancelling_shift_rounding_is_propagated():
    """A large mean and bias that cancel: the computed shift ``beta - mean s`` carries an error of order
    ``u |beta|``, far above the generic bound's ``u (L ||h|| + ||y||)`` for small inputs and outputs."""
    bn = with_statistics(nn.BatchNorm1d(3).double(), [3e8, -1e9, 7e7], [2.0, 3.0, 0.7],
                         [1.0, 1.3, 0.9], [0.0, 0.0, 0.0]).eval()
    with torch.no_grad():
        scale = bn.weight / (bn.running_var + bn.eps).sqrt()
        bn.bias.copy_(bn.running_mean * scale)  # y = s x up to rounding
    x = 1e-6 * torch.randn(64, 3, dtype=torch.float64)
    _, bounds = module_lipschitz_bounds(bn, (3,))
    with exact_kernels(), torch.no_grad():
        y, err = forward_with_error_bound(bn, x, bounds)
    exact = exact_output(bn, x)
    computed = [decimal.Decimal(v) for v in y.flatten().tolist()]
    errors = [math.sqrt(float(sum((computed[3 * i + c] - exact[3 * i + c]) ** 2 for c in range(3))))
              for i in range(len(x))]
    assert all(e <= float(b) for e, b in zip(errors, err))
    generic = local_rounding_bound(x, y, bounds[(id(bn), (3,))])
    assert max(e - float(g) for e, g in zip(errors, generic)) > 0  # the generic bound alone would be wrong
    assert float(err.max()) <= 100 * max(errors) + shift_rounding_bound(bn, (3,))


def test_certified_accuracy_with_batch_norm():
    torch.manual_seed(0)
    bn = with_statistics(nn.BatchNorm2d(2), [0.1, -0.2], [0.8, 1.5], [0.9, 1.1], [0.05, 0.0])
    net = nn.Sequential(GramConv2d(1, 2, 3, padding=1), bn, nn.GELU(), nn.Flatten(), GramLinear(32, 3))
    x, y = torch.rand(16, 1, 4, 4), torch.randint(0, 3, (16,))
    result = certified_accuracy(net, (x, y), eps=[0.0, 0.01], progress=False)
    assert result.lipschitz >= lipschitz_bound(bn, (2, 4, 4))
    assert any(row["type"] == "BatchNorm2d" for row in result.module_bounds)
