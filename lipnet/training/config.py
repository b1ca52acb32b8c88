"""The knobs of a training run, as one flat dataclass that recipes fill in and the CLI overrides."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from fractions import Fraction

from lipnet.training.losses import CertifiedMarginLoss

#: ``torch.compile`` modes a run may ask for (``compile_mode``).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
#: Those of them that replay CUDA graphs (each step then marks its start).
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
#: The smallest positive normal float32: an ``input_std`` below it cannot be stored by the model.
FLOAT32_TINY = 2.0 ** -126


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run depends on. A recipe is one of these; ``--key value`` overrides a field.

    Data
        dataset: registry name (``lipnet.data.DATASETS``). data_dir: folder to search first
        (both splits come from the first folder that holds either, so a run never mixes sources).
        download: fetch with torchvision when not found. train_subset / test_subset: use only
        the first N examples (development runs). crop_padding / flip: augmentation.
    Model
        model: registry name (``lipnet.models.MODELS``). model_kwargs: extra arguments.
        input_std: ``None`` normalizes by the data set's per-channel std (the model is then
        ``1 / min(std)``-Lipschitz in pixels, and its certificate counts that factor); a
        number uses that std for every channel: a finite number > 0 (below 0.01, a model of
        over 100-Lipschitz in pixels, is warned about: certified radii shrink as much).
    Optimization
        epochs, batch_size (global, over all processes), lr (peak), weight_decay,
        warmup_epochs (linear warm-up, at most half of the run, then ``schedule``: "cosine",
        "linear" or "constant", down to 0).
        time_budget: seconds for the epochs (``None``: no limit): their training and their
        test-set estimates (``eval_every``; a budgeted run also takes the first epoch's, to
        measure it), before a ``--resume`` too. NOT counted: start-up (data loading,
        building the model), checkpoint saves, and the final certification (``certify``),
        which runs once after the budget (its time is ``certify_seconds`` in the report).
        After the first epoch the run measures its steady speed and lowers ``epochs`` to what
        fits, and after every later epoch it checks what it has spent so far and lowers them
        again if needed (never raises them); the learning-rate schedule is re-planned for
        that count (so it still ends at 0) and the count is kept in the checkpoint, so
        ``--resume`` continues the same plan.
    Loss (see :mod:`lipnet.training.losses`)
        loss: "ce" (offset cross-entropy), "hinge" (multi-margin hinge) or "emma" (the
        cross-entropy of the logits an attack of size ``train_eps`` could reach, per class
        pair through the last layer: the margins the last-layer certificate needs).
        train_eps: the L2 radius, in pixels, trained for; the margin asked of the logits by
        "ce" and "hinge" is ``offset = sqrt(2) * train_eps * L`` unless ``offset`` is given.
        temperature: of the cross-entropies.
    Evaluation
        eval_eps: the radii of the final certification report. eval_batch_size.
        eval_every: the per-epoch test-set estimates (clean and margin accuracy, float32 without autocast) are
            taken every ``eval_every`` epochs and after the last one (``null`` in the metrics
            of the others); they are for monitoring only and do not change training.
    Operations
        seed, threads (CPU threads of torch, at most the CPUs the process may use; ``None``: its
        default), device ("auto": CUDA when available), amp ("auto": bf16 autocast on CUDA only),
        compile (torch.compile the training forward on CUDA; ignored on CPU, where compiling
        costs more than it saves), compile_mode (torch.compile's ``mode``: "default",
        "reduce-overhead" for CUDA graphs, which replay the many small kernels of the bounds
        without launch overhead, "max-autotune", "max-autotune-no-cudagraphs"), out_dir (one
        run at a time: a second run into it is refused), resume (from the last checkpoint
        written), save_every (the checkpoint and ``metrics.jsonl`` are written every
        ``save_every`` epochs and after the last one: on a GPU an epoch of a small model can take
        less than a few saves of its checkpoint, which training waits for), certify (final
        report), progress (bars).
    """

    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    download: bool = False
    train_subset: int | None = None
    test_subset: int | None = None
    crop_padding: int = 0
    flip: bool = False

    model: str = "convnet-s"
    model_kwargs: dict = field(default_factory=dict)
    input_std: float | None = None

    epochs: int = 10
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_epochs: float = 1.0
    schedule: str = "cosine"
    time_budget: float | None = None

    loss: str = "ce"
    train_eps: float = 0.5
    offset: float | None = None
    temperature: float = 0.25

    eval_eps: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0)
    eval_batch_size: int = 1000
    eval_every: int = 1

    seed: int = 0
    threads: int | None = None
    device: str = "auto"
    amp: str = "auto"
    compile: bool = False
    compile_mode: str = "default"
    out_dir: str = "runs/run"
    resume: bool = False
    save_every: int = 1
    certify: bool = True
    progress: bool = True

    #: Fields that may change when a run is resumed (they do not change what is computed).
    OPERATIONAL: typing.ClassVar[frozenset] = frozenset(
        {"data_dir", "download", "threads", "device", "compile", "compile_mode", "out_dir", "resume", "certify", "progress",
         "eval_batch_size", "eval_eps", "eval_every", "test_subset", "save_every"})

    def __post_init__(self):
        for name in ("data_dir", "out_dir"):  # paths are stored as text (checkpoints hold plain values)
            if isinstance(getattr(self, name), os.PathLike):
                object.__setattr__(self, name, os.fspath(getattr(self, name)))
        for name, kind in typing.get_type_hints(type(self)).items():
            if name != "OPERATIONAL":
                _check_type(name, getattr(self, name), kind)
        choices = {"loss": CertifiedMarginLoss.KINDS, "schedule": ("cosine", "linear", "constant"),
                   "amp": ("auto", "bf16", "none"), "compile_mode": COMPILE_MODES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("epochs", "batch_size", "eval_batch_size", "eval_every", "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "temperature", "train_eps", "weight_decay", "warmup_epochs", "offset", "time_budget",
                     "input_std"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int | float) and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if self.lr <= 0 or self.temperature <= 0 or self.train_eps < 0:
            raise ValueError("lr and temperature must be > 0 and train_eps >= 0")
        if self.lr > 1e6:  # float32 optimizer states overflow long before float64 does
            raise ValueError(f"lr must be at most 1e6, got {self.lr:g}")
        if self.warmup_epochs < 0 or self.weight_decay < 0:
            raise ValueError(f"warmup_epochs and weight_decay must be >= 0, got {self.warmup_epochs}, {self.weight_decay}")
        if self.input_std is not None and not self.input_std > 0:
            raise ValueError(f"input_std must be > 0 (or None for the data set's std), got {self.input_std}")
        if self.input_std is not None and self.input_std < FLOAT32_TINY:
            raise ValueError(f"input_std {self.input_std:g} is below the smallest normal float32 ({FLOAT32_TINY:.3g}), "
                             "the precision the model stores it in; the data sets' pixel stds are about 0.2 to 0.4 "
                             "(pixels in [0, 1]): give one of that size, or none for the data set's own")
        if self.crop_padding < 0:
            raise ValueError(f"crop_padding must be >= 0 pixels, got {self.crop_padding}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1 (or None for torch's default), got {self.threads}")
        CertifiedMarginLoss(self.loss, self.train_eps, offset=self.offset, temperature=self.temperature)  # its checks
        if self.time_budget is not None and not self.time_budget > 0:
            raise ValueError(f"time_budget must be > 0 seconds (or None), got {self.time_budget}")
        for name in ("train_subset", "test_subset"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 (or None for all), got {getattr(self, name)}")
        object.__setattr__(self, "eval_eps", tuple(sorted({float(e) for e in self.eval_eps})))
        if not self.eval_eps or any(not (math.isfinite(e) and e >= 0) for e in self.eval_eps):
            raise ValueError(f"eval_eps must be one or more finite radii >= 0, got {list(self.eval_eps)}")
        if not 0 <= self.seed < 2 ** 63:  # the seed of torch's generators
            raise ValueError(f"seed must be an integer in [0, 2^63), got {self.seed}")
        if not str(self.out_dir).strip():
            raise ValueError("out_dir must name a folder, got an empty path (use '.' for the current folder)")
        if self.data_dir is not None and not self.data_dir.strip():
            raise ValueError("data_dir must name a folder, got an empty path (use none for the default folders)")
        object.__setattr__(self, "model_kwargs", dict(self.model_kwargs))
        for name, value in self.to_dict().items():
            if not _is_plain(value):
                raise ValueError(f"{name} must hold plain Python values (str, int, float, bool, None, lists and "
                                 f"dicts of them: it is stored in checkpoints), got {value!r}")

    def replace(self, **changes) -> "TrainConfig":
        """A copy with some fields changed (``model_kwargs`` is merged, not replaced)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown setting(s) {sorted(unknown)}; known: {', '.join(self.to_dict())}")
        if "model_kwargs" in changes:
            changes["model_kwargs"] = {**self.model_kwargs, **changes["model_kwargs"]}
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Plain-Python form (stored in checkpoints and reports)."""
        out = dataclasses.asdict(self)
        out["eval_eps"] = list(self.eval_eps)
        return out

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        """The config of :meth:`to_dict`'s output (e.g. a checkpoint's); settings this version of
        lipnet does not know are a clear error, not a traceback."""
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"the stored config has setting(s) this version of lipnet does not know: {unknown} "
                             "(written by another version?)")
        return cls(**values)

    def changed_fields(self, other: "TrainConfig") -> list[str]:
        """Names of the non-operational fields that differ from ``other``."""
        mine, theirs = self.to_dict(), other.to_dict()
        return [k for k in mine if k not in self.OPERATIONAL and mine[k] != theirs[k]]

    def with_overrides(self, args: list[str]) -> "TrainConfig":
        """Apply ``["--key", "value", ...]`` or ``["--key=value", ...]`` (``--key`` alone sets a boolean to true).

        Keys are field names with ``-`` or ``_``. Values are parsed by the field's type:
        numbers accept fractions (``36/255``), lists are comma separated, ``none`` clears an
        optional field, ``model_kwargs`` takes JSON (``'{"width": 64}'``, merged, also when
        given more than once).
        """
        types_ = typing.get_type_hints(type(self))
        changes, i = {}, 0
        while i < len(args):
            if not args[i].startswith("--"):
                raise ValueError(f"expected --key, got {args[i]!r}")
            option, equals, inline = args[i].partition("=")  # --key value, or --key=value
            key = option[2:].replace("-", "_")
            if key not in types_ or key == "OPERATIONAL":
                raise ValueError(f"unknown setting {option}; known: "
                                 + ", ".join("--" + k.replace("_", "-") for k in self.to_dict()))
            if equals:
                value = _parse(inline, types_[key], key)
                i += 1
            elif i + 1 < len(args) and not args[i + 1].startswith("--"):
                value = _parse(args[i + 1], types_[key], key)
                i += 2
            elif types_[key] is bool:
                value = True
                i += 1
            else:
                raise ValueError(f"{option} needs a value")
            if key == "model_kwargs" and key in changes:
                value = {**changes[key], **value}
            changes[key] = value
        return self.replace(**changes)


_KIND_NAMES = {int: "an int", float: "a number", bool: "a bool (true or false)", str: "a str", dict: "a dict"}


def _unwrap_optional(kind) -> tuple[typing.Any, bool]:
    """``(T, True)`` for a field of type ``T | None``, else ``(kind, False)``."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType) and type(None) in typing.get_args(kind):
        return next(a for a in typing.get_args(kind) if a is not type(None)), True
    return kind, False


def _check_type(name: str, value, kind) -> None:
    """Refuse a value of the wrong type for field ``name`` (a ``bool`` for an int, a string for a number ...)."""
    kind, optional = _unwrap_optional(kind)
    if optional and value is None:
        return
    if typing.get_origin(kind) is tuple:
        ok = type(value) in (list, tuple) and all(type(v) in (int, float) for v in value)
        expected = "a list of numbers"
    else:
        ok = type(value) in (int, float) if kind is float else isinstance(value, dict) if kind is dict else \
            type(value) is kind
        expected = _KIND_NAMES[kind]
    if not ok:
        raise ValueError(f"{name} must be {expected}{' or None' if optional else ''}, got {value!r} "
                         f"({type(value).__name__})")


def _is_plain(value) -> bool:
    """Whether ``value`` is made only of exact builtin types (what ``torch.load(weights_only=True)`` reads)."""
    if type(value) in (str, int, float, bool, type(None)):
        return type(value) is not float or math.isfinite(value)
    if type(value) in (list, tuple):
        return all(_is_plain(v) for v in value)
    if type(value) is dict:
        return all(type(k) is str and _is_plain(v) for k, v in value.items())
    return False


def parse_number(text: str) -> float:
    """``"0.5"``, ``"36/255"`` -> float."""
    if "/" not in text:
        return float(text)
    try:
        return float(Fraction(text.strip()))
    except ZeroDivisionError:
        raise ValueError("the fraction's denominator is 0") from None


def _parse(text: str, kind, key: str):
    kind, optional = _unwrap_optional(kind)
    if optional and text.lower() == "none":
        return None
    try:
        if kind is bool:
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError("expected true or false")
            return text.lower() in ("true", "1", "yes")
        if kind is int:
            return int(text)
        if kind is float:
            return parse_number(text)
        if kind is str:
            return text
        if kind is dict:
            value = json.loads(text)
            if not isinstance(value, dict):
                raise ValueError("expected a JSON object")
            return value
        if typing.get_origin(kind) is tuple:
            items = text.split(",")
            if any(not item.strip() for item in items):
                raise ValueError("an empty item (two commas in a row, or one at either end); list the values "
                                 "separated by single commas, e.g. 0.1,36/255")
            return tuple(parse_number(item) for item in items)
    except (ValueError, OverflowError, json.JSONDecodeError) as exc:
        raise ValueError(f"--{key.replace('_', '-')}: cannot parse {text!r}: {exc}") from exc
    raise TypeError(f"no parser for {key}: {kind}")
