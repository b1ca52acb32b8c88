"""Mutation tests of the data-file readers (lipnet.data.npz_files, idx_files, cifar_files): each
test pins a behaviour that a hand-made mutant of the reader broke without any other test failing."""

import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from lipnet.data import DatasetError, load_dataset, read_idx


def images(n, shape=(32, 32, 3), seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


def write_idx(path: Path, array: np.ndarray, extra: bytes = b"") -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes() + extra)


# --- .npz shards ---------------------------------------------------------------------------------

def test_ten_or_more_shards_are_read_in_numeric_not_name_order(tmp_path):
    """train-10-of-12.npz sorts before train-2-of-12.npz by name: the shards must still be read
    1, 2, ..., 12 (each shard's label is its number, so any other order shows)."""
    for k in range(1, 13):
        np.savez(tmp_path / f"train-{k}-of-12.npz", x=images(1, seed=k), y=np.array([k % 10], np.uint8))
    data = load_dataset("cifar10", "train", data_dir=tmp_path)
    assert data.labels.tolist() == [k % 10 for k in range(1, 13)]
    expected = np.concatenate([images(1, seed=k) for k in range(1, 13)]).transpose(0, 3, 1, 2)
    assert np.array_equal(data.images.numpy(), expected)
    assert data.source == ", ".join(str(tmp_path / f"train-{k}-of-12.npz") for k in range(1, 13))


def test_a_complete_shard_set_next_to_a_stray_shard_of_another_count_is_refused(tmp_path):
    """{train-1-of-1, train-1-of-2, train-2-of-2}: the set of two is complete, but which data is
    meant is unclear (a stray shard of an older layout): refused, not read with the extra ignored."""
    for name, seed in (("train-1-of-1", 1), ("train-1-of-2", 2), ("train-2-of-2", 3)):
        np.savez(tmp_path / f"{name}.npz", x=images(2, seed=seed), y=np.zeros(2, np.uint8))
    with pytest.raises(DatasetError, match=r"incomplete shards of train .*have \['train-1-of-1.npz', "
                                           r"'train-1-of-2.npz', 'train-2-of-2.npz'\], missing a consistent "
                                           r"shard count"):
        load_dataset("cifar10", "train", data_dir=tmp_path)


def test_empty_shards_are_not_taken_for_copies_of_each_other(tmp_path):
    """Two empty shards have equal (empty) pixels: that is no duplicated data, and the split
    reads as the third shard's examples."""
    np.savez(tmp_path / "test-1-of-3.npz", x=images(0), y=np.zeros(0, np.uint8))
    np.savez(tmp_path / "test-2-of-3.npz", x=images(3, seed=4), y=np.array([1, 2, 3], np.uint8))
    np.savez(tmp_path / "test-3-of-3.npz", x=images(0), y=np.zeros(0, np.uint8))
    data = load_dataset("cifar10", "test", data_dir=tmp_path)
    assert data.labels.tolist() == [1, 2, 3]
    assert np.array_equal(data.images.numpy(), images(3, seed=4).transpose(0, 3, 1, 2))


# --- IDX files -----------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(2, 28, 28), (4, 512, 512)], ids=["small", "1 MiB"])
def test_an_idx_file_longer_than_its_header_says_is_refused(tmp_path, shape):
    """One byte past what the header announces (a file from another version, or two files
    concatenated by mistake) is refused rather than cut to the header's size, also when the
    data fills whole 1-MiB read chunks exactly, where the extra byte is only seen by one more read."""
    path = tmp_path / "t10k-images-idx3-ubyte"
    array = np.arange(np.prod(shape), dtype=np.uint64).astype(np.uint8).reshape(shape)
    write_idx(path, array, b"\0")
    values = int(np.prod(shape))
    with pytest.raises(DatasetError, match=rf"is longer than its header says: .*\({values} values\), it holds "
                                           rf"{values + 1} or more"):
        read_idx(path)
    write_idx(path, array)
    assert np.array_equal(read_idx(path), array)


# --- CIFAR pickles --------------------------------------------------------------------------------

def cifar10_batches(root: Path, batches: dict) -> None:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    for name, batch in batches.items():
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)


