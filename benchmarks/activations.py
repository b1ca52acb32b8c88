"""MaxMin's training cost next to references: autograd through max/min, and ReLU.

    python benchmarks/activations.py                 # CUDA when available, else CPU
    python benchmarks/activations.py --dtype bfloat16 --shapes 512x64x32x32

For each activation shape it times a forward and backward pass of

* ``lipnet.nn.MaxMin`` (an autograd function: one byte per pair saved, the gradient permuted),
* the same map written as ``torch.cat((torch.maximum(a, b), torch.minimum(a, b)))`` with
  autograd deriving the backward (what MaxMin was before, and what most code writes),
* ``torch.relu`` (the cheapest elementwise activation, for scale),

and prints milliseconds, the number of operations each pass dispatches (kernels, on a GPU)
and the ratios to the autograd reference. Outputs and gradients of the first two are
checked to be equal first (gradients away from ties, where autograd splits them in two).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lipnet.nn import max_min


def autograd_max_min(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=1)
    return torch.cat((torch.maximum(a, b), torch.minimum(a, b)), dim=1)


VARIANTS = {"MaxMin": max_min, "max/min autograd": autograd_max_min, "relu": torch.relu}
#: Operations that only make views (no kernel).
_VIEWS = {"view", "_unsafe_view", "slice", "split", "chunk", "alias", "detach", "expand", "as_strided"}


class _CountKernels(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.overloadpacket.__name__ not in _VIEWS
        return func(*args, **(kwargs or {}))


def step(fn, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    (result,) = torch.autograd.grad(fn(x), x, grad)
    return result


def measure(fn, x: torch.Tensor, grad: torch.Tensor, repeat: int) -> tuple[float, int]:
    """(median ms of a forward and backward pass, operations dispatched by one)."""
    cuda = x.device.type == "cuda"
    for _ in range(3):
        step(fn, x, grad)
    times = []
    for _ in range(repeat):
        if cuda:
            torch.cuda.synchronize(x.device)
        start = time.perf_counter()
        step(fn, x, grad)
        if cuda:
            torch.cuda.synchronize(x.device)
        times.append((time.perf_counter() - start) * 1e3)
    with _CountKernels() as counter:
        step(fn, x, grad)
    return statistics.median(times), counter.count


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="64x64x32x32,64x128x16x16,64x512x4x4",
                        help="comma-separated NxCxHxW activation shapes")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# activation forward + backward, {args.dtype}, on {where} (torch {torch.__version__})")
    print(f"{'shape':>16} {'variant':>17} {'ms':>8} {'ops':>4} {'/ autograd':>10}")
    rows = {}
    torch.manual_seed(0)
    for text in args.shapes.split(","):
        shape = tuple(int(n) for n in text.split("x"))
        x = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
        grad = torch.randn_like(x)
        torch.testing.assert_close(max_min(x), autograd_max_min(x), rtol=0, atol=0)
        # Equal gradients except at ties (bf16 has many), where autograd splits the gradient in two.
        a, b = x.detach().chunk(2, dim=1)
        untied = (a != b).repeat(1, 2, 1, 1)
        torch.testing.assert_close(step(max_min, x, grad)[untied], step(autograd_max_min, x, grad)[untied],
                                   rtol=0, atol=0)
        measured = {name: measure(fn, x, grad, args.repeat) for name, fn in VARIANTS.items()}
        reference = measured["max/min autograd"][0]
        for name, (ms, ops) in measured.items():
            rows[(text, name)] = {"ms": ms, "ops": ops, "ratio": ms / reference}
            print(f"{text:>16} {name:>17} {ms:8.3f} {ops:4d} {ms / reference:10.2f}", flush=True)
    return rows


if __name__ == "__main__":
    main()
