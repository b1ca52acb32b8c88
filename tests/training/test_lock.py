"""One run per folder (lipnet.training.lock): exactly one of several racing processes gets the lock."""

import subprocess
import sys

from lipnet.training import lock
from lipnet.training.lock import FolderLock

_CONTENDER = r"""
import importlib.util, sys, time
# The module alone, not the package (whose import of torch would take most of the test).
spec = importlib.util.spec_from_file_location("lock", sys.argv[2])
lock_module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lock_module)
FolderLock, FolderInUseError = lock_module.FolderLock, lock_module.FolderInUseError
print("ready", flush=True)
start = float(sys.stdin.readline())  # the same instant for every contender, once all are ready
while time.time() < start:
    pass
try:
    lock = FolderLock(sys.argv[1]).acquire()
except FolderInUseError:
    print("refused", flush=True)
else:
    print("owner", flush=True)
    sys.stdin.read()  # hold the lock until every contender has tried
    lock.release()
"""


def test_exactly_one_of_racing_processes_owns_the_folder(tmp_path):
    import time

    for trial in range(2):
        folder = tmp_path / f"run{trial}"
        if trial == 1:  # a lock file left by a killed run: no process holds it
            folder.mkdir()
            (folder / ".lock").write_text("host gone, process 1")
        racers = [subprocess.Popen([sys.executable, "-c", _CONTENDER, str(folder), lock.__file__],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(4)]
        assert [p.stdout.readline().strip() for p in racers] == ["ready"] * 4
        start = time.time() + 0.2
        for p in racers:
            p.stdin.write(f"{start}\n")
            p.stdin.flush()
        outcomes = sorted(p.stdout.readline().strip() for p in racers)
        for p in racers:
            p.communicate("", timeout=60)
        assert outcomes == ["owner", "refused", "refused", "refused"], outcomes
        assert not (folder / ".lock").exists()


def test_a_released_lock_can_be_taken_again(tmp_path):
    with FolderLock(tmp_path):
        pass
    with FolderLock(tmp_path) as lock:
        assert "process" in lock.path.read_text()
