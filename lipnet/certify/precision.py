"""The certification forward pass: the applied weights in float64, and a bound on its rounding error.

A certificate is a statement about the network in exact arithmetic on the weights its layers
apply (for a Gram layer, its normalized weight exactly as the forward pass uses it). Logits
from a float32 pass, let alone TF32 or bf16, differ from those exact logits by rounding that
grows with the intermediate activations, not with the logits; a margin below that error
certifies nothing. So certification

1. evaluates :func:`float64_copy`, a copy of the model in float64 whose Gram layers apply the
   original's normalized weights, and whose convex residual blocks its mixing coefficients,
   cast exactly (the same function in exact arithmetic, whose Lipschitz bound is the
   original's);
2. with TF32 and cuDNN off (:func:`exact_kernels`), so that every linear map is computed by
   plain sums of products;
3. bounds, per example, the L2 distance between the float64 logits and the exact ones by
   propagating errors module by module (:func:`forward_with_error_bound`): a module with
   Lipschitz bound ``lam`` fed an input with error ``e`` returns an output with error at most
   ``lam * e + r``, where its own rounding is

       r <= 4 u K^{3/2} (lam ||h|| + ||y||),    K = max(numel(h), numel(y), products) + 1,

   for input ``h``, output ``y`` (one example), unit roundoff ``u = 2^-53`` and, for a
   convolution, ``products = c_in / groups * k_h * k_w`` (:func:`products_per_output`).

Why ``r`` holds for a linear map ``y = A h + b`` (Higham, *Accuracy and Stability of
Numerical Algorithms*, 2nd ed., 2002, section 3.1): each computed output is a sum of at most
``K`` products, so ``|fl(y) - y| <= gamma_K (|A| |h| + |b|)`` elementwise, with
``gamma_K = K u / (1 - K u)``. In L2, ``|| |A| ||_2 <= sqrt(||A||_1 ||A||_inf) <= sqrt(K) ||A||_2``
(each row and each column has at most ``K`` entries), and ``||b|| <= ||y|| + ||A h||``.
A convolution whose taps read copies of one input sample (reflect and replicate padding at any
input size: with a 3-tap kernel and padding 1, output 0 reads ``x1, x0, x1``; circular padding on
an input smaller than the kernel) sums one product per tap, not per entry of ``A``: there ``A`` is the
valid convolution ``V`` (one entry per tap) after the copy operator ``P``, and the same argument
holds with ``|V| |P h|`` and ``lam >= ||V|| ||P||``, which is how :mod:`lipnet.bounds.circulant`
bounds such layers (circular padding included: its circulant would add the aliased taps). So
``r <= gamma_K ((sqrt(K) + 1) lam ||h|| + ||y||) <= 4 u K^{3/2} (lam ||h|| + ||y||)`` for
``K u <= 1/4``, where the computed ``||y||`` (which the bound reads) may stand for the exact one:
it exceeds ``(1 - gamma_K)`` times it. That model of rounding ignores underflow: a product or quotient whose result is
subnormal has an absolute error up to ``2^-1075`` however small it is (``2^-1070 / 64`` rounds
to 0), which later layers can scale up to the size of the logits. Sums of subnormals are exact,
so each output gains at most ``K 2^-1074`` (``K`` products, the error amplified by at most 2 in
the sum), ``K^{3/2} 2^-1074`` in L2 over at most ``K`` outputs (:func:`underflow_bound`), added
to ``r``. Elementwise activations (MaxMin, GroupSort, ReLU: exact; tanh and the like: a
few ulps), pooling (sums of at most ``K`` terms) and input normalization are covered by the same
expression. The model's rounding is thereby bounded for the modules lipnet knows; for a
custom module with a registered bound, it assumes that module's forward is such a sum, unless
the bound function carries its own propagation (``fn.propagate_rounding(module, h, err,
bounds, propagate) -> (y, err)``), as :func:`lipnet.convert.traced_lipschitz_bound` does for
the containers :func:`lipnet.convert.convert` registers: node by node through their graphs.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import nn

from lipnet.bounds.autocast import ieee_float32_matmuls
from lipnet.bounds.rounding import certification_arithmetic
from lipnet.certify.copy_map_bounds import _INDEX_DTYPES, NEAREST_MODES, _copied_entries
from lipnet.certify.lipschitz import (
    _REGISTRY,
    LipschitzBoundError,
    _lookup,
    unwrap_checked,
    has_forward_hooks,
    overridden_forward_part,
)
from lipnet.nn.normalized import GramNormalized
from lipnet.nn.pooling import sqrt_up
from lipnet.nn.residual import ConvexResidual, GramResidualConv2d

#: Unit roundoff of float64.
UNIT_ROUNDOFF = 2.0 ** -53


def float64_copy(model: nn.Module, inputs: torch.Tensor | None = None) -> nn.Module:
    """A float64 copy of ``model`` computing, in exact arithmetic, the same function.

    Gram layers of the copy apply the original's normalized weight (computed by the original
    in its own dtype, cached in eval mode) cast exactly to float64, so the copy's
    :func:`~lipnet.certify.lipschitz_bound` certifies the weights the original applies.
    Likewise a :class:`~lipnet.nn.ConvexResidual` of the copy mixes with the coefficients
    ``1 - alpha`` and ``alpha`` that the original computes in its own dtype (in float16,
    ``sigmoid`` and ``1 - sigmoid`` may sum to ``1 + 2^-12``; recomputed in float64 they would
    describe another function). Nearest upsampling of a model that is not float64 on the CPU
    becomes :class:`UpsampleAsApplied`, which copies the entries the original copies: torch's
    CPU kernels compute the source indices in double arithmetic for float64 inputs and in float
    arithmetic otherwise (its CUDA kernels in float always), and the maps differ (2 samples
    upsampled to 82: output 41 copies the second in float64, the first in float32).
    Everything else is cast with ``.double()`` (exact for float32, bfloat16 and float16). A model
    without floating parameters computes in the dtype, and on the device, of its ``inputs`` (an
    example batch as the model sees it; without one, float32 on the CPU), whatever torch's default dtype.
    """
    from lipnet.certify.batch_norm_bound import refuse_subnormal_scales  # it imports this module

    model = unwrap_checked(model)
    twin = copy.deepcopy(model)
    for (path, original), module in zip(model.named_modules(), twin.modules(), strict=True):
        if (isinstance(original, nn.modules.batchnorm._BatchNorm) and original.running_var is not None
                and not original.running_var.is_meta):
            try:
                refuse_subnormal_scales(original, original.running_var.dtype)  # in the dtype it computes in
            except LipschitzBoundError as error:
                error.path = path
                raise
        if isinstance(original, GramNormalized):
            module.normalized_weight = _weight_applied_by(original)
        if isinstance(original, ConvexResidual):
            module.coefficients = _coefficients_applied_by(original)
    if _index_arithmetic(model, inputs) != torch.float64:
        if _plain_nearest_upsampling(twin):
            twin = UpsampleAsApplied(twin)
        for parent in list(twin.modules()):
            for name, child in parent.named_children():
                if _plain_nearest_upsampling(child):
                    setattr(parent, name, UpsampleAsApplied(child))
    return twin.double()


def _plain_nearest_upsampling(module: nn.Module) -> bool:
    """An ``nn.Upsample`` (or ``nn.UpsamplingNearest2d``) in a nearest mode that runs ``nn.Upsample.forward``
    without hooks (anything else keeps its own forward, which the bounds then judge)."""
    return (isinstance(module, nn.Upsample) and module.mode in NEAREST_MODES and not has_forward_hooks(module)
            and overridden_forward_part(module, nn.Upsample) is None)


def _index_arithmetic(model: nn.Module, inputs: torch.Tensor | None = None) -> torch.dtype:
    """The dtype of the index arithmetic of ``model``'s nearest upsampling: float64 for a float64
    model on the CPU (the dtype and device of its first floating parameter, else of ``inputs``),
    else float32."""
    first = next((p for p in model.parameters() if p.is_floating_point()), inputs)
    if first is None:
        return torch.float32
    dtype = first.dtype
    on_cpu = first.device.type == "cpu"
    return torch.float64 if dtype == torch.float64 and on_cpu else torch.float32


class UpsampleAsApplied(nn.Module):
    """``upsample`` (nearest) copying, in any dtype, the entries it copies in float32 index arithmetic.

    The map is read from ``upsample`` run on the CPU in float32 on the indices of the entries of
    one channel (:func:`~lipnet.certify.copy_map_bounds._copied_entries`), once per input size,
    and applied by indexing; its Lipschitz constant is ``sqrt`` of the largest number of copies
    of one entry (:mod:`lipnet.certify.copy_map_bounds`).
    """

    def __init__(self, upsample: nn.Upsample):
        super().__init__()
        self.upsample = upsample
        self._maps: dict[tuple[int, ...], tuple[tuple[int, ...], torch.Tensor]] = {}

    def copy_map(self, spatial) -> tuple[tuple[int, ...], torch.Tensor]:
        """``(output size, source)``: the spatial output size, and for each output entry of one
        channel (flattened) the index of the input entry it copies."""
        spatial = tuple(int(s) for s in spatial)
        if spatial not in self._maps:
            index = torch.arange(math.prod(spatial)).reshape(1, 1, *spatial)
            with torch.no_grad():
                size = tuple(self.upsample(torch.zeros(index.shape)).shape[2:])
            self._maps[spatial] = size, _copied_entries(self.upsample, index, torch.float32,
                                                            dict(_INDEX_DTYPES)[torch.float32])
        return self._maps[spatial]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size, source = self.copy_map(x.shape[2:])
        return x.flatten(2)[:, :, source.to(x.device)].reshape(*x.shape[:2], *size)

    def lipschitz_bound(self, input_size) -> float:
        """``sqrt(max_i m_i)`` of the copy map for inputs of spatial size ``input_size``."""
        _, source = self.copy_map(input_size)
        return sqrt_up(int(torch.bincount(source).max())) if source.numel() else 0.0


def _weight_applied_by(layer: GramNormalized) -> Callable:
    def normalized_weight(input_size=None) -> torch.Tensor:
        with torch.no_grad():
            return layer.normalized_weight(input_size).detach().double()

    return normalized_weight


def _coefficients_applied_by(block: ConvexResidual) -> Callable:
    def coefficients() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            return tuple(c.detach().double() for c in block.coefficients())

    return coefficients


@contextmanager
def exact_kernels():
    """No cuDNN, full float32 matrix products (:func:`~lipnet.bounds.autocast.ieee_float32_matmuls`),
    and gradual underflow on the CPU.

    cuDNN may pick FFT or Winograd convolutions, whose rounding does not follow the
    sum-of-products bound of this module; the native kernels do (the certification pass is
    float64, which TF32 never touches). ``torch.set_flush_denormal(True)`` makes every subnormal
    result 0, an error of up to ``2^-1022`` where :func:`underflow_bound` allows ``2^-1075``: it is
    turned off here and back on afterwards. Settings are restored. Only ``cudnn.enabled`` and the
    backends' ``fp32_precision`` are read and set: the legacy TF32 settings raise when read
    once a caller used both kinds.
    """
    before = torch.backends.cudnn.enabled
    torch.backends.cudnn.enabled = False
    try:
        with certification_arithmetic(), ieee_float32_matmuls():
            yield
    finally:
        torch.backends.cudnn.enabled = before


def local_rounding_bound(h: torch.Tensor, y: torch.Tensor, lipschitz: float, products: int = 0) -> torch.Tensor:
    """Per-example bound on the float64 rounding error of one module, ``4 u K^1.5 (lam ||h|| + ||y||)``
    plus :func:`underflow_bound`.

    ``K = max(numel(h), numel(y), products) + 1``, with ``products`` the number of products
    summed into one output where that can exceed the input's size: a convolution whose kernel
    reads copies of its input (reflect or replicate padding, or circular padding on an input
    smaller than the kernel) sums ``c_in / groups * k_h * k_w`` of them (:func:`products_per_output`).
    """
    terms = max(h[0].numel(), y[0].numel(), products) + 1
    if terms * UNIT_ROUNDOFF > 0.25:
        raise ValueError(f"a module with {terms} inputs or outputs per example is too large for the rounding bound")
    return 4 * UNIT_ROUNDOFF * terms ** 1.5 * (lipschitz * example_norms(h) + example_norms(y)) + underflow_bound(terms)


def underflow_bound(terms: int) -> float:
    """``>= K^1.5 2^-1074``: the L2 error, per example, that underflow adds to at most ``K`` outputs
    of at most ``K`` products each (each product that underflows is off by up to ``2^-1075``,
    absolutely). Also covers the roundings of the relative bound's own evaluation once it is
    subnormal."""
    return math.ulp(0.0) * math.ceil(terms ** 1.5)


def products_per_output(module: nn.Module) -> int:
    """At least the products a convolution sums into one output: ``c_in / groups * k_h * k_w`` (for
    a transposed one too, whose weight is ``(c_in, c_out / groups, ...)``), plus one for the identity
    of :class:`~lipnet.nn.GramResidualConv2d`; 0 for other modules."""
    if not isinstance(module, nn.modules.conv._ConvNd):
        return 0
    return (module.in_channels // module.groups * math.prod(module.kernel_size)
            + int(isinstance(module, GramResidualConv2d)))


def forward_with_error_bound(model: nn.Module, x: torch.Tensor, bounds: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``(model(x), err)``: float64 outputs and a per-example bound on their L2 distance to the exact ones.

    Args:
        model: a float64 model (:func:`float64_copy`) in eval mode, run under :func:`exact_kernels`.
        x: float64 inputs; they are taken as exact.
        bounds: the per-module Lipschitz bounds of
            :func:`~lipnet.certify.lipschitz.module_lipschitz_bounds` for this input shape.
    """
    if x.dtype != torch.float64:
        raise TypeError(f"the certification forward pass runs in float64, got inputs of {x.dtype}")
    return _propagate(model, x, torch.zeros(len(x), dtype=torch.float64, device=x.device), bounds)


