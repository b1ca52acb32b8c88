"""Finding and reading a data set from local files, or downloading it with torchvision.

Three on-disk formats are read, in this order, in each folder searched:

* ``.npz`` arrays: ``{split}.npz`` or shards ``{split}-1-of-3.npz`` ... with keys ``x``
  (uint8, ``NHWC`` or ``NHW``) and ``y`` (integer labels);
* torchvision's layout under ``root``: ``FashionMNIST/raw/``, ``MNIST/raw/`` (gzip or plain
  IDX files), ``cifar-10-batches-py/``, ``cifar-100-python/`` (pickled batches);
* the four IDX files directly in the folder (as Debian's ``dataset-fashion-mnist`` installs them).

The folders searched are ``data_dir/<name>``, then ``data_dir`` (default ``$LIPNET_DATA_DIR``
or ``./data``; a ``data_dir`` given or set in the variable must exist), then the system folders
of the data set. The first folder holding the data set wins; the training log and every loaded
split name the files they came from.
"""

from __future__ import annotations

import gzip
import math
import os
import pickle
import re
import struct
import warnings
from pathlib import Path

import numpy as np
import torch

from lipnet.data.registry import DatasetInfo, ImageDataset, dataset_info

SPLITS = ("train", "test")

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_CIFAR_FILES = {
    "cifar10": {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
    "cifar100": {"train": ["train"], "test": ["test"]},
}
_CIFAR_LABEL_KEY = {"cifar10": "labels", "cifar100": "fine_labels"}


class DatasetError(RuntimeError, ValueError):
    """A data set file exists but cannot be read (truncated, corrupt, wrong shape, labels out of
    range). Also a ``ValueError``, which :class:`~lipnet.data.ImageDataset` raises for the same
    problems in tensors built by hand."""


class DatasetNotFoundError(FileNotFoundError):
    """No copy of the data set was found in any of the folders searched."""


def default_data_dir() -> Path:
    """``$LIPNET_DATA_DIR`` if set (and not empty), else ``./data``."""
    return Path(os.environ.get("LIPNET_DATA_DIR") or "data")


def load_dataset(name: str, split: str = "test", *, data_dir: str | os.PathLike | None = None,
                 download: bool = False) -> ImageDataset:
    """Load a whole split of a registered data set into memory.

    Args:
        name: ``"fashion-mnist"``, ``"mnist"``, ``"cifar10"`` or ``"cifar100"``.
        split: ``"train"`` or ``"test"``.
        data_dir: folder to search first (and to download into); default
            ``$LIPNET_DATA_DIR`` or ``./data``. Given, or set in ``$LIPNET_DATA_DIR``, it must
            be a folder (unless ``download``): a mistyped one is an error, not a fall-back to a
            system-wide copy.
        download: when no local copy is found, download it with torchvision into ``data_dir``.

    Returns:
        :class:`ImageDataset` with ``images`` (uint8 ``(N, C, H, W)``), ``labels`` (int64
        ``(N,)``), ``info`` (shape, classes, mean, std) and ``source`` (where it was read).

    Raises:
        DatasetNotFoundError: nothing found, or ``data_dir`` (``$LIPNET_DATA_DIR``) is not a
            folder; the message lists every folder searched and how to get the data.
        DatasetError: a file was found but is corrupt or has the wrong shape.

    Example:
        >>> test = load_dataset("fashion-mnist", "test")  # doctest: +SKIP
        >>> test.images.shape, test.num_classes            # doctest: +SKIP
        (torch.Size([10000, 1, 28, 28]), 10)
    """
    info = dataset_info(name)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    chosen = data_dir is not None or bool(os.environ.get("LIPNET_DATA_DIR"))
    if chosen and not download and not root.is_dir():
        raise DatasetNotFoundError(_no_data_dir_message(info, split, root, from_environment=data_dir is None))
    folders = search_folders(info, root)
    try:
        found = _find(info, split, folders)
    except DatasetNotFoundError:  # a folder holds the other split only
        if not download:
            raise
        found = None
    if found is None and download:
        error = _download(info, split, root)
        # The whole search again: a partial download in root is now complete, and a partial
        # folder elsewhere is still refused rather than mixed with the download.
        found = _find(info, split, folders)
        if found is None:
            raise DatasetNotFoundError(_not_found_message(info, split, folders, download_error=error))
    if found is None:
        raise DatasetNotFoundError(_not_found_message(info, split, folders))
    reader, path = found
    try:
        images, labels = reader(info, split, path)
    except DatasetError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure to parse a file is reported with its path
        raise DatasetError(f"cannot read {info.name} {split} from {path}: {type(exc).__name__}: {exc}. "
                           "The file is probably truncated or corrupt: delete it and get it again "
                           f"({info.how_to_get}).") from exc
    source = ", ".join(map(str, path)) if isinstance(path, list) else str(path)
    try:
        dataset = ImageDataset(images, labels, info, split, source)
    except ValueError as exc:  # images of another size, labels out of range: the files are wrong
        raise DatasetError(f"{exc}: is this file another data set, or damaged? Get it again ({info.how_to_get})") \
            from exc
    _warn_if_classes_are_missing(dataset)
    return dataset


def _warn_if_classes_are_missing(dataset: ImageDataset) -> None:
    """Warn when a split large enough to hold every class (10 examples each) lacks some: the
    files are probably another data set of the same image shape (CIFAR-10 read as CIFAR-100)."""
    classes = dataset.info.num_classes
    if len(dataset.labels) < 10 * classes:
        return
    present = int(torch.unique(dataset.labels).numel())
    if present < classes:
        warnings.warn(f"{dataset.info.name} {dataset.split} from {dataset.source} has {len(dataset.labels)} examples "
                      f"but only {present} of its {classes} classes: is this the right data set?", stacklevel=3)


def search_folders(info: DatasetInfo, root: Path) -> list[Path]:
    """The folders :func:`load_dataset` looks in, in order: the data set's own subfolder first,
    so that files named after the split alone (``train.npz``, IDX names) in ``root`` are not
    taken for every data set when the subfolder exists."""
    folders = [root / info.name, root] + [Path(d) for d in info.system_dirs]
    return list(dict.fromkeys(folders))


def _find(info: DatasetInfo, split: str, folders: list[Path]):
    """``(reader, path)`` of ``split`` in the first folder that holds the data set (either split),
    so that the training and test splits of a run never come from two different places; a
    folder with the other split only is an error."""
    for folder in folders:
        found = _find_in(info, split, folder)
        if found is not None:
            return found
        other = next(s for s in SPLITS if s != split)
        if _find_in(info, other, folder) is not None:
            raise DatasetNotFoundError(
                f"{folder.absolute()} holds the {other} split of {info.name} but not its {split} split. The splits "
                "of a data set are read from one folder (the first that holds either), so that a run never mixes "
                f"two sources: put the {split} split there too, or point --data-dir at a folder that has both.")
    return None


def _find_in(info: DatasetInfo, split: str, folder: Path):
    """``(reader, path)`` of the first format of ``split`` found in ``folder``, or ``None``."""
    shards = _npz_files(folder, split)
    if shards:
        return _read_npz, shards
    tv = folder / info.torchvision_folder
    if info.name in _CIFAR_FILES:
        if all((tv / f).is_file() for f in _CIFAR_FILES[info.name][split]):
            return _read_cifar, tv
    else:
        for candidate in (tv / "raw", folder):
            if all(_idx_path(candidate, f) is not None for f in _IDX_FILES[split]):
                return _read_idx_pair, candidate
    return None


def _npz_files(folder: Path, split: str) -> list[Path] | None:
    single = folder / f"{split}.npz"
    candidates = sorted(folder.glob(f"{split}-*-of-*.npz")) if folder.is_dir() else []
    if single.is_file():
        if candidates:
            raise DatasetError(f"{folder} holds both {single.name} and shards ({candidates[0].name}, ...): keep one "
                               "layout, so that it is clear which data is used")
        return [single]
    shards = {}
    for path in candidates:
        match = re.fullmatch(rf"{split}-([1-9]\d*)-of-([1-9]\d*)\.npz", path.name)
        if not match or int(match[1]) > int(match[2]):
            raise DatasetError(f"{path}: shard names are {split}-K-of-M.npz with 1 <= K <= M (no leading zeros)")
        shards[(int(match[1]), int(match[2]))] = path
    if not shards:
        return None
    totals = {total for _, total in shards}
    total = max(totals)
    missing = [f"{split}-{i}-of-{total}.npz" for i in range(1, total + 1) if (i, total) not in shards]
    if len(totals) > 1 or missing:
        raise DatasetError(f"incomplete shards of {split} in {folder}: have {sorted(p.name for p in shards.values())}, "
                           f"missing {missing or 'a consistent shard count'}")
    return [shards[(i, total)] for i in range(1, total + 1)]


def _read_npz(info: DatasetInfo, split: str, paths: list[Path]):
    images, labels = [], []
    for path in paths:
        try:
            with np.load(path, allow_pickle=False) as arrays:
                if "x" not in arrays or "y" not in arrays:
                    raise DatasetError(f"{path} must hold arrays 'x' (uint8 NHWC images) and 'y' (labels), "
                                       f"found {sorted(arrays.keys())}")
                x, y = arrays["x"], arrays["y"]
        except DatasetError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise DatasetError(f"cannot read {path}: {type(exc).__name__}: {exc}. The file is probably truncated "
                               "or corrupt: get it again.") from exc
        if x.dtype != np.uint8:
            raise DatasetError(f"{path}: 'x' must be uint8 pixels, got {x.dtype}")
        if x.ndim == 3:
            x = x[..., None]
        if x.ndim != 4 or y.ndim == 0 or len(x) != len(y):
            raise DatasetError(f"{path}: expected 'x' (N, H, W, C) and 'y' (N,), got {x.shape} and {y.shape}")
        channels, height, width = info.shape
        if x.shape[1:] != (height, width, channels):
            raise DatasetError(f"{path}: {info.name} images are {height}x{width}x{channels} (HWC), got "
                               f"{'x'.join(map(str, x.shape[1:]))}: is this file another data set?")
        if y.size != len(y):
            raise DatasetError(f"{path}: 'y' must hold one class label per image (shape (N,)), got {y.shape}; "
                               "one-hot labels? store their argmax")
        if not np.issubdtype(y.dtype, np.integer):
            raise DatasetError(f"{path}: 'y' must hold integer class labels, got {y.dtype}")
        images.append(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))))
        labels.append(torch.from_numpy(y.astype(np.int64).reshape(-1)))
    return torch.cat(images), torch.cat(labels)


