"""A registry of architectures, so that a checkpoint can rebuild its model from a spec.

A *spec* is ``{"name": <registered name>, "kwargs": {...}}`` with plain-Python values only
(it is stored in checkpoints loaded with ``torch.load(weights_only=True)``):
``build_model(**spec)`` rebuilds the architecture and ``model_spec(model)`` returns it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

from torch import nn

from lipnet.models.wrappers import unwrap

MODELS: dict[str, Callable[..., nn.Module]] = {}

_SPEC_ATTR = "lipnet_spec"


def register_model(name: str):
    """Decorator: register a function (or class) that builds a model from keyword arguments."""

    def decorator(factory):
        if name in MODELS:
            raise ValueError(f"a model named {name!r} is already registered")
        MODELS[name] = factory
        return factory

    return decorator


def register_sizes(family: str, factory: Callable[..., nn.Module], sizes: dict[str, dict]) -> None:
    """Register ``family`` (all arguments explicit) and ``family-<size>`` for each preset of ``sizes``.

    A sized name fills in its preset; the caller's keyword arguments override any of it.
    """
    register_model(family)(factory)
    for size, preset in sizes.items():
        def build(in_channels: int, num_classes: int, input_size: int, _preset=preset, **kwargs) -> nn.Module:
            return factory(in_channels, num_classes, input_size, **{**_preset, **kwargs})

        build.__doc__ = f"{family} of size {size!r}: {preset} (any of them can be overridden)."
        build.preset = dict(preset)
        register_model(f"{family}-{size}")(build)


def build_model(name: str, **kwargs) -> nn.Module:
    """Build the registered architecture ``name`` and remember its spec on the model.

    Example:
        >>> model = build_model("convnet-xs", in_channels=1, num_classes=10, input_size=28)
        >>> model_spec(model)["name"]
        'convnet-xs'
    """
    try:
        factory = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; registered: {', '.join(sorted(MODELS))}") from None
    kwargs = {key: _plain(value, key) for key, value in kwargs.items()}
    try:
        model = factory(**kwargs)
    except (TypeError, ValueError) as exc:  # an unknown or missing keyword, a size out of range
        raise ValueError(f"model {name!r}: {exc}") from exc
    # Record a sized preset's values too, so the spec rebuilds this exact model even if the
    # preset changes later.
    resolved = {**{key: _plain(value, key) for key, value in getattr(factory, "preset", {}).items()}, **kwargs}
    setattr(model, _SPEC_ATTR, {"name": name, "kwargs": resolved})
    return model


def model_spec(model: nn.Module) -> dict:
    """The ``{"name", "kwargs"}`` spec of a model made by :func:`build_model` (wrappers unwrapped)."""
    model = unwrap(model)
    spec = getattr(model, _SPEC_ATTR, None)
    if spec is None:
        raise ValueError(f"{type(model).__name__} was not built by lipnet.models.build_model, so it has no spec; "
                         "register its architecture with @register_model and build it with build_model(name, ...)")
    return {"name": spec["name"], "kwargs": copy.deepcopy(spec["kwargs"])}  # the caller may change it


def _plain(value, key):
    """Tuples become lists; anything but None/bool/int/float/str/list/dict is refused."""
    if isinstance(value, tuple | list):
        return [_plain(v, key) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v, key) for k, v in value.items()}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"model argument {key!r} must be plain Python (numbers, strings, lists, dicts) so that "
                    f"checkpoints can store it, got {type(value).__name__}")
