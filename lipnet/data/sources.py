"""Finding and reading a data set from local files, or downloading it with torchvision.

Three on-disk formats are read, in this order, in each folder searched:

* ``.npz`` arrays (:mod:`lipnet.data.npz_files`): ``{split}.npz`` or shards
  ``{split}-1-of-3.npz`` ... with keys ``x`` (uint8, ``NHWC`` or ``NHW``) and ``y`` (integer labels);
* torchvision's layout under ``root``: ``FashionMNIST/raw/``, ``MNIST/raw/`` (gzip or plain
  IDX files, :mod:`lipnet.data.idx_files`), ``cifar-10-batches-py/``, ``cifar-100-python/``
  (pickled batches, :mod:`lipnet.data.cifar_files`);
* the four IDX files directly in the folder (as Debian's ``dataset-fashion-mnist`` installs them).

The folders searched are ``data_dir/<name>``, then ``data_dir`` (default ``$LIPNET_DATA_DIR``
or ``./data``; a ``data_dir`` given or set in the variable must exist), then the system folders
of the data set. The first folder holding the data set wins; the training log and every loaded
split name the files they came from.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from lipnet.data.cifar_files import CIFAR_FILES, read_cifar
from lipnet.data.files import DatasetError, DatasetNotFoundError, cannot_read, is_data_file
from lipnet.data.idx_files import IDX_FILES, idx_path, read_idx, read_idx_pair
from lipnet.data.npz_files import npz_files, read_npz
from lipnet.data.registry import DatasetInfo, ImageDataset, dataset_info

__all__ = ["SPLITS", "DatasetError", "DatasetNotFoundError", "default_data_dir", "load_dataset", "read_idx",
           "search_folders"]

SPLITS = ("train", "test")


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
        raise cannot_read(f"{info.name} {split} from {path}", exc) from exc
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
    _warn_if_brightness_differs(dataset)
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


#: Examples whose mean pixel :func:`_warn_if_brightness_differs` compares, and by how much it may differ.
BRIGHTNESS_EXAMPLES, BRIGHTNESS_TOLERANCE = 1000, 0.05


def _warn_if_brightness_differs(dataset: ImageDataset) -> None:
    """Warn when the mean pixel of the first 1000 examples is more than 0.05 from the data set's
    (``info.mean``, in ``[0, 1]``): files of another data set of the same shape, names and class
    count (Fashion-MNIST's, mean 0.29, read as MNIST's, 0.13)."""
    if len(dataset.labels) < BRIGHTNESS_EXAMPLES:
        return
    seen = float(dataset.images[:BRIGHTNESS_EXAMPLES].double().mean()) / 255
    expected = sum(dataset.info.mean) / len(dataset.info.mean)
    if abs(seen - expected) > BRIGHTNESS_TOLERANCE:
        warnings.warn(f"{dataset.info.name} {dataset.split} from {dataset.source}: the mean pixel of its first "
                      f"{BRIGHTNESS_EXAMPLES} examples is {seen:.3f}, {dataset.info.name}'s is {expected:.3f}: are these "
                      "the files of another data set?", stacklevel=3)


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
    shards = npz_files(folder, split)
    if shards:
        return read_npz, shards
    tv = folder / info.torchvision_folder
    if info.name in CIFAR_FILES:
        if all(is_data_file(tv / f) for f in CIFAR_FILES[info.name][split]):
            return read_cifar, tv
    else:
        for candidate in (tv / "raw", folder):
            if all(idx_path(candidate, f) is not None for f in IDX_FILES[split]):
                return read_idx_pair, candidate
    return None


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
    idx = " + ".join(IDX_FILES[split]) if info.name not in CIFAR_FILES else None
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
