"""Checkpoints under bad input: damaged files, foreign weights, unsaveable payloads, failing
writes, concurrent saves, links and map_location variants. Each gives a clear error and loses
nothing (a previous checkpoint survives, no temporary file is left), or works."""

import errno
import os
import threading
import zipfile

import pytest
import torch

from lipnet import checkpoint
from lipnet.checkpoint import CheckpointError, load_checkpoint, load_model, save_checkpoint, save_model
from lipnet.export import runtime
from lipnet.models import build_model


def net(seed=0, **kwargs):
    torch.manual_seed(seed)
    options = dict(in_channels=1, num_classes=10, input_size=28)
    return build_model("convnet-xs", **{**options, **kwargs})


def names(folder):
    return sorted(p.name for p in folder.iterdir())


def first_weight(payload):
    return next(k for k, v in payload["state_dict"].items() if v.is_floating_point() and v.dim() >= 2)


# --- damaged or foreign files ---------------------------------------------------------------------

@pytest.mark.parametrize("keep", [0.0, 0.01, 0.3, 0.6, 0.99])
def test_a_checkpoint_cut_anywhere_is_a_checkpoint_error(tmp_path, keep):
    path = save_model(tmp_path / "m.pt", net())
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError, match=f"{path}.*(truncated|corrupt)"):
        load_model(path)


