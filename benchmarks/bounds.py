"""Cost and accuracy of the Gram bound, side by side with plain layers and peers.

    python benchmarks/bounds.py                      # CPU, all sections
    python benchmarks/bounds.py --device cuda --compile
    python benchmarks/bounds.py --sections accuracy  # only bound vs exact

Sections (all in one run, so the ratios compare like with like):
  accuracy  bound vs exact for c_in = c_out = c, input n x n, 3x3 kernel, zero padding 1:
            the default training bound, the exact norm of the circulant embedding it
            bounds (float64 SVD of every frequency: the Gram convergence gap) and a
            power-iteration lower bound of the true zero-padded operator (so
            bound / lower >= bound / exact: the looseness from the border).
  layer     time of the bound (forward, forward+backward) and of a training step
            (forward, backward, SGD) of one layer at batch 256, as ratios over nn.Conv2d;
            peers: lipnet with autograd through every iteration and frequency (the 2023
            algorithm's cost model), torch's spectral_norm parametrization (power
            iteration on the reshaped kernel: cheap but not a bound of the conv
            operator), deel-torchlip's SpectralConv2d and orthogonium's AdaptiveOrthoConv2d
            (zero padding) if installed.
  gaps      the Gram gap of the training bound for Gaussian, orthogonal and near-identity
            (residual-block) kernels: near-isometries have flat spectra, where Gram
            iteration converges slowly and screening is loosest; on the CPU also with
            screening alone, as a GPU or compiled bound computes it.
  ops       aten operations dispatched by one forward and one forward+backward of the
            default bound (each is a kernel launch or more on a GPU, where launches, not
            flops, set the bound's time at these sizes).
  network   training throughput (images/s) of the reference ConvNet (3x3 convs, widths
            64-128-256-512, two per stage, strided convs between stages, MaxMin, linear
            head: 5.5M parameters) with plain vs Gram layers, and of the CIFAR-10
            recipe's liresnet-s: plain (weights baked), Gram with its six equal residual
            bounds stacked in one computation, Gram with each layer bounding itself;
            eager and (--compile) compiled. On CUDA also the stacked network with its
            bounds replayed as CUDA graphs (eager) and, compiled, with the bounds' choices
            of an eager GPU bound (gram_fewer_ops: complex products, no autocorrelation;
            what a compiled GPU bound did before it took the way with less arithmetic), and
            with 7 screening steps (gram_screen7: what a tight GPU bound of trained layers costs).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
import traceback

import torch
from torch import nn

from lipnet.bounds import (
    conv2d_embedding,
    conv2d_power_iteration,
    conv2d_spectral_norm,
    conv2d_symbol,
    cuda_graphs,
    refine_exceeding,
)
from lipnet.bounds.gram import matrix_spectral_norm
from lipnet.nn import GramConv2d, GramLinear, MaxMin
from lipnet.training.config import CUDA_GRAPH_MODES

SHAPES = [(64, 32), (128, 16), (256, 8), (512, 4)]
SECTIONS = ("accuracy", "gaps", "ops", "layer", "network")


def error_line(error: BaseException) -> str:
    """``"Type: first line of the message"``, at most 300 characters: how a failed part is reported."""
    text = str(error)
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"[:300]


def timed(fn, device, repeat: int, warmup: int = 2) -> float:
    """Median wall time of ``fn()`` in milliseconds (device-synchronized)."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":  # the warm-up's queued work must not run inside the first timed region
        torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def bound_accuracy(c: int, n: int, device) -> dict:
    weight = torch.randn(c, c, 3, 3, device=device)
    bound = conv2d_spectral_norm(weight, n, padding=1).item()
    embedding = conv2d_embedding(3, n, padding=1)
    symbol = conv2d_symbol(weight.double(), embedding).flatten(0, 1)
    circulant = torch.linalg.matrix_norm(symbol, ord=2).max().item()
    lower = conv2d_power_iteration(weight.double(), n, padding=1, n_iter=300)
    return dict(c=c, n=n, bound=bound, circulant_exact=circulant, gram_gap=bound / circulant - 1,
                power_lower=lower, ratio_to_lower=bound / lower)


