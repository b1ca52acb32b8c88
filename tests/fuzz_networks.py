"""Randomized soundness fuzz of whole networks built from every module type lipnet.certify accepts.

Each case draws a small float64 network in eval mode: a chain of modules compatible in shape
(examples of shape ``(F,)``, ``(C, L)``, ``(C, H, W)`` or ``(C, D, H, W)``, at most
``max_numel`` entries at every layer) from a *zoo* holding lipnet's layers, with adversarial
weights (``fuzz_geometry.make_weight``), and every ``torch.nn`` type whose class resolves to a
rule of lipnet.certify's registry, with random hyperparameters: PReLU slopes per channel,
negative or large; BatchNorm statistics and affine parameters down to tiny variances; padding
sizes (cropping too); upsampling sizes and factors; pooling kernels, strides, dilations,
padding, ``ceil_mode`` and divisors; LeakyReLU slopes above 1; Softplus thresholds and negative
betas; in-place variants; and now and then NaN or infinite hyperparameters. The chains are
nested in ``nn.Sequential``, ``GramSequential`` and ``ConvexResidual`` containers. A type
of the registry (or a ``torch.nn`` class resolving to one of its rules) without a builder here
is built with its default constructor (:func:`zoo`), so new rules are fuzzed at once;
``tests/certify/test_network_fuzz.py`` fails when a type is never exercised.

Every drawn module is first certified alone on the shape it receives: a refusal must be a
:class:`~lipnet.certify.LipschitzBoundError` (an ``UnknownModuleError`` for the traps of
:data:`TRAPS`: plain layers, norms without a rule, subclasses that change ``forward``, hooks),
any other exception is a crash; refused modules are drawn again, so that a network holds
accepted modules only. For its certificate ``L = lipschitz_bound(model, shape)`` the checks are:

* ``jacobian``: ``L >= ||J(x)||_2``, the float64 Jacobian from
  ``torch.autograd.functional.jacobian`` and its SVD, at zero, at random points of scales
  1e-3 to 1e2 and at adversarial points: for a few elementwise modules, inputs that put their
  entries at their steepest slope and at the sharpest kink of its derivative (both read from
  the module itself on a grid: GELU's steepest point ``sqrt 2``, PReLU's 0, a Softplus
  switch), and for max-like modules (MaxMin, max and L2-norm pooling) inputs with ties and
  isolated spikes (a spike is the maximum of every window holding it: ``sqrt(m)`` for
  overlapping windows), each reached through the modules before it by Gauss-Newton steps;
  and along a short gradient ascent of ``||f(x) - f(y)|| / ||x - y||``. The Jacobian is
  rounded relative to the magnitudes it sums, so the allowance is ``1e-10 L c``, with ``c``
  the product over Gram layers of ``|| |A| || / bound`` (:func:`cancellation`), and a factor
  ``1 + 2^-24`` per Hardsigmoid and Hardswish (:data:`BACKWARD_CONSTANT_TOL`). It is
  taken of a copy without in-place modules (:func:`out_of_place`);
* ``dense``: for networks of affine modules only (Gram layers, padding, shuffles, nearest
  upsampling, average pooling, BatchNorm, input normalization), ``L >=`` the norm of the dense
  operator with columns ``f(e_i) - f(0)``, less their rounding (below);
* ``pairs``: ``||f(x) - f(y)|| <= L ||x - y|| + err(x) + err(y)`` on close and far pairs
  (random, and straddling the adversarial points along the Jacobian's top singular vector),
  with ``err`` the rounding bound of
  :func:`lipnet.certify.precision.forward_with_error_bound`: exactly the claim a certificate
  makes of float64 logits. A jump (a Softplus switch to the identity) fails it;
* ``slope``: for those elementwise modules, on their grid, ``|f(b) - f(a)| / (b - a)`` (less
  its rounding) is at most the module's own bound;
* ``finite``, ``batch``: an accepted network's outputs are finite, and an example's output does
  not depend on the rest of its batch (within the rounding bound).

A case is reproducible from its seed: ``python tests/fuzz_networks.py --seed 123 --count 1 -v``
prints the network and its ratios. Seed ``s`` forces the type ``rotation()[s % n]`` into its
network (``--module GELU`` forces one), so ``n`` consecutive seeds exercise every type.
Without ``--count`` it runs for ``--minutes``.
"""

from __future__ import annotations

import argparse
import copy
import math
import random
import sys
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

import lipnet.nn
from lipnet.certify import LipschitzBoundError, UnknownModuleError, lipschitz_bound
from lipnet.certify.lipschitz import _COMPOSITES, _REGISTRY, module_lipschitz_bounds
from lipnet.certify.precision import UNIT_ROUNDOFF, forward_with_error_bound
from lipnet.nn import (ConvexResidual, GlobalL2NormPool2d, GlobalScaledAvgPool2d, GramConv1d, GramConv2d,
                       GramConvTranspose2d, GramLinear, GramResidualConv2d, GramSequential, GroupSort,
                       InputNormalization, L2NormPool2d, MaxMin, ScaledAvgPool2d)
from lipnet.nn.normalized import GramNormalized

import fuzz_geometry as _geometry  # beside this script: on sys.path when run, and in tests/conftest.py

Violation = _geometry.Violation
make_weight, sigma_max = _geometry.make_weight, _geometry.sigma_max

F64 = torch.float64
#: Allowance of a Jacobian's rounding, relative to the magnitude ``L c`` of the sums it takes.
JACOBIAN_TOL = 1e-10
#: Relative allowance of autograd's derivative formulas, per module of :data:`FLOAT32_BACKWARD`:
#: torch differentiates Hardsigmoid and Hardswish with 1/6 rounded to float32 even in float64
#: (0.16666667163, 3e-8 above), while the forward divides by 6 exactly; the ``pairs`` check of
#: the forward has no such allowance.
BACKWARD_CONSTANT_TOL = 2.0 ** -24
FLOAT32_BACKWARD = (nn.Hardsigmoid, nn.Hardswish)
WEIGHT_KINDS = ("gaussian", "rank1", "one_tap", "constant", "checkerboard", "checker_channels", "near_orthogonal",
                "orthogonal_rows", "integer", "sparse", "zero", "off_grid", "tiny64", "huge64")


@dataclass
class Budget:
    """How much each case checks (the CI slice takes a smaller one)."""

    max_numel: int = 96  # entries per example at every layer
    max_length: int = 6  # modules in the top-level chain
    random_points: int = 4
    sites: int = 3  # modules whose adversarial inputs are sought
    targets: int = 3  # adversarial inputs per module
    pairs: int = 3  # directions per point for the pair check
    ascent_steps: int = 15


CI_BUDGET = Budget(max_numel=48, max_length=4, random_points=2, sites=2, targets=2, pairs=2, ascent_steps=3)


