"""Process-group setup for ``torchrun``: NCCL on GPUs, gloo on CPUs, a no-op for one process."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Distributed:
    """Where this process stands: ``rank`` of ``world_size``, on ``device``."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of ``values`` over all processes (float64)."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def resolve_device(name: str) -> torch.device:
    """``"auto"`` means CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"unknown device {name!r}: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r} asked for, but this machine has no GPU {device.index} "
                         f"({torch.cuda.device_count()} GPU(s): cuda:0 ...)")
    if device.type not in ("cpu", "cuda", "mps") or (device.type == "cpu" and device.index not in (None, 0)):
        raise ValueError(f"a run cannot train on {name!r}: use --device auto, cpu, cuda, cuda:N or mps")
    return device


#: Timeout of collective operations (barriers included).
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=2)


def init_distributed(device_name: str = "auto") -> Distributed:
    """Join the process group that ``torchrun`` describes in the environment, if any.

    With ``WORLD_SIZE > 1`` this initializes ``torch.distributed`` (NCCL for CUDA, gloo for
    CPU) and, on CUDA, binds the process to GPU ``LOCAL_RANK``. Without ``torchrun`` it
    returns a single-process description.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_name)
    if world_size == 1:
        return Distributed(0, 1, device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # The other processes wait at a barrier while process 0 certifies the final model
        # (float64, no cuDNN): allow that longer than the 10-minute default.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=COLLECTIVE_TIMEOUT)
    return Distributed(dist.get_rank(), dist.get_world_size(), device)


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
