"""The training loop shared by every recipe: device-resident data, exact resume, DDP, final report.

One call, :func:`train`, runs a :class:`~lipnet.training.TrainConfig` end to end and writes to
``config.out_dir``:

* ``checkpoint.pt`` after every epoch (atomic): model spec and weights, optimizer, scheduler,
  RNG states, epoch and metric history; ``--resume`` continues from it exactly;
* ``metrics.jsonl``: one JSON object per epoch (training-time float32 estimates);
* ``model.pt`` at the end (for :func:`lipnet.checkpoint.load_model` and ``python -m lipnet.certify``);
* the certification report (:func:`lipnet.training.report.certification_report`);
* ``.lock`` while the run goes on (:mod:`lipnet.training.lock`): a second run into the same
  folder is refused instead of overwriting it.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from lipnet.bounds.autocast import ieee_float32_matmuls
from lipnet.bounds.gram import refines_exceeding
from lipnet.certify.accuracy import split_last_linear
from lipnet.checkpoint import (CheckpointError, load_checkpoint, model_payload, remove_stale_temporaries,
                               save_checkpoint, save_model)
from lipnet.data import DatasetInfo, DeviceLoader, ImageDataset, dataset_info, load_dataset
from lipnet.export.runtime import atomic_write
from lipnet.models import build_model
from lipnet.nn import InputNormalization
from lipnet.nn.normalized import GramNormalized
from lipnet.training.config import CUDA_GRAPH_MODES, TrainConfig
from lipnet.training.distributed import Distributed, init_distributed, shutdown_distributed
from lipnet.training.interrupts import interrupts_deferred
from lipnet.training.lock import FolderLock
from lipnet.training.losses import CertifiedMarginLoss
from lipnet.training.report import PLOTS, REPORT, certification_report
from lipnet.training.schedule import make_scheduler, plan_epochs

CHECKPOINT, MODEL, METRICS = "checkpoint.pt", "model.pt", "metrics.jsonl"
#: An input std below this (a model over 100-Lipschitz in pixels) is warned about.
TINY_STD = 0.01


@dataclass
class RunResult:
    """What :func:`train` returns: the trained model (unwrapped, eval mode) and what it measured."""

    out_dir: Path
    model: nn.Module
    history: list[dict]
    report: dict | None
    train_seconds: float


def train(config: TrainConfig, *, on_epoch_end: Callable[[int, dict], None] | None = None,
          log: Callable[[str], None] = print) -> RunResult:
    """Train ``config`` (under ``torchrun``: with DDP) and, on the main process, certify the result.

    Args:
        config: the run's settings (a recipe with overrides).
        on_epoch_end: called as ``on_epoch_end(epoch, metrics)`` on every process after each
            epoch, once its checkpoint is written if it has one (every ``save_every`` epochs and
            after the last; ``epoch`` counts from 1).
        log: where the main process prints its one-line summaries.
    """
    if config.threads is not None:
        cpus = _available_cpus()
        if config.threads > cpus:
            raise ValueError(f"threads {config.threads} is more than the {cpus} CPUs this process may use; ask for "
                             "at most that many (or none for torch's default)")
        torch.set_num_threads(config.threads)
    env = init_distributed(config.device)
    try:
        # Full float32 products for the whole run: a compiled step's Gram bounds follow the
        # setting in force when it compiles (eager bounds pin it themselves), and with TF32 or
        # bfloat16 passes a bound can fall below the norm it divides by. The network's own
        # products run under autocast (bf16) or in cuDNN, which this does not touch.
        with ieee_float32_matmuls():
            return _Run(config, env, log).run(on_epoch_end)
    finally:
        if env.enabled:
            shutdown_distributed()


def _available_cpus() -> int:
    """The CPUs this process may run on (its affinity where the system tells it)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def build_run_model(config: TrainConfig, info: DatasetInfo) -> nn.Module:
    """The model of ``config`` for data set ``info``, with its input normalization inside."""
    channels, height, width = info.shape
    if height != width:
        raise ValueError(f"square images expected, got {height}x{width}")
    std = list(info.std) if config.input_std is None else [float(config.input_std)] * channels
    if min(std) < TINY_STD:
        # Sound (the certificate counts 1 / min(std)) but every certified radius shrinks as much.
        source = f"input_std {min(std):g}" if config.input_std is not None else f"{info.name}'s std {min(std):g}"
        warnings.warn(f"{source} makes the model up to {1 / min(std):.4g}-Lipschitz in pixels (the input normalization "
                      f"divides by it), so its certified radii are {1 / min(std):.4g} times smaller than a 1-Lipschitz "
                      "model's at the same margins; pixel stds of the data sets are about 0.2 to 0.4 (pixels in [0, 1])",
                      stacklevel=2)
    from_data = {"in_channels": channels, "num_classes": info.num_classes, "input_size": height,
                 "mean": list(info.mean), "std": std}
    for key in from_data.keys() & config.model_kwargs.keys():
        hint = " (the normalization's std: use --input-std)" if key == "std" else ""
        raise ValueError(f"model_kwargs cannot set {key}: the data set sets it{hint}")
    try:
        return build_model(config.model, **from_data, **config.model_kwargs)
    except RuntimeError as exc:  # e.g. a negative width reaching torch
        raise ValueError(f"model {config.model!r} with {config.model_kwargs}: {exc}") from exc


