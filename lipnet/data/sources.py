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

import errno
import gzip
import hashlib
import io
import math
import os
import pickle
import pickletools
import re
import stat
import struct
import warnings
import zipfile
import zlib
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
        raise _cannot_read(f"{info.name} {split} from {path}", exc) from exc
    source = ", ".join(map(str, path)) if isinstance(path, list) else str(path)
    if len(labels) == 0:  # a run would train on nothing and report an accuracy of nothing
        raise DatasetError(f"{source} holds no {split} examples of {info.name}: was it cut short? Get it again "
                           f"({info.how_to_get}).")
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
        if all(_is_data_file(tv / f) for f in _CIFAR_FILES[info.name][split]):
            return _read_cifar, tv
    else:
        for candidate in (tv / "raw", folder):
            if all(_idx_path(candidate, f) is not None for f in _IDX_FILES[split]):
                return _read_idx_pair, candidate
    return None


def _npz_files(folder: Path, split: str) -> list[Path] | None:
    single = folder / f"{split}.npz"
    candidates = sorted(folder.glob(f"{split}-*-of-*.npz")) if folder.is_dir() else []
    if _is_data_file(single):
        if candidates:
            raise DatasetError(f"{folder} holds both {single.name} and shards ({candidates[0].name}, ...): keep one "
                               "layout, so that it is clear which data is used")
        return [single]
    shards = {}
    for path in candidates:
        match = re.fullmatch(rf"{split}-([1-9]\d*)-of-([1-9]\d*)\.npz", path.name)
        if not match or int(match[1]) > int(match[2]):
            raise DatasetError(f"{path}: shard names are {split}-K-of-M.npz with 1 <= K <= M (no leading zeros)")
        _is_data_file(path)
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


def _is_data_file(path: Path) -> bool:
    """Whether ``path`` is a regular file (through links); ``False`` when nothing is there. Anything
    else at a data file's name (a folder, a broken or looping link) is an error: skipping it would
    silently read another copy of the data set, from a folder searched later."""
    try:
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        if not path.is_symlink():
            return False
        raise DatasetError(f"{path} is a symbolic link to {os.readlink(path)}, which does not exist: fix the link "
                           "or remove it") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise DatasetError(f"{path} is a symbolic link that leads back to itself (a loop): fix the link or "
                               "remove it") from None
        raise _cannot_read(path, exc) from exc  # a folder on the way that may not be searched
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "not a regular file"
        raise DatasetError(f"{path} is {kind}, where a data file of that name belongs: move it away, or put the "
                           "data file there")
    return True


def _cannot_read(what, exc: BaseException) -> DatasetError:
    """The error for a data file that could not be read. A refusal by the system (permissions,
    an I/O error) says so: getting a file that may be intact again would not help."""
    reason = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, PermissionError):
        return DatasetError(f"cannot read {what}: permission denied ({reason}); make it readable (chmod) or copy it "
                            "to a folder of your own")
    if isinstance(exc, OSError) and exc.errno == errno.EIO:
        return DatasetError(f"cannot read {what}: the disk reported an I/O error ({reason}); check the disk, or copy "
                            "the data set to another one")
    return DatasetError(f"cannot read {what}: {reason}. The file is probably truncated or corrupt: get it again.")


def _class_labels(y: np.ndarray, info: DatasetInfo, where: str) -> np.ndarray:
    """``y`` as int64 class labels, checked before the cast (which would round 0.9 to class 0 and
    wrap huge unsigned values around to small ones)."""
    if y.size and not np.issubdtype(y.dtype, np.integer):  # bool is not np.integer either
        raise DatasetError(f"{where} must hold integer class labels, got {y.dtype}")
    if y.size and (y.min() < 0 or y.max() >= info.num_classes):
        raise DatasetError(f"{where}: {info.name} labels must lie in [0, {info.num_classes}), got [{y.min()}, "
                           f"{y.max()}]: is this file another data set, or damaged?")
    return y.astype(np.int64)


def _read_npz(info: DatasetInfo, split: str, paths: list[Path]):
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
        y = _class_labels(y.reshape(-1), info, f"{path}: 'y'")
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
        raise _cannot_read(path, exc) from exc


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


def _idx_path(folder: Path, stem: str) -> Path | None:
    for path in (folder / f"{stem}.gz", folder / stem):
        if _is_data_file(path):
            return path
    return None


def _read_idx_pair(info: DatasetInfo, split: str, folder: Path):
    image_file, label_file = (_idx_path(folder, stem) for stem in _IDX_FILES[split])
    images = read_idx(image_file)
    labels = read_idx(label_file)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DatasetError(f"IDX files in {folder} do not match: images {images.shape}, labels {labels.shape}")
    if (1, *images.shape[1:]) != info.shape:
        raise DatasetError(f"{image_file}: {info.name} images have shape {info.shape}, got {(1, *images.shape[1:])}: "
                           "is this file another data set?")
    return torch.from_numpy(images)[:, None], torch.from_numpy(_class_labels(labels, info, str(label_file)))


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
        raise _cannot_read(path, exc) from exc
    if len(data) != expected:
        state = "truncated" if len(data) < expected else "longer than its header says"
        raise DatasetError(f"{path} is {state}: its header gives dimensions {dims} ({expected} values), it holds "
                           f"{len(data)}{'' if len(data) < expected else ' or more'}. Get it again.")
    return np.frombuffer(data, dtype=np.uint8).reshape(dims)


def _read_cifar(info: DatasetInfo, split: str, folder: Path):
    images, labels = [], []
    key, row = _CIFAR_LABEL_KEY[info.name], math.prod(info.shape)
    for path in (folder / name for name in _CIFAR_FILES[info.name][split]):
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
            raise _cannot_read(path, exc) from exc
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
        labels.append(_class_labels(y, info, f"{path}: {key!r}"))
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
