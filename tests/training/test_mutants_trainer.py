"""Mutation-testing follow-ups for lipnet.training.trainer: each test pins a behaviour that a
hand-made mutant of the module changed while every earlier test still passed."""

import json
import os

import pytest
import torch

from lipnet.checkpoint import CheckpointError, load_checkpoint, load_model
from lipnet.data import DeviceLoader, dataset_info
from lipnet.training import TrainConfig, build_run_model, train
from lipnet.training import trainer
from lipnet.training.distributed import Distributed


def quiet(message):
    pass


def tiny(data_dir, out_dir, **changes):
    """3 steps per epoch (96 images, batches of 32)."""
    return TrainConfig(dataset="mnist", data_dir=str(data_dir), model="convnet",
                       model_kwargs={"widths": [4], "depths": [1], "dense": [8]}, epochs=2, batch_size=32, lr=5e-3,
                       warmup_epochs=0.5, eval_eps=(0.1,), out_dir=str(out_dir), progress=False, threads=1,
                       certify=False, amp="none").replace(**changes)


def one_process():
    return Distributed(0, 1, torch.device("cpu"))


@pytest.fixture(scope="module")
def two_epochs(data_dir, tmp_path_factory):
    """A 2-epoch run that records, after each epoch, its checkpoint and metrics file, and every
    ``DeviceLoader.epoch`` call (shuffling loader or not, and the epoch asked for)."""
    out = tmp_path_factory.mktemp("two") / "run"
    seen, epochs_asked = [], []
    original = DeviceLoader.epoch

    def spy(self, epoch):
        epochs_asked.append((self.shuffle, epoch))
        return original(self, epoch)

    def record(epoch, metrics):
        lines = (out / "metrics.jsonl").read_text().splitlines()
        seen.append((epoch, metrics, load_checkpoint(out / "checkpoint.pt"), [json.loads(line) for line in lines]))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(DeviceLoader, "epoch", spy)
        result = train(tiny(data_dir, out), on_epoch_end=record, log=quiet)
    return result, seen, epochs_asked


def test_each_epochs_checkpoint_names_that_epoch_and_its_metrics(two_epochs):
    """on_epoch_end gets epoch 1, 2 (counting from 1); the checkpoint it sees was saved after that
    epoch: info['epoch'], epochs_done, the whole history so far, info['metrics'] = that epoch's
    record; metrics.jsonl holds one line per epoch done."""
    result, seen, _ = two_epochs
    assert [epoch for epoch, *_ in seen] == [1, 2]
    for epoch, metrics, payload, lines in seen:
        assert metrics is result.history[epoch - 1] and metrics["epoch"] == epoch
        assert payload["info"]["epoch"] == epoch == payload["training"]["epochs_done"]
        assert payload["info"]["metrics"] == metrics
        assert payload["training"]["history"] == result.history[:epoch] == lines
        assert payload["training"]["epochs"] == 2


def test_every_epoch_draws_its_own_data_order(two_epochs):
    """The shuffling loader is asked for epoch 0, then 1 (a new permutation and augmentation per
    epoch, and the one --resume redraws), the test-set loader for its fixed order."""
    _, _, asked = two_epochs
    assert [epoch for shuffle, epoch in asked if shuffle] == [0, 1]
    assert {epoch for shuffle, epoch in asked if not shuffle} == {0}


def test_the_run_reports_the_training_time_of_every_epoch(two_epochs):
    result, *_ = two_epochs
    assert result.train_seconds == sum(h["train_seconds"] for h in result.history) > 0


def test_a_resumed_run_counts_the_training_time_before_the_interruption(data_dir, tmp_path):
    """RunResult.train_seconds (and the report's) are the sum over all epochs, those trained
    before the --resume included."""
    def stop(epoch, record):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tiny(data_dir, tmp_path / "run"), on_epoch_end=stop, log=quiet)
    before = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["training"]["history"][0]["train_seconds"]
    resumed = train(tiny(data_dir, tmp_path / "run", resume=True), log=quiet)
    assert resumed.history[0]["train_seconds"] == before
    assert resumed.train_seconds == sum(h["train_seconds"] for h in resumed.history) > before


