"""Ctrl-C and SIGTERM during a checkpoint's write: held back until the checkpoint is whole."""

import signal
import threading

import pytest

from lipnet.checkpoint import load_checkpoint
from lipnet.training import TrainConfig, train
from lipnet.training import trainer
from lipnet.training.interrupts import interrupts_deferred


@pytest.fixture(autouse=True)
def ctrl_c_raises():
    """Python's own Ctrl-C handler while a test runs, also where pytest was started with SIGINT
    ignored (a background job of a script inherits SIG_IGN)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_inside_the_block_is_raised_when_it_ends():
    done = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts_deferred():
            signal.raise_signal(signal.SIGINT)
            done.append("the rest of the block ran")
    assert done == ["the rest of the block ran"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_sigterm_runs_the_handler_installed_before_once_the_block_ends():
    calls = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: calls.append(signum))
    try:
        with interrupts_deferred():
            signal.raise_signal(signal.SIGTERM)
            signal.raise_signal(signal.SIGTERM)
            assert calls == []
        assert calls == [signal.SIGTERM]  # the first signal acts; the run stops on it
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_without_a_signal_the_handlers_are_restored_and_nothing_happens():
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with interrupts_deferred():
        pass
    assert {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)} == before


def test_an_ignored_signal_stays_ignored():
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with interrupts_deferred():
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
            signal.raise_signal(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_outside_the_main_thread_the_block_runs_as_it_is():
    seen = []

    def worker():
        with interrupts_deferred():
            seen.append(signal.getsignal(signal.SIGINT))

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen == [signal.default_int_handler]


def test_ctrl_c_while_a_checkpoint_is_written_stops_the_run_after_it_is_whole(data_dir, tmp_path, monkeypatch):
    """torch.save interrupted midway raised its zip writer's RuntimeError ('unexpected pos') in
    place of the KeyboardInterrupt: the run ended with a traceback and exit status 1."""
    real_save = trainer.save_checkpoint

    def save_interrupted(path, payload):
        signal.raise_signal(signal.SIGINT)  # as if Ctrl-C came in the middle of torch.save
        real_save(path, payload)

    monkeypatch.setattr(trainer, "save_checkpoint", save_interrupted)
    config = TrainConfig(dataset="mnist", data_dir=str(data_dir), model="convnet",
                         model_kwargs={"widths": [4], "depths": [1], "dense": [8]}, epochs=3, batch_size=32,
                         out_dir=str(tmp_path / "run"), progress=False, threads=1, certify=False, amp="none")
    with pytest.raises(KeyboardInterrupt):
        train(config, log=lambda message: None)
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["training"]["epochs_done"] == 1
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count("\n") == 1
    assert not list((tmp_path / "run").glob(".*.tmp"))
