import pytest
import torch

from lipnet.nn import InputNormalization


def test_normalizes_per_channel_and_bound():
    norm = InputNormalization([0.1, 0.2, 0.3], [0.5, 0.25, 2.0])
    x = torch.rand(4, 3, 5, 5)
    expected = (x - torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)) / torch.tensor([0.5, 0.25, 2.0]).view(1, 3, 1, 1)
    torch.testing.assert_close(norm(x), expected)
    assert norm.lipschitz_bound() >= 4.0
    z = torch.rand(4, 3, 5, 5)
    ratio = (norm(x) - norm(z)).flatten(1).norm(dim=1) / (x - z).flatten(1).norm(dim=1)
    assert ratio.max() <= norm.lipschitz_bound()
    assert list(norm.state_dict()) == ["mean", "std"]


def test_bad_statistics():
    with pytest.raises(ValueError, match="positive"):
        InputNormalization([0.0], [0.0])
    with pytest.raises(ValueError, match="same length"):
        InputNormalization([0.0, 1.0], [1.0])


def test_a_channel_mismatch_is_an_error_not_a_broadcast():
    from lipnet.certify import LipschitzBoundError, lipschitz_bound

    norm = InputNormalization([0.5] * 3, [0.25] * 3)
    with pytest.raises(ValueError, match="3 channel"):
        norm(torch.rand(2, 1, 4, 4))  # broadcasting would copy the channel: gain sqrt(3) / 0.25 > the bound
    with pytest.raises((ValueError, LipschitzBoundError), match="3 channel"):
        lipschitz_bound(torch.nn.Sequential(norm), (1, 4, 4))


def test_loading_a_non_positive_std_is_refused():
    norm = InputNormalization([0.5], [0.25])
    with pytest.raises(ValueError, match="positive"):
        norm.load_state_dict({"mean": torch.tensor([0.5]), "std": torch.tensor([0.0])})
    assert norm.std.item() == 0.25