def test_the_final_model_of_a_budgeted_run_names_the_epochs_it_trained(data_dir, tmp_path):
    """A budget that leaves 1 of 3 epochs: model.pt says epoch 1 (not the 3 asked for), and the
    checkpoint keeps the plan of 1 epoch."""
    train(tiny(data_dir, tmp_path / "run", epochs=3, time_budget=1e-6), log=quiet)
    _, info = load_model(tmp_path / "run" / "model.pt")
    assert info["epoch"] == 1 and info["config"]["epochs"] == 3
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["training"]["epochs"] == 1


def test_as_many_threads_as_cpus_are_allowed(tmp_path, monkeypatch):
    """threads == the CPUs available passes the check (here the run then stops at its out_dir,
    a file); one more is refused."""
    monkeypatch.setattr(trainer, "_available_cpus", lambda: 1)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    (tmp_path / "file").write_text("")
    with pytest.raises(FileExistsError, match="is a file"):
        train(TrainConfig(threads=1, out_dir=str(tmp_path / "file"), device="cpu"), log=quiet)
    with pytest.raises(ValueError, match="threads 2 is more than the 1 CPUs"):
        train(TrainConfig(threads=2, out_dir=str(tmp_path / "file"), device="cpu"), log=quiet)


def test_an_input_std_of_exactly_the_threshold_is_not_warned_about(recwarn):
    """TINY_STD (0.01) itself passes quietly; anything below is warned about."""
    info = dataset_info("mnist")
    build_run_model(TrainConfig(dataset="mnist", model="convnet-xs", input_std=trainer.TINY_STD), info)
    assert not [w for w in recwarn if "Lipschitz in pixels" in str(w.message)]
    with pytest.warns(UserWarning, match="input_std 0.0099 makes the model up to 101"):
        build_run_model(TrainConfig(dataset="mnist", model="convnet-xs", input_std=0.0099), info)


def test_one_test_example_for_one_process_is_enough(data_dir, tmp_path):
    """A set as large as the number of processes is accepted (each gets one example)."""
    run = trainer._Run(tiny(data_dir, tmp_path / "run", test_subset=1), one_process(), quiet)
    assert len(run.test_data) == 1


def test_the_optimizer_gets_the_weight_decay_and_the_warmup_is_rounded(data_dir, tmp_path):
    """AdamW with the config's weight decay; warm-up of round(0.3 * 6 steps) = 2 steps, so the
    first step runs at half the peak rate (int() would give 1 step, the full rate)."""
    run = trainer._Run(tiny(data_dir, tmp_path / "run", weight_decay=0.125, warmup_epochs=0.3, batch_size=16,
                            epochs=4), one_process(), quiet)
    assert run.steps == 6
    assert [group["weight_decay"] for group in run.optimizer.param_groups] == [0.125]
    assert run.optimizer.param_groups[0]["lr"] == 5e-3 / 2
    assert [run.scheduler.lr_lambdas[0](step) for step in (0, 1, 2)] == [0.5, 1.0, 1.0]


@pytest.mark.parametrize("name", ["metrics.jsonl", "report.json", "model.pt", "certified_accuracy.png",
                                  "training_curves.png"])
def test_any_file_of_an_earlier_run_refuses_a_new_run(data_dir, tmp_path, name):
    """Not only checkpoint.pt: a folder with only metrics.jsonl, report.json or model.pt holds an
    earlier run, which a new run would overwrite; it is refused and the file is kept."""
    out = tmp_path / "run"
    out.mkdir()
    (out / name).write_text("earlier")
    with pytest.raises(FileExistsError, match=f"holds an earlier run \\({name}\\).*nothing was overwritten"):
        train(tiny(data_dir, out), log=quiet)
    assert (out / name).read_text() == "earlier"


def test_a_checkpoint_from_before_data_fingerprints_resumes_on_as_many_images(data_dir, tmp_path):
    """A record of the training data without 'sha256' (older checkpoints) is checked by size only;
    a size that differs is still refused."""
    run = trainer._Run(tiny(data_dir, tmp_path / "run"), one_process(), quiet)
    now = run._data_info()["train"]
    run._check_same_training_data({"train": {"source": now["source"], "examples": now["examples"]}})
    with pytest.raises(ValueError, match="another training set: the run trained on 95 images"):
        run._check_same_training_data({"train": {"source": now["source"], "examples": 95}})


