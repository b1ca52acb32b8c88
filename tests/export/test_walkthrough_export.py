"""A new user's walk through export's files with bad paths and wrong files: each mistake is an
error that names what the user gave (never a temporary file) and says what is wrong with it."""

import pytest
import torch
from torch import nn

from lipnet import export
from lipnet.checkpoint import save_model
from lipnet.export import runtime
from lipnet.models import build_model
from lipnet.nn import GramConv2d, GramLinear, MaxMin


@pytest.fixture
def exported():
    torch.manual_seed(0)
    net = nn.Sequential(GramConv2d(1, 4, 3, padding=1), MaxMin(), nn.Flatten(), GramLinear(4 * 6 * 6, 3))
    return export(net, input_shape=(1, 6, 6))


def test_saving_to_a_folder_names_the_folder_not_a_temporary_file(exported, tmp_path):
    folder = tmp_path / "exports"
    folder.mkdir()
    with pytest.raises(IsADirectoryError) as error:
        exported.save(folder)
    assert ".tmp" not in str(error.value) and str(folder) in str(error.value)


def test_saving_to_a_folder_leaves_nothing_behind(exported, tmp_path):
    folder = tmp_path / "exports"
    folder.mkdir()
    with pytest.raises(IsADirectoryError):
        exported.save(folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exports"] and not list(folder.iterdir())


def test_saving_into_a_missing_folder_says_to_create_it(exported, tmp_path):
    with pytest.raises(FileNotFoundError, match="create it first"):
        exported.save(tmp_path / "missing" / "model.pt")
    assert not (tmp_path / "missing").exists()


def test_loading_a_missing_file_does_not_call_it_corrupt(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        runtime.load(tmp_path / "typo.pt")
    assert "corrupt" not in str(error.value) and "typo.pt" in str(error.value)


def test_loading_a_truncated_export_or_a_lipnet_checkpoint_is_a_value_error(exported, tmp_path):
    exported.save(tmp_path / "model.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "model.pt").read_bytes()[:2000])
    with pytest.raises(ValueError, match="truncated|damaged"):
        runtime.load(tmp_path / "cut.pt")
    model = build_model("convnet", in_channels=1, num_classes=10, input_size=28, widths=[4], depths=[0], dense=[8])
    save_model(tmp_path / "checkpoint.pt", model)
    with pytest.raises(ValueError, match="not a lipnet-export archive"):
        runtime.load(tmp_path / "checkpoint.pt")
    assert runtime.load(tmp_path / "model.pt").lipschitz_bound == exported.lipschitz_bound
