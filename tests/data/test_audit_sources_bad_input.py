"""Bad data files: each gives a DatasetError that names the file and what to do, or is read
correctly; never silently wrong data, never a bare numpy/pickle/gzip traceback."""

import gzip
import io
import os
import pickle
import struct
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from lipnet.data import DatasetError, load_dataset, read_idx
from lipnet.data import idx_files


def images(n, shape=(32, 32, 3), seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


def labels(n, classes=10, seed=0):
    return np.random.default_rng(seed + 1).integers(0, classes, n)


def write_idx(path: Path, array: np.ndarray, dims=None, compress=True) -> None:
    dims = array.shape if dims is None else dims
    data = bytes([0, 0, 0x08, len(dims)]) + struct.pack(f">{len(dims)}I", *dims) + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data, mtime=0) if compress else data)


def mnist_files(folder: Path, n=6, compress=True):
    for prefix in ("train", "t10k"):
        write_idx(folder / f"{prefix}-images-idx3-ubyte{'.gz' * compress}", images(n, (28, 28)), compress=compress)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{'.gz' * compress}", labels(n), compress=compress)


def cifar_files(root: Path, batch, folder="cifar-10-batches-py", names=None):
    """CIFAR-10 batches in torchvision's layout; ``batch(name)`` gives each file's dict."""
    (root / folder).mkdir(parents=True, exist_ok=True)
    for name in names or [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(root / folder / name, "wb") as f:
            pickle.dump(batch(name), f)


def a_batch(n=4, seed=0):
    return {"data": images(n, (3 * 32 * 32,), seed), "labels": labels(n, seed=seed).tolist()}


# --- .npz files ---------------------------------------------------------------------------------

def test_channels_first_arrays_are_refused_with_the_transpose_to_apply(tmp_path):
    np.savez(tmp_path / "train.npz", x=images(5).transpose(0, 3, 1, 2), y=labels(5))
    with pytest.raises(DatasetError, match=r"train.npz: cifar10 images are 32x32x3 \(HWC\), got 3x32x32 "
                                           r"\(channels first: store x.transpose\(0, 2, 3, 1\)\)"):
        load_dataset("cifar10", "train", data_dir=tmp_path)


@pytest.mark.parametrize("dtype", [np.float32, np.int16, np.uint16, np.int8, bool])
def test_images_that_are_not_uint8_are_refused(tmp_path, dtype):
    np.savez(tmp_path / "train.npz", x=(images(5) // 200).astype(dtype), y=labels(5))
    with pytest.raises(DatasetError, match=rf"train.npz: 'x' must be uint8 pixels.*got {np.dtype(dtype)}"):
        load_dataset("cifar10", "train", data_dir=tmp_path)


@pytest.mark.parametrize("y, error", [
    (labels(5) + 10, r"cifar10 labels must lie in \[0, 10\), got \[1\d, 1\d\]"),
    (np.array([0, 1, -1, 2, 3], np.int8), r"labels must lie in \[0, 10\), got \[-1, 3\]"),
    (np.array([0, 1, 2**63 + 1, 2, 3], np.uint64), r"got \[0, 9223372036854775809\]"),  # not wrapped to negative
    (labels(5).astype(np.float32), "must hold integer class labels, got float32"),
    (labels(5) > 4, "must hold integer class labels, got bool"),
    (np.eye(10, dtype=np.int64)[labels(5)], r"one class label per image .*\(5, 10\)"),
    (labels(4), r"expected 'x' \(N, H, W, C\) and 'y' \(N,\), got \(5, 32, 32, 3\) and \(4,\)"),
    (labels(6), r"got \(5, 32, 32, 3\) and \(6,\)"),
])
def test_bad_labels_are_refused_naming_the_file(tmp_path, y, error):
    np.savez(tmp_path / "train.npz", x=images(5), y=y)
    with pytest.raises(DatasetError, match=error) as raised:
        load_dataset("cifar10", "train", data_dir=tmp_path)
    assert str(tmp_path / "train.npz") in str(raised.value)


def test_column_labels_and_extra_arrays_are_read_correctly(tmp_path):
    x, y = images(5), labels(5)
    np.savez(tmp_path / "train.npz", x=x, y=y[:, None].astype(np.uint8), mean=np.zeros(3), notes=np.array("hi"))
    data = load_dataset("cifar10", "train", data_dir=tmp_path)
    assert torch.equal(data.images, torch.from_numpy(x.transpose(0, 3, 1, 2)))
    assert data.labels.tolist() == y.tolist()


@pytest.mark.parametrize("key", ["x", "y"])
def test_object_arrays_are_refused_as_such_never_unpickled(tmp_path, key):
    arrays = {"x": images(2), "y": labels(2)}
    arrays[key] = np.array([arrays[key][0], None], dtype=object)
    np.savez(tmp_path / "train.npz", **arrays)
    with pytest.raises(DatasetError, match=rf"train.npz: its array '{key}' holds Python objects") as raised:
        load_dataset("cifar10", "train", data_dir=tmp_path)
    assert "corrupt" not in str(raised.value)


def test_missing_arrays_are_named(tmp_path):
    np.savez(tmp_path / "train.npz", images=images(2), y=labels(2))
    with pytest.raises(DatasetError, match=r"train.npz must hold arrays 'x' .* found .*'images"):
        load_dataset("cifar10", "train", data_dir=tmp_path)


def test_a_single_npy_array_named_npz_is_recognized(tmp_path):
    np.save(tmp_path / "train.npy", images(2))
    os.rename(tmp_path / "train.npy", tmp_path / "train.npz")
    with pytest.raises(DatasetError, match=r"train.npz is a single .npy array, not an .npz archive.*np.savez"):
        load_dataset("cifar10", "train", data_dir=tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "zeros-in-a-record", "empty"])
def test_damaged_archives_name_the_file(tmp_path, damage):
    path = tmp_path / "train.npz"
    np.savez(path, x=images(20), y=labels(20))
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "zeros-in-a-record":
        data[2000:2100] = bytes(100)
    else:
        data = b""
    path.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match=rf"cannot read {str(path).replace('/', '.')}: .*truncated or corrupt"):
        load_dataset("cifar10", "train", data_dir=tmp_path)


def test_an_array_header_claiming_gigabytes_fails_before_allocating_them(tmp_path):
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False,
                                                  "shape": (10**6, 32, 32, 3)})  # 3 GB announced, 100 bytes stored
    with zipfile.ZipFile(tmp_path / "train.npz", "w") as archive:
        archive.writestr("x.npy", header.getvalue() + bytes(100))
        y = io.BytesIO()
        np.save(y, labels(10**6 % 7))
        archive.writestr("y.npy", y.getvalue())
    tracemalloc.start()
    try:
        with pytest.raises(DatasetError, match=r"train.npz is truncated or corrupt: its array 'x' of shape "
                                               r"\(1000000, 32, 32, 3\) needs 3072000000 bytes"):
            load_dataset("cifar10", "train", data_dir=tmp_path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20


def test_an_empty_split_is_refused(tmp_path):
    np.savez(tmp_path / "train.npz", x=images(0), y=labels(0))
    with pytest.raises(DatasetError, match=r"train.npz holds no train examples of cifar10"):
        load_dataset("cifar10", "train", data_dir=tmp_path)


# --- shards ---------------------------------------------------------------------------------------

def test_a_shard_copied_under_another_name_is_refused(tmp_path):
    np.savez(tmp_path / "train-1-of-3.npz", x=images(4, seed=1), y=labels(4))
    np.savez(tmp_path / "train-2-of-3.npz", x=images(4, seed=2), y=labels(4))
    (tmp_path / "train-3-of-3.npz").write_bytes((tmp_path / "train-1-of-3.npz").read_bytes())
    with pytest.raises(DatasetError, match=r"train-3-of-3.npz holds the same images as .*train-1-of-3.npz"):
        load_dataset("cifar10", "train", data_dir=tmp_path)


def test_shard_sets_of_two_counts_and_shards_of_another_shape_are_refused(tmp_path):
    np.savez(tmp_path / "train-1-of-2.npz", x=images(4, seed=1), y=labels(4))
    np.savez(tmp_path / "train-2-of-2.npz", x=images(4, (28, 28, 3)), y=labels(4))
    with pytest.raises(DatasetError, match=r"train-2-of-2.npz: cifar10 images are 32x32x3 \(HWC\), got 28x28x3"):
        load_dataset("cifar10", "train", data_dir=tmp_path)
    np.savez(tmp_path / "train-1-of-3.npz", x=images(4, seed=3), y=labels(4))
    with pytest.raises(DatasetError, match=r"incomplete shards of train .*have "
                                           r"\['train-1-of-2.npz', 'train-1-of-3.npz'"):
        load_dataset("cifar10", "train", data_dir=tmp_path)


# --- what lies at a data file's name ------------------------------------------------------------

@pytest.mark.parametrize("make, error", [
    (lambda path: path.mkdir(), "is a folder"),
    (lambda path: path.symlink_to(path.with_name("gone.npz")),
     "is a symbolic link to .*gone.npz, which does not exist"),
    (lambda path: (path.symlink_to(path.with_name("b.npz")), path.with_name("b.npz").symlink_to(path.name)),
     "is a symbolic link that leads back to itself"),
])
def test_a_data_file_name_holding_no_file_is_an_error_not_a_fall_back_to_another_copy(tmp_path, make, error):
    for split in ("train", "test"):  # another copy, in a folder searched later
        np.savez(tmp_path / f"{split}.npz", x=images(3), y=labels(3))
    (tmp_path / "cifar10").mkdir()
    np.savez(tmp_path / "cifar10" / "test.npz", x=images(3, seed=5), y=labels(3))
    make(tmp_path / "cifar10" / "train.npz")
    with pytest.raises(DatasetError, match=f"cifar10/train.npz {error}"):
        load_dataset("cifar10", "train", data_dir=tmp_path)


def test_a_shard_or_a_cifar_batch_that_is_a_folder_is_named(tmp_path):
    np.savez(tmp_path / "train-1-of-2.npz", x=images(3), y=labels(3))
    (tmp_path / "train-2-of-2.npz").mkdir()
    with pytest.raises(DatasetError, match="train-2-of-2.npz is a folder"):
        load_dataset("cifar10", "train", data_dir=tmp_path)
    cifar_files(tmp_path / "c", lambda name: a_batch())
    (tmp_path / "c" / "cifar-10-batches-py" / "data_batch_2").unlink()
    (tmp_path / "c" / "cifar-10-batches-py" / "data_batch_2").mkdir()
    with pytest.raises(DatasetError, match="data_batch_2 is a folder"):
        load_dataset("cifar10", "train", data_dir=tmp_path / "c")


def test_a_file_that_may_not_be_read_is_not_called_corrupt(tmp_path, monkeypatch):
    mnist_files(tmp_path, compress=False)

    def denied(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(idx_files, "open", denied, raising=False)  # the tests may run as root: chmod would not stop it
    with pytest.raises(DatasetError, match="train-images-idx3-ubyte: permission denied.*chmod") as raised:
        load_dataset("mnist", "train", data_dir=tmp_path)
    assert "corrupt" not in str(raised.value)


# --- IDX files ------------------------------------------------------------------------------------

def test_idx_files_with_a_wrong_magic_or_a_header_announcing_too_much(tmp_path):
    mnist_files(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    data = bytearray(gzip.decompress(path.read_bytes()))
    data[2] = 0x0D  # floats
    path.write_bytes(gzip.compress(bytes(data)))
    with pytest.raises(DatasetError, match="train-images-idx3-ubyte.gz is not an IDX file of unsigned bytes"):
        load_dataset("mnist", "train", data_dir=tmp_path)
    write_idx(path, images(6, (28, 28)), dims=(2**32 - 1, 2**32 - 1, 2**32 - 1))
    with pytest.raises(DatasetError, match=r"train-images-idx3-ubyte.gz is truncated: .*\(4294967295, "):
        load_dataset("mnist", "train", data_dir=tmp_path)


def test_damaged_compressed_data_is_a_dataset_error_from_read_idx_itself(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    write_idx(path, images(6, (28, 28)))
    data = bytearray(path.read_bytes())
    data[10] = 0b111  # the first deflate block: final, of the reserved type 3
    path.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match=rf"cannot read {str(path).replace('/', '.')}: error: Error -3"):
        read_idx(path)


def test_a_compressed_idx_file_inflating_far_past_its_header_is_not_read_whole(tmp_path):
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    header = bytes([0, 0, 0x08, 3]) + struct.pack(">3I", 6, 28, 28)
    path.write_bytes(gzip.compress(header + bytes(256 * 2**20), compresslevel=1, mtime=0))  # 256 MB of zeros
    tracemalloc.start()
    try:
        with pytest.raises(DatasetError, match="longer than its header says"):
            read_idx(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 * 2**20


def test_a_gzipped_idx_file_without_its_suffix_is_recognized(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte", images(2, (28, 28)))
    with pytest.raises(DatasetError, match=r"bad magic number\) \(it is gzip-compressed: add .gz to its name\)"):
        read_idx(tmp_path / "train-images-idx3-ubyte")


def test_empty_or_out_of_range_idx_labels_name_the_files(tmp_path):
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images(0, (28, 28)))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels(0))
    with pytest.raises(DatasetError, match="holds no test examples of mnist"):
        load_dataset("mnist", "test", data_dir=tmp_path)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images(3, (28, 28)))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([1, 12, 3]))
    with pytest.raises(DatasetError, match=r"t10k-labels-idx1-ubyte.gz: mnist labels must lie in \[0, 10\), "
                                           r"got \[1, 12\]"):
        load_dataset("mnist", "test", data_dir=tmp_path)


# --- CIFAR pickles --------------------------------------------------------------------------------

def test_cifar_rows_in_another_layout_are_refused_not_scrambled(tmp_path):
    cifar_files(tmp_path, lambda name: {"data": images(4), "labels": labels(4).tolist()})  # (N, 32, 32, 3)
    with pytest.raises(DatasetError, match=r"data_batch_1: 'data' must be rows of 3072 channel-major pixels .*"
                                           r"got shape \(4, 32, 32, 3\)"):
        load_dataset("cifar10", "train", data_dir=tmp_path)


def test_cifar_batches_whose_label_counts_differ_from_their_rows_are_refused(tmp_path):
    """One label too many in a batch, one too few in the next: the totals agree, every label after
    the first batch would belong to another image."""
    def batch(name):
        rows = {"data_batch_1": 5, "data_batch_2": 3}.get(name, 4)
        return {"data": images(4, (3072,)), "labels": labels(rows).tolist()}

    cifar_files(tmp_path, batch)
    with pytest.raises(DatasetError, match=r"data_batch_1: 'labels' must hold one label per row of 'data' \(4\), "
                                           r"got shape \(5,\)"):
        load_dataset("cifar10", "train", data_dir=tmp_path)


@pytest.mark.parametrize("damage", [lambda data: data[: len(data) // 2], lambda data: b"",
                                    lambda data: b"\x80\x04garbage"], ids=["truncated", "empty", "garbage"])
def test_a_damaged_cifar_batch_is_named(tmp_path, damage):
    cifar_files(tmp_path, lambda name: a_batch())
    path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(DatasetError, match=rf"cannot read {str(path).replace('/', '.')}: .*truncated or corrupt"):
        load_dataset("cifar10", "train", data_dir=tmp_path)


@pytest.mark.parametrize("labels_value, error", [
    ([[1], [2, 3], 4, 5], "must be arrays or lists of numbers"),
    ([True, False, True, False], "integer class labels, got bool"),
    ([0, 1, 2, 10], r"labels must lie in \[0, 10\)"),
])
def test_bad_cifar_labels_name_the_batch(tmp_path, labels_value, error):
    cifar_files(tmp_path, lambda name: {"data": images(4, (3072,)), "labels": labels_value})
    with pytest.raises(DatasetError, match=f"data_batch_1: .*{error}"):
        load_dataset("cifar10", "train", data_dir=tmp_path)


def test_an_empty_cifar_split_is_refused(tmp_path):
    cifar_files(tmp_path, lambda name: {"data": np.zeros((0, 3072), np.uint8), "labels": []})
    with pytest.raises(DatasetError, match="cifar-10-batches-py holds no test examples of cifar10"):
        load_dataset("cifar10", "test", data_dir=tmp_path)


class _Calls:
    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


@pytest.mark.parametrize("function, args", [(os.system, ("true",)), (eval, ("1",)), (np.load, ("x",)),
                                            (__import__, ("os",))])
def test_cifar_batches_naming_any_other_callable_are_refused_unrun(tmp_path, function, args):
    cifar_files(tmp_path, lambda name: {**a_batch(), "extra": _Calls(function, *args)}, names=["test_batch"])
    with pytest.raises(DatasetError, match=r"test_batch names .*not unpickled"):
        load_dataset("cifar10", "test", data_dir=tmp_path)


def test_real_cifar_batches_still_load(tmp_path):
    batches = {name: a_batch(seed=i) for i, name in enumerate(["test_batch"])}
    cifar_files(tmp_path, batches.__getitem__, names=list(batches))
    data = load_dataset("cifar10", "test", data_dir=tmp_path)
    assert torch.equal(data.images, torch.from_numpy(batches["test_batch"]["data"].reshape(4, 3, 32, 32)))
    assert data.labels.tolist() == batches["test_batch"]["labels"]


def test_a_cifar_batch_whose_string_claims_gigabytes_fails_before_allocating_them(tmp_path):
    (tmp_path / "cifar-10-batches-py").mkdir()
    bytes8 = b"\x8e" + struct.pack("<Q", 2**33)  # BINBYTES8 announcing 8 GiB, followed by 100 bytes
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(b"\x80\x04" + bytes8 + bytes(100))
    tracemalloc.start()
    try:
        with pytest.raises(DatasetError, match=r"test_batch: .*expected 8589934592 bytes.*truncated or corrupt"):
            load_dataset("cifar10", "test", data_dir=tmp_path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20


@pytest.mark.parametrize("compression", [zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA],
                         ids=["deflate", "bzip2", "lzma"])
def test_compressed_archives_of_highly_compressible_arrays_load(tmp_path, compression):
    """All-zero images deflate about 1000:1 (near deflate's limit), and far more with bzip2 or lzma."""
    x, y = np.zeros((2000, 32, 32, 3), np.uint8), np.zeros(2000, np.int64)
    with zipfile.ZipFile(tmp_path / "train.npz", "w", compression=compression, compresslevel=9) as archive:
        for key, array in (("x", x), ("y", y)):
            with archive.open(f"{key}.npy", "w") as record:
                np.lib.format.write_array(record, array)
    with pytest.warns(UserWarning, match="only 1 of its 10 classes"):
        data = load_dataset("cifar10", "train", data_dir=tmp_path)
    assert data.images.shape == (2000, 3, 32, 32) and not data.images.any()


@pytest.mark.parametrize("name", [["cifar10"], None, 3, "CIFAR10"])
def test_a_data_set_name_that_is_not_registered_is_a_value_error_listing_the_names(name):
    with pytest.raises(ValueError, match="unknown data set .*; known: fashion-mnist, mnist, cifar10, cifar100"):
        load_dataset(name, "test")


def test_idx_images_of_another_size_name_the_image_file(tmp_path):
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images(3, (32, 32)))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels(3))
    with pytest.raises(DatasetError, match=r"t10k-images-idx3-ubyte.gz: mnist images have shape \(1, 28, 28\), got "
                                           r"\(1, 32, 32\)"):
        load_dataset("mnist", "test", data_dir=tmp_path)
