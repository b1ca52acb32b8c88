"""Data sets stored as IDX files (MNIST, Fashion-MNIST): torchvision's ``raw/`` folder or the
four files directly in a folder (as Debian's ``dataset-fashion-mnist`` installs them), gzip
compressed or not."""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from lipnet.data.files import DatasetError, cannot_read, class_labels, is_data_file
from lipnet.data.registry import DatasetInfo

IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def idx_path(folder: Path, stem: str) -> Path | None:
    for path in (folder / f"{stem}.gz", folder / stem):
        if is_data_file(path):
            return path
    return None


def read_idx_pair(info: DatasetInfo, split: str, folder: Path):
    image_file, label_file = (idx_path(folder, stem) for stem in IDX_FILES[split])
    images = read_idx(image_file)
    labels = read_idx(label_file)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DatasetError(f"IDX files in {folder} do not match: images {images.shape}, labels {labels.shape}")
    if (1, *images.shape[1:]) != info.shape:
        raise DatasetError(f"{image_file}: {info.name} images have shape {info.shape}, got {(1, *images.shape[1:])}: "
                           "is this file another data set?")
    return torch.from_numpy(images)[:, None], torch.from_numpy(class_labels(labels, info, str(label_file)))


_READ_CHUNK = 1 << 20


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file of unsigned bytes (gzip-compressed if its name ends in ``.gz``).

    Reads at most the bytes its header announces, plus one (to tell a file that is too long):
    neither a header announcing more than the file holds nor a file inflating to gigabytes
    takes more memory than the data read.
    """
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            magic = f.read(4)
            if len(magic) < 4 or magic[:3] != b"\0\0\x08":
                gzipped = " (it is gzip-compressed: add .gz to its name)" if magic[:2] == b"\x1f\x8b" else ""
                raise DatasetError(f"{path} is not an IDX file of unsigned bytes (bad magic number){gzipped}")
            ndim = magic[3]
            header = f.read(4 * ndim)
            if len(header) < 4 * ndim:
                raise DatasetError(f"{path} is truncated: its header announces {ndim} dimensions, the file ends after "
                                   f"{4 + len(header)} bytes. Get it again.")
            dims = struct.unpack(f">{ndim}I", header)
            expected = math.prod(dims)
            data = bytearray()
            while len(data) <= expected:
                chunk = f.read(min(_READ_CHUNK, expected + 1 - len(data)))
                if not chunk:
                    break
                data += chunk
    except DatasetError:
        raise
    except (OSError, EOFError, zlib.error) as exc:
        raise cannot_read(path, exc) from exc
    if len(data) != expected:
        state = "truncated" if len(data) < expected else "longer than its header says"
        raise DatasetError(f"{path} is {state}: its header gives dimensions {dims} ({expected} values), it holds "
                           f"{len(data)}{'' if len(data) < expected else ' or more'}. Get it again.")
    return np.frombuffer(data, dtype=np.uint8).reshape(dims)
