"""Gram iteration: a differentiable upper bound on the spectral norm of a matrix.

For a matrix ``W`` let ``G_1 = W^H W`` and ``G_{t+1} = G_t^H G_t``. The singular values of
``G_t`` are ``sigma_i(W)^(2^t)``, so

    sigma_max(W) <= ||G_t||_F^(1 / 2^t) = (sum_i sigma_i^p)^(1 / p),   p = 2^(t+1),

the Schatten-``p`` norm of ``W``: an upper bound that decreases monotonically in ``t`` and
converges to ``sigma_max`` superlinearly. The relative gap is at most
``rank^(1/p) - 1`` and, for a simple top singular value, about ``(sigma_2/sigma_1)^p / p``.

The last iterate ``H = G_t`` is Hermitian, so its largest eigenvalue is also bounded by
its trace statistics (Wolkowicz and Styan, 1980): with ``r`` its size, ``m = tr(H) / r`` and
``s^2 = ||H - m I||_F^2 / r``,

    lambda_max(H) <= m + sqrt(r - 1) s,

which is never above ``||H||_F`` (Cauchy-Schwarz) and is exact when all eigenvalues are
equal -- the case where the Frobenius bound is worst (``rank^(1/p)``), and the one
approached by orthogonal or near-orthogonal (trained 1-Lipschitz) layers. The bound
returned is ``min(||H||_F, m + sqrt(r - 1) s')^(1 / 2^t)`` with
``s' = sqrt(s^2 + (tau m)^2) >= s``, ``tau = sqrt(eps)`` of the dtype: this keeps the
bound smooth (its gradient stays bounded for nearly scalar ``H``) at a relative cost below
``sqrt(r) tau / 2^t``. Autograd's gradient of it is accurate there; the explicit one
(:func:`max_gram_bound_grad`) subtracts two terms of size about ``1 / tau`` and is accurate
only to about ``sqrt(r) tau`` relative (measured: 1.6e-3 in float32 and 1.6e-7 in float64 for
an orthogonal 64 x 64 matrix, ``n_iter=4``): the bound is unaffected, its training gradient
slightly noisy. ``s^2`` is summed from the off-diagonal
entries and the diagonal deviations, which are non-negative, so there is no cancellation.

Raw Gram iterates overflow after a few steps, so every iterate is divided by its
Frobenius norm and the logarithm of the scale is carried separately. The scale factors
cancel exactly in the bound, so they are treated as constants by autograd. The logarithm
is carried in float64 whatever the dtype of the matrices, and the bound is read off in
float64 before it is rounded to their dtype: in float32 its rounding, relative to
``|log scale|`` (about 69 for entries near 1e30, and multiplied by ``2^t`` by the steps),
once let the bound of a matrix with entries near 1e30 or 1e-30 undershoot its norm by
about 1e-5 relative; in float64 it is about 1e-14.

The batched bound of :func:`max_matrix_spectral_norm` carries complex iterates, which are
Hermitian from the first step on, in their real form (:mod:`lipnet.bounds.hermitian`): the
same norms and trace statistics for half the arithmetic of complex products, wherever
arithmetic rather than kernel launches sets the bound's time (:func:`arithmetic_dominates`).

References:
    Delattre, Barthelemy, Araujo, Allauzen. "Efficient Bound of Lipschitz Constant for
    Convolutional Layers by Gram Iteration", ICML 2023, Algorithm 1.
    Wolkowicz, Styan. "Bounds for eigenvalues using traces", Linear Algebra and its
    Applications 29, 1980, Theorem 2.1.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from lipnet.bounds.autocast import ieee_float32_matmuls
from lipnet.bounds.batching import vmap_into_stack
from lipnet.bounds.first_order import first_order_backward
from lipnet.bounds.graphs import launches_are_free, replayed
from lipnet.bounds.hermitian import gram_real_form, hermitian_from_real_form, square_real_form
from lipnet.bounds.switch import Switch

#: Gram steps of the bound of the frequencies that may hold the maximum.
DEFAULT_N_ITER = 10
#: Gram steps applied to every matrix of a batch to pick those candidates.
DEFAULT_SCREEN_ITER = 5
#: How many matrices of a batch get the full ``n_iter`` steps.
DEFAULT_N_CANDIDATES = 8
#: Steps added, after the candidates, to every matrix whose screening bound exceeds their
#: maximum, before those still above it get all ``n_iter`` (:func:`refines_exceeding`).
EXCEEDING_EXTRA_STEPS = 2
#: Relative excess over the candidates' maximum below which a screened bound is left as it
#: is: the maximum is then at most this much above the refined one. Exact isometries (layers
#: at their orthogonal initialization) have all bounds within the trace form's smoothing,
#: about ``sqrt(r) tau / 2^t`` (``8.6e-5`` for ``r = 64`` after 5 steps), of each other.
EXCEEDING_TOLERANCE = 1e-4
#: Multiply-adds per Gram step (``B r^3`` for ``B`` matrices ``r x r``) from which the
#: products, not the launches of its ~200 operations, set the time of a bound launched
#: eagerly on a GPU. An estimate: ~200 operations at ~11 us of host time each on the H200
#: (``docs/benchmarks.md``) against ~5 steps of ``8 B r^3`` flops at ~25 TFLOP/s.
EAGER_ARITHMETIC_MIN_WORK = 2**30
#: Bytes of iterates that the CPU's Gram steps take through all their steps at a time: a slice
#: of the batch whose iterate and the squaring's buffers (four matrices each) stay in the
#: caches, instead of passes over the whole batch through memory at every step.
CPU_SLICE_BYTES = 2**20
#: Fewer matrices than this per slice (large matrices) are stepped as one batch: their products
#: are long enough to hide memory, and small batches leave the threads' batch split uneven.
MIN_SLICE = 8


def matrix_spectral_norm(mat: torch.Tensor, n_iter: int = DEFAULT_N_ITER) -> torch.Tensor:
    """Upper bound on the largest singular value of each matrix, by Gram iteration.

    Args:
        mat: real or complex tensor of shape ``(..., m, n)``; leading dimensions are a
            batch of independent matrices.
        n_iter: number of Gram steps ``t`` (``0`` gives the Frobenius norm).

    Returns:
        Real tensor of shape ``(...)`` with ``sigma_max <= bound <= (sum_i sigma_i^p)^(1/p)``,
        ``p = 2^(n_iter + 1)``, for every matrix (in exact arithmetic; see
        :mod:`lipnet.bounds.rounding` for floating point).
        Differentiable by autograd. Zero matrices give exactly ``0`` with a finite
        gradient; NaN propagates. Entries from 1e-30 to 1e30 and any ``n_iter`` neither
        overflow nor underflow. The first Gram step is taken on the smaller side
        (``W W^H`` or ``W^H W``, which share their non-zero spectrum).

    Example:
        >>> w = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
        >>> round(float(matrix_spectral_norm(w, n_iter=6)), 6)
        3.0
    """
    _check_matrices(mat, n_iter)
    with ieee_float32_matmuls():
        g, log_scale = _gram_first(mat, n_iter)
        g, log_scale = _gram_steps(g, log_scale, n_iter - 1)
        return _gram_bound(g, log_scale, n_iter)[0]


def max_matrix_spectral_norm(mat: torch.Tensor, n_iter: int = DEFAULT_N_ITER,
                             screen_iter: int = DEFAULT_SCREEN_ITER,
                             n_candidates: int = DEFAULT_N_CANDIDATES) -> torch.Tensor:
    """Upper bound on the largest singular value over a batch of matrices.

    Every matrix gets ``screen_iter`` Gram steps; the ``n_candidates`` matrices with the
    largest screening bounds continue to ``n_iter`` steps. Each matrix's value is a valid
    upper bound of its own norm (screened or refined), so their maximum bounds the
    maximum norm: the result is sound whatever the selection, and as tight as a full
    ``n_iter`` run whenever the true maximiser is among the candidates and no screened
    bound lies above the candidates' maximum. Where the largest singular values are nearly
    equal across the batch (trained 1-Lipschitz layers), every screened bound can lie above
    it; on the CPU those matrices are refined as well (:func:`refines_exceeding`), and the
    result is within ``EXCEEDING_TOLERANCE`` (``1e-4``) of a full ``n_iter`` run.

    The backward pass is explicit and costs ``O(n_iter)`` products of one matrix (only the
    maximising matrix receives a gradient). With ``A = W / bound``, ``H_1 = A^H A``,
    ``H_{s+1} = H_s^2`` (all of norm <= 1, so nothing overflows) and ``t`` steps:

    * Frobenius form, the Schatten-``2^(t+1)`` norm: gradient ``A H_1 ... H_t``;
    * trace form ``(m + c s')^(1/2^t)``, ``c = sqrt(r - 1)``, with ``m`` and ``s'`` those of
      ``H_t``: gradient ``A [(1 - c (1 - tau^2) m / s') H_1 ... H_{t-1} + (c / s') H_1 ... H_t] / r``.

    Args:
        mat: tensor ``(B, m, n)``, real or complex.
        n_iter: Gram steps for the candidates.
        screen_iter: Gram steps for every matrix (``>= n_iter`` gives all ``n_iter``).
        n_candidates: number of refined matrices (all of them when ``B <= 2 * n_candidates``).

    Returns:
        0-dim real tensor.
    """
    if mat.dim() != 3:  # the rest is checked by max_gram_bound
        raise ValueError(f"max_matrix_spectral_norm expects a batch (B, m, n), got shape {tuple(mat.shape)}")
    keep = torch.is_grad_enabled() and mat.requires_grad  # a backward pass may follow
    bound = _MaxGramBound if torch.compiler.is_compiling() else _MaxGramBoundForwardMode
    with ieee_float32_matmuls():
        return bound.apply(mat[None], n_iter, screen_iter, n_candidates, keep)[0][0]


class MaxBound(NamedTuple):
    """The maximum of a batch's Gram bounds and what its gradient needs (each field with a
    leading dimension ``L`` for ``L`` stacked batches)."""

    value: torch.Tensor  # the maximum
    best: torch.Tensor  # index of the maximizing matrix in its batch
    matrix: torch.Tensor  # that matrix
    steps: torch.Tensor  # Gram steps it received
    trace_form: torch.Tensor  # whether its bound is the trace form
    # Its Gram iterates G_1 .. G_t as G_k = exp(log_scales[k - 1]) iterates[k - 1] (float64
    # logarithms), when kept for the backward pass (every matrix refined); else None.
    iterates: torch.Tensor | None = None
    iterate_log_scales: torch.Tensor | None = None


def screening_steps(batch: int, n_iter: int, screen_iter: int, n_candidates: int) -> int:
    """Gram steps every matrix of a batch of ``batch`` gets in :func:`max_gram_bound`."""
    return n_iter if batch <= 2 * n_candidates else min(screen_iter, n_iter)


def bound_steps(batch: int, n_iter: int, screen_iter: int, n_candidates: int) -> tuple[int, ...]:
    """The Gram step counts a matrix of a batch of ``batch`` can end with in :func:`max_gram_bound`
    (the ``stops`` of :func:`max_gram_bound_grad`): the screening's, ``n_iter``, and in between
    the first stop of the refinement of exceeding matrices (:func:`refines_exceeding`)."""
    screen = screening_steps(batch, n_iter, screen_iter, n_candidates)
    return tuple(sorted({screen, min(screen + EXCEEDING_EXTRA_STEPS, n_iter), n_iter}))


_REFINEMENT = Switch(True)


def set_refine_exceeding(enabled: bool) -> bool:
    """Allow (default) or forbid the refinement of exceeding matrices (:func:`refines_exceeding`);
    returns the previous setting.

    A Gram layer applies ``W / bound(W)``, so the function a checkpoint computes follows the
    bound's path. A model trained on a GPU or compiled had its bounds screened alone; off, a
    CPU computes them the same way, and e.g. certifies exactly the function trained there
    (``python -m lipnet.certify --screening-alone``). On, such a model's flat-spectrum layers
    get bounds up to a few per cent lower on the CPU: a slightly different network, certified
    soundly as it is."""
    return _REFINEMENT.set(enabled)


def refine_exceeding(enabled: bool = True):
    """Context manager form of :func:`set_refine_exceeding`.

    Example:
        >>> from lipnet.bounds import refine_exceeding
        >>> with refine_exceeding(False):
        ...     pass  # bounds screened alone, as on a GPU
    """
    return _REFINEMENT.scoped(enabled)


def refines_exceeding(device: torch.device) -> bool:
    """Whether :func:`max_gram_bound` refines, beyond its candidates, every matrix whose bound
    still exceeds the candidates' maximum: where the bound may read a data-dependent count and
    its arithmetic sets its time, on the CPU outside ``torch.compile``, unless
    :func:`set_refine_exceeding` forbids it. On a GPU that read would wait for the device (and
    cannot happen in a compiled or captured graph), so there the refinement stops at the
    candidates, whose number is fixed. Under ``FakeTensorMode`` (shape and memory estimators) there
    are no values to count, and the refinement stops there too."""
    return (_REFINEMENT.enabled and device.type == "cpu" and not torch.compiler.is_compiling()
            and not fake_tensor_mode_active())


def fake_tensor_mode_active() -> bool:
    """Whether a ``FakeTensorMode`` is on (shape and memory estimators): tensors made now hold no
    values, so nothing computed now may steer Python or be kept for later calls."""
    return torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None


def max_gram_bound(mat: torch.Tensor, n_iter: int, screen_iter: int, n_candidates: int,
                   keep_iterates: bool = False) -> MaxBound:
    """Forward of :func:`max_matrix_spectral_norm`, without autograd (screening, then refinement).

    ``mat`` is one batch ``(B, m, n)`` or ``L`` independent batches ``(L, B, m, n)``, each
    with its own screening and maximum (the fields of the result then have a leading ``L``);
    all ``L * B`` matrices go through the same few batched operations. Every matrix ends
    with ``screening_steps(B, ...)`` or ``n_iter`` steps, so :func:`max_gram_bound_grad`
    only needs those two stops. ``keep_iterates`` (a backward pass will follow): when every
    matrix gets all ``n_iter`` steps (small batches, e.g. a dense layer's one matrix), keep
    the maximizer's Gram iterates for :func:`max_gram_bound_grad`, which then needs no Gram
    product of its own: half of the backward's arithmetic, for a few more small operations.
    Only where :func:`arithmetic_dominates`; an eager GPU bound of small matrices, where each
    operation is a kernel launch, recomputes them.
    """
    _check_matrices(mat, n_iter)
    if mat.dim() not in (3, 4):
        raise ValueError(f"max_matrix_spectral_norm expects a batch (B, m, n) or batches (L, B, m, n), "
                         f"got shape {tuple(mat.shape)}")
    _check_screening(screen_iter, n_candidates)
    stacked = mat.dim() == 4
    layers, batch = mat.shape[:2] if stacked else (1, mat.shape[0])
    flat = mat.flatten(0, 1) if stacked else mat
    screen = screening_steps(batch, n_iter, screen_iter, n_candidates)
    real_form = uses_real_form(flat)
    g, log_scale = _gram_first_inplace(flat, screen, real_form)
    found = _max_bound(g.unflatten(0, (layers, batch)), log_scale.view(layers, batch), n_iter, screen, n_candidates,
                       keep_iterates, real_form)
    found = found._replace(matrix=flat.index_select(0, found.best + _batch_starts(layers, batch, mat.device)))
    return found if stacked else MaxBound(*(None if field is None else field[0] for field in found))


def max_gram_bound_of_grams(gram: torch.Tensor, log_scale: torch.Tensor, n_iter: int, screen_iter: int,
                            n_candidates: int, keep_iterates: bool = False) -> MaxBound:
    """:func:`max_gram_bound` of ``L`` batches of complex matrices given by their first Gram iterates.

    Args:
        gram: ``(L, B, r, r)``, the real forms (:mod:`lipnet.bounds.hermitian`) of the Gram
            matrices ``exp(log_scale) gram`` of the matrices on their smaller side, e.g. from
            :func:`lipnet.bounds.symbol_gram.symbol_gram_real_form`. Overwritten: each matrix
            is scaled in place, and its memory receives later iterates.
        log_scale: ``(L, B)`` or broadcastable to it; best in float64. A logarithm in a lower
            precision (e.g. ``torch.log`` of a float32 scale) is taken as rounded by up to one
            unit in its last place, and raised by that much (:func:`_raised_to_float64`).
        n_iter, screen_iter, n_candidates, keep_iterates: as in :func:`max_gram_bound`
            (``n_iter, screen_iter >= 1``: the first step is taken).

    Returns:
        The fields of :func:`max_gram_bound` for the ``L`` batches, except ``matrix``, which is
        ``None``: :func:`max_gram_bound_grad` needs the maximizers ``best``, which the caller
        builds (only those, not the whole batch).
    """
    if gram.dim() != 4 or gram.shape[-1] != gram.shape[-2] or gram.is_complex():
        raise ValueError(f"expected real forms of Gram matrices (L, B, r, r), got {gram.dtype} {tuple(gram.shape)}")
    _check_screening(screen_iter, n_candidates)
    layers, batch, r = gram.shape[:3]
    screen = screening_steps(batch, n_iter, screen_iter, n_candidates) if isinstance(n_iter, int) else None
    if not isinstance(n_iter, int) or n_iter < 1 or screen < 1:
        raise ValueError(f"the first Gram step is taken: n_iter and the screening steps of this batch of {batch} "
                         f"must be >= 1, got n_iter={n_iter!r}, screen_iter={screen_iter!r}")
    # Each matrix scaled by a power of two (exact) to largest |entry| in [1, 2), as
    # _gram_first_inplace scales the symbols: where taps nearly cancel at a frequency, its Gram
    # matrix may be so small beside the batch's common scale that the squares of its entries
    # underflow, and its Frobenius norm, the next step's divisor, would be 0.
    peak = _max_abs(gram, (-2, -1)).clamp_min(torch.finfo(gram.dtype).tiny)
    peak = torch.exp2(torch.floor(torch.log2(peak)))
    gram = gram.mul_(peak.reciprocal()[..., None, None])  # exact (powers of two), and no fresh pages to touch
    log_scale = _raised_to_float64(log_scale).expand(layers, batch) + torch.log(peak.double())
    real_form = arithmetic_dominates(layers * batch, r, gram.device)
    if not real_form:
        gram = hermitian_from_real_form(gram)
    return _max_bound(gram, log_scale, n_iter, screen, n_candidates, keep_iterates, real_form)


def _raised_to_float64(log_scale: torch.Tensor) -> torch.Tensor:
    """``log_scale`` in float64, at least the logarithm it was rounded from: one in a lower
    precision is raised by ``eps |log_scale|``, at least one unit in its last place. That
    covers ``2 log(s)`` from ``torch.log`` of a float32 ``s``, whose error is below one unit
    (0.84 measured on the CPU; CUDA's ``logf`` is documented within 1), so that the bound
    stays an upper one."""
    wide = log_scale.double()
    if log_scale.dtype == torch.float64:
        return wide
    return wide + wide.abs() * torch.finfo(log_scale.dtype).eps


def _max_bound(g: torch.Tensor, log_scale: torch.Tensor, n_iter: int, screen: int, n_candidates: int,
               keep_iterates: bool, real_form: bool) -> MaxBound:
    """Screening and refinement from ``L`` batches of first iterates ``(L, B, r, r)`` (raw
    matrices when ``screen == 0``); ``matrix`` left ``None``."""
    layers, batch = g.shape[:2]
    g, log_scale = g.flatten(0, 1), log_scale.flatten()
    starts = _batch_starts(layers, batch, g.device)
    keep_iterates = (keep_iterates and screen == n_iter > 0
                     and arithmetic_dominates(layers * batch, g.shape[-1], g.device))
    iterates = [] if keep_iterates else None
    g, log_scale = _gram_steps_inplace(g, log_scale, screen - 1, keep=iterates, real_form=real_form)
    bounds, trace_form = _gram_bound_nograd(g, log_scale, screen)
    steps = torch.full((layers * batch,), screen, dtype=torch.int64, device=g.device)
    if screen < n_iter:
        idx = (bounds.view(layers, batch).topk(n_candidates, dim=1).indices + starts[:, None]).flatten()
        found = _refine(g, log_scale, idx, idx, (bounds, trace_form, steps), screen, n_iter, real_form)[0]
        if refines_exceeding(g.device):
            found = _refine_exceeding(g, log_scale, found, layers, screen, n_iter, real_form)
        bounds, trace_form, steps = found
    # Tensor indices throughout: no host synchronization, and one graph under torch.compile
    # (only the CPU's eager refinement of exceeding matrices reads a count).
    value, best = bounds.view(layers, batch).max(1)
    pick = best + starts
    kept = (None, None)
    if keep_iterates:  # (L, t, r, r) and (L, t): the maximizers' iterates
        kept = tuple(torch.stack([part.index_select(0, pick) for part in parts], 1) for parts in zip(*iterates))
        if real_form:
            kept = (hermitian_from_real_form(kept[0]), kept[1])
    return MaxBound(value, best, None, steps.index_select(0, pick), trace_form.index_select(0, pick), *kept)


def _refine(g: torch.Tensor, log_scale: torch.Tensor, rows: torch.Tensor, idx: torch.Tensor, found: tuple,
            steps: int, target: int, real_form: bool):
    """Rows ``rows`` of the iterates ``G = exp(log_scale) g`` at ``steps`` Gram steps, matrices
    ``idx`` of the batch, continued to ``target`` steps: ``(found, (g, log_scale))`` with their
    bounds, forms and step counts written into ``found = (bounds, trace_form, steps)`` at
    ``idx``, and their new iterates."""
    g, log_scale = _gram_steps_inplace(g[rows], log_scale[rows], target - steps, steps > 0, real_form=real_form)
    refined, refined_form = _gram_bound_nograd(g, log_scale, target)
    bounds, trace_form, counts = found
    found = (bounds.scatter(0, idx, refined), trace_form.scatter(0, idx, refined_form),
             counts.scatter(0, idx, torch.full_like(idx, target)))
    return found, (g, log_scale)


def _refine_exceeding(g: torch.Tensor, log_scale: torch.Tensor, found: tuple, layers: int, screen: int,
                      n_iter: int, real_form: bool) -> tuple:
    """Continue every screened matrix whose bound exceeds the maximum of the refined ones
    (those with ``n_iter`` steps) of its batch by more than :data:`EXCEEDING_TOLERANCE`: first
    by :data:`EXCEEDING_EXTRA_STEPS` steps, then, for those still above it, to ``n_iter``.
    Afterwards every matrix with fewer than ``n_iter`` steps is within that tolerance of the
    refined maximum, so the batch's maximum is within it of the maximum of full ``n_iter``
    bounds of every matrix (whatever the candidates were).

    Screening alone leaves the maximum up to a few per cent high where the matrices' largest
    singular values are nearly equal across the batch and each matrix has several near its
    own largest (as the frequencies of trained 1-Lipschitz convolutions do, whose training
    pushes every direction up to the bound): there every screened bound exceeds the maximum.
    Gaussian kernels rarely have any such matrix, and pay one comparison. The count of
    matrices continued is read on the host (:func:`refines_exceeding`)."""
    bounds, trace_form, steps = found
    members, current = None, screen  # rows of (g, log_scale): all matrices, then those continued
    for target in sorted({min(screen + EXCEEDING_EXTRA_STEPS, n_iter), n_iter}):
        refined = torch.where(steps == n_iter, bounds, torch.zeros_like(bounds)).view(layers, -1).amax(1)
        above = bounds.view(layers, -1) > refined[:, None] * (1 + EXCEEDING_TOLERANCE)
        exceeding = above.flatten() & (steps == current)
        rows = (exceeding if members is None else exceeding[members]).nonzero().squeeze(1)
        if rows.numel() == 0:
            break
        idx = rows if members is None else members[rows]
        (bounds, trace_form, steps), (g, log_scale) = _refine(g, log_scale, rows, idx, (bounds, trace_form, steps),
                                                              current, target, real_form)
        members, current = idx, target
    return bounds, trace_form, steps


def _batch_starts(layers: int, batch: int, device: torch.device) -> torch.Tensor:
    """Where each of ``layers`` batches of ``batch`` matrices starts in the flat batch."""
    return torch.arange(0, layers * batch, batch, device=device)


def _check_screening(screen_iter: int, n_candidates: int) -> None:
    if screen_iter < 0 or n_candidates < 1:
        raise ValueError(f"screen_iter must be >= 0 and n_candidates >= 1, got {screen_iter}, {n_candidates}")


def uses_real_form(mat: torch.Tensor) -> bool:
    """Whether :func:`max_gram_bound` carries the Gram iterates of complex ``mat`` (a batch
    ``(..., m, n)``) in their real form (:mod:`lipnet.bounds.hermitian`): half the arithmetic
    of complex products, for three more operations per step; when
    :func:`arithmetic_dominates`."""
    batch = mat.shape[:-2].numel()
    return mat.is_complex() and arithmetic_dominates(batch, min(mat.shape[-2:]), mat.device)


def arithmetic_dominates(batch: int, size: int, device: torch.device) -> bool:
    """Whether fewer flops pay for more operations in a bound over ``batch`` matrices of size
    ``size`` on ``device``: on the CPU; where launches cost no host time
    (:func:`lipnet.bounds.graphs.launches_are_free`: compiled, or replayed as CUDA graphs); and for
    an eager GPU bound from :data:`EAGER_ARITHMETIC_MIN_WORK` multiply-adds per Gram step.
    Below that an eager GPU bound waits on the host, and every added operation costs time."""
    return (device.type == "cpu" or launches_are_free(device)
            or batch * size**3 >= EAGER_ARITHMETIC_MIN_WORK)


def max_gram_bound_grad(found: MaxBound, n_iter: int, stops=None) -> torch.Tensor:
    """Gradient of the maximum with respect to the maximizing matrix (shape of ``found.matrix``).

    The bound of that matrix is ``||H_t||^(1/2^t)`` (Frobenius or trace form) of its Gram
    iterates ``H_j = H_{j-1}^2``, ``H_1 = A A^H``; its derivative is a product of the iterates
    (the rescalings cancel), computed here in ``O(t)`` products of one matrix (of each matrix, for
    the fields of ``L`` stacked batches, ``found.matrix`` of shape ``(L, m, n)``). ``stops``: the
    step counts ``found.steps`` can hold (default: any of ``0 .. n_iter``); the products are
    kept at those counts only and picked at the end, so two stops cost two selections.
    """
    w, value, steps, trace_form = found.matrix, found.value, found.steps, found.trace_form
    stops = sorted(set(range(n_iter + 1) if stops is None else stops))
    # A zero bound means a zero matrix: then a = 0 and every product below is 0 (no 0/0).
    a = w / value.clamp_min(torch.finfo(value.dtype).tiny).to(w.dtype)[..., None, None]
    left = a.shape[-2] <= a.shape[-1]
    iterates = None if found.iterates is None else _iterates_of_normalized(found, a.real.dtype)
    h = (a @ a.mH if left else a.mH @ a) if iterates is None else iterates[..., 0, :, :]
    eye = torch.eye(h.shape[-1], dtype=h.dtype, device=h.device)
    # At stop t: before = H_1 ... H_{t-1}, last = H_t, product = H_1 ... H_t (identity if empty).
    kept = {0: (eye, eye, eye)}
    product = eye
    for t in range(1, stops[-1] + 1):
        if t > 1:
            h = h @ h if iterates is None else iterates[..., t - 1, :, :]
        before, product = product, (h if t == 1 else product @ h)
        if t in stops:
            kept[t] = (before, h, product)
    before, last, product = kept[stops[0]]
    for t in stops[1:]:
        here = (steps == t)[..., None, None]
        before, last, product = (torch.where(here, new, old) for new, old in zip(kept[t], (before, last, product)))
    r = h.shape[-1]
    mean, spread, _ = _trace_statistics(last, differentiable=False)
    c = (r - 1) ** 0.5
    inv_spread = (1 / spread.clamp_min(torch.finfo(spread.dtype).tiny))[..., None, None]
    keep = 1 - c * (1 - _smoothing(h.dtype) ** 2) * mean[..., None, None] * inv_spread
    trace_weight = (keep * before + c * inv_spread * product) / r
    weight = torch.where(trace_form[..., None, None], trace_weight.to(h.dtype), product)
    return weight @ a if left else a @ weight


def _iterates_of_normalized(found: MaxBound, real_dtype: torch.dtype) -> torch.Tensor:
    """The Gram iterates ``H_k`` of ``A = W / bound`` from those the forward pass kept:
    ``H_k(A) = G_k(W) / bound^(2^k)``, the scale computed from float64 logarithms (the
    exponents reach thousands, where float32 would lose digits)."""
    t = found.iterates.shape[-3]
    powers = torch.exp2(torch.arange(1, t + 1, dtype=torch.float64, device=found.value.device))
    value = found.value.double()
    log_value = torch.log(value.clamp_min(torch.finfo(torch.float64).tiny))[..., None]
    scale = torch.exp(found.iterate_log_scales - powers * log_value)
    scale = torch.where(value[..., None] > 0, scale, torch.zeros_like(scale))  # zero matrix: zero iterates
    return found.iterates * scale.to(real_dtype)[..., None, None]


class _MaxGramBound(torch.autograd.Function):
    """:func:`max_gram_bound` of ``L`` stacked batches ``(L, B, m, n)`` with its explicit backward.
    Outputs: the fields of :class:`MaxBound` (the first, the bounds ``(L,)``, is the result; the
    others are what the backward needs, returned so that ``setup_context`` can save them, which
    ``torch.func`` transforms require). ``keep``: a backward pass follows, keep the iterates."""

    @staticmethod
    def forward(mat, n_iter, screen_iter, n_candidates, keep):
        def bound(mat):
            return tuple(field for field in max_gram_bound(mat, n_iter, screen_iter, n_candidates, keep_iterates=keep)
                         if field is not None)
        return replayed(bound, (mat,), lambda: ("matrix bound", n_iter, screen_iter, n_candidates, keep))

    @staticmethod
    def setup_context(ctx, inputs, output):
        mat, n_iter, screen_iter, n_candidates, _ = inputs
        ctx.mark_non_differentiable(*output[1:])
        ctx.save_for_backward(mat, *output)  # the input only to tie a second derivative to it
        ctx.batch_shape = mat.shape
        ctx.n_iter = n_iter
        ctx.stops = bound_steps(mat.shape[1], n_iter, screen_iter, n_candidates)

    @staticmethod
    def vmap(info, in_dims, *inputs):
        return vmap_into_stack(_MaxGramBound.apply, in_dims, *inputs)

    @staticmethod
    @first_order_backward("the Gram bound of a matrix")
    def backward(ctx, grad_output, *_):
        batch_shape, n_iter, stops = ctx.batch_shape, ctx.n_iter, ctx.stops

        def gradient(grad_output, *saved):
            found = MaxBound(*saved)
            grad_best = (max_gram_bound_grad(found, n_iter, stops) * grad_output[:, None, None]).to(found.matrix.dtype)
            # Only the maximizer of each batch has a gradient (out of place: under vmap the
            # gradient may be batched where the zeros are not).
            index = found.best.view(-1, 1, 1, 1).expand(-1, 1, *batch_shape[2:])
            grad = torch.zeros(batch_shape, dtype=grad_best.dtype, device=grad_best.device)
            return (grad.scatter(1, index, grad_best[:, None]),)
        (grad,) = replayed(gradient, (grad_output, *ctx.saved_tensors[1:]),
                           lambda: ("matrix bound gradient", n_iter, stops, tuple(batch_shape)))
        return grad, None, None, None, None


class _MaxGramBoundForwardMode(_MaxGramBound):
    """:class:`_MaxGramBound` with forward-mode derivatives (``torch.func.jvp``, ``jacfwd``,
    dual tensors); outside ``torch.compile``, which traces autograd functions only without one."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        _MaxGramBound.setup_context(ctx, inputs, output)
        ctx.save_for_forward(*output)

    @staticmethod
    def vmap(info, in_dims, *inputs):
        return vmap_into_stack(_MaxGramBoundForwardMode.apply, in_dims, *inputs)

    @staticmethod
    def jvp(ctx, tangent, *_):
        """Each bound is a real scalar of its batch's maximizer alone: its tangent is the real
        inner product of that matrix's gradient (the backward's) with the matrix's tangent."""
        found = MaxBound(*ctx.saved_tensors)
        grad_best = max_gram_bound_grad(found, ctx.n_iter, ctx.stops)
        index = found.best.view(-1, 1, 1, 1).expand(-1, 1, *tangent.shape[2:])
        moved = tangent.gather(1, index)[:, 0].to(grad_best.dtype)
        value = (grad_best.conj() * moved).real if grad_best.is_complex() else grad_best * moved
        return value.sum((-2, -1)).to(found.value.dtype), *(None for _ in ctx.saved_tensors[1:])


def _check_matrices(mat: torch.Tensor, n_iter: int) -> None:
    if mat.dim() < 2:
        raise ValueError(f"expected a tensor of shape (..., m, n), got shape {tuple(mat.shape)}")
    if not isinstance(n_iter, int) or n_iter < 0:
        raise ValueError(f"n_iter must be an integer >= 0, got {n_iter!r}")
    if not (mat.is_floating_point() or mat.is_complex()):
        raise TypeError(f"expected a floating-point or complex tensor, got {mat.dtype}")


def _gram_first(mat: torch.Tensor, n_iter: int):
    """``(g, log_scale)`` with ``G_1 = exp(log_scale) g`` (``G_0`` when ``n_iter == 0``).

    The matrix is first scaled to max ``|entry| = 1`` so that neither the Gram product nor
    the Frobenius norm can overflow or underflow (entries from 1e-30 to 1e30 in float32).
    """
    scale = _nonzero(mat.detach().abs().amax(dim=(-2, -1)))
    a = mat / scale[..., None, None]
    log_scale = torch.log(scale.double())  # float64 (module docstring)
    if n_iter == 0:
        return a, log_scale
    g = a @ a.mH if mat.shape[-2] <= mat.shape[-1] else a.mH @ a
    return g, 2 * log_scale


def _gram_steps(g: torch.Tensor, log_scale: torch.Tensor, steps: int):
    """``steps`` Frobenius-rescaled Gram steps; ``G_t = exp(log_scale) g`` is kept invariant."""
    for _ in range(steps):
        # Entries of g / ||g||_F lie in [-1, 1], and ||g^H g||_F >= sigma_max(g)^2 >= 1/rank.
        frob = _nonzero(_squared_frobenius(g.detach()).sqrt())
        g = g / frob[..., None, None]
        log_scale = 2 * (log_scale + torch.log(frob.double()))
        g = g.mH @ g
    return g, log_scale


def _max_abs(x: torch.Tensor, dim: tuple[int, ...]) -> torch.Tensor:
    """``max |x|`` over ``dim``; NaN propagates. On the CPU from the extremes: there
    ``vector_norm(ord=inf)`` takes a slow path (CPU-2, one thread: 11.6 against 0.5 ms for 545
    complex matrices 64 x 64, 17.6 against 1.1 ms for 13 of 512 x 512); elsewhere one reduction
    (one kernel launch instead of three)."""
    if x.device.type == "cpu":
        return torch.maximum(x.amax(dim=dim), -x.amin(dim=dim))
    return torch.linalg.vector_norm(x, ord=float("inf"), dim=dim)


def _real_view(g: torch.Tensor) -> torch.Tensor:
    """Real tensor sharing ``g``'s memory, with the real/imaginary pair as the last axis."""
    return torch.view_as_real(g) if g.is_complex() else g.unsqueeze(-1)


def _gram_first_inplace(mat: torch.Tensor, n_iter: int, real_form: bool = False):
    """:func:`_gram_first` without autograd, for a batch ``(B, m, n)``, in few operations.

    Any positive scale works for the first rescaling; the largest real or imaginary
    part (within sqrt(2) of the largest modulus) is cheaper to find than the modulus.
    Zero matrices get the scale ``tiny`` (they stay zero); NaN propagates. ``real_form``:
    return the Gram matrix of complex ``mat`` in its real form.
    """
    scale = _max_abs(_real_view(mat), (-3, -2, -1))
    scale = scale.clamp_min(torch.finfo(mat.real.dtype).tiny)
    a = mat / scale.view(-1, 1, 1)
    log_scale = torch.log(scale.double())  # float64 (module docstring)
    if n_iter == 0:
        return a, log_scale
    if real_form:
        g = gram_real_form(a)
    else:
        g = a @ a.mH if mat.shape[-2] <= mat.shape[-1] else a.mH @ a
    return g, 2 * log_scale


def _gram_steps_inplace(g: torch.Tensor, log_scale: torch.Tensor, steps: int, hermitian: bool = True,
                        keep: list | None = None, real_form: bool = False):
    """:func:`_gram_steps` without autograd, for a batch, in a few operations per step (on a
    GPU each operation is a kernel launch, and launches, not flops, set the bound's time);
    ``g`` is rescaled in place, and in the real form its memory may receive a later iterate.

    On the CPU (eager, real form, iterates not kept) the batch goes through all the steps in
    slices of about :data:`CPU_SLICE_BYTES`: the matrices are independent, and a slice's
    elementwise operations and products then read the caches, not memory (measured on CPU-2:
    the screening steps of 545 matrices 64 x 64 took 24 instead of 33 ms).

    ``g @ g`` replaces ``g^H g`` once the iterate is a Gram matrix (equal for Hermitian
    ``g``; the rounding-level asymmetry of a computed Gram matrix changes the bound only at
    rounding level). Only every other step rescales: from ``||g||_F = 1`` one squaring gives
    ``1 / r <= ||g^2||_F <= 1`` (``sigma_max(g)^2 >= 1 / r`` for ``r x r`` matrices), far from
    overflow and underflow, and the rounding of a product is relative to ``||g||_F^2``
    whatever the scale. The logarithms of the rescalings are added up once at the end, in
    float64 (``log_scale`` is float64): ``G_S = exp(2^S l_0 + sum_j 2^(S-j) log f_j) g_S`` over
    the rescaled steps ``j`` (counted from 0) with Frobenius norms ``f_j``.

    ``keep``: a list that receives ``(g_k, l_k)`` for every iterate ``G_k = exp(l_k) g_k``
    from the first to the last (``steps + 1`` of them), ``l_k`` in float64.

    ``real_form``: the iterates are complex Hermitian and carried in their real form
    (:mod:`lipnet.bounds.hermitian`; a raw complex ``g`` when ``hermitian`` is false), which
    has the same Frobenius norm: the rescaling, and the bound read off the last iterate, are
    unchanged.
    """
    if real_form and keep is None and steps > 1 and g.device.type == "cpu" and not torch.compiler.is_compiling():
        size = CPU_SLICE_BYTES // max(1, g[0].numel() * g.element_size()) if len(g) else 0
        if len(g) > size >= MIN_SLICE:
            iterates, log_scales = [], []
            for i in range(0, len(g), size):
                part, part_log_scale = _gram_steps_batch(g[i:i + size], log_scale[i:i + size], steps, hermitian, None,
                                                         real_form)
                if not hermitian:  # the first step makes the real forms of the Gram matrices: joined below
                    iterates.append(part)
                elif part.data_ptr() != g[i].data_ptr():  # squarings keep shape and dtype: back into g while
                    g[i:i + size].copy_(part)  # the slice is in the caches, instead of joining the slices later
                log_scales.append(part_log_scale)
            return (torch.cat(iterates) if iterates else g), torch.cat(log_scales)
    return _gram_steps_batch(g, log_scale, steps, hermitian, keep, real_form)


def _gram_steps_batch(g: torch.Tensor, log_scale: torch.Tensor, steps: int, hermitian: bool, keep: list | None,
                      real_form: bool):
    """:func:`_gram_steps_inplace` on the whole batch at once."""
    kept_log_scale = None if keep is None else log_scale.double()
    if steps <= 0:
        if keep is not None:
            keep.append((g, kept_log_scale))
        return g, log_scale
    tiny = torch.finfo(g.dtype).tiny  # of the real dtype for a complex g
    norms = []
    # Real form: buffers reused by every squaring (D, and the iterate before last, which
    # receives the next one), unless the iterates are kept. Not in a compiled or exported graph:
    # the compiler plans memory itself, and out= operations there would fail when an exported
    # program runs with autograd on.
    reuse = keep is None and not torch.compiler.is_compiling()
    work = spare = None
    for step in range(steps):
        if step % 2 == 0:
            real = _real_view(g)  # a view: norms and scaling of real tensors are the fast paths
            frob = torch.linalg.vector_norm(real, dim=(-3, -2, -1)).clamp_min(tiny)
            norms.append(frob)
            real.div_(frob.view(-1, 1, 1, 1))
            if keep is not None:
                kept_log_scale = kept_log_scale + torch.log(frob.double())
        if keep is not None:  # g is not written to again: later steps make new tensors
            keep.append((g, kept_log_scale))
            kept_log_scale = 2 * kept_log_scale
        if real_form and (hermitian or step > 0):
            work = torch.empty_like(g) if work is None and reuse else work
            g, spare = square_real_form(g, out=spare, work=work), (g if reuse else None)
        elif hermitian or step > 0:
            g = torch.bmm(g, g)
        elif real_form:
            g = gram_real_form(g)
        else:  # on the smaller side, as the first step of _gram_first_inplace and the backward's
            g = g @ g.mH if g.shape[-2] <= g.shape[-1] else g.mH @ g
    if keep is not None:
        keep.append((g, kept_log_scale))
    weights = torch.exp2(torch.arange(steps, 0, -2, dtype=log_scale.dtype, device=log_scale.device))
    return g, log_scale * 2.0**steps + (weights[:, None] * torch.log(torch.stack(norms).double())).sum(0)


def _gram_bound_nograd(g: torch.Tensor, log_scale: torch.Tensor, n_iter: int):
    """:func:`_gram_bound` without autograd: ``log 0 = -inf`` gives the exact 0 of zero matrices
    without selections (no gradient to keep finite here). A first iterate not computed as
    ``A^H A`` (:mod:`lipnet.bounds.symbol_gram`) can be indefinite by rounding where it is
    nearly zero; a negative trace form then gives way to the Frobenius form. The bound is
    computed in float64 (``log_scale``'s dtype) and rounded to that of ``g``."""
    if n_iter == 0:
        lam = torch.linalg.vector_norm(_real_view(g), dim=(-3, -2, -1))
        trace_form = torch.zeros_like(lam, dtype=torch.bool)
    else:
        mean, spread, squared_frobenius = _trace_statistics(g, differentiable=False)
        frob = squared_frobenius.sqrt()
        trace = torch.add(mean, spread, alpha=(g.shape[-1] - 1) ** 0.5)
        trace_form = (trace < frob) & (trace >= 0)
        lam = torch.where(trace_form, trace, frob)
    return torch.exp((torch.log(lam) + log_scale) / 2**n_iter).to(lam.dtype), trace_form


def _gram_bound(g: torch.Tensor, log_scale: torch.Tensor, n_iter: int):
    """``(bound, trace_form)``: the bound from ``G_t = exp(log_scale) g`` and whether its
    trace form (module docstring) was below the Frobenius form. Exactly 0, with a finite
    gradient, for zero matrices; NaN propagates. Computed in float64 (``log_scale``'s dtype)
    and rounded to the real dtype of ``g``."""
    if n_iter > 0:  # g is Hermitian positive semi-definite
        mean, spread, squared_frobenius = _trace_statistics(g)
        lam = _safe_sqrt(squared_frobenius)
        trace = mean + (g.shape[-1] - 1) ** 0.5 * spread
        trace_form = trace < lam
        lam = torch.where(trace_form, trace, lam)
    else:
        lam = _safe_sqrt(_squared_frobenius(g))
        trace_form = torch.zeros_like(lam, dtype=torch.bool)
    zero = lam == 0
    log_bound = (torch.log(torch.where(zero, torch.ones_like(lam), lam)) + log_scale) / 2**n_iter
    return torch.where(zero, torch.zeros_like(lam), torch.exp(log_bound).to(lam.dtype)), trace_form


def _smoothing(dtype: torch.dtype) -> float:
    """``tau``: relative floor of the spread in the trace form (module docstring)."""
    return torch.finfo(dtype).eps ** 0.5


def _trace_statistics(h: torch.Tensor, differentiable: bool = True):
    """``(m, s', ||h||_F^2)`` of a Hermitian ``h``: ``m = tr(h) / r``,
    ``s'^2 = ||h - m I||_F^2 / r + (tau m)^2``.

    ``s'^2`` is summed from non-negative terms (off-diagonal moduli and diagonal deviations),
    so it is accurate to a few units of rounding even for nearly scalar ``h``; so is
    ``||h||_F^2``, the off-diagonal sum plus the squared diagonal. ``differentiable=False``
    (no autograd through it) skips the finite-gradient guard of the square root.
    """
    r = h.shape[-1]
    diag = torch.diagonal(h, dim1=-2, dim2=-1)
    real_diag = diag.real if h.is_complex() else diag
    mean = real_diag.mean(-1)
    off = _off_diagonal(h)
    if differentiable:
        off_diagonal = _real_view(off).square().sum(dim=(-3, -2, -1))
    else:  # fused reductions, no temporary: the rows' norms, then theirs (one reduction over the
        # strided off-diagonal view is about six times slower on the CPU)
        off_diagonal = torch.linalg.vector_norm(torch.linalg.vector_norm(_real_view(off), dim=(-2, -1)), dim=-1).square()
    deviation = (real_diag - mean.unsqueeze(-1)).square().sum(-1)
    var = (off_diagonal + deviation) / r + (_smoothing(h.dtype) * mean).square()
    spread = _safe_sqrt(var) if differentiable else var.sqrt()
    return mean, spread, off_diagonal + _real_view(diag).square().sum(dim=(-2, -1))


def _off_diagonal(h: torch.Tensor) -> torch.Tensor:
    """The off-diagonal entries of square matrices ``(..., r, r)`` as a view ``(..., r - 1, r)``.

    In row-major order the diagonal entries sit every ``r + 1`` elements; dropping the first
    and cutting the rest into rows of ``r + 1`` puts each remaining diagonal entry last in its
    row. No copy for contiguous ``h``.
    """
    r = h.shape[-1]
    flat = h.contiguous().flatten(-2)[..., 1:]
    return flat.unflatten(-1, (r - 1, r + 1))[..., :r] if r > 1 else flat.unflatten(-1, (0, 1))


def _safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """``sqrt(x)`` for ``x >= 0`` with a zero (not infinite) gradient at 0; NaN stays NaN."""
    zero = x == 0
    return torch.where(zero, torch.zeros_like(x), torch.where(zero, torch.ones_like(x), x).sqrt())


def _squared_frobenius(g: torch.Tensor) -> torch.Tensor:
    return _real_view(g).square().sum(dim=(-3, -2, -1))


def _nonzero(x: torch.Tensor) -> torch.Tensor:
    """``x`` with zeros replaced by one (a neutral scale for all-zero matrices); NaN stays NaN."""
    return torch.where(x == 0, torch.ones_like(x), x)
