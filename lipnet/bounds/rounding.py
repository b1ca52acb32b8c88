"""Safety margin that makes a floating-point Gram bound a rigorous upper bound.

A Gram bound computed in floating point can undershoot its exact-arithmetic value by
rounding. With unit roundoff ``u`` and standard error bounds for sums and products
(Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed., Sec. 3.5):

* the symbol entries are sums of ``taps`` products with unit-modulus twiddles, each off by at
  most ``~(taps + 2) u`` times the sum of its ``|W|`` over the taps, which is at most ``sqrt(taps)``
  times their L2 norm: the symbol matrix is perturbed by at most ``~(taps + 2) u sqrt(taps) ||W||_F``
  in Frobenius norm, while ``sigma_max >= ||W||_F / sqrt(rank)`` (Parseval): relative
  ``(taps + 2) u sqrt(taps rank)``;
* a first Gram iterate built from the kernel's autocorrelation instead
  (:mod:`lipnet.bounds.symbol_gram`) errs by at most ``~sqrt(2) taps rank (inner + 2 taps^2) u``
  relative to the largest one;
* a Gram step ``fl(G^H G)`` on a Frobenius-normalised ``G`` has error ``<= 3 gamma_inner``
  in Frobenius norm (``2 gamma_inner`` for a complex product, ``3 gamma_inner`` for the two real
  products of the real form of :mod:`lipnet.bounds.hermitian`) while
  ``sigma_max(G)^2 >= 1 / rank``: relative ``3 inner * u * rank``; through the ``2^-t`` roots
  the steps add up to at most that amount once more;
* the final estimate of ``lambda_max(G_t)`` (its Frobenius norm, or the trace form
  ``m + sqrt(r - 1) s'`` of :mod:`lipnet.bounds.gram`) is a sum of non-negative terms, so it
  carries a relative error of at most ``~r u``, below the Gram-step term;
* the carried log-scale, the logarithms and the final exponential lose a few units of
  ``u`` per step relative to ``|log bound|``.

``relative_rounding_margin`` returns ten times the sum of these worst cases, and never
less than ``1e-6``: multiplying a float64 bound by ``1 + margin`` gives a certified upper
bound. (In float64, for 3 x 3 kernels, ten times the worst case stays below that floor up to
about 6,700 channels.)

These error bounds, and the directed roundings of :mod:`lipnet.certify`, assume IEEE arithmetic
with gradual underflow; :func:`gradual_underflow` keeps it while they run, whatever
``torch.set_flush_denormal`` says.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch

MIN_RELATIVE_MARGIN = 1e-6


def relative_rounding_margin(dtype: torch.dtype, *, inner: int, rank: int, taps: int, n_iter: int,
                             log_bound: float = 0.0) -> float:
    """Relative margin covering all rounding in a Gram bound computed in ``dtype``.

    Args:
        dtype: floating dtype the bound was computed in.
        inner: largest matrix dimension (inner dimension of the Gram products).
        rank: smallest matrix dimension.
        taps: number of kernel taps summed into each symbol entry (1 for a dense layer).
        n_iter: Gram iterations.
        log_bound: natural logarithm of the bound (its size enters the log-scale error).
    """
    u = torch.finfo(dtype).eps / 2
    autocorrelation = 1.5 * taps * rank * (inner + 2 * taps**2)
    worst = u * ((taps + 2) * math.sqrt(taps * rank) + autocorrelation + 6 * inner * rank
                 + (n_iter + 3) * (4 + abs(log_bound)))
    return max(MIN_RELATIVE_MARGIN, 10 * worst)


def with_rounding_margin(bound: float, dtype: torch.dtype, *, inner: int, rank: int, taps: int, n_iter: int) -> float:
    """``bound * (1 + relative_rounding_margin(...))``: a Gram bound computed in ``dtype`` made
    an upper bound of the exact one (its logarithm, from the float ``bound`` itself: a bound
    below ~1e-45 read in float32 would lose its digits or give an infinite margin)."""
    log_bound = abs(math.log(bound)) if bound > 0 else 0.0
    margin = relative_rounding_margin(dtype, inner=inner, rank=rank, taps=taps, n_iter=n_iter, log_bound=log_bound)
    return bound * (1 + margin)


def applied_scalar_magnitude(value: float) -> float:
    """The largest ``|value|`` a kernel may apply for the Python float ``value``: itself, or rounded
    to float32, float16 or bfloat16, in which torch's kernels take scalars such as
    ``LeakyReLU(1.1)``'s slope (a float32 model multiplies by ``float32(1.1) = 1.1000000238``)."""
    value = float(value)
    rounded = [abs(float(torch.tensor(value, dtype=dtype)))
               for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16)]
    # A finite value beyond a narrow type's range rounds to inf there: a model computing in that type
    # has infinite outputs (refused on its dry run), and the others apply a finite value.
    return max(r for r in rounded if math.isfinite(r) or not math.isfinite(value))


@contextmanager
def gradual_underflow():
    """Subnormal results kept on the CPU while it runs: ``torch.set_flush_denormal(True)`` (a speed
    setting) is turned off, and back on afterwards. With it, ``x / 2`` of ``x = 2^-1022`` is 0 and
    ``nextafter(0, inf)`` is 0, which the error bounds and directed roundings do not allow for.

    The setting is per thread, and torch's intra-op worker threads keep the one they started
    with: where they flush (set before they started), the CPU work runs on this thread alone
    (``torch.set_num_threads(1)``) and the thread count is restored afterwards."""
    flushing = flushes_denormals()
    if flushing:
        torch.set_flush_denormal(False)
    threads = torch.get_num_threads()
    if threads > 1 and workers_flush_denormals(threads):
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        if flushing:
            torch.set_flush_denormal(True)


@contextmanager
def cpu_default_device():
    """Tensors created without a device on the CPU while it runs, as lipnet's code assumes, whatever
    ``torch.set_default_device`` (or a ``with torch.device(...)`` block) of the caller says: under
    ``"meta"`` they would hold no values to read, under ``"cuda"`` they would meet CPU tensors. Restored
    on exit (nothing is pushed where the default is already the CPU)."""
    if torch.get_default_device().type == "cpu":
        yield
        return
    with torch.device("cpu"):
        yield


@contextmanager
def certification_arithmetic():
    """:func:`gradual_underflow` and :func:`cpu_default_device`: the arithmetic the proofs assume,
    whatever the caller set, and the caller's settings back on exit."""
    with cpu_default_device(), gradual_underflow():
        yield


def workers_flush_denormals(threads: int) -> bool:
    """Whether any of torch's ``threads`` intra-op CPU threads flushes subnormal results to 0: an
    elementwise division long enough to be split among all of them (``2^15`` elements, ATen's grain
    size, twice per thread), each quotient subnormal."""
    tiny = torch.full((threads * 2 ** 16,), 2.0 ** -1022, dtype=torch.float64, device="cpu")
    return bool((tiny / 2 == 0).any())


def flushes_denormals() -> bool:
    """Whether this thread's CPU arithmetic flushes subnormal results to 0 (``torch.set_flush_denormal``).

    Asked of the CPU explicitly: under ``torch.set_default_device("cuda")`` a tensor created without a
    device is a GPU one, whose arithmetic ignores the CPU's flushing (the answer would be "no" while
    the CPU flushes), and under ``"meta"`` it holds no value to read."""
    return bool(torch.tensor(2.0 ** -1022, dtype=torch.float64, device="cpu") / 2 == 0)