def _propagate(module: nn.Module, h: torch.Tensor, err: torch.Tensor, bounds: dict):
    key = (id(module), tuple(h.shape[1:]))
    if key in bounds:  # bounded as a unit
        rounding = getattr(_lookup(_REGISTRY, module), "propagate_rounding", None)
        if rounding is not None:  # a bound with its own error propagation (lipnet.convert's traced bounds)
            return rounding(module, h, err, bounds, _propagate)
        lam = bounds[key]
        y = module(h)
        return y, lam * err + local_rounding_bound(h, y, lam, products_per_output(module))
    if isinstance(module, nn.Sequential):
        for child in module:
            h, err = _propagate(child, h, err, bounds)
        return h, err
    if isinstance(module, ConvexResidual):
        out, branch_err = _propagate(module.branch, h, err, bounds)
        keep, alpha = (float(c.detach().double()) for c in module.coefficients())
        y = keep * h + alpha * out
        # Two products and a sum per entry: at most 3 roundings of |keep h| + |alpha out| + |y|,
        # and 2^-1074 per entry from the two products underflowing.
        own = (3 * UNIT_ROUNDOFF * (abs(keep) * example_norms(h) + abs(alpha) * example_norms(out) + example_norms(y))
               + underflow_bound(y[0].numel()))
        return y, abs(keep) * err + abs(alpha) * branch_err + own
    raise ValueError(f"no Lipschitz bound was recorded for {type(module).__name__} on inputs of shape "
                     f"{tuple(h.shape[1:])}: compute the bounds with module_lipschitz_bounds on this model and shape")