def _state(**changes):
    state = {"epochs_done": 1, "epochs": 2, "optimizer": {}, "scheduler": {}, "rng": {"torch": torch.zeros(1)},
             "history": [{}], "world_size": 1}
    return {"training": {**state, **changes}}


@pytest.mark.parametrize("changes, message", [
    ({"epochs_done": True}, "saved after epoch True of 2"),
    ({"epochs": 3}, "saved after epoch 1 of 3, which a run of 2 epochs"),
    ({"epochs_done": 1.0}, "saved after epoch 1.0 of 2"),
    ({"history": [{}, {}]}, "holds 2 epochs of metrics for 1 epoch"),
    ({"rng": {"cuda": torch.zeros(1)}}, r"lacks the random number generator's state \(rng\['torch'\]\)"),
])
def test_training_states_a_run_cannot_have_written_are_refused(changes, message):
    with pytest.raises(CheckpointError, match=message):
        trainer._training_state(_state(**changes), "ckpt.pt", 2)


@pytest.mark.parametrize("key", trainer._TRAINING_STATE)
def test_every_part_of_the_training_state_is_required(key):
    """A checkpoint lacking any part resume reads (world_size too) is a CheckpointError naming it,
    not a KeyError later."""
    payload = _state()
    del payload["training"][key]
    with pytest.raises(CheckpointError, match=f"lacks its '{key}' training state"):
        trainer._training_state(payload, "ckpt.pt", 2)
    assert set(trainer._TRAINING_STATE) == {"epochs_done", "optimizer", "scheduler", "rng", "history", "world_size"}


def test_a_part_that_does_not_load_is_a_checkpoint_error_naming_it():
    """KeyError, TypeError, ValueError, RuntimeError of the loader become a CheckpointError."""
    for error in (KeyError, TypeError, ValueError, RuntimeError):
        def load(state, error=error):
            raise error("boom")

        with pytest.raises(CheckpointError, match=f"cannot load its optimizer state into this run \\({error.__name__}"):
            trainer._load_part("ckpt.pt", "optimizer state", load, {})


def test_an_out_dir_that_can_be_written_but_not_entered_is_refused(tmp_path, monkeypatch):
    """Creating files in a folder needs write and search (x) permission."""
    monkeypatch.setattr(os, "access", lambda path, mode: not mode & os.X_OK)
    with pytest.raises(PermissionError, match="cannot write into"):
        trainer._check_out_dir(tmp_path / "run")


def test_stale_temporaries_of_a_killed_save_are_removed_when_a_run_starts(data_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    stale = out / ".checkpoint.pt.123.0123456789ab.tmp"
    stale.write_bytes(b"half a checkpoint")
    messages = []
    train(tiny(data_dir, out, epochs=1), log=messages.append)
    assert not stale.exists()
    assert f"removed {stale.name}, left by a save that was killed mid-write" in messages


def test_resuming_with_another_number_of_processes_says_the_data_order_differs(data_dir, tmp_path):
    from lipnet.checkpoint import save_checkpoint

    def stop(epoch, record):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tiny(data_dir, tmp_path / "run"), on_epoch_end=stop, log=quiet)
    payload = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    payload["training"]["world_size"] = 2
    save_checkpoint(tmp_path / "run" / "checkpoint.pt", payload)
    run = trainer._Run(tiny(data_dir, tmp_path / "run", resume=True), one_process(), quiet)
    messages = []
    run.log = messages.append
    assert run._restore()[0] == 1
    assert messages == ["warning: the run used 2 process(es), now 1: it continues, but the data order differs from "
                        "an uninterrupted run"]


def _budgeted_run(data_dir, tmp_path, **changes):
    run = trainer._Run(tiny(data_dir, tmp_path / "run", **{"epochs": 10, "time_budget": 100.0, **changes}),
                       one_process(), quiet)
    run._first_epoch, run._steady_step_seconds = 0, 0.5
    return run


def _plan_arguments(monkeypatch, planned):
    calls = []

    def plan(*args, **kwargs):
        calls.append((args, kwargs))
        return planned

    monkeypatch.setattr(trainer, "plan_epochs", plan)
    return calls


