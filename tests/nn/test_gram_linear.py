import pytest
import torch
from torch import nn

from lipnet import GramLinear


def test_is_a_linear_with_the_same_state_dict():
    layer = GramLinear(7, 3)
    plain = nn.Linear(7, 3)
    assert isinstance(layer, nn.Linear)
    assert list(layer.state_dict()) == list(plain.state_dict())
    layer.load_state_dict(plain.state_dict())
    plain.load_state_dict(layer.state_dict())
    assert GramLinear(4, 2, bias=False).bias is None


@pytest.mark.parametrize("shape", [(10, 3), (3, 10), (16, 16)])
def test_normalized_weight_has_norm_at_most_one(shape):
    layer = GramLinear(*shape).double()
    w = layer.normalized_weight()
    exact = torch.linalg.matrix_norm(w.detach(), 2).item()
    assert exact <= 1 + 1e-12
    assert exact <= layer.lipschitz_bound() <= 1 + 1e-5
    assert exact == pytest.approx(1.0, abs=1e-6)  # tight for Gaussian weights


def test_forward_gradcheck():
    layer = GramLinear(4, 3).double()
    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))
    w = layer.weight.detach().clone().requires_grad_()
    fn = lambda w: nn.functional.linear(x.detach(), w / layer._operator_norm(w, None, 10))  # noqa: E731
    assert torch.autograd.gradcheck(fn, (w,))


def test_train_eval_agree_and_cache():
    layer = GramLinear(5, 4)
    x = torch.randn(3, 5)
    ref = layer(x)
    layer.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), ref)
        assert len(layer._eval_cache) == 1


def test_zero_weights_and_nan():
    layer = GramLinear(5, 4)
    with torch.no_grad():
        layer.weight.zero_()
        torch.testing.assert_close(layer(torch.randn(2, 5)), layer.bias.expand(2, 4))
    out = layer(torch.randn(2, 5))  # the zero map, plus the bias
    with pytest.raises(ValueError, match="the weight is zero"):
        out.sum().backward()
    with torch.no_grad():
        layer.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError):
        layer(torch.randn(2, 5))
