"""Checkpoints: round trip, atomic writes, and clear errors for anything unusable."""

import os

import pytest
import torch

from lipnet import checkpoint
from lipnet.checkpoint import CheckpointError, load_checkpoint, load_model, save_checkpoint, save_model
from lipnet.models import build_model


def net():
    return build_model("convnet-xs", in_channels=1, num_classes=10, input_size=28, mean=[0.3], std=[0.4])


def test_round_trip_rebuilds_the_same_function(tmp_path):
    model = net()
    path = save_model(tmp_path / "m.pt", model, dataset="fashion-mnist", epoch=3)
    loaded, info = load_model(path)
    assert info == {"dataset": "fashion-mnist", "epoch": 3}
    assert not loaded.training
    x = torch.rand(4, 1, 28, 28)
    assert torch.equal(loaded(x), model.eval()(x))
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # no temporary file left behind


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_checkpoints_give_a_clear_error(tmp_path, damage):
    path = save_model(tmp_path / "m.pt", net())
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": os.urandom(4096), "empty": b""}[damage])
    with pytest.raises(CheckpointError, match="truncated, corrupt"):
        load_model(path)


def test_bytes_damaged_inside_a_tensor_record_are_caught_by_its_checksum(tmp_path):
    import zipfile

    path = save_model(tmp_path / "m.pt", net())
    with zipfile.ZipFile(path) as archive:
        record = max(archive.infolist(), key=lambda info: info.file_size)  # the largest tensor's bytes
    data = bytearray(path.read_bytes())
    offset = record.header_offset  # the local header: 30 bytes, then the name and extra field of its own lengths
    start = offset + 30 + int.from_bytes(data[offset + 26:offset + 28], "little") + int.from_bytes(
        data[offset + 28:offset + 30], "little") + 64
    data[start:start + 64] = bytes(255 - b for b in data[start:start + 64])  # torch.load alone would accept this
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt: its record .* checksum"):
        load_model(path)


def test_a_run_folder_or_an_absent_device_is_named_in_the_error(tmp_path):
    save_model(tmp_path / "run" / "model.pt", net())
    with pytest.raises(CheckpointError, match="is a folder.*did you mean .*model.pt"):
        load_model(tmp_path / "run")
    if not torch.cuda.is_available():
        with pytest.raises(CheckpointError, match="this machine has none; pass map_location='cpu'"):
            load_model(tmp_path / "run" / "model.pt", map_location="cuda")


def test_malformed_info_and_model_specs_are_checkpoint_errors(tmp_path):
    payload = checkpoint.model_payload(net())
    payload["info"] = [1, 2]
    torch.save(payload, tmp_path / "info.pt")
    with pytest.raises(CheckpointError, match="'info' is a list"):
        load_model(tmp_path / "info.pt")
    payload = checkpoint.model_payload(net())
    payload["model"]["kwargs"]["in_channels"] = -1  # torch itself refuses to build this
    torch.save(payload, tmp_path / "spec.pt")
    with pytest.raises(CheckpointError, match="cannot rebuild model"):
        load_model(tmp_path / "spec.pt")


def test_missing_foreign_and_mismatched_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_model(tmp_path / "nothing.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a lipnet checkpoint"):
        load_model(tmp_path / "foreign.pt")
    payload = checkpoint.model_payload(net())
    payload["state_dict"].pop(next(iter(payload["state_dict"])))
    save_checkpoint(tmp_path / "bad.pt", payload)
    with pytest.raises(CheckpointError, match="do not fit"):
        load_model(tmp_path / "bad.pt")


def test_nan_weights_are_refused(tmp_path):
    model = net()
    with torch.no_grad():
        model[1].weight[0, 0, 0, 0] = float("nan")
    save_model(tmp_path / "nan.pt", model)
    with pytest.raises(CheckpointError, match=r"NaN or inf.*1\.weight"):
        load_model(tmp_path / "nan.pt")


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = save_model(tmp_path / "m.pt", net(), epoch=1)
    before = path.read_bytes()

    def crash(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_model(path, net(), epoch=2)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]
    assert load_checkpoint(path)["info"] == {"epoch": 1}


def test_checkpoints_load_with_weights_only(tmp_path):
    path = save_model(tmp_path / "m.pt", net(), config={"lr": 0.1, "eps": [0.1, 0.5]})
    payload = torch.load(path, weights_only=True)
    assert payload["model"]["name"] == "convnet-xs"


