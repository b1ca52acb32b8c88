"""A snapshot of what a model's function depends on besides its code, to tell whether it changed."""

from __future__ import annotations

import torch
from torch import nn


class ModelState:
    """The values of the parameters, buffers and tensor attributes of models and their modules'
    settings (their public attributes of plain types: stride, n_iter, negative_slope, ...), to tell
    whether anything their function depends on was changed since: in place, through ``.data`` or
    numpy (which count no version), by assigning other tensors, or by setting an attribute."""

    def __init__(self, *models: nn.Module):
        self._models = models
        self._tensors, self._settings = self._read()

    def _read(self):
        tensors, settings, seen = [], [], set()
        for index, model in enumerate(self._models):
            for path, module in model.named_modules(remove_duplicate=False):
                if id(module) in seen:  # shared by two models (a traced graph holds the module's children)
                    continue
                seen.add(id(module))
                own = [*module._parameters.items(), *module._buffers.items(),
                       *((key, value) for key, value in vars(module).items() if torch.is_tensor(value))]
                tensors += [(f"{index}.{path}.{key}", t.detach().clone()) for key, t in own if t is not None]
                settings.append((f"{index}.{path}", sorted(
                    (key, value) for key, value in vars(module).items()
                    if not key.startswith("_") and key != "training" and _plain(value))))
        return tensors, settings

    def unchanged(self) -> bool:
        """Whether the model holds the values and settings it held when this was made."""
        tensors, settings = self._read()
        return settings == self._settings and len(tensors) == len(self._tensors) and all(
            name == old_name and value.shape == old.shape and value.dtype == old.dtype and value.device == old.device
            and (value.is_meta or bool(torch.equal(value, old)) or _equal_with_nans(value, old))
            for (name, value), (old_name, old) in zip(tensors, self._tensors))


def _plain(value) -> bool:
    if isinstance(value, tuple | list):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, bool | int | float | str)


def _equal_with_nans(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.is_floating_point() and bool(((a == b) | (a.isnan() & b.isnan())).all())
