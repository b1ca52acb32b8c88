"""Recipes: one short :class:`~lipnet.training.TrainConfig` per task, run by ``python -m recipes.train``."""

import os

# OpenMP threads that sleep while waiting instead of spinning: on a busy or shared CPU the
# spinning default slows PyTorch down several-fold. Only effective before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from lipnet.training import TrainConfig  # noqa: E402
from recipes import cifar10, cifar10_long, cifar100, fashion_mnist, mnist

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
