"""The training loop on tiny synthetic data: it learns, it resumes exactly, it loses nothing, DDP agrees."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lipnet.checkpoint import load_checkpoint, load_model
from lipnet.data import synthetic_dataset, write_npz
from lipnet.training import CertifiedMarginLoss, TrainConfig, build_run_model, logit_margins, plan_epochs, train

TIMING = {"train_seconds", "eval_seconds", "images_per_second"}


def quiet(message):
    pass


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    write_npz(synthetic_dataset("mnist", 192, split="train", seed=0), folder / "train.npz")
    write_npz(synthetic_dataset("mnist", 40, split="test", seed=1), folder / "test.npz")
    return folder


def tiny(data_dir, out_dir, **changes):
    return TrainConfig(dataset="mnist", data_dir=str(data_dir), model="convnet",
                       model_kwargs={"widths": [4, 8], "depths": [1, 1], "dense": [16]}, epochs=3, batch_size=32,
                       lr=5e-3, warmup_epochs=0.5, crop_padding=1, train_eps=0.1, temperature=1.0,
                       eval_eps=(0.05, 0.1), out_dir=str(out_dir), progress=False, threads=1).replace(**changes)


def without_timing(history):
    return [{k: v for k, v in h.items() if k not in TIMING} for h in history]


def test_a_run_learns_and_writes_every_artifact(data_dir, tmp_path):
    result = train(tiny(data_dir, tmp_path / "run", epochs=4), log=quiet)
    out = tmp_path / "run"
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4] and history == result.history
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["test_acc"] > 0.6  # 10 classes: chance is 0.1
    model, info = load_model(out / "model.pt")
    assert info["epoch"] == 4 and info["dataset"]["name"] == "mnist" and info["config"]["epochs"] == 4
    assert info["bounds_screened_alone"] is False  # trained on the CPU, eager: bounds refined
    x = synthetic_dataset("mnist", 8, seed=5).images.float() / 255
    assert torch.equal(model(x), result.model(x))
    report = json.loads((out / "report.json").read_text())
    assert report["n"] == 40 and report["train_seconds"] > 0 and report["certify_seconds"] > 0
    certified = [c["accuracy"] for c in report["certified_accuracy"]]
    assert report["clean_accuracy"] >= certified[0] >= certified[1]
    assert sum(report["radius_histogram"]["counts"]) + report["radius_histogram"]["misclassified"] == 40
    for png in ("certified_accuracy.png", "radius_histogram.png", "training_curves.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_test_set_estimates_every_few_epochs_change_nothing_else(data_dir, tmp_path):
    every = train(tiny(data_dir, tmp_path / "every", epochs=5), log=quiet)
    sparse = train(tiny(data_dir, tmp_path / "sparse", epochs=5, eval_every=2), log=quiet)
    assert [h["test_acc"] is None for h in sparse.history] == [True, False, True, False, False]  # and the last
    for dense_record, sparse_record in zip(without_timing(every.history), without_timing(sparse.history)):
        if sparse_record["test_acc"] is None:
            assert sparse_record["test_margin_acc"] is None and sparse_record["test_images"] is None
            sparse_record = {**sparse_record, "test_acc": dense_record["test_acc"],
                             "test_margin_acc": dense_record["test_margin_acc"],
                             "test_images": dense_record["test_images"]}
        assert sparse_record == dense_record  # the estimates are monitoring only
    lines = (tmp_path / "sparse" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["test_acc"] is None
    assert (tmp_path / "sparse" / "training_curves.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="eval_every"):
        tiny(data_dir, tmp_path, eval_every=0)


def test_resume_after_an_interruption_equals_an_uninterrupted_run(data_dir, tmp_path):
    full = train(tiny(data_dir, tmp_path / "full", certify=False, flip=True), log=quiet)

    def interrupt(epoch, record):
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tiny(data_dir, tmp_path / "cut", certify=False, flip=True), on_epoch_end=interrupt, log=quiet)
    assert load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["training"]["epochs_done"] == 2
    resumed = train(tiny(data_dir, tmp_path / "cut", certify=False, flip=True, resume=True), log=quiet)

    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    opt_a = load_checkpoint(tmp_path / "full" / "checkpoint.pt")["training"]["optimizer"]["state"]
    opt_b = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["training"]["optimizer"]["state"]
    assert all(torch.equal(opt_a[i][k], opt_b[i][k]) for i in opt_a for k in opt_a[i])
    assert without_timing(full.history) == without_timing(resumed.history)


def test_checkpoints_every_few_epochs_and_after_the_last_resume_exactly(data_dir, tmp_path):
    """save_every=2 of 5 epochs: saves after epochs 2, 4 and 5; a run stopped after epoch 3 resumes
    from 2 (with another save_every: it changes nothing computed) and ends as an uninterrupted run."""
    full = train(tiny(data_dir, tmp_path / "full", certify=False, epochs=5), log=quiet)
    checkpoint = tmp_path / "cut" / "checkpoint.pt"
    saves = []

    def saved(epoch, record):
        saves.append(load_checkpoint(checkpoint)["training"]["epochs_done"] if checkpoint.exists() else None)

    def stop_after_third(epoch, record):
        saved(epoch, record)
        if epoch == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tiny(data_dir, tmp_path / "cut", certify=False, epochs=5, save_every=2), on_epoch_end=stop_after_third,
              log=quiet)
    assert saves == [None, 2, 2]
    lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]  # the metrics of the checkpoint

    saves.clear()
    resumed = train(tiny(data_dir, tmp_path / "cut", certify=False, epochs=5, save_every=3, resume=True),
                    on_epoch_end=saved, log=quiet)
    assert saves == [3, 3, 5]  # epochs 3, 4, 5: every third epoch, and the last
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert without_timing(full.history) == without_timing(resumed.history)
    lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="save_every"):
        tiny(data_dir, tmp_path, save_every=0)


def test_the_seed_makes_cpu_runs_reproducible(data_dir, tmp_path):
    runs = [train(tiny(data_dir, tmp_path / name, epochs=1, certify=False, flip=True, seed=seed), log=quiet).model
            for name, seed in (("a", 7), ("b", 7), ("c", 8))]
    a, b, c = (run.state_dict() for run in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_plan_epochs_fits_the_budget():
    assert plan_epochs(100.0, 30.0, 10.0, max_epochs=20) == 8  # 30 + 7 * 10 <= 100 < 30 + 8 * 10
    assert plan_epochs(100.0, 30.0, 10.0, max_epochs=5) == 5
    assert plan_epochs(100.0, 150.0, 10.0, max_epochs=5) == 1  # the first epoch alone is over budget
    assert plan_epochs(100.0, 30.0, 0.0, max_epochs=5) == 5
    # The test-set estimates count: every 3rd epoch and the last take 20 s more.
    # 30 + 3 * 10 + 2 * 20 (epochs 3 and 4, the last) <= 100 < 30 + 4 * 10 + 2 * 20 (epochs 3 and 5)
    assert plan_epochs(100.0, 30.0, 10.0, max_epochs=20, eval_seconds=20.0, eval_every=3) == 4
    # 60 + 2 * 10 + 20 (epoch 5, the last) <= 100 < 60 + 3 * 10 + 20 (epoch 6)
    assert plan_epochs(100.0, 60.0, 10.0, max_epochs=20, epochs_done=3, eval_seconds=20.0, eval_every=3) == 5
    assert plan_epochs(100.0, 120.0, 10.0, max_epochs=20, epochs_done=3, eval_seconds=20.0) == 3  # over: stop now
    assert plan_epochs(100.0, 30.0, 10.0, max_epochs=10 ** 12) == 8  # no loop over the epochs
    with pytest.raises(ValueError, match="time_budget"):
        tiny("data", "out", time_budget=0)


def test_a_time_budget_lowers_the_epochs_and_resume_keeps_the_plan(data_dir, tmp_path, monkeypatch):
    messages = []
    result = train(tiny(data_dir, tmp_path / "short", epochs=3, certify=False, time_budget=1e-6), log=messages.append)
    assert [h["epoch"] for h in result.history] == [1]
    assert any("1 of 3 epochs" in m for m in messages)
    assert load_checkpoint(tmp_path / "short" / "checkpoint.pt")["training"]["epochs"] == 1
    # A plan of 2 of 3 epochs, with an interruption after the first: resuming follows the plan
    # (2 epochs, the re-planned schedule) exactly as the uninterrupted run does.
    monkeypatch.setattr("lipnet.training.trainer.plan_epochs", lambda *args, **kwargs: 2)
    full = train(tiny(data_dir, tmp_path / "full", certify=False, time_budget=60), log=quiet)
    assert [h["epoch"] for h in full.history] == [1, 2] and full.history[-1]["lr"] == pytest.approx(0, abs=1e-12)

    def interrupt(epoch, record):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tiny(data_dir, tmp_path / "cut", certify=False, time_budget=60), on_epoch_end=interrupt, log=quiet)
    # The budget is checked after every epoch, but a check never raises the plan.
    monkeypatch.setattr("lipnet.training.trainer.plan_epochs", lambda *args, **kwargs: 3)
    resumed = train(tiny(data_dir, tmp_path / "cut", certify=False, time_budget=60, resume=True), log=quiet)
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert without_timing(full.history) == without_timing(resumed.history)


def test_resume_refuses_other_settings_and_runs_never_overwrite(data_dir, tmp_path):
    train(tiny(data_dir, tmp_path / "run", epochs=1, certify=False), log=quiet)
    with pytest.raises(FileExistsError, match="--resume"):
        train(tiny(data_dir, tmp_path / "run", epochs=1), log=quiet)
    with pytest.raises(ValueError, match=r"lr: 0.005 -> 0.5"):
        train(tiny(data_dir, tmp_path / "run", epochs=1, lr=0.5, resume=True), log=quiet)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(tiny(data_dir, tmp_path / "empty", resume=True), log=quiet)
    # Without its checkpoint (deleted to save space), the run's model and metrics still are not overwritten.
    (tmp_path / "run" / "checkpoint.pt").unlink()
    model = (tmp_path / "run" / "model.pt").read_bytes()
    with pytest.raises(FileExistsError, match="model.pt"):
        train(tiny(data_dir, tmp_path / "run", epochs=1), log=quiet)
    assert (tmp_path / "run" / "model.pt").read_bytes() == model


def test_an_empty_test_set_fails_before_training(data_dir, tmp_path):
    from lipnet.data import synthetic_dataset, write_npz

    folder = tmp_path / "data"
    write_npz(synthetic_dataset("mnist", 64, split="train"), folder / "train.npz")
    write_npz(synthetic_dataset("mnist", 0, split="test"), folder / "test.npz")
    with pytest.raises(ValueError, match="test.npz holds no test examples"):  # load_dataset's DatasetError
        train(tiny(folder, tmp_path / "run"), log=quiet)
    assert not (tmp_path / "run").exists()


def test_a_budget_shorter_than_the_warmup_still_decays(data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr("lipnet.training.trainer.plan_epochs", lambda *args, **kwargs: 2)
    result = train(tiny(data_dir, tmp_path / "run", certify=False, epochs=6, warmup_epochs=2, time_budget=60),
                   log=quiet)
    assert [h["epoch"] for h in result.history] == [1, 2]
    assert result.history[-1]["lr"] == pytest.approx(0, abs=1e-12)


def test_divergence_keeps_the_last_good_checkpoint(data_dir, tmp_path, monkeypatch):
    calls = {"n": 0}
    original = CertifiedMarginLoss.forward

    def poisoned(self, logits, targets):
        calls["n"] += 1
        loss = original(self, logits, targets)
        return loss * float("nan") if calls["n"] > 6 else loss  # 6 steps per epoch

    monkeypatch.setattr(CertifiedMarginLoss, "forward", poisoned)
    with pytest.raises(FloatingPointError):
        train(tiny(data_dir, tmp_path / "run"), log=quiet)
    model, info = load_model(tmp_path / "run" / "checkpoint.pt")  # refuses NaN weights, so these are finite
    assert info["epoch"] == 1


def test_metrics_never_run_ahead_of_the_checkpoint(data_dir, tmp_path, monkeypatch):
    """A save that fails at epoch 2 leaves metrics.jsonl at epoch 1, what --resume restores."""
    from lipnet.training import trainer

    saves = {"n": 0}
    original = trainer.save_checkpoint

    def failing_second(path, payload):
        saves["n"] += 1
        if saves["n"] == 2:
            raise OSError("disk full")
        original(path, payload)

    monkeypatch.setattr(trainer, "save_checkpoint", failing_second)
    with pytest.raises(OSError, match="disk full"):
        train(tiny(data_dir, tmp_path / "run", certify=False), log=quiet)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1]
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["training"]["epochs_done"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["ce", "emma"])  # emma also differentiates the last weight outside DDP's forward
def test_ddp_with_two_gloo_processes_keeps_identical_weights(data_dir, tmp_path, loss):
    config = tiny(data_dir, tmp_path / "run", epochs=2, device="cpu", threads=None, loss=loss)
    script = tmp_path / "ddp_run.py"
    script.write_text(
        "import json, os, sys, torch\n"
        "from lipnet.training import TrainConfig, train\n"
        "torch.set_num_threads(1)\n"
        "result = train(TrainConfig.from_dict(json.loads(sys.argv[1])))\n"
        "torch.save(result.model.state_dict(), sys.argv[2] + f\"/rank{os.environ['RANK']}.pt\")\n"
    )
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), json.dumps(config.to_dict()), str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 process(es) on cpu" in done.stdout
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
    saved, info = load_model(tmp_path / "run" / "model.pt")
    assert all(torch.equal(saved.state_dict()[k], ranks[0][k]) for k in ranks[0])
    history = info["metrics"]
    assert history["epoch"] == 2 and history["train_acc"] > 0


def test_the_emma_loss_trains_through_the_last_layer(data_dir, tmp_path):
    result = train(tiny(data_dir, tmp_path / "emma", loss="emma", epochs=2), log=quiet)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert result.history[-1]["test_acc"] > 0.5
    assert result.report["clean_accuracy"] >= result.report["certified_accuracy"][0]["accuracy"] > 0
    with pytest.raises(ValueError, match="offset"):
        tiny(data_dir, tmp_path, loss="emma", offset=1.0)


def test_an_out_dir_that_is_a_file_is_refused_before_loading_data(tmp_path):
    (tmp_path / "taken").write_text("not a folder")
    with pytest.raises(FileExistsError, match="is a file"):
        train(tiny(tmp_path / "no-data-here", tmp_path / "taken"), log=quiet)


def test_a_short_run_of_a_long_warmup_still_decays(data_dir, tmp_path):
    messages = []
    result = train(tiny(data_dir, tmp_path / "run", certify=False, epochs=2, warmup_epochs=8), log=messages.append)
    assert result.history[-1]["lr"] == pytest.approx(0, abs=1e-12)
    assert any("shortened to half of the 2 epochs" in m for m in messages)


def test_a_budget_that_leaves_one_epoch_records_its_estimate_and_rate(data_dir, tmp_path):
    result = train(tiny(data_dir, tmp_path / "run", certify=False, epochs=4, eval_every=3, time_budget=1e-6),
                   log=quiet)
    (record,) = result.history
    assert record["test_acc"] is not None and record["test_margin_acc"] is not None
    assert record["lr"] == pytest.approx(0, abs=1e-12)  # the re-planned schedule ended with the epoch


def test_resume_refuses_another_training_set_and_the_report_names_both_sources(data_dir, tmp_path):
    train(tiny(data_dir, tmp_path / "run", epochs=1), log=quiet)
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["data"]["train"].items() >= {"source": str(data_dir / "train.npz"), "examples": 192}.items()
    assert report["data"]["test"].items() >= {"source": str(data_dir / "test.npz"), "examples": 40}.items()
    assert report["data"]["train"]["sha256"] != report["data"]["test"]["sha256"]
    other = tmp_path / "other"
    write_npz(synthetic_dataset("mnist", 256, split="train", seed=3), other / "train.npz")
    write_npz(synthetic_dataset("mnist", 40, split="test", seed=1), other / "test.npz")
    with pytest.raises(ValueError, match="another training set: the run trained on 192 images"):
        train(tiny(other, tmp_path / "run", epochs=1, resume=True), log=quiet)


def test_two_runs_never_share_an_out_dir_and_a_killed_run_leaves_no_lock(data_dir, tmp_path):
    from lipnet.training.lock import FolderLock

    with FolderLock(tmp_path / "run"):  # another live run holds the folder
        with pytest.raises(FileExistsError, match="in use by another run"):
            train(tiny(data_dir, tmp_path / "run", epochs=1, certify=False), log=quiet)
    assert not (tmp_path / "run" / ".lock").exists()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from lipnet.training.lock import FolderLock; "
                               f"FolderLock({str(tmp_path / 'run')!r}).acquire(); print('held', flush=True); "
                               "time.sleep(600)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FileExistsError, match=f"process {holder.pid}"):
            train(tiny(data_dir, tmp_path / "run", epochs=1, certify=False), log=quiet)
    finally:
        holder.kill()  # no clean-up runs: the lock file stays, the system's lock goes
        holder.wait()
    assert (tmp_path / "run" / ".lock").exists()
    (tmp_path / "run" / ".metrics.jsonl.4242.0123456789ab.tmp").write_text("half a line")  # as atomic_write names it
    messages = []
    train(tiny(data_dir, tmp_path / "run", epochs=1, certify=False), log=messages.append)
    assert any("removed .metrics.jsonl.4242.0123456789ab.tmp" in m for m in messages)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint.pt", "metrics.jsonl", "model.pt"]


@pytest.mark.parametrize("changes, error, message", [
    ({"model": "resnet50"}, ValueError, "unknown model 'resnet50'"),
    ({"model_kwargs": {"bogus": 1}}, ValueError, "unexpected keyword argument 'bogus'"),
    ({"dataset": "imagenet"}, ValueError, "unknown data set 'imagenet'"),
    ({"crop_padding": 28}, ValueError, "crop_padding 28 must be smaller than the 28-pixel images"),
    ({"model_kwargs": {"num_classes": 5}}, ValueError, "model_kwargs cannot set num_classes: the data set sets it"),
    ({"model_kwargs": {"std": [0.5]}}, ValueError, "model_kwargs cannot set std: .*--input-std"),
    ({"model_kwargs": {"widths": [-4, 8]}}, ValueError, "model 'convnet'.*width must be an integer >= 1, got -4"),
    ({"out_dir": "a-file/run"}, NotADirectoryError, "a-file is a file"),
])
def test_a_bad_model_data_set_or_out_dir_is_refused_before_loading_data(tmp_path, monkeypatch, changes, error, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("not a folder")
    monkeypatch.setattr("lipnet.training.trainer.load_dataset", lambda *a, **k: pytest.fail("the data was loaded"))
    with pytest.raises(error, match=message):
        train(tiny(tmp_path / "data", tmp_path / "run").replace(**changes), log=quiet)


def test_a_read_only_out_dir_is_refused_before_loading_data(tmp_path, monkeypatch):
    (tmp_path / "ro").mkdir(mode=0o555)
    monkeypatch.setattr("lipnet.training.trainer.load_dataset", lambda *a, **k: pytest.fail("the data was loaded"))
    if os.geteuid() == 0:  # root may write into read-only folders: pretend not to be
        monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path / "ro")
    with pytest.raises(PermissionError, match="cannot write"):
        train(tiny(tmp_path / "data", tmp_path / "ro" / "run"), log=quiet)


def _other_weights(payload):
    payload["state_dict"] = {k: torch.cat([v, v]) if v.dim() else v for k, v in payload["state_dict"].items()}


@pytest.mark.parametrize("damage, message", [
    (_other_weights, "cannot load its weights"),
    (lambda p: p["training"].pop("optimizer"), "lacks its 'optimizer'"),
    (lambda p: p["training"].__setitem__("scheduler", {}), "scheduler state"),
    (lambda p: p["training"]["rng"].__setitem__("torch", torch.zeros(3)), "random number generator"),
    (lambda p: p["info"].pop("config"), "lacks the run's settings"),
    (lambda p: p["info"]["config"].__setitem__("epochs", "three"), "epochs must be an int"),
    (lambda p: p["training"].__setitem__("epochs_done", 7), "after epoch 7 of 3"),
    (lambda p: p["training"].__setitem__("history", []), "0 epochs of metrics for 1 epoch"),
])
def test_resuming_a_checkpoint_that_does_not_fit_the_run_is_a_checkpoint_error(data_dir, tmp_path, damage, message):
    from lipnet.checkpoint import CheckpointError, save_checkpoint


    def stop(epoch, record):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tiny(data_dir, tmp_path / "run", certify=False), on_epoch_end=stop, log=quiet)
    payload = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    damage(payload)
    save_checkpoint(tmp_path / "run" / "checkpoint.pt", payload)
    with pytest.raises(CheckpointError, match=message):
        train(tiny(data_dir, tmp_path / "run", certify=False, resume=True), log=quiet)


def test_the_report_names_the_epochs_a_time_budget_left_and_the_settings(data_dir, tmp_path):
    result = train(tiny(data_dir, tmp_path / "run", epochs=3, time_budget=1e-6), log=quiet)
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["epochs"] == 1 == len(result.history)  # the count depends on the machine: reported with the result
    assert report["config"] == tiny(data_dir, tmp_path / "run", epochs=3, time_budget=1e-6).to_dict()


def test_resume_refuses_other_training_images_of_the_same_size_but_not_the_same_images_moved(data_dir, tmp_path):
    def stop(epoch, record):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tiny(data_dir, tmp_path / "run", epochs=2, certify=False), on_epoch_end=stop, log=quiet)
    other = tmp_path / "other"
    write_npz(synthetic_dataset("mnist", 192, split="train", seed=3), other / "train.npz")  # same size, other noise
    write_npz(synthetic_dataset("mnist", 40, split="test", seed=1), other / "test.npz")
    with pytest.raises(ValueError, match="another training set: the run trained on 192 images .* other images"):
        train(tiny(other, tmp_path / "run", epochs=2, certify=False, resume=True), log=quiet)
    moved = tmp_path / "moved"
    moved.mkdir()
    for name in ("train.npz", "test.npz"):
        (moved / name).write_bytes((data_dir / name).read_bytes())
    messages = []
    train(tiny(moved, tmp_path / "run", epochs=2, certify=False, resume=True), log=messages.append)
    assert any("same images" in m for m in messages)


def test_more_threads_than_cpus_is_refused_before_anything_runs(tmp_path, monkeypatch):
    """torch.set_num_threads(20000) aborts the process inside libgomp: refuse it with a message."""
    monkeypatch.setattr("lipnet.training.trainer._available_cpus", lambda: 2)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: pytest.fail("threads were set"))
    with pytest.raises(ValueError, match="threads 3 is more than the 2 CPUs"):
        train(tiny(tmp_path, tmp_path / "run", threads=3), log=quiet)


def test_a_tiny_input_std_is_warned_about_and_counted_by_the_certificate():
    """Dividing by the std scales the Lipschitz constant in pixels by 1 / std: sound (the
    certificate counts it) but a tiny std leaves almost no certified radius."""
    import warnings

    from lipnet.certify import lipschitz_bound
    from lipnet.data import dataset_info

    info = dataset_info("mnist")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # MNIST's own std (0.3081) is legitimate: no warning
        torch.manual_seed(0)
        usual = lipschitz_bound(build_run_model(TrainConfig(dataset="mnist", input_std=0.3081), info).eval(),
                                (1, 28, 28))
    torch.manual_seed(0)  # the same weights
    with pytest.warns(UserWarning, match=r"input_std 0.001 makes the model up to 1000-Lipschitz"):
        model = build_run_model(TrainConfig(dataset="mnist", input_std=1e-3), info).eval()
    assert lipschitz_bound(model, (1, 28, 28)) == pytest.approx(usual * 308.1, rel=1e-4)


class FakeClock:
    """The trainer's ``time.perf_counter``, made deterministic: each reading advances it by a
    tenth of a millisecond, and ``advance`` adds what a test says an operation took (real time
    on a shared 2-core machine made the time-budget tests fail under load)."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        self.now += 1e-4
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch):
    import types

    from lipnet.training import trainer

    fake = FakeClock()
    monkeypatch.setattr(trainer, "time", types.SimpleNamespace(perf_counter=fake.perf_counter))
    return fake


