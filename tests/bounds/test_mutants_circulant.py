"""Mutation-testing gaps of lipnet.bounds.circulant: what an embedding calls exact is exact."""

import itertools

import torch

from lipnet.bounds import conv2d_spectral_norm
from lipnet.bounds.conv import conv2d_embedding
from lipnet.bounds.reference import conv2d_operator_matrix


def test_embeddings_called_exact_have_the_operators_norm():
    """``ConvEmbedding.exact`` claims that the operator norm equals the circulant's (``R`` and ``P``
    permutations): wherever it says so, the Gram bound (14 steps, float64) must equal the float64
    SVD norm of the dense operator, not merely bound it. Circular geometries whose output is shorter
    than the input (no padding, or strides that do not divide it) crop the circulant's rows and are
    not exact."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(2, 2, 3, 3, generator=generator, dtype=torch.float64)
    called_exact = not_exact = 0
    for n, stride, padding in itertools.product((5, 6), (1, 2, 3), (0, 1)):
        kwargs = dict(stride=stride, padding=padding, padding_mode="circular")
        embedding = conv2d_embedding(3, n, **kwargs)
        norm = float(torch.linalg.matrix_norm(conv2d_operator_matrix(weight, n, **kwargs), ord=2))
        bound = float(conv2d_spectral_norm(weight, n, n_iter=14, **kwargs))
        assert bound >= norm * (1 - 1e-12)
        if embedding.exact:
            called_exact += 1
            assert bound <= norm * (1 + 1e-9), (n, stride, padding)
        else:
            not_exact += 1
    assert called_exact and not_exact


def test_copying_padding_on_one_side_only_counts_its_copies():
    """``padding='same'`` with an even kernel pads one side only (``(0, 1)``): reflect and replicate
    padding then still copy input samples (the last one is read twice), so the bound must carry the
    copies and stay above the dense operator's norm, for kernels that favour the copied sample."""
    for mode in ("reflect", "replicate"):
        for kernel_size in ((2, 2), (4, 4), (2, 1)):
            weight = torch.ones(1, 1, *kernel_size, dtype=torch.float64)
            kwargs = dict(padding="same", padding_mode=mode)
            norm = float(torch.linalg.matrix_norm(conv2d_operator_matrix(weight, 5, **kwargs), ord=2))
            bound = float(conv2d_spectral_norm(weight, 5, n_iter=14, **kwargs))
            assert bound >= norm, (mode, kernel_size)