GAP_KINDS = ("gaussian", "orthogonal", "I+0.01", "I+0.03", "I+0.1")


def kernel_of_kind(kind: str, c: int, device) -> torch.Tensor:
    """A 3x3 ``c -> c`` kernel: Gaussian, a random orthogonal reshaped kernel, or a residual
    block ``I + eps N`` (the centered identity plus small Gaussian noise: a near-isometry,
    as LiResNet's residual convolutions are near initialization)."""
    if kind == "gaussian":
        return torch.randn(c, c, 3, 3, device=device)
    if kind == "orthogonal":
        weight = torch.empty(c, c * 9, device=device)
        nn.init.orthogonal_(weight)
        return weight.view(c, c, 3, 3)
    eps = float(kind.removeprefix("I+"))
    weight = eps * torch.randn(c, c, 3, 3, device=device) / (3 * c**0.5)
    weight[torch.arange(c), torch.arange(c), 1, 1] += 1
    return weight


def gram_gaps(c: int, n: int, device) -> dict:
    """Relative gap of the default training bound to the exact circulant norm, per kernel
    kind; on the CPU also with screening alone (``<kind>/screened``: what a GPU or compiled
    bound computes, without the refinement of exceeding frequencies)."""
    out = dict(c=c, n=n)
    embedding = conv2d_embedding(3, n, padding=1)
    for kind in GAP_KINDS:
        weight = kernel_of_kind(kind, c, device)
        symbol = conv2d_symbol(weight.double(), embedding).flatten(0, 1)
        exact = embedding.norm_factor * torch.linalg.matrix_norm(symbol, ord=2).max().item()
        out[kind] = conv2d_spectral_norm(weight, n, padding=1).item() / exact - 1
        if device.type == "cpu":
            with refine_exceeding(False):
                out[f"{kind}/screened"] = conv2d_spectral_norm(weight, n, padding=1).item() / exact - 1
    return out


def autograd_all_frequencies(weight, n):
    """Cost model of the 2023 reference: autograd through n_iter=6 steps on every frequency."""
    symbol = conv2d_symbol(weight, conv2d_embedding(3, n, padding=1))
    return matrix_spectral_norm(symbol, 6).amax()