def _slow_estimates(monkeypatch, clock, seconds):
    """Make the per-epoch test-set estimates take ``seconds(call)`` more (call counts from 0)."""
    from lipnet.training.trainer import _Run

    original, calls = _Run._test_metrics, []

    def slow(self):
        clock.advance(seconds(len(calls)))
        calls.append(1)
        return original(self)

    monkeypatch.setattr(_Run, "_test_metrics", slow)


def test_a_time_budget_counts_the_test_set_estimates_of_later_epochs(data_dir, tmp_path, monkeypatch, clock):
    """With eval_every=3 the first epoch takes no estimate; the budget must still count those of
    epochs 3, 6, ... (here 0.4 s each: all 12 epochs would take over 1.6 s of a 1-s budget)."""
    _slow_estimates(monkeypatch, clock, lambda call: 0.4)
    result = train(tiny(data_dir, tmp_path / "run", certify=False, epochs=12, eval_every=3, time_budget=1.0),
                   log=quiet)
    spent = sum(h["train_seconds"] + h["eval_seconds"] for h in result.history)
    assert len(result.history) < 12 and spent < 1.25
    assert result.history[-1]["lr"] == pytest.approx(0, abs=1e-12) and result.history[-1]["test_acc"] is not None


def test_a_time_budget_is_checked_after_every_epoch(data_dir, tmp_path, monkeypatch, clock):
    """Estimates that become slow after the plan (the first is instant) lower the epochs again, and
    the re-planned schedule still ends at 0."""
    _slow_estimates(monkeypatch, clock, lambda call: 0.0 if call == 0 else 0.5)
    messages = []
    result = train(tiny(data_dir, tmp_path / "run", certify=False, epochs=8, time_budget=1.2), log=messages.append)
    spent = sum(h["train_seconds"] + h["eval_seconds"] for h in result.history)
    assert len(result.history) < 8 and spent < 1.2 + 0.6
    assert result.history[-1]["lr"] == pytest.approx(0, abs=1e-12)
    assert any("spent after epoch" in m for m in messages)
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["training"]["epochs"] == len(result.history)


