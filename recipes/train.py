"""Train a recipe end to end and print its certified accuracy.

    python -m recipes.train [RECIPE] [--key value ...]

RECIPE is one of fashion-mnist (default), mnist, cifar10, cifar10-long, cifar100. Any
setting below can be overridden (``--key value`` or ``--key=value``), e.g. ``cifar10
--epochs 2 --lr 1e-3 --eval-eps 36/255,72/255 --model-kwargs '{"width": 128}'``, and
``--resume`` continues a run. For several GPUs: ``torchrun --nproc_per_node=N -m
recipes.train cifar10``. ``RECIPE --help`` lists that recipe's settings.
"""

from __future__ import annotations

import inspect
import json
import os
import signal
import sys
import threading
import typing
from pathlib import Path

from lipnet.checkpoint import CheckpointError, load_checkpoint
from lipnet.data import DatasetError, DatasetNotFoundError
from lipnet.training import TrainConfig, train
from recipes import DEFAULT, RECIPES, describe, get_recipe


def parse(argv: list[str]):
    """``(recipe name, config)`` from the command line."""
    name = argv[0] if argv and not argv[0].startswith("-") else DEFAULT
    overrides = argv[1:] if argv and not argv[0].startswith("-") else argv
    flags = {key for key, kind in typing.get_type_hints(TrainConfig).items() if kind is bool}

    def value_of(option: str) -> bool:  # a recipe's name after --out-dir is that setting's value
        return option.startswith("--") and "=" not in option and option[2:].replace("-", "_") not in flags

    for i, arg in enumerate(overrides):
        if arg in RECIPES and not (i and value_of(overrides[i - 1])):
            rest = " ".join(overrides[:i] + overrides[i + 1:])
            raise ValueError(f"the recipe name comes first: python -m recipes.train {arg} {rest}")
    return name, get_recipe(name).with_overrides(overrides)


def usage(name: str) -> str:
    """The ``--help`` text: this module's doc, the recipes, and every setting of recipe ``name``
    with its value there and what the settings mean (``TrainConfig``'s own documentation)."""
    config = get_recipe(name)
    recipes = "\n".join(f"  {recipe:<14} {describe(recipe)}" for recipe in RECIPES)
    settings = "\n".join(f"  --{key.replace('_', '-'):<18} {_shown(value)}" for key, value in config.to_dict().items())
    meaning = inspect.cleandoc(type(config).__doc__)
    return (f"{__doc__.strip()}\n\nRecipes:\n{recipes}\n\nSettings of {name} (--key value overrides one):\n{settings}"
            f"\n\nWhat they mean (lipnet.training.TrainConfig):\n{meaning}")


def _shown(value) -> str:
    """A setting as ``--key`` reads it back exactly (so that values copied from ``--help`` resume a run)."""
    if isinstance(value, bool) or value is None:
        return str(value).lower() if value is not None else "none"
    if isinstance(value, list):
        return ",".join(_shown(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value)
    return _shown_number(value) if isinstance(value, float) else str(value)


def _shown_number(value: float) -> str:
    """``0.002``, ``72/255`` (radii in pixel levels), else Python's shortest exact form."""
    if float(f"{value:g}") == value:
        return f"{value:g}"
    levels = round(value * 255)
    return f"{levels}/255" if levels / 255 == value else repr(value)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        name = argv[0] if argv and not argv[0].startswith("-") else DEFAULT
        try:
            print(usage(name))
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        return 0
    try:
        name, config = parse(argv)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    previous = signal.signal(signal.SIGTERM, _terminate) if threading.current_thread() is threading.main_thread() \
        else None
    try:
        train(config)
    except (DatasetNotFoundError, DatasetError, CheckpointError, OSError, FloatingPointError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as stop:
        how = "stopped by SIGTERM" if isinstance(stop, Terminated) else "interrupted"
        if os.environ.get("RANK", "0") == "0":  # under torchrun: the main process says it once
            print(_stopped(how, Path(config.out_dir) / "checkpoint.pt"), file=sys.stderr)
        return 128 + (signal.SIGTERM if isinstance(stop, Terminated) else signal.SIGINT)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


def _stopped(how: str, checkpoint: Path) -> str:
    """What a stopped run left, and how to continue it."""
    if checkpoint.exists():
        try:
            saved = f"epoch {int(load_checkpoint(checkpoint)['training']['epochs_done'])} is saved"
        except Exception:  # noqa: BLE001 - unreadable: --resume will say why
            saved = "its last checkpoint is"
        return f"\n{how}; {saved} in {checkpoint}: run the same command with --resume to continue from there"
    return f"\n{how} before its first checkpoint was written: nothing was saved"


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a job scheduler preempting the run), raised like Ctrl-C's KeyboardInterrupt
    so that the run stops the same way: a checkpoint being written is finished first
    (:func:`lipnet.training.interrupts.interrupts_deferred`), the folder's lock is released and the
    message says how to resume."""


def _terminate(signum, frame):
    raise Terminated()


if __name__ == "__main__":
    sys.exit(main())
