"""Mutation-testing gaps of lipnet.nn.normalized: the eval cache must never serve a weight normalized
for other settings than the layer's current ones."""

import torch

from lipnet.bounds.reference import exact_conv2d_spectral_norm
from lipnet.nn import GramConv2d, GramLinear


def test_a_stride_changed_in_eval_mode_is_not_served_the_old_normalization():
    """A weight normalized for stride 2 (a smaller operator norm) applied with stride 1 is more than
    1-Lipschitz: after ``conv.stride = (1, 1)`` the layer must renormalize, and the weight it applies
    must have an exact operator norm (float64 SVD of the dense operator) of at most 1."""
    torch.manual_seed(0)
    layer = GramConv2d(3, 4, 3, stride=2, padding=1, bias=False).eval()
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        layer(x)  # caches the weight normalized for stride 2
        strided = float(exact_conv2d_spectral_norm(layer.normalized_weight((8, 8)).double(), (8, 8), stride=1,
                                                   padding=1))
        layer.stride = (1, 1)
        layer(x)
        applied = layer.normalized_weight((8, 8)).double()
    assert strided > 1.05  # the stale weight would not be 1-Lipschitz at stride 1
    assert float(exact_conv2d_spectral_norm(applied, (8, 8), stride=1, padding=1)) <= 1 + 1e-5


def test_n_iter_changed_in_eval_mode_gives_the_new_bound():
    """The cached weight was normalized with the old number of Gram steps: after ``layer.n_iter``
    changes the layer applies ``W / bound_new(W)``, the weight a fresh layer computes."""
    torch.manual_seed(0)
    layer = GramLinear(12, 10, bias=False, n_iter=1).eval()
    fresh = GramLinear(12, 10, bias=False, n_iter=12).eval()
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(4, 12)
    with torch.no_grad():
        coarse = layer(x)
        layer.n_iter = 12
        refined = layer(x)
        expected = fresh(x)
        exact = float(torch.linalg.matrix_norm(layer.normalized_weight().double(), ord=2))
    assert torch.equal(refined, expected)
    assert not torch.equal(coarse, refined)
    assert 1 - 1e-4 <= exact <= 1 + 1e-6  # tight: 12 steps, against the 1-step bound's slack


def test_a_bound_that_overflows_to_inf_is_an_error_not_a_zero_map():
    """Finite float32 entries of 3e38 give an operator norm of 6e38, above float32's largest value:
    the bound is inf, and ``W / inf`` would silently make the layer the zero map (its bias alone).
    ``check_finite`` reports it instead."""
    layer = GramLinear(2, 2)
    with torch.no_grad():
        layer.weight.fill_(3e38)
    assert bool(torch.isfinite(layer.weight).all())
    for mode in (layer.train, layer.eval):
        mode()
        try:
            layer(torch.ones(1, 2))
        except FloatingPointError as error:
            assert "too large" in str(error)
        else:
            raise AssertionError("an overflowing bound was accepted")
