"""Second derivatives through the bounds' explicit backward raise instead of being silently wrong."""

import pytest
import torch

from lipnet.nn import GramConv2d, GramLinear

LAYERS = [
    pytest.param(lambda: GramLinear(4, 3), (2, 4), id="linear"),
    pytest.param(lambda: GramConv2d(2, 3, 3, padding=1), (2, 2, 5, 5), id="conv"),
]


@pytest.mark.parametrize("make, shape", LAYERS)
def test_a_hessian_vector_product_in_the_weight_raises(make, shape):
    torch.manual_seed(0)
    layer, x = make().double(), torch.randn(shape, dtype=torch.float64)
    (grad,) = torch.autograd.grad(layer(x).sin().sum(), layer.weight, create_graph=True)
    with pytest.raises(RuntimeError, match="first-order backward only"):
        torch.autograd.grad((grad * torch.randn_like(grad)).sum(), layer.weight)


@pytest.mark.parametrize("make, shape", LAYERS)
def test_input_gradient_penalties_still_train_the_weight(make, shape):
    torch.manual_seed(0)
    layer, x = make().double(), torch.randn(shape, dtype=torch.float64, requires_grad=True)

    def penalty(weight):
        out = torch.func.functional_call(layer, {"weight": weight, "bias": layer.bias}, (x,))
        (grad_x,) = torch.autograd.grad(out.sin().sum(), x, create_graph=True)
        return grad_x.square().sum()

    weight = layer.weight.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(penalty(weight), weight)
    direction = torch.randn_like(weight)
    step = 1e-6
    numeric = (penalty(weight + step * direction) - penalty(weight - step * direction)) / (2 * step)
    torch.testing.assert_close((grad * direction).sum(), numeric.detach(), rtol=1e-5, atol=1e-8)


def test_first_order_gradients_are_unchanged_under_create_graph():
    torch.manual_seed(0)
    layer, x = GramConv2d(2, 3, 3, padding=1).double(), torch.randn(2, 2, 5, 5, dtype=torch.float64)
    (plain,) = torch.autograd.grad(layer(x).sin().sum(), layer.weight)
    (graphed,) = torch.autograd.grad(layer(x).sin().sum(), layer.weight, create_graph=True)
    torch.testing.assert_close(graphed.detach(), plain, rtol=0, atol=0)
