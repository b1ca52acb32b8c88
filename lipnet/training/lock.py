"""One run per output folder: a lock file that a second run into the same folder sees.

Two runs writing into one ``out_dir`` would overwrite each other's checkpoints, metrics and
report, each believing it owns the folder. :class:`FolderLock` creates ``.lock`` by a hard
link (atomic, and never without its content), holding the owner's host name and process id; a
lock whose process no longer exists on this host is stale (a killed run) and is taken over.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

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
        self.taken_over: str | None = None  # the stale owner replaced, if any

    def acquire(self) -> "FolderLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = f"{socket.gethostname()} {os.getpid()}"
        for _ in range(2):
            # Written under another name, then linked: the lock never exists without its owner.
            tmp = self.path.with_name(f"{LOCK}.{os.getpid()}.tmp")
            tmp.write_text(me)
            try:
                os.link(tmp, self.path)
            except FileExistsError:
                owner = _read(self.path)
                if _alive(owner):
                    raise FolderInUseError(
                        f"{self.path.parent} is in use by another run (host and process {owner!r}, lock file "
                        f"{self.path}): wait for it or choose another --out-dir. If no such run exists, delete the "
                        "lock file.") from None
                self.taken_over = owner
                self.path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            finally:
                tmp.unlink(missing_ok=True)
            return self
        raise FolderInUseError(f"could not take the lock {self.path}: another run keeps taking it")

    def release(self) -> None:
        if _read(self.path) == f"{socket.gethostname()} {os.getpid()}":
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _alive(owner: str) -> bool:
    """Whether the lock's owner ``"host pid"`` may still run: a process of another host is
    assumed alive (it cannot be checked from here); one of this host is checked."""
    host, _, pid = owner.rpartition(" ")
    if not pid.isdigit():
        return False  # an empty or garbled lock: a run killed while writing it
    if host != socket.gethostname():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    return True
