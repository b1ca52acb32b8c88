"""Finding and reading data sets: every local format, corrupt files, and the not-found message."""

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from lipnet.data import DatasetError, DatasetNotFoundError, default_data_dir, load_dataset, read_idx, synthetic_dataset, write_npz

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def mnist_like(folder: Path, n_train=12, n_test=6, compress=True, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, n, dtype=np.uint8)
        suffix = ".gz" if compress else ""
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", x, compress)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", y, compress)
        arrays[split] = (x, y)
    return arrays


@pytest.mark.parametrize("layout", ["torchvision", "flat", "plain-idx"])
def test_mnist_like_layouts(tmp_path, layout):
    folder = tmp_path / "MNIST" / "raw" if layout == "torchvision" else tmp_path
    arrays = mnist_like(folder, compress=layout != "plain-idx")
    for split in ("train", "test"):
        data = load_dataset("mnist", split, data_dir=tmp_path)
        x, y = arrays[split]
        assert data.images.dtype == torch.uint8 and data.images.shape == (len(x), 1, 28, 28)
        assert np.array_equal(data.images[:, 0].numpy(), x)
        assert np.array_equal(data.labels.numpy(), y.astype(np.int64))
        assert data.num_classes == 10 and data.shape == (1, 28, 28) and len(data.mean) == 1


def test_npz_shards_are_concatenated_in_order_and_converted_to_nchw(tmp_path):
    rng = np.random.default_rng(0)
    parts = [(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n)) for n in (3, 4)]
    for i, (x, y) in enumerate(reversed(parts)):  # written out of order on purpose
        np.savez(tmp_path / f"train-{2 - i}-of-2.npz", x=x, y=y.astype(np.uint8))
    data = load_dataset("cifar10", "train", data_dir=tmp_path)
    x = np.concatenate([p[0] for p in parts])
    assert data.images.shape == (7, 3, 32, 32)
    assert np.array_equal(data.images.numpy(), x.transpose(0, 3, 1, 2))
    assert np.array_equal(data.labels.numpy(), np.concatenate([p[1] for p in parts]))


def test_missing_shard_is_an_error(tmp_path):
    np.savez(tmp_path / "train-1-of-3.npz", x=np.zeros((2, 32, 32, 3), np.uint8), y=np.zeros(2, np.uint8))
    np.savez(tmp_path / "train-3-of-3.npz", x=np.zeros((2, 32, 32, 3), np.uint8), y=np.zeros(2, np.uint8))
    with pytest.raises(DatasetError, match="train-2-of-3.npz"):
        load_dataset("cifar10", "train", data_dir=tmp_path)


