"""A fixed-seed slice of the randomized soundness fuzz (``tests/fuzz_geometry.py``).

Every case compares a bound with the exact norm of the operator PyTorch applies (a dense
float64 matrix from a plain ``nn.Conv2d`` / ``nn.Conv1d`` / ``nn.Linear``): the public bounds,
the weight a Gram layer's forward applies, and the certificate of ``lipnet.certify``, on random
geometries and adversarial weights; small networks against their Jacobians. The seeds are
fixed, so the test is deterministic; ``python tests/fuzz_geometry.py --minutes 10`` runs more.
The last tests check that the fuzz fails when a bound is 0.1% too small.
"""


import pytest
import torch
from torch import nn

from lipnet.bounds import conv
from lipnet.certify import lipschitz_bound
from lipnet.nn import GramConv2d, GramLinear
from lipnet.nn.normalized import GramNormalized

import fuzz_geometry as fuzz  # tests/ is on sys.path: tests/conftest.py


SEEDS = {"conv2d": range(0, 200), "conv1d": range(0, 80), "linear": range(0, 80), "residual": range(0, 80),
         "network": range(0, 20)}


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch's note on 'same' padding with even kernels
@pytest.mark.parametrize("kind,seed", [(kind, seed) for kind, seeds in SEEDS.items() for seed in seeds])
def test_bound_is_above_exact_norm(kind, seed):
    result = fuzz.RUNNERS[kind](seed)
    assert result.unsupported is None, f"{kind} seed {seed}: torch accepts the geometry, lipnet raises: " \
                                       f"{result.unsupported}"


def test_certificate_of_tiny_normalized_weight_is_finite():
    """A float64 weight of norm below ~1e-57 is normalized to one whose bound is below float32's
    range; its certificate is that bound times 1 + margin, not inf (the logarithm in the margin
    was taken of the bound rounded to float32)."""
    fc = GramLinear(5, 3, dtype=torch.float64)
    with torch.no_grad():
        fc.weight.mul_(1e-60)
    exact = float(torch.linalg.matrix_norm(fc.normalized_weight(), ord=2))
    bound = lipschitz_bound(nn.Sequential(fc), (5,))
    assert exact <= bound <= exact * (1 + 1e-5)


# ---------------------------------------------------------------------------------- the fuzz can fail


def _catches(kind, path, seeds=range(20)) -> bool:
    """Whether some case of ``seeds`` fails on the check named ``path`` (its message's start)."""
    for seed in seeds:
        try:
            fuzz.RUNNERS[kind](seed)
        except fuzz.Violation as violation:
            if str(violation).startswith(path):
                return True
    return False


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_detects_a_public_bound_too_small(monkeypatch):
    original = conv.conv2d_spectral_norm
    monkeypatch.setattr(fuzz, "conv2d_spectral_norm", lambda *args, **kwargs: 0.999 * original(*args, **kwargs))
    assert _catches("conv2d", "public float64 bound")


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_detects_a_training_bound_too_small(monkeypatch):
    original = GramConv2d._operator_norm

    def smaller(self, weight, input_size, n_iter, exhaustive=False):  # the certificate's bound is left as it is
        return original(self, weight, input_size, n_iter, exhaustive) * (1 if exhaustive else 0.999)
    monkeypatch.setattr(GramConv2d, "_operator_norm", smaller)
    assert _catches("conv2d", "normalized operator")


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("kind,factor", [("conv2d", 0.999), ("conv1d", 0.999), ("linear", 0.999),
                                         ("residual", 0.999), ("network", 0.9)])
def test_detects_a_certificate_too_small(monkeypatch, kind, factor):
    """A network's certificate is a product of layer bounds, seldom tight: there a larger error."""
    original = GramNormalized.lipschitz_bound
    monkeypatch.setattr(GramNormalized, "lipschitz_bound", lambda self, *args: factor * original(self, *args))
    assert _catches(kind, "certified")


def test_autocorrelation_bound_of_a_frequency_with_a_tiny_gram_matrix():
    """Found by the fuzz (``--cancelling``): taps of +-2^40 cancel at frequency 0, where the Gram
    matrix from the kernel's autocorrelation (12x12 inputs: more frequencies than pairs of taps)
    has float32 entries of ~1e-24 of the largest. Their squares underflow, so its Frobenius
    norm is 0, the rescaling by ``tiny`` overflows two squarings later, and the bound is NaN
    (a finite weight refused as 'too large for its dtype').

    Fixed in ``lipnet.bounds.gram.max_gram_bound_of_grams``: each Gram matrix is first scaled by
    a power of two to largest ``|entry|`` in ``[1, 2)``, as the symbols are."""
    big = 2.0**40
    weight = torch.tensor([[[[-1.0, -big], [big, 2.0]], [[2.0, -big], [big, 1.0]]],
                           [[[2.0, -big], [big, -1.0]], [[-1.0, -big], [big, 1.0]]]])
    bound = float(conv.conv2d_spectral_norm(weight, (12, 12)))
    exact = fuzz.exact_conv_norm(dict(dim=2, c_in=2, c_out=2, groups=1, kernel=(2, 2), stride=1, padding=0,
                                      dilation=1, padding_mode="zeros", size=(12, 12)), weight)
    assert exact * (1 - 1e-5) <= bound <= exact * 1.05  # the border effect of a valid convolution
