"""Train a recipe end to end and print its certified accuracy.

    python -m recipes.train [RECIPE] [--key value ...]

RECIPE is one of fashion-mnist (default), mnist, cifar10, cifar10-long, cifar100. Any field
of lipnet.training.TrainConfig can be overridden, e.g. ``--epochs 2 --lr 1e-3
--eval-eps 36/255,72/255 --model-kwargs '{"width": 128}' --resume``. For several GPUs:
``torchrun --nproc_per_node=N -m recipes.train cifar10``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lipnet.checkpoint import CheckpointError
from lipnet.data import DatasetError, DatasetNotFoundError
from lipnet.training import train
from recipes import DEFAULT, RECIPES, describe, get_recipe


def parse(argv: list[str]):
    """``(recipe name, config)`` from the command line."""
    name = argv[0] if argv and not argv[0].startswith("-") else DEFAULT
    overrides = argv[1:] if argv and not argv[0].startswith("-") else argv
    return name, get_recipe(name).with_overrides(overrides)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(__doc__.strip() + "\n\nRecipes:\n" + "\n".join(f"  {name:<14} {describe(name)}" for name in RECIPES))
        return 0
    try:
        name, config = parse(argv)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        train(config)
    except (DatasetNotFoundError, DatasetError, CheckpointError, FileExistsError, FileNotFoundError,
            FloatingPointError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        checkpoint = Path(config.out_dir) / "checkpoint.pt"
        if checkpoint.exists():
            print(f"\ninterrupted; the last finished epoch is saved in {checkpoint}: run the same command with "
                  "--resume to continue", file=sys.stderr)
        else:
            print("\ninterrupted before the first epoch finished: nothing was saved", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
