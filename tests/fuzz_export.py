"""Round-trip fuzz of :func:`lipnet.export`: random networks exported, rebuilt and compared.

Each case draws a network: a random chain of fuzz_networks' module zoo (every type
lipnet.certify accepts, in ``nn.Sequential`` / ``GramSequential`` / ``ConvexResidual``
containers), or now and then a model of :mod:`lipnet.models` with small widths; in float64 or
float32, in eval mode. It is exported on its input shape and checked:

* ``outputs``: the exported module's outputs equal the model's eval outputs *bitwise*, on
  batches of 1 and 5 of random inputs (and scaled ones). The exported graph runs the same
  ATen kernels on the same tensors (the normalized weights the Gram layers apply), so on CPU
  any difference is a difference in what is computed;
* ``bound``: ``exported.lipschitz_bound == lipnet.certify.lipschitz_bound(model, shape)``;
* ``radius``: ``exported.certified_radius(logits)`` equals lipnet's ``certified_radius`` at that
  bound (2-D outputs only);
* ``isolation``: exporting leaves the source model unchanged (state_dict bitwise, each
  module's ``training`` flag, ``requires_grad``), and the exported model does not change when
  the source's parameters and buffers are modified in place and it is trained afterwards;
* ``refusal``: a network export refuses must raise ``ValueError`` (with a message); any other
  exception is a crash;
* ``deploy`` (every ``--deploy-every``-th case): ``save`` to a file, ``load`` it in a fresh
  ``python -I`` process where importing lipnet raises, outputs bitwise equal.

``python tests/fuzz_export.py --seed 7 --count 1 -v`` reproduces a case.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

import torch
from torch import nn

import fuzz_networks
import lipnet
import lipnet.models
from lipnet.certify import certified_radius, lipschitz_bound
from lipnet.export import exporter, runtime

#: Every ``MODEL_EVERY``-th seed draws a lipnet.models network instead of a zoo chain.
MODEL_EVERY = 5


class Violation(AssertionError):
    """A check the exported model failed."""


def draw_case(seed: int, budget: fuzz_networks.Budget | None = None):
    """``(model, input shape, description)`` of ``seed``: float64 on even seeds, float32 on odd."""
    dtype = torch.float64 if seed % 2 == 0 else torch.float32
    if seed % MODEL_EVERY == MODEL_EVERY - 1:
        d = fuzz_networks.Draw(seed)
        size, channels = d.choice((8, 12, 16)), d.choice((1, 3))
        if d.chance(0.5):
            model = lipnet.models.ConvNet(channels, 4, size, widths=(4, 6), depths=(1, d.int(1, 2)), dense=(8,))
        else:
            model = lipnet.models.LiResNet(channels, 4, size, width=4, depth=d.int(1, 2), neck_stride=2, dense=(8,))
        shape = (channels, size, size)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, shape, _, _ = fuzz_networks.draw_network(seed, budget or fuzz_networks.CI_BUDGET)
    model = model.to(dtype).eval()
    return model, tuple(shape), f"{dtype} {shape}\n{model!r}"


def _snapshot(model: nn.Module) -> dict:
    return {"state": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "training": [m.training for m in model.modules()],
            "grad": [p.requires_grad for p in model.parameters()]}


def _same_snapshot(a: dict, b: dict) -> bool:
    return (a["training"] == b["training"] and a["grad"] == b["grad"] and a["state"].keys() == b["state"].keys()
            and all(torch.equal(a["state"][k], b["state"][k]) or (a["state"][k].isnan() == b["state"][k].isnan()).all()
                    and torch.equal(a["state"][k].nan_to_num(), b["state"][k].nan_to_num()) for k in a["state"]))


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equal, NaNs in the same places."""
    return a.shape == b.shape and a.dtype == b.dtype and bool(((a == b) | (a.isnan() & b.isnan())).all())


def _inputs(model, shape, seed: int) -> list[torch.Tensor]:
    xs = [exporter.example_input(model, shape, batch=batch, seed=seed + batch) for batch in (1, 5)]
    return xs + [xs[1] * 1e3, xs[0] * 1e-4]


def _outputs(model, xs) -> list[torch.Tensor]:
    """Outputs on copies of ``xs``: a model whose first module is in place overwrites its input."""
    with torch.no_grad():
        return [model(x.clone()) for x in xs]


_DEPLOY = r"""
import importlib.abc, json, sys
class NoLipnet(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "lipnet" or name.startswith("lipnet."):
            raise ImportError(f"{name} is blocked in this process")
sys.meta_path.insert(0, NoLipnet())
sys.path = [p for p in sys.path if p not in ("", ".")]
import importlib.util, torch
torch.set_num_threads(int(sys.argv[5]))  # as the checking process: more threads may sum in another order
spec = importlib.util.spec_from_file_location("deployed_runtime", sys.argv[1])
rt = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rt)
model = rt.load(sys.argv[2])
data = torch.load(sys.argv[3], weights_only=True)
with torch.no_grad():
    outs = [model(x) for x in data["xs"]]
torch.save({"outs": outs, "bound": model.lipschitz_bound}, sys.argv[4])
print(json.dumps(sorted(m for m in sys.modules if m.startswith("lipnet"))))
"""


