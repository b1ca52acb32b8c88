"""The bounds under torch.func transforms (lipnet.bounds.batching): vmap over a weight is a stack."""

import pytest
import torch
from torch.func import grad, hessian, jacrev, vmap

from lipnet.bounds import conv2d_spectral_norm, max_matrix_spectral_norm
from lipnet.bounds.batching import vmap_into_stack

BOUNDS = [
    pytest.param(lambda w: conv2d_spectral_norm(w, 6, padding=1), (3, 2, 3, 3), id="conv"),
    pytest.param(lambda w: conv2d_spectral_norm(w, (7, 5), stride=2, groups=2), (4, 1, 3, 2), id="conv-strided"),
    pytest.param(lambda w: max_matrix_spectral_norm(w, 6, screen_iter=2, n_candidates=1), (9, 4, 3),
                 id="matrix-batch"),
    pytest.param(lambda w: max_matrix_spectral_norm(w[None]), (5, 3), id="dense"),
]


def weights(shape, copies=4, dtype=torch.float64):
    return torch.randn(copies, *shape, dtype=dtype, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("bound, shape", BOUNDS)
def test_vmap_over_the_weight_equals_one_bound_per_weight(bound, shape):
    stack = weights(shape)
    expected = torch.stack([bound(w) for w in stack])
    torch.testing.assert_close(vmap(bound)(stack), expected)
    torch.testing.assert_close(vmap(bound, in_dims=1)(stack.movedim(0, 1)), expected)


@pytest.mark.parametrize("bound, shape", BOUNDS)
def test_nested_vmaps_equal_one_bound_per_weight(bound, shape):
    stack = weights(shape, copies=6).unflatten(0, (2, 3))
    expected = torch.stack([torch.stack([bound(w) for w in row]) for row in stack])
    torch.testing.assert_close(vmap(vmap(bound))(stack), expected)


@pytest.mark.parametrize("bound, shape", BOUNDS)
def test_grad_and_jacrev_equal_autograd(bound, shape):
    stack = weights(shape, copies=2)
    for w in stack:
        leaf = w.clone().requires_grad_(True)
        (expected,) = torch.autograd.grad(bound(leaf), leaf)
        torch.testing.assert_close(grad(bound)(w), expected)
        torch.testing.assert_close(jacrev(bound)(w), expected)


@pytest.mark.parametrize("bound, shape", BOUNDS)
def test_vmap_of_grad_equals_autograd_per_weight(bound, shape):
    stack = weights(shape)
    expected = []
    for w in stack:
        leaf = w.clone().requires_grad_(True)
        expected.append(torch.autograd.grad(bound(leaf), leaf)[0])
    torch.testing.assert_close(vmap(grad(bound))(stack), torch.stack(expected))


@pytest.mark.parametrize("bound, shape", BOUNDS)
def test_per_example_gradients_through_an_unbatched_weight(bound, shape):
    """vmap over data, not weights (per-example gradients): the bound is computed once and its
    backward receives a batched gradient."""
    w = weights(shape, copies=1)[0]
    scales = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    per_example = vmap(grad(lambda w, s: s * bound(w).square()), in_dims=(None, 0))(w, scales)
    leaf = w.clone().requires_grad_(True)
    (unit,) = torch.autograd.grad(bound(leaf).square(), leaf)
    torch.testing.assert_close(per_example, scales.view(-1, *[1] * w.dim()) * unit)


@pytest.mark.parametrize("bound, shape", BOUNDS)
def test_a_second_derivative_under_torch_func_raises(bound, shape):
    w = weights(shape, copies=1)[0]
    with pytest.raises(RuntimeError, match="first-order backward only"):
        jacrev(jacrev(bound))(w)
    with pytest.raises(NotImplementedError, match="jvp"):  # no forward mode over the weight
        hessian(bound)(w)


def test_only_the_stacked_input_may_be_vmapped():
    def apply(stack, constant):
        return (stack.sum(-1),)
    with pytest.raises(ValueError, match="over its weight only"):
        vmap_into_stack(apply, (0, 0), torch.zeros(2, 3, 4), torch.zeros(2))
    outputs, out_dims = vmap_into_stack(apply, (1, None), torch.arange(24.0).view(3, 2, 4), None)
    assert out_dims == (0,) and outputs[0].shape == (2, 3)
    torch.testing.assert_close(outputs[0], torch.arange(24.0).view(3, 2, 4).movedim(1, 0).sum(-1))


CONV_SETTINGS = [
    dict(padding=1), dict(padding=1, padding_mode="circular"), dict(padding=1, padding_mode="reflect"),
    dict(padding=2, dilation=2), dict(stride=2, padding=1), dict(groups=2, padding=1),
    dict(stride=(2, 1), padding=(0, 1), padding_mode="replicate"),
]


@pytest.mark.parametrize("settings", CONV_SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_every_convolution_geometry_vmaps_like_a_loop(settings):
    stack = torch.randn(3, 4, 2 if settings.get("groups") else 4, 3, 3, dtype=torch.float64,
                       generator=torch.Generator().manual_seed(1))

    def bound(w):
        return conv2d_spectral_norm(w, (7, 6), **settings)
    torch.testing.assert_close(vmap(bound)(stack), torch.stack([bound(w) for w in stack]))
    expected = []
    for w in stack:
        leaf = w.clone().requires_grad_(True)
        expected.append(torch.autograd.grad(bound(leaf), leaf)[0])
    torch.testing.assert_close(vmap(grad(bound))(stack), torch.stack(expected))
