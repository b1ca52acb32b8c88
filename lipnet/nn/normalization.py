"""Input normalization inside the model, so that certificates are in pixel space."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


class InputNormalization(nn.Module):
    """``(x - mean) / std`` per channel, with Lipschitz constant ``1 / min(std)``.

    Putting the normalization inside the model makes the certified radius a radius in
    the raw input space (e.g. pixels in [0, 1]).

    Args:
        mean, std: per-channel statistics (sequences or tensors of length ``C``).

    Example:
        >>> norm = InputNormalization([0.5], [0.25])
        >>> norm(torch.ones(1, 1, 2, 2))[0, 0, 0, 0].item()
        2.0
        >>> round(norm.lipschitz_bound(), 12)
        4.0
    """

    def __init__(self, mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor):
        super().__init__()
        mean = torch.as_tensor(mean, dtype=torch.float32).flatten()
        std = torch.as_tensor(std, dtype=torch.float32).flatten()
        if mean.shape != std.shape:
            raise ValueError(f"mean and std must have the same length, got {mean.numel()} and {std.numel()}")
        if not torch.all(std > 0):
            raise ValueError(f"std must be positive, got {std.tolist()}")
        if not torch.all(torch.isfinite(mean)):
            raise ValueError(f"mean must be finite, got {mean.tolist()}")
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels = self.mean.numel()
        if x.dim() < 2 or x.shape[1] != channels:
            # Broadcasting one channel to C would copy it C times: a sqrt(C) larger gain than
            # the bound 1 / min(std), so a mismatch is an error, never a broadcast.
            raise ValueError(f"InputNormalization: expected inputs with {channels} channel(s) in dimension 1, got "
                             f"shape {tuple(x.shape)}")
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return (x - self.mean.view(shape).to(x.dtype)) / self.std.view(shape).to(x.dtype)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        std, mean = state_dict.get(prefix + "std"), state_dict.get(prefix + "mean")
        if torch.is_tensor(std) and not bool(torch.all(std > 0)):
            raise ValueError(f"InputNormalization: the std loaded from the state_dict must be positive, got "
                             f"{std.tolist()}")
        if torch.is_tensor(mean) and not bool(torch.all(torch.isfinite(mean))):
            raise ValueError(f"InputNormalization: the mean loaded from the state_dict must be finite, got "
                             f"{mean.tolist()}")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def lipschitz_bound(self) -> float:
        """``1 / min(std)``, rounded up in float64."""
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
        return f"mean={self.mean.tolist()}, std={self.std.tolist()}"
