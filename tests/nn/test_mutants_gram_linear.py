"""Mutation-testing gaps of lipnet.nn.gram_linear: GramLinear's bound of its weight must be an upper
bound of the weight's exact spectral norm whatever the weight's dtype and an enclosing autocast."""

import pytest
import torch

from lipnet.nn import GramLinear


def _exact_norm(weight):
    return float(torch.linalg.matrix_norm(weight.detach().double(), ord=2))


def test_the_bound_of_a_bfloat16_weight_is_computed_in_float32_and_is_an_upper_bound():
    """``weight_norm_bound()`` of a bfloat16 weight is an upper bound of its exact norm (float64
    SVD of the bfloat16 values): the Gram iteration runs in float32, whose rounding is far below
    the bound's slack. Run in bfloat16 (8 bits of mantissa) it lands about 0.1% below the norm."""
    torch.manual_seed(0)
    for shape in [(12, 30), (30, 12)]:
        layer = GramLinear(*shape).to(torch.bfloat16)
        with torch.no_grad():
            bound = layer.weight_norm_bound()
        assert bound.dtype == torch.float32
        assert float(bound) >= _exact_norm(layer.weight) * (1 - 1e-6)


def test_autocast_does_not_lower_the_bound_to_its_dtype():
    """Under ``torch.autocast`` to bfloat16 the bound of a float32 layer is the one computed
    without autocast (float32 products), an upper bound of the exact norm; autocast's bfloat16
    matrix products would make it about 0.1% too small."""
    torch.manual_seed(0)
    layer = GramLinear(30, 12)
    with torch.no_grad():
        plain = layer.weight_norm_bound()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = layer.weight_norm_bound()
    assert autocast.dtype == torch.float32
    torch.testing.assert_close(autocast, plain, rtol=1e-6, atol=0)
    assert float(autocast) >= _exact_norm(layer.weight) * (1 - 1e-6)


def test_repr_is_that_of_nn_linear_with_its_gram_steps():
    """The repr reads as ``nn.Linear``'s, plus the one setting the layer adds (``n_iter``)."""
    assert repr(GramLinear(3, 2, bias=False, n_iter=7)) == "GramLinear(in_features=3, out_features=2, bias=False, n_iter=7)"


def test_symbolic_tracing_is_refused_with_what_to_do():
    """``torch.fx.symbolic_trace`` traces into lipnet's layers; the bound needs the weight's values,
    so the layer says how to trace it as a leaf instead of failing inside the bound."""
    with pytest.raises(TypeError, match="cannot be traced through by torch.fx.symbolic_trace"):
        torch.fx.symbolic_trace(torch.nn.Sequential(GramLinear(4, 2)))
