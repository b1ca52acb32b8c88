"""One run per output folder: an operating-system lock that a second run into the folder sees.

Two runs writing into one ``out_dir`` would overwrite each other's checkpoints, metrics and
report, each believing it owns the folder. :class:`FolderLock` holds an exclusive
``fcntl.flock`` on ``folder/.lock`` for as long as the run lives. The system releases it
when the process ends, however it ends, so a killed run never leaves a lock behind (no
stale-lock guessing from host names and process ids); the file holds the owner's host and
process id for the message a second run gets, and is removed on release. Where ``fcntl`` is
missing (Windows) nothing is locked, nor (with a warning) on a file system without locks.
"""

from __future__ import annotations

import errno
import os
import socket
import warnings
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None

LOCK = ".lock"
# flock's errors on file systems without locks (some network mounts), not held locks.
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS}


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
        self.path = Path(folder).absolute() / LOCK  # a chdir during the run must not change it
        self._fd: int | None = None

    def acquire(self) -> "FolderLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if fcntl is None:
            return self
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                if not self._lock(fd):
                    os.close(fd)
                    return self
                # The holder before us may have removed the file after we opened it: then our lock
                # is on a file nobody else will open, so take the lock again on the current one.
                if _is_file_of(self.path, fd):
                    os.ftruncate(fd, 0)
                    os.write(fd, f"host {socket.gethostname()}, process {os.getpid()}".encode())
                    self._fd = fd
                    return self
            except BaseException:  # an error or Ctrl-C: never keep a lock nobody will release
                os.close(fd)
                raise
            os.close(fd)

    def _lock(self, fd: int) -> bool:
        """Lock ``fd``: True when locked, False where the file system has no locks (a warning)."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise FolderInUseError(
                    f"{self.path.parent} is in use by another run ({_read(self.path) or 'owner unknown'}, lock "
                    f"file {self.path}): wait for it to finish or choose another --out-dir") from None
            if error.errno in _NO_LOCKS:
                warnings.warn(f"{self.path.parent} is not locked: its file system has no locks ({error.strerror}); "
                              "make sure no other run writes into it", stacklevel=3)
                return False
            raise
        return True

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            # While still locked: a waiting opener re-checks the inode. Only our own file: the
            # folder may have been renamed and the name taken by another run. A file left behind
            # (a read-only folder) is harmless, as no lock is ever guessed from a file.
            if _is_file_of(self.path, self._fd):
                self.path.unlink()
        except OSError:
            pass
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


def _is_file_of(path: Path, fd: int) -> bool:
    """Whether ``path`` names the file open as ``fd`` (not a file created since under its name)."""
    try:
        return os.path.samestat(os.stat(path), os.fstat(fd))
    except FileNotFoundError:
        return False