def deploy_outputs(exported, xs) -> tuple[list[torch.Tensor], float]:
    """Outputs of ``exported`` saved, then loaded and run by a ``python -I`` process without lipnet."""
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        exported.save(folder / "model.pt")
        torch.save({"xs": xs}, folder / "xs.pt")
        (folder / "deploy.py").write_text(_DEPLOY)
        result = subprocess.run([sys.executable, "-I", str(folder / "deploy.py"), runtime.__file__,
                                 str(folder / "model.pt"), str(folder / "xs.pt"), str(folder / "out.pt"),
                                 str(torch.get_num_threads())],
                                capture_output=True, text=True, cwd=folder, timeout=300)
        if result.returncode != 0:
            raise Violation(f"deploy: the fresh process failed:\n{result.stderr[-3000:]}")
        if json.loads(result.stdout.strip().splitlines()[-1]):
            raise Violation("deploy: lipnet was imported in the fresh process")
        data = torch.load(folder / "out.pt", weights_only=True)
    return data["outs"], data["bound"]


def check_case(model: nn.Module, shape, seed: int, deploy: bool) -> str:
    """Run the checks on one network; returns ``"passed"`` or ``"refused: <message>"``."""
    before = _snapshot(model)
    try:
        exported = lipnet.export(model, shape)
    except ValueError as error:
        if not str(error):
            raise Violation("refusal: export raised a ValueError without a message") from error
        if not _same_snapshot(before, _snapshot(model)):
            raise Violation("isolation: a refused export changed the source model")
        return f"refused: {str(error).splitlines()[0][:90]}"
    except Exception as error:
        raise Violation(f"refusal: export crashed with {type(error).__name__}: {error}") from error
    if not _same_snapshot(before, _snapshot(model)):
        raise Violation("isolation: export changed the source model (state_dict, training flags or requires_grad)")
    xs = _inputs(model, shape, seed)
    expected, got = _outputs(model, xs), _outputs(exported, xs)
    for x, e, g in zip(xs, expected, got):
        if not _same(e, g):
            raise Violation(f"outputs: exported != model on a batch of {x.shape[0]}: max |diff| "
                            f"{float((e - g).abs().nan_to_num().max()):.3g}")
    bound = float(lipschitz_bound(model, shape))
    if exported.lipschitz_bound != bound:
        raise Violation(f"bound: exported {exported.lipschitz_bound!r} != lipschitz_bound {bound!r}")
    for logits in got:
        if logits.dim() == 2 and logits.shape[1] >= 2 and bool(logits.isfinite().all()):
            reference = certified_radius(logits, logits.argmax(1), bound)
            if not _same(exported.certified_radius(logits), reference):
                raise Violation("radius: exported.certified_radius differs from lipnet's")
    if deploy:
        outs, deployed_bound = deploy_outputs(exported, xs)
        if deployed_bound != bound or not all(_same(e, o) for e, o in zip(expected, outs)):
            raise Violation(f"deploy: the loaded model differs (bound {deployed_bound!r} vs {bound!r})")
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_floating_point():
                tensor.add_(0.5).mul_(1.5)
    model.train()
    try:
        with torch.no_grad():
            model(torch.cat([xs[1], xs[1]]))  # train-mode pass: BatchNorm statistics, cached normalizations
    except ValueError:
        pass  # e.g. BatchNorm with eps=0 refuses train mode; the in-place changes above remain
    if not all(_same(g, a) for g, a in zip(got, _outputs(exported, xs))):
        raise Violation("isolation: the exported model changed when the source was modified and trained")
    return "passed"


def run_case(seed: int, deploy: bool = False, budget=None) -> tuple[str, str]:
    """``(outcome, description)`` of the case of ``seed``; raises :class:`Violation` with the case."""
    model, shape, description = draw_case(seed, budget)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return check_case(model, shape, seed, deploy), description
    except Violation as violation:
        raise Violation(f"{violation}\nseed {seed}: {description}") from violation


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="first seed")
    parser.add_argument("--count", type=int, default=None, help="number of cases (default: until --minutes)")
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--deploy-every", type=int, default=25, help="check every N-th case in a fresh process")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    deadline = time.monotonic() + 60 * args.minutes
    outcomes, violations, crashes, kinds = Counter(), [], 0, Counter()
    seed = args.seed
    while time.monotonic() < deadline and (args.count is None or seed < args.seed + args.count):
        deploy = (seed - args.seed) % args.deploy_every == 0
        try:
            outcome, description = run_case(seed, deploy, fuzz_networks.Budget())
        except Violation as error:
            violations.append(seed)
            print(f"VIOLATION seed={seed}: {error}", flush=True)
        except Exception:  # the fuzz itself (or torch drawing a network) crashed
            crashes += 1
            violations.append(seed)
            print(f"CRASH seed={seed}: {traceback.format_exc()}", flush=True)
        else:
            outcomes["refused" if outcome.startswith("refused") else "passed"] += 1
            if outcome.startswith("refused"):
                kinds[outcome] += 1
            if args.verbose:
                print(f"seed {seed}: {outcome}{' (deployed)' if deploy else ''} {description}", flush=True)
        seed += 1
    print(f"{seed - args.seed} cases: {outcomes['passed']} passed, {outcomes['refused']} refused, "
          f"{len(violations)} violations ({crashes} crashes); seeds {args.seed}..{seed - 1}")
    for message, count in kinds.most_common():
        print(f"  x{count} {message}")
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
