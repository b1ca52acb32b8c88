"""CIFAR-10 and CIFAR-100 in the pickled batches torchvision downloads (``cifar-10-batches-py/``,
``cifar-100-python/``), read by an unpickler that builds plain data only."""

from __future__ import annotations

import io
import math
import pickle
import pickletools
from pathlib import Path

import numpy as np
import torch

from lipnet.data.files import DatasetError, cannot_read, class_labels
from lipnet.data.registry import DatasetInfo

CIFAR_FILES = {
    "cifar10": {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
    "cifar100": {"train": ["train"], "test": ["test"]},
}


_CIFAR_LABEL_KEY = {"cifar10": "labels", "cifar100": "fine_labels"}


def read_cifar(info: DatasetInfo, split: str, folder: Path):
    images, labels = [], []
    key, row = _CIFAR_LABEL_KEY[info.name], math.prod(info.shape)
    for path in (folder / name for name in CIFAR_FILES[info.name][split]):
        try:
            with open(path, "rb") as f:
                data = f.read()
            # The unpickler allocates the length a string's header claims before reading it: the
            # lengths are checked against the file first (without running anything).
            for _ in pickletools.genops(data):
                pass
            batch = _CifarUnpickler(io.BytesIO(data), path).load()  # the format torchvision downloads and reads
        except DatasetError:
            raise
        except Exception as exc:  # noqa: BLE001 - truncated pickles fail in many ways
            raise cannot_read(path, exc) from exc
        if not (isinstance(batch, dict) and "data" in batch and key in batch):
            raise DatasetError(f"{path} is not a CIFAR batch (a dict with 'data' and {key!r})")
        try:
            pixels, y = np.asarray(batch["data"]), np.asarray(batch[key])
        except ValueError as exc:  # lists of uneven lengths
            raise DatasetError(f"{path}: 'data' and {key!r} must be arrays or lists of numbers ({exc})") from exc
        if not np.issubdtype(pixels.dtype, np.integer):  # floats in [0, 1] would all become 0 in uint8
            raise DatasetError(f"{path}: 'data' must hold integer pixel values in [0, 255], got {pixels.dtype}")
        if pixels.ndim != 2 or pixels.shape[1] != row:  # (N, 32, 32, 3) reshaped to (N, 3, 32, 32) would scramble
            raise DatasetError(f"{path}: 'data' must be rows of {row} channel-major pixels (N, {row}), as torchvision "
                               f"downloads them, got shape {pixels.shape}; store other layouts as {split}.npz")
        if pixels.size and (pixels.min() < 0 or pixels.max() > 255):
            raise DatasetError(f"{path}: pixel values must lie in [0, 255], got [{pixels.min()}, {pixels.max()}]")
        if y.shape != (len(pixels),):
            raise DatasetError(f"{path}: {key!r} must hold one label per row of 'data' ({len(pixels)}), got shape "
                               f"{y.shape}")
        images.append(pixels.astype(np.uint8).reshape(-1, *info.shape))
        labels.append(class_labels(y, info, f"{path}: {key!r}"))
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