def nominal_lipschitz(model: nn.Module) -> float:
    """Training-time Lipschitz estimate: ``1 / min(std)`` of each input normalization.

    The Gram layers and activations are 1-Lipschitz by construction, so only the input
    normalization scales the constant. This sets the loss margin; certificates use
    :func:`lipnet.certify.lipschitz_bound` instead.
    """
    return math.prod(m.lipschitz_bound() for m in model.modules() if isinstance(m, InputNormalization))


def logit_margins(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``f_y - max_{j != y} f_j`` per example (negative when the prediction is wrong)."""
    if logits.dim() != 2 or logits.shape[1] < 2 or not logits.is_floating_point():
        raise ValueError(f"logits must be floating (N, K) with K >= 2 classes (a margin needs a wrong class), got "
                         f"{logits.dtype} {tuple(logits.shape)}")
    true = logits.gather(1, targets[:, None]).squeeze(1)
    others = logits.scatter(1, targets[:, None], -math.inf)
    return true - others.amax(dim=1)


def _last_linear(model: nn.Module) -> nn.Linear:
    """The last layer of a model whose loss needs its weight (the ``"emma"`` loss)."""
    split = split_last_linear(model)
    if split is None:
        raise ValueError(f"the 'emma' loss needs a model ending in a linear layer (an nn.Sequential whose last module is "
                         f"a GramLinear or nn.Linear), got {type(model).__name__}; use loss 'ce' or 'hinge'")
    return split[1]


def _check_out_dir(out_dir: Path) -> None:
    """Refuse an ``out_dir`` that cannot hold the run's files, without creating it (a run that
    fails on its data leaves nothing behind)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"out_dir {out_dir} is a file; give a folder for the run's checkpoints and report")
    existing = next(folder for folder in (out_dir, *out_dir.absolute().parents) if folder.exists())
    if not existing.is_dir():
        raise NotADirectoryError(f"out_dir {out_dir} cannot be created: {existing} is a file; give a folder for the "
                                 "run's checkpoints and report")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"out_dir {out_dir}: cannot write into {existing.absolute()} (permission denied); "
                              "choose another --out-dir")