def test_the_budget_plan_counts_all_time_spent_the_steady_epochs_and_the_last_estimate(data_dir, tmp_path,
                                                                                      monkeypatch):
    """After 4 epochs: spent = every epoch's training and estimates (6 + 2 + 7 + 3 s); per epoch =
    the mean of the epochs after the first (2, 4, 3 s); the estimate's cost = the latest one (3 s)."""
    run = _budgeted_run(data_dir, tmp_path)
    calls = _plan_arguments(monkeypatch, 10)
    history = [{"train_seconds": 5.0, "eval_seconds": 1.0, "test_acc": 0.5},
               {"train_seconds": 2.0, "eval_seconds": 0.0, "test_acc": None},
               {"train_seconds": 4.0, "eval_seconds": 3.0, "test_acc": 0.6},
               {"train_seconds": 3.0, "eval_seconds": 0.0, "test_acc": None}]
    run._fit_budget(history)
    assert calls == [((100.0, 18.0, 3.0, 10), {"epochs_done": 4, "eval_seconds": 3.0, "eval_every": 1})]
    run._first_epoch = 2  # resumed after epoch 2: its first epoch (the third) stands out
    run._fit_budget(history)
    assert calls[1] == ((100.0, 18.0, 3.0, 10), {"epochs_done": 4, "eval_seconds": 3.0, "eval_every": 1})
    run._fit_budget(history[:1])  # after the first epoch: its steady steps (0.5 s each, 3 steps)
    assert calls[2] == ((100.0, 6.0, 1.5, 10), {"epochs_done": 1, "eval_seconds": 1.0, "eval_every": 1})


def test_a_re_plan_goes_on_at_the_current_step_of_the_new_schedule(data_dir, tmp_path):
    """After 5 of 12 steps, a re-plan to 2 epochs (6 steps, 2 of warm-up) keeps the step count and
    sets the rate of step 5 of the new schedule."""
    from lipnet.training.schedule import lr_factor

    run = _budgeted_run(data_dir, tmp_path, epochs=4)
    for _ in range(5):
        run.optimizer.step()
        run.scheduler.step()
    run._replan(2)
    assert run.epochs == 2 and run.scheduler.last_epoch == 5
    assert run.optimizer.param_groups[0]["lr"] == 5e-3 * lr_factor(5, 6, 2) == run.scheduler.get_last_lr()[0]


def test_the_steady_step_time_is_measured_from_a_quarter_of_the_first_epoch(data_dir, tmp_path, monkeypatch):
    """6 steps: timed from step min(5, 6 // 4) = 1 to the end, over the 5 steps timed: a clock read
    10 s then 20 s gives 2 s per step."""
    run = _budgeted_run(data_dir, tmp_path, batch_size=16)
    clock = iter([10.0, 20.0])
    monkeypatch.setattr(run, "_synchronized_time", lambda: next(clock))
    run._cuda_graphs = False
    steps = []
    original = DeviceLoader.epoch

    def counted(self, epoch):
        for batch in original(self, epoch):
            steps.append(epoch)
            yield batch

    monkeypatch.setattr(DeviceLoader, "epoch", counted)
    record = run._epoch(run.model, 0)
    assert run.steps == 6 and steps[:6] == [0] * 6
    assert run._steady_step_seconds == 2.0 and record["epoch"] == 1


def test_logit_margins_of_negative_logits_compare_with_the_best_other_not_zero():
    """The true class is masked with -inf: with all logits negative, the best other is -2, not 0."""
    from lipnet.training import logit_margins

    z = torch.tensor([[-1.0, -2.0, -3.0], [-5.0, -4.0, -0.5]])
    assert logit_margins(z, torch.tensor([0, 1])).tolist() == [1.0, -3.5]


def test_the_nominal_lipschitz_constant_multiplies_the_normalizations():
    """Two input normalizations in a row (std 0.5, then 0.25) scale by 2 * 4 = 8, not 2 + 4."""
    from lipnet.nn import InputNormalization
    from lipnet.training import nominal_lipschitz

    model = torch.nn.Sequential(InputNormalization([0.0], [0.5]), InputNormalization([0.0], [0.25]))
    assert nominal_lipschitz(model) == pytest.approx(8.0, rel=1e-12)  # with its rounding margin
    assert nominal_lipschitz(torch.nn.Linear(2, 2)) == 1  # no normalization: 1-Lipschitz


