"""The circulant embedding of one convolution axis reproduces the operator it stands for.

For zero padding, :func:`lipnet.bounds.circulant.axis_embedding` claims ``A = R C P`` on one
axis: ``P`` places the padded input into ``phases`` polyphase components of length
``fft_size`` (an isometry), ``C`` is the circular convolution with tap ``a`` reading phase
``tap_phase[a]`` shifted by ``tap_shift[a]``, and ``R`` keeps the first ``m`` rows. These
tests rebuild ``R C_a P`` for every tap from the embedding's integers alone and compare it,
entry by entry, with the tap's own matrix in ``F.conv2d``; the comparison is exact (0/1
matrices), so an FFT size at which a tap wraps onto input it must not read is caught
whatever the kernel. The norm bound is then checked against the dense SVD on the part of
that enumeration ``nn.Conv2d`` can express (symmetric or 'same' padding), and on geometries
where a wrap check that looked only above the support gave an unsound bound.
"""

import itertools

import pytest
import torch

from lipnet.bounds import conv2d_spectral_norm, exact_conv2d_spectral_norm
from lipnet.bounds.circulant import axis_embedding, output_length

KERNELS, STRIDES, DILATIONS, PADS, LENGTHS = range(1, 5), range(1, 4), range(1, 4), range(0, 5), range(1, 11)


def one_axis_geometries():
    """Every (n, kernel, stride, dilation, pad_lo, pad_hi) of the ranges with a non-empty output."""
    for kernel, stride, dilation, pad_lo, pad_hi, n in itertools.product(KERNELS, STRIDES, DILATIONS, PADS, PADS,
                                                                         LENGTHS):
        if output_length(n, kernel, stride, dilation, pad_lo, pad_hi) >= 1:
            yield n, kernel, stride, dilation, pad_lo, pad_hi


def tap_matrix(n, stride, dilation, pad_lo, m, a):
    """The ``(m, n)`` 0/1 matrix of tap ``a`` in the zero-padded convolution:
    output ``i`` reads input ``stride * i + dilation * a - pad_lo`` when it exists."""
    matrix = torch.zeros(m, n, dtype=torch.int64)
    for i in range(m):
        j = stride * i + dilation * a - pad_lo
        if 0 <= j < n:
            matrix[i, j] = 1
    return matrix


def embedded_tap_matrices(n, kernel, stride, dilation, pad_lo, pad_hi):
    """``(embedding, m, [R C_a P for each tap a], P, R)``, rebuilt from the embedding's integers alone."""
    e = axis_embedding(n, kernel, stride, dilation, pad_lo, pad_hi)
    m = output_length(n, kernel, stride, dilation, pad_lo, pad_hi)
    size = e.fft_size
    # P: input sample j sits at padded position t = j + pad_lo = stride * q + r, i.e. X_r[q mod size];
    # only the phases some live tap reads are placed (the others never reach the output).
    read = {phase for phase, live in zip(e.tap_phase, e.tap_live) if live}
    place = torch.zeros(e.phases * size, n, dtype=torch.int64)
    for j in range(n):
        q, r = divmod(j + pad_lo, stride)
        if r in read:
            place[r * size + q % size, j] += 1
    # R: output i is row i mod size of the circulant.
    rows = torch.zeros(m, size, dtype=torch.int64)
    for i in range(m):
        rows[i, i % size] += 1
    taps = []
    for phase, shift in zip(e.tap_phase, e.tap_shift):
        circulant = torch.zeros(size, e.phases * size, dtype=torch.int64)
        for u in range(size):
            circulant[u, phase * size + (u + shift) % size] = 1
        taps.append(rows @ circulant @ place)
    return e, m, taps, place, rows


