"""Where a training step of a recipe's model spends its time: the GPU kernels of one step.

    python benchmarks/profile_step.py                     # liresnet-s, batch 512, bf16, eager
    python benchmarks/profile_step.py --compile           # the recipe's compiled forward

For each variant (Gram with equal layers' bounds stacked, Gram with every layer bounding
itself, on CUDA the stacked one with its bounds replayed as CUDA graphs, and the plain
network: the same weights baked into nn.Conv2d/nn.Linear) it prints
the wall time of a step (forward under bf16 autocast, offset cross-entropy, backward, Adam)
and the time the GPU spent in kernels during it, with their number; then the kernels that
took the most time. Wall time well above kernel time means the step is bound by launching
kernels (Python and dispatch), not by the GPU's arithmetic.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import traceback

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from lipnet.bounds import cuda_graphs
from lipnet.export.exporter import _bake
from lipnet.models import build_model
from lipnet.training.losses import offset_cross_entropy


def variants(model_name: str, device) -> dict[str, nn.Module]:
    gram = build_model(model_name, in_channels=3, num_classes=10, input_size=32).to(device)
    plain = _bake(gram.eval(), torch.rand(2, 3, 32, 32, device=device)).train().requires_grad_(True)
    gram.train()
    per_layer = copy.deepcopy(gram)
    per_layer.stack_bounds = False
    gram.stack_bounds = True
    found = {"gram stacked": gram, "gram per layer": per_layer, "plain": plain}
    if device.type == "cuda":  # the stacked network, its bounds replayed as CUDA graphs (lipnet.bounds.cuda_graphs)
        found["gram graphs"] = gram
    return found


def step_function(model: nn.Module, batch: int, device, compile_: bool, graphs: bool = False):
    x = torch.rand(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    forward = torch.compile(model) if compile_ else model
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step():
        with cuda_graphs(graphs):  # the bounds' forward and backward
            with torch.autocast(device.type, dtype=torch.bfloat16):
                logits = forward(x)
            loss = offset_cross_entropy(logits.float(), y, offset=1.0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return step


def measure(step, device, repeat: int) -> tuple[float, float, int, list]:
    """(wall ms per step, kernel ms per step, kernels per step, top kernels). On a CPU (for
    trying the script) the "kernels" are the aten operations, with their self time."""
    cuda = device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize(device)
    for _ in range(3):
        step()
    sync()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        step()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    steps = 3
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
        sync()
    if cuda:
        kernels = [(e.name, e.device_time) for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    else:
        kernels = [(e.name, e.self_cpu_time_total) for e in prof.events() if e.name.startswith("aten::")]
    kernel_ms = sum(us for _, us in kernels) / 1e3 / steps
    by_name: dict[str, list] = {}
    for name, us in kernels:
        entry = by_name.setdefault(name, [0.0, 0])
        entry[0] += us / 1e3 / steps
        entry[1] += 1
    top = sorted(by_name.items(), key=lambda kv: -kv[1][0])
    return statistics.median(times), kernel_ms, len(kernels) // steps, top


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="liresnet-s")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--compile", action="store_true", help="torch.compile the forward (as the recipe does)")
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# {args.model}, batch {args.batch}, bf16 autocast, {'compiled' if args.compile else 'eager'}, "
          f"on {where} (torch {torch.__version__})")
    print(f"{'variant':>15} {'wall ms':>8} {'kernel ms':>10} {'kernels':>8} {'img/s':>9}")
    tops, rows = {}, {}
    for name, model in variants(args.model, device).items():
        try:  # one variant that fails (a CUDA-graph capture, a compilation) must not lose the others
            step = step_function(model, args.batch, device, args.compile, graphs=name.endswith("graphs"))
            wall, kernel, count, top = measure(step, device, args.repeat)
        except Exception as error:
            traceback.print_exc()
            message = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300]
            rows[name] = dict(error=message)
            print(f"{name:>15} FAILED: {message}", flush=True)
            continue
        tops[name] = top
        rows[name] = dict(wall_ms=wall, kernel_ms=kernel, kernels=count)
        print(f"{name:>15} {wall:8.2f} {kernel:10.2f} {count:8d} {args.batch / wall * 1e3:9.0f}", flush=True)
    for name, top in tops.items():
        print(f"\n## {name}: kernels by time per step")
        for kernel, (ms, calls) in top[:args.top]:
            print(f"{ms:8.3f} ms {calls // 3:5d}x  {kernel[:90]}")
    return rows


if __name__ == "__main__":
    main()
