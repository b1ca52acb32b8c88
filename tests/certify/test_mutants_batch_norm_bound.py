"""Mutation-testing gaps of lipnet.certify.batch_norm_bound: the per-channel scale bound against exact
decimal arithmetic, for ordinary statistics (not only variances next to ``-eps``)."""

import decimal
import random

from lipnet.certify.batch_norm_bound import channel_scale_bound

CONTEXT = decimal.Context(prec=80)


def exact_scale(gamma: float, var: float, eps: float) -> decimal.Decimal:
    """``|gamma| / sqrt(var + eps)`` of the floats themselves, to 80 digits."""
    denominator = CONTEXT.sqrt(CONTEXT.add(decimal.Decimal(var), decimal.Decimal(eps)))
    return CONTEXT.divide(abs(decimal.Decimal(gamma)), denominator)


def test_channel_scale_bound_is_never_below_the_exact_scale():
    """Each of the sum, the square root and the quotient rounds to nearest by default, below the exact
    value about half of the time: every rounding must be directed so that the bound is an upper one.
    Checked on a few thousand statistics of every magnitude a trained BatchNorm holds."""
    rng = random.Random(0)
    cases = [(1.0, 0.1, 1e-5), (0.3, 3.0, 1e-5), (-2.5, 7.0, 1e-3), (1.0, 1.0, 1.0)]
    for _ in range(4000):
        cases.append((rng.uniform(-4, 4), 10 ** rng.uniform(-8, 4), rng.choice((1e-5, 1e-3, 1e-6, 0.1))))
    below = [case for case in cases if decimal.Decimal(channel_scale_bound(*case)) < exact_scale(*case)]
    assert not below, below[:3]


def test_the_shift_rounding_of_every_spatial_position_is_counted():
    """The computed shift ``beta - mean s`` of a channel carries one rounding error ``d`` that every
    spatial position of that channel repeats: an example's L2 error from it is ``|d| sqrt(H W)``, so
    the propagated bound must count all ``H W`` positions of a ``(C, H, W)`` input, not a single axis.
    A BatchNorm2d whose shift nearly cancels (a large mean, ``beta = mean s``) on inputs of
    ``8192 x 1`` positions, checked against the exact output in 60-digit decimals."""
    import math

    import torch
    from torch import nn

    from lipnet.certify.lipschitz import module_lipschitz_bounds
    from lipnet.certify.precision import exact_kernels, forward_with_error_bound

    bn = nn.BatchNorm2d(1).double().eval()
    context = decimal.Context(prec=60)
    worst = None
    for mean in (3e8 + k * 12345.678 for k in range(40)):  # the statistics whose shift rounds worst
        with torch.no_grad():
            bn.running_mean.fill_(mean)
            bn.running_var.fill_(2.0)
            bn.weight.fill_(1.3)
            bn.bias.copy_(bn.running_mean * bn.weight / (bn.running_var + bn.eps).sqrt())
            zero = float(bn(torch.zeros(1, 1, 1, 1, dtype=torch.float64)).flatten()[0])
        scale = context.divide(decimal.Decimal(1.3), context.sqrt(context.add(decimal.Decimal(2.0),
                                                                              decimal.Decimal(bn.eps))))
        exact_zero = context.add(context.multiply(-decimal.Decimal(mean), scale), decimal.Decimal(float(bn.bias.detach())))
        shift_error = abs(decimal.Decimal(zero) - exact_zero)
        if worst is None or shift_error > worst[0]:
            worst = (shift_error, mean, float(bn.bias.detach()), scale)
    shift_error, mean, bias, scale = worst
    with torch.no_grad():
        bn.running_mean.fill_(mean)
        bn.bias.fill_(bias)
    x = torch.zeros(1, 1, 8192, 1, dtype=torch.float64)  # the output is the shift alone, at every position
    _, bounds = module_lipschitz_bounds(bn, (1, 8192, 1))
    with exact_kernels(), torch.no_grad():
        y, err = forward_with_error_bound(bn, x, bounds)
    exact = context.add(context.multiply(-decimal.Decimal(mean), scale), decimal.Decimal(bias))
    error = math.sqrt(sum(float(decimal.Decimal(v) - exact) ** 2 for v in y.flatten().tolist()))
    assert error > 0.2 * 2.0 ** -53 * abs(bias) * math.sqrt(8192)  # the shift did round, everywhere
    assert error <= float(err[0])
