"""benchmarks/gpu_check.sh, run here as the device runs it (a fake nvidia-smi, no GPU): staging
a tiny WebP pack in two calls, the checks that stop a call before it wastes device time, and
the cifar10 step on the second half of the data alone (the machine went back between calls).

The device session has no time to find a broken script: whatever these tests catch is a call
saved there."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lipnet.data.sources import load_dataset
from lipnet.data.synthetic import synthetic_dataset, write_npz

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
#: A device call carries at most 64 MiB: the working tree, one WebP folder (53.3 MB, .data/w1)
#: and .data/site (0.13 MB). The tracked files must leave room for both, and for untracked ones.
TRACKED_LIMIT_MB = 10

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or sys.platform == "win32", reason="needs bash")


@pytest.fixture
def device_like(tmp_path):
    """Environment of a device call: ``python3`` is this interpreter, ``nvidia-smi`` a fake,
    and $OUT, $RUNS, $DATA_DIR fresh folders."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, script in (("python3", f'exec "{sys.executable}" "$@"'),  # a link would lose the venv
                         ("nvidia-smi", "echo 'FAKE H200, 143771 MiB, 580.159.04'")):
        (bin_dir / name).write_text(f"#!/bin/sh\n{script}\n")
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "STAGE", "TRAIN_ARGS", "AUDIT_ARGS")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", OUT=str(tmp_path / "out"),
               RUNS=str(tmp_path / "runs"), DATA_DIR=str(tmp_path / "cifar10"), OMP_NUM_THREADS="1")
    return env


def run(env, *steps, cwd=REPO, **extra):
    return subprocess.run(["bash", str(SCRIPT), *steps], cwd=cwd, env={**env, **extra}, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture
def packs(tmp_path, pack_module):
    """A tiny CIFAR-10 (10 training images, 3 test) packed as the two WebP folders."""
    train = synthetic_dataset("cifar10", 10, split="train")
    test = synthetic_dataset("cifar10", 3, split="test", seed=1)
    write_npz(train, tmp_path / "src" / "train.npz")
    write_npz(test, tmp_path / "src" / "test.npz")
    pack_module.pack_webp(tmp_path / "src", tmp_path / "packs", splits=((0, 6), (6, 10)))
    return tmp_path / "packs", train, test


def test_two_stage_calls_put_the_original_data_set_together(device_like, packs):
    folder, train, test = packs
    for k in (1, 2):
        result = run(device_like, "stage", STAGE=str(folder / f"w{k}"))
        assert result.returncode == 0, result.stdout + result.stderr
    data = Path(device_like["DATA_DIR"])
    assert sorted(p.name for p in data.iterdir()) == ["test.npz", "train-1-of-2.npz", "train-2-of-2.npz"]
    for split, original in (("train", train), ("test", test)):
        back = load_dataset("cifar10", split, data_dir=data)
        assert torch.equal(back.images, original.images) and torch.equal(back.labels, original.labels)
    out = Path(device_like["OUT"])
    assert (out / "gpu.txt").read_text().startswith("FAKE H200")
    assert "stage:" in (out / "steps.txt").read_text()


def test_a_failed_stage_is_reported_and_the_other_steps_still_run(device_like, tmp_path, packs):
    """The first call's tests and benchmarks need no data: a stage that fails must not cost them."""
    (tmp_path / "empty").mkdir()
    result = run(device_like, "stage", "stage", STAGE=str(tmp_path / "empty"))
    assert result.returncode == 1 and "no shards" in result.stderr
    assert (Path(device_like["OUT"]) / "steps.txt").read_text().count("STAGE FAILED") == 2  # both ran
    folder, _, _ = packs
    damaged = folder / "w2" / "webp-test.npz"
    damaged.write_bytes(damaged.read_bytes()[:1000])
    result = run(device_like, "stage", STAGE=str(folder / "w2"))
    assert result.returncode == 1 and "STAGE FAILED" in (Path(device_like["OUT"]) / "steps.txt").read_text()


def test_a_misspelt_step_fails_before_anything_runs(device_like, packs):
    folder, _, _ = packs
    result = run(device_like, "stage", "tset", STAGE=str(folder / "w1"))
    assert result.returncode == 2 and "unknown step tset" in result.stderr
    assert not Path(device_like["DATA_DIR"]).exists()  # nothing was staged


def test_a_tree_that_cannot_import_lipnet_stops_at_once(device_like, tmp_path):
    """The working tree travels as it is: a half-done change elsewhere must not cost the call."""
    tree = tmp_path / "tree"
    (tree / "lipnet").mkdir(parents=True)
    (tree / "lipnet" / "__init__.py").write_text("from lipnet.missing import thing\n")
    result = run(device_like, "stage", cwd=tree, STAGE=str(tmp_path / "nowhere"))
    assert result.returncode == 3, result.stdout + result.stderr
    gpu = (Path(device_like["OUT"]) / "gpu.txt").read_text()
    assert "import lipnet failed" in gpu
    assert "lipnet.missing" in (Path(device_like["OUT"]) / "import-error.txt").read_text()


@pytest.mark.slow
def test_cifar10_step_trains_on_the_half_that_arrived(device_like, packs):
    """Only the second call's half staged (the first went back with its machine): the step trains
    on it, says so, certifies, and reports an audit cut off by its time limit."""
    folder, _, _ = packs
    assert run(device_like, "stage", STAGE=str(folder / "w2")).returncode == 0
    result = run(device_like, "cifar10", TRAIN_BUDGET="60", AUDIT_TIMEOUT="1",
                 TRAIN_ARGS='--model-kwargs {"width":8} --threads 1 --epochs 1 --batch-size 4 --eval-batch-size 4')
    out = Path(device_like["OUT"])
    log = (out / "cifar10.txt").read_text()
    assert result.returncode == 0 and log.startswith("PARTIAL DATA"), result.stdout + result.stderr
    assert "4 train / 3 test images" in log and "certified in" in log
    assert (out / "report.json").is_file() and (out / "metrics.jsonl").is_file()
    audit = (out / "audit.txt").read_text()
    assert "CUT OFF after 1 s" in audit or "pyautoattack is not importable" in audit
    steps = (out / "steps.txt").read_text()
    assert "recipe:" in steps and "cifar10:" in steps


def test_the_tracked_tree_leaves_room_for_the_data_of_a_device_call():
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    total = sum((REPO / name).stat().st_size for name in files.decode().split("\0")
                if name and (REPO / name).is_file() and not (REPO / name).is_symlink())
    assert total < TRACKED_LIMIT_MB * 1e6, (
        f"the tracked files take {total / 1e6:.1f} MB; a device call carries 64 MiB in all, 53.3 MB of them "
        "CIFAR-10 (see 'Taking the GPU figures' in docs/benchmarks.md)")
