"""Maps that only copy entries: permutations, padding, nearest-neighbour upsampling.

Each output entry of such a map is an input entry or a constant, so the map is ``x -> S x + c``
with ``S`` a 0/1 matrix with at most one 1 per row. ``S^T S`` is diagonal, its entry ``i``
counting the outputs that copy input ``i``, so the L2 Lipschitz constant is exactly
``||S||_2 = sqrt(max_i m_i)``, with ``m_i`` that *multiplicity*. Permutations (pixel and
channel shuffles) have ``m_i = 1``; zero or constant padding and cropping ``m_i <= 1``.
Reflection, replication and circular padding copy border entries, nearest upsampling every
entry: their multiplicities are read exactly from the module itself, applied to the indices of
the entries of one input (:func:`copy_multiplicity`), in float64 and in float32: torch's CPU
kernels compute the source index of nearest upsampling in double arithmetic for float64 inputs
and in float arithmetic for the others (its CUDA kernels in float for every dtype), and the two
maps differ (2 samples upsampled to 82 copy the first 41 times in float64 on the CPU, 42 times
in float32).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules import padding

from lipnet.certify.lipschitz import LipschitzBoundError, register_lipschitz_bound
from lipnet.nn.pooling import sqrt_up

#: Upsampling modes whose every output copies one input (torch computes the source index of
#: each output from the shapes and a scale, in double or float arithmetic: module docstring).
NEAREST_MODES = ("nearest", "nearest-exact")

#: The dtypes whose index arithmetic differs (float64: double; float32, and float16, bfloat16
#: and every dtype on CUDA alike: float), with the integers each holds exactly (``2^53``, ``2^24``).
_INDEX_DTYPES = ((torch.float64, 2 ** 53), (torch.float32, 2 ** 24))


def _copied_entries(module: nn.Module, index: torch.Tensor, dtype: torch.dtype, exact: int) -> torch.Tensor:
    """For each output of ``module`` on the input entries' indices ``index`` (int64, one example)
    run in ``dtype``, the index of the input entry it copies: digit by digit (base ``2^12``) where
    the indices exceed the integers ``dtype`` holds exactly (``exact``). Every output must be one
    of the digits it was given."""
    count = index.numel()
    base = max(count, 1) if count <= exact else 2 ** 12
    source, scale, rest = 0, 1, index
    while True:
        digits = (rest % base).to(dtype)
        with torch.no_grad():
            out = module(digits).flatten()
        if not bool(((out == out.round()) & (out >= 0) & (out < base)).all()):
            raise LipschitzBoundError(module, f"{type(module).__name__} computed an output that is not a copy of an "
                                              "input entry; its bound holds for maps that copy entries only")
        source = source + out.long() * scale
        rest, scale = rest // base, scale * base
        if scale >= count:
            return source


def copy_multiplicity(module: nn.Module, shape: tuple[int, ...]) -> int:
    """``max_i m_i``: how many outputs copy the most-copied entry of an input of ``shape``.

    The module runs on the CPU on ``(1, *shape)`` holding each entry's index, in float64 and in
    float32 (whose index arithmetic may differ: module docstring); every output must be one of
    those indices, and their counts are the multiplicities, the larger of the two maps' taken.
    """
    count = 1
    for size in shape:
        count *= size
    index = torch.arange(count).reshape(1, *shape)
    most = 0
    for dtype, exact in _INDEX_DTYPES:
        source = _copied_entries(module, index, dtype, exact)
        if source.numel():
            most = max(most, int(torch.bincount(source, minlength=count).max()))
    return most


def _refuse_padded_batch(module: nn.Module, shape) -> None:
    """Refuse padding that would reach the batch dimension of inputs ``(N, *shape)``."""
    axes = len(module.padding) // 2
    if axes > len(shape):
        raise LipschitzBoundError(module, (
            f"{type(module).__name__} pads the last {axes} dimensions, but inputs of shape (N, "
            f"{', '.join(map(str, shape))}) have only {len(shape)} per example: it would pad the batch dimension, so "
            f"each example's output would depend on the others; give inputs with at least {axes} dimensions "
            "besides the batch"))


def _refuse_short_input(module: nn.Module, shape, dims: int) -> None:
    """Refuse a map of the last ``dims`` dimensions on examples with fewer (it would reach the batch)."""
    if len(shape) < dims:
        raise LipschitzBoundError(module, (
            f"{type(module).__name__} rearranges the last {dims} dimensions, but inputs of shape (N, "
            f"{', '.join(map(str, shape))}) have only {len(shape)} per example: it would move entries between the "
            f"examples of a batch; give inputs of shape (N, C, H, W)"))


@register_lipschitz_bound(nn.PixelShuffle)
@register_lipschitz_bound(nn.PixelUnshuffle)
def _pixel_shuffle(module: nn.Module, shape) -> float:
    """1: a permutation of the entries of ``(C, H, W)``."""
    _refuse_short_input(module, shape, 3)
    return 1.0


@register_lipschitz_bound(nn.ChannelShuffle)
def _channel_shuffle(module: nn.ChannelShuffle, shape) -> float:
    """1: a permutation of the channels (dimension 1 of the input, never the batch)."""
    return 1.0


@register_lipschitz_bound(padding._ConstantPadNd)
def _constant_pad(module: nn.Module, shape) -> float:
    """1: ``ZeroPad`` / ``ConstantPad`` add constants, or crop for negative padding (``m_i <= 1``)."""
    _refuse_padded_batch(module, shape)
    return 1.0


@register_lipschitz_bound(padding._ReflectionPadNd)
@register_lipschitz_bound(padding._ReplicationPadNd)
@register_lipschitz_bound(padding._CircularPadNd)
def _copying_pad(module: nn.Module, shape) -> float:
    """``sqrt(max_i m_i)``: reflection pads copy entries near a border (up to 3 times per axis),
    replication pads the border entries (``1 + pad`` times), circular pads the wrapped ones.

    Circular padding with a negative (cropping) entry is refused: torch's wraps part of it from
    output entries that the crop left unwritten in some configurations (``CircularPad1d((1, -1))``
    on one sample), so its output holds whatever memory was there, not a function of the input.
    """
    _refuse_padded_batch(module, shape)
    if isinstance(module, padding._CircularPadNd) and min(module.padding) < 0:
        raise LipschitzBoundError(module, (
            f"{type(module).__name__}{tuple(module.padding)} has negative (cropping) padding, with which torch's "
            "circular padding reads memory outside its input in some configurations (its output is then not a "
            "function of the input, and changes with the batch); crop separately, e.g. with a negative "
            "nn.ZeroPad or slicing, and pad with non-negative circular padding"))
    return sqrt_up(copy_multiplicity(module, shape))


@register_lipschitz_bound(nn.Upsample)
def _upsample(module: nn.Upsample, shape) -> float:
    """``sqrt(max_i m_i)`` for nearest modes: ``sqrt(s_h s_w)`` for integer scale factors, and
    the exact maximum for any other size; interpolating modes are refused."""
    if module.mode not in NEAREST_MODES:
        raise LipschitzBoundError(module, (
            f"Upsample with mode={module.mode!r} interpolates, and lipnet.certify has no bound for it; use "
            "mode='nearest' (Lipschitz sqrt of the number of copies, e.g. 2 for scale_factor=2 in 2-D) or register "
            "a bound with lipnet.certify.register_lipschitz_bound"))
    return sqrt_up(copy_multiplicity(module, shape))