def _check_run_folder(out_dir: Path, resume: bool) -> None:
    """Refuse to start a new run over an earlier one's files, or to resume without a checkpoint."""
    if not resume:
        earlier = [name for name in (CHECKPOINT, MODEL, METRICS, REPORT, *PLOTS) if (out_dir / name).exists()]
        if earlier:
            hint = "pass --resume to continue it, or " if CHECKPOINT in earlier else ""
            raise FileExistsError(f"{out_dir} holds an earlier run ({', '.join(earlier)}): {hint}choose "
                                  "another --out-dir (nothing was overwritten)")
    elif not (out_dir / CHECKPOINT).exists():
        raise FileNotFoundError(f"--resume: there is no checkpoint at {(out_dir / CHECKPOINT).absolute()} to continue")


class _Run:
    def __init__(self, config: TrainConfig, env: Distributed, log: Callable[[str], None]):
        self.config, self.env = config, env
        self.log = log if env.is_main else (lambda message: None)
        self.out_dir = Path(config.out_dir)
        _check_out_dir(self.out_dir)
        # Before the data is read and the lock creates the folder: a run that cannot start
        # leaves nothing behind. _restore checks again, under the lock.
        _check_run_folder(self.out_dir, config.resume)
        if config.batch_size % env.world_size:
            raise ValueError(f"batch_size {config.batch_size} must be divisible by the {env.world_size} processes")
        torch.manual_seed(config.seed)
        # The model first: a wrong name or argument is refused before the data is read.
        info = dataset_info(config.dataset)
        self.model = build_run_model(config, info).to(env.device)
        if config.crop_padding >= min(info.shape[1:]):
            raise ValueError(f"crop_padding {config.crop_padding} must be smaller than the {min(info.shape[1:])}-pixel "
                             f"images of {info.name}: larger shifts crop mostly padding")
        self.train_data, self.test_data = self._load_data()
        self._data_description = {split: {"source": data.source, "examples": len(data), "sha256": data.fingerprint()}
                                  for split, data in (("train", self.train_data), ("test", self.test_data))}
        for split, data in (("train", self.train_data), ("test", self.test_data)):
            if len(data) < env.world_size:
                raise ValueError(f"the {split} set has {len(data)} example(s), fewer than the {env.world_size} "
                                 "process(es): nothing to train or evaluate on")
        self.loss_fn = CertifiedMarginLoss(config.loss, config.train_eps, nominal_lipschitz(self.model),
                                           config.offset, config.temperature)
        self.margin = self.loss_fn.offset
        self.last_layer = _last_linear(self.model) if self.loss_fn.needs_last_weight else None
        self.loader = DeviceLoader(self.train_data, config.batch_size // env.world_size, device=env.device,
                                   padding=config.crop_padding, flip=config.flip, seed=config.seed,
                                   rank=env.rank, world_size=env.world_size)
        self.test_loader = DeviceLoader(self.test_data, config.eval_batch_size, device=env.device, shuffle=False,
                                        drop_last=False, rank=env.rank, world_size=env.world_size)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.steps = len(self.loader)
        self.epochs = config.epochs  # lowered after the first epoch when a time budget asks for it
        self.scheduler = self._make_scheduler()
        if config.warmup_epochs > config.epochs / 2:
            self.log(f"warm-up of {config.warmup_epochs:g} epochs shortened to half of the {config.epochs} epochs, "
                     "so that the learning rate decays")
        self._steady_step_seconds = None
        self.amp_dtype = torch.bfloat16 if config.amp == "bf16" or (
            config.amp == "auto" and env.device.type == "cuda") else None
        if env.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels
            # The per-forward finiteness check costs a host sync per layer; divergence is caught
            # once per epoch instead (loss and weights), before any checkpoint is written.
            for layer in self.model.modules():
                if isinstance(layer, GramNormalized):
                    layer.check_finite = False

    def _load_data(self) -> tuple[ImageDataset, ImageDataset]:
        config = self.config
        if config.download and self.env.enabled and not self.env.is_main:
            self.env.barrier()  # let the main process download first
        train = load_dataset(config.dataset, "train", data_dir=config.data_dir, download=config.download)
        test = load_dataset(config.dataset, "test", data_dir=config.data_dir, download=config.download)
        if config.download and self.env.enabled and self.env.is_main:
            self.env.barrier()
        return train.subset(config.train_subset), test.subset(config.test_subset)

    # -- the loop ---------------------------------------------------------------------------

    def run(self, on_epoch_end) -> RunResult:
        if not self.env.is_main:
            return self._run(on_epoch_end)
        with FolderLock(self.out_dir):
            return self._run(on_epoch_end)

    def _run(self, on_epoch_end) -> RunResult:
        config, env = self.config, self.env
        start_epoch, history = self._restore()
        if env.is_main:
            for path in remove_stale_temporaries(self.out_dir):
                self.log(f"removed {path.name}, left by a save that was killed mid-write")
        if start_epoch:
            self.log(f"resumed {self.out_dir / CHECKPOINT} after epoch {start_epoch}")
        forward = self.model
        if env.enabled:
            device_ids = [env.device.index] if env.device.type == "cuda" else None
            forward = nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids)
        # CUDA graphs (reduce-overhead, max-autotune) reuse their output memory on the next
        # replay; each step marks its start so that the previous step's logits may be freed.
        self._cuda_graphs = False
        if config.compile and env.device.type == "cuda":
            forward = torch.compile(forward, mode=config.compile_mode)
            self._cuda_graphs = config.compile_mode in CUDA_GRAPH_MODES
        self.log(f"{config.dataset}: train from {self.train_data.source}; test from {self.test_data.source}")
        self.log(f"{config.dataset}: {len(self.train_data)} train / {len(self.test_data)} test images, model "
                 f"{config.model}, {sum(p.numel() for p in self.model.parameters()):,} parameters, {env.world_size} "
                 f"process(es) on {env.device}, margin {self.margin:.4g} (train eps {config.train_eps:g})")
        train_seconds = sum(h["train_seconds"] for h in history)
        self._first_epoch = epoch = start_epoch
        while epoch < self.epochs:
            record = self._epoch(forward, epoch)
            history.append(record)
            train_seconds += record["train_seconds"]
            if config.time_budget is not None:
                self._fit_budget(history)
                record["lr"] = self.scheduler.get_last_lr()[0]  # the rate the re-planned schedule goes on with
                if record["test_acc"] is None and epoch + 1 >= self.epochs:  # the plan made it the last epoch
                    start = time.perf_counter()
                    record["test_acc"], record["test_margin_acc"], record["test_images"] = self._test_metrics()
                    record["eval_seconds"] += time.perf_counter() - start
            if env.is_main and ((epoch + 1) % config.save_every == 0 or epoch + 1 >= self.epochs):
                self._save(epoch + 1, history)
            self.log(_summary(record, self.epochs))
            if on_epoch_end is not None:
                on_epoch_end(epoch + 1, record)
            env.barrier()
            epoch += 1
        self.model.eval()
        report = None
        if env.is_main:
            save_model(self.out_dir / MODEL, self.model, **self._info(self.epochs, history))
            if config.certify:
                # The test set already on the device, so the uint8 -> float conversion happens there.
                report = certification_report(self.model, self.test_loader.data, config.eval_eps, self.out_dir,
                                              history=history,
                                              extra={"epochs": self.epochs, "train_seconds": train_seconds,
                                                     "config": config.to_dict(), "data": self._data_info()},
                                              device=env.device, batch_size=config.eval_batch_size,
                                              progress=config.progress)
                self.log(report.pop("table"))
                self.log(f"trained in {train_seconds:.0f} s, certified in {report['certify_seconds']:.0f} s; "
                         f"wrote {self.out_dir}")
        env.barrier()
        return RunResult(self.out_dir, self.model, history, report, train_seconds)

    def _last_weight(self) -> torch.Tensor:
        """The weight the last layer applies, with its gradient, for a loss that needs it."""
        last = self.last_layer
        return last.normalized_weight() if isinstance(last, GramNormalized) else last.weight

    def _epoch(self, forward: nn.Module, epoch: int) -> dict:
        config, env = self.config, self.env
        self.model.train()
        totals = torch.zeros(3, dtype=torch.float64, device=env.device)  # loss sum, correct, margin ok
        count = 0
        start = time.perf_counter()
        bar = tqdm(self.loader.epoch(epoch), total=len(self.loader), desc=f"epoch {epoch + 1}/{self.epochs}",
                   leave=False, disable=not (config.progress and env.is_main))
        # The steady speed is measured in the first epoch of each process (after a resume too:
        # that epoch's compilation and warm-up would make the time-budget check stop too soon).
        timed_from = min(5, self.steps // 4) if epoch == self._first_epoch and config.time_budget is not None \
            else None
        for step, (x, y) in enumerate(bar):
            if step == timed_from:  # past compilation and warm-up: the steady speed starts here
                steady_start = self._synchronized_time()
            if self._cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()
            with torch.autocast(env.device.type, dtype=self.amp_dtype or torch.bfloat16,
                                enabled=self.amp_dtype is not None):
                logits = forward(x)
            if self.last_layer is None:
                loss = self.loss_fn(logits, y)
            else:
                loss = self.loss_fn(logits, y, last_weight=self._last_weight())
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            with torch.no_grad():
                margins = logit_margins(logits.detach().float(), y)
                totals += torch.stack([loss.detach().double() * len(y), (margins > 0).sum().double(),
                                       (margins >= self.margin).sum().double()])
            count += len(y)
            if step % 25 == 0 and not bar.disable:
                bar.set_postfix(loss=f"{float(totals[0]) / count:.4f}")
        end = self._synchronized_time()
        train_seconds = end - start
        if timed_from is not None:
            self._steady_step_seconds = (end - steady_start) / max(1, self.steps - timed_from)
        loss_sum, correct, margin_ok, count = env.sum([*totals.tolist(), count])
        self._check_finite(epoch, loss_sum)
        start = time.perf_counter()
        # A time-budgeted run also takes the first epoch's estimate: the budget counts them, so
        # their cost is measured before the plan.
        if (epoch + 1) % config.eval_every == 0 or epoch + 1 >= self.epochs or (
                epoch == 0 and config.time_budget is not None):
            test_acc, test_margin_acc, test_images = self._test_metrics()
        else:
            test_acc = test_margin_acc = test_images = None
        return {
            "epoch": epoch + 1,
            "lr": self.scheduler.get_last_lr()[0],
            "train_loss": loss_sum / count,
            "train_acc": correct / count,
            "train_margin_acc": margin_ok / count,
            "test_acc": test_acc,
            "test_margin_acc": test_margin_acc,
            "test_images": test_images,
            "margin": self.margin,
            "train_seconds": train_seconds,
            "eval_seconds": time.perf_counter() - start,
            "images_per_second": count / train_seconds,
        }

    @torch.no_grad()
    def _test_metrics(self) -> tuple[float, float, int]:
        """Clean and margin accuracy on the test set, and its size (float32 estimates without the
        training's autocast; not certificates)."""
        self.model.eval()
        totals = torch.zeros(2, dtype=torch.float64, device=self.env.device)
        count = 0
        for x, y in self.test_loader.epoch(0):
            with torch.autocast(self.env.device.type, enabled=False):
                logits = self.model(x)
            margins = logit_margins(logits.float(), y)
            totals += torch.stack([(margins > 0).sum().double(), (margins >= self.margin).sum().double()])
            count += len(y)
        correct, margin_ok, count = self.env.sum([*totals.tolist(), count])
        return correct / count, margin_ok / count, int(count)

    def _synchronized_time(self) -> float:
        if self.env.device.type == "cuda":
            torch.cuda.synchronize(self.env.device)
        return time.perf_counter()

    # -- the schedule -------------------------------------------------------------------------

    def _make_scheduler(self) -> torch.optim.lr_scheduler.LambdaLR:
        config = self.config
        total, warmup = self.epochs * self.steps, round(config.warmup_epochs * self.steps)
        # At most half of the run warms up, so that the rate always decays (a short run of a long
        # recipe, or one re-planned for a time budget).
        return make_scheduler(self.optimizer, total, min(warmup, total // 2), config.schedule)

    def _fit_budget(self, history: list[dict]) -> None:
        """After each epoch, lower the planned epochs so that the run fits ``config.time_budget``
        (the same plan on every process). What counts is everything measured so far (every
        epoch's training and test-set estimates, before a resume too) and, for each further
        epoch, the training speed (the steady steps of this process's first epoch, then the mean
        of the epochs since) plus the last estimate's time when it takes one. The
        plan is only ever lowered; the learning-rate schedule is re-planned to end at 0."""
        config, done = self.config, len(history)
        spent = sum(h["train_seconds"] + h["eval_seconds"] for h in history)
        # The first epoch of this process includes compilation and warm-up: its steady steps
        # stand for it; later, the mean of the epochs since (one slow epoch would lower the plan,
        # which never rises again).
        steady = [h["train_seconds"] for h in history[self._first_epoch + 1:]]
        per_epoch = sum(steady) / len(steady) if steady else self._steady_step_seconds * self.steps
        eval_seconds = next((h["eval_seconds"] for h in reversed(history) if h["test_acc"] is not None), 0.0)
        planned = plan_epochs(config.time_budget, spent, per_epoch, self.epochs, epochs_done=done,
                              eval_seconds=eval_seconds, eval_every=config.eval_every)
        planned = min(self.epochs, round(self.env.sum([planned if self.env.is_main else 0])[0]))
        if done == 1:
            self.log(f"time budget {config.time_budget:g} s: about {per_epoch:.1f} s per epoch after the first "
                     f"({spent:.1f} s), {eval_seconds:.1f} s per test-set estimate, so {planned} of {config.epochs} "
                     "epochs")
        elif planned < self.epochs:
            self.log(f"time budget {config.time_budget:g} s: {spent:.1f} s spent after epoch {done} (training and "
                     f"test-set estimates), so {planned} epochs instead of {self.epochs}")
        self._replan(planned)

    def _replan(self, epochs: int) -> None:
        """Re-plan the learning-rate schedule for ``epochs`` epochs in all, at the current step."""
        if epochs == self.epochs:
            return
        done = self.scheduler.last_epoch
        self.epochs = epochs
        self.scheduler = self._make_scheduler()
        self.scheduler.last_epoch = done - 1
        with warnings.catch_warnings():  # the optimizer has stepped, just not since this scheduler exists
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
            self.scheduler.step()  # the learning rate of step ``done`` under the new plan

    def _check_finite(self, epoch: int, loss_sum: float) -> None:
        bad = [name for name, p in self.model.named_parameters() if not bool(torch.isfinite(p).all())]
        if bad or not math.isfinite(loss_sum):
            where = self.out_dir / CHECKPOINT
            kept = f"the checkpoint of epoch {epoch} is kept at {where}" if epoch else "no checkpoint was written"
            raise FloatingPointError(
                f"training diverged in epoch {epoch + 1} (loss sum {loss_sum}, non-finite weights: {bad or 'none'}); "
                f"{kept}. Lower --lr (or raise --temperature) and start again in a new --out-dir.")

    # -- checkpoints --------------------------------------------------------------------------

    def _info(self, epochs_done: int, history: list[dict]) -> dict:
        # Whether the Gram bounds were screened alone (GPU, compiled): the function the weights
        # were trained for, which `python -m lipnet.certify` then computes on any device.
        screened = not refines_exceeding(self.env.device)
        return {"dataset": self.train_data.info.to_dict(), "config": self.config.to_dict(), "epoch": epochs_done,
                "metrics": history[-1] if history else {}, "bounds_screened_alone": screened,
                "data": self._data_info()}

    def _data_info(self) -> dict:
        """Where each split was read, how many examples it has and their fingerprint (stored in
        checkpoints and the report)."""
        return {split: dict(description) for split, description in self._data_description.items()}

    def _save(self, epochs_done: int, history: list[dict]) -> None:
        payload = model_payload(self.model, **self._info(epochs_done, history))
        rng = {"torch": torch.get_rng_state()}
        if self.env.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.env.device)
        payload["training"] = {"epochs_done": epochs_done, "epochs": self.epochs,
                               "optimizer": self.optimizer.state_dict(),
                               "scheduler": self.scheduler.state_dict(), "rng": rng, "history": history,
                               "world_size": self.env.world_size}
        lines = "".join(json.dumps(record) + "\n" for record in history)
        with interrupts_deferred():  # a checkpoint is written whole, then Ctrl-C or SIGTERM stops the run
            save_checkpoint(self.out_dir / CHECKPOINT, payload)
            # After the checkpoint, so the metrics never run ahead of what --resume restores.
            atomic_write(self.out_dir / METRICS, lambda out: out.write(lines.encode()))

    def _restore(self) -> tuple[int, list[dict]]:
        path = self.out_dir / CHECKPOINT
        _check_run_folder(self.out_dir, self.config.resume)
        if not self.config.resume:
            return 0, []
        # On the CPU: the optimizer keeps its step counters there (on the GPU they would cost
        # host syncs every step); load_state_dict moves the rest to the parameters' device.
        payload = load_checkpoint(path, map_location="cpu")
        saved = _stored_config(payload, path)
        changed = saved.changed_fields(self.config)
        if changed:
            old, new = saved.to_dict(), self.config.to_dict()
            diff = ", ".join(f"{k}: {old[k]!r} -> {new[k]!r}" for k in changed)
            raise ValueError(f"--resume with different settings ({diff}); resume with the settings of the run, or "
                             "start a new run in another --out-dir")
        training = _training_state(payload, path, self.config.epochs)
        self._check_same_training_data(payload["info"].get("data"))
        if training["world_size"] != self.env.world_size:
            self.log(f"warning: the run used {training['world_size']} process(es), now {self.env.world_size}: it "
                     "continues, but the data order differs from an uninterrupted run")
        _load_part(path, "weights", self.model.load_state_dict, payload["state_dict"])
        self._replan(training.get("epochs", self.epochs))  # the plan of a time-budgeted run
        # After the re-plan: the optimizer holds the learning rate to go on with.
        _load_part(path, "optimizer state", self.optimizer.load_state_dict, training["optimizer"])
        _load_part(path, "scheduler state", self.scheduler.load_state_dict, training["scheduler"])
        _load_part(path, "random number generator state", lambda rng: torch.set_rng_state(rng["torch"].cpu()),
                   training["rng"])
        if "cuda" in training["rng"] and self.env.device.type == "cuda":
            torch.cuda.set_rng_state(training["rng"]["cuda"].cpu(), self.env.device)
        return training["epochs_done"], list(training["history"])

    def _check_same_training_data(self, saved: dict | None) -> None:
        """Refuse to resume on other training images (another size, or the same size with another
        fingerprint); say so when the same images come from another place. Checkpoints from before
        these records pass (without a fingerprint: only the size is compared)."""
        if not isinstance(saved, dict) or not isinstance(saved.get("train"), dict):
            return
        before, now = saved["train"], self._data_info()["train"]
        if before.get("examples") != now["examples"]:
            raise ValueError(f"--resume on another training set: the run trained on {before.get('examples')} images "
                             f"({before.get('source')}), now {now['examples']} ({now['source']}); resume with the "
                             "same data, or start a new run in another --out-dir")
        if before.get("sha256", now["sha256"]) != now["sha256"]:
            raise ValueError(f"--resume on another training set: the run trained on {now['examples']} images "
                             f"({before.get('source')}, sha256 {before['sha256'][:12]}...), now {now['examples']} "
                             f"other images ({now['source']}, sha256 {now['sha256'][:12]}...); resume with the same "
                             "data, or start a new run in another --out-dir")
        if before.get("source") != now["source"]:
            same = "the same images" if "sha256" in before else "same size"
            self.log(f"note: the training set was read from {before.get('source')}, now from {now['source']} ({same})")


#: What :meth:`_Run._save` stores under a checkpoint's ``"training"`` (``"epochs"`` only since
#: time budgets: the planned count).
_TRAINING_STATE = ("epochs_done", "optimizer", "scheduler", "rng", "history", "world_size")


def _stored_config(payload: dict, path: Path) -> TrainConfig:
    """The settings of the run that wrote checkpoint ``payload`` (a :class:`CheckpointError` if
    they are missing or invalid)."""
    values = (payload.get("info") or {}).get("config")
    if not isinstance(values, dict):
        raise CheckpointError(f"{path} lacks the run's settings (info['config']): it was not written by a training "
                              "run, so it cannot be resumed; start a new run in another --out-dir")
    try:
        return TrainConfig.from_dict(values)
    except ValueError as exc:
        raise CheckpointError(f"{path}: its stored settings are invalid ({exc}); start a new run in another "
                              "--out-dir") from exc


def _training_state(payload: dict, path: Path, epochs: int) -> dict:
    """The checkpoint's training state, checked for what resuming reads from it."""
    training = payload.get("training")
    if not isinstance(training, dict):
        raise CheckpointError(f"{path} is a model checkpoint without training state; it cannot be resumed")
    for key in _TRAINING_STATE:
        if key not in training:
            raise CheckpointError(f"{path} lacks its {key!r} training state (written by another version of lipnet, "
                                  "or edited); it cannot be resumed: start a new run in another --out-dir")
    done, planned, history = training["epochs_done"], training.get("epochs", epochs), training["history"]
    if not (type(done) is int and type(planned) is int and 0 <= done <= planned <= epochs):
        raise CheckpointError(f"{path} says it was saved after epoch {done!r} of {planned!r}, which a run of {epochs} "
                              "epochs cannot have written; it cannot be resumed")
    if not (isinstance(history, list) and len(history) == done and all(isinstance(h, dict) for h in history)):
        count = len(history) if isinstance(history, list) else type(history).__name__
        raise CheckpointError(f"{path} holds {count} epochs of metrics for {done} epoch(s) done; it is damaged and "
                              "cannot be resumed")
    if not (isinstance(training["rng"], dict) and "torch" in training["rng"]):
        raise CheckpointError(f"{path} lacks the random number generator's state (rng['torch']); it cannot be resumed")
    return training


def _load_part(path: Path, part: str, load: Callable[[object], object], state) -> None:
    """``load(state)``, a part of the checkpoint at ``path``, with a :class:`CheckpointError` that
    names the part if it does not fit this run."""
    try:
        load(state)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: cannot load its {part} into this run ({type(exc).__name__}: {str(exc)[:400]}); "
                              "was it written by another version of lipnet? Start a new run in another --out-dir") \
            from exc


def _summary(record: dict, epochs: int) -> str:
    test = ""
    if record["test_acc"] is not None:
        test = (f"test acc {100 * record['test_acc']:5.2f}%  "
                f"test margin>={record['margin']:.3g} {100 * record['test_margin_acc']:5.2f}% (estimate)  ")
    return (f"epoch {record['epoch']:>3}/{epochs}  loss {record['train_loss']:.4f}  "
            f"train acc {100 * record['train_acc']:5.2f}%  {test}"
            f"{record['train_seconds']:.1f}s  {record['images_per_second']:.0f} img/s")