class Draw:
    """The random source of one case (Python's for choices, torch's for tensors)."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.gen = torch.Generator().manual_seed(seed)

    def choice(self, options):
        return self.rng.choice(list(options))

    def chance(self, p: float) -> bool:
        return self.rng.random() < p

    def int(self, low: int, high: int) -> int:
        return self.rng.randint(low, high)

    def randn(self, *shape, scale: float = 1.0) -> torch.Tensor:
        return scale * torch.randn(shape, generator=self.gen, dtype=F64)

    def scale(self, low: int, high: int) -> float:
        return 10.0 ** self.rng.uniform(low, high)

    def odd(self, usual, odd=(math.nan, math.inf, -math.inf)):
        """A value of ``usual``, or rarely one of ``odd`` (NaN and infinities by default)."""
        return self.choice(odd) if self.chance(0.03) else self.choice(usual)


# ----------------------------------------------------------------------------------------------
# the zoo


@dataclass(frozen=True)
class Kind:
    """How to draw modules of one type: ``build(draw, shape)`` for examples of ``shape`` (or
    ``None`` when it does not fit), the ranks of those shapes, whether the module is affine
    (for the dense check), and which adversarial inputs it has (``elementwise`` / ``maxlike``)."""

    build: Callable
    ranks: tuple[int, ...] = (1, 2, 3, 4)
    affine: bool = False
    elementwise: bool = False
    maxlike: bool = False


def _inplace(d: Draw) -> bool:
    return d.chance(0.3)


def _gram_weight(d: Draw, module: nn.Module) -> nn.Module:
    with torch.no_grad():
        module.weight.copy_(make_weight(d.choice(WEIGHT_KINDS), tuple(module.weight.shape), d.gen))
        if module.bias is not None:
            module.bias.copy_(d.randn(*module.bias.shape, scale=d.choice((0.1, 1.0, 1e3))))
    return module


def _conv_geometry(d: Draw, axes: int):
    def per_axis(low, high):
        values = tuple(d.int(low, high) for _ in range(axes))
        return values[0] if axes == 1 or d.chance(0.5) else values

    padding = d.choice(("same", "valid", "int", "int", "axes"))
    padding = {"int": d.int(0, 2), "axes": per_axis(0, 2)}.get(padding, padding)
    stride = 1 if padding == "same" else per_axis(1, 2)
    dilation = per_axis(1, 2) if d.chance(0.3) else 1
    return dict(kernel_size=per_axis(1, 3), stride=stride, padding=padding, dilation=dilation,
                padding_mode=d.choice(("zeros", "zeros", "circular", "reflect", "replicate")))


def _groups(d: Draw, c_in: int, c_out_choices) -> tuple[int, int]:
    groups = d.choice([g for g in (1, 1, 2, 3) if c_in % g == 0])
    return groups, groups * d.choice(c_out_choices)


def build_gram_conv(cls, axes):
    def build(d: Draw, shape):
        groups, c_out = _groups(d, shape[0], (1, 2, 3))
        layer = cls(shape[0], c_out, groups=groups, bias=d.chance(0.5), dtype=F64, **_conv_geometry(d, axes))
        return _gram_weight(d, layer)
    return build


def build_gram_conv_transpose(d: Draw, shape):
    groups, c_out = _groups(d, shape[0], (1, 2, 3))
    stride, dilation = (d.int(1, 2), d.int(1, 2)), ((d.int(1, 2), d.int(1, 2)) if d.chance(0.3) else (1, 1))
    layer = GramConvTranspose2d(shape[0], c_out, (d.int(1, 3), d.int(1, 3)), stride=stride,
                                padding=(d.int(0, 2), d.int(0, 2)),
                                output_padding=tuple(d.int(0, max(s, e) - 1) for s, e in zip(stride, dilation)),
                                groups=groups, bias=d.chance(0.5), dilation=dilation, dtype=F64)
    try:
        layer._input_size(shape[1:])
    except ValueError:  # no output for inputs of this size
        return None
    return _gram_weight(d, layer)


def build_gram_linear(d: Draw, shape):
    return _gram_weight(d, GramLinear(shape[-1], d.int(1, 12), bias=d.chance(0.5), dtype=F64))


def build_gram_residual(d: Draw, shape):
    groups = d.choice([g for g in (1, 1, 2) if shape[0] % g == 0])
    kernel = (d.int(1, 3), d.int(1, 3))
    block = GramResidualConv2d(shape[0], kernel, groups=groups, bias=d.chance(0.5), dtype=F64,
                               padding_mode=d.choice(("zeros", "circular", "reflect", "replicate")))
    _gram_weight(d, block)
    if d.chance(0.3):  # a branch that nearly cancels the identity
        with torch.no_grad():
            block.weight.zero_()
            index = torch.arange(shape[0])
            block.weight[index, index % (shape[0] // groups), (kernel[0] - 1) // 2, (kernel[1] - 1) // 2] = -1.0
            block.weight.add_(d.randn(*block.weight.shape, scale=1e-6))
    return block


def build_input_normalization(d: Draw, shape):
    c = shape[0]
    mean = d.randn(c, scale=d.choice((0.1, 10.0)))
    std = torch.tensor([d.choice((0.2, 0.5, 1.0, 3.0, 1e-4)) for _ in range(c)])
    if d.chance(0.05):
        mean[0] = math.nan
    return InputNormalization(mean, std)


def build_maxmin(d: Draw, shape):
    dims = [axis + 1 for axis, size in enumerate(shape) if size % 2 == 0]
    if not dims:
        return None
    dim = d.choice(dims)
    if d.chance(0.3):
        dim -= len(shape) + 1  # the same dimension counted from the end
    return MaxMin(0 if d.chance(0.05) else dim)


def build_group_sort(d: Draw, shape):
    dim = d.choice([axis + 1 for axis, size in enumerate(shape) if size >= 2] or [None])
    if dim is None:
        return None
    size = shape[dim - 1]
    group_size = d.choice([k for k in range(2, size + 1) if size % k == 0])
    if d.chance(0.3):
        dim -= len(shape) + 1  # the same dimension counted from the end
    return GroupSort(group_size, 0 if d.chance(0.05) else dim)


def _window(d: Draw, size: int):
    """``(kernel, stride, padding)`` of one pooling axis of ``size`` samples."""
    kernel = d.int(1, min(3, size))
    return kernel, d.int(1, 3), d.int(0, kernel // 2)


def build_window_pool(cls):
    def build(d: Draw, shape):
        axes = [_window(d, n) for n in shape[-2:]]
        return cls(tuple(a[0] for a in axes), tuple(a[1] for a in axes), tuple(a[2] for a in axes))
    return build


def build_max_pool(cls, axes):
    def build(d: Draw, shape):
        windows = [_window(d, n) for n in shape[-axes:]]
        kernel, stride, padding = (tuple(w[i] for w in windows) for i in range(3))
        dilation = tuple(d.int(1, 2) if d.chance(0.3) else 1 for _ in range(axes))
        return cls(kernel, stride, padding, dilation, ceil_mode=d.chance(0.3), return_indices=d.chance(0.03))
    return build


def build_avg_pool(cls, axes):
    def build(d: Draw, shape):
        windows = [_window(d, n) for n in shape[-axes:]]
        kernel, stride, padding = (tuple(w[i] for w in windows) for i in range(3))
        extra = dict(divisor_override=d.choice((None, None, 1, 2, 5, -3))) if axes == 2 else {}
        return cls(kernel, stride, padding, ceil_mode=d.chance(0.2), count_include_pad=d.chance(0.8), **extra)
    return build


def build_adaptive(cls, axes):
    def build(d: Draw, shape):
        sizes = tuple(None if d.chance(0.15) else d.int(1, n + 2) for n in shape[-axes:])
        size = sizes[0] if axes == 1 or (sizes[0] == sizes[1] and d.chance(0.5)) else sizes
        extra = dict(return_indices=d.chance(0.03)) if "Max" in cls.__name__ else {}
        return cls(size, **extra)
    return build


def build_batch_norm(cls, lazy=False):
    def build(d: Draw, shape):
        c = shape[0]
        eps = d.choice((1e-5, 1e-5, 1e-3, 0.5, 1e-12, 0.0))
        affine = d.chance(0.7)
        module = cls(eps=eps, affine=affine, dtype=F64) if lazy else cls(c, eps=eps, affine=affine, dtype=F64)
        if lazy:  # one training-mode pass materializes its parameters and statistics
            module(d.randn(4, *shape))
        with torch.no_grad():
            module.running_mean.copy_(d.randn(c, scale=d.scale(-2, 3)))
            variance = d.choice(("usual", "tiny", "zero", "below_zero", "huge"))
            var = {"usual": d.randn(c).abs() + 0.1, "tiny": torch.full((c,), 1e-30, dtype=F64),
                   "zero": torch.zeros(c, dtype=F64), "below_zero": torch.full((c,), -0.5 * eps, dtype=F64),
                   "huge": torch.full((c,), 1e10, dtype=F64)}[variance]
            module.running_var.copy_(var)
            if affine:
                module.weight.copy_(d.randn(c, scale=d.choice((0.1, 1.0, 1e3))))
                module.bias.copy_(d.randn(c, scale=d.choice((0.1, 10.0))))
            if d.chance(0.03):
                module.running_mean[0] = math.nan
        return module
    return build


def build_prelu(d: Draw, shape):
    n = d.choice((1, shape[0]))
    module = nn.PReLU(n, dtype=F64)
    with torch.no_grad():
        module.weight.copy_(d.randn(n, scale=d.choice((0.25, 1.0, 5.0))))
        if d.chance(0.03):
            module.weight[0] = math.nan
    return module


def build_rrelu(d: Draw, shape):
    lower, upper = sorted((d.odd((0.0, 0.1, 1.0 / 8, 0.5, -2.0, 3.0)), d.odd((1.0 / 3, 0.9, 2.0, 7.0, -0.5))))
    return nn.RReLU(lower, upper, inplace=_inplace(d))


def build_softplus(d: Draw, shape):
    beta = d.odd((1.0, 0.5, 3.0, 50.0, -2.0, 1e-3), (0.0, math.nan, math.inf))
    return nn.Softplus(beta, d.choice((20.0, 33.9, 34.0, 40.0, 1e3)))


def build_threshold(d: Draw, shape):
    threshold = d.odd((0.0, -1.0, 0.5, 2.0))
    return nn.Threshold(threshold, threshold if d.chance(0.6) else d.choice((0.0, -3.0, 1.0)), inplace=_inplace(d))


def build_hardtanh(d: Draw, shape):
    low = d.odd((-1.0, -2.0, 0.0, -math.inf, -0.5), (math.nan,))
    return nn.Hardtanh(low, d.choice((1.0, 2.0, 0.5, math.inf)), inplace=_inplace(d))


def build_flatten(d: Draw, shape):
    ndim = len(shape) + 1
    start = d.choice(range(0 if d.chance(0.1) else 1, ndim))
    end = d.choice(range(start, ndim))
    if d.chance(0.3):
        start, end = start - ndim, end - ndim
    return nn.Flatten(start, end)


def build_unflatten(d: Draw, shape):
    axis = d.choice(range(len(shape)))
    size = shape[axis]
    factors = [f for f in range(1, size + 1) if size % f == 0]
    first = d.choice(factors)
    dim = 0 if d.chance(0.05) else axis + 1
    return nn.Unflatten(dim, (first, size // first) if d.chance(0.8) else (first, -1))


def build_pad(cls, axes, mode):
    def build(d: Draw, shape):
        pads = tuple(d.choice((0, 1, 2, 3, -1) if axes < 3 else (0, 1, -1)) for _ in range(2 * axes))
        pads = pads[0] if d.chance(0.3) else pads
        return cls(pads, d.choice((0.0, 1.5, -7.0))) if mode == "constant" else cls(pads)
    return build


def build_pixel_shuffle(d: Draw, shape):
    r = d.choice([r for r in (1, 2, 3) if shape[-3] % (r * r) == 0])
    return nn.PixelShuffle(r)


def build_pixel_unshuffle(d: Draw, shape):
    options = [r for r in (1, 2, 3) if shape[-1] % r == 0 and shape[-2] % r == 0]
    return nn.PixelUnshuffle(d.choice(options))


def build_channel_shuffle(d: Draw, shape):
    return nn.ChannelShuffle(d.choice([g for g in (1, 2, 3, 4) if shape[0] % g == 0]))


def build_upsample(d: Draw, shape):
    axes = len(shape) - 1
    modes = ("nearest", "nearest", "nearest-exact", "nearest-exact") + {
        1: ("linear",), 2: ("bilinear", "bicubic"), 3: ("trilinear",)}.get(axes, ()) + ("area",)
    mode = d.choice(modes)
    if d.chance(0.4):
        size = tuple(d.int(1, 2 * n + 1) for n in shape[1:])
        return nn.Upsample(size=size[0] if d.chance(0.3) else size, mode=mode)
    factor = d.choice((2, 3, 1.5, 0.5, 0.7, 2.25, (2, 1, 3)[:axes] if axes > 1 else 2))
    return nn.Upsample(scale_factor=factor, mode=mode, recompute_scale_factor=d.choice((None, True)))


def build_upsampling2d(cls):
    def build(d: Draw, shape):
        if d.chance(0.5):
            return cls(size=(d.int(1, 2 * shape[1]), d.int(1, 2 * shape[2])))
        return cls(scale_factor=d.choice((1, 2, 3)))
    return build


def _dropout(cls):
    return lambda d, shape: cls(d.choice((0.0, 0.3, 0.9)), inplace=_inplace(d))


def _plain(cls, **options):
    """``cls(**{name: draw(d)})`` for the ``options`` ``name=draw``."""
    def build(d: Draw, shape):
        extra = {key: draw(d) for key, draw in options.items()}
        return cls(**extra)
    return build


# Containers: a drawn chain inside (see draw_chain), built by draw_module.
CONTAINERS = (nn.Sequential, GramSequential, ConvexResidual)

ZOO: dict[type, Kind] = {
    # lipnet's layers
    GramLinear: Kind(build_gram_linear, affine=True),
    GramConv1d: Kind(build_gram_conv(GramConv1d, 1), ranks=(2,), affine=True),
    GramConv2d: Kind(build_gram_conv(GramConv2d, 2), ranks=(3,), affine=True),
    GramConvTranspose2d: Kind(build_gram_conv_transpose, ranks=(3,), affine=True),
    GramResidualConv2d: Kind(build_gram_residual, ranks=(3,), affine=True),
    InputNormalization: Kind(build_input_normalization, affine=True),
    MaxMin: Kind(build_maxmin, maxlike=True),
    GroupSort: Kind(build_group_sort, maxlike=True),
    L2NormPool2d: Kind(build_window_pool(L2NormPool2d), ranks=(3,), maxlike=True),
    ScaledAvgPool2d: Kind(build_window_pool(ScaledAvgPool2d), ranks=(3,), affine=True),
    GlobalL2NormPool2d: Kind(_plain(GlobalL2NormPool2d), ranks=(3,), maxlike=True),
    GlobalScaledAvgPool2d: Kind(_plain(GlobalScaledAvgPool2d), ranks=(3,), affine=True),
    # containers
    nn.Sequential: Kind(None, affine=True),
    GramSequential: Kind(None, affine=True),
    ConvexResidual: Kind(None, affine=True),
    # elementwise activations
    nn.ReLU: Kind(_plain(nn.ReLU, inplace=_inplace), elementwise=True),
    nn.ReLU6: Kind(_plain(nn.ReLU6, inplace=_inplace), elementwise=True),
    nn.Hardtanh: Kind(build_hardtanh, elementwise=True),
    nn.Tanh: Kind(_plain(nn.Tanh), elementwise=True),
    nn.Softsign: Kind(_plain(nn.Softsign), elementwise=True),
    nn.Sigmoid: Kind(_plain(nn.Sigmoid), elementwise=True),
    nn.LeakyReLU: Kind(_plain(nn.LeakyReLU, negative_slope=lambda d: d.odd((0.01, 0.2, -0.5, 1.0, 2.5, 10.0, -3.0)),
                              inplace=_inplace), elementwise=True),
    nn.ELU: Kind(_plain(nn.ELU, alpha=lambda d: d.odd((1.0, 0.5, 3.0, -2.0, 0.0)), inplace=_inplace),
                 elementwise=True),
    nn.CELU: Kind(_plain(nn.CELU, alpha=lambda d: d.odd((1.0, 0.3, 4.0, -1.0)), inplace=_inplace), elementwise=True),
    nn.SELU: Kind(_plain(nn.SELU, inplace=_inplace), elementwise=True),
    nn.GELU: Kind(_plain(nn.GELU, approximate=lambda d: d.choice(("none", "tanh"))), elementwise=True),
    nn.SiLU: Kind(_plain(nn.SiLU, inplace=_inplace), elementwise=True),
    nn.Mish: Kind(_plain(nn.Mish, inplace=_inplace), elementwise=True),
    nn.Hardswish: Kind(_plain(nn.Hardswish, inplace=_inplace), elementwise=True),
    nn.Hardsigmoid: Kind(_plain(nn.Hardsigmoid, inplace=_inplace), elementwise=True),
    nn.LogSigmoid: Kind(_plain(nn.LogSigmoid), elementwise=True),
    nn.Tanhshrink: Kind(_plain(nn.Tanhshrink), elementwise=True),
    nn.Softshrink: Kind(_plain(nn.Softshrink, lambd=lambda d: d.choice((0.0, 0.5, 2.0))), elementwise=True),
    nn.Hardshrink: Kind(_plain(nn.Hardshrink, lambd=lambda d: d.choice((0.0, -0.5, 0.5, 2.0))), elementwise=True),
    nn.Softplus: Kind(build_softplus, elementwise=True),
    nn.PReLU: Kind(build_prelu, ranks=(1, 2, 3, 4), elementwise=True),
    nn.RReLU: Kind(build_rrelu, elementwise=True),
    nn.Threshold: Kind(build_threshold, elementwise=True),
    # identities in eval mode, rearrangements
    nn.Identity: Kind(_plain(nn.Identity), affine=True),
    nn.Dropout: Kind(_dropout(nn.Dropout), affine=True),
    nn.Dropout1d: Kind(_dropout(nn.Dropout1d), ranks=(2,), affine=True),
    nn.Dropout2d: Kind(_dropout(nn.Dropout2d), ranks=(3,), affine=True),
    nn.Dropout3d: Kind(_dropout(nn.Dropout3d), ranks=(4,), affine=True),
    nn.AlphaDropout: Kind(_dropout(nn.AlphaDropout), affine=True),
    nn.FeatureAlphaDropout: Kind(_dropout(nn.FeatureAlphaDropout), ranks=(2, 3, 4), affine=True),
    nn.Flatten: Kind(build_flatten, affine=True),
    nn.Unflatten: Kind(build_unflatten, affine=True),
    # BatchNorm in eval mode
    nn.BatchNorm1d: Kind(build_batch_norm(nn.BatchNorm1d), ranks=(1, 2), affine=True),
    nn.BatchNorm2d: Kind(build_batch_norm(nn.BatchNorm2d), ranks=(3,), affine=True),
    nn.BatchNorm3d: Kind(build_batch_norm(nn.BatchNorm3d), ranks=(4,), affine=True),
    nn.LazyBatchNorm1d: Kind(build_batch_norm(nn.LazyBatchNorm1d, lazy=True), ranks=(1, 2), affine=True),
    nn.LazyBatchNorm2d: Kind(build_batch_norm(nn.LazyBatchNorm2d, lazy=True), ranks=(3,), affine=True),
    nn.LazyBatchNorm3d: Kind(build_batch_norm(nn.LazyBatchNorm3d, lazy=True), ranks=(4,), affine=True),
    nn.SyncBatchNorm: Kind(build_batch_norm(nn.SyncBatchNorm), ranks=(2, 3, 4), affine=True),
    # pooling
    nn.MaxPool1d: Kind(build_max_pool(nn.MaxPool1d, 1), ranks=(1, 2), maxlike=True),
    nn.MaxPool2d: Kind(build_max_pool(nn.MaxPool2d, 2), ranks=(2, 3), maxlike=True),
    nn.AvgPool1d: Kind(build_avg_pool(nn.AvgPool1d, 1), ranks=(1, 2), affine=True),
    nn.AvgPool2d: Kind(build_avg_pool(nn.AvgPool2d, 2), ranks=(2, 3), affine=True),
    nn.AdaptiveAvgPool1d: Kind(build_adaptive(nn.AdaptiveAvgPool1d, 1), ranks=(1, 2), affine=True),
    nn.AdaptiveAvgPool2d: Kind(build_adaptive(nn.AdaptiveAvgPool2d, 2), ranks=(2, 3), affine=True),
    nn.AdaptiveMaxPool1d: Kind(build_adaptive(nn.AdaptiveMaxPool1d, 1), ranks=(1, 2), maxlike=True),
    nn.AdaptiveMaxPool2d: Kind(build_adaptive(nn.AdaptiveMaxPool2d, 2), ranks=(2, 3), maxlike=True),
    # maps that copy entries
    nn.PixelShuffle: Kind(build_pixel_shuffle, ranks=(3, 4), affine=True),
    nn.PixelUnshuffle: Kind(build_pixel_unshuffle, ranks=(3, 4), affine=True),
    nn.ChannelShuffle: Kind(build_channel_shuffle, ranks=(2, 3, 4), affine=True),
    nn.Upsample: Kind(build_upsample, ranks=(2, 3, 4), affine=True),
    nn.UpsamplingNearest2d: Kind(build_upsampling2d(nn.UpsamplingNearest2d), ranks=(3,), affine=True),
    nn.UpsamplingBilinear2d: Kind(build_upsampling2d(nn.UpsamplingBilinear2d), ranks=(3,), affine=True),
    # torch's copying pads take inputs with or without a batch dimension only: ranks axes, axes + 1
    **{cls: Kind(build_pad(cls, axes, mode), ranks=(axes, axes + 1) if mode == "copy" else tuple(range(axes, 5)),
                 affine=True)
       for mode, classes in (("zero", (nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d)),
                             ("constant", (nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d)),
                             ("copy", (nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d)),
                             ("copy", (nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d)),
                             ("copy", (nn.CircularPad1d, nn.CircularPad2d, nn.CircularPad3d)))
       for axes, cls in enumerate(classes, start=1)},
}


# Traps: modules lipnet.certify must refuse, with the error it must raise.


class _TripledReLU(nn.ReLU):
    """A registered type's subclass with another forward: its rule no longer applies."""

    def forward(self, x):
        return 3 * super().forward(x)


