"""Mutation-testing follow-ups for lipnet.checkpoint: each test pins a behaviour that a hand-made
mutant of the module changed while every earlier test still passed."""

import errno

import pytest
import torch

from lipnet import checkpoint
from lipnet.checkpoint import (CheckpointError, load_checkpoint, load_model, model_payload, remove_stale_temporaries,
                               save_checkpoint, save_model)
from lipnet.models import build_model


def net():
    torch.manual_seed(0)
    return build_model("convnet-xs", in_channels=1, num_classes=10, input_size=28)


def test_one_value_reached_twice_is_not_a_cycle(tmp_path):
    """The same list (or tensor) under two keys is a tree with a shared leaf, not a payload that
    contains itself: it saves, and loads back equal."""
    shared, weight = [1, 2, 3], torch.arange(3.0)
    payload = {"a": shared, "b": shared, "c": [shared, {"d": shared}], "w": weight, "v": weight}
    path = save_checkpoint(tmp_path / "p.pt", payload)
    loaded = torch.load(path, weights_only=True)
    assert loaded["a"] == loaded["b"] == loaded["c"][0] == loaded["c"][1]["d"] == [1, 2, 3]
    assert torch.equal(loaded["v"], weight)


def test_missing_folders_are_created_at_any_depth(tmp_path):
    path = save_checkpoint(tmp_path / "a" / "b" / "c" / "p.pt", {"x": 1})
    assert path == tmp_path / "a" / "b" / "c" / "p.pt" and torch.load(path, weights_only=True) == {"x": 1}


def test_a_folder_named_like_a_stale_temporary_is_kept(tmp_path):
    """Only files are swept: a folder that happens to match the pattern is left alone."""
    (tmp_path / ".run.pt.7.0123456789ab.tmp").mkdir()
    (tmp_path / ".run.pt.7.0123456789ab.tmp" / "inside").write_text("keep")
    (tmp_path / ".m.pt.8.abcdefabcdef.tmp").write_bytes(b"stale")
    assert [p.name for p in remove_stale_temporaries(tmp_path)] == [".m.pt.8.abcdefabcdef.tmp"]
    assert (tmp_path / ".run.pt.7.0123456789ab.tmp" / "inside").read_text() == "keep"


@pytest.mark.parametrize("name", ["m.pt.8.abcdefabcdef.tmp", ".m.pt.8.abcdefabcde.tmp",
                                  ".m.pt.8.abcdefabcdef0.tmp", ".m.pt.x8.abcdefabcdef.tmp"])
def test_only_the_exact_temporary_names_are_swept(tmp_path, name):
    """Not hidden, 11 or 13 hex digits, a non-numeric pid: not a name atomic_write makes."""
    (tmp_path / name).write_text("a user's")
    assert remove_stale_temporaries(tmp_path) == [] and (tmp_path / name).read_text() == "a user's"


def test_a_loaded_model_is_in_eval_mode(tmp_path):
    model = net().train()
    loaded, info = load_model(save_model(tmp_path / "m.pt", model, epoch=3))
    assert not any(module.training for module in loaded.modules())
    assert info == {"epoch": 3}


def test_a_checkpoint_with_info_none_loads_with_empty_info(tmp_path):
    """info may be None (load_checkpoint accepts it): load_model gives {} then, and always a copy."""
    payload = model_payload(net())
    payload["info"] = None
    save_checkpoint(tmp_path / "m.pt", payload)
    _, info = load_model(tmp_path / "m.pt")
    assert info == {} and type(info) is dict


def test_the_payload_of_a_wrapped_model_is_that_of_the_model(tmp_path):
    """A DataParallel (or DDP, or torch.compile) wrapper is unwrapped: the spec and the weight
    names are the model's (no 'module.' prefix), so load_model rebuilds it."""
    model = net()
    payload = model_payload(torch.nn.DataParallel(model), epoch=1)
    assert payload["model"] == model_payload(model)["model"]
    assert list(payload["state_dict"]) == list(model.state_dict())
    loaded, _ = load_model(save_checkpoint(tmp_path / "m.pt", payload))
    x = torch.rand(2, 1, 28, 28)
    assert torch.equal(loaded(x), model.eval()(x))


def test_an_io_error_while_reading_is_not_called_corrupt(tmp_path, monkeypatch):
    """EIO (a failing disk or network mount) says so; 'truncated or corrupt' would get a good file deleted."""
    path = save_model(tmp_path / "m.pt", net())

    def failing(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(torch, "load", failing)
    with pytest.raises(CheckpointError, match="cannot open checkpoint .*Input/output error") as raised:
        load_checkpoint(path)
    assert "corrupt" not in str(raised.value)


@pytest.mark.parametrize("spec", [{"name": "convnet-xs", "kwargs": [1]}, {"name": "convnet-xs"},
                                  {"name": 3, "kwargs": {}}])
def test_a_model_spec_without_a_name_and_kwargs_dict_is_refused(tmp_path, spec):
    payload = model_payload(net())
    payload["model"] = spec
    save_checkpoint(tmp_path / "m.pt", payload)
    with pytest.raises(CheckpointError, match=r"lacks a model spec \(\{'name', 'kwargs'\}\)"):
        load_checkpoint(tmp_path / "m.pt")


def test_a_device_torch_load_cannot_place_tensors_on_is_a_value_error(tmp_path, monkeypatch):
    """torch.load's 'restore data location' failure is about map_location, not the file."""
    path = save_model(tmp_path / "m.pt", net())

    def refuses(*args, **kwargs):
        raise RuntimeError("don't know how to restore data location of torch.storage.UntypedStorage (tagged with x)")

    monkeypatch.setattr(torch, "load", refuses)
    with pytest.raises(ValueError, match=r"map_location='cpu': don't know how to restore data location.*pass 'cpu'"):
        load_checkpoint(path)


def test_the_saved_info_is_what_was_given(tmp_path):
    info = {"epoch": 2, "metrics": {"loss": 0.5}, "eps": [0.1, 0.2]}
    payload = model_payload(net(), **info)
    assert payload["info"] == info and payload["format"] == checkpoint.FORMAT and payload["version"] == 1


def test_a_key_that_would_not_load_back_is_refused_before_writing(tmp_path):
    """Keys are checked like values: a Path key would make torch.load(weights_only=True) refuse
    the file, after the save had replaced the previous checkpoint."""
    from pathlib import Path

    save_checkpoint(tmp_path / "p.pt", {"epoch": 1})
    with pytest.raises(TypeError, match=r"cannot save payload key PosixPath\('x'\)"):
        save_checkpoint(tmp_path / "p.pt", {Path("x"): 1})
    assert torch.load(tmp_path / "p.pt", weights_only=True) == {"epoch": 1}


def test_a_checkpoint_of_another_format_version_is_refused(tmp_path):
    payload = model_payload(net())
    payload["version"] = 2
    save_checkpoint(tmp_path / "m.pt", payload)
    with pytest.raises(CheckpointError, match="has checkpoint version 2; this lipnet reads 1"):
        load_checkpoint(tmp_path / "m.pt")
