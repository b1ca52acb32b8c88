"""Upper bounds on spectral norms (pure functions on tensors)."""

from lipnet.bounds.conv import conv1d_spectral_norm, conv2d_embedding, conv2d_spectral_norm, conv2d_symbol
from lipnet.bounds.conv_transpose import conv_transpose2d_output_size, conv_transpose2d_spectral_norm
from lipnet.bounds.gram import (
    DEFAULT_N_ITER,
    matrix_spectral_norm,
    max_matrix_spectral_norm,
    refine_exceeding,
    set_refine_exceeding,
)
from lipnet.bounds.graphs import cuda_graphs, release_cuda_graphs, set_cuda_graphs
from lipnet.bounds.reference import (
    affine_map_matrix,
    conv2d_operator_matrix,
    conv2d_power_iteration,
    exact_conv1d_spectral_norm,
    exact_conv2d_spectral_norm,
    exact_conv_transpose2d_spectral_norm,
)

__all__ = [
    "DEFAULT_N_ITER",
    "conv1d_spectral_norm",
    "conv2d_embedding",
    "affine_map_matrix",
    "conv2d_operator_matrix",
    "conv2d_power_iteration",
    "conv2d_spectral_norm",
    "conv2d_symbol",
    "conv_transpose2d_output_size",
    "conv_transpose2d_spectral_norm",
    "cuda_graphs",
    "exact_conv1d_spectral_norm",
    "exact_conv2d_spectral_norm",
    "exact_conv_transpose2d_spectral_norm",
    "matrix_spectral_norm",
    "max_matrix_spectral_norm",
    "refine_exceeding",
    "release_cuda_graphs",
    "set_cuda_graphs",
    "set_refine_exceeding",
]
