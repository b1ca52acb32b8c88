"""BatchNorm in eval mode: a per-channel affine map, and the rounding of its computed shift.

In eval mode ``nn.BatchNorm{1,2,3}d`` (and ``nn.SyncBatchNorm``) compute, per channel ``c``,

    y = (x - mean_c) s_c + beta_c,    s_c = gamma_c / sqrt(var_c + eps),

from the running statistics (``gamma = 1``, ``beta = 0`` without ``affine``): a diagonal linear
map plus a constant, with L2 Lipschitz constant exactly ``max_c |s_c|`` (Ioffe and Szegedy,
"Batch Normalization", ICML 2015, section 3.1). Without running statistics it normalizes by the
statistics of its batch even in eval mode, so an example's output depends on the others: no
per-example bound exists.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.parameter import is_lazy

from lipnet.certify.lipschitz import LipschitzBoundError, register_lipschitz_bound
from lipnet.certify.precision import UNIT_ROUNDOFF, local_rounding_bound


def channel_scale_bound(gamma: float, var: float, eps: float) -> float:
    """A float ``>= |gamma| / sqrt(var + eps)``, for ``var + eps > 0`` (each rounding directed:
    the sum and the square root down, the quotient up)."""
    denominator = math.nextafter(math.sqrt(math.nextafter(var + eps, 0.0)), 0.0)
    if not denominator > 0:
        raise ValueError(f"running_var + eps = {var!r} + {eps!r} is not positive")
    return math.nextafter(abs(gamma) / denominator, math.inf)


def _type_expression(module: nn.Module) -> str:
    """How to write the module's type as a key of ``lipnet.convert``'s ``replace`` (which also
    matches subclasses): its nearest class that ``torch.nn`` exports, else its own name."""
    for cls in type(module).__mro__:
        if issubclass(cls, nn.modules.batchnorm._BatchNorm) and getattr(nn, cls.__name__, None) is cls:
            return f"nn.{cls.__name__}"
    return type(module).__name__


def _statistics(module: nn.modules.batchnorm._BatchNorm) -> dict[str, list[float]]:
    """The module's running statistics and affine parameters as float64 lists, checked."""
    name = type(module).__name__
    if module.running_mean is None or module.running_var is None:
        raise LipschitzBoundError(module, (
            f"{name} has no running statistics (track_running_stats=False), so even in eval mode it normalizes each "
            "batch by its own mean and variance and an example's output depends on the rest of its batch: no "
            f"per-example Lipschitz bound exists. Use {name}(..., track_running_stats=True) and train it, or remove "
            f"it (replace={{{_type_expression(module)}: lambda m: nn.Identity()}} in lipnet.convert)"))
    tensors = {"running_mean": module.running_mean, "running_var": module.running_var,
               "weight": module.weight, "bias": module.bias}
    if any(t is not None and is_lazy(t) for t in tensors.values()):
        raise LipschitzBoundError(module, f"{name} is lazy and not initialized yet; run one forward pass first")
    values = {}
    for key, tensor in tensors.items():
        if tensor is None:
            continue
        tensor = tensor.detach().double().cpu()
        if not bool(torch.isfinite(tensor).all()):
            raise LipschitzBoundError(module, (
                f"{name}.{key} has NaN or infinite entries, so its output is not finite; recompute its statistics "
                "(reset_running_stats() and a pass over training data in train mode) or remove it"))
        values[key] = tensor.flatten().tolist()
    channels = len(values["running_var"])
    values.setdefault("weight", [1.0] * channels)
    values.setdefault("bias", [0.0] * channels)
    return values


def _eps_applied(eps: float) -> float:
    """The smaller of ``eps`` and its float32 rounding (which float32 modules add to the variance)."""
    return min(eps, float(torch.tensor(eps, dtype=torch.float32)))


def channel_scale_bounds(module: nn.modules.batchnorm._BatchNorm) -> list[float]:
    """Upper bounds on ``|s_c| = |gamma_c| / sqrt(var_c + eps)``, one per channel."""
    stats, eps = _statistics(module), _eps_applied(float(module.eps))
    if math.isnan(eps):
        raise LipschitzBoundError(module, (
            f"{type(module).__name__} has eps=nan, so its output is NaN and no Lipschitz constant bounds it; set eps "
            "to a small positive number (1e-5 is torch's default)"))
    bounds = []
    for gamma, var in zip(stats["weight"], stats["running_var"]):
        if not var + eps > 0:
            raise LipschitzBoundError(module, (
                f"{type(module).__name__}.running_var has an entry {var} <= -eps, so its output is not a number; "
                "recompute its statistics or remove it"))
        bounds.append(channel_scale_bound(gamma, var, eps))
    return bounds