def test_one_slow_epoch_does_not_cut_a_time_budgeted_run(data_dir, tmp_path, monkeypatch, clock):
    """The further epochs are planned at the mean speed of the epochs since the first, not at the last
    epoch's: one slow epoch (here 1 s among 0.1-s ones) would otherwise lower the plan for good."""
    from lipnet.training.trainer import _Run

    original = _Run._epoch

    def timed(self, forward, epoch):
        record = original(self, forward, epoch)
        record["train_seconds"] = 1.0 if epoch == 5 else 0.1
        return record

    monkeypatch.setattr(_Run, "_epoch", timed)
    result = train(tiny(data_dir, tmp_path / "run", certify=False, epochs=10, time_budget=3.0), log=lambda m: None)
    assert len(result.history) == 10


def test_the_run_computes_full_float32_products_whatever_the_caller_set(data_dir, tmp_path):
    """A compiled step's Gram bounds follow the matmul precision in force when it compiles;
    with TF32 or bfloat16 passes a bound can fall below the norm it divides by. The run pins
    full float32 (``fp32_precision = "ieee"``) for its duration and restores the caller's."""
    from lipnet.bounds.autocast import _matmul_backends

    backends = _matmul_backends()
    if not backends:
        pytest.skip("torch < 2.9 has no per-backend fp32_precision")
    seen = []
    saved = [backend.fp32_precision for backend in backends]
    try:
        for backend in backends:
            backend.fp32_precision = "tf32" if backend is torch.backends.cuda.matmul else "bf16"
        train(tiny(data_dir, tmp_path / "run", epochs=1), log=quiet,
              on_epoch_end=lambda epoch, metrics: seen.append([b.fp32_precision for b in backends]))
        assert seen == [["ieee"] * len(backends)]
        assert [b.fp32_precision for b in backends] == [
            "tf32" if b is torch.backends.cuda.matmul else "bf16" for b in backends]
    finally:
        for backend, value in zip(backends, saved):
            backend.fp32_precision = value


def test_logit_margins_are_the_true_logit_over_the_best_other():
    z = torch.tensor([[3.0, 1.0, 2.5], [0.0, 2.0, -1.0]])
    assert torch.equal(logit_margins(z, torch.tensor([0, 0])), torch.tensor([0.5, -2.0]))
    for bad in (torch.tensor([[1.0]]), torch.tensor([[1, 2]]), torch.ones(2)):  # one class gave an infinite margin
        with pytest.raises(ValueError, match="K >= 2"):
            logit_margins(bad, torch.tensor([0]))
