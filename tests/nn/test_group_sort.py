"""lipnet.nn.GroupSort: values, the permutation Jacobian, certification and export."""

import pytest
import torch
from torch import nn

import lipnet
from lipnet.certify import LipschitzBoundError, certified_accuracy, lipschitz_bound
from lipnet.export import load
from lipnet.nn import GramConv2d, GramLinear, GroupSort, MaxMin, group_sort, max_min


def small_net(group_size=4):
    return nn.Sequential(GramConv2d(2, 8, 3, padding=1), GroupSort(group_size), nn.Flatten(), GramLinear(8 * 4 * 4, 3))


def test_each_group_of_consecutive_channels_is_sorted_in_descending_order():
    x = torch.tensor([[3.0, -1.0, 4.0, 1.0, -5.0, 9.0, 2.0, 6.0]])
    torch.testing.assert_close(group_sort(x, 2), torch.tensor([[3.0, -1.0, 4.0, 1.0, 9.0, -5.0, 6.0, 2.0]]))
    torch.testing.assert_close(group_sort(x, 4), torch.tensor([[4.0, 3.0, 1.0, -1.0, 9.0, 6.0, 2.0, -5.0]]))
    torch.testing.assert_close(GroupSort(4)(x), group_sort(x, 4))
    images = torch.randn(3, 6, 2, 2)
    groups = group_sort(images, 3).unflatten(1, (2, 3))
    assert torch.all(groups[:, :, :-1] >= groups[:, :, 1:])
    torch.testing.assert_close(groups.sort(dim=2).values, images.unflatten(1, (2, 3)).sort(dim=2).values)


def test_group_size_two_is_max_min_with_the_channels_interleaved():
    x = torch.randn(5, 8, 3, 3)
    interleaved = torch.arange(8).reshape(2, 4).T.flatten()  # (0, 4, 1, 5, ...): MaxMin's pairs side by side
    torch.testing.assert_close(group_sort(x[:, interleaved], 2), max_min(x)[:, interleaved], rtol=0, atol=0)


def test_full_sort_sorts_all_channels():
    x = torch.randn(4, 7)
    torch.testing.assert_close(group_sort(x, 7), x.sort(dim=1, descending=True).values, rtol=0, atol=0)
    features = torch.randn(2, 5, 3)
    torch.testing.assert_close(GroupSort(5)(features), features.sort(dim=1, descending=True).values, rtol=0, atol=0)


@pytest.mark.parametrize("group_size", [2, 3, 6])
def test_jacobian_is_a_permutation_matrix(group_size):
    generator = torch.Generator().manual_seed(group_size)
    inputs = [torch.randn(2, 6, 2, 2, dtype=torch.float64, generator=generator) for _ in range(3)]
    inputs.append(torch.randint(-1, 2, (2, 6, 2, 2), generator=generator).double())  # ties
    for x in inputs:
        jacobian = torch.autograd.functional.jacobian(lambda t: group_sort(t, group_size), x).reshape(48, 48)
        assert torch.all((jacobian == 0) | (jacobian == 1))
        assert torch.all(jacobian.sum(0) == 1) and torch.all(jacobian.sum(1) == 1)
        torch.testing.assert_close(jacobian @ x.flatten(), group_sort(x, group_size).flatten(), rtol=0, atol=0)


def test_gradient_norm_preserved_and_one_lipschitz():
    x = torch.randn(64, 12, requires_grad=True)
    g = torch.randn(64, 12)
    (grad,) = torch.autograd.grad(group_sort(x, 4), x, g)
    torch.testing.assert_close(grad.norm(dim=1), g.norm(dim=1))
    z = torch.randn(64, 12)
    with torch.no_grad():
        ratio = (group_sort(x, 4) - group_sort(z, 4)).norm(dim=1) / (x - z).norm(dim=1)
    assert ratio.max() <= 1 + 1e-6


def test_lipschitz_bound_and_certified_accuracy():
    torch.manual_seed(0)
    net = small_net()
    assert 1 - 1e-3 <= lipschitz_bound(net, (2, 4, 4)) <= 1 + 1e-5
    x, y = torch.randn(20, 2, 4, 4), torch.randint(0, 3, (20,))
    result = certified_accuracy(net, (x, y), eps=[0.0, 0.1], progress=False)
    assert result.n == 20 and 1 - 1e-3 <= result.lipschitz <= 1 + 1e-5
    assert result.certified[1] <= result.certified[0] <= result.clean_accuracy


@pytest.mark.parametrize("module, shape", [(GroupSort(2, dim=0), (4,)), (GroupSort(2, dim=-2), (4,)),
                                           (GroupSort(2, dim=-3), (2, 4))])
def test_certify_refuses_sorting_the_batch_dimension(module, shape):
    with pytest.raises(LipschitzBoundError, match="GroupSort with dim=.* acts on the batch dimension"):
        lipschitz_bound(nn.Sequential(module), shape)


def test_certify_accepts_a_dim_within_one_example():
    assert lipschitz_bound(GroupSort(2, dim=-1), (4,)) == 1.0
    assert lipschitz_bound(GroupSort(2, dim=-3), (2, 4, 4)) == 1.0


@pytest.mark.parametrize("group_size", [1, 0, -2, 2.0, True, "2", None])
def test_bad_group_size_is_refused_at_construction(group_size):
    with pytest.raises(ValueError, match="group_size must be"):
        GroupSort(group_size)
    with pytest.raises(ValueError, match="group_size must be"):
        group_sort(torch.randn(2, 4), group_size)


def test_group_size_must_divide_the_channels():
    with pytest.raises(ValueError, match="group_size=4 needs a multiple of 4 channels along dim 1, got 6"):
        GroupSort(4)(torch.randn(2, 6))


def test_missing_dim_says_how_to_count_it():
    with pytest.raises(ValueError, match="dim 3, which an input of shape \\(2, 4\\).*count dim from the end"):
        GroupSort(2, dim=3)(torch.randn(2, 4))
    with pytest.raises(ValueError, match="dim counts the batch dimension.*count dim from the end"):
        nn.Sequential(GramLinear(4, 6), GroupSort(3))(torch.randn(4))


def test_dim_from_the_end_takes_inputs_with_or_without_a_batch_dimension():
    net = nn.Sequential(GramConv2d(2, 4, 3, padding=1), GroupSort(4, dim=-3), GramConv2d(4, 2, 3, padding=1))
    x = torch.randn(2, 6, 6)
    torch.testing.assert_close(net(x), net(x[None])[0])
    features = torch.randn(6)
    torch.testing.assert_close(GroupSort(3, dim=-1)(features), GroupSort(3)(features[None])[0])


def test_export_round_trip(tmp_path):
    torch.manual_seed(0)
    net = small_net().eval()
    exported = lipnet.export(net, (2, 4, 4))
    assert exported.lipschitz_bound == lipschitz_bound(net, (2, 4, 4))
    x = torch.randn(5, 2, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(exported(x), net(x), rtol=0, atol=0)
        exported.save(tmp_path / "net.pt")
        torch.testing.assert_close(load(tmp_path / "net.pt")(x), net(x), rtol=0, atol=0)


def test_repr():
    assert repr(GroupSort(4)) == "GroupSort(group_size=4, dim=1)"
    assert repr(nn.Sequential(MaxMin(), GroupSort(2, dim=-3))[1]) == "GroupSort(group_size=2, dim=-3)"
