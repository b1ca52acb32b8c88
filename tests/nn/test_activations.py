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


@pytest.mark.parametrize("dim", [1, -1, 0])
def test_gradient_path_has_the_values_of_the_plain_path(dim):
    x = torch.randint(-2, 3, (6, 8, 5, 4)).float()  # many ties
    x[0, 0] = float("nan")
    x[1, 1] = -0.0
    with torch.no_grad():
        plain = max_min(x, dim)
    traced = max_min(x.clone().requires_grad_(), dim)
    torch.testing.assert_close(traced, plain, rtol=0, atol=0, equal_nan=True)
    a, b = x.chunk(2, dim=dim)
    torch.testing.assert_close(plain, torch.cat((torch.maximum(a, b), torch.minimum(a, b)), dim=dim),
                               rtol=0, atol=0, equal_nan=True)


def test_gradient_is_the_pair_permutation_also_at_ties():
    x = torch.tensor([[1.0, 2.0, 2.0, 0.5, -1.0, 3.0]], requires_grad=True)  # pairs (1,0.5) (2,-1) (2,3)
    x.data[0, 5] = 2.0  # a tie in the third pair
    g = torch.tensor([[10.0, 20.0, 30.0, 40.0, 50.0, 60.0]])
    (grad,) = torch.autograd.grad(max_min(x), x, g)
    # Swapped where a < b only: no pair here is, so the gradient passes unchanged (ties included).
    torch.testing.assert_close(grad, g)
    y = torch.tensor([[0.0, 5.0]], requires_grad=True)
    (grad,) = torch.autograd.grad(max_min(y), y, torch.tensor([[1.0, 2.0]]))
    torch.testing.assert_close(grad, torch.tensor([[2.0, 1.0]]))


def test_first_and_second_derivatives_by_finite_differences():
    x = torch.randn(3, 4, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(max_min, (x,))
    assert torch.autograd.gradgradcheck(max_min, (x,))


def test_keeps_memory_format_and_dtype():
    x = torch.randn(2, 6, 4, 4).to(memory_format=torch.channels_last).bfloat16().requires_grad_()
    y = max_min(x)
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)
    y.sum().backward()
    assert x.grad.dtype == torch.bfloat16 and torch.all(x.grad == 1)


def test_forward_mode_and_torch_func_transforms(monkeypatch):
    from lipnet.nn import activations

    calls = []
    function = activations._MaxMinForwardMode  # the eager path
    original = function.apply
    monkeypatch.setattr(function, "apply", lambda *args: calls.append(1) or original(*args))
    x = torch.randn(3, 6, dtype=torch.float64)
    expected = torch.autograd.functional.jacobian(lambda t: torch.cat(
        (torch.maximum(*t.chunk(2, 1)), torch.minimum(*t.chunk(2, 1))), 1), x).reshape(18, 18)
    jacobian = torch.func.jacrev(max_min)(x).reshape(18, 18)
    assert calls, "jacrev did not use the autograd function"
    torch.testing.assert_close(jacobian, expected)
    assert torch.all(jacobian.abs().sum(0) == 1)  # a permutation
    calls.clear()
    per_row = torch.func.vmap(torch.func.jacrev(max_min))(x.unsqueeze(1))
    assert calls, "vmap(jacrev) did not use the autograd function"
    torch.testing.assert_close(torch.block_diag(*per_row.reshape(3, 6, 6)), jacobian)
    v = torch.randn_like(x)
    calls.clear()
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(x.clone().requires_grad_(), v)
        tangent = torch.autograd.forward_ad.unpack_dual(max_min(dual)).tangent
    torch.testing.assert_close(tangent, (jacobian @ v.reshape(18)).reshape(3, 6))
    assert calls, "forward mode did not use the autograd function"


def test_compiled_gradient_equals_eager():
    x = torch.randint(-2, 3, (4, 8, 3, 3)).float().requires_grad_()  # ties included
    g = torch.randn(4, 8, 3, 3)
    (eager,) = torch.autograd.grad(max_min(x), x, g)
    compiled_fn = torch.compile(max_min, backend="aot_eager", fullgraph=True)
    (compiled,) = torch.autograd.grad(compiled_fn(x), x, g)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


def test_symbolic_tracing_keeps_the_sorting_activations_whole():
    """torch.fx traces MaxMin and GroupSort (and tools built on it, such as torchvision's feature
    extractor) as one call of the functional form each, which computes what the modules compute."""
    from lipnet.nn import GroupSort
    from lipnet.nn.activations import group_sort

    net = torch.nn.Sequential(MaxMin(), GroupSort(2, dim=-1))
    traced = torch.fx.symbolic_trace(net)
    targets = [node.target for node in traced.graph.nodes if node.op == "call_function"]
    assert targets == [max_min, group_sort]
    x = torch.randn(3, 8)
    assert torch.equal(traced(x), net(x))