class _DoubledGramLinear(GramLinear):
    """A Gram layer whose forward is overridden but whose bound is inherited."""

    def forward(self, x):
        return 2 * super().forward(x)


def _hooked(d: Draw, shape):
    module = nn.ReLU()
    module.register_forward_hook(lambda module, args, out: 5 * out)
    return module


def _patched(d: Draw, shape):
    module = nn.Tanh()
    module.forward = lambda x: 4 * torch.tanh(x)
    return module


TRAPS: dict[str, tuple[Callable, type, tuple[int, ...]]] = {
    "Conv2d": (lambda d, s: nn.Conv2d(s[0], 2, 1, dtype=F64), UnknownModuleError, (3,)),
    "Linear": (lambda d, s: nn.Linear(s[-1], 3, dtype=F64), UnknownModuleError, (1, 2, 3, 4)),
    "LayerNorm": (lambda d, s: nn.LayerNorm(s[-1], dtype=F64), UnknownModuleError, (1, 2, 3, 4)),
    "Softmax": (lambda d, s: nn.Softmax(dim=-1), UnknownModuleError, (1, 2, 3, 4)),
    "InstanceNorm2d": (lambda d, s: nn.InstanceNorm2d(s[0], dtype=F64), UnknownModuleError, (3,)),
    "MaxPool3d": (lambda d, s: nn.MaxPool3d(1), UnknownModuleError, (4,)),
    "TripledReLU": (lambda d, s: _TripledReLU(), UnknownModuleError, (1, 2, 3, 4)),
    "DoubledGramLinear": (lambda d, s: _DoubledGramLinear(s[-1], 3, dtype=F64), LipschitzBoundError, (1, 2, 3, 4)),
    "hooked ReLU": (_hooked, LipschitzBoundError, (1, 2, 3, 4)),
    "patched Tanh": (_patched, LipschitzBoundError, (1, 2, 3, 4)),
    # padding of more axes than an example has would pad the batch
    "ZeroPad2d on (F,)": (lambda d, s: nn.ZeroPad2d(1), LipschitzBoundError, (1,)),
    "ConstantPad3d on (C, L)": (lambda d, s: nn.ConstantPad3d(1, 2.0), LipschitzBoundError, (2,)),
}
#: Accepted types whose every module in the zoo is refused, and why: covered by a refusal.
ALWAYS_REFUSED = {
    nn.UpsamplingBilinear2d: "it interpolates (mode='bilinear'), which the rule of nn.Upsample refuses",
}


