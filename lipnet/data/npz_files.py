"""Data sets stored as ``.npz`` arrays: ``{split}.npz`` or shards ``{split}-1-of-3.npz`` ... with
keys ``x`` (uint8 ``NHWC`` or ``NHW`` images) and ``y`` (integer labels), as
:func:`lipnet.data.write_npz` writes them and ``../shared/data/cifar10/`` stores CIFAR-10.
Every record is checked before numpy reads it: no Python objects, and no header claiming more
than the file holds."""

from __future__ import annotations

import hashlib
import math
import os
import re
import zipfile
from pathlib import Path

import numpy as np
import torch

from lipnet.data.files import DatasetError, cannot_read, class_labels, is_data_file
from lipnet.data.registry import DatasetInfo


def npz_files(folder: Path, split: str) -> list[Path] | None:
    single = folder / f"{split}.npz"
    candidates = sorted(folder.glob(f"{split}-*-of-*.npz")) if folder.is_dir() else []
    if is_data_file(single):
        if candidates:
            raise DatasetError(f"{folder} holds both {single.name} and shards ({candidates[0].name}, ...): keep one "
                               "layout, so that it is clear which data is used")
        return [single]
    shards = {}
    for path in candidates:
        match = re.fullmatch(rf"{split}-([1-9]\d*)-of-([1-9]\d*)\.npz", path.name)
        if not match or int(match[1]) > int(match[2]):
            raise DatasetError(f"{path}: shard names are {split}-K-of-M.npz with 1 <= K <= M (no leading zeros)")
        is_data_file(path)
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


def read_npz(info: DatasetInfo, split: str, paths: list[Path]):
    images, labels, digests = [], [], {}
    for path in paths:
        x, y = _npz_arrays(path)
        if x.dtype != np.uint8:
            hint = ("; store floats in [0, 1] as (x * 255).round().astype(np.uint8)"
                    if np.issubdtype(x.dtype, np.floating) else "")
            raise DatasetError(f"{path}: 'x' must be uint8 pixels in [0, 255], got {x.dtype}{hint}")
        if x.ndim == 3:
            x = x[..., None]
        if x.ndim != 4 or y.ndim == 0 or len(x) != len(y):
            raise DatasetError(f"{path}: expected 'x' (N, H, W, C) and 'y' (N,), got {x.shape} and {y.shape}")
        channels, height, width = info.shape
        if x.shape[1:] != (height, width, channels):
            nchw = x.shape[1:] == (channels, height, width)
            raise DatasetError(f"{path}: {info.name} images are {height}x{width}x{channels} (HWC), got "
                               f"{'x'.join(map(str, x.shape[1:]))}"
                               + (" (channels first: store x.transpose(0, 2, 3, 1))" if nchw else
                                  ": is this file another data set?"))
        if y.size != len(y):
            raise DatasetError(f"{path}: 'y' must hold one class label per image (shape (N,)), got {y.shape}; "
                               "one-hot labels? store their argmax")
        y = class_labels(y.reshape(-1), info, f"{path}: 'y'")
        if len(paths) > 1 and len(x):
            digest = hashlib.sha256(np.ascontiguousarray(x)).digest()
            if digest in digests:
                raise DatasetError(f"{path} holds the same images as {digests[digest]}: a shard copied under another "
                                   "name? Its examples would count twice: get the shards again")
            digests[digest] = path
        images.append(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))))
        labels.append(torch.from_numpy(y))
    return torch.cat(images), torch.cat(labels)


# The most a record of each kind can expand (deflate: 258 bytes from 2 bits); bzip2 and lzma have no
# useful bound.
_MAX_RATIO = {zipfile.ZIP_STORED: 1, zipfile.ZIP_DEFLATED: 1032}


def _npz_arrays(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``x`` and ``y`` of an ``.npz`` file, each record checked first (:func:`_check_npy_record`)."""
    try:
        with open(path, "rb") as file:
            if file.read(6) == b"\x93NUMPY":
                raise DatasetError(f"{path} is a single .npy array, not an .npz archive: save both arrays with "
                                   "np.savez(path, x=images, y=labels)")
            file.seek(0)
            with zipfile.ZipFile(file) as archive:
                names = archive.namelist()
                if "x.npy" not in names or "y.npy" not in names:
                    raise DatasetError(f"{path} must hold arrays 'x' (uint8 NHWC images) and 'y' (labels), "
                                       f"found records {sorted(names)}")
                for key in ("x", "y"):
                    _check_npy_record(path, archive, key, os.fstat(file.fileno()).st_size)
            file.seek(0)
            with np.load(file, allow_pickle=False) as arrays:
                return arrays["x"], arrays["y"]
    except DatasetError:
        raise
    except Exception as exc:  # noqa: BLE001 - a damaged archive fails in zipfile, zlib or numpy
        raise cannot_read(path, exc) from exc


def _check_npy_record(path: Path, archive: zipfile.ZipFile, key: str, file_size: int) -> None:
    """Refuse the array ``key`` when it holds Python objects (only unpickling reads them), or when
    its header claims more bytes than its record holds: numpy allocates what the header claims
    before it reads."""
    record = archive.getinfo(f"{key}.npy")
    ratio = _MAX_RATIO.get(record.compress_type)
    if record.compress_size > file_size or (ratio and record.file_size > max(record.compress_size, 1) * ratio):
        raise DatasetError(f"{path} is truncated or corrupt: its record of {key!r} claims {record.file_size} bytes "
                           f"from {record.compress_size} stored, in a file of {file_size}. Get it again.")
    with archive.open(record) as member:
        version = np.lib.format.read_magic(member)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, _, dtype = read_header(member)
        header = member.tell()
    if dtype.hasobject:
        raise DatasetError(f"{path}: its array {key!r} holds Python objects ({dtype}), which are never unpickled: "
                           "store 'x' as uint8 and 'y' as integers")
    needed = math.prod(shape) * dtype.itemsize
    if needed > record.file_size - header:
        raise DatasetError(f"{path} is truncated or corrupt: its array {key!r} of shape {shape} needs {needed} bytes, "
                           f"its record holds {record.file_size - header}. Get it again.")
