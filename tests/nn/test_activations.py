import pytest
import torch

from lipnet.nn import MaxMin, max_min


def test_pairs_are_sorted_and_norm_preserved():
    x = torch.randn(5, 8, 3, 3)
    y = max_min(x)
    a, b = y.chunk(2, dim=1)
    assert torch.all(a >= b)
    torch.testing.assert_close(y.norm(dim=1), x.norm(dim=1))


def test_one_lipschitz_on_random_pairs():
    act = MaxMin()
    x, z = torch.randn(1000, 6), torch.randn(1000, 6)
    ratio = (act(x) - act(z)).norm(dim=1) / (x - z).norm(dim=1)
    assert ratio.max() <= 1 + 1e-6


def test_gradient_norm_preserving():
    x = torch.randn(4, 6, requires_grad=True)
    g = torch.randn(4, 6)
    (grad,) = torch.autograd.grad(max_min(x), x, g)
    torch.testing.assert_close(grad.norm(dim=1), g.norm(dim=1))


def test_odd_channels_rejected():
    with pytest.raises(ValueError, match="even"):
        MaxMin()(torch.randn(2, 3))
