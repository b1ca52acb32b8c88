"""Randomized fuzz of :func:`lipnet.convert.convert`'s traced bounds.

Each case is a random float64 ``nn.Module`` whose ``forward`` is generated Python source: a
random DAG over submodules (``nn.Conv2d``, ``nn.ConvTranspose2d`` and ``nn.Linear`` that convert turns
into Gram layers, ReLU, pooling, eval-mode BatchNorm, one submodule used twice), sums and differences of
branches, products with constants (negative, zero, large, tensors, numbers read from the shape), concatenation, chunk /
split / slicing, view / reshape / flatten / permute / transpose round trips, ``F.relu``,
``torch.relu``, ``F.pad``, ``.detach()``, added constants, products of two branches (must be
refused) and in-place operations (refused or sound). The model is converted with
``input_shape``; then either

* ``lipschitz_bound`` of the converted model is a number ``L``, and ``L`` is at least the
  spectral norm of the Jacobian at random and adversarial points (zeros, ties, large values),
  at least the slopes of random nearby pairs, and (affine graphs) at least the exact operator
  norm, i.e. the Jacobian at zero; or
* it raises a :class:`~lipnet.certify.LipschitzBoundError` / ``ValueError`` / ``TypeError``,
  never another exception from inside lipnet.

Usage: ``python tests/fuzz_convert.py --minutes 5 --seed 0 [--count N] [-v]``; each case is
reproducible from its seed, and a failure prints the generated source.
"""

import argparse
import random
import sys
import time
import traceback
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from fuzz_networks import jacobian, top_singular
import lipnet.nn.activations
from lipnet import convert
from lipnet.certify import LipschitzBoundError, lipschitz_bound
from lipnet.nn.activations import group_sort, max_min

F64 = torch.float64
#: Relative allowance for float64 rounding in the Jacobian and in finite differences.
JACOBIAN_SLACK = 1e-9
PAIR_SLACK = 1e-6
SCALARS = ("2.5", "-1.0", "-3", "0", "0.0", "1e6", "1e-3", "0.5", "-0.25")
#: Statements that make the graph nonlinear: the bound must not certify them as linear.
NONLINEAR = ("relu", "pool", "mul2", "div2", "tanh", "pad", "hardtanh", "max_min", "group_sort")


@dataclass
class Case:
    seed: int
    source: str
    shape: tuple
    kinds: list
    outcome: str = ""
    bound: float | None = None
    measured: float = 0.0
    error: str = ""
    failures: list = field(default_factory=list)


