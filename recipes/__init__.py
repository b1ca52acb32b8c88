"""Recipes: one short :class:`~lipnet.training.TrainConfig` per task, run by ``python -m recipes.train``."""

import os
import sys

# OpenMP threads that sleep while waiting instead of spinning: on a busy or shared CPU the
# spinning default slows PyTorch down several-fold. Only effective before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _started_as_command_line(argv: list[str]) -> bool:
    """Whether the interpreter's command line ``argv`` (``sys.orig_argv``) runs ``python -m recipes.train``."""
    return any(a == "-m" and b == "recipes.train" for a, b in zip(argv, argv[1:])) or "-mrecipes.train" in argv


try:  # torch takes seconds to import: `python -m recipes.train` imports it here, before train.py runs
    from lipnet.training import TrainConfig
except KeyboardInterrupt:
    if not _started_as_command_line(getattr(sys, "orig_argv", [])):
        raise  # imported as a library: the caller's Ctrl-C
    print("interrupted while starting (importing torch): nothing was run", file=sys.stderr)
    sys.exit(130)  # 128 + SIGINT, as recipes.train exits on a later Ctrl-C

from recipes import cifar10, cifar10_long, cifar100, fashion_mnist, mnist  # noqa: E402

_MODULES = {
    "fashion-mnist": fashion_mnist,
    "mnist": mnist,
    "cifar10": cifar10,
    "cifar10-long": cifar10_long,
    "cifar100": cifar100,
}
RECIPES: dict[str, TrainConfig] = {name: module.RECIPE for name, module in _MODULES.items()}
DEFAULT = "fashion-mnist"


def describe(name: str) -> str:
    """The description of a recipe: the first paragraph of its module's docstring, on one line."""
    return " ".join(_MODULES[name].__doc__.strip().split("\n\n")[0].split())


def get_recipe(name: str) -> TrainConfig:
    """The recipe registered as ``name``, with a clear error for unknown names."""
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown recipe {name!r}; available: {', '.join(RECIPES)}") from None
