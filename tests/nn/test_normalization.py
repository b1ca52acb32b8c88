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