def operation_counts(c: int, n: int, device) -> dict:
    """Aten operations of one bound forward and forward+backward (after a warm-up call)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.calls += 1
            return func(*args, **(kwargs or {}))

    weight = torch.randn(c, c, 3, 3, device=device, requires_grad=True)
    conv2d_spectral_norm(weight, n, padding=1).backward()
    out = dict(c=c, n=n)
    for name, fn in (("forward", lambda: conv2d_spectral_norm(weight.detach(), n, padding=1)),
                     ("forward_backward", lambda: conv2d_spectral_norm(weight, n, padding=1).backward())):
        Count.calls = 0
        with Count():
            fn()
        out[name] = Count.calls
    return out


def layer_times(c: int, n: int, batch: int, device, repeat: int, compile_: bool = False,
                compile_mode: str = "default") -> dict:
    x = torch.randn(batch, c, n, n, device=device)
    grad_out = torch.randn(batch, c, n, n, device=device)
    weight = torch.randn(c, c, 3, 3, device=device, requires_grad=True)
    out = dict(c=c, n=n)
    out["bound_fwd_ms"] = timed(lambda: conv2d_spectral_norm(weight.detach(), n, padding=1), device, repeat)
    out["bound_fwd_bwd_ms"] = timed(lambda: conv2d_spectral_norm(weight, n, padding=1).backward(), device, repeat)

    def step_of(layer, forward=None, cuda_graphs=False):
        opt = torch.optim.SGD(layer.parameters(), lr=1e-3)
        forward = layer if forward is None else forward

        def step():
            if cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()
            opt.zero_grad(set_to_none=True)
            forward(x).backward(grad_out)
            opt.step()
        return step

    layers = {"conv2d": nn.Conv2d(c, c, 3, padding=1), "gram": GramConv2d(c, c, 3, padding=1)}
    layers["spectral_norm"] = nn.utils.parametrizations.spectral_norm(nn.Conv2d(c, c, 3, padding=1))
    try:
        from deel.torchlip import SpectralConv2d
        layers["deel_torchlip"] = SpectralConv2d(c, c, 3, padding=1)
    except ImportError:
        pass
    try:
        from orthogonium.layers.conv.AOC import AdaptiveOrthoConv2d
        layers["orthogonium_aoc"] = AdaptiveOrthoConv2d(c, c, 3, padding=1, padding_mode="zeros")
    except ImportError:
        pass

    class AutogradAll(nn.Conv2d):
        def forward(self, inp):
            return self._conv_forward(inp, self.weight / autograd_all_frequencies(self.weight, n), self.bias)

    layers["autograd_all"] = AutogradAll(c, c, 3, padding=1)
    for name, layer in layers.items():
        out[f"{name}_step_ms"] = timed(step_of(layer.to(device)), device, repeat)
    if device.type == "cuda":  # the bound replayed as CUDA graphs (lipnet.bounds.cuda_graphs), eager otherwise
        layers["gram_graphs"] = GramConv2d(c, c, 3, padding=1).to(device)
        try:  # a failed capture keeps this shape's other figures
            out["gram_graphs_step_ms"] = timed(with_bound_graphs(step_of(layers["gram_graphs"])), device, repeat)
        except Exception as error:
            out["graphs_error"] = error_line(error)
            print(f"  FAILED gram_graphs step at c={c}, n={n}: {out['graphs_error']}", flush=True)
    base = out["conv2d_step_ms"]
    for name in layers:
        if f"{name}_step_ms" in out:
            out[f"{name}_ratio"] = out[f"{name}_step_ms"] / base
    if compile_:
        # Both layers compiled the same way; the ratio is over the compiled nn.Conv2d step.
        cuda_graphs = compile_mode in CUDA_GRAPH_MODES
        for name, layer in {"conv2d": nn.Conv2d(c, c, 3, padding=1), "gram": GramConv2d(c, c, 3, padding=1)}.items():
            layer = layer.to(device)
            # dynamic=False: after the first shape a recompile would mark the nn.Conv2d input's sizes
            # dynamic (automatic dynamic shapes) while GramConv2d specializes them (int(input.shape)):
            # the reference of every later shape would be a dynamic-shape compile, unlike a recipe's.
            step = step_of(layer, torch.compile(layer, mode=compile_mode, dynamic=False), cuda_graphs)
            try:
                out[f"{name}_compiled_step_ms"] = timed(step, device, repeat, warmup=3)
            except Exception as error:  # a failed compilation keeps this shape's eager figures
                out["compile_error"] = f"{name}: {error_line(error)}"[:300]
                print(f"  FAILED compiled {name} step at c={c}, n={n}: {out['compile_error']}", flush=True)
                return out
        out["gram_compiled_ratio"] = out["gram_compiled_step_ms"] / out["conv2d_compiled_step_ms"]
    return out


def with_bound_graphs(step):
    """``step`` run with :func:`lipnet.bounds.cuda_graphs` on."""
    def graphed():
        with cuda_graphs():
            step()
    return graphed


def _launches_never_free(device) -> bool:
    return False


def with_launch_bound_choices(step):
    """``step`` with the bounds choosing as an eager GPU bound does (fewer operations unless
    it is large), even where launches are free (compiled, replayed): the library's own rule,
    ``lipnet.bounds.gram.arithmetic_dominates``, told that launches are never free."""
    import lipnet.bounds.gram as gram_module

    def patched():
        previous = gram_module.launches_are_free
        gram_module.launches_are_free = _launches_never_free  # one object: a new one per step could fail
        # a compiled step's guards on it (an identity guard recompiles every step, then runs eager)
        try:
            step()
        finally:
            gram_module.launches_are_free = previous
    return patched


def reference_convnet(gram: bool, num_classes: int = 10) -> nn.Sequential:
    """The issue's reference ConvNet with Gram layers, or the same network with plain ``nn.Conv2d`` /
    ``nn.Linear`` (MaxMin in both: the ratio is the cost of the bounds, not of the activation)."""
    conv = GramConv2d if gram else nn.Conv2d
    linear = GramLinear if gram else nn.Linear
    act = MaxMin
    layers, c_prev = [], 3
    widths = [64, 128, 256, 512]
    for i, c in enumerate(widths):
        layers += [conv(c_prev, c, 3, padding=1), act(), conv(c, c, 3, padding=1), act()]
        if i < len(widths) - 1:
            layers += [conv(c, c, 3, stride=2, padding=1), act()]
        c_prev = c
    layers += [nn.Flatten(), linear(512 * 4 * 4, num_classes)]
    return nn.Sequential(*layers)


def recipe_networks(device) -> dict[str, nn.Module]:
    """The CIFAR-10 recipe's LiResNet (six equal residual convolutions): plain (the same
    network with its normalized weights baked into nn.Conv2d/nn.Linear, as lipnet.export
    does: the cost of the architecture without bounds), Gram with the residual bounds
    stacked, and Gram with every layer bounding itself."""
    from lipnet.export.exporter import _bake
    from lipnet.models import build_model

    gram = build_model("liresnet-s", in_channels=3, num_classes=10, input_size=32).to(device)
    probe = torch.rand(2, 3, 32, 32, device=device)
    plain = _bake(gram.eval(), probe).train().requires_grad_(True)
    gram.train()
    per_layer = copy.deepcopy(gram)
    per_layer.stack_bounds = False
    gram.stack_bounds = True
    return {"plain": plain, "gram": gram, "gram_per_layer": per_layer}


def with_screen_iter(net: nn.Module, steps: int) -> nn.Module:
    """A copy of ``net`` whose Gram convolutions screen every frequency with ``steps`` Gram
    steps: on a GPU, where the bound screens alone, the fixed-cost way to a tight bound for
    trained (flat-spectrum) layers."""
    net = copy.deepcopy(net)
    for module in net.modules():
        if isinstance(module, GramConv2d):
            module.screen_iter = steps
    return net


def network_throughput(nets: dict[str, nn.Module], batch: int, device, repeat: int, compile_: bool,
                       compile_mode: str = "default", out: dict | None = None, save=None) -> dict:
    """Images/s of each network, eager first, then compiled; each figure is printed (and stored
    in ``out``, then ``save()`` called) as soon as it is measured, so a compilation cut off by a
    time limit loses only its own; one that fails is printed and recorded in ``out["errors"]``."""
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    out = {} if out is None else out
    out["params"] = sum(p.numel() for p in nets["gram"].parameters())
    for mode in ("eager", "compiled") if compile_ else ("eager",):
        for name, net in nets.items():
            if mode == "compiled" and name.endswith("_graphs"):
                continue  # a compiled step replays the bounds in its own graphs
            if mode == "eager" and name.endswith("_fewer_ops"):
                continue  # eager, these are the choices anyway
            model = torch.compile(net, mode=compile_mode) if mode == "compiled" else net
            cuda_graphs = mode == "compiled" and compile_mode in CUDA_GRAPH_MODES
            opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)

            def step():
                if cuda_graphs:
                    torch.compiler.cudagraph_mark_step_begin()
                opt.zero_grad(set_to_none=True)
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
            if name.endswith("_graphs"):
                step = with_bound_graphs(step)
            if name.endswith("_fewer_ops"):
                step = with_launch_bound_choices(step)
            key = f"{name}_{mode}_img_per_s"
            try:
                ms = timed(step, device, repeat, warmup=3 if mode == "compiled" else 1)
            except Exception as error:  # e.g. a compilation: the other networks still run
                message = error_line(error)
                out.setdefault("errors", {})[key] = message
                print(f"  FAILED {key}: {message}", flush=True)
                continue
            out[key] = batch / ms * 1e3
            print(f"  measured {key}: {out[key]:.1f}", flush=True)
            if save is not None:
                save()
        for name in nets:
            if name != "plain" and f"{name}_{mode}_img_per_s" in out and f"plain_{mode}_img_per_s" in out:
                out[f"{mode}_{name}_over_plain"] = out[f"{name}_{mode}_img_per_s"] / out[f"plain_{mode}_img_per_s"]
    return out


class Section:
    """Context of one part of :func:`main`: an exception in it is printed (with its traceback)
    and recorded in ``results["errors"]``, and the run goes on to the next part (one unattended
    GPU run must not lose every section to one failure); ``save`` runs as it ends."""

    def __init__(self, name: str, results: dict, save):
        self.name, self.results, self.save = name, results, save

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        failed = isinstance(error, Exception)
        if failed:
            traceback.print_exception(kind, error, tb)
            message = error_line(error)
            self.results.setdefault("errors", {})[self.name] = message
            print(f"SECTION {self.name} FAILED: {message}", flush=True)
        self.save()
        return failed


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--batch", type=int, default=256, help="batch of the layer benchmark")
    parser.add_argument("--net-batch", type=int, default=None, help="batch of the network benchmark (512 on GPU, 64 on CPU)")
    parser.add_argument("--repeat", type=int, default=None, help="timed repetitions (median)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd layers and networks")
    parser.add_argument("--compile-mode", default="default",
                        help="torch.compile mode of --compile (reduce-overhead: CUDA graphs)")
    parser.add_argument("--networks", default="convnet,liresnet-s",
                        help="networks of the network section (convnet, liresnet-s)")
    parser.add_argument("--shapes", default=",".join(f"{c}x{n}" for c, n in SHAPES))
    parser.add_argument("--json", default=None, help="write all numbers to this file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cpu = device.type == "cpu"
    repeat = args.repeat or (3 if cpu else 50)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    sections = set(args.sections.split(","))
    if sections - set(SECTIONS):  # a misspelt section would run nothing, silently
        raise SystemExit(f"unknown section(s) {sorted(sections - set(SECTIONS))} ({', '.join(SECTIONS)})")
    networks = args.networks.split(",")
    unknown = sorted(set(networks) - {"convnet", "liresnet-s"})
    if "network" in sections and unknown:  # before minutes of other sections, not after
        raise SystemExit(f"unknown network(s) {unknown} (convnet, liresnet-s)")
    torch.manual_seed(0)
    results = dict(machine=machine(), torch=torch.__version__, device=str(device))
    print(f"# lipnet bound benchmark on {results['machine']} (torch {torch.__version__})")

    def save():
        if args.json:  # written whole, then renamed: a run killed by its time limit mid-write keeps the last file
            with open(args.json + ".tmp", "w") as f:
                json.dump(results, f, indent=2)
            os.replace(args.json + ".tmp", args.json)

    def section(name):
        """A section (or part of one) whose failure is printed and recorded in ``results["errors"]``
        while the next runs; the numbers so far are written to ``--json`` as each ends."""
        return Section(name, results, save)

    if "accuracy" in sections:
        with section("accuracy"):
            rows = results["accuracy"] = []
            for c, n in shapes:
                rows.append(bound_accuracy(c, n, device))
            print("\n## bound vs exact (zero padding 1, 3x3, random Gaussian kernel)")
            print(f"{'c':>4} {'n':>3} {'bound':>10} {'circulant exact':>16} {'gram gap':>9} {'zero-pad lower':>15} {'bound/lower':>11}")
            for r in rows:
                print(f"{r['c']:>4} {r['n']:>3} {r['bound']:>10.5f} {r['circulant_exact']:>16.5f} {r['gram_gap']:>9.1e} "
                      f"{r['power_lower']:>15.5f} {r['ratio_to_lower']:>11.5f}", flush=True)

    if "gaps" in sections:
        with section("gaps"):
            rows = results["gaps"] = []
            for c, n in shapes:
                rows.append(gram_gaps(c, n, device))
            print("\n## gram gap of the training bound by kernel (bound / circulant exact - 1)")
            for suffix, title in (("", "default"), ("/screened", "screening alone (as on a GPU or compiled)")):
                if suffix and f"{GAP_KINDS[0]}{suffix}" not in rows[0]:
                    continue
                print(f"# {title}")
                print(f"{'c':>4} {'n':>3} " + " ".join(f"{k:>11}" for k in GAP_KINDS))
                for r in rows:
                    print(f"{r['c']:>4} {r['n']:>3} " + " ".join(f"{r[k + suffix]:>11.1e}" for k in GAP_KINDS), flush=True)

    if "ops" in sections:
        with section("ops"):
            rows = results["ops"] = []
            for c, n in shapes:
                rows.append(operation_counts(c, n, device))
            print("\n## aten operations of one bound (forward; forward+backward)")
            for r in rows:
                print(f"{r['c']:>4} {r['n']:>3} {r['forward']:>6} {r['forward_backward']:>6}", flush=True)

    if "layer" in sections:
        # Each shape's row is printed (and saved) as soon as it is measured: a time limit or a
        # failed compilation loses only the shapes not yet done.
        rows = results["layer"] = []
        print(f"\n## one layer, batch {args.batch}: bound time and training step over nn.Conv2d", flush=True)
        peers = None
        for c, n in shapes:
            with section(f"layer/{c}x{n}"):
                r = layer_times(c, n, args.batch, device, repeat, args.compile, args.compile_mode)
                rows.append(r)
                for part in ("compile", "graphs"):
                    if f"{part}_error" in r:
                        results.setdefault("errors", {})[f"layer/{c}x{n}/{part}"] = r[f"{part}_error"]
                if peers is None:
                    peers = [k[: -len("_ratio")] for k in r if k.endswith("_ratio") and k != "conv2d_ratio"]
                    print(f"{'c':>4} {'n':>3} {'bound fwd':>10} {'fwd+bwd':>9} {'conv2d step':>12} "
                          + " ".join(f"{p:>14}" for p in peers))
                print(f"{r['c']:>4} {r['n']:>3} {r['bound_fwd_ms']:>8.2f}ms {r['bound_fwd_bwd_ms']:>7.2f}ms {r['conv2d_step_ms']:>10.2f}ms "
                      + " ".join(f"{r[p + '_ratio']:>13.2f}x" if p + "_ratio" in r else f"{'-':>14}" for p in peers), flush=True)
        if args.compile and rows:
            print(f"(gram_compiled: the GramConv2d step over the nn.Conv2d step, both torch.compile'd, "
                  f"mode {args.compile_mode}, static shapes; compiled nn.Conv2d step "
                  + ", ".join(f"{r['conv2d_compiled_step_ms']:.2f}" if "conv2d_compiled_step_ms" in r else "-" for r in rows)
                  + " ms)")

    if "network" in sections:
        batch = args.net_batch or (64 if cpu else 512)
        net_repeat = max(2, repeat // 5) if cpu else repeat
        results["network"] = {}
        for network in networks:
            with section(f"network/{network}"):
                if network == "convnet":
                    nets = {"plain": reference_convnet(False).to(device), "gram": reference_convnet(True).to(device)}
                    title = "reference ConvNet"
                else:
                    nets, title = recipe_networks(device), "the CIFAR-10 recipe's liresnet-s"
                    if device.type == "cuda":  # the stacked network again: old compiled choices; 7 screening
                        # steps (a GPU screens alone); bounds replayed. The A/Bs right after their reference,
                        # in case a time limit cuts the section short.
                        nets = {"plain": nets["plain"], "gram": nets["gram"], "gram_fewer_ops": nets["gram"],
                                "gram_screen7": with_screen_iter(nets["gram"], 7),
                                "gram_per_layer": nets["gram_per_layer"], "gram_graphs": nets["gram"]}
                print(f"\n## {title}: training images/s, batch {batch}", flush=True)
                r = results["network"][network] = dict(batch=batch)
                network_throughput(nets, batch, device, net_repeat, args.compile, args.compile_mode, out=r, save=save)
                for key, error in r.get("errors", {}).items():
                    results.setdefault("errors", {})[f"network/{network}/{key}"] = error
                print(f"{title} ({r['params'] / 1e6:.2f}M parameters)")
                for mode in ("eager", "compiled") if args.compile else ("eager",):
                    names = [name for name in nets if f"{name}_{mode}_img_per_s" in r]
                    print(f"{mode:>9}: " + "  ".join(f"{name} {r[f'{name}_{mode}_img_per_s']:9.1f}" for name in names)
                          + "  " + "  ".join(f"{name}/plain {r[f'{mode}_{name}_over_plain']:.2f}"
                                             for name in names if f"{mode}_{name}_over_plain" in r), flush=True)

    save()
    if results.get("errors"):
        print("FAILED: " + "; ".join(f"{name}: {error}" for name, error in results["errors"].items()), flush=True)
    return results


if __name__ == "__main__":
    sys.exit(1 if main().get("errors") else 0)