def test_values_that_would_not_load_are_refused_before_writing(tmp_path):
    import numpy as np

    model = build_model("convnet-xs", in_channels=1, num_classes=10, input_size=28)
    path = save_model(tmp_path / "model.pt", model, accuracy=0.5)
    before = path.read_bytes()
    with pytest.raises(TypeError, match="weights_only"):
        save_model(path, model, accuracy=np.float64(0.9))
    assert path.read_bytes() == before and load_model(path)[1]["accuracy"] == 0.5
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temporary file left


def test_a_non_positive_std_in_the_weights_is_refused(tmp_path):
    model = build_model("convnet-xs", in_channels=1, num_classes=10, input_size=28)
    path = save_model(tmp_path / "model.pt", model)
    payload = load_checkpoint(path)
    payload["state_dict"]["0.std"] = torch.zeros(1)
    save_checkpoint(path, payload)
    with pytest.raises(CheckpointError, match="positive"):
        load_model(path)


def test_stale_temporaries_of_killed_saves_are_swept(tmp_path):
    from lipnet.checkpoint import remove_stale_temporaries

    model = build_model("convnet-xs", in_channels=1, num_classes=10, input_size=28)
    save_model(tmp_path / "model.pt", model)
    (tmp_path / ".checkpoint.pt.4242.0123456789ab.tmp").write_bytes(b"half a checkpoint")
    # a user's own hidden temporaries, not named as atomic_write names its files, are kept
    for name in ("notes.tmp", ".draft.v2.tmp", ".checkpoint.pt.abc123.tmp", ".model.pt.12.0123456789AB.tmp"):
        (tmp_path / name).write_text("not ours")
    assert [p.name for p in remove_stale_temporaries(tmp_path)] == [".checkpoint.pt.4242.0123456789ab.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".checkpoint.pt.abc123.tmp", ".draft.v2.tmp",
                                                           ".model.pt.12.0123456789AB.tmp", "model.pt", "notes.tmp"]


@pytest.mark.parametrize("dtype", [torch.complex64, torch.int64, torch.bool])
def test_weights_of_another_kind_of_number_are_refused_not_cast(tmp_path, dtype):
    payload = checkpoint.model_payload(net())
    name = next(k for k, v in payload["state_dict"].items() if v.is_floating_point() and v.dim() >= 2)
    payload["state_dict"][name] = (payload["state_dict"][name] * 1000).to(dtype)  # copy_ would drop or round
    save_checkpoint(tmp_path / "m.pt", payload)
    with pytest.raises(CheckpointError, match=name):
        load_model(tmp_path / "m.pt")


def test_a_checkpoint_that_cannot_be_opened_is_not_called_corrupt(tmp_path, monkeypatch):
    """Permission denied (or an I/O error) says so: 'truncated or corrupt' would get a good file deleted."""
    path = save_model(tmp_path / "m.pt", net())

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(torch, "load", denied)
    with pytest.raises(CheckpointError, match="Permission denied") as raised:
        load_checkpoint(path)
    assert "corrupt" not in str(raised.value)


def test_saving_over_a_symlink_or_a_folder_keeps_what_was_there(tmp_path):
    """The link is replaced by the new file (the file it pointed to, maybe another good
    checkpoint, is untouched); a folder in the way is an error and stays as it was."""
    def payload(epoch):
        return {"format": checkpoint.FORMAT, "version": checkpoint.VERSION, "model": {"name": "m", "kwargs": {}},
                "state_dict": {"w": torch.ones(2)}, "info": {"epoch": epoch}}

    older = save_checkpoint(tmp_path / "epoch-1.pt", payload(1))
    before = older.read_bytes()
    (tmp_path / "best.pt").symlink_to(older.name)
    save_checkpoint(tmp_path / "best.pt", payload(2))
    assert older.read_bytes() == before and not (tmp_path / "best.pt").is_symlink()
    assert load_checkpoint(tmp_path / "best.pt")["info"] == {"epoch": 2}
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("x")
    with pytest.raises(OSError):
        save_checkpoint(tmp_path / "run", payload(3))
    assert (tmp_path / "run" / "keep.txt").read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "epoch-1.pt", "run"]  # no temporary left
