"""Randomized soundness fuzz of lipnet's bounds against exact operator norms.

Draws random valid convolution geometries (channels, groups, non-square kernels, per-axis
strides and dilations, int/pair/'same'/'valid' padding, every padding mode, input sizes down
to 1), random linear shapes, residual blocks and small networks, with adversarial weights
(Gaussian, rank-1, one tap, constant, checkerboard, near-orthogonal, integer, sparse, 1e-30
and 1e+30 scales, ...). Each case is compared with the exact norm of the operator that
PyTorch applies, built independently of lipnet: a plain ``nn.Conv2d`` / ``nn.Conv1d`` /
``nn.Linear`` in float64 applied to every basis input, and the largest singular value of
that dense matrix. The inequalities checked:

* the public bounds (``conv2d_spectral_norm``, ``conv1d_spectral_norm``,
  ``matrix_spectral_norm``) in float64: ``bound >= exact (1 - 1e-12)`` (no rounding margin is
  applied to them, so a converged bound may sit a rounding error below);
* the training path (the weight a Gram layer's forward applies): ``||op(normalized)|| <= 1 +
  tol``, ``tol = 1e-5`` in float32 (and bfloat16/float16, whose weights are rounded to keep
  the bound <= 1 at float32's accuracy) and ``1e-10`` in float64;
* the certificate (``lipnet.certify.lipschitz_bound``) of one layer: ``>= exact`` with no
  tolerance at all (it carries a relative margin >= 1e-6 against its own rounding, far above
  the float64 SVD's error of ~1e-15, so a sound certificate is never below the computed norm);
* networks: the certificate is ``>=`` the Jacobian's norm at random points, and for linear
  stacks ``>=`` the norm of the composed dense operator; in training mode (``GramSequential``
  stacking the bounds of equal layers) the Jacobian's norm is ``<= 1 + tol``.

Geometries PyTorch rejects must be rejected by lipnet too (a ``ValueError`` from the public
bounds, an error from the layer), not bounded. Where taps that read one input sample nearly
cancel, the normalized taps are large and float rounding follows ``|W| |x|``, not the result:
comparisons of computed outputs allow for that magnitude (``magnitude_norm``).

Each case is reproducible from ``(kind, seed)``: ``python tests/fuzz_geometry.py --kind conv2d
--seed 123 --count 1 -v`` prints the case and its ratios. Without ``--count`` it runs for
``--minutes``; ``--sweep`` runs the exhaustive one-axis sweep (:func:`sweep_conv1d`).
``tests/bounds/test_fuzz_soundness.py`` runs a fixed-seed slice in CI.
"""

from __future__ import annotations

import argparse
import copy
import math
import random
import sys
import time
import traceback
from dataclasses import dataclass, field

import torch
from torch import nn

from lipnet.bounds import conv1d_spectral_norm, conv2d_spectral_norm, matrix_spectral_norm, refine_exceeding
from lipnet.certify import lipschitz_bound
from lipnet.nn import ConvexResidual, GramConv1d, GramConv2d, GramLinear, GramResidualConv2d, GramSequential, MaxMin

#: Tolerance of the public float64 bounds, which carry no rounding margin.
PUBLIC_TOL = 1e-12
#: How far above 1 the operator of a normalized weight may be, per dtype of the layer.
NORMALIZED_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}
MODES = ("zeros", "circular", "reflect", "replicate")
WEIGHT_KINDS = ("gaussian", "rank1", "one_tap", "one_tap_all_channels", "constant", "checkerboard",
                "checker_channels", "near_orthogonal", "orthogonal_rows", "tiny", "huge", "integer", "sparse",
                "zero", "off_grid")
#: Scales only float64 holds (products of such entries underflow or overflow).
FLOAT64_KINDS = ("tiny64", "huge64")
#: Opt-in (``--cancelling``): two taps of +-2^40 on top of a Gaussian kernel, which lose every
#: digit of the rest where they read one sample (tests/bounds/test_circular_aliasing.py, xfail).
CANCELLING_KINDS: list[str] = []


class Violation(AssertionError):
    """A bound below the exact norm (or a normalized operator above 1)."""


@dataclass
class Result:
    """What one case measured: ``ratios[path] = exact / bound`` (<= 1 when sound)."""

    kind: str
    seed: int
    case: dict
    ratios: dict = field(default_factory=dict)
    skipped: str | None = None  # why no check ran (torch rejects the geometry: then lipnet must too)
    unsupported: str | None = None  # torch accepts, lipnet raises: the error


# ----------------------------------------------------------------------------------------------
# weights