def test_cifar_pickled_batches(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    x = rng.integers(0, 256, (5, 3 * 32 * 32), dtype=np.uint8)
    labels = [0, 99, 5, 7, 42]
    with open(folder / "test", "wb") as f:
        pickle.dump({"data": x, "fine_labels": labels, "coarse_labels": [0] * 5}, f)
    data = load_dataset("cifar100", "test", data_dir=tmp_path)
    assert data.num_classes == 100
    assert np.array_equal(data.images.numpy(), x.reshape(5, 3, 32, 32))
    assert data.labels.tolist() == labels


def test_missing_data_message_lists_folders_and_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.delenv("LIPNET_DATA_DIR", raising=False)
    (tmp_path / "nowhere").mkdir()
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset("mnist", "train", data_dir=tmp_path / "nowhere")
    message = str(err.value)
    assert str((tmp_path / "nowhere").absolute()) in message
    assert str((tmp_path / "nowhere" / "mnist").absolute()) in message
    assert "--download" in message and "MNIST/raw" in message and "train.npz" in message


@pytest.mark.parametrize("make", [lambda path: None, lambda path: path.write_text("")], ids=["missing", "a file"])
def test_a_data_dir_that_is_not_a_folder_is_an_error_not_a_fall_back(tmp_path, make):
    """fashion-mnist is also installed system-wide: a mistyped --data-dir must not silently read that copy."""
    make(tmp_path / "typo")
    with pytest.raises(DatasetNotFoundError, match=r"fashion-mnist \(train split\) not found: the data folder .*typo "
                                                   r"(does not exist|is not a folder).*--download"):
        load_dataset("fashion-mnist", "train", data_dir=tmp_path / "typo")


@pytest.mark.parametrize("make", [lambda path: None, lambda path: path.write_text("")], ids=["missing", "a file"])
def test_a_lipnet_data_dir_that_is_not_a_folder_is_an_error_not_a_fall_back(tmp_path, monkeypatch, make):
    """Setting $LIPNET_DATA_DIR means it: a mistyped one must not silently read the system-wide fashion-mnist."""
    make(tmp_path / "typo")
    monkeypatch.setenv("LIPNET_DATA_DIR", str(tmp_path / "typo"))
    with pytest.raises(DatasetNotFoundError, match=r"\$LIPNET_DATA_DIR .*typo.* (does not exist|is not a folder)"):
        load_dataset("fashion-mnist", "train")
    mnist_like(tmp_path / "given")  # an explicit data_dir is searched instead of the variable's folder
    assert len(load_dataset("fashion-mnist", "train", data_dir=tmp_path / "given")) == 12


def test_an_empty_lipnet_data_dir_counts_as_unset(monkeypatch):
    monkeypatch.setenv("LIPNET_DATA_DIR", "")
    assert default_data_dir() == Path("data")


def test_failed_download_is_reported(tmp_path, monkeypatch):
    import torchvision

    def offline(*args, **kwargs):
        raise RuntimeError("no network")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(DatasetNotFoundError, match="download failed: RuntimeError: no network"):
        load_dataset("cifar10", "test", data_dir=tmp_path, download=True)


def test_corrupt_and_truncated_files_give_clear_errors(tmp_path):
    mnist_like(tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DatasetError, match="t10k-images-idx3-ubyte.gz"):
        load_dataset("mnist", "test", data_dir=tmp_path)
    raw = tmp_path / "raw-images"
    write_idx(raw, np.zeros((4, 28, 28), np.uint8), compress=False)
    raw.write_bytes(raw.read_bytes()[:-10])
    with pytest.raises(DatasetError, match="truncated"):
        read_idx(raw)
    (tmp_path / "test.npz").write_bytes(b"PK\x03\x04 broken zip")
    with pytest.raises(DatasetError, match="test.npz"):
        load_dataset("cifar10", "test", data_dir=tmp_path)


def test_wrong_shape_or_labels_are_rejected(tmp_path):
    np.savez(tmp_path / "test.npz", x=np.zeros((2, 28, 28, 1), np.uint8), y=np.zeros(2, np.uint8))
    with pytest.raises(DatasetError, match=r"cifar10 images are 32x32x3 \(HWC\), got 28x28x1"):
        load_dataset("cifar10", "test", data_dir=tmp_path)
    np.savez(tmp_path / "test.npz", x=np.zeros((2, 32, 32, 3), np.uint8), y=np.array([0, 10]))
    with pytest.raises(ValueError, match="labels must lie in"):
        load_dataset("cifar10", "test", data_dir=tmp_path)
    np.savez(tmp_path / "test.npz", x=np.zeros((2, 32, 32, 3), np.float32), y=np.zeros(2))
    with pytest.raises(DatasetError, match="uint8"):
        load_dataset("cifar10", "test", data_dir=tmp_path)


def test_unknown_names_are_rejected():
    with pytest.raises(ValueError, match="known: fashion-mnist"):
        load_dataset("imagenet", "test")
    with pytest.raises(ValueError, match="split"):
        load_dataset("mnist", "validation")


@pytest.mark.skipif(not FASHION_DIR.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_real_fashion_mnist_from_the_debian_package(tmp_path):
    data = load_dataset("fashion-mnist", "test", data_dir=tmp_path)
    assert data.source == str(FASHION_DIR)
    assert data.images.shape == (10000, 1, 28, 28)
    assert torch.bincount(data.labels).tolist() == [1000] * 10


def test_synthetic_data_round_trips_through_npz(tmp_path):
    from lipnet.data import synthetic_dataset, write_npz

    data = synthetic_dataset("cifar100", 30, split="test", seed=2)
    write_npz(data, tmp_path / "test.npz")
    loaded = load_dataset("cifar100", "test", data_dir=tmp_path)
    assert torch.equal(loaded.images, data.images) and torch.equal(loaded.labels, data.labels)


def test_ambiguous_npz_layouts_and_float_labels_are_errors(tmp_path):
    x = np.zeros((2, 28, 28), np.uint8)
    np.savez(tmp_path / "test.npz", x=x, y=np.array([0.7, 1.7]))
    with pytest.raises(DatasetError, match="integer class labels"):
        load_dataset("mnist", "test", data_dir=tmp_path)  # 0.7 would silently become class 0
    np.savez(tmp_path / "test.npz", x=x, y=np.array([0, 1]))
    np.savez(tmp_path / "test-1-of-1.npz", x=x, y=np.array([0, 1]))
    with pytest.raises(DatasetError, match="both test.npz and shards"):
        load_dataset("mnist", "test", data_dir=tmp_path)
    (tmp_path / "test.npz").unlink()
    np.savez(tmp_path / "test-0-of-1.npz", x=x, y=np.array([0, 1]))
    with pytest.raises(DatasetError, match="1 <= K <= M"):
        load_dataset("mnist", "test", data_dir=tmp_path)


def test_the_two_splits_come_from_one_folder(tmp_path):
    write_npz(synthetic_dataset("mnist", 64, split="train"), tmp_path / "mnist" / "train.npz")
    write_npz(synthetic_dataset("mnist", 16, split="test"), tmp_path / "test.npz")  # another place
    assert len(load_dataset("mnist", "train", data_dir=tmp_path)) == 64
    with pytest.raises(DatasetNotFoundError, match="holds the train split of mnist but not its test split"):
        load_dataset("mnist", "test", data_dir=tmp_path)


def test_a_split_missing_most_classes_is_warned_about(tmp_path):
    data = synthetic_dataset("cifar10", 1000, split="train")  # enough to hold 10 of each of 100 classes
    write_npz(data, tmp_path / "train.npz")
    with pytest.warns(UserWarning, match="only 10 of its 100 classes"):
        load_dataset("cifar100", "train", data_dir=tmp_path)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_dataset("cifar10", "train", data_dir=tmp_path)


def test_scalar_labels_are_a_shape_error(tmp_path):
    import numpy as np

    np.savez(tmp_path / "test.npz", x=np.zeros((4, 28, 28), np.uint8), y=np.array(3))
    with pytest.raises(DatasetError, match=r"expected 'x' \(N, H, W, C\) and 'y' \(N,\)"):
        load_dataset("mnist", "test", data_dir=tmp_path)


def test_download_completes_a_partial_download_but_never_mixes_folders(tmp_path, monkeypatch):
    import torchvision

    raw = tmp_path / "MNIST" / "raw"
    mnist_like(raw)
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (raw / name).unlink()  # an interrupted download: the training split only
    with pytest.raises(DatasetNotFoundError, match="holds the train split of mnist but not its test split"):
        load_dataset("mnist", "test", data_dir=tmp_path)

    def fetch(root, train, download):  # what torchvision's download does: complete root/MNIST/raw
        mnist_like(Path(root) / "MNIST" / "raw")
    monkeypatch.setattr(torchvision.datasets, "MNIST", fetch)
    assert len(load_dataset("mnist", "test", data_dir=tmp_path, download=True)) == 6
    elsewhere = tmp_path / "other"
    write_npz(synthetic_dataset("mnist", 32, split="train"), elsewhere / "mnist" / "train.npz")
    with pytest.raises(DatasetNotFoundError, match="holds the train split"):  # the download cannot join it
        load_dataset("mnist", "test", data_dir=elsewhere, download=True)


def test_a_shard_of_another_shape_or_one_hot_labels_are_named(tmp_path):
    np.savez(tmp_path / "train-1-of-2.npz", x=np.zeros((2, 32, 32, 3), np.uint8), y=np.zeros(2, np.uint8))
    np.savez(tmp_path / "train-2-of-2.npz", x=np.zeros((2, 28, 28, 1), np.uint8), y=np.zeros(2, np.uint8))
    with pytest.raises(DatasetError, match=r"train-2-of-2.npz: cifar10 images are 32x32x3 \(HWC\), got 28x28x1"):
        load_dataset("cifar10", "train", data_dir=tmp_path)
    np.savez(tmp_path / "test.npz", x=np.zeros((2, 32, 32, 3), np.uint8), y=np.eye(10, dtype=np.int64)[:2])
    with pytest.raises(DatasetError, match=r"test.npz: 'y' must hold one class label per image .*\(2, 10\)"):
        load_dataset("cifar10", "test", data_dir=tmp_path)


def test_an_idx_file_cut_inside_its_header_is_a_dataset_error(tmp_path):
    path = tmp_path / "cut-images-idx3-ubyte"
    write_idx(path, np.zeros((2, 28, 28), np.uint8), compress=False)
    path.write_bytes(path.read_bytes()[:9])  # magic + part of the three dimensions
    with pytest.raises(DatasetError, match="truncated"):
        read_idx(path)


def test_write_npz_keeps_the_previous_file_when_a_write_fails_and_returns_the_path_written(tmp_path, monkeypatch):
    path = write_npz(synthetic_dataset("mnist", 20), tmp_path / "test.npz")
    good = path.read_bytes()

    def disk_full(file, **arrays):
        file.write(b"PK\x03\x04 partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", disk_full)
    with pytest.raises(OSError, match="No space"):
        write_npz(synthetic_dataset("mnist", 30), path)
    monkeypatch.undo()
    assert path.read_bytes() == good and sorted(p.name for p in tmp_path.iterdir()) == ["test.npz"]
    assert write_npz(synthetic_dataset("mnist", 20), tmp_path / "train").is_file()  # numpy adds .npz


@pytest.mark.parametrize("noise", [-0.5, 1.5, float("nan")])
def test_synthetic_noise_outside_0_1_is_refused_rather_than_wrapped_around_uint8(noise):
    with pytest.raises(ValueError, match="noise"):
        synthetic_dataset("mnist", 4, noise=noise)


class _Planted:
    """A pickle that, when loaded with plain pickle.load, creates a file (any call could run)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (Path(self.marker),)


def test_a_cifar_batch_that_would_run_code_when_unpickled_is_refused(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    marker = tmp_path / "code-ran"
    with open(folder / "test", "wb") as f:
        pickle.dump({"data": np.zeros((2, 3 * 32 * 32), np.uint8), "fine_labels": [0, 1], "x": _Planted(marker)}, f)
    with pytest.raises(DatasetError, match="cifar-100-python"):
        load_dataset("cifar100", "test", data_dir=tmp_path)
    assert not marker.exists()


def test_cifar_pixels_that_are_not_integers_are_refused_not_truncated(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    x = np.random.default_rng(0).random((2, 3 * 32 * 32))  # floats in [0, 1): astype(uint8) makes them all 0
    with open(folder / "test", "wb") as f:
        pickle.dump({"data": x, "fine_labels": [0, 1]}, f)
    with pytest.raises(DatasetError, match="float64"):
        load_dataset("cifar100", "test", data_dir=tmp_path)


def test_cifar_labels_that_are_not_integers_are_refused_not_truncated(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    with open(folder / "test", "wb") as f:
        pickle.dump({"data": np.zeros((2, 3 * 32 * 32), np.uint8), "fine_labels": [0.9, 1.5]}, f)
    with pytest.raises(DatasetError, match="integer class labels"):
        load_dataset("cifar100", "test", data_dir=tmp_path)


def test_files_of_another_image_size_or_with_labels_out_of_range_are_dataset_errors(tmp_path):
    """Callers catch DatasetError for 'the file was found but is wrong' (the docs' promise)."""
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((2, 32, 32), np.uint8), compress=False)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([1, 2], np.uint8), compress=False)
    with pytest.raises(DatasetError, match=r"\(1, 28, 28\).*32"):
        load_dataset("mnist", "test", data_dir=tmp_path)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((2, 28, 28), np.uint8), compress=False)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([1, 200], np.uint8), compress=False)
    with pytest.raises(DatasetError, match=r"labels must lie in \[0, 10\)"):
        load_dataset("mnist", "test", data_dir=tmp_path)
