"""Mutation-testing follow-ups for lipnet.training.lock: what the lock file says, and which
flock errors mean "in use"."""

import errno
import os
import socket

import pytest

from lipnet.training import lock
from lipnet.training.lock import FolderInUseError, FolderLock


def test_the_lock_file_names_only_the_current_owner(tmp_path):
    """A longer text left by a killed run is replaced, not overwritten in part."""
    (tmp_path / ".lock").write_text("host a-very-long-host-name-of-a-killed-run, process 123456789 and more")
    with FolderLock(tmp_path) as held:
        assert held.path.read_text() == f"host {socket.gethostname()}, process {os.getpid()}"


def test_eacces_from_flock_means_the_folder_is_in_use(tmp_path, monkeypatch):
    """Some systems report a held lock as EACCES (POSIX allows it) rather than EWOULDBLOCK."""
    def held(fd, operation):
        raise OSError(errno.EACCES, "Permission denied")

    (tmp_path / ".lock").write_text("host h, process 7")
    monkeypatch.setattr(lock.fcntl, "flock", held)
    with pytest.raises(FolderInUseError, match=r"in use by another run \(host h, process 7, lock file"):
        FolderLock(tmp_path).acquire()


def test_the_lock_is_exclusive_within_one_process_too(tmp_path):
    """A second FolderLock of the same folder (another open file) is refused while the first is held."""
    with FolderLock(tmp_path):
        with pytest.raises(FolderInUseError):
            FolderLock(tmp_path).acquire()


def test_a_lock_taken_on_a_file_its_holder_just_removed_is_taken_again_on_the_current_file(tmp_path, monkeypatch):
    """The holder's release unlinks .lock between our open and our flock: our lock is then on a
    file nobody else opens, so acquire retries on the file now at the path; a third run is refused."""
    original, calls = lock.fcntl.flock, []

    def released_meanwhile(fd, operation):
        if not calls:
            (tmp_path / ".lock").unlink()  # what the previous holder's release does
        calls.append(fd)
        return original(fd, operation)

    monkeypatch.setattr(lock.fcntl, "flock", released_meanwhile)
    held = FolderLock(tmp_path).acquire()
    monkeypatch.undo()
    assert len(calls) == 2 and lock._is_file_of(held.path, held._fd)
    with pytest.raises(FolderInUseError):
        FolderLock(tmp_path).acquire()
    held.release()