def _idx_path(folder: Path, stem: str) -> Path | None:
    for path in (folder / f"{stem}.gz", folder / stem):
        if path.is_file():
            return path
    return None


def _read_idx_pair(info: DatasetInfo, split: str, folder: Path):
    image_file, label_file = (_idx_path(folder, stem) for stem in _IDX_FILES[split])
    images = read_idx(image_file)
    labels = read_idx(label_file)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DatasetError(f"IDX files in {folder} do not match: images {images.shape}, labels {labels.shape}")
    return torch.from_numpy(images.copy())[:, None], torch.from_numpy(labels.astype(np.int64))


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file of unsigned bytes (gzip-compressed if its name ends in ``.gz``)."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise DatasetError(f"cannot read {path}: {exc}. The file is probably truncated or corrupt: get it again.") \
            from exc
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DatasetError(f"{path} is not an IDX file of unsigned bytes (bad magic number)")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise DatasetError(f"{path} is truncated: its header announces {ndim} dimensions, the file ends after "
                           f"{len(data)} bytes. Get it again.")
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != math.prod(dims):
        state = "truncated" if array.size < math.prod(dims) else "longer than its header says"
        raise DatasetError(f"{path} is {state}: its header gives dimensions {dims} ({math.prod(dims)} values), "
                           f"it holds {array.size}")
    return array.reshape(dims)


