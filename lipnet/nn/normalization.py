"""Input normalization inside the model, so that certificates are in pixel space."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


def _statistics(value, name: str) -> torch.Tensor:
    """``value`` as a flat float32 buffer, its values checked unless they are on the meta device.

    The buffer follows torch's device rules (the device of a given tensor, the default device
    or a ``with torch.device(...)`` context for numbers); the check reads the values on the CPU,
    so numbers given under ``with torch.device("meta")`` are checked all the same. Only a meta
    tensor has no values to check: they are checked when loaded and when the bound is taken.
    """
    buffer = torch.as_tensor(value, dtype=torch.float32).flatten()
    if not (torch.is_tensor(value) and value.is_meta):
        _check_values(torch.as_tensor(value, dtype=torch.float32, device="cpu").flatten(), name, "")
    return buffer


def _check_values(tensor: torch.Tensor, name: str, where: str) -> None:
    """Refuse a std that is not positive (NaN included) or a mean that is not finite; ``where``
    follows the name in the message (`` loaded from the state_dict``)."""
    if name == "std" and not bool(torch.all(tensor > 0)):
        raise ValueError(f"InputNormalization: the std{where} must be positive, got {tensor.tolist()}")
    if name == "mean" and not bool(torch.all(torch.isfinite(tensor))):
        raise ValueError(f"InputNormalization: the mean{where} must be finite, got {tensor.tolist()}")


class InputNormalization(nn.Module):
    """``(x - mean) / std`` per channel, with Lipschitz constant ``1 / min(std)``.

    Putting the normalization inside the model makes the certified radius a radius in
    the raw input space (e.g. pixels in [0, 1]).

    Inputs are batched, ``(N, C, ...)``, with the channels in dimension 1 (as for
    ``nn.BatchNorm2d``): a 3-D input is a batch of 1-D signals ``(N, C, L)``, so an unbatched
    image ``(C, H, W)`` is given as ``x[None]`` (one with ``H != C`` is refused, one with
    ``H == C`` would be normalized along its rows).

    The map is computed in the wider of the input's and the buffers' dtypes (float32 at least
    for integer inputs), so it divides by the stored ``std`` itself, whose bound is the one
    reported: ``std`` rounded to a bfloat16 input's dtype can be 2^-8 below it, a larger gain.
    Floating-point inputs get their own dtype back; integer ones (``uint8`` images) the
    computation's. The module can be built on the meta device; its statistics are then
    checked when loaded and when the bound is taken.

    Args:
        mean, std: per-channel statistics (sequences or tensors of length ``C >= 1``).

    Example:
        >>> norm = InputNormalization([0.5], [0.25])
        >>> norm(torch.ones(1, 1, 2, 2))[0, 0, 0, 0].item()
        2.0
        >>> round(norm.lipschitz_bound(), 12)
        4.0
    """

    # What the forward and the bound both read: an override could let std broadcast one channel to many.
    LIPSCHITZ_BOUND_DEPENDS_ON = ("_check_channels",)

    def __init__(self, mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor):
        super().__init__()
        mean, std = _statistics(mean, "mean"), _statistics(std, "std")
        if mean.shape != std.shape or mean.numel() == 0:
            raise ValueError(f"InputNormalization: mean and std must have the same length, one per channel (at least "
                             f"one), got {mean.numel()} and {std.numel()}")
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def _check_channels(self) -> int:
        """The channel count, refused where buffers written since construction disagree on it.

        A ``std`` longer than ``mean`` would broadcast one input channel onto several outputs:
        a gain ``sqrt(len(std))`` times larger than ``1 / min(std)``.
        """
        channels = self.mean.numel()
        if self.std.numel() != channels or channels == 0:
            raise ValueError(f"InputNormalization: mean and std must have the same length, one per channel (at least "
                             f"one), got {channels} and {self.std.numel()} (they were written into the buffers since "
                             "construction); set both, e.g. with load_state_dict")
        return channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels = self._check_channels()
        if x.dim() < 2 or x.shape[1] != channels:
            # Broadcasting one channel to C would copy it C times: a sqrt(C) larger gain than
            # the bound 1 / min(std), so a mismatch is an error, never a broadcast.
            raise ValueError(f"InputNormalization: expected inputs with {channels} channel(s) in dimension 1, got "
                             f"shape {tuple(x.shape)}")
        shape = (1, -1) + (1,) * (x.dim() - 2)
        out = (x - self.mean.view(shape)) / self.std.view(shape)  # in the promoted dtype of x and the buffers
        return out.to(x.dtype) if x.is_floating_point() else out

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args, **kwargs):
        assign = local_metadata.get("assign_to_params_buffers", False)
        for name in ("std", "mean"):
            loaded, local = state_dict.get(prefix + name), getattr(self, name)
            if torch.is_tensor(loaded) and not loaded.is_meta:
                # Checked as the buffer will hold it: a float64 std of 1e-50 copied into float32 is 0.
                stored = loaded if assign or not torch.is_tensor(local) else loaded.to(local.dtype)
                _check_values(stored, name, " loaded from the state_dict")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)

    def lipschitz_bound(self) -> float:
        """``1 / min(std)``, rounded up in float64."""
        self._check_channels()
        if self.std.is_meta or self.mean.is_meta:
            raise ValueError("InputNormalization: mean and std are on the meta device and have no values yet; load "
                             "them (load_state_dict, or to_empty followed by load_state_dict) before taking the bound")
        smallest = float(self.std.double().min())
        if not smallest > 0:  # written into the buffer after construction (also NaN)
            raise ValueError(f"InputNormalization: std must be positive, got {self.std.tolist()} (the constructor and "
                             "load_state_dict check it; it was written into the buffer since). Set a positive std, "
                             "e.g. with load_state_dict")
        if not bool(torch.isfinite(self.mean).all()):  # a non-finite output is no function with a bound
            raise ValueError(f"InputNormalization: mean must be finite, got {self.mean.tolist()} (the constructor and "
                             "load_state_dict check it; it was written into the buffer since)")
        return math.nextafter(1 / smallest, math.inf)

    def extra_repr(self) -> str:
        def values(tensor: torch.Tensor) -> str:
            return f"<meta, {tensor.numel()} values>" if tensor.is_meta else str(tensor.tolist())

        return f"mean={values(self.mean)}, std={values(self.std)}"
