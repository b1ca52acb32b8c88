"""Mutation-testing follow-ups for lipnet.training.schedule: the learning rate past the end of
the schedule, the warm-up limit, and plan_epochs counted by hand."""

import pytest

from lipnet.training.schedule import lr_factor, plan_epochs


@pytest.mark.parametrize("shape, after", [("linear", 0.0), ("cosine", 0.0), ("constant", 1.0)])
def test_the_rate_stays_at_its_end_value_past_the_last_step(shape, after):
    """A step past total_steps (a schedule re-planned shorter) holds the end value: no negative
    linear rate, no cosine rising again."""
    assert [lr_factor(step, 10, 2, shape) for step in (10, 11, 15, 18, 30)] == [after] * 5


def test_a_warmup_of_the_whole_run_is_allowed_one_step_more_is_not():
    assert [lr_factor(step, 4, 4) for step in (0, 3, 4)] == [0.25, 1.0, 1.0]
    with pytest.raises(ValueError, match=r"warmup_steps \(5\) exceed total_steps \(4\)"):
        lr_factor(0, 4, 5)


def test_plan_epochs_counts_the_estimates_after_the_epochs_done_by_hand():
    """After 3 epochs (30 s) of 10 s, an estimate (15 s) every 3rd epoch and after the last:
    14 epochs cost 30 + 11 * 10 + 4 * 15 (epochs 6, 9, 12, 14) = 200 s, exactly the budget;
    15 would cost 210 s."""
    assert plan_epochs(200.0, 30.0, 10.0, 30, epochs_done=3, eval_seconds=15.0, eval_every=3) == 14
    assert plan_epochs(199.0, 30.0, 10.0, 30, epochs_done=3, eval_seconds=15.0, eval_every=3) == 13


def test_plan_epochs_counts_at_least_one_epoch_done():
    """epochs_done=0 is read as 1 (the plan is made after the first epoch): 30 s spent, 10 s per
    epoch, 100 s: 1 + 7 epochs, and never fewer than 1."""
    assert plan_epochs(100.0, 30.0, 10.0, 20, epochs_done=0) == 8 == plan_epochs(100.0, 30.0, 10.0, 20)
    assert plan_epochs(1.0, 120.0, 10.0, 20, epochs_done=0) == 1
