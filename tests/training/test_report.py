"""The report's plots: what they draw from the history of a run."""

from matplotlib.axes import Axes

from lipnet.training.report import plot_training_curves


def test_an_estimate_taken_once_in_a_short_run_still_shows_in_the_training_curves(tmp_path, monkeypatch):
    """eval_every 10 and 3 epochs: one test-set point, which a line without markers does not draw."""
    drawn = {}
    original = Axes.plot

    def record(self, *args, **kwargs):
        drawn[kwargs.get("label")] = kwargs
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Axes, "plot", record)
    history = [{"epoch": e, "train_loss": 1.0 / e, "train_acc": 0.5, "train_margin_acc": 0.1,
                "test_acc": 0.6 if e == 3 else None, "test_margin_acc": 0.2 if e == 3 else None} for e in (1, 2, 3)]
    plot_training_curves(history, tmp_path / "curves.png")
    assert drawn["test accuracy"].get("marker") and drawn["test margin accuracy*"].get("marker")
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