def rule_of(cls: type):
    """What lipnet.certify bounds ``cls`` with: a registered rule, a ``lipschitz_bound`` method or a
    composite (the key under which it is found), or ``None`` (as ``lipschitz._lookup``)."""
    for table in (_REGISTRY, _COMPOSITES):
        for base in cls.__mro__:
            if base in table and (base is cls or getattr(cls, "forward", None) is getattr(base, "forward", None)):
                return base
    if callable(getattr(cls, "lipschitz_bound", None)):
        return cls
    return None


def _public_types() -> list[type]:
    classes = [getattr(nn, name) for name in dir(nn)] + [getattr(lipnet.nn, name) for name in lipnet.nn.__all__]
    return [c for c in classes if isinstance(c, type) and issubclass(c, nn.Module)]


def accepted_types() -> dict[type, type]:
    """``{type: rule key}`` for every public ``torch.nn`` and ``lipnet.nn`` module type that
    lipnet.certify accepts, and every type registered from torch or lipnet."""
    types = {cls: rule_of(cls) for cls in _public_types() if rule_of(cls) is not None}
    for key in _REGISTRY:
        if key.__module__.split(".")[0] in ("torch", "lipnet") and key not in types.values():
            types.setdefault(key, key)
    return types


def zoo() -> dict[type, Kind]:
    """:data:`ZOO`, plus a default-constructed kind for each accepted type it has no builder for."""
    kinds = dict(ZOO)
    for cls in accepted_types():
        if cls not in kinds:
            kinds[cls] = Kind(lambda d, shape, cls=cls: cls())
    return kinds


