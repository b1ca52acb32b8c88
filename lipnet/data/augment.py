"""Batched data augmentation on the device that holds the images (no Python per image)."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def random_crop_flip(images: torch.Tensor, padding: int = 0, flip: bool = False,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Random translations (zero-padded crops) and horizontal flips of a whole batch at once.

    Each image is padded by ``padding`` zero pixels on every side and cropped back to its
    size at a random offset; with ``flip`` it is also mirrored left-right with probability
    1/2. The crop and the flip are one gather on the device of ``images``.

    Args:
        images: ``(B, C, H, W)`` tensor of any dtype (typically uint8 on the GPU).
        padding: largest shift in pixels (``0``: no translation).
        flip: whether to flip half of the images.
        generator: random source, on the device of ``images``.

    Returns:
        A new ``(B, C, H, W)`` tensor of the same dtype and device.

    Example:
        >>> x = torch.arange(16, dtype=torch.uint8).view(1, 1, 4, 4)
        >>> random_crop_flip(x).equal(x)
        True
    """
    if images.dim() != 4:
        raise ValueError(f"expected a batch of images (B, C, H, W), got shape {tuple(images.shape)}")
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise ValueError(f"padding must be an integer >= 0, got {padding!r}")
    if padding == 0 and not flip:
        return images.clone()
    b, _, h, w = images.shape
    device = images.device
    padded = F.pad(images, (padding,) * 4) if padding else images
    dy = torch.randint(0, 2 * padding + 1, (b,), device=device, generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (b,), device=device, generator=generator)
    rows = dy[:, None] + torch.arange(h, device=device)
    cols = dx[:, None] + torch.arange(w, device=device)
    if flip:
        mirror = torch.rand(b, device=device, generator=generator) < 0.5
        cols = torch.where(mirror[:, None], cols.flip(1), cols)
    batch = torch.arange(b, device=device)[:, None, None]
    # Advanced indices around a slice put the indexed dimensions first: (B, H, W, C).
    out = padded[batch, :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()