def test_a_margin_of_exactly_the_offset_counts_as_met(data_dir, tmp_path, monkeypatch):
    """train_margin_acc and test_margin_acc count margins >= the offset (certified at the radius
    the offset stands for), accuracy counts margins > 0: margins pinned to 0, the offset, and
    just below it give 1/3 met, 2/3 correct (batches of 24; one test batch of 16)."""
    run = trainer._Run(tiny(data_dir, tmp_path / "run", offset=0.75, epochs=1, batch_size=24), one_process(), quiet)
    run._first_epoch, run._cuda_graphs = 0, False

    def pinned(logits, targets):
        return torch.tensor([0.0, 0.75, 0.5]).repeat(len(targets) // 3 + 1)[:len(targets)]

    monkeypatch.setattr(trainer, "logit_margins", pinned)
    record = run._epoch(run.model, 0)
    assert run.margin == 0.75 and record["margin"] == 0.75
    assert (record["train_acc"], record["train_margin_acc"]) == (2 / 3, 1 / 3)
    assert (record["test_acc"], record["test_margin_acc"]) == (10 / 16, 5 / 16)


def test_resume_without_a_checkpoint_leaves_no_folder_behind(data_dir, tmp_path, monkeypatch):
    """Refused before the data is read and before the lock creates the folder (found by mutation
    testing: the folder was left behind, after the whole data set had been loaded)."""
    monkeypatch.setattr(trainer._Run, "_load_data", lambda self: pytest.fail("the data was read"))
    with pytest.raises(FileNotFoundError, match="--resume: there is no checkpoint at"):
        train(tiny(data_dir, tmp_path / "a" / "run", resume=True), log=quiet)
    assert not (tmp_path / "a").exists()


def test_a_non_finite_loss_with_finite_weights_is_divergence(data_dir, tmp_path):
    """An infinite loss sum stops the run even when no weight has become NaN yet (the next step's
    would); the message names the epoch and what was kept."""
    run = trainer._Run(tiny(data_dir, tmp_path / "run"), one_process(), quiet)
    run._check_finite(1, 12.5)  # finite: nothing to say
    with pytest.raises(FloatingPointError, match=r"diverged in epoch 2 \(loss sum inf, non-finite weights: none\); "
                                                 r"the checkpoint of epoch 1 is kept at"):
        run._check_finite(1, float("inf"))
    with pytest.raises(FloatingPointError, match=r"diverged in epoch 1 \(loss sum nan.*no checkpoint was written"):
        run._check_finite(0, float("nan"))


def test_the_train_loss_is_the_mean_over_examples(data_dir, tmp_path):
    """Each batch's mean loss is weighted by its size: a constant loss of 2.5 per batch gives a
    train_loss of 2.5 (not 2.5 per batch summed over 96 examples)."""
    run = trainer._Run(tiny(data_dir, tmp_path / "run", epochs=1), one_process(), quiet)
    run._first_epoch, run._cuda_graphs = 0, False
    run.loss_fn = lambda logits, targets: logits.sum() * 0 + 2.5
    assert run._epoch(run.model, 0)["train_loss"] == 2.5


def test_an_epoch_the_budget_makes_the_last_gets_its_estimate(data_dir, tmp_path, monkeypatch):
    """eval_every=5 of 10 epochs, and a plan (stubbed: no wall clock) of 10 after epoch 1, then 2
    after epoch 2: epoch 2 trained without an estimate becomes the last, so it takes one then,
    and its rate is that of the re-planned schedule's end (0)."""
    monkeypatch.setattr(trainer, "plan_epochs", lambda *args, epochs_done, **kwargs: 10 if epochs_done == 1 else 2)
    result = train(tiny(data_dir, tmp_path / "run", epochs=10, eval_every=5, time_budget=100.0), log=quiet)
    assert [h["epoch"] for h in result.history] == [1, 2]
    assert all(h["test_acc"] is not None and h["test_margin_acc"] is not None for h in result.history)
    assert result.history[-1]["lr"] == 0.0
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["training"]["history"] == result.history