def refuse_subnormal_scales(module: nn.modules.batchnorm._BatchNorm, dtype: torch.dtype) -> None:
    """Refuse a channel whose ``var + eps`` or scale ``s_c`` is a nonzero number below the smallest
    normal float of ``dtype`` (float32's for float32 and narrower, whose kernels compute in float32).

    torch computes ``s_c`` before it multiplies the input; a subnormal ``s_c`` is rounded by up to
    half the smallest subnormal, a third of it for ``s_c = 1.5 * 2^-1074``, and that error is
    relative to the input, not to the output, so gains elsewhere in the network can make it any
    size: no rounding bound relative to the outputs covers it."""
    tiny = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).tiny
    stats, eps = _statistics(module), _eps_applied(float(module.eps))
    for channel, (gamma, var) in enumerate(zip(stats["weight"], stats["running_var"])):
        total = var + eps
        if 0 < total < tiny or (gamma != 0 and total >= tiny and abs(gamma) < tiny * math.sqrt(total)):
            raise LipschitzBoundError(module, (
                f"{type(module).__name__} scales channel {channel} by gamma / sqrt(running_var + eps) = {gamma!r} / "
                f"sqrt({var!r} + {eps!r}), below the smallest normal {dtype} number, which {dtype} arithmetic "
                "rounds by up to half its size; set that channel's weight to 0, use eps > 0, or remove the module"))


@register_lipschitz_bound(nn.modules.batchnorm._BatchNorm)
@register_lipschitz_bound(nn.SyncBatchNorm)
def batch_norm_lipschitz_bound(module: nn.modules.batchnorm._BatchNorm, shape) -> float:
    """``max_c |gamma_c| / sqrt(running_var_c + eps)``, rounded upwards (refused where a scale
    is subnormal: :func:`refuse_subnormal_scales`)."""
    refuse_subnormal_scales(module, module.running_var.dtype if module.running_var is not None else torch.float64)
    bounds = channel_scale_bounds(module)
    if not all(math.isfinite(b) for b in bounds):
        raise LipschitzBoundError(module, (
            f"{type(module).__name__} scales a channel by more than the largest float (gamma / sqrt(running_var + "
            "eps) overflows); recompute its statistics or remove it"))
    return max(bounds, default=0.0)


def shift_rounding_bound(module: nn.modules.batchnorm._BatchNorm, shape) -> float:
    """A bound on the L2 error, per example, from computing the shift ``beta - mean s``.

    torch computes ``y = x s~ + (beta - mean s~)`` or ``((x - mean) s~) + beta`` with
    ``s~ = s (1 + d)``, ``|d| <= 4u``; besides roundings relative to ``|s x| <= L |x|`` and ``|y|``,
    which the rounding bound of :mod:`lipnet.certify.precision` covers, each output entry has an
    error of at most ``6u |mean s| + u |beta|``, which cancellation can make large next to
    ``|y|``. Bounded here by ``8u (|mean| L_c + |beta|)`` per entry, ``L_c`` the channel's scale
    bound, and doubled for the rounding of this float64 computation itself.
    """
    stats = _statistics(module)
    positions = math.prod(shape[1:])
    per_channel = [8 * UNIT_ROUNDOFF * (abs(mean) * scale + abs(beta))
                   for mean, scale, beta in zip(stats["running_mean"], channel_scale_bounds(module), stats["bias"])]
    return 2 * math.sqrt(positions * math.fsum(e * e for e in per_channel))


def _propagate_rounding(module, h, err, bounds, propagate):
    """``(module(h), error)``: the generic propagation plus :func:`shift_rounding_bound`."""
    shape = tuple(h.shape[1:])
    lam = bounds[(id(module), shape)]
    y = module(h)
    return y, lam * err + local_rounding_bound(h, y, lam) + shift_rounding_bound(module, shape)


batch_norm_lipschitz_bound.propagate_rounding = _propagate_rounding
