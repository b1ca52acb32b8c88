"""One run per output folder: an operating-system lock that a second run into the folder sees.

Two runs writing into one ``out_dir`` would overwrite each other's checkpoints, metrics and
report, each believing it owns the folder. :class:`FolderLock` holds an exclusive
``fcntl.flock`` on ``folder/.lock`` for as long as the run lives. The system releases it
when the process ends, however it ends, so a killed run never leaves a lock behind (no
stale-lock guessing from host names and process ids); the file holds the owner's host and
process id for the message a second run gets, and is removed on release. Where ``fcntl`` is
missing (Windows) nothing is locked.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None

LOCK = ".lock"


class FolderInUseError(FileExistsError):
    """Another live run holds the folder's lock."""


class FolderLock:
    """Context manager holding ``folder/.lock`` (the folder is created if needed).

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder, FolderLock(folder):
        ...     try:
        ...         FolderLock(folder).acquire()
        ...     except FolderInUseError as error:
        ...         print("refused")
        refused
    """

    def __init__(self, folder: str | os.PathLike):
        self.path = Path(folder) / LOCK
        self._fd: int | None = None

    def acquire(self) -> "FolderLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if fcntl is None:
            return self
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise FolderInUseError(
                    f"{self.path.parent} is in use by another run ({_read(self.path) or 'owner unknown'}, lock file "
                    f"{self.path}): wait for it to finish or choose another --out-dir") from None
            # The holder before us may have removed the file after we opened it: then our lock is
            # on a file nobody else will open, so take the lock again on the current one.
            try:
                current = os.stat(self.path).st_ino
            except FileNotFoundError:
                current = None
            if current == os.fstat(fd).st_ino:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"host {socket.gethostname()}, process {os.getpid()}".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still locked: a waiting opener re-checks the inode
        finally:
            os.close(self._fd)  # releases the lock
            self._fd = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""
