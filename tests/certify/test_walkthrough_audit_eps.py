"""``certified_accuracy`` takes a list of radii, so a new user's first ``audit`` call passes one too:
``audit`` takes one radius, and must say so by name instead of failing in a comparison."""

import pytest

from lipnet.certify import audit


@pytest.mark.parametrize("eps", [[0.1], (0.1, 0.2), "0.1", True], ids=["list", "tuple", "string", "bool"])
def test_an_eps_that_is_not_one_number_is_refused_by_name(small_net, blobs, eps):
    x, y = blobs(8)
    with pytest.raises(TypeError, match="eps must be one radius"):
        audit(small_net, x, y, eps, version="apgd")


def test_a_zero_radius_is_refused_by_name(small_net, blobs):
    x, y = blobs(8)  # (inf, nan and negative radii: tests/certify/test_mutants_audit.py)
    with pytest.raises(ValueError, match="eps must be a finite radius > 0"):
        audit(small_net, x, y, 0.0, version="apgd")


@pytest.mark.parametrize("eps", [0.25, "numpy", "tensor"])
def test_one_number_of_any_kind_is_a_radius(small_net, blobs, eps):
    import numpy as np
    import torch

    value = {"numpy": np.array(0.25), "tensor": torch.tensor(0.25)}.get(eps, eps)
    x, y = blobs(8)
    assert audit(small_net, x, y, value, version="apgd").eps == 0.25
