"""``--resume`` restores the global random number generators, so a run that draws from them
(dropout, a stochastic loss) resumes bit for bit.

lipnet's own data pipeline uses per-epoch generators and its models and losses draw nothing,
so an uninterrupted run and a resumed one agree even without the restore; here the loss
perturbs the logits with ``torch.rand_like``, which draws from the global CPU generator (or
the CUDA one, on a GPU), as dropout would.
"""

import pytest
import torch

from lipnet.checkpoint import load_checkpoint
from lipnet.training import CertifiedMarginLoss, TrainConfig, train


class NoisyLoss(CertifiedMarginLoss):
    """The training loss on logits perturbed by noise from the global generator of their device;
    every draw is recorded (the draws depend on the generator's state only, not on the weights)."""

    draws: list = []

    def forward(self, logits, targets, last_weight=None):
        noise = torch.rand_like(logits)
        self.draws.append(noise.detach().cpu())
        return super().forward(logits + 0.5 * noise, targets, last_weight)


def quiet(message):
    pass


def config(data_dir, out_dir, device, **changes):
    return TrainConfig(dataset="mnist", data_dir=str(data_dir), model="convnet",
                       model_kwargs={"widths": [4], "depths": [1], "dense": [8]}, epochs=3, batch_size=32, lr=5e-3,
                       warmup_epochs=0.5, crop_padding=1, eval_eps=(0.1,), out_dir=str(out_dir), progress=False,
                       threads=1, certify=False, device=device, amp="none").replace(**changes)


def interrupt_and_resume(data_dir, tmp_path, device, monkeypatch):
    """``(full, resumed, draws of the full run, draws after the resume)``; 3 steps per epoch."""
    monkeypatch.setattr("lipnet.training.trainer.CertifiedMarginLoss", NoisyLoss)
    monkeypatch.setattr(NoisyLoss, "draws", [])
    full = train(config(data_dir, tmp_path / "full", device), log=quiet)
    full_draws = list(NoisyLoss.draws)

    def interrupt(epoch, record):
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config(data_dir, tmp_path / "cut", device), on_epoch_end=interrupt, log=quiet)
    assert load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["training"]["epochs_done"] == 2
    # Whatever the generators went through in between (another run in this process, say).
    torch.manual_seed(12345)
    if device == "cuda":
        torch.cuda.manual_seed(12345)
    NoisyLoss.draws.clear()
    resumed = train(config(data_dir, tmp_path / "cut", device, resume=True), log=quiet)
    assert len(full_draws) == 9 and len(NoisyLoss.draws) == 3
    return full, resumed, full_draws, list(NoisyLoss.draws)


def test_a_stochastic_loss_resumes_exactly_on_the_cpu(data_dir, tmp_path, monkeypatch):
    full, resumed, full_draws, resumed_draws = interrupt_and_resume(data_dir, tmp_path, "cpu", monkeypatch)
    assert all(torch.equal(a, b) for a, b in zip(full_draws[-3:], resumed_draws))
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    assert [h["train_loss"] for h in full.history] == [h["train_loss"] for h in resumed.history]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_stochastic_loss_draws_the_same_noise_after_a_resume_on_a_gpu(data_dir, tmp_path, monkeypatch):
    """The CUDA generator is restored too. Only the draws are compared: GPU kernels need not
    be bitwise deterministic, the generator is."""
    full, resumed, full_draws, resumed_draws = interrupt_and_resume(data_dir, tmp_path, "cuda", monkeypatch)
    assert all(torch.equal(a, b) for a, b in zip(full_draws[-3:], resumed_draws))