def _read_cifar(info: DatasetInfo, split: str, folder: Path):
    images, labels = [], []
    for name in _CIFAR_FILES[info.name][split]:
        with open(folder / name, "rb") as f:
            batch = _CifarUnpickler(f, folder / name).load()  # the format torchvision downloads and reads
        if not (isinstance(batch, dict) and "data" in batch and _CIFAR_LABEL_KEY[info.name] in batch):
            raise DatasetError(f"{folder / name} is not a CIFAR batch (a dict with 'data' and "
                               f"{_CIFAR_LABEL_KEY[info.name]!r})")
        pixels = np.asarray(batch["data"])
        if not np.issubdtype(pixels.dtype, np.integer):  # floats in [0, 1] would all become 0 in uint8
            raise DatasetError(f"{folder / name}: 'data' must hold integer pixel values in [0, 255], got {pixels.dtype}")
        if pixels.size and (pixels.min() < 0 or pixels.max() > 255):
            raise DatasetError(f"{folder / name}: pixel values must lie in [0, 255], got [{pixels.min()}, "
                               f"{pixels.max()}]")
        images.append(pixels.astype(np.uint8).reshape(-1, *info.shape))
        y = np.asarray(batch[_CIFAR_LABEL_KEY[info.name]])
        if not np.issubdtype(y.dtype, np.integer):  # 0.9 would silently become class 0
            raise DatasetError(f"{folder / name}: {_CIFAR_LABEL_KEY[info.name]!r} must hold integer class labels, "
                               f"got {y.dtype}")
        labels.append(y.astype(np.int64))
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles what CIFAR batches hold (dicts, lists, strings, numpy arrays) and nothing else:
    a file that names any other function or class (which plain ``pickle.load`` would call) is
    refused."""

    _ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
                ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar")}

    def __init__(self, file, path: Path):
        super().__init__(file, encoding="latin1")
        self.path = path

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise DatasetError(f"{self.path} names {module}.{name}: CIFAR batches "
                               "hold only arrays, lists and strings, and this file is not one (not unpickled)")
        return super().find_class(module, name)


def _download(info: DatasetInfo, split: str, root: Path) -> str | None:
    """Download with torchvision into ``root``; the error text if it failed."""
    import torchvision

    try:
        getattr(torchvision.datasets, info.torchvision_class)(str(root), train=split == "train", download=True)
    except Exception as exc:  # noqa: BLE001 - reported in the not-found message
        return f"{type(exc).__name__}: {exc}"
    return None


def _no_data_dir_message(info: DatasetInfo, split: str, root: Path, from_environment: bool = False) -> str:
    """The error for an explicit ``data_dir`` (or ``$LIPNET_DATA_DIR``) that is not a folder:
    searching the other folders instead would silently read another copy (a system-wide one)
    than the one asked for."""
    state = "is not a folder" if root.exists() else "does not exist"
    if from_environment:
        return (f"{info.name} ({split} split) not found: $LIPNET_DATA_DIR is {root.absolute()}, which {state}. Set "
                f"it to the folder that holds {info.name}, or unset it to search the default folders (or pass "
                "--data-dir); or pass --download to fetch it into that folder.")
    return (f"{info.name} ({split} split) not found: the data folder {root.absolute()} {state}. Point --data-dir at "
            f"the folder that holds {info.name}, or leave it out to search the default folders; or pass --download "
            "to fetch it into that folder.")


def _not_found_message(info: DatasetInfo, split: str, folders: list[Path], download_error: str | None = None) -> str:
    looked = "\n".join(f"  - {folder.absolute()}" for folder in folders)
    idx = " + ".join(_IDX_FILES[split]) if info.name not in _CIFAR_FILES else None
    formats = [f"{split}.npz or {split}-K-of-M.npz (arrays x: uint8 NHWC, y: labels)"]
    if idx:
        formats += [f"{info.torchvision_folder}/raw/ with {idx} (.gz or not)", f"{idx} directly in the folder"]
    else:
        formats.append(f"{info.torchvision_folder}/ (torchvision's layout)")
    message = (f"{info.name} ({split} split) not found. Looked in:\n{looked}\nfor any of:\n"
               + "\n".join(f"  - {f}" for f in formats)
               + f"\nTo get it: {info.how_to_get}; or point --data-dir (or $LIPNET_DATA_DIR) at a folder that has it.")
    if download_error:
        message += f"\nThe download failed: {download_error}"
    return message