def rotation() -> list:
    """The types and traps the seeds force in turn, in a fixed order."""
    return sorted(zoo(), key=lambda c: (c.__module__, c.__qualname__)) + sorted(TRAPS)


def _name(item) -> str:
    return item if isinstance(item, str) else item.__qualname__


# ----------------------------------------------------------------------------------------------
# drawing networks


@dataclass
class Log:
    """What a case drew and measured."""

    checked: set = field(default_factory=set)  # types (as drawn) in a certified network
    drawn: dict = field(default_factory=dict)  # id(module) -> (module, the type it was drawn as)
    refused: Counter = field(default_factory=Counter)  # type -> refusals
    rejected: Counter = field(default_factory=Counter)  # type -> draws torch (or the budget) rejected


def _run(module, shape, batch=2):
    with torch.no_grad():
        return module(torch.zeros(batch, *shape, dtype=F64)), module(torch.randn(batch, *shape, dtype=F64))


def _runs_alone(module, shape) -> bool:
    """Whether ``module`` runs on one example too (torch's circular padding with cropping fails
    on some batches of one, which lipschitz_bound's dry run uses)."""
    try:
        _run(module, shape, batch=1)
    except Exception:
        return False
    return True


def _validated(module, shape, budget) -> tuple | None:
    """The output shape of ``module`` on examples of ``shape``, or ``None`` when torch rejects it
    or it leaves the budget."""
    try:
        outputs = _run(module, shape)
    except Exception:  # torch refuses the hyperparameters on this shape
        return None
    out = outputs[0]
    if not _runs_alone(module, shape):
        return None
    if not torch.is_tensor(out):
        return ("not a tensor",)
    if not 2 <= out.dim() <= 5 or out.shape[0] != 2 or not 1 <= out[0].numel() <= budget.max_numel:
        return None
    return tuple(out.shape[1:])


def certify_alone(module, shape, expected: type | None, log: Log, what: str) -> float | None:
    """``lipschitz_bound(module, shape)``; a refusal recorded (and checked to be a
    LipschitzBoundError, or ``expected``), any other exception a crash."""
    try:
        bound = lipschitz_bound(module, shape)
    except LipschitzBoundError as error:
        str(error)  # the message must render
        if expected is not None and not isinstance(error, expected):
            raise Violation(f"refusal: {what} on {shape} raised {type(error).__name__} ({error}), expected "
                            f"{expected.__name__}")
        log.refused[what] += 1
        return None
    except Exception as error:
        raise Violation(f"crash: lipschitz_bound of {what} {module} on {shape} raised {type(error).__name__}: "
                        f"{error}\n{traceback.format_exc()}") from error
    if expected is not None:
        raise Violation(f"refusal: {what} on {shape} was bounded by {bound!r}, expected {expected.__name__}")
    return bound


def draw_module(d: Draw, shape, kinds: dict, budget: Budget, log: Log, item=None, depth=0,
                preserve=False) -> tuple | None:
    """An accepted module for examples of ``shape`` and its output shape, or ``None``.

    ``item``: the type (or trap name) to draw, else a random one. Traps are certified and
    never returned."""
    if item is None:
        item = d.choice(sorted(TRAPS)) if d.chance(0.03) else d.choice(
            [c for c, k in kinds.items() if len(shape) in k.ranks and (depth < 2 or c not in CONTAINERS)])
    if isinstance(item, str):
        build, expected, ranks = TRAPS[item]
        if len(shape) not in ranks:
            return None
        module = build(d, shape).double().eval()
        try:
            _run(module, shape)
        except Exception:  # torch refuses it on this shape
            return None
        certify_alone(module, shape, expected, log, item)
        return None
    kind = kinds[item]
    if len(shape) not in kind.ranks:
        return None
    if item in CONTAINERS:
        module, out = _draw_container(d, item, shape, kinds, budget, log, depth)
    else:
        try:
            module = kind.build(d, shape)
        except (ValueError, TypeError, RuntimeError, ZeroDivisionError, IndexError):
            module = None  # torch refuses the hyperparameters (or none fits the shape)
        if module is None:
            log.rejected[_name(item)] += 1
            return None
        module = module.double().eval()
        out = _validated(module, shape, budget)
    if out is None or (preserve and out != shape):
        log.rejected[_name(item)] += 1
        return None
    if certify_alone(module, shape, None, log, _name(item)) is None:
        return None
    if out == ("not a tensor",):  # bounded alone (its values'), refused when it passes the tuple on
        certify_alone(nn.Sequential(module, nn.Identity()), shape, LipschitzBoundError, log,
                      f"{_name(item)} passing on a tuple")
        return None
    log.drawn[id(module)] = (module, item)  # a lazy module has changed its class; the reference keeps the id
    return module, out


def draw_chain(d: Draw, shape, length: int, kinds, budget, log, depth=0, preserve=False, forced=None, forced_at=-1):
    """``(modules, output shape)``: up to ``length`` accepted modules chained from ``shape``,
    the one at ``forced_at`` of type ``forced`` when it can be drawn."""
    modules = []
    for i in range(length):
        item = forced if i == forced_at else None
        for _ in range(1 if isinstance(item, str) or item in ALWAYS_REFUSED else 30 if item is not None else 6):
            drawn = draw_module(d, shape, kinds, budget, log, item, depth, preserve=preserve)
            if drawn is not None:
                modules.append(drawn[0])
                shape = drawn[1]
                break
        else:
            if item is not None and not (isinstance(item, str) and log.refused[item]):
                forced_at += 1  # it does not fit this shape: try after the next module
    return modules, shape


