"""What every on-disk format of a data set shares: its two errors, the check that a data file's
name holds a regular file, the error of a file that cannot be read, and labels checked before
their cast."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import numpy as np

from lipnet.data.registry import DatasetInfo


class DatasetError(RuntimeError, ValueError):
    """A data set file exists but cannot be read (truncated, corrupt, wrong shape, labels out of
    range). Also a ``ValueError``, which :class:`~lipnet.data.ImageDataset` raises for the same
    problems in tensors built by hand."""


class DatasetNotFoundError(FileNotFoundError):
    """No copy of the data set was found in any of the folders searched."""


def is_data_file(path: Path) -> bool:
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
        raise cannot_read(path, exc) from exc  # a folder on the way that may not be searched
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "not a regular file"
        raise DatasetError(f"{path} is {kind}, where a data file of that name belongs: move it away, or put the "
                           "data file there")
    return True


def cannot_read(what, exc: BaseException) -> DatasetError:
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


def class_labels(y: np.ndarray, info: DatasetInfo, where: str) -> np.ndarray:
    """``y`` as int64 class labels, checked before the cast (which would round 0.9 to class 0 and
    wrap huge unsigned values around to small ones)."""
    if y.size and not np.issubdtype(y.dtype, np.integer):  # bool is not np.integer either
        raise DatasetError(f"{where} must hold integer class labels, got {y.dtype}")
    if y.size and (y.min() < 0 or y.max() >= info.num_classes):
        raise DatasetError(f"{where}: {info.name} labels must lie in [0, {info.num_classes}), got [{y.min()}, "
                           f"{y.max()}]: is this file another data set, or damaged?")
    return y.astype(np.int64)