class Builder:
    """Draws the statements of a forward over 4-D values ``(batch, channels, H, W)``."""

    def __init__(self, rng: random.Random, shape):
        self.rng, self.shape = rng, shape
        self.values = [("x", shape[0])]
        self.lines, self.modules, self.buffers, self.kinds = [], {}, {}, []
        self.used = {"x": 0}
        self.convs = []  # (name, in_channels, out_channels), for reuse

    def pick(self, channels=None):
        pool = [v for v in self.values if channels is None or v[1] == channels]
        if not pool:
            return None
        return pool[-1] if self.rng.random() < 0.5 else self.rng.choice(pool)

    def emit(self, kind, expression, channels, use=()):
        name = f"v{len(self.values)}"
        self.lines.append(f"{name} = {expression}")
        self.values.append((name, channels))
        for u in use:
            self.used[u] = self.used.get(u, 0) + 1
        self.used.setdefault(name, 0)
        self.kinds.append(kind)

    def module(self, module):
        name = f"m{len(self.modules)}"
        self.modules[name] = module
        return name

    def buffer(self, tensor):
        name = f"b{len(self.buffers)}"
        self.buffers[name] = tensor
        return name

    def step(self):
        r, (h, w) = self.rng, self.shape[1:]
        a, c = self.pick()
        kind = r.choice(["conv", "conv", "tconv", "reuse", "relu", "relu_inplace", "bn", "pool", "linear", "add", "add",
                         "sub", "alpha", "scale", "scale", "tensor_scale", "cat", "chunk", "split", "slice",
                         "index", "view", "reshape", "permute", "transpose", "contiguous", "fn_relu",
                         "torch_relu", "tanh", "hardtanh", "pad", "detach", "neg", "dropout", "const", "double",
                         "mul2", "square", "div2", "shape_scale", "inplace_relu", "iadd", "add_", "mul_", "unused",
                         "max_min", "group_sort"])
        if kind in ("conv", "tconv"):
            co = r.choice([2, 4])
            layer = nn.Conv2d if kind == "conv" else nn.ConvTranspose2d  # both keep the size
            m = self.module(layer(c, co, 3, padding=1, bias=r.random() < 0.5))
            self.convs.append((m, c, co))
            self.emit(kind, f"self.{m}({a})", co, [a])
        elif kind == "reuse":
            fits = [(m, ci, co) for m, ci, co in self.convs if any(v[1] == ci for v in self.values)]
            if not fits:
                return
            m, ci, co = r.choice(fits)
            a, _ = self.pick(ci)
            self.emit(kind, f"self.{m}({a})", co, [a])
        elif kind in ("relu", "relu_inplace"):
            m = self.module(nn.ReLU(inplace=kind == "relu_inplace"))
            self.emit(kind, f"self.{m}({a})", c, [a])
        elif kind == "bn":
            bn = nn.BatchNorm2d(c)
            with torch.no_grad():
                bn.running_mean.normal_()
                bn.running_var.uniform_(0.1, 3)
                bn.weight.normal_()
                bn.bias.normal_()
            self.emit(kind, f"self.{self.module(bn)}({a})", c, [a])
        elif kind == "pool":
            pool = r.choice([nn.MaxPool2d(3, 1, 1), nn.AvgPool2d(3, 1, 1)])
            self.emit(kind, f"self.{self.module(pool)}({a})", c, [a])
        elif kind == "linear":
            n = c * h * w
            m = self.module(nn.Linear(n, n, bias=r.random() < 0.5))
            self.emit(kind, f"self.{m}({a}.flatten(1)).view({a}.shape[0], {c}, {h}, {w})", c, [a])
        elif kind in ("add", "sub", "alpha"):
            b, _ = self.pick(c)
            op = {"add": f"{a} + {b}", "sub": f"{a} - {b}",
                  "alpha": f"torch.add({a}, {b}, alpha={r.choice(SCALARS)})"}[kind]
            self.emit(kind, op, c, [a, b])
        elif kind == "double":
            self.emit(kind, r.choice([f"{a} + {a}", f"{a} - (-{a})", f"2 * {a}"]), c, [a])
        elif kind == "scale":
            s = r.choice(SCALARS)
            self.emit(kind, r.choice([f"{a} * {s}", f"{s} * {a}", f"{a} / {s}"]), c, [a])
        elif kind == "shape_scale":  # a factor read from the shape: the batch size varies
            self.emit(kind, r.choice([f"{a} * {a}.shape[0]", f"{a} / {a}.size(0)", f"{a} * {a}.shape[1]",
                                      f"{a} * ({a}.shape[0] - 1)", f"{a} / {a}.numel()"]), c, [a])
        elif kind == "tensor_scale":
            b = self.buffer(torch.randn(1, c, 1, 1, dtype=F64) * r.choice([1, 100, 1e-3]))
            self.emit(kind, r.choice([f"{a} * self.{b}", f"self.{b} * {a}", f"{a} / self.{b}"]), c, [a])
        elif kind == "cat":
            b, cb = self.pick()
            self.emit(kind, f"torch.cat([{a}, {b}], 1)", c + cb, [a, b])
        elif kind in ("chunk", "split"):
            if c < 2 or c % 2:
                return
            i = r.randrange(2)
            op = f"torch.chunk({a}, 2, 1)[{i}]" if kind == "chunk" else f"{a}.split({c // 2}, dim=1)[{i}]"
            self.emit(kind, op, c // 2, [a])
        elif kind == "slice":
            k = r.randrange(1, c + 1)
            self.emit(kind, r.choice([f"{a}[:, :{k}]", f"{a}[:, {c - k}:]", f"{a}[..., :, :][:, :{k}]"]), k, [a])
        elif kind == "index":
            self.emit(kind, f"{a}[:, {r.randrange(c)}].unsqueeze(1)", 1, [a])
        elif kind == "view":
            self.emit(kind, f"{a}.flatten(1).view(-1, {c}, {h}, {w})", c, [a])
        elif kind == "reshape":
            self.emit(kind, f"{a}.reshape({a}.shape[0], -1).reshape({a}.shape[0], {c}, {h}, {w})", c, [a])
        elif kind == "permute":
            self.emit(kind, f"{a}.permute(0, 2, 3, 1).permute(0, 3, 1, 2)", c, [a])
        elif kind == "transpose":
            self.emit(kind, f"{a}.transpose(2, 3)" if h == w else f"{a}.transpose(2, 3).transpose(3, 2)", c, [a])
        elif kind == "contiguous":
            self.emit(kind, r.choice([f"{a}.contiguous()", f"{a}.clone()", f"{a}.unsqueeze(1).squeeze(1)"]), c, [a])
        elif kind == "fn_relu":
            self.emit(kind, f"F.relu({a})", c, [a])
        elif kind == "torch_relu":
            self.emit(kind, f"torch.relu({a})", c, [a])
        elif kind == "tanh":
            self.emit(kind, f"torch.tanh({a})", c, [a])
        elif kind == "hardtanh":
            self.emit(kind, f"F.hardtanh({a})", c, [a])
        elif kind == "max_min":  # lipnet's functional sorts, on the channels or along a spatial axis
            dim = r.choice([d for d in (1, -3, 2, 3) if (c, h, w)[d % 4 - 1] % 2 == 0] or [None])
            if dim is None:
                return
            self.emit(kind, r.choice([f"max_min({a}, {dim})", f"max_min({a}, dim={dim})",
                                      f"lipnet.nn.max_min({a}, dim={dim})"]), c, [a])
        elif kind == "group_sort":
            size = r.choice([k for k in (2, c) if k >= 2 and c % k == 0] or [None])
            if size is None:
                return
            self.emit(kind, r.choice([f"group_sort({a}, {size})", f"lipnet.nn.activations.group_sort({a}, {size})"]),
                      c, [a])
        elif kind == "pad":
            self.emit(kind, f"F.pad({a}, (1, 1, 1, 1))[:, :, 1:-1, 1:-1]", c, [a])
        elif kind == "detach":
            self.emit(kind, f"{a}.detach()", c, [a])
        elif kind == "neg":
            self.emit(kind, f"-{a}", c, [a])
        elif kind == "dropout":
            self.emit(kind, f"F.dropout({a}, 0.5, training=False)", c, [a])
        elif kind == "const":
            self.emit(kind, r.choice([f"{a} + 1", f"1.5 - {a}", f"{a} - 1e3", f"{a} + self.{self.buffer(torch.randn(1, c, 1, 1, dtype=F64))}"]), c, [a])
        elif kind == "mul2":
            b, _ = self.pick(c)
            self.emit(kind, f"{a} * {b}", c, [a, b])
        elif kind == "square":
            self.emit("mul2", f"{a} * {a}", c, [a])
        elif kind == "div2":
            b, _ = self.pick(c)
            self.emit(kind, f"{a} / ({b}.abs() + 1)", c, [a, b])
        elif kind == "inplace_relu":
            fn = r.choice(["{a}.relu_()", "torch.relu_({a})", "F.relu({a}, inplace=True)", "F.relu({a}, True)"])
            self.emit(kind, fn.format(a=a), c, [a])
        elif kind in ("iadd", "add_", "mul_"):
            b, _ = self.pick(c)
            if kind == "iadd":
                self.lines.append(f"{a} += {b}")
                self.emit(kind, a, c, [a, b])
            elif kind == "add_":
                self.emit(kind, f"{a}.add_({b})", c, [a, b])
            else:
                self.emit(kind, f"{a}.mul_({r.choice(SCALARS)})", c, [a])
        elif kind == "unused":
            self.lines.append(f"_ = self.{self.module(nn.Conv2d(c, 2, 1))}({a})")
            self.kinds.append(kind)

    def source(self):
        unused = [(n, ch) for n, ch in self.values[1:] if self.used.get(n, 0) == 0]
        last = self.values[-1][0]
        if len(unused) > 1 and self.rng.random() < 0.5:
            out = f"torch.cat([{', '.join(n for n, _ in unused)}], 1)"
            self.kinds.append("cat")
        else:
            out = last
        body = "\n".join("        " + line for line in self.lines)
        return f"def forward(self, x):\n{body}\n        return {out}\n".replace("\n        ", "\n    ", -1)


def draw_case(seed: int) -> tuple[nn.Module, Case]:
    """A random module (float64, eval mode) and its description."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    shape = (rng.choice([1, 2, 4]), rng.choice([2, 3]), rng.choice([2, 3]))
    builder = Builder(rng, shape)
    for _ in range(rng.randrange(1, 7)):
        builder.step()
    source = builder.source()
    namespace = {"torch": torch, "F": F, "nn": nn, "max_min": max_min, "group_sort": group_sort, "lipnet": lipnet}
    exec(source, namespace)
    cls = type(f"Fuzz{seed}", (nn.Module,), {"forward": namespace["forward"], "__module__": __name__})
    model = cls()
    for name, m in builder.modules.items():
        model.add_module(name, m)
    if not builder.modules:  # convert traces only containers: one with an unused child
        model.add_module("spare", nn.Conv2d(1, 1, 1))
    for name, b in builder.buffers.items():
        model.register_buffer(name, b)
    model = model.double().eval()
    return model, Case(seed, source, shape, builder.kinds)


def _forward_ok(model, shape) -> bool:
    try:
        with torch.no_grad():
            y = model(torch.randn(2, *shape, dtype=F64))
        return torch.is_tensor(y)
    except Exception:  # the drawn forward itself is invalid (e.g. an in-place op torch refuses)
        return False


def points(shape, gen):
    """Random and adversarial inputs: zeros, integer ties, tiny and large values."""
    yield torch.randn(shape, generator=gen, dtype=F64)
    yield torch.zeros(shape, dtype=F64)
    yield torch.randint(-1, 2, shape, generator=gen).to(F64)
    yield 1e-3 * torch.randn(shape, generator=gen, dtype=F64)
    yield 30 * torch.randn(shape, generator=gen, dtype=F64)
    yield torch.ones(shape, dtype=F64)


def check_bound(model, shape, bound, case: Case, gen):
    """Record in ``case.failures`` every point or pair whose slope exceeds ``bound``."""
    fresh = lambda v: model(v.clone())  # noqa: E731 (in-place forwards write into their input)
    worst = 0.0
    for i, x in enumerate(points(shape, gen)):
        try:
            sigma, _ = top_singular(jacobian(fresh, x))
        except RuntimeError:  # autograd refuses some in-place patterns the forward allowed
            continue
        worst = max(worst, sigma)
        if i == 1 and not any(k in NONLINEAR for k in case.kinds):
            case.kinds.append("affine")  # the Jacobian at zero is the exact operator
        if sigma > bound * (1 + JACOBIAN_SLACK) + 1e-12:
            case.failures.append(f"Jacobian norm {sigma!r} at point {i} > bound {bound!r}")
    with torch.no_grad():
        for scale in (1e-4, 1e-1, 3.0):
            a = torch.randn(16, *shape, generator=gen, dtype=F64)
            b = a + scale * torch.randn(16, *shape, generator=gen, dtype=F64)
            ya, yb = model(a.clone()), model(b.clone())
            ratio = float(((ya - yb).flatten(1).norm(dim=1) / (a - b).flatten(1).norm(dim=1)).max())
            worst = max(worst, ratio)
            if ratio > bound * (1 + PAIR_SLACK) + 1e-12:
                case.failures.append(f"pair slope {ratio!r} (scale {scale}) > bound {bound!r}")
    case.measured = worst


def run_case(seed: int) -> Case:
    model, case = draw_case(seed)
    if not _forward_ok(model, case.shape):
        case.outcome = "invalid"
        return case
    try:
        converted, _ = convert(model, input_shape=case.shape)
        converted = converted.double().eval()
        bound = lipschitz_bound(converted, case.shape)
    except (LipschitzBoundError, ValueError, TypeError) as error:
        case.outcome = "refused"
        case.error = f"{type(error).__name__}: {error}"
        if not isinstance(error, LipschitzBoundError) and "/lipnet/" not in traceback.extract_tb(
                error.__traceback__)[-1].filename:
            case.failures.append(f"a {type(error).__name__} raised outside lipnet, not a refusal: {error}\n"
                                 f"{traceback.format_exc()}")
        return case
    except Exception as error:  # noqa: BLE001 (any other crash is a finding)
        case.outcome = "crash"
        case.failures.append(f"crash: {type(error).__name__}: {error}\n{traceback.format_exc()}")
        return case
    case.bound = bound
    case.outcome = "certified"
    if not (bound >= 0):
        case.failures.append(f"bound {bound!r} is not a nonnegative number")
        return case
    if bound == float("inf"):
        return case
    if not _forward_ok(converted, case.shape):
        case.failures.append("the converted model does not run")
        return case
    check_bound(converted, case.shape, bound, case, torch.Generator().manual_seed(seed))
    return case


def report(case: Case) -> str:
    return (f"seed {case.seed}: {case.outcome}, shape {case.shape}, bound {case.bound}, measured {case.measured:.6g}"
            + (f" ({case.error})" if case.error else "") + "\n"
            + "\n".join(case.failures) + f"\n{case.source}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--count", type=int, default=None)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    deadline = time.monotonic() + 60 * args.minutes
    outcomes, kinds, failed = {}, set(), 0
    seed = args.seed
    while (args.count is None and time.monotonic() < deadline) or (args.count is not None and seed < args.seed + args.count):
        case = run_case(seed)
        outcomes[case.outcome] = outcomes.get(case.outcome, 0) + 1
        kinds.update(case.kinds)
        if case.failures:
            failed += 1
            print("FAIL " + report(case), flush=True)
        elif args.verbose:
            print(report(case), flush=True)
        seed += 1
    print(f"{seed - args.seed} cases (seeds {args.seed}..{seed - 1}): {outcomes}; {failed} failed")
    print("op kinds: " + ", ".join(sorted(kinds)))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