def _draw_container(d: Draw, cls, shape, kinds, budget, log, depth):
    if cls is ConvexResidual:
        # Half of the branches start with an activation, as in pre-activation blocks x + f(relu(x)).
        activations = [c for c, k in kinds.items() if k.elementwise]
        first = d.choice(activations) if activations and d.chance(0.5) else None
        branch, out = draw_chain(d, shape, d.int(1, 2), kinds, budget, log, depth + 1, preserve=True, forced=first,
                                 forced_at=0 if first is not None else -1)
        if not branch:
            return None, None
        alpha = d.choice((0.5, 0.1, 0.9, 1e-6, 1 - 1e-6, 0.3))
        return ConvexResidual(nn.Sequential(*branch) if len(branch) > 1 or d.chance(0.5) else branch[0], alpha=alpha,
                              learnable=d.chance(0.5), dtype=F64), out
    modules, out = draw_chain(d, shape, d.int(1, 3), kinds, budget, log, depth + 1)
    if not modules:
        return None, None
    return (GramSequential(*modules, stack_bounds=d.choice((None, True))) if cls is GramSequential
            else nn.Sequential(*modules)), out


def draw_input_shape(d: Draw, rank: int, budget: Budget) -> tuple[int, ...]:
    while True:
        shape = tuple(d.int(1, 4) if axis == 0 and rank > 1 else d.int(1, 8 if rank < 3 else 5) for axis in range(rank))
        if rank == 1:
            shape = (d.int(1, 12),)
        if math.prod(shape) <= budget.max_numel:
            return shape


def draw_network(seed: int, budget: Budget, forced=None, kinds: dict | None = None):
    """``(model, input shape, affine, log)``: the case of ``seed`` (forcing ``forced``, by default
    the seed's type of :func:`rotation`), drawn from ``kinds`` (:func:`zoo`)."""
    d = Draw(seed)
    items = rotation()
    forced = items[seed % len(items)] if forced is None else forced
    kinds = zoo() if kinds is None else kinds
    affine = d.chance(0.3) and (isinstance(forced, str) or kinds[forced].affine)
    if affine:
        kinds = {c: k for c, k in kinds.items() if k.affine}
    ranks = TRAPS[forced][2] if isinstance(forced, str) else kinds[forced].ranks
    shape = draw_input_shape(d, d.choice(ranks), budget)
    length = d.choice((1, 1, *range(2, budget.max_length + 1)))
    log = Log()
    modules, _ = draw_chain(d, shape, length, kinds, budget, log, forced=forced, forced_at=d.int(0, min(1, length - 1)))
    container = GramSequential if d.chance(0.3) else nn.Sequential
    model = container(*modules) if modules else nn.Sequential(nn.Identity())
    model.requires_grad_(False)
    return model.eval(), shape, affine, log


# ----------------------------------------------------------------------------------------------
# measurements


def jacobian(fn, x: torch.Tensor) -> torch.Tensor:
    """The Jacobian ``(outputs, inputs)`` of ``fn`` on one example ``x`` (no batch dimension)."""
    return torch.autograd.functional.jacobian(lambda v: fn(v.unsqueeze(0)).flatten(), x).reshape(-1, x.numel())


def top_singular(matrix: torch.Tensor) -> tuple[float, torch.Tensor]:
    """``(sigma_max, right singular vector)`` of ``matrix`` (float64)."""
    scale = float(matrix.abs().max()) if matrix.numel() else 0.0
    if scale == 0.0 or not math.isfinite(scale):
        return (scale if not math.isfinite(scale) else 0.0), torch.zeros(matrix.shape[1], dtype=F64)
    _, s, vh = torch.linalg.svd(matrix / scale, full_matrices=False)
    return float(s[0]) * scale, vh[0]


def cancellation(model: nn.Module, shape) -> float:
    """The product over the model's Gram layers of ``max(1, || |A| || / bound)``, ``A`` the operator
    the layer applies, ``|A|`` the same operator with ``|W|``: how much larger than the
    certificate the magnitudes its products sum can be. ``|| |A| || <= sqrt(||A||_1 ||A||_inf)``
    (a nonnegative operator), its row sums ``|A| 1`` and column sums ``|A|^T 1``."""
    inputs, handles = {}, []
    for module in model.modules():
        if isinstance(module, GramNormalized):
            handles.append(module.register_forward_pre_hook(
                lambda m, args: inputs.setdefault(m, tuple(args[0].shape[1:])) and None))
    try:
        with torch.no_grad():
            model(torch.zeros(1, *shape, dtype=F64))
    finally:
        for handle in handles:
            handle.remove()
    factor = 1.0
    for module, in_shape in inputs.items():
        if isinstance(module, nn.Linear):
            weight = module.normalized_weight().abs()
            apply = lambda x, w=weight: F.linear(x, w)  # noqa: E731
            bound = module.lipschitz_bound()
        elif isinstance(module, GramConvTranspose2d):
            weight = module.normalized_weight(in_shape[1:]).abs()
            apply = lambda x, m=module, w=weight: F.conv_transpose2d(  # noqa: E731
                x, w, None, m.stride, m.padding, m.output_padding, m.groups, m.dilation)
            bound = module.lipschitz_bound(in_shape[1:])
        else:
            size = in_shape[1] if isinstance(module, GramConv1d) else in_shape[1:]
            weight = module.normalized_weight(size).abs()
            apply = lambda x, m=module, w=weight: m._conv_forward(x, w, None)  # noqa: E731
            bound = module.lipschitz_bound(size)
        x = torch.ones(1, *in_shape, dtype=F64, requires_grad=True)
        with torch.enable_grad():
            rows = apply(x)
            (columns,) = torch.autograd.grad(rows.sum(), x)
        magnitude = math.sqrt(float(rows.max()) * float(columns.max())) if rows.numel() else 0.0
        factor *= max(1.0, magnitude / bound) if bound > 0 else (math.inf if magnitude > 0 else 1.0)
    return factor


def sites(module: nn.Module, prefix, shape):
    """``(leaf, prefix, shape)`` for every leaf module of the model: ``prefix`` maps a batch of
    the model's inputs to the leaf's inputs, of ``shape`` per example."""
    if isinstance(module, nn.Sequential):
        for child in module:
            yield from sites(child, prefix, shape)
            prefix = (lambda p, m: lambda x: m(p(x)))(prefix, child)
            with torch.no_grad():
                shape = tuple(child(torch.zeros(1, *shape, dtype=F64)).shape[1:])
    elif isinstance(module, ConvexResidual):
        yield from sites(module.branch, prefix, shape)
    else:
        yield module, prefix, shape


GRID = torch.cat([torch.linspace(-8, 8, 641, dtype=F64), torch.logspace(-7, 3, 60, dtype=F64),
                  -torch.logspace(-7, 3, 60, dtype=F64), torch.tensor([0.0, 34.0, 40.0, -34.0], dtype=F64)]).unique()


def elementwise_profile(module, shape):
    """``(grid, values, slopes)``: the module on inputs whose entries all equal each grid value,
    and its derivative per entry, shapes ``(G,)``, ``(G, *shape)``, ``(G, *shape)``."""
    x = GRID.view(-1, *[1] * len(shape)).expand(-1, *shape).clone().requires_grad_(True)
    with torch.enable_grad():
        y = module(x.clone())
        (slopes,) = torch.autograd.grad(y.sum(), x)
    return GRID, y.detach(), slopes


def elementwise_targets(module, shape, d: Draw, bound: float) -> list[torch.Tensor]:
    """Inputs of ``module`` at each entry's steepest slope, at its sharpest kink, and mixed; and
    the ``slope`` check of its difference quotients on the grid."""
    grid, values, slopes = elementwise_profile(module, shape)
    step = (grid[1:] - grid[:-1]).view(-1, *[1] * len(shape))
    quotient = (values[1:] - values[:-1]).abs() / step
    rounding = 4 * UNIT_ROUNDOFF * (values[1:].abs() + values[:-1].abs()) / step
    excess = (quotient - rounding).nan_to_num(nan=math.inf).max()
    if not float(excess) <= bound * (1 + 1e-9):
        where = int((quotient - rounding).flatten(1).max(dim=1).values.nan_to_num(nan=math.inf).argmax())
        raise Violation(f"slope: {module} has difference quotient {float(excess)!r} > its bound {bound!r} between "
                        f"{float(grid[where])!r} and {float(grid[where + 1])!r}")
    size = grid.view(-1, *[1] * len(shape)).abs()
    top = slopes.abs().amax(dim=0, keepdim=True)
    # the steepest point nearest zero (a PReLU slope holds on a half-line), refined on a finer grid
    steep = grid[((slopes.abs() >= top * (1 - 1e-12)) * (1e9 - size)).argmax(dim=0)]
    offsets = torch.linspace(-0.03, 0.03, 61, dtype=F64).view(-1, *[1] * len(shape))
    local = (steep + offsets).requires_grad_(True)
    with torch.enable_grad():
        (local_slopes,) = torch.autograd.grad(module(local.clone()).sum(), local)
    steep = local.detach().gather(0, local_slopes.abs().argmax(dim=0, keepdim=True))[0]
    sharpest = (slopes[1:] - slopes[:-1]).abs().argmax(dim=0)  # the midpoint of the largest change of slope
    kinks = (grid[sharpest] + grid[sharpest + 1]) / 2
    mixed = torch.where(torch.rand(shape, generator=d.gen, dtype=F64) < 0.5, steep, kinks)
    return [steep, kinks, mixed]