def example_norms(t: torch.Tensor) -> torch.Tensor:
    """The L2 norm of each example (first dimension) of ``t``, in float64, rounded up by an ulp.

    An example whose norm lies outside ``[2^-400, 2^500]``, where squares may underflow to 0
    (entries below ``1e-154``) or overflow to inf (above ``1e154``), is scaled by the power of
    two that brings its largest entry into ``[1/2, 1)`` (exact) before squaring.
    """
    t = t.detach().double().flatten(1)
    norms = t.norm(dim=1)
    outside = ~((norms >= 2.0**-400) & (norms <= 2.0**500)) & (t.shape[1] > 0)
    if bool(outside.any()):
        scaled = t[outside]
        _, exponent = torch.frexp(scaled.abs().amax(dim=1, keepdim=True))
        norms[outside] = times_power_of_two(times_power_of_two(scaled, -exponent).norm(dim=1), exponent[:, 0])
    return torch.where(norms > 0, torch.nextafter(norms, torch.full_like(norms, math.inf)), norms)


def times_power_of_two(x: torch.Tensor, exponent: torch.Tensor) -> torch.Tensor:
    """``x * 2^exponent`` in two steps whose factors are normal floats (``|exponent| <= 2150``),
    so that an implementation of ``ldexp`` as ``x * 2.0**exponent`` cannot overflow the factor."""
    half = torch.div(exponent, 2, rounding_mode="floor")
    return torch.ldexp(torch.ldexp(x, half), exponent - half)


def rounding_allowance(logits: torch.Tensor, err: torch.Tensor) -> torch.Tensor:
    """Per-example uncertainty of each float64 logit: the propagated error plus ``4 u max(1, max |f|)
    + 2^-1074``, which covers the rounding of the margin arithmetic of the radius (a difference of
    two logits, rounded)."""
    scale = logits.detach().double().abs().amax(dim=1).clamp_min(1.0)
    return err + 4 * UNIT_ROUNDOFF * scale + math.ulp(0.0)