def check_embedding_reproduces_the_operator(n, kernel, stride, dilation, pad_lo, pad_hi):
    e, m, taps, place, rows = embedded_tap_matrices(n, kernel, stride, dilation, pad_lo, pad_hi)
    geometry = dict(n=n, kernel=kernel, stride=stride, dilation=dilation, pad=(pad_lo, pad_hi), embedding=e)
    assert e.input_copies == 1 and e.row_copies == 1, geometry
    # P is an isometry on the samples it places: no two share a slot.
    assert torch.equal(place.T @ place, torch.diag(place.sum(dim=0))), geometry
    assert int(rows.sum(dim=0).max()) <= e.row_copies, geometry  # ||R||^2 <= row_copies
    for a, (live, embedded) in enumerate(zip(e.tap_live, taps)):
        exact = tap_matrix(n, stride, dilation, pad_lo, m, a)
        if live:
            assert torch.equal(embedded, exact), (geometry, a, embedded, exact)
        else:  # a dropped tap must read no input sample at all
            assert not exact.any(), (geometry, a)


@pytest.mark.parametrize("kernel", KERNELS)
def test_zero_padded_embedding_reproduces_every_tap_exactly(kernel):
    """Exhaustive over small one-axis geometries, asymmetric padding included."""
    count = 0
    for n, k, stride, dilation, pad_lo, pad_hi in one_axis_geometries():
        if k == kernel:
            check_embedding_reproduces_the_operator(n, k, stride, dilation, pad_lo, pad_hi)
            count += 1
    assert count > 300


# Geometries where the wrap check, looking only above the support, gave a bound below the
# exact norm (2 input and 2 output channels, zero padding).
WRAPPING = [
    dict(kernel=(1, 2), size=(7, 9), stride=(1, 3), padding=(0, 1), dilation=(2, 3)),
    dict(kernel=(2, 2), size=(3, 6), stride=(3, 2), padding=(3, 1), dilation=(1, 2)),
    dict(kernel=(2, 4), size=(9, 7), stride=3, padding=1, dilation=(3, 2)),
]


def _pair(v):
    return (v, v) if isinstance(v, int) else v


@pytest.mark.parametrize("case", WRAPPING)
def test_wrapping_geometries_embed_exactly_and_bound_soundly(case):
    kernel, size = case["kernel"], case["size"]
    stride, padding, dilation = (_pair(case[k]) for k in ("stride", "padding", "dilation"))
    for axis in range(2):
        check_embedding_reproduces_the_operator(size[axis], kernel[axis], stride[axis], dilation[axis],
                                                padding[axis], padding[axis])
    kw = dict(stride=case["stride"], padding=case["padding"], dilation=case["dilation"])
    gen = torch.Generator().manual_seed(1)
    for _ in range(6):
        weight = torch.randn(2, 2, *kernel, dtype=torch.float64, generator=gen)
        exact = exact_conv2d_spectral_norm(weight, size, **kw)
        bound = conv2d_spectral_norm(weight, size, **kw).item()
        assert bound >= exact * (1 - 1e-12), (case, bound, exact)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")  # torch's own, for F.conv2d
@pytest.mark.parametrize("stride", STRIDES)
def test_one_axis_bound_is_at_least_the_dense_norm(stride):
    """kernel (1, k) on inputs (1, n): every k <= 4, dilation <= 3, padding <= 3 and 'same', n <= 8."""
    gen = torch.Generator().manual_seed(stride)
    checked = 0
    paddings = [*range(0, 4)] + (["same"] if stride == 1 else [])
    for kernel, dilation, padding, n in itertools.product(range(2, 5), DILATIONS, paddings, range(1, 9)):
        pad = (0, padding) if isinstance(padding, int) else padding
        kw = dict(stride=(1, stride), padding=pad, dilation=(1, dilation))
        total = 2 * padding if isinstance(padding, int) else dilation * (kernel - 1)
        if n + total < dilation * (kernel - 1) + 1:
            continue
        weight = torch.randn(2, 2, 1, kernel, dtype=torch.float64, generator=gen)
        exact = exact_conv2d_spectral_norm(weight, (1, n), **kw)
        bound = conv2d_spectral_norm(weight, (1, n), **kw).item()
        assert bound >= exact * (1 - 1e-12), (kernel, n, kw, bound, exact)
        checked += 1
    assert checked > 150