def maxlike_targets(module, shape, d: Draw) -> list[torch.Tensor]:
    """Ties (a constant input; MaxMin's halves equal) and isolated positive spikes on zero."""
    constant = torch.full(shape, d.choice((1.0, -2.5, 0.0)), dtype=F64)
    spikes = torch.zeros(shape, dtype=F64)
    flat = spikes.view(-1)
    flat[torch.randperm(flat.numel(), generator=d.gen)[:max(1, flat.numel() // 9)]] = 3.0
    targets = [spikes, constant]
    if isinstance(module, MaxMin):
        axis = module.dim - 1 if module.dim > 0 else module.dim
        half = d.randn(*shape).chunk(2, dim=axis)[0]
        targets.insert(0, torch.cat((half, half), dim=axis))
    return targets


def reach(prefix, target: torch.Tensor, in_shape, d: Draw, steps: int = 4) -> torch.Tensor:
    """An input whose image under ``prefix`` is near ``target`` (Gauss-Newton, least squares)."""
    x = d.randn(*in_shape, scale=0.1)
    for _ in range(steps):
        with torch.no_grad():
            residual = (prefix(x.unsqueeze(0))[0] - target).flatten()
        if not bool(torch.isfinite(residual).all()) or float(residual.norm()) <= 1e-12 * (1 + float(target.norm())):
            break
        jac = jacobian(prefix, x)
        if not bool(torch.isfinite(jac).all()):
            break
        step = torch.linalg.lstsq(jac, -residual.unsqueeze(1), driver="gelsd").solution[:, 0].view(in_shape)
        if not bool(torch.isfinite(step).all()) or float(step.norm()) > 1e6 * (1 + float(x.norm())):
            break  # the prefix is flat there: keep the last point
        x = x + step
    return x


def out_of_place(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose in-place modules are not: autograd refuses to differentiate
    through a tensor overwritten in place. It computes the same values, except where a
    ``ConvexResidual``'s branch overwrites the block's input (which the ``pairs`` check of the
    model itself sees)."""
    twin = copy.deepcopy(model)
    for module in twin.modules():
        if getattr(module, "inplace", False):
            module.inplace = False
    return twin


class Checker:
    """The checks of one certified network (module docstring)."""

    def __init__(self, model, shape, bound, record, noise):
        self.model, self.shape, self.bound, self.record = model, shape, bound, record
        self.twin = out_of_place(model)
        constants = sum(isinstance(module, FLOAT32_BACKWARD) for module in model.modules())
        self.backward_slack = (1 + BACKWARD_CONSTANT_TOL) ** constants
        self.noise = noise  # L times the cancellation factor
        self.ratios: dict[str, float] = {}

    def f(self, x):
        """The model, differentiable (:func:`out_of_place`)."""
        return self.twin(x)

    def note(self, path, value):
        if not value <= self.ratios.get(path, -math.inf):
            self.ratios[path] = value

    def outputs_with_error(self, x):
        with torch.no_grad():
            y, err = forward_with_error_bound(self.model, x.clone(), self.record)
        if not bool(torch.isfinite(y).all()):
            i = int((~torch.isfinite(y.flatten(1))).any(dim=1).nonzero()[0, 0])
            raise Violation(f"finite: the certified network (bound {self.bound!r}) outputs "
                            f"{y[i].flatten().tolist()[:8]} on an input of norm {float(x[i].norm())!r}")
        return y, err

    def jacobian_at(self, x, what) -> tuple[float, torch.Tensor]:
        jac = jacobian(self.f, x)
        norm, direction = top_singular(jac)
        allowed = self.bound * self.backward_slack + JACOBIAN_TOL * self.noise
        if not norm <= allowed:
            raise Violation(f"jacobian: ||J|| = {norm!r} > certified {self.bound!r} (allowance "
                            f"{allowed - self.bound:.3g}) at {what} point of norm {float(x.norm())!r}")
        self.note("jacobian", norm / self.bound if self.bound else (0.0 if norm == 0 else math.inf))
        return norm, direction.view(x.shape)

    def pairs(self, x, y, what):
        """``||f(x) - f(y)|| <= L ||x - y|| + err(x) + err(y)``, for batches ``x``, ``y``."""
        out, err = self.outputs_with_error(torch.cat((x, y)))
        n = len(x)
        diff = (out[:n] - out[n:]).flatten(1).norm(dim=1) * (1 - 1e-12)
        dist = (x - y).flatten(1).norm(dim=1)
        allowed = self.bound * dist * (1 + 1e-12) + err[:n] + err[n:] + math.ulp(0.0)
        bad = ~(diff <= allowed)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise Violation(f"pairs: ||f(x) - f(y)|| = {float(diff[i])!r} > L ||x - y|| + err = {float(allowed[i])!r} "
                            f"(L = {self.bound!r}, ||x - y|| = {float(dist[i])!r}, err {float(err[i])!r} + "
                            f"{float(err[n + i])!r}) on a {what} pair, ||x|| = {float(x[i].norm())!r}")
        useful = (err[:n] + err[n:]) < 1e-9 * self.bound * dist  # ratios where rounding cannot show
        if bool(useful.any()) and self.bound > 0:
            self.note("pairs", float((diff / (self.bound * dist))[useful].max()))

    def batch(self, x):
        """Each example's output alone equals its output within a batch (within the rounding bound)."""
        together, err = self.outputs_with_error(x)
        for i in range(len(x)):
            alone, err_alone = self.outputs_with_error(x[i:i + 1])
            gap = float((together[i] - alone[0]).norm())
            if not gap <= float(err[i] + err_alone[0]) + math.ulp(0.0):
                raise Violation(f"batch: example {i}'s output moves by {gap!r} with the rest of its batch (rounding "
                                f"bound {float(err[i] + err_alone[0])!r})")

    def dense(self):
        """The norm of ``e_i -> f(e_i) - f(0)`` (an affine network), less its rounding, <= L."""
        n = math.prod(self.shape)
        basis = torch.cat((torch.zeros(1, n, dtype=F64), torch.eye(n, dtype=F64))).view(n + 1, *self.shape)
        out, err = self.outputs_with_error(basis)
        columns = (out[1:] - out[:1]).flatten(1).T
        exact = sigma_max(columns)
        rounding = float(((err[1:] + err[0]) ** 2).sum().sqrt()) * (1 + 1e-9) + 1e-12 * self.bound
        if not exact <= self.bound + rounding:
            raise Violation(f"dense: the composed operator has norm {exact!r} > certified {self.bound!r} (rounding "
                            f"allowance {rounding:.3g})")
        if rounding < 1e-9 * self.bound:  # a ratio where rounding cannot show
            self.note("dense", exact / self.bound if self.bound else 0.0)

    def ascent(self, x, direction, steps):
        """Gradient ascent of ``||f(x + h) - f(x)|| / ||h||`` from ``x`` along ``direction``; each
        iterate is a pair of the ``pairs`` check."""
        if steps == 0:
            return
        scale = 1e-2 * (1.0 + float(x.norm()))
        x = x.clone().requires_grad_(True)
        h = (scale * direction + 1e-3 * scale * torch.randn_like(direction)).requires_grad_(True)
        optimizer = torch.optim.Adam([x, h], lr=0.05 * scale)
        for _ in range(steps):
            with torch.enable_grad():
                ratio = (self.f((x + h).unsqueeze(0)) - self.f(x.unsqueeze(0))).norm() / h.norm()
                if not bool(torch.isfinite(ratio)):
                    break
                optimizer.zero_grad()
                (-ratio).backward()
            optimizer.step()
            with torch.no_grad():
                self.pairs(x.detach().unsqueeze(0), (x + h).detach().unsqueeze(0), "gradient ascent")


def check_network(model, shape, affine: bool, kinds: dict, d: Draw, budget: Budget, log: Log) -> dict:
    """The checks of the module docstring on a drawn network; its ratios measured / certified."""
    try:
        bound, record = module_lipschitz_bounds(model, shape)
    except LipschitzBoundError as error:
        raise Violation(f"refusal: every module was accepted alone, but the network is refused: {error}") from error
    except Exception as error:
        raise Violation(f"crash: lipschitz_bound raised {type(error).__name__}: {error}\n{traceback.format_exc()}")
    checker = Checker(model, shape, bound, record, bound * cancellation(model, shape))
    for module in model.modules():
        log.checked.add(log.drawn.get(id(module), (module, type(module)))[1])
    # Random points (and zero), their batch independence, pairs at several distances.
    points = [torch.zeros(shape, dtype=F64)]
    points += [d.randn(*shape, scale=d.scale(-3, 2)) for _ in range(budget.random_points)]
    checker.batch(torch.stack(points))
    best = (-1.0, points[0], None)
    for i, x in enumerate(points):
        norm, direction = checker.jacobian_at(x, "zero" if i == 0 else "random")
        best = max(best, (norm, x, direction), key=lambda item: item[0])
        _pairs_around(checker, x, direction, d, budget, "random")
    # Adversarial points: steepest slopes, kinks, ties and spikes, reached through the prefix.
    chosen = [site for site in sites(checker.twin, lambda x: x, shape)
              if type(site[0]) in kinds and (kinds[type(site[0])].elementwise or kinds[type(site[0])].maxlike)]
    for module, prefix, in_shape in d.rng.sample(chosen, min(len(chosen), budget.sites)):
        if kinds[type(module)].elementwise:
            module_bound = lipschitz_bound(module, in_shape)
            targets = elementwise_targets(module, in_shape, d, module_bound)
        else:
            targets = maxlike_targets(module, in_shape, d)
        for target in targets[:budget.targets]:
            x = reach(prefix, target, shape, d)
            for point in (x, x + 1e-9 * (1 + float(x.norm())) * d.randn(*shape)):
                norm, direction = checker.jacobian_at(point, f"adversarial ({type(module).__name__})")
                best = max(best, (norm, point, direction), key=lambda item: item[0])
            _pairs_around(checker, x, direction, d, budget, f"adversarial ({type(module).__name__})")
    if best[2] is not None:
        checker.ascent(best[1], best[2], budget.ascent_steps)
    if affine:
        checker.dense()
    return checker.ratios


def _pairs_around(checker, x, direction, d: Draw, budget, what):
    lefts, rights = [], []
    for i in range(budget.pairs):
        v = direction if i == 0 and float(direction.norm()) > 0 else d.randn(*x.shape)
        v = v / v.norm()
        for delta in (1e-6 * (1 + float(x.norm())), 1e-2, 1.0, 30.0):
            lefts.append(x - delta * v / 2)
            rights.append(x + delta * v / 2)  # straddles x: a kink or jump there lies between them
    checker.pairs(torch.stack(lefts), torch.stack(rights), what)


# ----------------------------------------------------------------------------------------------
# cases and driver


@dataclass
class Result:
    seed: int
    case: dict
    ratios: dict = field(default_factory=dict)
    log: Log = field(default_factory=Log)


def run_case(seed: int, budget: Budget | None = None, forced=None) -> Result:
    """Draw and check the network of ``seed`` (forcing ``forced``, a type or trap name, into it)."""
    budget = budget or Budget()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kinds = zoo()
        model, shape, affine, log = draw_network(seed, budget, forced, kinds)
        result = Result(seed, dict(input_shape=shape, affine=affine, model=repr(model)), log=log)
        try:
            result.ratios = check_network(model, shape, affine, kinds, Draw(seed + 10**9), budget, log)
        except Violation as violation:
            raise Violation(f"{violation}\nin the network of seed {seed} on inputs of shape {shape}:\n{model!r}") \
                from violation
    return result


def coverage(results) -> dict[str, list[str]]:
    """Which accepted types no certified network held, and which traps were never refused."""
    checked = set().union(*(r.log.checked for r in results))
    refused = Counter()
    for r in results:
        refused.update(r.log.refused)
    keys = {rule_of(cls) for cls in checked}
    missing_types = sorted(_name(c) for c in accepted_types() if c not in checked and not (
        c in _REGISTRY and c in keys)  # a registered base class is covered by a subclass using its rule
        and not (c in ALWAYS_REFUSED and refused[_name(c)]))
    return {"types never certified in a network": missing_types,
            "traps never refused": sorted(t for t in TRAPS if not refused[t])}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="first seed")
    parser.add_argument("--count", type=int, default=None, help="number of cases (default: until --minutes)")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--module", default=None, help="force this type (class name) or trap into every case")
    parser.add_argument("--ci", action="store_true", help="the CI slice's smaller budget")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    forced = None
    if args.module is not None:
        forced = next((item for item in rotation() if _name(item) == args.module), None)
        if forced is None:
            parser.error(f"--module {args.module!r} is none of {[_name(i) for i in rotation()]}")
    budget = CI_BUDGET if args.ci else Budget()
    deadline = time.monotonic() + 60 * args.minutes
    results, violations, crashes, worst = [], [], Counter(), {}
    seed = args.seed
    while time.monotonic() < deadline and (args.count is None or seed < args.seed + args.count):
        try:
            result = run_case(seed, budget, forced)
        except Violation as error:
            violations.append((seed, str(error)))
            print(f"VIOLATION seed={seed}: {error}", flush=True)
            seed += 1
            continue
        except Exception as error:  # a crash of the fuzz itself (or of torch on a drawn network)
            crashes[f"{type(error).__name__}: {str(error)[:100]}"] += 1
            violations.append((seed, traceback.format_exc()))
            print(f"CRASH seed={seed}: {traceback.format_exc()}", flush=True)
            seed += 1
            continue
        results.append(result)
        for path, ratio in result.ratios.items():
            if ratio > worst.get(path, (-1.0, None))[0]:
                worst[path] = (ratio, seed)
        if args.verbose:
            print(f"seed {seed}: {result.case['input_shape']} affine={result.case['affine']} ratios "
                  f"{ {k: round(v, 9) for k, v in result.ratios.items()} }\n{result.case['model']}", flush=True)
        seed += 1
    refused, rejected = Counter(), Counter()
    for r in results:
        refused.update(r.log.refused)
        rejected.update(r.log.rejected)
    print(f"{len(results)} cases passed, {len(violations)} violations ({sum(crashes.values())} crashes); seeds "
          f"{args.seed}..{seed - 1}")
    print("max measured / certified: " + ", ".join(f"{p} {r:.12g} (seed {s})" for p, (r, s) in sorted(worst.items())))
    print(f"refusals: {dict(sorted(refused.items()))}")
    if args.verbose:
        print(f"draws torch or the budget rejected: {dict(sorted(rejected.items()))}")
    if args.count is None or args.count >= len(rotation()):
        for what, names in coverage(results).items():
            if names:
                print(f"{what}: {names}")
    for message, count in crashes.items():
        print(f"crash x{count}: {message}")
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