def make_weight(kind: str, shape, gen: torch.Generator) -> torch.Tensor:
    """An adversarial float64 weight ``(c_out, c_in_g, *taps)`` (or ``(out, in)`` for a matrix)."""
    c_out, c_in = shape[0], shape[1]
    taps = tuple(shape[2:])
    f64 = dict(dtype=torch.float64)
    if kind == "gaussian":
        return torch.randn(shape, generator=gen, **f64)
    if kind == "rank1":  # one output direction times one (input x taps) pattern
        u = torch.randn(c_out, generator=gen, **f64)
        v = torch.randn(shape[1:], generator=gen, **f64)
        return u.view(-1, *[1] * (len(shape) - 1)) * v
    if kind == "one_tap":  # a single nonzero entry
        w = torch.zeros(shape, **f64)
        index = tuple(int(torch.randint(0, s, (1,), generator=gen)) for s in shape)
        w[index] = float(torch.randn(1, generator=gen, **f64)) or 1.0
        return w
    if kind == "one_tap_all_channels":  # one spatial tap, dense channel mixing (often reads padding only)
        w = torch.zeros(shape, **f64)
        index = tuple(int(torch.randint(0, s, (1,), generator=gen)) for s in taps)
        w[(slice(None), slice(None), *index)] = torch.randn(c_out, c_in, generator=gen, **f64)
        return w
    if kind == "constant":  # all energy at frequency 0
        return torch.full(shape, 0.7, **f64)
    if kind in ("checkerboard", "checker_channels"):  # energy at the Nyquist frequency
        sign = torch.ones(taps, **f64)
        for axis, k in enumerate(taps):
            view = [1] * len(taps)
            view[axis] = k
            sign = sign * ((-1.0) ** torch.arange(k, **f64)).view(view)
        mix = (torch.randn(c_out, c_in, generator=gen, **f64) if kind == "checker_channels"
               else torch.ones(c_out, c_in, **f64))
        return mix.view(c_out, c_in, *[1] * len(taps)) * sign
    if kind == "near_orthogonal":  # orthogonal channel mixing at one tap, small elsewhere
        w = 1e-3 * torch.randn(shape, generator=gen, **f64)
        q, _ = torch.linalg.qr(torch.randn(max(c_out, c_in), max(c_out, c_in), generator=gen, **f64))
        index = tuple(k // 2 for k in taps)
        w[(slice(None), slice(None), *index)] += q[:c_out, :c_in]
        return w
    if kind == "orthogonal_rows":  # the flattened kernel has orthonormal rows (or columns)
        flat = torch.randn(c_out, math.prod(shape[1:]), generator=gen, **f64)
        u, _, vh = torch.linalg.svd(flat, full_matrices=False)
        return (u @ vh).reshape(shape)
    if kind == "tiny":
        return 1e-30 * torch.randn(shape, generator=gen, **f64)
    if kind == "huge":
        return 1e30 * torch.randn(shape, generator=gen, **f64)
    if kind == "tiny64":
        return 1e-150 * torch.randn(shape, generator=gen, **f64)
    if kind == "huge64":
        return 1e150 * torch.randn(shape, generator=gen, **f64)
    if kind == "integer":
        return torch.randint(-3, 4, shape, generator=gen).to(torch.float64)
    if kind == "sparse":
        return torch.randn(shape, generator=gen, **f64) * (torch.rand(shape, generator=gen, **f64) < 0.2)
    if kind == "zero":
        return torch.zeros(shape, **f64)
    if kind == "cancelling":
        w = torch.randn(shape, generator=gen, **f64)
        flat_taps = math.prod(taps) if taps else 1
        if flat_taps >= 2:
            first, second = torch.randperm(flat_taps, generator=gen)[:2].tolist()
            view = w.view(c_out, c_in, flat_taps)
            view[:, :, first] += 2.0**40
            view[:, :, second] -= 2.0**40
        return w
    if kind == "off_grid":  # a cosine whose peak lies between FFT frequencies
        w0 = math.pi / (2.1 + float(torch.rand(1, generator=gen)))
        phase = sum(torch.arange(k, **f64).view([k if i == a else 1 for i in range(len(taps))])
                    for a, k in enumerate(taps)) if taps else torch.zeros(())
        return torch.randn(c_out, c_in, *[1] * len(taps), generator=gen, **f64) * torch.cos(w0 * phase)
    raise ValueError(kind)


def draw_weight_kind(rng: random.Random, dtype: torch.dtype) -> str:
    kinds = WEIGHT_KINDS + (FLOAT64_KINDS if dtype == torch.float64 else ()) + tuple(CANCELLING_KINDS) * 4
    if dtype in (torch.bfloat16, torch.float16):
        kinds = tuple(k for k in kinds if k not in ("tiny", "huge"))  # out of their range
    if dtype == torch.float16:
        kinds = tuple(k for k in kinds if k != "cancelling")  # 2^40 too
    return rng.choice(kinds)


# ----------------------------------------------------------------------------------------------
# exact norms


def dense_operator(apply, in_shape) -> torch.Tensor:
    """The matrix of the linear map ``apply`` on float64 inputs of ``in_shape`` (no batch dim)."""
    dim = math.prod(in_shape)
    basis = torch.eye(dim, dtype=torch.float64).reshape(dim, *in_shape)
    with torch.no_grad():
        return apply(basis).reshape(dim, -1).T


def sigma_max(matrix: torch.Tensor) -> float:
    """Largest singular value in float64, rescaled so 1e+-150 entries neither overflow nor underflow."""
    scale = float(matrix.abs().max()) if matrix.numel() else 0.0
    if scale == 0.0:
        return 0.0
    return float(torch.linalg.matrix_norm(matrix / scale, ord=2)) * scale


def plain_conv(case: dict, weight: torch.Tensor) -> nn.Module:
    """A float64 ``nn.Conv1d``/``nn.Conv2d`` with the case's geometry, no bias, ``weight``."""
    cls = nn.Conv1d if case["dim"] == 1 else nn.Conv2d
    conv = cls(case["c_in"], case["c_out"], case["kernel"], stride=case["stride"], padding=case["padding"],
               dilation=case["dilation"], groups=case["groups"], bias=False, padding_mode=case["padding_mode"],
               dtype=torch.float64)
    with torch.no_grad():
        conv.weight.copy_(weight.to(torch.float64))
    return conv


def exact_conv_norm(case: dict, weight: torch.Tensor) -> float:
    conv = plain_conv(case, weight)
    return sigma_max(dense_operator(conv, (case["c_in"], *case["size"])))


def check(ok: bool, message: str) -> None:
    if not ok:
        raise Violation(message)


# ----------------------------------------------------------------------------------------------
# convolutions


def draw_conv_case(rng: random.Random, dim: int = 2) -> dict:
    """Random geometry; it may be one torch rejects (the case then checks lipnet rejects it too)."""
    axes = 1 if dim == 1 else 2

    def per_axis(low, high):
        values = tuple(rng.randint(low, high) for _ in range(axes))
        if dim == 1:
            return values[0] if rng.random() < 0.7 else values  # int or 1-tuple
        return values[0] if rng.random() < 0.4 and len(set(values)) == 1 else values

    groups = rng.choice([1, 1, 1, 2, 3, 4])
    c_in = groups * rng.randint(1, max(1, 8 // groups))
    c_out = groups * rng.randint(1, max(1, 8 // groups))
    kernel = per_axis(1, 5)
    stride = per_axis(1, 3) if rng.random() < 0.6 else 1
    dilation = per_axis(1, 3) if rng.random() < 0.4 else 1
    roll = rng.random()
    if roll < 0.15:
        padding = "same"
        stride = 1  # torch refuses 'same' with stride (checked on other draws below)
        if rng.random() < 0.05:
            stride = 2
    elif roll < 0.25:
        padding = "valid"
    elif roll < 0.6:
        padding = rng.randint(0, 3)
    else:
        padding = per_axis(0, 4)
    mode = rng.choice(MODES)
    size = tuple(rng.randint(1, 12) for _ in range(axes))
    if c_in * math.prod(size) > 900:  # keep the dense operator small
        size = tuple(max(1, s // 2) for s in size)
    if rng.random() < 0.15:
        # Larger inputs and small kernels: more frequencies than pairs of taps, where the first
        # Gram step comes from the kernel's autocorrelation (lipnet.bounds.symbol_gram).
        groups = rng.choice([1, 2])
        c_in, c_out = groups * rng.randint(1, 2 // groups), groups * rng.randint(1, 2 // groups)
        kernel = per_axis(1, 3)
        size = tuple(rng.randint(8, 24 if dim == 2 else 200) for _ in range(axes))
    dtype = rng.choice([torch.float32, torch.float32, torch.float64, torch.float64, torch.bfloat16, torch.float16])
    if dtype in (torch.bfloat16, torch.float16) and max(dilation if isinstance(dilation, tuple) else (dilation,)) > 1:
        # torch 2.14.1's CPU kernels crash the process (SIGSEGV) on some dilated half-precision convolutions,
        # e.g. float16 F.conv1d(x (2, 2, 1), w (8, 1, 1), stride=2, padding=3, dilation=3, groups=2)
        # (seed 231100): torch's own fault, which would end the run.
        dtype = torch.float32
    n_iter = rng.choice([1, 2, 3, 5, 10, 10, 14])
    return dict(dim=dim, c_in=c_in, c_out=c_out, groups=groups, kernel=kernel, stride=stride, padding=padding,
                dilation=dilation, padding_mode=mode, size=size, bias=rng.random() < 0.5,
                weight=draw_weight_kind(rng, dtype), dtype=str(dtype).removeprefix("torch."),
                n_iter=n_iter, screen_iter=rng.randint(0, n_iter), n_candidates=rng.choice([1, 2, 8]),
                refine=rng.random() < 0.7, train=rng.random() < 0.5, stacked=rng.random() < 0.25)


def torch_accepts(case: dict) -> str | None:
    """``None`` if PyTorch builds the layer and runs it on the input size, else its error."""
    try:
        conv = plain_conv(case, torch.zeros(case["c_out"], case["c_in"] // case["groups"], *_kernel(case)))
        conv(torch.zeros(1, case["c_in"], *case["size"], dtype=torch.float64))
    except (RuntimeError, ValueError) as error:
        return f"{type(error).__name__}: {error}"
    return None


def _kernel(case):
    k = case["kernel"]
    if isinstance(k, int):
        return (k,) * (1 if case["dim"] == 1 else 2)
    return tuple(k)


def _spatial(case, value):
    return value if case["dim"] == 2 else (value[0] if isinstance(value, tuple) else value)


def gram_layer(case: dict) -> nn.Module:
    cls = GramConv1d if case["dim"] == 1 else GramConv2d
    return cls(case["c_in"], case["c_out"], case["kernel"], stride=case["stride"], padding=case["padding"],
               dilation=case["dilation"], groups=case["groups"], bias=case["bias"], padding_mode=case["padding_mode"],
               dtype=getattr(torch, case["dtype"]), n_iter=case["n_iter"], screen_iter=case["screen_iter"])


def public_bound(case: dict, weight: torch.Tensor, **settings) -> torch.Tensor:
    fn = conv1d_spectral_norm if case["dim"] == 1 else conv2d_spectral_norm
    size = case["size"][0] if case["dim"] == 1 else case["size"]
    return fn(weight, size, stride=case["stride"], padding=case["padding"], dilation=case["dilation"],
              groups=case["groups"], padding_mode=case["padding_mode"], **settings)


def run_conv_case(seed: int, dim: int = 2) -> Result:
    rng = random.Random(seed)
    case = draw_conv_case(rng, dim)
    result = Result(f"conv{dim}d", seed, case)
    gen = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, case["dtype"])
    rejected = torch_accepts(case)
    shape = (case["c_out"], case["c_in"] // case["groups"], *_kernel(case))
    if rejected is not None:
        # lipnet must reject it too, with a ValueError that says why: the public bound, and the
        # layer (at construction or on this input size), not return a bound.
        try:
            bound = public_bound(case, torch.ones(shape, dtype=torch.float64))
        except ValueError:
            pass
        else:
            raise Violation(f"torch rejects ({rejected}) but the public bound returns {float(bound)}")
        try:
            layer = gram_layer(case)
            layer(torch.zeros(1, case["c_in"], *case["size"], dtype=dtype))
        except (RuntimeError, ValueError, TypeError):
            result.skipped = rejected
            return result
        raise Violation(f"torch rejects ({rejected}) but the Gram layer runs")
    raw = make_weight(case["weight"], shape, gen)
    settings = dict(n_iter=case["n_iter"], screen_iter=case["screen_iter"], n_candidates=case["n_candidates"])
    try:
        layer = gram_layer(case)
    except (ValueError, TypeError) as error:
        result.unsupported = f"construction: {type(error).__name__}: {error}"
        return result
    with refine_exceeding(case["refine"]):
        # (c) public bound in float64 on the raw weight (and stacked with other kernels).
        exact_raw = exact_conv_norm(case, raw)
        bound = float(public_bound(case, raw, **settings))
        check(bound >= exact_raw * (1 - PUBLIC_TOL), f"public float64 bound {bound!r} < exact {exact_raw!r}")
        result.ratios["public64"] = _ratio(exact_raw, bound)
        if case["stacked"]:
            others = [make_weight(rng.choice(WEIGHT_KINDS), shape, gen) for _ in range(rng.randint(1, 2))]
            kernels = [raw, *others]
            bounds = public_bound(case, torch.stack(kernels), **settings)
            for i, (kernel, b) in enumerate(zip(kernels, bounds.tolist())):
                exact = exact_conv_norm(case, kernel)
                check(b >= exact * (1 - PUBLIC_TOL), f"stacked bound {i}: {b!r} < exact {exact!r}")
                result.ratios["stacked64"] = max(result.ratios.get("stacked64", 0.0), _ratio(exact, b))
        # (a) the training path: the weight the forward applies, in the layer's dtype.
        with torch.no_grad():
            layer.weight.copy_(raw.to(dtype))
            if case["bias"]:
                layer.bias.normal_(generator=gen)
        layer.train(case["train"])
        x = torch.randn(2, case["c_in"], *case["size"], generator=gen).to(dtype)
        try:
            y = layer(x)
        except (ValueError, TypeError, RuntimeError) as error:
            if isinstance(error, FloatingPointError):
                raise
            result.unsupported = f"forward: {type(error).__name__}: {error}"
            return result
        applied = layer.normalized_weight(_size_arg(case)).detach()
        check(bool(torch.isfinite(applied).all()), f"the normalized weight is not finite (bound "
              f"{float(layer.weight_norm_bound(_size_arg(case)).detach())!r}, max |W| {float(raw.abs().max())!r})")
        plain = plain_conv(case, applied)
        expected = plain(x.double()) + (0 if layer.bias is None else layer.bias.double().view(-1, *[1] * dim))
        if dtype in (torch.float32, torch.float64):
            check_same_output(y, expected, plain_conv(case, applied.abs())(x.double().abs()), dtype)
        exact_applied = exact_conv_norm(case, applied)
        check(exact_applied <= 1 + NORMALIZED_TOL[dtype], f"normalized operator has norm {exact_applied!r} > 1")
        result.ratios["normalized"] = exact_applied
        if dtype in (torch.float32, torch.float64):
            bound_typed = float(public_bound(case, raw.to(dtype), **settings))
            exact_typed = exact_conv_norm(case, raw.to(dtype))
            tol = 1e-5 if dtype == torch.float32 else PUBLIC_TOL
            check(bound_typed >= exact_typed * (1 - tol), f"{dtype} bound {bound_typed!r} < exact {exact_typed!r}")
            result.ratios[f"public_{case['dtype']}"] = _ratio(exact_typed, bound_typed)
        # (b) the certificate of the layer as applied: no tolerance.
        certified = lipschitz_bound(nn.Sequential(layer), (case["c_in"], *case["size"]))
        applied_after = layer.normalized_weight(_size_arg(case)).detach()
        check(torch.equal(applied, applied_after), "the normalized weight changed between forward and certificate")
        check(certified >= exact_applied, f"certified {certified!r} < exact {exact_applied!r}")
        result.ratios["certified"] = _ratio(exact_applied, certified)
    return result


def check_same_output(y, expected, magnitude, dtype, what="forward differs from conv with normalized weight"):
    """``y`` (computed in ``dtype``) equals ``expected`` up to rounding: the error of sums of
    products is relative to the sums of their magnitudes (``magnitude``: the convolution with
    ``|W|`` of ``|x|``), which exceed the result where taps that read one sample cancel."""
    err = float((y.double() - expected).abs().max()) if y.numel() else 0.0
    scale = max(float(expected.abs().max()), float(magnitude.abs().max())) if y.numel() else 0.0
    check(err <= 1e3 * torch.finfo(dtype).eps * max(1.0, scale), f"{what} by {err}")


def _size_arg(case):
    return case["size"] if case["dim"] == 2 else case["size"][0]


def _ratio(exact: float, bound: float) -> float:
    if exact == 0.0:
        return 0.0
    return exact / bound if bound > 0 else math.inf


# ----------------------------------------------------------------------------------------------
# linear layers


def run_linear_case(seed: int) -> Result:
    rng = random.Random(seed)
    shape_kind = rng.random()
    if shape_kind < 0.2:
        out_f, in_f = 1, rng.randint(1, 40)
    elif shape_kind < 0.4:
        out_f, in_f = rng.randint(1, 40), 1
    else:
        out_f, in_f = rng.randint(1, 24), rng.randint(1, 24)
    dtype = rng.choice([torch.float32, torch.float64, torch.bfloat16])
    n_iter = rng.choice([1, 2, 5, 10, 14])
    case = dict(out=out_f, inp=in_f, dtype=str(dtype).removeprefix("torch."), n_iter=n_iter,
                weight=draw_weight_kind(rng, dtype), bias=rng.random() < 0.5, train=rng.random() < 0.5)
    result = Result("linear", seed, case)
    gen = torch.Generator().manual_seed(seed)
    raw = make_weight(case["weight"], (out_f, in_f), gen)
    exact_raw = sigma_max(raw)
    bound = float(matrix_spectral_norm(raw, n_iter=n_iter))
    check(bound >= exact_raw * (1 - PUBLIC_TOL), f"matrix_spectral_norm {bound!r} < exact {exact_raw!r}")
    result.ratios["public64"] = _ratio(exact_raw, bound)
    layer = GramLinear(in_f, out_f, bias=case["bias"], dtype=dtype, n_iter=n_iter)
    with torch.no_grad():
        layer.weight.copy_(raw.to(dtype))
    layer.train(case["train"])
    layer(torch.randn(3, in_f, generator=gen).to(dtype))
    applied = layer.normalized_weight().detach().double()
    exact_applied = sigma_max(applied)
    check(exact_applied <= 1 + NORMALIZED_TOL[dtype], f"normalized matrix has norm {exact_applied!r} > 1")
    result.ratios["normalized"] = exact_applied
    certified = lipschitz_bound(nn.Sequential(layer), (in_f,))
    check(certified >= exact_applied, f"certified {certified!r} < exact {exact_applied!r}")
    result.ratios["certified"] = _ratio(exact_applied, certified)
    return result


# ----------------------------------------------------------------------------------------------
# residual blocks


def run_residual_case(seed: int) -> Result:
    rng = random.Random(seed)
    groups = rng.choice([1, 1, 2, 4])
    channels = groups * rng.randint(1, max(1, 8 // groups))
    kernel = (rng.randint(1, 5), rng.randint(1, 5))
    mode = rng.choice(MODES)
    size = (rng.randint(1, 12), rng.randint(1, 12))
    if channels * size[0] * size[1] > 900:
        size = (max(1, size[0] // 2), max(1, size[1] // 2))
    dtype = rng.choice([torch.float32, torch.float64])
    kind = rng.choice(WEIGHT_KINDS + ("minus_identity", "near_minus_identity", "identity_scaled"))
    case = dict(channels=channels, groups=groups, kernel=kernel, padding_mode=mode, size=size,
                dtype=str(dtype).removeprefix("torch."), weight=kind, n_iter=rng.choice([2, 5, 10]),
                train=rng.random() < 0.5)
    result = Result("residual", seed, case)
    gen = torch.Generator().manual_seed(seed)
    conv_case = dict(dim=2, c_in=channels, c_out=channels, groups=groups, kernel=kernel, stride=1, padding="same",
                     dilation=1, padding_mode=mode, size=size)
    rejected = torch_accepts(conv_case)
    if rejected is not None:
        try:
            block = GramResidualConv2d(channels, kernel, groups=groups, padding_mode=mode, dtype=dtype)
            block(torch.zeros(1, channels, *size, dtype=dtype))
        except (RuntimeError, ValueError):
            result.skipped = rejected
            return result
        raise Violation(f"torch rejects ({rejected}) but GramResidualConv2d runs")
    shape = (channels, channels // groups, *kernel)
    identity = torch.zeros(shape, dtype=torch.float64)
    for c in range(channels):
        identity[c, c % (channels // groups), (kernel[0] - 1) // 2, (kernel[1] - 1) // 2] = 1.0
    if kind == "minus_identity":
        raw = -identity
    elif kind == "near_minus_identity":
        raw = -identity + 1e-6 * torch.randn(shape, generator=gen, dtype=torch.float64)
    elif kind == "identity_scaled":
        raw = (rng.random() * 4 - 2) * identity
    else:
        raw = make_weight(kind, shape, gen)
    block = GramResidualConv2d(channels, kernel, groups=groups, padding_mode=mode, dtype=dtype,
                               n_iter=case["n_iter"])
    with torch.no_grad():
        block.weight.copy_(raw.to(dtype))
    typed = raw.to(dtype).double()
    branch = plain_conv(conv_case, typed)
    # The operator I + conv, built from the plain branch (independently of the identity kernel).
    exact_raw = sigma_max(dense_operator(lambda x: x + branch(x), (channels, *size)))
    bound = float(block.weight_norm_bound(size).detach())
    tol = 1e-5 if dtype == torch.float32 else PUBLIC_TOL
    # The layer bounds the kernel W + D rounded to its dtype; when W nearly cancels the identity
    # (W ~ -D) that rounding, a few units of |W| + 1, is all that is left of the operator.
    slack = 8 * torch.finfo(dtype).eps * (1 + float(typed.abs().sum()))
    check(bound >= exact_raw * (1 - tol) - slack, f"residual raw bound {bound!r} < exact {exact_raw!r}")
    result.ratios["public_" + case["dtype"]] = _ratio(exact_raw, bound)
    block.train(case["train"])
    x = torch.randn(2, channels, *size, generator=gen).to(dtype)
    y = block(x)
    applied = block.normalized_weight(size).detach()
    applied_op = plain_conv(conv_case, applied)
    expected = applied_op(x.double()) + block.bias.double().view(-1, 1, 1)
    check_same_output(y, expected, plain_conv(conv_case, applied.abs())(x.double().abs()), dtype,
                      "residual forward differs")
    exact_applied = sigma_max(dense_operator(applied_op, (channels, *size)))
    check(exact_applied <= 1 + NORMALIZED_TOL[dtype], f"normalized residual operator has norm {exact_applied!r}")
    result.ratios["normalized"] = exact_applied
    certified = lipschitz_bound(nn.Sequential(block), (channels, *size))
    check(certified >= exact_applied, f"certified {certified!r} < exact {exact_applied!r}")
    result.ratios["certified"] = _ratio(exact_applied, certified)
    return result


# ----------------------------------------------------------------------------------------------
# networks


class _PlainMaxMin(nn.Module):
    """MaxMin written out independently: channel pairs ``(i, i + C/2)`` sorted."""

    def forward(self, x):
        a, b = x.chunk(2, dim=1)
        return torch.cat([torch.maximum(a, b), torch.minimum(a, b)], dim=1)


def _random_conv_layer(rng, c_in, size, dtype, c_out=None):
    """A Gram convolution valid on ``size`` (or ``None`` after a few failed draws)."""
    for _ in range(20):
        case = draw_conv_case(rng, 2)
        case.update(c_in=c_in, size=size, dtype=str(dtype).removeprefix("torch."))
        groups = rng.choice([g for g in (1, 2) if c_in % g == 0 and (c_out or g) % g == 0])
        case.update(groups=groups, c_out=c_out or groups * rng.randint(1, 3))
        if torch_accepts(case) is None:
            try:
                return gram_layer(case), case
            except ValueError:
                continue
    return None, None


def draw_network(rng: random.Random, gen: torch.Generator, linear_only: bool):
    dtype = rng.choice([torch.float32, torch.float64])
    c = rng.randint(1, 4)
    size = (rng.randint(2, 8), rng.randint(2, 8))
    input_shape = (c, *size)
    layers, plain = [], []
    for _ in range(rng.randint(1, 3)):
        roll = rng.random()
        if roll < 0.15:  # a trunk of equal layers, which GramSequential bounds as one stack
            conv_case = None
            for _ in range(5):
                conv, case = _random_conv_layer(rng, c, size, dtype, c_out=c)
                if conv is not None and tuple(conv(torch.zeros(1, c, *size, dtype=dtype)).shape[-2:]) == size:
                    conv_case = case
                    break
            if conv_case is None:
                continue
            for _ in range(rng.randint(2, 3)):
                conv = gram_layer(conv_case)
                _fill(conv, rng, gen)
                layers.append(conv)
                plain.append(("conv", conv_case, conv))
                if not linear_only and rng.random() < 0.3:
                    layers.append(nn.ReLU())
                    plain.append(("relu", None, None))
            continue
        if roll < 0.25 and size[0] * size[1] * c <= 400:
            kernel = (rng.randint(1, 4), rng.randint(1, 4))
            groups = rng.choice([g for g in (1, 2) if c % g == 0])
            mode = rng.choice(MODES)
            conv_case = dict(dim=2, c_in=c, c_out=c, groups=groups, kernel=kernel, stride=1, padding="same",
                             dilation=1, padding_mode=mode, size=size)
            if torch_accepts(conv_case) is not None:
                continue
            block = GramResidualConv2d(c, kernel, groups=groups, padding_mode=mode, dtype=dtype)
            _fill(block, rng, gen)
            layers.append(block)
            plain.append(("conv", conv_case, block))
        elif roll < 0.35 and not linear_only:
            inner, inner_case = _random_conv_layer(rng, c, size, dtype, c_out=c)
            if inner is None:
                continue
            out_size = tuple(inner(torch.zeros(1, c, *size, dtype=dtype)).shape[-2:])
            if out_size != size:
                continue
            _fill(inner, rng, gen)
            # .to(dtype): the logit is created in the default dtype, and lipschitz_bound's dry run
            # takes the dtype of the model's first parameter.
            block = ConvexResidual(inner, alpha=rng.uniform(0.05, 0.95)).to(dtype)
            layers.append(block)
            plain.append(("convex", inner_case, block))
        else:
            conv, conv_case = _random_conv_layer(rng, c, size, dtype)
            if conv is None:
                continue
            _fill(conv, rng, gen)
            layers.append(conv)
            plain.append(("conv", conv_case, conv))
            c = conv_case["c_out"]
            size = tuple(conv(torch.zeros(1, conv_case["c_in"], *conv_case["size"], dtype=dtype)).shape[-2:])
        if not linear_only and c % 2 == 0 and rng.random() < 0.7:
            layers.append(MaxMin())
            plain.append(("maxmin", None, None))
    layers.append(nn.Flatten())
    plain.append(("flatten", None, None))
    features = c * size[0] * size[1]
    head = GramLinear(features, rng.randint(1, 6), dtype=dtype)
    _fill(head, rng, gen)
    layers.append(head)
    plain.append(("linear", None, head))
    container = GramSequential(*layers, stack_bounds=True) if rng.random() < 0.5 else nn.Sequential(*layers)
    return container, plain, input_shape, dtype


def _fill(module, rng, gen):
    kind = rng.choice(("gaussian", "rank1", "checkerboard", "near_orthogonal", "orthogonal_rows", "integer", "huge",
                       "one_tap_all_channels"))
    with torch.no_grad():
        module.weight.copy_(make_weight(kind, tuple(module.weight.shape), gen).to(module.weight.dtype))
        if module.bias is not None:
            module.bias.normal_(generator=gen)


def plain_copy(plain, input_shape) -> nn.Module:
    """A float64 network of plain torch modules applying each Gram layer's normalized weight."""
    modules, shape = [], input_shape
    for what, case, layer in plain:
        if what == "conv":
            size = shape[-2:]
            weight = layer.normalized_weight(size).detach()
            conv = plain_conv({**case, "size": size}, weight)
            conv.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().double())
            modules.append(conv)
        elif what == "convex":
            weight = layer.branch.normalized_weight(shape[-2:]).detach()
            conv = plain_conv({**case, "size": shape[-2:]}, weight)
            conv.bias = None if layer.branch.bias is None else nn.Parameter(layer.branch.bias.detach().double())
            keep, alpha = (t.detach().to(layer.branch.weight.dtype).double() for t in layer.coefficients())
            modules.append(_Convex(conv, keep, alpha))
        elif what == "maxmin":
            modules.append(_PlainMaxMin())
        elif what == "relu":
            modules.append(nn.ReLU())
        elif what == "flatten":
            modules.append(nn.Flatten())
        else:
            linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, dtype=torch.float64)
            with torch.no_grad():
                linear.weight.copy_(layer.normalized_weight().detach().double())
                if layer.bias is not None:
                    linear.bias.copy_(layer.bias.detach().double())
            modules.append(linear)
        with torch.no_grad():
            shape = tuple(modules[-1](torch.zeros(1, *shape, dtype=torch.float64)).shape[1:])
    return nn.Sequential(*modules)


def magnitude_norm(reference: nn.Sequential, input_shape) -> float:
    """Product over the plain network's layers of the norm of the layer with ``|W|`` (``|keep| +
    |alpha| ||conv_{|W|}||`` for a convex residual block; 1 for the rest)."""
    total, shape = 1.0, tuple(input_shape)
    for module in reference:
        if isinstance(module, (nn.Conv2d, nn.Linear, _Convex)):
            conv = module.conv if isinstance(module, _Convex) else module
            absolute = copy.deepcopy(conv)
            absolute.bias = None
            with torch.no_grad():
                absolute.weight.abs_()
            norm = sigma_max(dense_operator(absolute, shape))
            if isinstance(module, _Convex):
                norm = abs(float(module.keep)) + abs(float(module.alpha)) * norm
            total *= norm
        with torch.no_grad():
            shape = tuple(module(torch.zeros(1, *shape, dtype=torch.float64)).shape[1:])
    return total


class _Convex(nn.Module):
    def __init__(self, conv, keep, alpha):
        super().__init__()
        self.conv, self.keep, self.alpha = conv, keep, alpha

    def forward(self, x):
        return self.keep * x + self.alpha * self.conv(x)


def run_network_case(seed: int, points: int = 8) -> Result:
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    linear_only = rng.random() < 0.4
    model, plain, input_shape, dtype = draw_network(rng, gen, linear_only)
    model.eval()
    case = dict(input_shape=input_shape, dtype=str(dtype).removeprefix("torch."), linear_only=linear_only,
                model=repr(model))
    result = Result("network", seed, case)
    with torch.no_grad():
        model(torch.zeros(1, *input_shape, dtype=dtype))
    certified = lipschitz_bound(model, input_shape)
    reference = plain_copy(plain, input_shape)
    # Rounding of the float64 reference grows with the magnitudes summed, not with the result:
    # the norm of the network with |W| everywhere (far above its norm where taps cancel).
    noise = magnitude_norm(reference, input_shape)
    with torch.no_grad():  # the plain copy computes what the model computes
        x = torch.randn(3, *input_shape, generator=gen, dtype=torch.float64)
        ours, theirs = model(x.to(dtype)).double(), reference(x)
        err = float((ours - theirs).abs().max())
        scale = max(1.0, float(theirs.abs().max()), noise * float(x.flatten(1).norm(dim=1).max()))
        check(err <= 1e3 * torch.finfo(dtype).eps * scale, f"plain copy differs from the model by {err}")
    worst = 0.0
    for i in range(points):
        scale = 10.0 ** rng.randint(-3, 2)
        point = scale * torch.randn(1, *input_shape, generator=gen, dtype=torch.float64)
        if i == 0:
            point = torch.zeros_like(point)
        jac = torch.autograd.functional.jacobian(reference, point).reshape(-1, math.prod(input_shape))
        worst = max(worst, sigma_max(jac))
    check(certified >= worst - 1e-12 * noise, f"certified {certified!r} < Jacobian norm {worst!r}")
    result.ratios["jacobian"] = _ratio(worst, certified)
    # Training mode (GramSequential stacks the bounds of equal layers): every layer applies a
    # weight of norm <= 1 (up to the layer dtype's tolerance), so the network is 1-Lipschitz.
    model.train()
    train_worst = 0.0
    for i in range(3):
        point = torch.randn(1, *input_shape, generator=gen, dtype=torch.float64).to(dtype)
        jac = torch.autograd.functional.jacobian(model, point).reshape(-1, math.prod(input_shape))
        train_worst = max(train_worst, sigma_max(jac.double()))
    depth = sum(isinstance(m, (GramConv2d, GramLinear)) for m in model.modules())
    tolerance = (1 + (1e-4 if dtype == torch.float32 else 1e-9)) ** depth + 1e3 * torch.finfo(dtype).eps * noise
    check(train_worst <= tolerance, f"training-mode network has Jacobian norm {train_worst!r} > 1")
    result.ratios["train_jacobian"] = train_worst
    model.eval()
    if linear_only:
        # The same batch size for the constant part: a convolution may round a batch of one
        # differently from a larger one, which a constant (a zero layer's bias) would show.
        exact = sigma_max(dense_operator(lambda b: reference(b) - reference(torch.zeros_like(b)), input_shape))
        check(certified >= exact - 1e-12 * noise, f"certified {certified!r} < composed operator norm {exact!r}")
        result.ratios["composed"] = _ratio(exact, certified)
    return result


# ----------------------------------------------------------------------------------------------
# exhaustive one-axis sweep


def sweep_conv1d(kinds=("gaussian", "checkerboard", "one_tap", "constant", "near_orthogonal"), max_size=10):
    """Every 1-D geometry (kernel 1-5, stride 1-3, dilation 1-3, padding 0-4, 'same', 'valid',
    every padding mode, inputs 1..``max_size``) torch accepts, 2 -> 2 channels (groups 1 and 2)
    in float64: the public bound and the certificate of a ``GramConv1d`` against the exact norm
    (:func:`sweep_case`). The 2-D embedding is the product of two such axes. Yields
    ``(case, weight kind, seed)``."""
    seed = 0
    for k in range(1, 6):
        for stride in range(1, 4):
            for dilation in range(1, 4):
                for padding in [*range(5), "same", "valid"]:
                    if padding == "same" and stride > 1:
                        continue
                    for mode in MODES:
                        for n in range(1, max_size + 1):
                            for groups in (1, 2):
                                case = dict(dim=1, c_in=2, c_out=2, groups=groups, kernel=k, stride=stride,
                                            padding=padding, dilation=dilation, padding_mode=mode, size=(n,))
                                if torch_accepts(case) is not None:
                                    continue
                                for kind in kinds:
                                    seed += 1
                                    yield case, kind, seed


def sweep_case(case, kind, seed) -> Result:
    result = Result("sweep1d", seed, {**case, "weight": kind})
    gen = torch.Generator().manual_seed(seed)
    raw = make_weight(kind, (case["c_out"], case["c_in"] // case["groups"], case["kernel"]), gen)
    exact = exact_conv_norm(case, raw)
    bound = float(public_bound(case, raw))
    check(bound >= exact * (1 - PUBLIC_TOL), f"public float64 bound {bound!r} < exact {exact!r}")
    result.ratios["public64"] = _ratio(exact, bound)
    layer = gram_layer({**case, "bias": False, "dtype": "float64", "n_iter": 10, "screen_iter": 5})
    with torch.no_grad():
        layer.weight.copy_(raw)
    layer(torch.zeros(1, 2, case["size"][0], dtype=torch.float64))
    applied = layer.normalized_weight(case["size"][0]).detach()
    exact_applied = exact_conv_norm(case, applied)
    check(exact_applied <= 1 + NORMALIZED_TOL[torch.float64], f"normalized operator has norm {exact_applied!r} > 1")
    result.ratios["normalized"] = exact_applied
    certified = lipschitz_bound(nn.Sequential(layer), (2, case["size"][0]))
    check(certified >= exact_applied, f"certified {certified!r} < exact {exact_applied!r}")
    result.ratios["certified"] = _ratio(exact_applied, certified)
    return result


# ----------------------------------------------------------------------------------------------
# driver

RUNNERS = {
    "conv2d": lambda seed: run_conv_case(seed, 2),
    "conv1d": lambda seed: run_conv_case(seed, 1),
    "linear": run_linear_case,
    "residual": run_residual_case,
    "network": run_network_case,
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", choices=[*RUNNERS, "all"], default="all")
    parser.add_argument("--seed", type=int, default=0, help="first seed")
    parser.add_argument("--count", type=int, default=None, help="cases per kind (default: until --minutes)")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("--sweep", action="store_true", help="the exhaustive one-axis sweep instead")
    parser.add_argument("--cancelling", action="store_true", help="also draw kernels with two cancelling taps")
    args = parser.parse_args(argv)
    if args.cancelling:
        CANCELLING_KINDS.append("cancelling")
    torch.set_num_threads(args.threads)
    if args.sweep:
        return _run_sweep()
    kinds = list(RUNNERS) if args.kind == "all" else [args.kind]
    deadline = time.monotonic() + 60 * args.minutes
    stats = {k: dict(run=0, skipped=0, unsupported=0, violations=0, crashes=0, worst={}) for k in kinds}
    unsupported, violations, crashes = [], [], {}
    seed = args.seed
    while time.monotonic() < deadline and (args.count is None or seed < args.seed + args.count):
        for kind in kinds:
            entry = stats[kind]
            try:
                result = RUNNERS[kind](seed)
            except Violation as error:
                entry["violations"] += 1
                violations.append((kind, seed, str(error)))
                print(f"VIOLATION {kind} seed={seed}: {error}", flush=True)
                continue
            except Exception as error:  # an unexpected crash is a finding too
                entry["crashes"] += 1
                violations.append((kind, seed, traceback.format_exc()))
                crashes.setdefault(f"{type(error).__name__}: {str(error)[-80:]}", []).append((kind, seed))
                if args.verbose:
                    print(f"CRASH {kind} seed={seed}: {type(error).__name__}: {error}", flush=True)
                continue
            entry["run"] += 1
            if result.skipped:
                entry["skipped"] += 1
            elif result.unsupported:
                entry["unsupported"] += 1
                unsupported.append((kind, seed, result.unsupported))
            for path, ratio in result.ratios.items():
                if ratio > entry["worst"].get(path, (-1.0, None))[0]:
                    entry["worst"][path] = (ratio, seed)
            if args.verbose:
                print(kind, seed, result, flush=True)
        seed += 1
    for kind, entry in stats.items():
        worst = {path: f"{ratio:.15g} (seed {s})" for path, (ratio, s) in sorted(entry["worst"].items())}
        print(f"{kind}: {entry['run']} cases ({entry['skipped']} torch-rejected, {entry['unsupported']} "
              f"unsupported), {entry['violations']} violations, {entry['crashes']} crashes; max exact/bound: {worst}")
    for message, where in crashes.items():
        print(f"crash x{len(where)} {message} (e.g. {where[:4]})")
    for kind, seed, message in unsupported[:20]:
        print(f"unsupported {kind} seed={seed}: {message}")
    print(f"seeds {args.seed}..{seed - 1}")
    return 1 if violations else 0


def _run_sweep() -> int:
    count, failures, worst = 0, 0, {}
    for case, kind, seed in sweep_conv1d():
        try:
            result = sweep_case(case, kind, seed)
        except Violation as error:
            print(f"VIOLATION sweep1d {case} {kind} seed={seed}: {error}", flush=True)
            failures += 1
            continue
        count += 1
        for path, ratio in result.ratios.items():
            if ratio > worst.get(path, (-1.0, None))[0]:
                worst[path] = (ratio, result.case)
    print(f"sweep1d: {count} cases, {failures} violations")
    for path, (ratio, case) in sorted(worst.items()):
        print(f"  max exact/bound {path}: {ratio:.15g} at {case}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