def test_the_cifar10_train_split_is_all_five_batches_in_order(tmp_path):
    """data_batch_1 .. data_batch_5, each read once and in that order (batch k's labels are k,
    its pixels seeded by k): a reader that skipped one would train on 40,000 of the 50,000."""
    batches = {f"data_batch_{k}": {"data": images(2, (3072,), seed=k), "labels": [k, k]} for k in range(1, 6)}
    cifar10_batches(tmp_path, {**batches, "test_batch": {"data": images(2, (3072,)), "labels": [0, 0]}})
    data = load_dataset("cifar10", "train", data_dir=tmp_path)
    assert data.labels.tolist() == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    expected = np.concatenate([images(2, (3072,), seed=k) for k in range(1, 6)]).reshape(10, 3, 32, 32)
    assert torch.equal(data.images, torch.from_numpy(expected))


@pytest.mark.parametrize("value", [256, -1, 1000])
def test_cifar_pixels_outside_0_255_are_refused_not_wrapped_around(tmp_path, value):
    """Integer pixels of 256 or -1 would become 0 and 255 in uint8: refused, naming the range."""
    data = images(2, (3072,)).astype(np.int64)
    data[1, 5] = value
    cifar10_batches(tmp_path, {"test_batch": {"data": data, "labels": [0, 1]}})
    low, high = min(0, value), max(255, value)
    with pytest.raises(DatasetError, match=rf"test_batch: pixel values must lie in \[0, 255\], got \[{low}, {high}\]"):
        load_dataset("cifar10", "test", data_dir=tmp_path)


def python2_batch(pixels: np.ndarray, labels: list[int]) -> bytes:
    """A batch pickled as Python 2 pickled the real CIFAR files: the keys and the pixel bytes are
    Python 2 strings (SHORT_BINSTRING, BINSTRING), the array rebuilt by numpy.core.multiarray."""
    n, row = pixels.shape
    array = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85U\x01b\x87R"
             b"(K\x01J" + struct.pack("<i", n) + b"J" + struct.pack("<i", row) + b"\x86"
             b"cnumpy\ndtype\nU\x02u1K\x00K\x01\x87R(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
             b"\x89T" + struct.pack("<I", pixels.size) + pixels.astype(np.uint8).tobytes() + b"tb")
    label_list = b"](" + b"".join(b"K" + bytes([y]) for y in labels) + b"e"
    return b"\x80\x02}(U\x04data" + array + b"U\x06labels" + label_list + b"u."


def test_a_batch_pickled_by_python_2_like_the_real_files_is_read(tmp_path):
    """The files torchvision downloads were pickled by Python 2 with numpy 1: their keys are
    byte strings (read as text only with encoding latin1) and their arrays name
    numpy.core.multiarray._reconstruct (numpy._core in numpy 2)."""
    pixels = images(3, (3072,), seed=7)
    (tmp_path / "cifar-10-batches-py").mkdir()
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(python2_batch(pixels, [3, 1, 4]))
    data = load_dataset("cifar10", "test", data_dir=tmp_path)
    assert data.labels.tolist() == [3, 1, 4]
    assert torch.equal(data.images, torch.from_numpy(pixels.reshape(3, 3, 32, 32)))


def test_a_zip_record_claiming_more_bytes_than_the_whole_file_is_refused(tmp_path):
    """An .npz whose central directory says the stored record 'x' holds 10**9 bytes, in a file
    of a few kilobytes: the archive is damaged (cut short, or its directory overwritten), refused
    as such before numpy reads from it."""
    path = tmp_path / "test.npz"
    np.savez(path, x=images(2), y=np.zeros(2, np.uint8))
    data = bytearray(path.read_bytes())
    entry = data.index(b"PK\x01\x02")  # the central directory's first entry: x.npy
    assert data[entry + 46:entry + 51] == b"x.npy"
    data[entry + 20:entry + 28] = struct.pack("<II", 10**9, 10**9)  # compressed and uncompressed sizes
    path.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match=rf"test.npz is truncated or corrupt: its record of 'x' claims {10**9} "
                                           rf"bytes from {10**9} stored, in a file of {len(data)}"):
        load_dataset("cifar10", "test", data_dir=tmp_path)