@pytest.mark.parametrize("seed", range(3))
def test_random_bytes_are_a_checkpoint_error(tmp_path, seed):
    path = tmp_path / "m.pt"
    path.write_bytes(torch.randint(0, 256, (5000,), generator=torch.Generator().manual_seed(seed),
                                   dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(CheckpointError, match="truncated, corrupt"):
        load_model(path)


@pytest.mark.parametrize("member", ["data/0", "data.pkl", "byteorder"])
def test_an_archive_missing_a_record_is_a_checkpoint_error(tmp_path, member):
    path = save_model(tmp_path / "m.pt", net())
    damaged = tmp_path / "damaged.pt"
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(damaged, "w") as target:
        for info in source.infolist():
            if not info.filename.endswith("/" + member):
                target.writestr(info, source.read(info))
    if member == "byteorder":  # torch assumes the writer's byte order: the file loads, and is right
        assert load_model(damaged)[0] is not None
        return
    with pytest.raises(CheckpointError, match=f"{damaged}.*truncated, corrupt"):
        load_model(damaged)


def test_weights_of_another_model_are_refused(tmp_path):
    payload = checkpoint.model_payload(net())
    payload["state_dict"] = net(in_channels=3, input_size=32).state_dict()  # same names, other shapes
    save_checkpoint(tmp_path / "m.pt", payload)
    with pytest.raises(CheckpointError, match=r"do not fit model 'convnet-xs'(?s:.*)1.weight.*16, 3, 2, 2"):
        load_model(tmp_path / "m.pt")
    payload = checkpoint.model_payload(net())
    payload["state_dict"]["extra.weight"] = torch.zeros(3)
    save_checkpoint(tmp_path / "m.pt", payload)
    with pytest.raises(CheckpointError, match="do not fit(?s:.*)Unexpected key.*extra.weight"):
        load_model(tmp_path / "m.pt")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_refused(tmp_path, value):
    payload = checkpoint.model_payload(net())
    name = first_weight(payload)
    payload["state_dict"][name][0] = value
    save_checkpoint(tmp_path / "m.pt", payload)
    with pytest.raises(CheckpointError, match=f"NaN or inf.*{name}"):
        load_model(tmp_path / "m.pt")


def test_weights_that_overflow_the_models_dtype_are_refused(tmp_path):
    """float64 weights are cast to the model's float32 on loading: 1e300 becomes inf there."""
    payload = checkpoint.model_payload(net())
    name = first_weight(payload)
    payload["state_dict"][name] = payload["state_dict"][name].double()
    payload["state_dict"][name][0] = 1e300
    save_checkpoint(tmp_path / "m.pt", payload)
    with pytest.raises(CheckpointError, match=f"NaN or inf.*{name}"):
        load_model(tmp_path / "m.pt")


class _Planted:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_objects_in_a_checkpoint_are_never_unpickled(tmp_path, monkeypatch):
    marker = tmp_path / "code-ran"
    payload = checkpoint.model_payload(net())
    payload["info"]["x"] = _Planted(marker)
    torch.save(payload, tmp_path / "m.pt")  # written without lipnet's checks
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    with pytest.raises(CheckpointError, match="holds objects other than tensors.*unsupported GLOBAL posix.mkdir"):
        load_model(tmp_path / "m.pt")
    assert not marker.exists() and calls == [True]
    save_model(tmp_path / "good.pt", net())
    load_model(tmp_path / "good.pt")
    load_checkpoint(tmp_path / "good.pt", map_location=torch.device("cpu"))
    assert calls == [True, True, True]


@pytest.mark.parametrize("make", ["dangling", "loop"])
def test_a_link_that_leads_nowhere_is_named_as_such(tmp_path, make):
    link = tmp_path / "model.pt"
    if make == "dangling":
        link.symlink_to(tmp_path / "deleted.pt")
    else:
        link.symlink_to(tmp_path / "other.pt")
        (tmp_path / "other.pt").symlink_to(link)
    with pytest.raises(CheckpointError, match=f"no checkpoint at {link}: it is a symbolic link to"):
        load_model(link)


def test_a_link_to_a_checkpoint_loads(tmp_path):
    path = save_model(tmp_path / "real.pt", net(), epoch=4)
    (tmp_path / "best.pt").symlink_to(path)
    assert load_model(tmp_path / "best.pt")[1] == {"epoch": 4}


# --- map_location -------------------------------------------------------------------------------

@pytest.mark.parametrize("map_location", ["cpu", torch.device("cpu"), None, {"cpu": "cpu"},
                                          lambda storage, location: storage],
                         ids=["str", "device", "none", "dict", "function"])
def test_every_kind_of_map_location_loads_the_model(tmp_path, map_location):
    model = net()
    path = save_model(tmp_path / "m.pt", model)
    loaded, _ = load_model(path, map_location=map_location)
    x = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    assert torch.equal(loaded(x), model.eval()(x))
    assert load_checkpoint(path, map_location=map_location)["format"] == checkpoint.FORMAT


@pytest.mark.parametrize("map_location, error", [
    ("gpu", ValueError), ("", ValueError), ("cpu:0", ValueError), (torch.device("cpu", 1), ValueError),
    (0, TypeError), (["cpu"], TypeError),
])
def test_a_map_location_torch_cannot_use_is_not_called_corruption(tmp_path, map_location, error):
    path = save_model(tmp_path / "m.pt", net())
    with pytest.raises(error, match=r"map_location") as raised:
        load_model(path, map_location=map_location)
    assert not isinstance(raised.value, CheckpointError) and "corrupt" not in str(raised.value)


# --- what may be saved -------------------------------------------------------------------------

class _Subclass(torch.Tensor):
    pass


@pytest.mark.parametrize("value, error", [
    (torch.zeros(2).as_subclass(_Subclass), "_Subclass"),
    (torch.zeros(2, device="meta"), "meta device holds no values"),
    (b"bytes", "builtins.bytes"),
    ({1, 2}, "builtins.set"),
    (torch.strided, "torch.layout"),
])
def test_values_that_would_not_load_back_are_refused_before_anything_is_written(tmp_path, value, error):
    path = save_model(tmp_path / "m.pt", net(), epoch=1)
    before = path.read_bytes()
    with pytest.raises(TypeError, match=f"cannot save payload\\['info'\\]\\['v'\\]: .*{error}"):
        save_model(path, net(), v=value)
    assert path.read_bytes() == before and names(tmp_path) == ["m.pt"]


def test_a_payload_that_contains_itself_is_a_type_error(tmp_path):
    loop = []
    loop.append(loop)
    with pytest.raises(TypeError, match=r"cannot save payload\['info'\]\['v'\]\[0\]: it contains itself"):
        save_model(tmp_path / "m.pt", net(), v=loop)
    assert names(tmp_path) == []
    shared = [1.0, 2.0]  # the same list twice is a tree of plain values, not a loop
    save_model(tmp_path / "m.pt", net(), a=shared, b={"c": shared})
    assert load_model(tmp_path / "m.pt")[1] == {"a": [1.0, 2.0], "b": {"c": [1.0, 2.0]}}


@pytest.mark.parametrize("value", [torch.nn.Parameter(torch.ones(2)), torch.eye(3)[:, 1:], 10**30,
                                   float("nan"), torch.Size([2, 3]), torch.float16, torch.device("cpu")])
def test_plain_values_and_tensors_round_trip(tmp_path, value):
    save_model(tmp_path / "m.pt", net(), v=value)
    loaded = load_checkpoint(tmp_path / "m.pt")["info"]["v"]
    if torch.is_tensor(value):
        assert torch.equal(loaded, value.detach())
    elif value != value:
        assert loaded != loaded
    else:
        assert loaded == value and type(loaded) is type(value)


# --- where, and how, it is written ------------------------------------------------------------

def test_saving_where_a_folder_is_names_the_folder_not_a_temporary(tmp_path):
    (tmp_path / "run").mkdir()
    with pytest.raises(IsADirectoryError, match=r"cannot save a checkpoint to .*run: it is a folder; name a file in "
                                                r"it, e.g. .*run/checkpoint.pt") as raised:
        save_model(tmp_path / "run", net())
    assert ".tmp" not in str(raised.value) and names(tmp_path) == ["run"] and names(tmp_path / "run") == []


def test_saving_below_a_file_says_it_is_not_a_folder(tmp_path):
    (tmp_path / "notes").write_text("keep")
    with pytest.raises(NotADirectoryError, match=r"cannot save a checkpoint to .*notes/m.pt: .*notes is a file"):
        save_model(tmp_path / "notes" / "m.pt", net())
    assert (tmp_path / "notes").read_text() == "keep"


def test_a_missing_folder_is_created(tmp_path):
    path = save_model(tmp_path / "a" / "b" / "m.pt", net(), epoch=2)
    assert load_model(path)[1] == {"epoch": 2}


def test_a_long_but_valid_file_name_is_saved(tmp_path):
    path = tmp_path / ("m" * 250 + ".pt")  # 253 bytes: the temporary's name must not exceed 255
    save_model(path, net(), epoch=3)
    assert load_model(path)[1] == {"epoch": 3} and names(tmp_path) == [path.name]


@pytest.mark.parametrize("where", ["create", "write", "fsync", "replace"])
def test_a_failing_disk_keeps_the_previous_checkpoint_and_names_the_target(tmp_path, monkeypatch, where):
    path = save_model(tmp_path / "m.pt", net(), epoch=1)
    before = path.read_bytes()
    failure = {"create": errno.EACCES, "write": errno.ENOSPC, "fsync": errno.EIO, "replace": errno.EXDEV}[where]

    def fail(*args, **kwargs):
        raise OSError(failure, os.strerror(failure))

    if where == "create":
        real_open = os.open
        monkeypatch.setattr(runtime.os, "open", lambda file, flags, *a: fail() if flags & os.O_CREAT
                            else real_open(file, flags, *a))
    elif where == "write":
        def partial(obj, f, *args, **kwargs):
            f.write(b"PK\x03\x04 half a checkpoint")
            fail()
        monkeypatch.setattr(checkpoint.torch, "save", partial)
    else:
        monkeypatch.setattr(runtime.os, where, fail)
    with pytest.raises(OSError, match=f"cannot save a checkpoint to {path}: {os.strerror(failure)}") as raised:
        save_model(path, net(), epoch=2)
    monkeypatch.undo()
    assert raised.value.errno == failure and ".tmp" not in str(raised.value)
    assert path.read_bytes() == before and names(tmp_path) == ["m.pt"]
    assert load_model(path)[1] == {"epoch": 1}


def test_concurrent_saves_and_loads_never_see_a_partial_checkpoint(tmp_path):
    path = save_model(tmp_path / "m.pt", net(), epoch=-1)
    models = [net(seed) for seed in range(4)]
    errors, seen = [], set()

    def writer(i):
        try:
            for _ in range(3):
                save_model(path, models[i], epoch=i)
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    def reader():
        try:
            for _ in range(10):
                seen.add(load_model(path)[1]["epoch"])
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)] + [threading.Thread(target=reader)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and seen <= {-1, 0, 1, 2, 3}
    loaded, info = load_model(path)
    x = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    assert torch.equal(loaded(x), models[info["epoch"]].eval()(x))  # the weights and the info of one save
    assert names(tmp_path) == ["m.pt"]


def test_saving_into_a_linked_folder_writes_there(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real", target_is_directory=True)
    save_model(tmp_path / "link" / "m.pt", net(), epoch=5)
    assert names(tmp_path / "real") == ["m.pt"] and load_model(tmp_path / "real" / "m.pt")[1] == {"epoch": 5}


def test_stale_temporaries_are_swept_only_in_a_folder(tmp_path):
    from lipnet.checkpoint import remove_stale_temporaries

    assert remove_stale_temporaries(tmp_path / "missing") == []
    (tmp_path / "file").write_text("x")
    assert remove_stale_temporaries(tmp_path / "file") == []
    (tmp_path / (".m" * 100 + ".pt.1.0123456789ab.tmp")).mkdir()  # a folder of that name is not ours to delete
    assert remove_stale_temporaries(tmp_path) == [] and len(names(tmp_path)) == 2


def test_a_tensor_claiming_more_elements_than_its_storage_holds_is_refused_unallocated(tmp_path):
    import tracemalloc

    payload = {"format": checkpoint.FORMAT, "version": checkpoint.VERSION, "model": {"name": "m", "kwargs": {}},
               "state_dict": {"w": torch.arange(7.0)}, "info": {}}
    path = save_checkpoint(tmp_path / "m.pt", payload)
    with zipfile.ZipFile(path) as archive:
        records = [(info, archive.read(info)) for info in archive.infolist()]
    forged = tmp_path / "forged.pt"  # the shape (7,) in data.pkl becomes (10**9,), with matching checksums
    with zipfile.ZipFile(forged, "w") as archive:
        for info, data in records:
            if info.filename.endswith("/data.pkl"):
                assert data.count(b"K\x07\x85") == 1  # BININT1 7, TUPLE1
                data = data.replace(b"K\x07\x85", b"J" + (10**9).to_bytes(4, "little") + b"\x85")
            archive.writestr(info, data)
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match="forged.pt: it is truncated, corrupt"):
            load_checkpoint(forged)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20


def test_all_zero_weights_load_and_give_finite_outputs(tmp_path):
    model = net()
    for name, tensor in model.state_dict().items():
        if name.endswith("weight"):
            payload = checkpoint.model_payload(model)
            payload["state_dict"][name] = torch.zeros_like(tensor)
            save_checkpoint(tmp_path / "m.pt", payload)
            loaded, _ = load_model(tmp_path / "m.pt")
            assert torch.isfinite(loaded(torch.rand(2, 1, 28, 28))).all(), name


def test_a_spec_that_disagrees_with_its_weights_fails_before_building_the_model(tmp_path):
    """A width of 10**5 in the spec (the weights are 128 wide): 800 MB to allocate and initialize
    before load_state_dict would refuse it."""
    import tracemalloc

    payload = checkpoint.model_payload(net())
    payload["model"]["kwargs"]["dense"] = [10**5]
    save_checkpoint(tmp_path / "m.pt", payload)
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match=r"do not fit model 'convnet-xs': 10.weight \(shape \(128, 1568\), "
                                                  r"the model's is \(100000, 1568\)\)"):
            load_model(tmp_path / "m.pt")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20


def test_a_payload_nested_thousands_of_levels_deep_is_a_type_error(tmp_path):
    deep = []
    for _ in range(20000):
        deep = [deep]
    with pytest.raises(TypeError, match="nested too deeply"):
        save_model(tmp_path / "m.pt", net(), v=deep)
    assert names(tmp_path) == []
