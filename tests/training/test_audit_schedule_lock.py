"""Audit of lipnet.training.schedule and lipnet.training.lock: edge cases a user hits."""

import errno
import pathlib

import pytest
import torch

from lipnet.training import lock
from lipnet.training.lock import FolderInUseError, FolderLock
from lipnet.training.schedule import lr_factor, make_scheduler


def test_an_unknown_schedule_shape_is_refused_at_once_not_when_the_warmup_ends():
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_factor(0, 100, 10, "cosin")
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    with pytest.raises(ValueError, match="unknown schedule"):
        make_scheduler(optimizer, 100, 10, "cosin")


@pytest.mark.parametrize("total_steps, warmup_steps", [(10, -2), (-1, 0)])
def test_negative_step_counts_are_refused_rather_than_starting_mid_decay(total_steps, warmup_steps):
    with pytest.raises(ValueError, match=">= 0"):
        lr_factor(0, total_steps, warmup_steps)


def test_a_warmup_longer_than_the_run_is_refused_rather_than_never_decaying():
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    with pytest.raises(ValueError, match="never decay"):
        make_scheduler(optimizer, 10, 20)


@pytest.mark.parametrize("shape", ["cosine", "linear", "constant"])
def test_the_schedule_edges_and_a_resume_mid_schedule(shape):
    assert lr_factor(0, 1, 0, shape) == 1.0  # one step in all: at the peak
    assert [lr_factor(s, 6, 3, shape) for s in range(3)] == [1 / 3, 2 / 3, 1.0]
    assert lr_factor(6, 6, 3, shape) == (1.0 if shape == "constant" else 0.0)
    assert lr_factor(5, 6, 3, shape) > 0  # the last step still learns

    def run(steps, states=None):
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.5)
        scheduler = make_scheduler(optimizer, 20, 4, shape)
        if states is not None:  # a resume: both state dicts, as a checkpoint holds them
            optimizer.load_state_dict(states[0])
            scheduler.load_state_dict(states[1])
        rates = []
        for _ in range(steps):
            rates.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return rates, (optimizer.state_dict(), scheduler.state_dict())

    full, _ = run(20)
    first, states = run(7)
    resumed, _ = run(13, states)
    assert first + resumed == full


def _no_locks(fd, operation):
    raise OSError(errno.ENOLCK, "No locks available")


def test_a_file_system_without_locks_is_not_reported_as_a_folder_in_use(tmp_path, monkeypatch):
    """flock on some network mounts fails with ENOLCK/EOPNOTSUPP: no other run holds anything,
    so the run goes on unlocked (as where fcntl is missing) with a warning, not 'in use by
    another run'."""
    monkeypatch.setattr(lock.fcntl, "flock", _no_locks)
    with pytest.warns(UserWarning, match="not locked"):
        with FolderLock(tmp_path):
            pass


def test_an_interrupt_inside_acquire_leaves_the_folder_unlocked(tmp_path, monkeypatch):
    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(lock.socket, "gethostname", interrupted)
    with pytest.raises(KeyboardInterrupt):
        with FolderLock(tmp_path):
            pass
    monkeypatch.undo()
    with FolderLock(tmp_path):  # the same process (a notebook, a sweep) can take it again
        pass


def test_a_failed_unlink_on_release_neither_masks_the_error_nor_keeps_the_lock(tmp_path, monkeypatch):
    def read_only(self, missing_ok=False):
        raise PermissionError(errno.EROFS, "Read-only file system", str(self))

    with pytest.raises(FloatingPointError, match="diverged"):
        with FolderLock(tmp_path):
            monkeypatch.setattr(pathlib.Path, "unlink", read_only)
            raise FloatingPointError("training diverged")
    monkeypatch.undo()
    with FolderLock(tmp_path):  # the lock itself was released
        with pytest.raises(FolderInUseError):
            FolderLock(tmp_path).acquire()


def test_release_never_removes_the_lock_file_of_another_run(tmp_path, monkeypatch):
    """The folder renamed (mv run run-old) while its run lives, a new run into the name: the
    old run's release must not delete the new run's lock file, or a third run gets in too."""
    folder = tmp_path / "run"
    old = FolderLock(folder).acquire()
    folder.rename(tmp_path / "run-old")
    new = FolderLock(folder).acquire()
    old.release()
    with pytest.raises(FolderInUseError):
        FolderLock(folder).acquire()
    new.release()


def test_a_relative_folder_is_released_where_it_was_locked(tmp_path, monkeypatch):
    """A chdir during the run (a notebook): release must not touch ``run/.lock`` of the new
    working directory, which another live run may hold."""
    monkeypatch.chdir(tmp_path)
    held = FolderLock("run").acquire()
    other = FolderLock(tmp_path / "elsewhere" / "run").acquire()
    monkeypatch.chdir(tmp_path / "elsewhere")
    held.release()
    with pytest.raises(FolderInUseError):
        FolderLock(tmp_path / "elsewhere" / "run").acquire()
    other.release()
    assert not (tmp_path / "run" / ".lock").exists()
